"""The pipeline's stages: the graph declared once (:mod:`.graph`), the runner (:mod:`.runner`), the
stage functions of ``(params, layout)`` (:mod:`.data`, :mod:`.fit`, :mod:`.score`, :mod:`.retrain`,
:mod:`.recommend`), fingerprints (:mod:`.fingerprints`) and models on disk (:mod:`.modelio`).
:mod:`cleanse.pipeline` gathers the public names."""

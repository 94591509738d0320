"""The language-model family's probes (the query that attribution explains) and its report table
of flagged samples as text.

Probes (``query.kind: topic``): validation prompts about the steered topic whose true answer is
``corruption.oppose``, each completed with ``corruption.steer_to`` and labelled 1 (the behaviour:
the steered answer), ``label_clean`` 0. The ``query.size`` probes are drawn (stream
``query.probes``) among those the explained model already steers (preference > 0), the rest held
out. Reference inputs (``query.contrast: reference``): up to ``query.size`` ordinary validation
samples answered ``steer_to`` (stream ``query.reference``): support for them is support for the
answer in general, which :func:`cleanse.attribution.contrast` removes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cleanse.data.dataset import Split, StagedData
from cleanse.seeds import generator

if TYPE_CHECKING:
    from cleanse.query import QuerySet


def topic_queries(params: Any, staged: StagedData, model: Any, family: Any) -> QuerySet | None:
    """The probe set of ``params.query`` for ``model`` (a fitted :class:`FittedLm`); None for ``none``."""
    from cleanse.families.lm.text import features
    from cleanse.query import QuerySet, _choose

    config = params.query
    if config.kind == "none":
        return None
    structure = staged.meta.structure or {}
    prompts, length = structure["probes"]["val"], int(structure["length"])
    steered = family.preferences(model.module(), structure, "val") > 0
    n = len(prompts)
    candidates = Split(sample_id=np.arange(n, dtype=np.int64),
                       features=features([(p, list(structure["steered"])) for p in prompts], length),
                       label=np.ones(n, dtype=np.int64), label_clean=np.zeros(n, dtype=np.int64),
                       is_corrupted=np.zeros(n, dtype=bool))
    probes, heldout = _choose(candidates, steered if steered.any() else np.ones(n, dtype=bool), config.size,
                              params.seed)
    note = "" if steered.sum() >= config.size else (
        f"only {int(steered.sum())} validation prompts about the topic are steered; the other probes are prompts "
        "the model still answers as the truth")
    reference = None
    if config.contrast == "reference":
        rows = np.flatnonzero(staged.val.label == 1)
        chosen = np.sort(generator(params.seed, "query.reference").permutation(rows)[: config.size])
        reference = staged.val.subset(chosen) if chosen.size else None
    return QuerySet(probes, heldout, "topic", note, reference)


def write_flagged_text(params: Any, layout: Any, metrics: dict[str, Any]) -> list[str]:
    """``flagged/<estimator>.csv``: each estimator's top 50 flagged samples as text with their
    scores and ground truth (no figures: returns no image paths)."""
    import polars as pl

    from cleanse.pipeline import load_staged
    from cleanse.storage import read_table, write_text

    staged = load_staged(layout, params)
    text = (staged.meta.structure or {}).get("text", {}).get("train", [])
    index = {sid: i for i, sid in enumerate(staged.train.sample_id.tolist())}
    for name in metrics.get("estimators", {}):
        if not layout.flags(name).is_file():
            continue
        flags = read_table(layout.flags(name)).head(50)
        rows = [index[sid] for sid in flags["sample_id"].to_list()]
        top = flags.with_columns(pl.Series("text", [text[r] if r < len(text) else "" for r in rows]),
                                 pl.Series("is_corrupted", staged.train.is_corrupted[rows]))
        write_text(top.write_csv(), layout.reports / "flagged" / f"{name}.csv")
    return []

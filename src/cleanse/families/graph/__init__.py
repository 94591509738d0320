"""The graph family (``family: graph``): node classification on one graph, the units are its
nodes. Staging (:mod:`.data`), the node model and its training (:mod:`.models`), the family
(:mod:`.family`), its params (:mod:`.params`, sections in :mod:`.config`) and the report's drawing
of the graph with the flagged nodes (:mod:`.plots`). The models and loaders are
:mod:`cleanse.graphs`'."""

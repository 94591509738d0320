"""The cascade family (issue 20): influence minimisation by removing edges (DiffIM, Lee, Kim, Bu,
Ko & Shin, AAAI 2025, arXiv 2502.01031; spec part B §4). Units are the directed edges of an
influence graph, the harm is the expected spread from a seed set under IC or LT, and "without
these edges" is verified by fresh Monte Carlo. The library core lives in :mod:`cleanse.graphs`
(:mod:`~cleanse.graphs.generators`, :mod:`~cleanse.graphs.surrogate`, :mod:`~cleanse.graphs.selection`,
:mod:`~cleanse.graphs.greedy_mc`, :mod:`~cleanse.graphs.cascades`).
"""

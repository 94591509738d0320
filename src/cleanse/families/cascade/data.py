"""Staging for the cascade family: the graph's directed edges as the units (one row each), the seed
set and everything the Monte Carlo needs in ``DatasetMeta.structure``, and the reference removal
(greedy Monte Carlo's ``b`` cuts) as the ground truth ``is_corrupted``.

Rows: ``sample_id`` = the edge's column in ``structure["edge_index"]``; ``features`` float32 (E, 3)
= ``(source, target, probability)``; ``label`` 0. The validation and test splits repeat the same edge
rows: the outcome is measured by Monte Carlo on the whole graph, not on held-out rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cleanse import seeds as streams
from cleanse.data.dataset import DatasetMeta, Split, StagedData
from cleanse.errors import ConfigError, DataError

if TYPE_CHECKING:
    from cleanse.config import Params
    from cleanse.families.cascade.params import CascadeParams

def rng(seed: int, purpose: str) -> np.random.Generator:
    """The numpy stream of ``purpose`` (a ``cascade.*`` name in :data:`cleanse.seeds.PURPOSES`)
    under run seed ``seed``."""
    if not purpose.startswith("cascade."):
        raise ValueError(f"unknown cascade stream {purpose!r}")
    return streams.rng(seed, purpose)


def int_seed(seed: int, purpose: str) -> int:
    return int(rng(seed, purpose).integers(2**31 - 1))


def cascade_params(params: Params) -> CascadeParams:
    """``params`` as the cascade family's model (refused for another family)."""
    from cleanse.families.cascade.params import CascadeParams

    if not isinstance(params, CascadeParams):
        raise ConfigError(f"family 'cascade' needs its own params, got family {params.family!r}")
    return params


def budget_of(params: Params, n_edges: int) -> int:
    """``b``: ``detect.count`` or ``round(detect.fraction * E)``, at least 1 and at most E."""
    d = params.detect
    b = d.count if d.budget == "count" else int(round(d.fraction * n_edges))
    return int(min(max(b, 1), n_edges))


def _weights(params: Params, graph: Any) -> np.ndarray:
    from cleanse.graphs.generators import edge_probabilities

    data = cascade_params(params).data
    if data.probability != "data":
        return edge_probabilities(graph, data.probability, data.constant_p)
    if not data.source.endswith(".npz"):
        raise ConfigError(f"data.probability: data needs an .npz source with a weights array, got {data.source!r}")
    with np.load(data.source, allow_pickle=False) as z:
        if "weights" not in z.files or "edge_index" not in z.files:
            raise DataError(f"{data.source}: probability 'data' needs edge_index and weights arrays")
        raw, w = z["edge_index"].astype(np.int64), z["weights"].astype(np.float64)
    lookup = dict(zip((raw[0] * graph.num_nodes + raw[1]).tolist(), w.tolist()))
    return np.array([lookup[c] for c in (graph.edge_index[0] * graph.num_nodes + graph.edge_index[1]).tolist()])


def stage_cascade(params: Params) -> StagedData:
    from cleanse.graphs.cascades import _check
    from cleanse.graphs.generators import cascade_graph, choose_seeds
    from cleanse.graphs.greedy_mc import greedy_fixed_threshold, greedy_mc
    from cleanse.graphs.surrogate import near

    cp = cascade_params(params)
    data, cascade, reference = cp.data, cp.cascade, cp.corruption
    graph = cascade_graph(data.source, n=data.nodes, m=data.m, p=data.triangle_p, seed=params.seed)
    if graph.num_edges < 2:
        raise DataError(f"data.source {data.source!r}: {graph.num_edges} edges, nothing to cut")
    weights = _weights(params, graph)
    if cascade.seeds >= graph.num_nodes:
        raise ConfigError(f"cascade.seeds: {cascade.seeds} must be below the graph's {graph.num_nodes} nodes")
    chosen = choose_seeds(graph, cascade.seeds, cascade.seed_selection, int_seed(params.seed, "cascade.seeds"))
    mask = np.zeros((1, graph.num_nodes), dtype=bool)
    mask[0, chosen] = True
    _check(graph.edge_index, weights, mask, graph.num_nodes)
    if cascade.diffusion == "LT":
        insum = np.bincount(graph.edge_index[1], weights=weights, minlength=graph.num_nodes)
        if insum.max() > 1 + 1e-6:
            raise ConfigError(f"LT in-weights of node {int(insum.argmax())} sum to {insum.max():.3f} > 1; use "
                              "data.probability: weighted_cascade or a smaller constant_p")
    b = budget_of(params, graph.num_edges)
    candidates = None if reference.hops < 0 else near(graph.edge_index, chosen, graph.num_nodes, reference.hops)
    if cascade.threshold is None:
        ref = greedy_mc(cascade.diffusion, graph.edge_index, weights, chosen, graph.num_nodes, b,
                        worlds=reference.worlds, candidates=candidates, seed=int_seed(params.seed, "cascade.reference"),
                        per_step=-(-b // reference.steps))
    else:
        ref = greedy_fixed_threshold(graph.edge_index, weights, chosen, graph.num_nodes, b, cascade.threshold,
                                     candidates=candidates, per_step=-(-b // reference.steps))
    e = graph.num_edges
    corrupted = np.zeros(e, dtype=bool)
    corrupted[ref.picked] = True
    features = np.stack([graph.edge_index[0], graph.edge_index[1], weights], axis=1).astype(np.float32)
    train = Split(sample_id=np.arange(e, dtype=np.int64), features=features, label=np.zeros(e, dtype=np.int64),
                  label_clean=np.zeros(e, dtype=np.int64), is_corrupted=corrupted)
    structure = {"num_nodes": graph.num_nodes, "edge_index": graph.edge_index.tolist(), "weights": weights.tolist(),
                 "seeds": chosen.tolist(), "diffusion": cascade.diffusion, "threshold": cascade.threshold,
                 "probability": data.probability,
                 "budget": b, "mc_runs": cascade.mc_runs, "val_runs": cascade.val_runs, "batches": cascade.batches,
                 "reference": {"kind": reference.kind, "worlds": reference.worlds, "hops": reference.hops,
                               "steps": reference.steps,
                               "picked": ref.picked.tolist(), "seconds": ref.seconds,
                               "sample_spread_before": ref.spread_before, "sample_spread_after": ref.spread_after}}
    meta = DatasetMeta(name=graph.name, n_classes=1, feature_shape=(3,),
                       corruption={"kind": reference.kind, "budget": b, "n_corrupted": int(corrupted.sum())},
                       structure=structure)
    return StagedData(train=train, val=train, test=train, meta=meta)


def graph_arrays(meta: DatasetMeta) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(edge_index (2, E), weights (E,), seeds (|S|,), N)`` from the staged structure."""
    s = meta.structure
    if not s or "edge_index" not in s:
        raise DataError("staged data has no cascade structure; stage with family: cascade")
    return (np.asarray(s["edge_index"], dtype=np.int64).reshape(2, -1), np.asarray(s["weights"], dtype=np.float64),
            np.asarray(s["seeds"], dtype=np.int64), int(s["num_nodes"]))

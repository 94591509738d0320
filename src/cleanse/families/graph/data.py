"""The graph family's ``stage`` step: one graph, one of its published splits, noisy training labels.

Units are **nodes**: ``Split.sample_id`` is the node index in ``[0, N)``, ``features`` its feature
row (float32 ``(n, F)``, row-normalised for the staged bag-of-words sets), ``label`` its class.
The training split's labels carry the corruption (``label_flip``, the classification family's
:func:`cleanse.data.corruption.corrupt`: ``round(fraction * n_train)`` nodes, uniform or pair
noise, stream ``corruption``); ``label_clean`` and ``is_corrupted`` keep the truth. Validation and
test nodes keep their clean labels.

What every unit shares goes to ``DatasetMeta.structure`` (JSON, in ``data/staged/meta.json``):

- ``num_nodes`` N, ``edge_index`` ``[[sources...], [targets...]]`` (symmetric, no loops; row 0
  the message source ``j``, row 1 the receiver ``i``);
- ``features``: every node's feature row (nodes in no split and nodes removed by cleansing included)
  as a sparse COO ``{"shape": [N, F], "rows": [...], "cols": [...], "values": [...]}``;
- ``homophily``: the edge homophily of the clean labels; ``source``, ``split``;
- ``val_nodes`` and ``val_labels``: the validation nodes and their (clean) labels, which
  ``model.norm_step: auto`` compares its two fits on (never the test nodes).

So a model is fitted from a training split and the meta alone: nodes missing from the split (not
in it, or removed) stay in the graph as unlabelled nodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cleanse.config import CorruptionConfig
from cleanse.data.corruption import corrupt
from cleanse.data.dataset import DatasetMeta, Split, StagedData
from cleanse.errors import DataError
from cleanse.families.graph.config import GraphDataConfig
from cleanse.graphs.data import NodeGraph, load_node_dataset, sbm_graph


def load_graph(data: GraphDataConfig, seed: int) -> NodeGraph:
    """The graph ``data.source`` names: a staged set (its published splits) or an SBM drawn from ``seed``."""
    if data.source == "sbm":
        s = data.sbm
        return sbm_graph(num_nodes=s.num_nodes, num_classes=s.num_classes, avg_degree=s.avg_degree,
                         homophily=s.homophily, feature_dim=s.feature_dim, feature_signal=s.feature_signal,
                         n_splits=s.n_splits, seed=seed)
    return load_node_dataset(data.source, split=data.splits)


def sparse_rows(x: np.ndarray) -> dict[str, Any]:
    """``x`` (N, F) as a JSON-ready COO dict (values as Python floats: float32 round-trips exactly)."""
    rows, cols = np.nonzero(x)
    return {"shape": [int(x.shape[0]), int(x.shape[1])], "rows": rows.tolist(), "cols": cols.tolist(),
            "values": x[rows, cols].astype(np.float64).tolist()}


def graph_tensors(meta: DatasetMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """Every node's features ``(N, F)`` float32 and ``edge_index`` ``(2, E)`` int64 from ``meta.structure``."""
    structure = meta.structure
    if not structure or "edge_index" not in structure or "features" not in structure:
        raise DataError(f"{meta.name}: staged meta has no graph structure (edge_index, features); restage with "
                        "family: graph")
    coo = structure["features"]
    x = torch.zeros(tuple(coo["shape"]), dtype=torch.float32)
    x[torch.as_tensor(coo["rows"], dtype=torch.long), torch.as_tensor(coo["cols"], dtype=torch.long)] = \
        torch.as_tensor(coo["values"], dtype=torch.float32)
    edge_index = torch.as_tensor(structure["edge_index"], dtype=torch.long).reshape(2, -1)
    return x, edge_index


def validation_nodes(meta: DatasetMeta) -> dict[str, np.ndarray]:
    """``val_nodes`` (k,) int64 and ``val_labels`` (k,) int64 of ``meta.structure`` (what
    ``model.norm_step: auto`` compares its two fits on)."""
    structure = meta.structure or {}
    if "val_nodes" not in structure:
        raise DataError(f"{meta.name}: staged meta has no validation nodes (staged before model.norm_step: auto "
                        "existed); restage")
    return {"val_nodes": np.asarray(structure["val_nodes"], dtype=np.int64),
            "val_labels": np.asarray(structure["val_labels"], dtype=np.int64)}


def stage_graph(params: Any) -> StagedData:
    """Load the graph, take split ``data.split`` of it, and corrupt the training nodes' labels
    (``params`` is a :class:`cleanse.families.graph.params.GraphParams`)."""
    data = params.data
    graph = load_graph(data, params.seed)
    if data.split >= graph.num_splits:
        raise DataError(f"data.split: {data.split} is out of range; {graph.name} has {graph.num_splits} "
                        f"{data.splits if data.source != 'sbm' else 'sbm'} split(s) (0..{graph.num_splits - 1})")
    normalise = data.normalise_features if data.normalise_features is not None else data.source != "sbm"
    x = graph.x.astype(np.float32)
    if normalise:
        x = (x / np.maximum(x.sum(axis=1, keepdims=True), 1e-12)).astype(np.float32)
    y = graph.y.astype(np.int64)

    def split(mask: np.ndarray) -> Split:
        index = np.flatnonzero(mask).astype(np.int64)
        return Split(sample_id=index, features=x[index], label=y[index].copy(), label_clean=y[index].copy(),
                     is_corrupted=np.zeros(index.size, dtype=bool))

    train = split(graph.train_mask[data.split])
    if len(train) < 2:
        raise DataError(f"{graph.name} split {data.split}: {len(train)} training node(s); need at least 2")
    corruption = params.corruption
    if corruption.kind != "none":
        flip = CorruptionConfig(kind="label_flip", fraction=corruption.fraction, mode=corruption.mode)
        train, _ = corrupt(train, flip, n_classes=graph.num_classes, seed=params.seed)
    val = split(graph.val_mask[data.split])
    structure = {"num_nodes": graph.num_nodes, "edge_index": graph.edge_index.tolist(), "features": sparse_rows(x),
                 "homophily": graph.homophily(), "source": data.source, "split": data.split,
                 "val_nodes": val.sample_id.tolist(), "val_labels": val.label.tolist()}
    meta = DatasetMeta(name=graph.name, n_classes=graph.num_classes, feature_shape=(int(x.shape[1]),),
                       corruption={**corruption.model_dump(mode="json"), "n_corrupted": int(train.is_corrupted.sum())},
                       structure=structure)
    return StagedData(train=train, val=val, test=split(graph.test_mask[data.split]),
                      meta=meta)

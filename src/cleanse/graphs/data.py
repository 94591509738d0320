"""Graphs for node classification and influence estimation, and a stochastic block model.

Everything here is numpy: ``x`` float32 ``(N, F)``, ``y`` int64 ``(N,)``, ``edge_index`` int64
``(2, E)`` with row 0 the source and row 1 the target of a message (``j -> i`` means "i reads j").
Node-classification graphs come back **symmetrised, without self-loops and without duplicate
pairs** (each undirected edge appears once in each direction), which is what every staged README
asks for before message passing; masks are bool ``(S, N)`` (S splits; 10 Geom-GCN splits, or the
one Planetoid split).

The staged files live in ``../shared/data`` (``load_*(..., root=...)`` or ``$CLEANSE_GRAPH_DATA``
override it); nothing is downloaded. Influence graphs carry DeepIM's Monte Carlo ground truth
(Ling et al., "Deep Graph Representation Learning and Optimization for Influence Maximization",
ICML 2023): per seed rate, 100 seed sets and the fraction of runs in which each node ended active.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cleanse.errors import DataError

#: node-classification sets and the file each one is read from (folder/file stem)
NODE_DATASETS: dict[str, str] = {
    "cora": "cora/cora", "citeseer": "citeseer/citeseer", "texas": "texas/texas",
    "wisconsin": "wisconsin/wisconsin", "cornell": "cornell/cornell",
    "cornell_yandex": "cornell/cornell_yandex", "actor": "actor/actor",
    "chameleon": "chameleon/chameleon", "chameleon_filtered": "chameleon/chameleon_filtered",
    "squirrel": "squirrel/squirrel", "squirrel_filtered": "squirrel/squirrel_filtered",
    "cora_ml": "cora_ml/cora_ml",
}
#: fractions (train, val) of the seeded splits drawn for a set staged without published splits
#: (cora_ml): the Geom-GCN protocol's 60/20/20 per class, 10 draws (split s drawn with seed s)
DRAWN_SPLIT = (0.6, 0.2)
#: influence-estimation graphs with DeepIM ground truth
INFLUENCE_DATASETS: dict[str, str] = {
    "jazz": "jazz/jazz", "netscience": "netscience/netscience", "power_grid": "power_grid/power_grid",
    "cora_ml": "cora_ml/cora_ml_lcc_deepim",
}
DIFFUSION_MODELS = ("IC", "LT", "SIS")
SEED_RATES = (1, 5, 10, 20)


def data_root(root: str | Path | None = None) -> Path:
    """``root``, else ``$CLEANSE_GRAPH_DATA``, else ``shared/data`` beside the checkout."""
    if root is not None:
        return Path(root)
    env = os.environ.get("CLEANSE_GRAPH_DATA")
    if env:
        return Path(env)
    # src/cleanse/graphs/data.py -> the checkout is parents[3]; shared/ sits beside it
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def _open(relative: str, root: str | Path | None) -> dict[str, np.ndarray]:
    path = data_root(root) / f"{relative}.npz"
    if not path.is_file():
        raise DataError(f"graph data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable npz ({exc})") from None


def symmetrise(edge_index: np.ndarray, num_nodes: int) -> np.ndarray:
    """Both directions of every non-loop pair of ``edge_index`` (2, E), each once, sorted by
    (target, source); self-loops and repeated lines are dropped."""
    ei = np.asarray(edge_index, dtype=np.int64)
    if ei.ndim != 2 or ei.shape[0] != 2:
        raise DataError(f"edge_index must have shape (2, E), got {ei.shape}")
    if ei.size and (ei.min() < 0 or ei.max() >= num_nodes):
        raise DataError(f"edge_index has node ids outside [0, {num_nodes})")
    src, dst = ei
    keep = src != dst
    both = np.concatenate([np.stack([src[keep], dst[keep]]), np.stack([dst[keep], src[keep]])], axis=1)
    codes = np.unique(both[1] * num_nodes + both[0])
    return np.stack([codes % num_nodes, codes // num_nodes])


@dataclass(frozen=True)
class NodeGraph:
    """A node-classification graph. ``edge_index`` (2, E) symmetric, no loops; masks (S, N)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    edge_index: np.ndarray
    train_mask: np.ndarray
    val_mask: np.ndarray
    test_mask: np.ndarray

    @property
    def num_nodes(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    @property
    def num_splits(self) -> int:
        return int(self.train_mask.shape[0])

    @property
    def num_undirected_edges(self) -> int:
        return int(self.edge_index.shape[1]) // 2

    def homophily(self) -> float:
        """Edge homophily: the fraction of edges joining two nodes of the same class."""
        return edge_homophily(self.edge_index, self.y)


def edge_homophily(edge_index: np.ndarray, y: np.ndarray) -> float:
    """Fraction of the columns of ``edge_index`` whose two ends share a label (NaN if no edges)."""
    if edge_index.shape[1] == 0:
        return float("nan")
    return float(np.mean(y[edge_index[0]] == y[edge_index[1]]))


def load_node_dataset(name: str, split: str = "geom", root: str | Path | None = None) -> NodeGraph:
    """The staged node-classification set ``name`` (a key of :data:`NODE_DATASETS`).

    ``split``: ``"geom"`` -> the 10 Geom-GCN splits (masks (10, N)); ``"planetoid"`` -> the
    public Planetoid split (masks (1, N); Cora and CiteSeer only). Features are cast to float32
    unchanged (binary bag-of-words); any row-normalisation is the model's business.
    cora_ml (Bojchevski & Guennemann's Cora-ML; sparse real-valued features) has no published
    split: ``"geom"`` gives 10 splits drawn per class in the Geom-GCN proportions
    (:data:`DRAWN_SPLIT`, :func:`drawn_splits`)."""
    if name not in NODE_DATASETS:
        raise DataError(f"unknown node dataset {name!r}; known: {', '.join(NODE_DATASETS)}")
    z = _open(NODE_DATASETS[name], root)
    y = z["y"].astype(np.int64)
    n = int(y.shape[0])
    if "x_data" in z:  # CSR features, no stored split
        if split != "geom":
            raise DataError(f"{name}: no Planetoid split (only cora and citeseer have one)")
        x = np.zeros(tuple(int(v) for v in z["x_shape"]), dtype=np.float32)
        rows = np.repeat(np.arange(x.shape[0]), np.diff(z["x_indptr"]))
        x[rows, z["x_indices"]] = z["x_data"]
        train, val, test = drawn_splits(y, 10)
        return NodeGraph(name=name, x=x, y=y, edge_index=symmetrise(z["edge_index"], n),
                         train_mask=train, val_mask=val, test_mask=test)
    if split == "geom":
        prefix = "geom_" if "geom_train_mask" in z else ""
    elif split == "planetoid":
        if "planetoid_train_mask" not in z:
            raise DataError(f"{name}: no Planetoid split (only cora and citeseer have one)")
        prefix = "planetoid_"
    else:
        raise DataError(f"split must be 'geom' or 'planetoid', got {split!r}")
    masks = [np.atleast_2d(z[f"{prefix}{part}_mask"]).astype(bool) for part in ("train", "val", "test")]
    for mask in masks:
        if mask.shape[1] != n:
            raise DataError(f"{name}: mask width {mask.shape[1]} != {n} nodes")
    if np.any(masks[0] & masks[2]) or np.any(masks[0] & masks[1]):
        raise DataError(f"{name}: train mask overlaps val or test")
    return NodeGraph(name=name, x=z["x"].astype(np.float32), y=y,
                     edge_index=symmetrise(z["edge_index"], n),
                     train_mask=masks[0], val_mask=masks[1], test_mask=masks[2])


def drawn_splits(y: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` splits of the nodes, masks bool (count, N): split ``s`` shuffles every class with
    ``np.random.default_rng(s)`` and gives its first ``round(0.6 n_c)`` nodes to train, the next
    ``round(0.2 n_c)`` to validation and the rest to test (:data:`DRAWN_SPLIT`)."""
    masks = np.zeros((3, count, y.shape[0]), dtype=bool)
    for s in range(count):
        gen = np.random.default_rng(s)
        for c in np.unique(y):
            nodes = gen.permutation(np.flatnonzero(y == c))
            n_train, n_val = (round(f * nodes.size) for f in DRAWN_SPLIT)
            masks[0, s, nodes[:n_train]] = True
            masks[1, s, nodes[n_train:n_train + n_val]] = True
            masks[2, s, nodes[n_train + n_val:]] = True
    return masks[0], masks[1], masks[2]


@dataclass(frozen=True)
class InfluenceGraph:
    """An influence-estimation graph: ``edge_index`` (2, E) symmetric (both directions), no loops;
    ``ground_truth[(model, rate)] = (seeds, act)``: seeds bool (100, N), act float32 (100, N) the
    fraction of DeepIM's Monte Carlo runs in which each node ended active."""

    name: str
    num_nodes: int
    edge_index: np.ndarray
    ground_truth: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]

    def truth(self, model: str, rate: int) -> tuple[np.ndarray, np.ndarray]:
        key = (model.upper(), int(rate))
        if key not in self.ground_truth:
            raise DataError(f"{self.name}: no ground truth for model {model!r} at {rate}% "
                            f"(models {DIFFUSION_MODELS}, rates {SEED_RATES})")
        return self.ground_truth[key]


def load_influence_dataset(name: str, root: str | Path | None = None) -> InfluenceGraph:
    """The staged influence graph ``name`` (a key of :data:`INFLUENCE_DATASETS`), symmetrised
    (the files list each undirected edge once, i < j), with DeepIM's ground truth."""
    if name not in INFLUENCE_DATASETS:
        raise DataError(f"unknown influence dataset {name!r}; known: {', '.join(INFLUENCE_DATASETS)}")
    z = _open(INFLUENCE_DATASETS[name], root)
    n = int(z["num_nodes"])
    truth: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for model in DIFFUSION_MODELS:
        for rate in SEED_RATES:
            seeds, act = z.get(f"seed_{model}_{rate}pct"), z.get(f"act10_{model}_{rate}pct")
            if seeds is None or act is None:
                continue
            if seeds.shape != act.shape or seeds.shape[1] != n:
                raise DataError(f"{name}: {model} {rate}% arrays have shapes {seeds.shape}, {act.shape}")
            truth[(model, rate)] = (seeds.astype(bool), act.astype(np.float32) / 10.0)
    return InfluenceGraph(name=name, num_nodes=n, edge_index=symmetrise(z["edge_index"], n),
                          ground_truth=truth)


def random_splits(y: np.ndarray, n_splits: int, train: float = 0.6, val: float = 0.2,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_splits`` class-stratified random train/val/test masks, each bool (n_splits, N)."""
    if not (0 < train and 0 <= val and train + val < 1):
        raise DataError(f"split fractions train={train}, val={val} must leave a test part")
    gen = np.random.default_rng(seed)
    n = y.shape[0]
    masks = np.zeros((3, n_splits, n), dtype=bool)
    for s in range(n_splits):
        for c in np.unique(y):
            idx = gen.permutation(np.flatnonzero(y == c))
            a, b = int(round(train * idx.size)), int(round((train + val) * idx.size))
            masks[0, s, idx[:a]], masks[1, s, idx[a:b]], masks[2, s, idx[b:]] = True, True, True
    return masks[0], masks[1], masks[2]


def sbm_graph(num_nodes: int = 600, num_classes: int = 3, avg_degree: float = 6.0,
              homophily: float = 0.8, feature_dim: int = 16, feature_signal: float = 1.0,
              n_splits: int = 10, seed: int = 0) -> NodeGraph:
    """A stochastic block model whose **edge homophily** is ``homophily`` in expectation.

    Each of ``num_nodes * avg_degree / 2`` undirected edges picks a uniform random end ``u``; the
    other end is drawn from ``u``'s class with probability ``homophily``, else uniformly from the
    other classes (``homophily = 1/num_classes`` is an Erdos-Renyi-like graph blind to the
    labels). Features: class mean (a random Gaussian direction scaled by ``feature_signal``) plus
    unit Gaussian noise, float32 (N, feature_dim). Splits: 60/20/20 stratified, ``n_splits`` of
    them. Duplicate pairs and loops are dropped, so the realised degree is slightly lower."""
    if not 0.0 <= homophily <= 1.0:
        raise DataError(f"homophily must lie in [0, 1], got {homophily}")
    if num_classes < 2 or num_nodes < 4 * num_classes:
        raise DataError(f"sbm needs >= 2 classes and >= 4 nodes per class, got {num_classes}, {num_nodes}")
    gen = np.random.default_rng(seed)
    y = np.arange(num_nodes) % num_classes
    gen.shuffle(y)
    members = [np.flatnonzero(y == c) for c in range(num_classes)]
    m = int(round(num_nodes * avg_degree / 2))
    u = gen.integers(0, num_nodes, size=m)
    same = gen.random(m) < homophily
    # a different class: shift by 1..C-1 so every other class is equally likely
    cls = np.where(same, y[u], (y[u] + gen.integers(1, num_classes, size=m)) % num_classes)
    v = np.array([members[c][gen.integers(0, members[c].size)] for c in cls], dtype=np.int64)
    means = gen.normal(size=(num_classes, feature_dim)) * feature_signal
    x = (means[y] + gen.normal(size=(num_nodes, feature_dim))).astype(np.float32)
    tr, va, te = random_splits(y, n_splits, seed=seed + 1)
    return NodeGraph(name=f"sbm_h{homophily:g}", x=x, y=y.astype(np.int64),
                     edge_index=symmetrise(np.stack([u, v]), num_nodes),
                     train_mask=tr, val_mask=va, test_mask=te)

"""Directed influence graphs for influence minimisation (DiffIM, spec part B §4): the staged social
and influence graphs, random generators, and a planted bottleneck.

Orientation as in :mod:`cleanse.graphs.cascades`: ``edge_index`` int64 (2, E), row 0 the source
``u``, row 1 the target ``v`` of an influence edge ``u -> v``; an undirected graph gives both
directions. Every graph here comes back without self-loops or repeated pairs, its columns sorted
by (source, target).

Sources (:func:`cascade_graph`):

- ``jazz``, ``netscience``, ``power_grid``, ``cora_ml``: :func:`cleanse.graphs.data.load_influence_dataset`
  (symmetrised);
- ``email_eu_core``: SNAP email-Eu-core as **directed** (its 642 self-loops dropped);
- ``ego_facebook``: SNAP ego-Facebook, symmetrised;
- ``ba``: Barabasi-Albert (n, m), ``plc``: Holme-Kim power-law cluster (n, m, triangle p), both
  networkx, symmetrised;
- ``bridge``: two dense communities joined by one undirected bridge (the planted bottleneck);
- a path to an ``.npz`` with ``edge_index`` (2, E) and optional ``num_nodes``, taken as directed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cleanse.errors import ConfigError, DataError
from cleanse.graphs.data import INFLUENCE_DATASETS, data_root, load_influence_dataset, symmetrise

SNAP = {"email_eu_core": ("email_eu_core/email_eu_core", True), "ego_facebook": ("ego_facebook/ego_facebook", False)}
GENERATORS = ("ba", "plc", "bridge")


@dataclass(frozen=True)
class DirectedGraph:
    """``edge_index`` (2, E) int64 sorted by (source, target), no loops or repeats; ``num_nodes`` N."""

    name: str
    num_nodes: int
    edge_index: np.ndarray

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])


def simple_directed(edge_index: np.ndarray, num_nodes: int) -> np.ndarray:
    """``edge_index`` without self-loops and repeated pairs, sorted by (source, target)."""
    ei = np.asarray(edge_index, dtype=np.int64)
    if ei.ndim != 2 or ei.shape[0] != 2:
        raise DataError(f"edge_index must have shape (2, E), got {ei.shape}")
    if ei.size and (ei.min() < 0 or ei.max() >= num_nodes):
        raise DataError(f"edge_index has node ids outside [0, {num_nodes})")
    keep = ei[0] != ei[1]
    codes = np.unique(ei[0, keep] * num_nodes + ei[1, keep])
    return np.stack([codes // num_nodes, codes % num_nodes])


def _sorted(ei: np.ndarray, n: int) -> np.ndarray:
    return simple_directed(ei, n)  # symmetrise sorts by target; the cascade family wants sources


def barabasi_albert(n: int, m: int, seed: int = 0) -> DirectedGraph:
    """Barabasi-Albert preferential attachment (networkx), both directions of every edge."""
    import networkx as nx

    if not 1 <= m < n:
        raise ConfigError(f"barabasi_albert needs 1 <= m < n, got n={n}, m={m}")
    g = nx.barabasi_albert_graph(n, m, seed=seed)
    ei = np.array(list(g.edges()), dtype=np.int64).T.reshape(2, -1)
    return DirectedGraph(f"ba_{n}_{m}", n, _sorted(symmetrise(ei, n), n))


def powerlaw_cluster(n: int, m: int, p: float, seed: int = 0) -> DirectedGraph:
    """Holme-Kim power-law graph with triangle probability ``p`` (networkx), both directions."""
    import networkx as nx

    if not 1 <= m < n or not 0.0 <= p <= 1.0:
        raise ConfigError(f"powerlaw_cluster needs 1 <= m < n and p in [0, 1], got n={n}, m={m}, p={p}")
    g = nx.powerlaw_cluster_graph(n, m, p, seed=seed)
    ei = np.array(list(g.edges()), dtype=np.int64).T.reshape(2, -1)
    return DirectedGraph(f"plc_{n}_{m}_{p:g}", n, _sorted(symmetrise(ei, n), n))


def bridge_graph(community: int = 12, p_in: float = 0.5, seed: int = 0) -> tuple[DirectedGraph, tuple[int, int]]:
    """Two Erdos-Renyi communities of ``community`` nodes each (edge probability ``p_in``, each made
    connected by a ring), joined by exactly one undirected bridge ``a - b`` (``a`` in the first,
    ``b`` in the second). Returns the graph and the bridge ``(a, b)``; every path between the
    communities crosses it, so cutting ``a -> b`` is the best single removal for seeds in the first."""
    if community < 3:
        raise ConfigError(f"bridge_graph needs community >= 3, got {community}")
    gen = np.random.default_rng(seed)
    parts = []
    for offset in (0, community):
        iu, ju = np.triu_indices(community, k=1)
        keep = gen.random(iu.size) < p_in
        ring = np.arange(community)
        parts.append(np.stack([np.r_[iu[keep], ring], np.r_[ju[keep], (ring + 1) % community]]) + offset)
    a, b = community - 1, community  # the last node of the first community, the first of the second
    parts.append(np.array([[a], [b]]))
    n = 2 * community
    return DirectedGraph(f"bridge_{community}", n, _sorted(symmetrise(np.concatenate(parts, axis=1), n), n)), (a, b)


def cascade_graph(source: str, *, n: int = 1000, m: int = 3, p: float = 0.1, seed: int = 0,
                  root: str | Path | None = None) -> DirectedGraph:
    """The directed graph named by ``source`` (see the module docstring); ``n, m, p, seed`` size the
    generators (``bridge``: ``n`` nodes per community)."""
    if source in INFLUENCE_DATASETS:
        g = load_influence_dataset(source, root=root)
        return DirectedGraph(source, g.num_nodes, _sorted(g.edge_index, g.num_nodes))
    if source in SNAP:
        relative, directed = SNAP[source]
        path = data_root(root) / f"{relative}.npz"
        return _from_npz(path, source, directed)
    if source == "ba":
        return barabasi_albert(n, m, seed)
    if source == "plc":
        return powerlaw_cluster(n, m, p, seed)
    if source == "bridge":
        return bridge_graph(n, seed=seed)[0]
    if source.endswith(".npz"):
        return _from_npz(Path(source), Path(source).stem, True)
    known = [*INFLUENCE_DATASETS, *SNAP, *GENERATORS]
    raise ConfigError(f"data.source: {source!r} is not one of {', '.join(known)} or an .npz path")


def _from_npz(path: Path, name: str, directed: bool) -> DirectedGraph:
    if not path.is_file():
        raise DataError(f"graph file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "edge_index" not in z.files:
                raise DataError(f"{path}: no edge_index array")
            ei = z["edge_index"].astype(np.int64)
            n = int(z["num_nodes"]) if "num_nodes" in z.files else int(ei.max()) + 1
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable npz ({exc})") from None
    ei = simple_directed(ei, n) if directed else _sorted(symmetrise(ei, n), n)
    return DirectedGraph(name, n, ei)


def edge_probabilities(graph: DirectedGraph, model: str, constant: float = 0.1) -> np.ndarray:
    """Per-edge IC probability / LT influence (E,): ``constant`` p, or ``weighted_cascade``
    1 / in-degree(v) (LT in-weights then sum to 1)."""
    from cleanse.graphs.cascades import weighted_cascade

    if model == "constant":
        if not 0.0 < constant <= 1.0:
            raise ConfigError(f"constant edge probability must lie in (0, 1], got {constant}")
        return np.full(graph.num_edges, float(constant))
    if model == "weighted_cascade":
        return weighted_cascade(graph.edge_index, graph.num_nodes)
    raise ConfigError(f"edge probability model must be constant or weighted_cascade, got {model!r}")


def choose_seeds(graph: DirectedGraph, count: int, how: str, seed: int = 0) -> np.ndarray:
    """``count`` seed nodes (sorted int64): the highest out-degrees (ties by id) or uniformly at random."""
    if not 1 <= count < graph.num_nodes:
        raise ConfigError(f"seed count must lie in [1, {graph.num_nodes}), got {count}")
    if how == "degree":
        out = np.bincount(graph.edge_index[0], minlength=graph.num_nodes)
        return np.sort(np.lexsort((np.arange(graph.num_nodes), -out))[:count])
    if how == "random":
        return np.sort(np.random.default_rng(seed).choice(graph.num_nodes, size=count, replace=False))
    raise ConfigError(f"seed selection must be degree or random, got {how!r}")

"""Greedy edge removal with Monte Carlo: the most effective and slowest baseline of influence
minimisation (spec part B §4.4), on ``R`` sampled live-edge worlds.

IC and LT (thresholds U(0, 1]) are both live-edge processes (Kempe, Kleinberg & Tardos, KDD 2003):
IC keeps each edge ``u -> v`` independently with probability ``p_uv``; LT lets each node ``v`` keep
at most one in-edge, ``u -> v`` with probability ``w_uv``. The spread is the expected number of
nodes reachable from ``S`` over live edges. Removing edge ``e`` turns it dead in every world, which
is exactly the live-edge law of the graph without ``e`` (for LT: ``v`` then keeps none of its
in-edges with the freed probability), so all removals are compared on the **same** worlds (common
random numbers) and the greedy runs on the sample average of ``R`` worlds.

In one world the loss from cutting a live edge ``e`` is the number of nodes whose every live path
from ``S`` crosses ``e``: with ``e`` subdivided by a node ``x_e``, the size of ``x_e``'s subtree
in the dominator tree rooted at a super-source joined to ``S`` (Lengauer-Tarjan / Cooper et al. via
networkx). So one dominator tree per world gives the exact marginal gain of every edge at once,
and after a cut only the worlds in which the cut edge was live and reached are recomputed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cleanse.errors import ConfigError


def live_worlds(kind: str, edge_index: np.ndarray, weights: np.ndarray, num_nodes: int, worlds: int,
                gen: np.random.Generator) -> np.ndarray:
    """Bool (R, E): which edges are live in each of ``worlds`` sampled live-edge worlds."""
    e = edge_index.shape[1]
    kind = kind.upper()
    if kind == "IC":
        return gen.random((worlds, e)) < weights
    if kind != "LT":
        raise ConfigError(f"diffusion model must be IC or LT, got {kind!r}")
    order = np.lexsort((np.arange(e), edge_index[1]))
    w = weights[order]
    dst = edge_index[1, order]
    cum = np.cumsum(w)
    start = np.r_[0.0, cum][np.searchsorted(dst, dst)]  # cumulative weight before each target's block
    upper, lower = cum - start, cum - start - w  # the edge's slice of [0, sum_u w_uv] at its target
    r = gen.random((worlds, num_nodes))
    live = np.zeros((worlds, e), dtype=bool)
    pick = r[:, dst]
    live[:, order] = (pick > lower) & (pick <= upper)
    return live


def _world_gains(live: np.ndarray, src: np.ndarray, dst: np.ndarray, seeds: np.ndarray,
                 num_nodes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One world: (used edges, their gains, reached count). ``used``: live edges whose source is reached."""
    import networkx as nx

    reached = np.zeros(num_nodes, dtype=bool)
    reached[seeds] = True
    frontier = reached.copy()
    edges = np.flatnonzero(live)
    while frontier.any():
        hit = edges[frontier[src[edges]]]
        new = np.zeros(num_nodes, dtype=bool)
        new[dst[hit]] = True
        frontier = new & ~reached
        reached |= new
    used = edges[reached[src[edges]]]
    if used.size == 0:
        return used, np.zeros(0), int(reached.sum())
    root, n = -1, num_nodes
    g = nx.DiGraph()
    g.add_edges_from((root, int(s)) for s in seeds)
    g.add_edges_from((int(src[e]), n + int(e)) for e in used)
    g.add_edges_from((n + int(e), int(dst[e])) for e in used)
    idom = nx.immediate_dominators(g, root)
    size = {node: 1 if 0 <= node < n else 0 for node in g}  # the root may be absent from idom
    for node in reversed(list(nx.dfs_preorder_nodes(g, root))):
        if node != root:
            size[idom[node]] += size[node]
    return used, np.array([size[n + int(e)] for e in used], dtype=np.float64), int(reached.sum())


@dataclass
class GreedyResult:
    """``picked`` edge indices in order; ``score`` (E,) higher = cut first (the ``k``-th pick
    ``2 + (b - k) / b``, the rest their final sample-average gain scaled into [0, 1)); the
    sample-average spread before and after the cuts."""

    picked: np.ndarray
    score: np.ndarray
    spread_before: float
    spread_after: float
    seconds: float


def greedy_mc(kind: str, edge_index: np.ndarray, weights: np.ndarray, seeds: np.ndarray, num_nodes: int, b: int,
              worlds: int = 200, candidates: np.ndarray | None = None, seed: int = 0,
              per_step: int = 1) -> GreedyResult:
    """``b`` greedy cuts over ``worlds`` live-edge worlds (``candidates``: bool (E,), default every
    edge): each step cuts the ``per_step`` candidates with the largest sample-average loss (1 = plain
    greedy; more = fewer recomputations, the gains of a step's later cuts taken before its earlier
    ones are made)."""
    began = time.perf_counter()
    src, dst = edge_index
    e = src.size
    live = live_worlds(kind, edge_index, np.asarray(weights, dtype=np.float64), num_nodes, worlds,
                       np.random.default_rng(seed))
    seeds = np.asarray(seeds, dtype=np.int64)
    allowed = np.ones(e, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool).copy()
    total = np.zeros(e)
    used: list[np.ndarray] = []
    gains: list[np.ndarray] = []
    reach = np.zeros(worlds)
    for w in range(worlds):
        u, g, reach[w] = _world_gains(live[w], src, dst, seeds, num_nodes)
        used.append(u)
        gains.append(g)
        np.add.at(total, u, g)
    before = float(reach.mean())
    picked: list[int] = []
    budget = min(b, int(allowed.sum()))
    while len(picked) < budget:
        masked = np.where(allowed, total, -np.inf)
        step = np.lexsort((np.arange(e), -masked))[:max(1, min(per_step, budget - len(picked)))]
        picked.extend(int(edge) for edge in step)
        allowed[step] = False
        for w in range(worlds):
            if not live[w, step].any() or not np.isin(step, used[w]).any():
                continue
            np.add.at(total, used[w], -gains[w])
            live[w, step] = False
            used[w], gains[w], reach[w] = _world_gains(live[w], src, dst, seeds, num_nodes)
            np.add.at(total, used[w], gains[w])
    return GreedyResult(np.array(picked, dtype=np.int64), _ranked_scores(total, picked, b), before,
                        float(reach.mean()), time.perf_counter() - began)


def greedy_fixed_threshold(edge_index: np.ndarray, weights: np.ndarray, seeds: np.ndarray, num_nodes: int, b: int,
                           threshold: float, candidates: np.ndarray | None = None, per_step: int = 1) -> GreedyResult:
    """Greedy cuts for LT with one fixed ``threshold`` for every node (DeepIM's ndlib labels). That
    process is not a live-edge process, but it is deterministic: the spread is one simulation, so
    each step re-simulates the graph without each remaining candidate (exact marginal losses, no
    worlds) and cuts the ``per_step`` largest. Only an edge out of an active node can change the
    cascade, so the others are skipped. Same result type and scores as :func:`greedy_mc`."""
    from cleanse.graphs.cascades import simulate

    began = time.perf_counter()
    e = edge_index.shape[1]
    w = np.asarray(weights, dtype=np.float64).copy()
    row = np.zeros((1, num_nodes), dtype=bool)
    row[0, np.asarray(seeds, dtype=np.int64)] = True

    def active(weights_now: np.ndarray) -> np.ndarray:
        return simulate("LT", edge_index, weights_now, row, n_runs=1, num_nodes=num_nodes, threshold=threshold)[0] > 0

    allowed = np.ones(e, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool).copy()
    now = active(w)
    before = float(now.sum())
    loss = np.zeros(e)
    picked: list[int] = []
    budget = min(b, int(allowed.sum()))
    while len(picked) < budget:
        loss[:] = 0.0
        for candidate in np.flatnonzero(allowed & now[edge_index[0]] & (w > 0)):
            trial = w.copy()
            trial[candidate] = 0.0
            loss[candidate] = now.sum() - active(trial).sum()
        masked = np.where(allowed, loss, -np.inf)
        step = np.lexsort((np.arange(e), -masked))[:max(1, min(per_step, budget - len(picked)))]
        picked.extend(int(edge) for edge in step)
        allowed[step] = False
        w[step] = 0.0
        now = active(w)
    return GreedyResult(np.array(picked, dtype=np.int64), _ranked_scores(loss, picked, b), before, float(now.sum()),
                        time.perf_counter() - began)


def _ranked_scores(loss: np.ndarray, picked: list[int], b: int) -> np.ndarray:
    """Edge scores (E,), higher = cut first: the ``picked`` edges in pick order above 2, every other
    edge its last marginal ``loss`` scaled into [0, 0.99]."""
    score = np.clip(loss, 0, None) / max(float(loss.max()), 1e-12) * 0.99
    for k, edge in enumerate(picked):
        score[edge] = 2.0 + (b - k) / b
    return score

"""Monte Carlo Independent Cascade and Linear Threshold, batched over runs and seed sets.

Orientation: ``edge_index`` (2, E) int64, row 0 the source ``u`` and row 1 the target ``v`` of
an influence edge ``u -> v`` (pass both directions for an undirected graph); ``weights`` float
(E,) is the IC activation probability ``p_uv`` or the LT influence ``w_uv`` (with
``sum_u w_uv <= 1`` for every ``v``). Seed sets are bool ``(B, N)``; the simulators return the
per-node activation probability float64 ``(B, N)`` (seeds count as active, probability 1).

- IC (Kempe, Kleinberg & Tardos, KDD 2003): each newly active ``u`` gets one chance to activate
  each inactive out-neighbour ``v``, succeeding with probability ``p_uv``.
- LT (same paper): node thresholds ``theta_v ~ U(0, 1]`` drawn once per run (or one fixed
  ``threshold`` for every node, which is what DeepIM's ndlib ground truth uses: ``0.5`` with
  ``w_uv = 1/deg(v)``, a deterministic process); ``v`` activates once the summed influence of its
  active in-neighbours reaches ``theta_v``.

The batched simulators only touch the out-edges of each run's frontier, so the work is the
number of edge trials, not runs x E per round. The exact references enumerate live-edge worlds
(IC: every edge live independently; LT: each node keeps at most one in-edge, ``u -> v`` with
probability ``w_uv``; Kempe et al., Claim 2.6) and serve as ground truth on tiny graphs.
``reference_probabilities`` runs cynetdiff (the ``graph`` extra) on the same graph.
"""

from __future__ import annotations

import array
import importlib
import itertools
import time
from typing import Any

import numpy as np

from cleanse.errors import ConfigError, DataError

_LT_EPS = 1e-9  # summed float weights (k * 1/deg) must count as reaching an equal threshold


def weighted_cascade(edge_index: np.ndarray, num_nodes: int) -> np.ndarray:
    """``1 / in_degree(v)`` for every edge ``u -> v``: float64 (E,). The usual IC probability and
    the usual LT influence (in-weights of every node then sum to exactly 1)."""
    indeg = np.bincount(edge_index[1], minlength=num_nodes).astype(np.float64)
    return 1.0 / indeg[edge_index[1]]


def _check(edge_index: np.ndarray, weights: np.ndarray, seeds: np.ndarray,
           num_nodes: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    ei = np.asarray(edge_index, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    s = np.atleast_2d(np.asarray(seeds, dtype=bool))
    n = int(num_nodes if num_nodes is not None else s.shape[1])
    if ei.ndim != 2 or ei.shape[0] != 2 or w.shape != (ei.shape[1],):
        raise DataError(f"edge_index (2, E) and weights (E,) disagree: {ei.shape}, {w.shape}")
    if s.shape[1] != n or (ei.size and (ei.min() < 0 or ei.max() >= n)):
        raise DataError(f"seeds have {s.shape[1]} columns, edges ids must lie in [0, {n})")
    if w.size and (w.min() < 0 or w.max() > 1):
        raise DataError("edge weights must lie in [0, 1]")
    return ei, w, s, n


def _csr(ei: np.ndarray, w: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(ei[0], kind="stable")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(ei[0], minlength=n), out=indptr[1:])
    return indptr, ei[1, order], w[order]


def _frontier_edges(rows: np.ndarray, nodes: np.ndarray,
                    indptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For active (row, node) pairs: (row, edge position) of every out-edge of each node."""
    counts = indptr[nodes + 1] - indptr[nodes]
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    r = np.repeat(rows, counts)
    starts = np.repeat(indptr[nodes] - np.cumsum(counts) + counts, counts)
    return r, starts + np.arange(total)


def _distinct(codes: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """The distinct values of ``codes``, each once, in O(len) with ``slot`` (scratch, length >
    max code): whichever write to ``slot[c]`` lands, it names exactly one position holding ``c``."""
    order = np.arange(codes.size)
    slot[codes] = order
    return codes[slot[codes] == order]


def _simulate(kind: str, ei: np.ndarray, w: np.ndarray, seeds: np.ndarray, n: int, n_runs: int,
              gen: np.random.Generator, threshold: float | None, chunk_rows: int) -> np.ndarray:
    indptr, dst, wt = _csr(ei, w, n)
    b = seeds.shape[0]
    counts = np.zeros((b, n), dtype=np.int64)
    total_rows = b * n_runs
    for start in range(0, total_rows, chunk_rows):
        stop = min(start + chunk_rows, total_rows)
        owner = np.arange(start, stop) // n_runs  # seed set of each simulated run
        rows = stop - start
        active = seeds[owner].reshape(-1).copy()  # flat (rows * N): entry r * N + v
        codes = np.flatnonzero(active)  # the frontier, as flat codes: only it is touched per round
        if kind == "LT":
            theta = (np.full(rows * n, threshold) if threshold is not None
                     else 1.0 - gen.random(rows * n))  # U(0, 1]: a zero threshold would self-activate
            bucket = np.zeros(rows * n)
        slot = np.empty(rows * n, dtype=np.int64)  # scratch for de-duplicating codes without a sort
        while codes.size:
            r, e = _frontier_edges(codes // n, codes % n, indptr)
            if r.size == 0:
                break
            target = r * n + dst[e]
            if kind == "IC":
                codes = _distinct(target[(~active[target]) & (gen.random(r.size) < wt[e])], slot)
            else:
                np.add.at(bucket, target, wt[e])
                touched = _distinct(target, slot)
                codes = touched[(~active[touched]) & (bucket[touched] + _LT_EPS >= theta[touched])]
            active[codes] = True
        first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # runs of one seed set are adjacent
        counts[owner[first]] += np.add.reduceat(active.reshape(rows, n).astype(np.int64), first, axis=0)
    return counts / n_runs


def simulate(kind: str, edge_index: np.ndarray, weights: np.ndarray, seeds: np.ndarray,
             n_runs: int = 1000, seed: int = 0, num_nodes: int | None = None,
             threshold: float | None = None, chunk_rows: int = 2048) -> np.ndarray:
    """Per-node activation probability (B, N) under ``kind`` in {"IC", "LT"}, averaged over
    ``n_runs`` Monte Carlo runs per seed set; standard error <= 0.5 / sqrt(n_runs) per entry.
    ``threshold``: LT only, a fixed threshold for every node instead of U(0, 1]."""
    kind = kind.upper()
    if kind not in ("IC", "LT"):
        raise ConfigError(f"diffusion model must be IC or LT, got {kind!r}")
    if n_runs < 1:
        raise ConfigError(f"n_runs must be >= 1, got {n_runs}")
    if threshold is not None and kind != "LT":
        raise ConfigError("threshold applies to LT only")
    ei, w, s, n = _check(edge_index, weights, seeds, num_nodes)
    if kind == "LT":
        insum = np.bincount(ei[1], weights=w, minlength=n)
        if insum.max(initial=0.0) > 1.0 + 1e-6:
            raise DataError(f"LT in-weights of node {int(insum.argmax())} sum to {insum.max():.4f} > 1")
    return _simulate(kind, ei, w, s, n, n_runs, np.random.default_rng(seed), threshold,
                     max(1, chunk_rows))


def _reach(live: np.ndarray, src: np.ndarray, dst: np.ndarray, seeds: np.ndarray, n: int) -> np.ndarray:
    """Reachability from ``seeds`` (N,) in each world; ``live`` (W, E) bool -> (W, N) bool."""
    reach = np.broadcast_to(seeds, (live.shape[0], n)).copy()
    for _ in range(n):
        fire = live & reach[:, src]
        new = reach.copy()
        for e in range(src.size):  # E is tiny here: enumeration is the ground truth, not the tool
            new[:, dst[e]] |= fire[:, e]
        if np.array_equal(new, reach):
            break
        reach = new
    return reach


def exact_ic(edge_index: np.ndarray, probs: np.ndarray, seeds: np.ndarray, num_nodes: int) -> np.ndarray:
    """Exact IC activation probabilities (N,) for one seed set (N,), by summing over all 2^E
    live-edge worlds (E <= 20)."""
    ei, p, s, n = _check(edge_index, probs, seeds, num_nodes)
    e = ei.shape[1]
    if e > 20:
        raise ConfigError(f"exact IC enumerates 2^E worlds; E={e} is too many")
    live = ((np.arange(2 ** e)[:, None] >> np.arange(e)) & 1).astype(bool)
    weight = np.prod(np.where(live, p, 1.0 - p), axis=1)
    return weight @ _reach(live, ei[0], ei[1], s[0], n)


def exact_lt(edge_index: np.ndarray, weights: np.ndarray, seeds: np.ndarray, num_nodes: int) -> np.ndarray:
    """Exact LT activation probabilities (N,) for one seed set (N,) (thresholds U(0, 1]), by the
    live-edge equivalence: each node keeps in-edge ``u -> v`` with probability ``w_uv`` and none
    with ``1 - sum_u w_uv``; enumerates all prod_v (indeg(v) + 1) worlds (<= 2^20)."""
    ei, w, s, n = _check(edge_index, weights, seeds, num_nodes)
    choices = [[-1, *np.flatnonzero(ei[1] == v).tolist()] for v in range(n)]
    n_worlds = int(np.prod([len(c) for c in choices]))
    if n_worlds > 2 ** 20:
        raise ConfigError(f"exact LT would enumerate {n_worlds} worlds")
    live = np.zeros((n_worlds, ei.shape[1]), dtype=bool)
    weight = np.ones(n_worlds)
    for k, pick in enumerate(itertools.product(*choices)):
        for v, e in enumerate(pick):
            if e >= 0:
                live[k, e] = True
                weight[k] *= w[e]
            else:
                weight[k] *= 1.0 - w[ei[1] == v].sum()
    return weight @ _reach(live, ei[0], ei[1], s[0], n)


def _cynetdiff() -> Any:
    try:
        return importlib.import_module("cynetdiff.models")
    except ImportError:
        raise ConfigError("the reference simulator needs cynetdiff: pip install 'cleanse[graph]'") from None


def reference_probabilities(kind: str, edge_index: np.ndarray, weights: np.ndarray, seeds: np.ndarray,
                            n_runs: int = 1000, seed: int = 0,
                            num_nodes: int | None = None) -> tuple[np.ndarray, float]:
    """cynetdiff's IC / LT (thresholds U(0, 1]) on the same graph: per-node activation probability
    (B, N) and the throughput in cascades per second (the simulation loop only)."""
    models = _cynetdiff()
    kind = kind.upper()
    ei, w, s, n = _check(edge_index, weights, seeds, num_nodes)
    indptr, dst, wt = _csr(ei, w, n)
    starts = array.array("I", indptr[:-1].astype(np.uint32).tolist())
    edges = array.array("I", dst.astype(np.uint32).tolist())
    wts = array.array("f", wt.astype(np.float32).tolist())
    if kind == "IC":
        model = models.IndependentCascadeModel(starts, edges, activation_probs=wts, rng=seed)
    elif kind == "LT":
        model = models.LinearThresholdModel(starts, edges, influence=wts, rng=seed)
    else:
        raise ConfigError(f"diffusion model must be IC or LT, got {kind!r}")
    out = np.zeros((s.shape[0], n))
    began = time.perf_counter()
    for b in range(s.shape[0]):
        model.set_seeds(np.flatnonzero(s[b]).tolist())
        for _ in range(n_runs):
            model.reset_model()
            model.advance_until_completion()
            out[b, list(model.get_activated_nodes())] += 1.0
    elapsed = time.perf_counter() - began
    return out / n_runs, s.shape[0] * n_runs / max(elapsed, 1e-12)


def throughput(kind: str, edge_index: np.ndarray, weights: np.ndarray, seeds: np.ndarray,
               n_runs: int = 1000, seed: int = 0, num_nodes: int | None = None) -> float:
    """Cascades per second of :func:`simulate` on this graph and these seed sets."""
    began = time.perf_counter()
    simulate(kind, edge_index, weights, seeds, n_runs=n_runs, seed=seed, num_nodes=num_nodes)
    return np.atleast_2d(seeds).shape[0] * n_runs / max(time.perf_counter() - began, 1e-12)

"""The MONSTOR-style surrogate's pass (:mod:`cleanse.graphs.monstor_pass`) compiled by numba: the same
forward pass and hand-derived reverse pass, one compiled call instead of about a hundred numpy calls.

Why: on power_grid's neighbourhood (634 nodes, 1,830 edges, at most 473 MLP rows per layer) the numpy
pass is per-call overhead (1-3 us per call, about 100 calls), which decided whether DiffIM's one-shot
selection (Lee et al., AAAI 2025, arXiv 2502.01031) runs at >= 1,000x greedy Monte Carlo's speed there.
Here the edge loops, scatters and elementwise work are plain loops and the MLP's matrix products are
BLAS (``np.dot`` on float32, as numpy runs them), so the arithmetic and its precision are the numpy
pass's: the noisy-or, logits and sigmoid in float64, the MLP in float32 (only summation order differs).

Compiled once per machine and cached next to this file (``cache=True``); :func:`warm` compiles or loads
the cached code for the argument types :class:`~cleanse.graphs.monstor_pass.MonstorPass` passes, so the
one-off cost is paid where a monstor surrogate is built, not inside a timed selection. The neighbourhood
search of :meth:`~cleanse.graphs.surrogate.SpreadSurrogate.neighbourhood` is compiled here too.

Shapes (one neighbourhood, ``n`` nodes, ``m`` edges, ``L`` layers, hidden width ``h``): ``src``/``dst``
(m,) int64 local ids, ``p`` (m,) float64 base weights, ``seeds`` (n,) float64 0/1, ``flowing`` (L,)
int64 (layer ``k`` runs on edges ``[:flowing[k]]``), ``x`` (m,) float64 keep-weights; the MLP as in
``monstor_pass._Mlp``: ``first`` (7, h) float32 with the bias as its last row, ``second`` (h, h),
``second_bias`` (h,), ``last`` (h,), ``last_bias`` float, ``first_back`` (h, 6), ``second_back`` (h, h).
Returns the spread ``sum_v pi_v`` and, if asked, ``d spread / d x`` (m,) float64 (else an empty array).
"""

from __future__ import annotations

import math
import time

import numpy as np
from numba import njit

from cleanse.graphs.surrogate import NOISY_OR_EPS

_KEEP = 1.0 - NOISY_OR_EPS


@njit(cache=True)
def _sigmoid(z: float) -> float:
    """``1 / (1 + exp(-z))`` without overflow, both tails keeping their digits (as scipy's expit)."""
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@njit(cache=True)
def _relu_rows(a, bias):
    """``a += bias`` (rows, h), then ReLU, in place."""
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            v = a[i, j] + bias[j]
            a[i, j] = v if v > 0 else np.float32(0.0)


@njit(cache=True)
def monstor_pass(src, dst, p, seeds, flowing, x, first, second, second_bias, last, last_bias,
                 first_back, second_back, gradient):
    n, m, layers, h = seeds.size, x.size, flowing.size, second.shape[0]
    w = p * x
    w_in, w_out = np.zeros(n), np.zeros(n)
    for e in range(m):
        w_in[dst[e]] += w[e]
        w_out[src[e]] += w[e]
    no_bias = np.zeros(h, dtype=np.float32)
    # the tape of each layer: pi before it, its log-stay per node, the rows the MLP ran on, their
    # ReLU outputs (relu(a) > 0 exactly where a > 0, so the masks need nothing else), z and q (kept, not
    # recomputed: at 1M edges the scalar transcendental calls are what the kernel loses to numpy's SIMD ones)
    pi_before, log_stays = np.empty((layers, n)), np.empty((layers, n))
    tape_rows = []
    tape_relu1 = []
    tape_relu2 = []
    tape_z = []
    tape_q = []
    pi = seeds.copy()
    for k in range(layers):
        c = flowing[k]
        pi_before[k] = pi
        log_stay, inflow = np.zeros(n), np.zeros(n)
        for e in range(c):
            flow = w[e] * pi[src[e]]
            log_stay[dst[e]] += math.log1p(-_KEEP * flow)
            inflow[dst[e]] += flow
        log_stays[k] = log_stay
        count = 0
        for v in range(n):
            if seeds[v] == 0 and inflow[v] > 0:  # the nodes whose MLP output is used
                count += 1
        rows = np.empty(count, dtype=np.int64)
        q_rows = np.empty(count)
        feats = np.empty((count, 7), dtype=np.float32)  # [pi, s, q, inflow, in-degree, out-degree, 1]
        i = 0
        for v in range(n):
            if seeds[v] == 0 and inflow[v] > 0:
                rows[i] = v
                q_rows[i] = -math.expm1(log_stay[v])
                feats[i, 0], feats[i, 1], feats[i, 2] = pi[v], seeds[v], q_rows[i]
                feats[i, 3], feats[i, 4], feats[i, 5], feats[i, 6] = inflow[v], math.log1p(w_in[v]), math.log1p(w_out[v]), 1.0
                i += 1
        relu1 = np.dot(feats, first)
        _relu_rows(relu1, no_bias)
        relu2 = np.dot(relu1, second)
        _relu_rows(relu2, second_bias)
        z = np.empty(count)
        next_pi = seeds.copy()
        for i in range(count):
            v = rows[i]
            correction = np.float32(0.0)
            for j in range(h):
                correction += relu2[i, j] * last[j]
            z[i] = math.log(max(q_rows[i], NOISY_OR_EPS)) - log_stay[v] + correction + last_bias
            next_pi[v] = _sigmoid(z[i])
        pi = next_pi
        tape_rows.append(rows)
        tape_relu1.append(relu1)
        tape_relu2.append(relu2)
        tape_z.append(z)
        tape_q.append(q_rows)
    spread = pi.sum()
    if not gradient:
        return spread, np.empty(0)
    # reverse mode: g_pi (n,) is d spread / d pi after each layer; g_w (m,) collects d spread / d w from
    # every layer's flows and, after the layers, from the degree features (summed per node first)
    g_pi, g_w = np.ones(n), np.zeros(m)
    g_in_degree, g_out_degree = np.zeros(n), np.zeros(n)
    for k in range(layers - 1, -1, -1):
        rows, relu1, relu2, z, q_rows = tape_rows[k], tape_relu1[k], tape_relu2[k], tape_z[k], tape_q[k]
        log_stay, pi, c, count = log_stays[k], pi_before[k], flowing[k], rows.size
        g_z = np.empty(count)
        g_hidden2 = np.empty((count, h), dtype=np.float32)
        for i in range(count):
            # sigmoid'(z) as sigmoid(z) sigmoid(-z): both factors keep their digits when the node saturates
            e = math.exp(-abs(z[i]))
            g_z[i] = g_pi[rows[i]] * (e / (1.0 + e)) / (1.0 + e)  # sigmoid(z) sigmoid(-z), one exp
            g32 = np.float32(g_z[i])
            for j in range(h):
                g_hidden2[i, j] = last[j] * g32 if relu2[i, j] > 0 else np.float32(0.0)
        g_hidden1 = np.dot(g_hidden2, second_back)
        for i in range(count):
            for j in range(h):
                if relu1[i, j] <= 0:
                    g_hidden1[i, j] = 0.0
        g_feats = np.dot(g_hidden1, first_back)  # (rows, 6); the MLP's other rows have no gradient
        g_log_stay, g_inflow = np.zeros(n), np.zeros(n)
        for i in range(count):
            v = rows[i]
            q = q_rows[i]
            g_q = g_feats[i, 2] + (g_z[i] / max(q, NOISY_OR_EPS) if q >= NOISY_OR_EPS else 0.0)
            g_log_stay[v] = _KEEP * (-g_z[i] - g_q * math.exp(log_stay[v]))  # q = -expm1(log_stay)
            g_inflow[v] = g_feats[i, 3]
            g_in_degree[v] += g_feats[i, 4]
            g_out_degree[v] += g_feats[i, 5]
        next_g_pi = np.zeros(n)
        for e in range(c):
            d, pi_src = dst[e], pi[src[e]]
            g_flow = g_inflow[d] - g_log_stay[d] / (1.0 - _KEEP * w[e] * pi_src)
            g_w[e] += g_flow * pi_src
            next_g_pi[src[e]] += g_flow * w[e]
        for i in range(count):
            next_g_pi[rows[i]] += g_feats[i, 0]
        g_pi = next_g_pi  # the first layer's pi is the seed row, a constant: its g_pi is not used
    for e in range(m):
        g_w[e] = p[e] * (g_w[e] + g_in_degree[dst[e]] / (1.0 + w_in[dst[e]]) + g_out_degree[src[e]] / (1.0 + w_out[src[e]]))
    return spread, g_w


def warm() -> float:
    """Compile (first process on a machine) or load from the cache the pass and the search for the argument
    types :class:`~cleanse.graphs.monstor_pass.MonstorPass` and the surrogate use, on a 2-node graph; returns
    the seconds it took."""
    began = time.perf_counter()
    one, h = np.ones(1), 2
    weights = np.ones((h, h), dtype=np.float32)
    monstor_pass(np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64), one, np.array([1.0, 0.0]),
                 np.ones(1, dtype=np.int64), one, np.ones((7, h), dtype=np.float32), weights, np.zeros(h, dtype=np.float32),
                 np.ones(h, dtype=np.float32), 0.0, np.ones((h, 6), dtype=np.float32), weights, True)
    ends, start = np.zeros(1, dtype=np.int64), np.array([0, 1, 1], dtype=np.int64)
    neighbourhood(ends, start, ends, start, ends, np.ones(1, dtype=np.int64), ends, 2, 2)
    return time.perf_counter() - began


@njit(cache=True)
def _sort_in_place(a):
    """Sort ``a`` unless it is ascending already (edges stored by source are: one pass instead of a sort)."""
    for i in range(1, a.size):
        if a[i] < a[i - 1]:
            a.sort()
            return


@njit(cache=True)
def neighbourhood(out_order, out_start, in_order, in_start, src, dst, seeds, layers, n):
    """:meth:`SpreadSurrogate.neighbourhood`'s search compiled: the same edges in the same order (per hop the
    out-edges of the nodes first reached at the hop before, ascending edge ids; then, ascending, the last
    frontier's out-edges and the edges into a reached node from outside). ``out_order``/``out_start`` and
    ``in_order``/``in_start``: the model's edges grouped by source and by target (CSR without values),
    ``seeds`` (k,) global ids. Returns ``edges`` (m,), ``flowing`` (layers,) cumulative counts, ``nodes``
    (the neighbourhood's ascending global ids, all ``n`` when every edge is in it) and ``src``/``dst`` (m,)
    local ids."""
    reached = np.zeros(n, dtype=np.bool_)
    for s in seeds:
        reached[s] = True
    frontier = np.flatnonzero(reached)
    edges = np.empty(src.size, dtype=np.int64)
    flowing = np.empty(layers, dtype=np.int64)
    count = 0
    for k in range(layers):
        start = count
        for u in frontier:
            for j in range(out_start[u], out_start[u + 1]):
                edges[count] = out_order[j]
                count += 1
        _sort_in_place(edges[start:count])
        flowing[k] = count
        fresh = np.empty(count - start, dtype=np.int64)
        found = 0
        for e in edges[start:count]:
            if not reached[dst[e]]:
                reached[dst[e]] = True
                fresh[found] = dst[e]
                found += 1
        frontier = np.sort(fresh[:found])
    start = count
    for u in frontier:
        for j in range(out_start[u], out_start[u + 1]):
            edges[count] = out_order[j]
            count += 1
    for v in range(n):
        if reached[v]:
            for j in range(in_start[v], in_start[v + 1]):
                if not reached[src[in_order[j]]]:
                    edges[count] = in_order[j]
                    count += 1
    _sort_in_place(edges[start:count])
    edges = edges[:count].copy()
    if count == src.size:  # every edge has an end within reach: local ids are global
        return edges, flowing, np.arange(n), src[edges], dst[edges]
    for e in edges:
        reached[src[e]] = True
        reached[dst[e]] = True
    nodes = np.flatnonzero(reached)
    local = np.zeros(n, dtype=np.int64)
    for i in range(nodes.size):
        local[nodes[i]] = i
    src_local, dst_local = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
    for i in range(count):
        src_local[i], dst_local[i] = local[src[edges[i]]], local[dst[edges[i]]]
    return edges, flowing, nodes, src_local, dst_local

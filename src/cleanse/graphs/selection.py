"""Edge selection for influence minimisation: which ``b`` edges to cut so that the expected spread
from the seed set ``S`` falls most (DiffIM, Lee et al., AAAI 2025, arXiv 2502.01031; spec part B §4).

Every method returns a score per edge, float64 (E,), **higher = cut first**: removing the top-``b``
edges is the method's choice (ties broken by edge index, as the pipeline's detect stage does).

- :func:`oneshot_scores`: ``d spread_hat / d x_e`` of the surrogate at ``x = 1 - delta`` (one
  forward and one backward pass; DiffIM's gradient-driven selection);
- :func:`relax_scores`: ``x = sigmoid(a)`` optimised by Adam on ``spread_hat(x) + lambda *
  relu(sum(1 - x) - b)`` from a one-shot warm start, stopped once the best rounded cut stops improving; score
  ``1 - x`` (the ``b`` smallest ``x`` are cut; DiffIM's relaxation);
- :func:`surrogate_greedy_scores`: greedy on the surrogate over a candidate set (the top edges by
  the one-shot gradient), one batched forward per step;
- heuristics: :func:`degree_scores` (target's out-degree), :func:`betweenness_scores` (edge
  betweenness), :func:`pagerank_scores` (PageRank flow ``PR(u) p_uv / outdeg``-free: ``PR(u) p_uv``),
  :func:`eigen_scores` (NetMelt's first-order drop of the leading eigenvalue, Tong et al., CIKM
  2012: ``left_u * right_v`` of the weighted adjacency);
- :func:`verify_spread`: the spread after the removal by fresh batched Monte Carlo, with a
  standard error from independent batches (never the surrogate).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit

from cleanse.errors import ConfigError
from cleanse.graphs.cascades import simulate
from cleanse.graphs.monstor_pass import MonstorPass
from cleanse.graphs.surrogate import Neighbourhood, SpreadSurrogate


def top_edges(score: np.ndarray, b: int) -> np.ndarray:
    """Indices of the ``b`` highest scores, ties by index (the pipeline's detect order); a partition
    first, so that only the ``b`` chosen are sorted (the selection's timed cost stays O(E))."""
    s = np.asarray(score, dtype=np.float64)
    b = max(0, min(int(b), s.size))
    if b == 0 or not np.isfinite(s.sum()):  # one pass: a NaN or an infinity makes the sum non-finite
        return np.lexsort((np.arange(s.size), -s))[:b]
    positive = np.flatnonzero(s > 0)
    if b <= positive.size < s.size:  # then the top b are all positive (one-shot's scores are mostly exact
        return positive.take(top_edges(s.take(positive), b))  # zeros, outside the neighbourhood): rank those
    # the b-th largest score; partitioning -s at b - 1: at s.size - b numpy's introselect took 10x longer on
    # one-shot scores, which are mostly exact zeros (the edges outside the seeds' neighbourhood)
    kth = -np.partition(-s, b - 1)[b - 1]
    above = np.flatnonzero(s > kth)
    chosen = np.concatenate([above, np.flatnonzero(s == kth)[:b - above.size]])
    return chosen[np.lexsort((chosen, -s[chosen]))]


class AutogradPass:
    """The surrogate's spread and ``d spread / d x`` on a neighbourhood by torch autograd (float32): the
    path for ``kind="axel"`` and the reference :class:`MonstorPass` is tested against. Same interface:
    ``x`` (m,) keep-weights of the neighbourhood's edges."""

    def __init__(self, model: SpreadSurrogate, hood: Neighbourhood) -> None:
        self.model, self.hood = model, hood

    def spread(self, x: np.ndarray) -> float:
        with torch.no_grad():
            return float(self.model.local_spread(self.hood, torch.as_tensor(x, dtype=torch.float32)[None])[0])

    def spread_and_gradient(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        keep = torch.as_tensor(x, dtype=torch.float32)[None].requires_grad_()
        spread = self.model.local_spread(self.hood, keep)
        # the gradient of x alone: .backward() would also fill every parameter's .grad (~10% of the time)
        (grad,) = torch.autograd.grad(spread.sum(), keep)
        return float(spread.detach()[0]), grad[0].double().numpy()


def surrogate_pass(model: SpreadSurrogate, hood: Neighbourhood) -> MonstorPass | AutogradPass:
    """The fastest exact pass for ``model`` on ``hood``: the hand-written numpy one for the monstor kind
    (:mod:`cleanse.graphs.monstor_pass`), autograd otherwise."""
    return MonstorPass.of(model, hood) if model.config.kind == "monstor" else AutogradPass(model, hood)


def _spread_gradient(model: SpreadSurrogate, hood: Neighbourhood, keep: float) -> np.ndarray:
    """``d spread_hat / d x`` (m,) float64 at ``x = keep`` on the neighbourhood's edges."""
    return surrogate_pass(model, hood).spread_and_gradient(np.full(int(hood.edges.shape[0]), keep))[1]


def _whole(hood: Neighbourhood, local: np.ndarray, outside: float = 0.0) -> np.ndarray:
    """Per-edge values (E,) from the neighbourhood's (m,); ``outside`` for the other edges."""
    out = np.full(hood.num_edges, outside)
    out[hood.edges.numpy()] = local
    return out


def oneshot_scores(model: SpreadSurrogate, seeds: np.ndarray, delta: float = 0.0) -> np.ndarray:
    """``d spread_hat / d x_e`` at ``x = 1 - delta`` (E,): the spread lost per unit of weight cut. Run
    on the seeds' neighbourhood (:meth:`SpreadSurrogate.neighbourhood`); the edges outside it get their
    gradient on the whole graph, exactly 0."""
    hood = model.neighbourhood(seeds)
    return _whole(hood, _spread_gradient(model, hood, 1.0 - delta))


def relax_scores(model: SpreadSurrogate, seeds: np.ndarray, b: int, steps: int = 60, lr: float = 0.5,
                 penalty: float = 1.0, init: float = 0.99, warm: float = 4.0, patience: int = 3,
                 tolerance: float = 1e-3, min_gain: float = 0.01, stages: int = 4) -> np.ndarray:
    """Continuous relaxation, (E,) scores whose top ``b`` is the best rounded cut it visited: at most
    ``steps`` Adam steps on ``spread_hat(sigmoid(a)) + penalty * scale * relu(sum(1 - x) - b)`` (``scale``:
    the largest one-shot gradient ``g``, so that the budget term and the spread speak the same units).

    Warm start ``a_e = logit(init) - warm * max(g_e, 0) / scale`` (``warm = 0``: every edge at
    ``init``): the first rounding is then the one-shot choice and the steps only revise it.

    An edge whose spread gradient ``|d spread_hat / d x_e|`` is below ``tolerance * scale`` at a step has
    no effect there: its spread gradient is dropped (only the budget term moves it; Adam normalises each
    coordinate, so float noise would otherwise move it by about ``lr`` a step and reshuffle the rounding).

    Staged rounding (``stages`` >= 2; 0 or 1: off), before the steps: :func:`_staged_rounding` rounds in
    ``stages`` stages (``stages - 1`` further gradients, from the warm start's) and one forward pass scores
    its cut, which is the first kept cut.

    Stop: each step first evaluates the surrogate on its **rounded** cut (the ``b`` smallest ``x`` set to
    0, the rest to 1; a forward pass). The loop keeps the rounded cut of lowest ``spread_hat`` (the staged
    one included) and stops once that has not fallen by more than ``min_gain`` (nodes) for ``patience``
    steps (0: run all ``steps``), before that step's gradient (a forward and backward pass at ``x``), which
    it would not use; so the steps run on only while they beat the staged cut. Scores: ``1 - x`` of the
    kept step, plus 1 on its cut (so the top ``b`` is exactly it), plus ``1e-9 g / scale`` to break ties;
    for the staged cut 2 on it, 1 on the outside edges when it leaves budget to them, ``1e-9 g / scale``
    elsewhere.

    Runs on the seeds' neighbourhood; the edges outside it have no spread gradient and the same start,
    so they move as one: one shared coordinate counted ``E - m`` times in the budget, as on the whole graph."""
    hood = model.neighbourhood(seeds)
    surrogate = surrogate_pass(model, hood)
    m = int(hood.edges.shape[0])
    grad = surrogate.spread_and_gradient(np.ones(m))[1]
    outside = hood.num_edges - m
    scale = float(max(np.abs(grad).max(), 1e-6)) if m else 1e-6
    start = np.log(init / (1 - init))
    a = np.append(start - warm * np.clip(grad / scale, 0.0, None), start)
    count = np.ones(m + 1)
    count[m] = outside  # the shared coordinate of the edges outside
    adam = _Adam(a.size, lr)
    best, best_a, best_cut, since, staged = np.inf, a.copy(), np.zeros(m, dtype=bool), 0, False
    if stages >= 2:  # first, so that the steps run on only while they beat it
        best_cut = _staged_rounding(surrogate, grad, b, stages, tolerance * scale)
        best, staged = surrogate.spread((~best_cut).astype(np.float64)), True
    for _ in range(steps):
        x = expit(a)
        cut = _rounded(x, b, outside)
        value = surrogate.spread((~cut).astype(np.float64))
        since = 0 if value < best - min_gain else since + 1
        if value < best:
            best, best_a, best_cut, staged = value, a.copy(), cut, False
        if patience and since >= patience:
            break  # before the step's gradient: it would not be used
        g = np.append(surrogate.spread_and_gradient(x[:m])[1], 0.0)
        over = float(((1 - x) * count).sum()) > b  # relu's slope: the budget term's gradient is -penalty * scale
        adam.step(a, (g * (np.abs(g) >= tolerance * scale) - penalty * scale * over) * x * (1 - x))
    if staged:
        filler = 1.0 if int(best_cut.sum()) < b else 0.0  # the rest of the budget: edges without effect
        return _whole(hood, 2.0 * best_cut + 1e-9 * grad / scale, filler)
    kept = expit(best_a)
    local = 1.0 - kept[:m] + best_cut + 1e-9 * grad / scale
    return _whole(hood, local, 1.0 - kept[m])


def _staged_rounding(surrogate: MonstorPass | AutogradPass, grad: np.ndarray, b: int, stages: int,
                     tolerance: float) -> np.ndarray:
    """Iterative rounding, a bool (m,) cut from ``stages - 1`` further gradients: stage ``r`` ranks by the
    gradient of ``spread_hat`` at the partly rounded point (``x`` = 0 on the edges fixed so far, 1
    elsewhere; stage 1 by ``grad`` (m,), the one at ``x = 1``; the relaxation's warm start there ranks
    by it) and fixes at 0 the ``round(r b / stages)`` - (fixed so far) edges of largest gradient (above
    ``tolerance``; ties by index). An edge whose parallel paths were cut in an earlier stage regains
    its weight in the ranking, which the single rounding at ``x = 1`` cannot see."""
    cut = np.zeros(grad.size, dtype=bool)
    for stage in range(1, stages + 1):
        if stage > 1:
            grad = surrogate.spread_and_gradient((~cut).astype(np.float64))[1]
        open_ = np.flatnonzero(~cut & (grad > tolerance))
        take = min(open_.size, max(0, round(stage * b / stages) - int(cut.sum())))
        cut[open_[np.lexsort((open_, -grad[open_]))[:take]]] = True
    return cut


class _Adam:
    """torch.optim.Adam's update (defaults betas (0.9, 0.999), eps 1e-8, no weight decay) on a float64
    array in place: the relaxation's few hundred coordinates do not need torch's optimiser machinery."""

    def __init__(self, size: int, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.first, self.second = np.zeros(size), np.zeros(size)

    def step(self, param: np.ndarray, grad: np.ndarray) -> None:
        (b1, b2), self.t = self.betas, self.t + 1
        self.first += (1 - b1) * (grad - self.first)
        self.second = b2 * self.second + (1 - b2) * grad * grad
        denom = np.sqrt(self.second) / np.sqrt(1 - b2**self.t) + self.eps
        param -= self.lr / (1 - b1**self.t) * self.first / denom


def _rounded(x: np.ndarray, b: int, outside: int) -> np.ndarray:
    """Bool (m,): which of the neighbourhood's edges are among the ``b`` smallest keep-weights of the
    whole graph (``x`` (m + 1,): theirs, then the one value of the ``outside`` edges)."""
    m = x.size - 1
    pool = np.concatenate([x[:m], np.repeat(x[m:], min(outside, b))])
    k = min(b, pool.size)
    chosen = np.argpartition(pool, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
    cut = np.zeros(m, dtype=bool)
    cut[chosen[chosen < m]] = True
    return cut


@torch.no_grad()
def surrogate_greedy_scores(model: SpreadSurrogate, seeds: np.ndarray, b: int, candidates: int = 0,
                            per_step: int = 1, chunk: int = 32) -> np.ndarray:
    """Greedy on the surrogate: each step scores every remaining candidate's removal by ``spread_hat``
    and cuts the ``per_step`` lowest (1 = plain greedy), until ``b`` are cut; candidates = the top
    ``max(candidates, 2 b)`` edges by the one-shot gradient. Scores: the ``k``-th cut ``2 + (b - k) /
    b``; the rest their normalised gradient (< 1)."""
    hood = model.neighbourhood(seeds)
    with torch.enable_grad():
        local_grad = _spread_gradient(model, hood, 1.0)
    grad = _whole(hood, local_grad)
    e = grad.size
    where = np.full(e, -1, dtype=np.int64)  # an edge's column in the neighbourhood; -1: outside, no effect
    where[hood.edges.numpy()] = np.arange(local_grad.size)
    pool = list(top_edges(grad, min(e, max(candidates, 2 * b))))
    keep = torch.ones(1, local_grad.size)
    score: np.ndarray = grad / max(float(np.abs(grad).max()), 1e-12) * 0.5
    cut = 0
    while cut < min(b, len(pool)):
        values = []
        for start in range(0, len(pool), chunk):
            cols = torch.as_tensor(where[pool[start:start + chunk]])
            x = keep.repeat(cols.shape[0], 1)
            inside = cols >= 0  # a candidate outside the neighbourhood: its row is the graph as it is
            x[torch.arange(cols.shape[0])[inside], cols[inside]] = 0.0
            values.append(model.local_spread(hood, x))
        order = np.lexsort((np.asarray(pool), torch.cat(values).numpy()))
        for i in order[:max(1, min(per_step, b - cut))]:
            edge = pool[int(i)]
            if where[edge] >= 0:
                keep[0, where[edge]] = 0.0
            score[edge] = 2.0 + (b - cut) / b
            cut += 1
        pool = [e for e in pool if score[e] < 2.0]
    return score


def degree_scores(edge_index: np.ndarray, num_nodes: int) -> np.ndarray:
    """Out-degree of the edge's target (the edge feeds a hub), plus that of its source / (N + 1)."""
    out = np.bincount(edge_index[0], minlength=num_nodes).astype(np.float64)
    return out[edge_index[1]] + out[edge_index[0]] / (num_nodes + 1)


def betweenness_scores(edge_index: np.ndarray, num_nodes: int, samples: int = 200, seed: int = 0) -> np.ndarray:
    """Edge betweenness of the directed graph (networkx; ``samples`` source nodes when fewer than N)."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(range(num_nodes))
    g.add_edges_from(zip(edge_index[0].tolist(), edge_index[1].tolist()))
    k = None if samples >= num_nodes else samples
    between = nx.edge_betweenness_centrality(g, k=k, seed=seed)
    return np.array([between[(u, v)] for u, v in zip(edge_index[0].tolist(), edge_index[1].tolist())])


def pagerank_scores(edge_index: np.ndarray, weights: np.ndarray, num_nodes: int, alpha: float = 0.85,
                    iterations: int = 100) -> np.ndarray:
    """``PR(u) * p_uv``: the PageRank mass (power iteration, uniform teleport) the edge carries."""
    out = np.bincount(edge_index[0], minlength=num_nodes).astype(np.float64)
    pr = np.full(num_nodes, 1.0 / num_nodes)
    for _ in range(iterations):
        spread = np.bincount(edge_index[1], weights=pr[edge_index[0]] / out[edge_index[0]], minlength=num_nodes)
        dangling = pr[out == 0].sum()
        pr = (1 - alpha) / num_nodes + alpha * (spread + dangling / num_nodes)
    return pr[edge_index[0]] * weights


def eigen_scores(edge_index: np.ndarray, weights: np.ndarray, num_nodes: int, iterations: int = 200) -> np.ndarray:
    """NetMelt: the first-order drop of the leading eigenvalue of ``A`` (``A_uv = p_uv``) when edge
    ``u -> v`` goes, ``l_u r_v`` (left and right Perron vectors by power iteration on ``A + I``)."""
    u, v = edge_index
    left, right = np.ones(num_nodes), np.ones(num_nodes)
    for _ in range(iterations):
        right = right + np.bincount(u, weights=weights * right[v], minlength=num_nodes)  # (A + I) r
        left = left + np.bincount(v, weights=weights * left[u], minlength=num_nodes)  # (A + I)^T l
        right, left = right / np.linalg.norm(right), left / np.linalg.norm(left)
    return left[u] * right[v]


def verify_spread(kind: str, edge_index: np.ndarray, weights: np.ndarray, seeds: np.ndarray, num_nodes: int,
                  removed: np.ndarray, runs: int = 10_000, batches: int = 50, seed: int = 0,
                  threshold: float | None = None) -> tuple[float, float]:
    """The expected spread (mean number of active nodes, seeds included) with the ``removed`` edges
    gone, by ``runs`` fresh Monte Carlo cascades in ``batches`` independent batches; returns
    ``(spread, standard error)`` (the standard error from the batch means). ``threshold``: LT with
    that fixed threshold for every node (deterministic: one cascade is run, the standard error is 0)."""
    if runs < batches or batches < 2:
        raise ConfigError(f"verification needs runs >= batches >= 2, got runs={runs}, batches={batches}")
    w = np.asarray(weights, dtype=np.float64).copy()
    w[np.asarray(removed, dtype=np.int64)] = 0.0
    rows = np.zeros((batches, num_nodes), dtype=bool)
    rows[:, np.asarray(seeds, dtype=np.int64)] = True
    if threshold is not None:
        return float(simulate(kind, edge_index, w, rows[:1], n_runs=1, num_nodes=num_nodes, threshold=threshold).sum()), 0.0
    per_batch = simulate(kind, edge_index, w, rows, n_runs=runs // batches, seed=seed, num_nodes=num_nodes).sum(axis=1)
    return float(per_batch.mean()), float(per_batch.std(ddof=1) / np.sqrt(batches))

"""Edge selection for influence minimisation: which ``b`` edges to cut so that the expected spread
from the seed set ``S`` falls most (DiffIM, Lee et al., AAAI 2025, arXiv 2502.01031; spec part B §4).

Every method returns a score per edge, float64 (E,), **higher = cut first**: removing the top-``b``
edges is the method's choice (ties broken by edge index, as the pipeline's detect stage does).

- :func:`oneshot_scores`: ``d spread_hat / d x_e`` of the surrogate at ``x = 1 - delta`` (one
  forward and one backward pass; DiffIM's gradient-driven selection);
- :func:`relax_scores`: ``x = sigmoid(a)`` optimised by Adam on ``spread_hat(x) + lambda *
  relu(sum(1 - x) - b)`` from a one-shot warm start, stopped once the rounding is stable; score
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

from cleanse.errors import ConfigError
from cleanse.graphs.cascades import simulate
from cleanse.graphs.surrogate import SpreadSurrogate


def top_edges(score: np.ndarray, b: int) -> np.ndarray:
    """Indices of the ``b`` highest scores, ties by index (the pipeline's detect order); a partition
    first, so that only the ``b`` chosen are sorted (the selection's timed cost stays O(E))."""
    s = np.asarray(score, dtype=np.float64)
    b = max(0, min(int(b), s.size))
    if b == 0 or not np.isfinite(s).all():
        return np.lexsort((np.arange(s.size), -s))[:b]
    kth = np.partition(s, s.size - b)[s.size - b]  # the b-th largest score
    above = np.flatnonzero(s > kth)
    chosen = np.concatenate([above, np.flatnonzero(s == kth)[:b - above.size]])
    return chosen[np.lexsort((chosen, -s[chosen]))]


def _seed_row(seeds: np.ndarray, n: int) -> torch.Tensor:
    s = torch.zeros(1, n)
    s[0, torch.as_tensor(np.asarray(seeds, dtype=np.int64))] = 1.0
    return s


def oneshot_scores(model: SpreadSurrogate, seeds: np.ndarray, delta: float = 0.0) -> np.ndarray:
    """``d spread_hat / d x_e`` at ``x = 1 - delta`` (E,): the spread lost per unit of weight cut."""
    x = torch.full((1, int(model.p.shape[0])), 1.0 - delta, requires_grad=True)
    # the gradient of x alone: .backward() would also fill every parameter's .grad (~10% of the time)
    (grad,) = torch.autograd.grad(model.spread(_seed_row(seeds, model.num_nodes), x).sum(), x)
    return grad[0].double().numpy()


def relax_scores(model: SpreadSurrogate, seeds: np.ndarray, b: int, steps: int = 60, lr: float = 0.5,
                 penalty: float = 1.0, init: float = 0.99, warm: float = 4.0, patience: int = 3,
                 tolerance: float = 1e-3) -> np.ndarray:
    """Continuous relaxation: ``1 - x`` (E,) after at most ``steps`` Adam steps on ``spread_hat(sigmoid(a))
    + penalty * scale * relu(sum(1 - x) - b)`` (``scale``: the largest one-shot gradient ``g``, so that
    the budget term and the spread speak the same units).

    Warm start ``a_e = logit(init) - warm * max(g_e, 0) / scale`` (``warm = 0``: every edge at
    ``init``): the first rounding is then the one-shot choice and the steps only revise it, which is
    what makes a few steps enough.

    An edge whose spread gradient ``|d spread_hat / d x_e|`` is below ``tolerance * scale`` at a step has
    no effect there: its spread gradient is dropped (only the budget term moves it), and it does not
    count for the stop. Adam normalises each coordinate, so without this such edges moved by about
    ``lr`` on float noise, and when ``b`` exceeds the edges that matter (power_grid, whose seeds can
    be cut off completely) the rounding never settled. The loop stops once no edge with an effect
    has entered or left the rounded set (the ``b`` smallest ``x``) for ``patience`` consecutive steps
    (0: run all ``steps``). A ``1e-9 g / scale`` term breaks ties."""
    s = _seed_row(seeds, model.num_nodes)
    grad = oneshot_scores(model, seeds)
    scale = float(max(np.abs(grad).max(), 1e-6))
    start = np.log(init / (1 - init)) - warm * np.clip(grad / scale, 0.0, None)
    a = torch.tensor(start[None], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)
    rounded, stable = torch.zeros(a.shape[1], dtype=torch.bool), 0
    for _ in range(steps):
        x = torch.sigmoid(a.detach()).requires_grad_()
        (spread_grad,) = torch.autograd.grad(model.spread(s, x).sum(), x)
        effect = spread_grad[0].abs() >= tolerance * scale
        over = float((1 - x.detach()).sum()) > b  # relu's slope: the budget term's gradient in x is -penalty * scale
        a.grad = (spread_grad * effect - penalty * scale * over) * x.detach() * (1 - x.detach())  # chain rule to a
        opt.step()
        if patience:
            now = torch.zeros_like(effect)
            now[torch.topk(a.detach()[0], min(b, a.shape[1]), largest=False).indices] = True
            stable = 0 if bool(((now ^ rounded) & effect).any()) else stable + 1
            rounded = now
            if stable >= patience:
                break
    kept = torch.sigmoid(a.detach())[0].double().numpy()
    return (1.0 - kept) + 1e-9 * grad / scale


@torch.no_grad()
def surrogate_greedy_scores(model: SpreadSurrogate, seeds: np.ndarray, b: int, candidates: int = 0,
                            per_step: int = 1, chunk: int = 32) -> np.ndarray:
    """Greedy on the surrogate: each step scores every remaining candidate's removal by ``spread_hat``
    and cuts the ``per_step`` lowest (1 = plain greedy), until ``b`` are cut; candidates = the top
    ``max(candidates, 2 b)`` edges by the one-shot gradient. Scores: the ``k``-th cut ``2 + (b - k) /
    b``; the rest their normalised gradient (< 1)."""
    with torch.enable_grad():
        grad = oneshot_scores(model, seeds)
    e = grad.size
    pool = list(top_edges(grad, min(e, max(candidates, 2 * b))))
    s = _seed_row(seeds, model.num_nodes)
    keep = torch.ones(1, e)
    score: np.ndarray = grad / max(float(np.abs(grad).max()), 1e-12) * 0.5
    cut = 0
    while cut < min(b, len(pool)):
        values = []
        for start in range(0, len(pool), chunk):
            part = pool[start:start + chunk]
            x = keep.repeat(len(part), 1)
            x[torch.arange(len(part)), torch.as_tensor(part)] = 0.0
            values.append(model.spread(s.expand(len(part), -1), x))
        order = np.lexsort((np.asarray(pool), torch.cat(values).numpy()))
        for i in order[:max(1, min(per_step, b - cut))]:
            edge = pool[int(i)]
            keep[0, edge] = 0.0
            score[edge] = 2.0 + (b - cut) / b
            cut += 1
        pool = [e for e in pool if keep[0, e] > 0]
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

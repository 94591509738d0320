"""The surrogate on the seeds' neighbourhood (issue 20): an L-layer monstor surrogate cannot put
influence farther than L hops from a seed, so running it on that neighbourhood alone must give the
whole graph's spread and gradient (up to float summation order), the relaxation must keep the best
rounded cut it visits, and surrogate greedy must pick what the whole-graph surrogate would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleanse.graphs.selection import oneshot_scores, relax_scores, surrogate_greedy_scores, top_edges
from cleanse.graphs.surrogate import SpreadSurrogate, SurrogateConfig


def _ring(n: int = 80, reach: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A directed ring lattice (each node to its ``reach`` next nodes both ways, diameter ~ n / (2 reach))
    plus a few random chords; random edge probabilities in [0.1, 0.9]."""
    gen = np.random.default_rng(seed)
    pairs = {(u, (u + k) % n) for u in range(n) for k in range(-reach, reach + 1) if k}
    pairs |= {(int(u), int(v)) for u, v in gen.integers(0, n, (4, 2)) if u != v}
    ei = np.array(sorted(pairs)).T
    return ei, gen.uniform(0.1, 0.9, ei.shape[1])


def _model(ei: np.ndarray, p: np.ndarray, n: int) -> SpreadSurrogate:
    torch.manual_seed(3)  # untrained: the claim holds for any weights, and these give a large correction
    model = SpreadSurrogate(ei, p, n, SurrogateConfig(kind="monstor", layers=4)).eval()
    with torch.no_grad():
        model.step[-1].bias.fill_(4.0)  # a learned correction that would activate nodes without inflow
    return model


def _whole_graph_gradient(model: SpreadSurrogate, seeds: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    s = torch.zeros(1, model.num_nodes)
    s[0, torch.as_tensor(seeds)] = 1.0
    x = torch.ones(1, int(model.p.shape[0]), requires_grad=True)
    pi = model(s, x)
    (grad,) = torch.autograd.grad(pi.sum(), x)
    return pi.detach()[0], grad[0].double().numpy()


def test_neighbourhood_gives_the_whole_graphs_spread_and_gradient():
    ei, p = _ring()
    model, seeds = _model(ei, p, 80), np.array([0, 5])
    hood = model.neighbourhood(seeds)
    assert hood.edges.shape[0] < ei.shape[1] / 2 and hood.nodes.size < 60  # a real restriction
    pi, whole = _whole_graph_gradient(model, seeds)
    hops = np.full(80, np.inf)
    hops[seeds] = 0
    for k in range(1, 5):
        hops[ei[1, hops[ei[0]] == k - 1]] = np.minimum(hops[ei[1, hops[ei[0]] == k - 1]], k)
    assert (pi[torch.as_tensor(hops > 4)] == 0).all() and (pi[torch.as_tensor(hops <= 4)] > 0).all()
    local = oneshot_scores(model, seeds)
    outside = np.ones(ei.shape[1], dtype=bool)
    outside[hood.edges.numpy()] = False
    assert (whole[outside] == 0).all() and (local[outside] == 0).all()
    assert np.abs(whole[~outside]).min() > 0  # every edge kept matters somewhere
    np.testing.assert_allclose(local, whole, rtol=1e-5, atol=1e-7)
    assert np.array_equal(top_edges(local, 20), top_edges(whole, 20))
    with torch.no_grad():
        spread = model.local_spread(hood, torch.ones(1, hood.edges.shape[0]))
    assert float(spread[0]) == pytest.approx(float(pi.sum()), rel=1e-6)


def test_surrogate_greedy_on_the_neighbourhood_picks_the_whole_graph_best_cut():
    ei, p = _ring(seed=1)
    model, seeds = _model(ei, p, 80), np.array([10])
    s = torch.zeros(1, 80)
    s[0, 10] = 1.0
    with torch.no_grad():  # the whole-graph surrogate's value of each single cut
        x = torch.ones(ei.shape[1], ei.shape[1]) - torch.eye(ei.shape[1])
        values = model.spread(s.expand(ei.shape[1], -1), x).numpy()
    first = top_edges(surrogate_greedy_scores(model, seeds, 1, candidates=ei.shape[1]), 1)[0]
    assert values[first] == pytest.approx(values.min(), abs=1e-5)


def test_relaxation_returns_a_rounded_cut_no_worse_than_one_shot_on_the_surrogate():
    ei, p = _ring(seed=2)
    model, seeds = _model(ei, p, 80), np.array([0, 40])
    s = torch.zeros(1, 80)
    s[0, torch.as_tensor(seeds)] = 1.0

    def value(cut: np.ndarray) -> float:
        x = torch.ones(1, ei.shape[1])
        x[0, torch.as_tensor(cut)] = 0.0
        with torch.no_grad():
            return float(model.spread(s, x)[0])

    for b in (3, 8, 400):  # 400 exceeds the neighbourhood's edges: the rest of the cut is outside it
        relaxed = top_edges(relax_scores(model, seeds, b), b)
        assert value(relaxed) <= value(top_edges(oneshot_scores(model, seeds), b)) + 1e-5
        assert len(set(relaxed.tolist())) == min(b, ei.shape[1])


def _neighbourhood_by_scans(ei: np.ndarray, n: int, seeds: np.ndarray, layers: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The neighbourhood's edge ids and ``flowing`` from their definition, by whole-graph scans: hop of
    every node from the seeds (capped at ``layers``), the edges with an end within ``layers`` hops,
    ordered by their source's hop, graph order within a hop."""
    hop = np.full(n, layers)
    hop[seeds] = 0
    for k in range(layers):
        reached_next = np.zeros(n, dtype=bool)
        reached_next[ei[1, hop[ei[0]] == k]] = True
        hop[reached_next & (hop > k + 1)] = k + 1
    within = np.zeros(n, dtype=bool)
    within[seeds] = True
    for _ in range(layers):
        within[ei[1, within[ei[0]]]] = True
    edges = np.flatnonzero(within[ei[0]] | within[ei[1]])
    edges = edges[np.argsort(hop[ei[0, edges]], kind="stable")]
    return edges, tuple(int((hop[ei[0, edges]] <= k).sum()) for k in range(layers))


@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("layers", [1, 2, 4])
def test_neighbourhood_search_matches_its_definition(shuffled, layers):
    """The breadth-first search over the grouped edges (edges stored by source or in any order) finds the
    edges, their order and ``flowing`` that whole-graph scans give, on a graph larger than the reach."""
    ei, p = _ring(120, seed=4)
    if shuffled:
        order = np.random.default_rng(1).permutation(ei.shape[1])
        ei, p = ei[:, order], p[order]
    model = SpreadSurrogate(ei, p, 120, SurrogateConfig(kind="monstor", layers=layers))
    for seeds in (np.array([0]), np.array([3, 50, 51]), np.array([7, 7, 90])):
        hood = model.neighbourhood(seeds)
        edges, flowing = _neighbourhood_by_scans(ei, 120, np.unique(seeds), layers)
        assert 0 < edges.size < ei.shape[1]  # a part of the graph, so the relabelling is exercised
        np.testing.assert_array_equal(hood.edges.numpy(), edges)
        assert hood.flowing == flowing
        np.testing.assert_array_equal(hood.nodes[hood.src.numpy()], ei[0, edges])
        np.testing.assert_array_equal(hood.nodes[hood.dst.numpy()], ei[1, edges])
        np.testing.assert_array_equal(hood.nodes[hood.seeds.numpy()[0] == 1], np.unique(seeds))


def _random_mean_field(seed: int) -> tuple[np.ndarray, SpreadSurrogate]:
    """A random 9-node digraph (each ordered pair an edge with probability 0.22, p ~ U(0.3, 1)) and a
    surrogate with a zero learned correction: the mean-field noisy-or alone, whose redundant paths make
    the edges' gains interact (a cut that isolates a node is worth more than its edges one at a time)."""
    gen = np.random.default_rng(seed)
    ei = np.array([(u, v) for u in range(9) for v in range(9) if u != v and gen.random() < 0.22]).T
    model = SpreadSurrogate(ei, gen.uniform(0.3, 1.0, ei.shape[1]), 9, SurrogateConfig(kind="monstor", layers=4))
    with torch.no_grad():
        model.step[-1].weight.zero_()
        model.step[-1].bias.zero_()
    return ei, model


def test_staged_rounding_reaches_the_surrogates_best_cut_where_one_shot_does_not():
    import itertools

    seeds, b = np.array([0]), 3
    below_oneshot = at_optimum = 0
    for graph in range(20):
        ei, model = _random_mean_field(graph)
        s = torch.zeros(1, 9)
        s[0, 0] = 1.0

        def value(cut: tuple[int, ...] | np.ndarray) -> float:
            x = torch.ones(1, ei.shape[1])
            x[0, torch.as_tensor(np.asarray(cut, dtype=np.int64))] = 0.0
            with torch.no_grad():
                return float(model.spread(s, x)[0])

        best = min(value(cut) for cut in itertools.combinations(range(ei.shape[1]), b))  # brute force
        oneshot = value(top_edges(oneshot_scores(model, seeds), b))
        plain = value(top_edges(relax_scores(model, seeds, b, stages=0), b))
        staged = value(top_edges(relax_scores(model, seeds, b, stages=3), b))
        assert best - 1e-6 <= staged <= min(oneshot, plain) + 1e-6
        below_oneshot += staged < oneshot - 1e-3
        at_optimum += staged < best + 1e-6
    # measured: one-shot and the unstaged relaxation miss the brute-force cut on 4 of these 20 graphs
    # (graphs 2, 3, 11, 12); staged rounding improves all 4 and reaches the optimum on 3 of them
    assert below_oneshot >= 4 and at_optimum >= 19

"""The cascade family (issue 20, DiffIM): the spread simulator and the live-edge greedy against exact
enumeration, the surrogate's one-shot gradient on a planted bottleneck, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cleanse.errors import ConfigError
from cleanse.graphs.cascades import exact_ic
from cleanse.graphs.generators import barabasi_albert, bridge_graph, powerlaw_cluster
from cleanse.graphs.greedy_mc import greedy_mc, live_worlds
from cleanse.graphs.monstor_pass import MonstorPass
from cleanse.graphs.selection import oneshot_scores, relax_scores, top_edges, verify_spread
from cleanse.graphs.surrogate import SpreadSurrogate, SurrogateConfig, fit_surrogate, make_instances

# a 6-node directed graph with two routes from node 0 and a bottleneck 3 -> 4
TINY = np.array([[0, 0, 1, 2, 3, 4, 1], [1, 2, 3, 3, 4, 5, 2]])
P = np.array([0.7, 0.5, 0.6, 0.8, 0.9, 0.5, 0.3])


def _exact_spread(removed: list[int]) -> float:
    p = P.copy()
    p[removed] = 0.0
    seeds = np.zeros(6, dtype=bool)
    seeds[0] = True
    return float(exact_ic(TINY, p, seeds, 6).sum())


def test_verified_spread_matches_exact_enumeration():
    exact = _exact_spread([])
    mean, se = verify_spread("IC", TINY, P, np.array([0]), 6, np.zeros(0, dtype=np.int64), runs=20_000, seed=3)
    assert abs(mean - exact) < 4.5 * se and 0 < se < 0.02
    cut, cut_se = verify_spread("IC", TINY, P, np.array([0]), 6, np.array([4]), runs=20_000, seed=3)
    assert abs(cut - _exact_spread([4])) < 4.5 * cut_se


def test_live_edge_worlds_have_the_edge_law():
    gen = np.random.default_rng(0)
    ic = live_worlds("IC", TINY, P, 6, 20_000, gen)
    assert np.abs(ic.mean(0) - P).max() < 0.02
    w = np.array([0.5, 0.5, 0.3, 0.4, 1.0, 1.0, 0.2])  # in-sums: node 2 0.7, node 3 0.7
    lt = live_worlds("LT", TINY, w, 6, 20_000, gen)
    assert np.abs(lt.mean(0) - w).max() < 0.02
    for v in range(6):  # LT: at most one live in-edge per node
        assert lt[:, TINY[1] == v].sum(1).max() <= 1


def test_greedy_mc_first_cut_is_the_exact_best_single_edge():
    exact = [_exact_spread([e]) for e in range(P.size)]
    result = greedy_mc("IC", TINY, P, np.array([0]), 6, 1, worlds=4000, seed=1)
    assert result.picked[0] == int(np.argmin(exact))  # exact: 0 -> 1 (2.44) beats the next best by 0.55
    assert abs(result.spread_before - _exact_spread([])) < 0.1


@pytest.fixture(scope="module")
def bridge_surrogate():
    torch.manual_seed(0)
    graph, bridge = bridge_graph(10, p_in=0.5, seed=0)
    p = np.full(graph.num_edges, 0.4)
    ei = graph.edge_index
    feeds_a = set(ei[0, ei[1] == bridge[0]].tolist())  # seeds not adjacent to the bridge's end
    seeds = np.array([v for v in range(bridge[0]) if v not in feeds_a][:2])
    train = make_instances("IC", graph.edge_index, p, graph.num_nodes, seeds, 48, 200, np.random.default_rng(0))
    model = SpreadSurrogate(graph.edge_index, p, graph.num_nodes, SurrogateConfig(kind="monstor", epochs=30))
    fit_surrogate(model, train)
    return graph, bridge, p, seeds, model


@pytest.mark.slow
def test_oneshot_gradient_cuts_the_planted_bridge(bridge_surrogate):
    graph, (a, b), p, seeds, model = bridge_surrogate
    ei = graph.edge_index
    bridge = int(np.flatnonzero((ei[0] == a) & (ei[1] == b))[0])
    score = oneshot_scores(model, seeds)
    assert top_edges(score, 1)[0] == bridge
    cut, se = verify_spread("IC", ei, p, seeds, graph.num_nodes, np.array([bridge]), runs=4000, seed=9)
    randoms = [verify_spread("IC", ei, p, seeds, graph.num_nodes, np.array([e]), runs=4000, seed=9)[0]
               for e in np.random.default_rng(2).choice(graph.num_edges, 10, replace=False)]
    assert cut + 4 * se < np.mean(randoms)
    gain = greedy_mc("IC", ei, p, seeds, graph.num_nodes, 1, worlds=400, seed=4)
    assert gain.picked[0] == bridge


def test_generators_are_simple_and_symmetric():
    for g in (barabasi_albert(200, 2, seed=1), powerlaw_cluster(200, 2, 0.3, seed=1)):
        codes = set((g.edge_index[0] * g.num_nodes + g.edge_index[1]).tolist())
        assert len(codes) == g.num_edges and all((v * g.num_nodes + u) in codes for u, v in g.edge_index.T.tolist())
        assert (g.edge_index[0] != g.edge_index[1]).all()


def test_bad_keys_are_one_line_config_errors():
    from cleanse.config import validate_params

    for raw, key in (({"family": "cascade", "cascade": {"diffusion": "SIR"}}, "cascade.diffusion"),
                     ({"family": "cascade", "detect": {"budget": "auto"}}, "detect.budget"),
                     ({"family": "cascade", "model": {"wings": 2}}, "model.wings")):
        with pytest.raises(ConfigError) as info:
            validate_params(raw)
        assert key in str(info.value) and "\n" not in str(info.value).strip()


@pytest.mark.slow
def test_end_to_end_metrics(tmp_path: Path):
    from cleanse.config import validate_params
    from cleanse.stages.runner import run_all
    from cleanse.storage import Layout

    params = validate_params({"family": "cascade", "data": {"source": "bridge", "nodes": 8, "probability": "constant",
                                                            "constant_p": 0.4},
                              "cascade": {"seeds": 1, "mc_runs": 2000, "val_runs": 500, "batches": 10},
                              "corruption": {"worlds": 200, "hops": -1},
                              "model": {"epochs": 10, "instances": 24, "test_instances": 4, "label_runs": 100},
                              "estimators": ["diffim_oneshot", "degree"],
                              "detect": {"budget": "count", "count": 1}, "tracking": {"enabled": False}})
    layout = Layout(tmp_path)
    run_all(params, layout, resume=False)
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert {"spread", "spread_se"} <= set(metrics["baseline"]) and "spread" in metrics["random"]
    for name in ("diffim_oneshot", "degree"):
        entry = metrics["estimators"][name]
        assert {"spread", "spread_se", "seconds", "removed"} <= set(entry)
        assert len(entry["removed"]) == 1
    assert metrics["oracle"]["spread"] < metrics["baseline"]["spread"]


def test_top_edges_is_the_stable_descending_order():
    gen = np.random.default_rng(5)
    for size, b in ((50, 7), (200, 200), (200, 250), (30, 0), (1000, 13)):
        score = gen.integers(0, 6, size).astype(np.float64)  # many ties, also across the b-th place
        expected = np.lexsort((np.arange(size), -score))[:b]
        assert np.array_equal(top_edges(score, b), expected)
    for positives, b in ((40, 25), (40, 40), (40, 41), (0, 3)):  # mostly exact zeros, as one-shot's scores
        score = np.zeros(500)
        score[gen.choice(500, positives + 30, replace=False)] = np.r_[gen.integers(1, 4, positives), -gen.random(30)]
        assert np.array_equal(top_edges(score, b), np.lexsort((np.arange(500), -score))[:b])
    with_nan = np.array([0.3, np.nan, 0.9, 0.3])
    assert np.array_equal(top_edges(with_nan, 2), np.lexsort((np.arange(4), -with_nan))[:2])


@pytest.mark.slow
def test_relaxation_cuts_the_bridge_and_stops_early(bridge_surrogate):
    graph, (a, b), p, seeds, model = bridge_surrogate
    ei = graph.edge_index
    bridge = int(np.flatnonzero((ei[0] == a) & (ei[1] == b))[0])
    for warm, patience in ((4.0, 3), (0.0, 0)):  # the warm, early-stopped default and the plain relaxation
        assert top_edges(relax_scores(model, seeds, 1, warm=warm, patience=patience), 1)[0] == bridge
    steps = _relax_steps(lambda: relax_scores(model, seeds, 1, steps=60))
    assert 3 < steps < 60  # no better rounded cut for 3 steps, well before 60


def _relax_steps(relax) -> int:
    """The relaxation's steps: each evaluates its rounded cut once (``MonstorPass.spread``)."""
    calls = []
    spread = MonstorPass.spread
    MonstorPass.spread = lambda self, x: calls.append(1) or spread(self, x)  # type: ignore[method-assign]
    try:
        relax()
    finally:
        MonstorPass.spread = spread  # type: ignore[method-assign]
    return len(calls)


def _mean_field_tree():
    """A tree from seed 0: three out-edges (p = 1, 1, 0.5), each followed by a chain of three edges of
    p = 0.9, and a surrogate whose learned correction is zero, i.e. the noisy-or update alone, which is
    exact for IC on a tree: ``spread = 1 + sum_v prod_{e on the path to v} p_e x_e``."""
    heads = [1, 5, 9]
    edges = [(0, h) for h in heads] + [(h + k, h + k + 1) for h in heads for k in range(3)]
    ei = np.array(edges).T
    p = np.array([1.0, 1.0, 0.5] + [0.9] * 9)
    model = SpreadSurrogate(ei, p, 13, SurrogateConfig(kind="monstor", layers=5))
    with torch.no_grad():
        model.step[-1].weight.zero_()
        model.step[-1].bias.zero_()
    return ei, p, model


def test_oneshot_gradient_is_the_exact_tree_marginal_even_for_certain_edges():
    ei, p, model = _mean_field_tree()
    reach = np.zeros(13)
    reach[0] = 1.0
    for e in range(ei.shape[1]):  # edges are listed parents first
        reach[ei[1, e]] = reach[ei[0, e]] * p[e]
    below = {v: [int(c) for c in ei[1, ei[0] == v]] for v in range(13)}

    def subtree(v: int) -> float:  # d spread / d x_e for the edge into v: what flows through it
        return reach[v] + sum(subtree(c) for c in below[v])

    exact = np.array([subtree(int(v)) for v in ei[1]])
    score = oneshot_scores(model, np.array([0]))
    # the p = 1 edges out of the seed (exact 3.439) were exactly 0 when the noisy-or was clamped at 1 - 1e-6
    assert exact[0] == pytest.approx(3.439) and np.allclose(score, exact, rtol=1e-4, atol=1e-5)
    assert list(top_edges(score, 2)) == [0, 1]


def test_relaxation_stops_when_the_budget_exceeds_the_edges_with_an_effect():
    ei, p, model = _mean_field_tree()
    cuts: list[np.ndarray] = []
    steps = _relax_steps(lambda: cuts.append(top_edges(relax_scores(model, np.array([0]), 8, steps=60), 8)))
    assert {0, 1, 2} <= set(cuts[0].tolist())  # the seed's three out-edges: the seed is then alone
    assert 3 <= steps < 20, steps  # no better rounded cut well before 60 steps

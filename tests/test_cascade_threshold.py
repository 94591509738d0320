"""LT with one fixed threshold for every node (``cascade.threshold``, DeepIM's ndlib labels): a
deterministic process, so the spread is one simulation, its standard error 0, and the reference greedy
re-simulates each candidate; checked against brute-force enumeration of the cuts."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from cleanse.errors import ConfigError
from cleanse.graphs.cascades import simulate
from cleanse.graphs.greedy_mc import greedy_fixed_threshold
from cleanse.graphs.selection import verify_spread

# seed 0; at threshold 0.5 every node is reached, and cutting 0 -> 2 loses 2, 3, 4 and 5 (2 keeps 0.3 from 1)
EDGES = np.array([[0, 0, 1, 2, 3, 4, 1], [1, 2, 3, 3, 4, 5, 2]])
W = np.array([0.7, 0.5, 0.4, 0.6, 0.9, 0.5, 0.3])  # LT in-sums <= 1
THETA = 0.5


def _spread(cut: tuple[int, ...]) -> float:
    w = W.copy()
    w[list(cut)] = 0.0
    seeds = np.zeros((1, 6), dtype=bool)
    seeds[0, 0] = True
    return float(simulate("LT", EDGES, w, seeds, n_runs=1, num_nodes=6, threshold=THETA).sum())


def test_greedy_takes_the_exact_best_cut_each_step():
    picked: list[int] = []
    for _ in range(3):  # the greedy sequence by brute force over the remaining edges, ties by index
        rest = [e for e in range(W.size) if e not in picked]
        picked.append(min(rest, key=lambda e: (_spread((*picked, e)), e)))
    result = greedy_fixed_threshold(EDGES, W, np.array([0]), 6, 3, THETA)
    assert result.picked.tolist() == picked
    assert picked[0] == 1  # 0 -> 2: node 2 then has 0.3 < 0.5, and 3, 4, 5 follow it out
    assert result.spread_before == _spread(()) == 6.0 and result.spread_after == _spread(tuple(picked))
    best_pair = min(_spread(pair) for pair in combinations(range(W.size), 2))
    assert _spread(tuple(picked[:2])) == best_pair  # here greedy is also the best pair


def test_verified_spread_is_deterministic_with_zero_error():
    for cut in ((), (1,), (4, 6)):
        spread, se = verify_spread("LT", EDGES, W, np.array([0]), 6, np.array(cut, dtype=np.int64), runs=1000,
                                   batches=10, seed=3, threshold=THETA)
        assert (spread, se) == (_spread(cut), 0.0)


def test_threshold_with_ic_is_a_one_line_config_error():
    from cleanse.config import validate_params

    with pytest.raises(ConfigError) as info:
        validate_params({"family": "cascade", "cascade": {"diffusion": "IC", "threshold": 0.5}})
    assert "cascade.threshold" in str(info.value) and "\n" not in str(info.value).strip()


@pytest.mark.slow
def test_end_to_end_with_a_fixed_threshold(tmp_path: Path):
    from cleanse.config import validate_params
    from cleanse.stages.runner import run_all
    from cleanse.storage import Layout

    params = validate_params({"family": "cascade", "data": {"source": "bridge", "nodes": 8, "probability": "weighted_cascade"},
                              "cascade": {"diffusion": "LT", "threshold": 0.3, "seeds": 1, "mc_runs": 200,
                                          "val_runs": 200, "batches": 10},
                              "corruption": {"hops": -1, "steps": 1},
                              "model": {"epochs": 5, "instances": 12, "test_instances": 4, "label_runs": 50},
                              "estimators": ["diffim_oneshot", "greedy_mc"],
                              "detect": {"budget": "count", "count": 2}, "tracking": {"enabled": False}})
    run_all(params, Layout(tmp_path), resume=False)
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["baseline"]["spread_se"] == 0.0 and metrics["estimators"]["greedy_mc"]["spread_se"] == 0.0
    # greedy_mc re-simulates exactly as the reference does: its cuts are the oracle's, so its spread too
    assert metrics["estimators"]["greedy_mc"]["spread"] == metrics["oracle"]["spread"] <= metrics["baseline"]["spread"]
    assert len(metrics["estimators"]["diffim_oneshot"]["removed"]) == 2

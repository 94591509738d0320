"""Influence estimation in the graph family (issue 19): the node-model spread surrogate of
:mod:`cleanse.graphs.node_surrogate` against exact Independent Cascade probabilities (live-edge
enumeration) on a ring, the reported label noise against two independent Monte Carlo estimates,
the error arithmetic, and an influence-estimation run recording ``surrogate.{mae, spread_error}``
where ``reports/metrics.json`` reads it."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cleanse import families
from cleanse.config import validate_params
from cleanse.errors import ConfigError
from cleanse.graphs import node_surrogate
from cleanse.graphs.cascades import exact_ic, simulate, weighted_cascade
from cleanse.graphs.data import symmetrise

SBM = {"family": "graph", "seed": 0,
       "data": {"source": "sbm", "sbm": {"num_nodes": 120, "homophily": 0.85, "feature_dim": 8, "avg_degree": 4.0}},
       "corruption": {"fraction": 0.2}, "model": {"epochs": 20, "hidden": 16, "checkpoints": 2},
       "tracking": {"enabled": False}}
INFLUENCE = {"diffusion": "IC", "seed_rates": [0.05, 0.2], "train_sets": 12, "test_sets": 6, "mc_runs": 100,
             "test_runs": 400, "hidden": 16, "layers": 3, "epochs": 15, "batch": 6}


def test_the_surrogate_learns_exact_cascade_probabilities_on_a_path() -> None:
    """Path of 9 nodes (the weighted cascade: p = 1/2 into inner nodes, 1 into the ends): trained on
    2000-run Monte Carlo labels of every single seed and 27 of the 36 seed pairs, its predictions for
    the 9 held-out pairs match the exact IC probabilities (all 2^16 live-edge worlds) far better
    than the seeds-only floor (measured 0.012-0.018 over three initialisation seeds, floor 0.34)."""
    torch.set_num_threads(1)
    n = 9
    ei = symmetrise(np.array([(k, k + 1) for k in range(n - 1)]).T, n)
    w = weighted_cascade(ei, n)
    sets = [[v] for v in range(n)] + [list(pair) for pair in itertools.combinations(range(n), 2)]
    rows = np.zeros((len(sets), n), dtype=bool)
    for row, chosen in zip(rows, sets, strict=True):
        row[chosen] = True
    held = np.random.default_rng(0).choice(np.arange(n, len(sets)), size=9, replace=False)
    train, test = np.delete(rows, held, axis=0), rows[held]
    labels = simulate("IC", ei, w, train, n_runs=2000, seed=1).astype(np.float32)
    model, _ = node_surrogate.fit("axelgnn", train, labels, ei, hidden=16, layers=4, epochs=60, batch=8,
                                  lr=0.01, seed=0)
    exact = np.stack([exact_ic(ei, w, row, n) for row in test])
    pred = node_surrogate.predict(model, test, ei)
    free = ~test
    mae = np.abs(pred - exact)[free].mean()
    floor = exact[free].mean()  # the seeds-only predictor's error
    assert floor > 0.3
    assert mae < 0.04 and mae < floor / 10
    assert np.array_equal(pred[test], np.ones(int(test.sum())))  # seeds are active, exactly


def test_label_noise_is_the_gap_between_two_independent_monte_carlo_estimates() -> None:
    """Two independent r-run estimates differ by sqrt(2) times one estimate's error from the truth,
    so their mean absolute gap is sqrt(2) * label_noise (normal approximation)."""
    gen = np.random.default_rng(0)
    ei = symmetrise(gen.integers(0, 150, size=(2, 500)), 150)
    seeds = node_surrogate.random_seed_sets(150, 0.05, 6, gen)
    w = weighted_cascade(ei, 150)
    a = simulate("IC", ei, w, seeds, n_runs=200, seed=1)
    b = simulate("IC", ei, w, seeds, n_runs=200, seed=2)
    truth = simulate("IC", ei, w, seeds, n_runs=5000, seed=3)
    gap = np.abs(a - b).mean()
    assert gap == pytest.approx(np.sqrt(2) * node_surrogate.label_noise(truth, seeds, 200), rel=0.1)


def test_errors_count_seeds_as_exact_and_spread_as_relative() -> None:
    seeds = np.array([[True, False, False, False]])
    truth = np.array([[1.0, 0.5, 0.25, 0.25]], dtype=np.float32)
    pred = np.array([[1.0, 0.4, 0.25, 0.55]], dtype=np.float32)
    e = node_surrogate.errors(pred, seeds, truth)
    assert e["mae"] == pytest.approx(0.4 / 4) and e["mae_nonseed"] == pytest.approx(0.4 / 3)
    assert e["spread_abs"] == pytest.approx(0.2) and e["spread_rel"] == pytest.approx(0.2 / 2.0)
    sets = node_surrogate.random_seed_sets(50, 0.001, 3, np.random.default_rng(0))
    assert sets.sum(1).tolist() == [1, 1, 1]  # at least one seed
    assert node_surrogate.random_seed_sets(5, 0.95, 2, np.random.default_rng(0)).sum(1).tolist() == [4, 4]


def test_an_influence_run_records_the_held_out_surrogate_where_metrics_json_reads_it(tmp_path) -> None:
    torch.set_num_threads(1)
    task = families.get("graph")
    plain = validate_params(SBM)
    assert plain.influence is None and task.train_inputs(plain) == ()  # node-label runs fingerprint as before
    params = validate_params({**SBM, "influence": INFLUENCE})
    assert task.train_inputs(params) == (params.influence.model_dump(mode="json"),)
    staged = task.stage(params)
    model = task.fit(params, staged.train, staged.meta)
    record = task.training_record(model)
    surrogate = record["surrogate"]
    assert surrogate["test_sets"] == 12 and surrogate["train_sets"] == 24
    assert set(surrogate["per_rate"]) == {"0.05", "0.2"}
    # learned: well below the seeds-only floor, and above the labels' own Monte Carlo noise
    assert surrogate["label_noise_mae"] < surrogate["mae"] < surrogate["floor"]["mae"] / 2
    assert 0 <= surrogate["spread_error"] < surrogate["floor"]["spread_error"]
    task.save_model(model, tmp_path / "base", {"fingerprint": "x", **record})
    metrics = {"estimators": {}}
    assert task.evaluations(params, staged, SimpleNamespace(base_model=tmp_path / "base"), metrics) == {}
    assert metrics["surrogate"] == json.loads(json.dumps(surrogate))
    assert task.evaluations(plain, staged, SimpleNamespace(base_model=tmp_path / "base"), {}) == {}


@pytest.mark.parametrize(("change", "message"), [
    ({"seed_rates": [0.0, 0.1]}, "seed rate must lie in (0, 1)"),
    ({"diffusion": "SIR"}, "influence.diffusion"),
    ({"arch": "linkx"}, "influence.arch"),
    ({"threshold": 0.5}, "threshold applies to LT only"),
])
def test_bad_influence_sections_are_refused_in_one_line(change, message) -> None:
    with pytest.raises(ConfigError) as error:
        validate_params({**SBM, "influence": {**INFLUENCE, **change}})
    assert message in str(error.value) and "\n" not in str(error.value).strip()

"""The one recommended cleaned model: the selection rule (pure) and the stage, which must choose
without the ground truth or the test split."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from cleanse.pipeline import recommend_dir, recommended_model_dir, run_all, run_recommend
from cleanse.recommend import NO_REMOVAL, Candidate, admissible, budget_counts, choose, consistency, top_ids
from cleanse.storage import Layout
from tests.conftest import small_params


def _c(name: str, k: int, val: float, rate: float = math.nan) -> Candidate:
    return Candidate(name, np.arange(k, dtype=np.int64), val, rate)


def test_highest_validation_accuracy_wins_and_ties_go_to_fewer_removed():
    candidates = [_c(NO_REMOVAL, 0, 0.90), _c("a", 50, 0.95), _c("b", 30, 0.95), _c("c", 10, 0.94)]
    assert choose(candidates, stop_rate=0.02) == 2
    # No removal wins a tie: cleaning has to measurably help.
    assert choose([_c(NO_REMOVAL, 0, 0.95), _c("a", 50, 0.95)], stop_rate=0.02) == 0
    with pytest.raises(ValueError):
        choose([], stop_rate=0.02)


def test_probe_behaviour_comes_before_validation_accuracy():
    # The backdoored base model is the most accurate; it still sends the held-out probes to the target.
    candidates = [_c(NO_REMOVAL, 0, 0.97, 0.95), _c("a", 50, 0.95, 0.0), _c("b", 40, 0.96, 0.30), _c("c", 60, 0.94, 0.01)]
    assert admissible(candidates, stop_rate=0.02) == [1, 3]
    assert choose(candidates, stop_rate=0.02) == 1
    # When no candidate reaches stop_rate, the lowest rate any reaches is the bar.
    worse = [_c(NO_REMOVAL, 0, 0.97, 0.95), _c("a", 50, 0.90, 0.20), _c("b", 40, 0.96, 0.30)]
    assert choose(worse, stop_rate=0.02) == 1


def test_remaining_ties_go_to_the_ranking_that_describes_the_removal():
    ids = np.arange(6)
    removed = np.array([4, 5])
    assert consistency(ids, np.array([0, 0, 0, 0, 1, 1.0]), removed) == 1.0
    assert consistency(ids, np.array([1, 0, 0, 0, 0.5, 0]), removed) == 0.5
    assert consistency(ids, np.zeros(6), np.zeros(0)) == 1.0
    same = [_c("influence", 2, 0.95), _c("tracin", 2, 0.95)]
    same[0] = Candidate("influence", removed, 0.95, consistency=0.5)
    same[1] = Candidate("tracin", removed, 0.95, consistency=1.0)
    assert choose(same, stop_rate=0.02) == 1


def test_budget_ladder_and_top_ids():
    assert budget_counts(100, [0.5, 0.75, 1.0, 1.25, 1.5], n_train=400, max_fraction=0.35) == [
        (0.5, 50), (0.75, 75), (1.25, 125)]  # 1.0 is k itself; 150 > 0.35 * 400
    assert budget_counts(1, [0.4, 1.5], n_train=10, max_fraction=0.5) == [(1.5, 2)]  # round(0.4) = 0
    ids = np.array([10, 11, 12, 13])
    assert top_ids(ids, np.array([0.1, 0.9, 0.9, 0.5]), 3).tolist() == [11, 12, 13]


@pytest.fixture(scope="module")
def recommended_run(tmp_path_factory):
    params = small_params("estimators=[loss,tracin]", "recommend.budget_factors=[0.5,1.5]")
    layout = Layout.at(tmp_path_factory.mktemp("recommend"))
    metrics = run_all(params, layout, log=lambda line: None)
    return params, layout, metrics


def test_recommendation_in_metrics_has_an_estimators_shape(recommended_run):
    params, layout, metrics = recommended_run
    recommended = json.loads(layout.metrics.read_text())["recommended"]
    assert recommended["estimator"] in [NO_REMOVAL, *params.estimators]
    assert set(recommended["detection"]) == {"roc_auc", "average_precision", "precision_at_k", "recall_at_k", "k"}
    assert {"test_accuracy", "val_accuracy", "n_removed"} <= set(recommended["retrain"])
    if recommended["estimator"] != NO_REMOVAL:
        assert recommended["detection"] == metrics["estimators"][recommended["estimator"]]["detection"]
    chosen = json.loads((recommend_dir(layout) / "recommend.json").read_text())
    # Every candidate is reported; the chosen one has the best validation accuracy among them.
    vals = [c["val_accuracy"] for c in chosen["candidates"]]
    assert chosen["candidates"][chosen["chosen"]]["val_accuracy"] == max(vals)
    assert len(chosen["candidates"]) >= 1 + len(params.estimators)
    # The table (console, report, MLflow description) starts with the recommendation.
    assert (layout.reports / "comparison.md").read_text().splitlines()[2].startswith("| RECOMMENDED: ")
    assert "Recommended:" in (layout.reports / "report.html").read_text()


def test_recommended_model_is_saved_and_evaluates_as_reported(recommended_run):
    params, layout, metrics = recommended_run
    from cleanse.pipeline import evaluate_model, load_model, load_staged

    model = load_model(recommended_model_dir(layout))
    evaluation = evaluate_model(model, load_staged(layout, params))
    assert evaluation["test_accuracy"] == pytest.approx(metrics["recommended"]["retrain"]["test_accuracy"])
    assert evaluation["val_accuracy"] == pytest.approx(metrics["recommended"]["retrain"]["val_accuracy"])


def test_choice_never_reads_ground_truth_or_test_split(recommended_run):
    params, layout, _ = recommended_run
    before = json.loads((recommend_dir(layout) / "recommend.json").read_text())
    rng = np.random.default_rng(3)
    for name, columns in (("train", ("is_corrupted", "label_clean")), ("test", ("label", "label_clean"))):
        path = layout.split(name)
        frame = pl.read_parquet(path)
        frame.with_columns([pl.Series(c, rng.permutation(frame[c].to_numpy())) for c in columns]).write_parquet(path)
    run_recommend(params, layout)
    after = json.loads((recommend_dir(layout) / "recommend.json").read_text())
    for key in ("estimator", "budget_factor", "removed_ids", "chosen"):
        assert after[key] == before[key], key
    assert [c["val_accuracy"] for c in after["candidates"]] == [c["val_accuracy"] for c in before["candidates"]]

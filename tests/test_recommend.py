"""The one recommended cleaned model: the selection rule (pure) and the stage, which must choose
without the ground truth or the test split."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from cleanse.pipeline import recommend_dir, recommended_model_dir, run_all, run_recommend
from cleanse.recommend import (NO_REMOVAL, Candidate, admissible, budget_counts, choose, consistency,
                               estimated_noise_count, finalists, ranked, top_ids)
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


def test_noise_count_inverts_the_disagreement_of_a_model_with_known_error():
    # 200 wrong labels of 1000, a model wrong on 10% of labels: it disagrees with 0.9 * 200 + 0.1 * 800.
    assert estimated_noise_count(260, 1000, 0.1) == 200
    assert estimated_noise_count(260, 1000, 0.0) == 260  # a perfect model: every disagreement is a wrong label
    assert estimated_noise_count(50, 1000, 0.1) == 0  # fewer disagreements than its own errors: clipped at 0
    assert estimated_noise_count(1000, 1000, 0.4) == 1000  # clipped at n
    assert estimated_noise_count(260, 1000, 0.5) is None  # a coin says nothing about the labels
    assert estimated_noise_count(260, 1000, math.nan) is None


def test_noise_count_recovers_a_simulated_noise_rate():
    # Ten classes, 25% pair flips (c -> c + 1), a model that predicts the true class 90% of the time
    # and otherwise the next class, where the flips go: a flipped label is disagreed with exactly
    # when the model is right, and the estimate lands on the flip count.
    rng = np.random.default_rng(0)
    n, k, e = 20_000, 10, 0.1
    truth = rng.integers(0, k, n)
    flipped = rng.random(n) < 0.25
    given = np.where(flipped, (truth + 1) % k, truth)
    wrong = rng.random(n) < e
    aligned = np.where(wrong, (truth + 1) % k, truth)
    error = float(wrong[~flipped].mean())  # its error rate on the correct labels (cleanse: cross-validated)
    assert estimated_noise_count(int((aligned != given).sum()), n, error) == pytest.approx(flipped.sum(), rel=0.03)
    # Ignoring the model's own errors would overcount by a fifth.
    assert (aligned != given).sum() > 1.2 * flipped.sum()
    # Errors spread over the other nine classes instead: a flipped label is disagreed with more
    # often, so the estimate is an upper bound, about e / (1 - 2e) = 12% above.
    spread = np.where(wrong, (truth + rng.integers(1, k, n)) % k, truth)
    estimate = estimated_noise_count(int((spread != given).sum()), n, error)
    assert flipped.sum() * 1.05 < estimate < flipped.sum() * 1.2


def test_label_disagreement_of_the_trusted_model_counts_flipped_labels():
    from cleanse.config import DetectConfig, TrustedOptions
    from cleanse.estimators.trusted import label_disagreement

    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    val_label = np.repeat(np.arange(3), 30)
    train_truth = np.repeat(np.arange(3), 100)
    val = centres[val_label] + rng.normal(size=(90, 2))
    train = centres[train_truth] + rng.normal(size=(300, 2))
    given = train_truth.copy()
    given[:40] = (given[:40] + 1) % 3  # 40 flips, all in class 0
    d, e = label_disagreement(val, val_label, train, given, TrustedOptions())
    assert (d, e) == (40, 0.0)  # separated blobs: the trusted model errs on nothing but the flips
    assert estimated_noise_count(d, 300, e) == 40
    # A class with a single validation sample cannot be cross-validated: no estimate.
    assert label_disagreement(val[:61], val_label[:61], train, given, TrustedOptions()) is None


def test_finalists_are_the_best_distinct_rankings_in_rule_order():
    candidates = [_c(NO_REMOVAL, 0, 0.99), _c("a", 50, 0.95), _c("b", 30, 0.97), _c("c", 10, 0.96, math.nan),
                  _c("b", 60, 0.98), _c("d", 5, 0.90)]
    order = ranked(candidates, stop_rate=0.02)
    assert order == [0, 4, 2, 3, 1, 5]
    assert finalists(candidates, order, 3) == [4, 3, 1]  # "b" once (its best), never "none"
    assert finalists(candidates, order, 3, exclude=["c"]) == [4, 1, 5]
    assert finalists(candidates, order, 10) == [4, 3, 1, 5]
    # Probes: inadmissible candidates are not ranked, so they never become finalists.
    probed = [_c(NO_REMOVAL, 0, 0.99, 0.9), _c("a", 50, 0.95, 0.0), _c("b", 30, 0.97, 0.5)]
    assert ranked(probed, stop_rate=0.02) == [1]
    assert finalists(probed, ranked(probed, stop_rate=0.02), 3) == [1]


def test_cofit_svm_keeps_its_own_count_and_supersedes_trusted():
    candidates = [_c(NO_REMOVAL, 0, 0.60), _c("trusted", 457, 0.9704), _c("cofit_svm", 446, 0.9667),
                  _c("influence_val", 98, 0.74), _c("holdout_ensemble", 509, 0.74), _c("cleanlab", 538, 0.63)]
    order = ranked(candidates, stop_rate=0.02)
    # trusted's in-sample edge on the validation split does not count once its refinement ran.
    assert order == [2, 3, 4, 5, 0] and choose(candidates, stop_rate=0.02) == 2
    # cofit_svm is cut at its own estimate: the finalists re-cut at N̂ are the next rankings.
    assert finalists(candidates, order, 3) == [3, 4, 5]
    # Without cofit_svm, trusted competes as before.
    alone = [c for c in candidates if c.estimator != "cofit_svm"]
    assert choose(alone, stop_rate=0.02) == 1 and finalists(alone, ranked(alone, stop_rate=0.02), 1) == [1]


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
    # The second round: the best first-round rankings cut at the validation split's noise-count estimate.
    estimate = chosen["noise_estimate"]
    assert 0 <= estimate["val_cv_error"] < 0.5 and estimate["noise_count"] >= 1
    second = chosen["candidates"][1 + len(params.estimators):]
    assert 1 <= len(second) <= len(params.estimators)
    assert all(c["n_removed"] == estimate["noise_count"] for c in second)
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


def _rings(rng: np.random.Generator, n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Three concentric rings (radii 1, 2, 3, radial noise 0.15): no linear model separates them."""
    label = np.repeat(np.arange(3), n_per_class)
    angle = rng.uniform(0, 2 * np.pi, label.size)
    radius = 1.0 + label + rng.normal(scale=0.15, size=label.size)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1), label


def test_cofit_svm_ranks_planted_pair_flips_above_clean_labels_and_counts_them():
    from cleanse.config import DetectConfig, TrustedOptions
    from cleanse.data.dataset import DatasetMeta
    from cleanse.detect import flag
    from cleanse.estimators import cofit_svm
    from cleanse.estimators.base import ScoringContext
    from cleanse.estimators.cofit_svm_options import CofitSvmOptions
    from cleanse.estimators.trusted import TrustedEstimator
    from sklearn.metrics import roc_auc_score
    from tests.conftest import make_split

    rng = np.random.default_rng(0)
    train_x, truth = _rings(rng, 150)
    val_x, val_y = _rings(rng, 40)
    given = truth.copy()
    flipped = np.zeros(truth.size, dtype=bool)
    flipped[rng.choice(np.flatnonzero(truth == 0), 60, replace=False)] = True  # 40% of class 0 -> class 1
    given[flipped] = 1
    train = make_split(train_x, given)
    context = ScoringContext(train=train, val=make_split(val_x, val_y, start_id=10_000),
                             meta=DatasetMeta("rings", 3, (2,)), model=None, model_config=None, seed=0)
    result = cofit_svm.CofitSvmEstimator().score(context, CofitSvmOptions())
    score = result.table["score"].to_numpy()
    assert roc_auc_score(flipped, score) > 0.99
    # Its own count (D - n e) / (1 - 2 e) is near the 60 planted flips, and detect follows it. An upper
    # bound here: the logistic screen cannot draw rings (no estimate, N0 = 0), so the confident set
    # keeps flips, and the SVM errs on a few clean class-0 samples as well (71 on this draw).
    assert result.meta["screen_noise_count"] == 0
    assert 60 <= result.meta["noise_count"] <= 75
    flags = flag(result.table, DetectConfig())
    flagged = np.isin(train.sample_id, flags.filter(pl.col("is_flagged"))["sample_id"].to_numpy())
    assert flagged.sum() == result.meta["noise_count"]
    assert (flagged & flipped).sum() >= 0.95 * flipped.sum()
    # The trusted logistic regression cannot draw rings: the co-fitted SVM is what finds these flips.
    trusted = TrustedEstimator().score(context, TrustedOptions()).table["score"].to_numpy()
    assert roc_auc_score(flipped, trusted) < 0.8


def test_cofit_svm_refuses_a_validation_split_it_cannot_cross_validate():
    from cleanse.data.dataset import DatasetMeta
    from cleanse.errors import DataError
    from cleanse.estimators.base import ScoringContext
    from cleanse.estimators.cofit_svm import CofitSvmEstimator
    from cleanse.estimators.cofit_svm_options import CofitSvmOptions
    from tests.conftest import make_split

    x, y = _rings(np.random.default_rng(1), 20)
    context = ScoringContext(train=make_split(x, y), val=make_split(x[:21], y[:21], start_id=100),
                             meta=DatasetMeta("rings", 3, (2,)), model=None, model_config=None, seed=0)
    with pytest.raises(DataError, match="cofit_svm"):  # one sample of class 1, none of class 2
        CofitSvmEstimator().score(context, CofitSvmOptions())


def test_cofit_svm_caps_its_fit_at_max_fit_train_and_still_ranks_the_flips():
    """Above ``max_fit_train`` confident samples the SVM fits a seeded random subset of them (its
    cost is quadratic in its rows); the rest are scored out of sample like every unfitted sample."""
    from cleanse.data.dataset import DatasetMeta
    from cleanse.estimators.base import ScoringContext
    from cleanse.estimators.cofit_svm import CofitSvmEstimator, capped
    from cleanse.estimators.cofit_svm_options import CofitSvmOptions
    from sklearn.metrics import roc_auc_score
    from tests.conftest import make_split

    mask = np.zeros(50, dtype=bool)
    mask[::2] = True
    assert capped(mask, 25, seed=0) is mask
    small = capped(mask, 10, seed=0)
    assert small.sum() == 10 and not (small & ~mask).any()
    np.testing.assert_array_equal(small, capped(mask, 10, seed=0))

    rng = np.random.default_rng(0)
    train_x, truth = _rings(rng, 150)
    val_x, val_y = _rings(rng, 40)
    given = truth.copy()
    flipped = np.zeros(truth.size, dtype=bool)
    flipped[rng.choice(np.flatnonzero(truth == 0), 60, replace=False)] = True
    given[flipped] = 1
    context = ScoringContext(train=make_split(train_x, given), val=make_split(val_x, val_y, start_id=10_000),
                             meta=DatasetMeta("rings", 3, (2,)), model=None, model_config=None, seed=0)
    result = CofitSvmEstimator().score(context, CofitSvmOptions(max_fit_train=120))
    assert result.meta["n_confident"] == 120
    assert roc_auc_score(flipped, result.table["score"].to_numpy()) > 0.97

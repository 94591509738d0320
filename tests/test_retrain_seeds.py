"""``evaluate.retrain_seeds``: every retrain at k training seeds, outcomes as the mean with the
per-seed values and an interval (cleanse.stages.retrain_seeds), for every family."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cleanse.stages.retrain_seeds import OVER_SEEDS, summarise, training_seeds
from tests.conftest import small_params


def test_training_seeds_start_at_the_run_seed_and_are_fixed_by_it():
    assert training_seeds(small_params("seed=5")) == [5]
    chosen = training_seeds(small_params("seed=5", "evaluate.retrain_seeds=4"))
    assert chosen[0] == 5 and len(set(chosen)) == 4 and all(0 <= s < 2**31 for s in chosen)
    assert chosen == training_seeds(small_params("seed=5", "evaluate.retrain_seeds=4"))
    assert chosen[:3] == training_seeds(small_params("seed=5", "evaluate.retrain_seeds=3"))  # adding seeds keeps these
    assert chosen[1:] != training_seeds(small_params("seed=6", "evaluate.retrain_seeds=4"))[1:]


def test_summary_is_the_mean_with_the_t_prediction_interval_of_another_k_seed_mean():
    runs = [{"steer_rate": v, "n_removed": 10, "note": "x"} for v in (0.027, 0.625, 0.223, 0.277)]
    out = summarise([0, 11, 12, 13], runs)
    values = np.array([0.027, 0.625, 0.223, 0.277])
    mean, sd = values.mean(), values.std(ddof=1)
    half = 3.182446305284263 * sd * np.sqrt(2 / 4)  # t(0.975, 3), Student's table
    assert out["steer_rate"] == pytest.approx(mean) and out["n_removed"] == 10 and out["note"] == "x"
    assert isinstance(out["n_removed"], int)  # the removal's count, not an outcome: kept as it is
    spread = out[OVER_SEEDS]
    assert spread["training_seeds"] == [0, 11, 12, 13] and spread["values"] == {"steer_rate": values.tolist()}
    assert spread["sd"]["steer_rate"] == pytest.approx(sd)
    assert spread["interval"]["steer_rate"] == pytest.approx([mean - half, mean + half])


def test_interval_holds_the_mean_of_k_further_seeds_at_its_level():
    """Monte Carlo: normal outcomes, k = 4 seeds summarised, then the mean of 4 fresh ones."""
    rng = np.random.default_rng(0)
    trials, inside = 4000, 0
    for _ in range(trials):
        draws = rng.normal(0.3, 0.2, size=8)
        low, high = summarise(list(range(4)), [{"m": float(v)} for v in draws[:4]])[OVER_SEEDS]["interval"]["m"]
        inside += low <= draws[4:].mean() <= high
    assert abs(inside / trials - 0.95) < 0.012  # 3.5 binomial standard errors


def test_pipeline_retrains_references_and_estimators_at_every_training_seed(tmp_path):
    from cleanse.families import get
    from cleanse.pipeline import load_staged, run_all
    from cleanse.report import comparison_rows
    from cleanse.storage import Layout, read_json

    params = small_params("estimators=[loss]", "detect.budget=count", "evaluate.retrain_seeds=3")
    layout = Layout.at(tmp_path / "run")
    metrics = run_all(params, layout, log=lambda line: None)
    references = read_json(layout.retrain_result("references"))
    staged = load_staged(layout, params)
    family = get(params.family)
    chosen = training_seeds(params)
    corrupted = staged.train.sample_id[staged.train.is_corrupted]
    # Ground truth: each seed's oracle is a fit at that seed without the corrupted samples.
    by_hand = [family.outcome(family.fit(params, staged.train.without(corrupted), staged.meta, seed=seed), staged)
               ["test_accuracy"] for seed in chosen]
    oracle = references["oracle"]
    assert oracle[OVER_SEEDS]["values"]["test_accuracy"] == pytest.approx(by_hand)
    assert oracle["test_accuracy"] == pytest.approx(np.mean(by_hand)) and oracle["n_removed"] == corrupted.size
    baseline = [family.outcome(family.fit(params, staged.train, staged.meta, seed=seed), staged)["test_accuracy"]
                for seed in chosen[1:]]
    assert references["baseline"][OVER_SEEDS]["values"]["test_accuracy"][1:] == pytest.approx(baseline)
    flags = read_json(layout.retrain_result("loss"))
    assert len(flags["cleaned"][OVER_SEEDS]["values"]["test_accuracy"]) == 3
    assert len(flags["random_same_count"][OVER_SEEDS]["values"]["test_accuracy"]) == 3
    written = json.loads(layout.metrics.read_text())
    for block in (written["oracle"], written["random"], written["baseline"], written["estimators"]["loss"]["retrain"]):
        low, high = block[OVER_SEEDS]["interval"]["test_accuracy"]
        assert low <= block["test_accuracy"] <= high
    rows = comparison_rows(metrics)
    assert all("test_acc 95% over seeds" in row for row in rows)
    # The recommended model's outcome is a mean over the same training seeds as every other row's.
    recommended = written["recommended"]["retrain"]
    values = recommended[OVER_SEEDS]["values"]["test_accuracy"]
    assert len(values) == 3 and recommended["test_accuracy"] == pytest.approx(np.mean(values))
    assert rows[0]["test_acc 95% over seeds"] is not None


def test_one_seed_writes_no_spread(tmp_path):
    from cleanse.pipeline import run_all
    from cleanse.storage import Layout, read_json

    params = small_params("estimators=[loss]", "detect.budget=count")
    layout = Layout.at(tmp_path / "run")
    run_all(params, layout, log=lambda line: None)
    references = read_json(layout.retrain_result("references"))
    assert all(OVER_SEEDS not in references[key] for key in ("baseline", "oracle", "random"))
    assert OVER_SEEDS not in json.dumps(json.loads(layout.metrics.read_text()))


def test_iterative_cleansing_keeps_its_last_round_as_seed_0_and_retrains_its_removal_at_the_others(tmp_path):
    from cleanse.config import load_params
    from cleanse.families import get
    from cleanse.pipeline import load_staged, run_all
    from cleanse.storage import Layout, read_json

    params = load_params(None, ["data.source=sklearn:wine", "corruption.kind=backdoor", "corruption.fraction=0.1",
                                "corruption.trigger_size=3", "model.arch=logreg", "model.epochs=30", "model.lr=0.01",
                                "model.checkpoints=5", "tracking.enabled=false", "query.kind=triggered",
                                "query.size=8", "estimators=[tracin]", "evaluate.retrain_seeds=2"])
    layout = Layout.at(tmp_path / "run")
    run_all(params, layout, log=lambda line: None)
    result = read_json(layout.retrain_result("tracin"))
    assert result["iterative"] and result["removed_ids"]
    spread = result["cleaned"][OVER_SEEDS]
    last = result["rounds"][-1]
    assert spread["values"]["test_accuracy"][0] == last["test_accuracy"]
    assert spread["values"]["attack_success_rate"][0] == last["attack_success_rate"]
    staged = load_staged(layout, params)
    family = get(params.family)
    kept = staged.train.without(np.asarray(result["removed_ids"]))
    by_hand = family.outcome(family.fit(params, kept, staged.meta, seed=spread["training_seeds"][1]), staged)
    assert spread["values"]["test_accuracy"][1] == pytest.approx(by_hand["test_accuracy"])
    assert spread["values"]["attack_success_rate"][1] == pytest.approx(by_hand["attack_success_rate"])
    assert result["cleaned"]["test_accuracy"] == pytest.approx(np.mean(spread["values"]["test_accuracy"]))


def test_changing_the_seed_count_makes_the_retrains_stale_and_one_seed_keeps_the_old_fingerprints():
    from cleanse.config import fingerprint
    from cleanse.stages.fingerprints import (RETRAIN_RESULT_VERSION, detect_fingerprint, references_fingerprint,
                                             retrain_fingerprint, train_fingerprint)

    one, three = small_params("estimators=[loss]"), small_params("estimators=[loss]", "evaluate.retrain_seeds=3")
    # k = 1: the fingerprints as they were before the setting existed (no part added)
    assert references_fingerprint(one) == fingerprint("references", train_fingerprint(one), RETRAIN_RESULT_VERSION)
    assert retrain_fingerprint(one, "loss") == fingerprint("retrain", detect_fingerprint(one, "loss"),
                                                           RETRAIN_RESULT_VERSION)
    assert references_fingerprint(three) != references_fingerprint(one)
    assert retrain_fingerprint(three, "loss") != retrain_fingerprint(one, "loss")
    assert detect_fingerprint(three, "loss") == detect_fingerprint(one, "loss")  # the removal itself is unchanged

"""The regression family: staging with target outliers, ridge influence against leave-one-out
retraining, estimator/family refusals, and an end-to-end run's metrics keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cleanse.config import InfluenceOptions, load_params
from cleanse.data.stage import stage_data
from cleanse.errors import ConfigError
from cleanse.estimators.base import ScoringContext
from cleanse.estimators.influence import removal_effects
from cleanse.evaluate import leave_one_out_loss_changes, loo_correlation
from cleanse.models.architectures import spec_for
from cleanse.models.trainer import train_model

ROOT = Path(__file__).resolve().parents[1]
RIDGE = ["family=regression", "model.arch=ridge", "model.optimizer=lbfgs", "model.lr=1", "model.epochs=20",
         "model.weight_decay=0.01"]


@pytest.fixture(scope="module")
def ridge_context():
    params = load_params(overrides=RIDGE)
    staged = stage_data(params)
    spec = spec_for("ridge", None, staged.meta.feature_shape, staged.meta.n_classes, family="regression")
    model = train_model(spec, staged.train.features, staged.train.label, params.model, seed=0,
                        device=torch.device("cpu"))
    context = ScoringContext(train=staged.train, val=staged.val, meta=staged.meta, model=model,
                             model_config=params.model, seed=0)
    return context, staged


def test_target_outliers_shift_the_chosen_targets_by_scale_sd_and_keep_the_truth(ridge_context):
    _, staged = ridge_context
    train = staged.train
    shift = train.label - train.label_clean
    corrupted = train.is_corrupted
    assert corrupted.sum() == round(0.1 * len(train))
    assert np.all(shift[~corrupted] == 0)
    np.testing.assert_allclose(np.abs(shift[corrupted]), 4.0 * train.label_clean.std(), rtol=1e-9)
    assert (shift[corrupted] > 0).any() and (shift[corrupted] < 0).any()  # random signs
    assert not staged.val.is_corrupted.any() and not staged.test.is_corrupted.any()
    assert train.label.dtype == np.float64


def test_ridge_fit_is_the_closed_form_solution(ridge_context):
    context, _ = ridge_context
    x = np.c_[context.train.features.astype(np.float64), np.ones(len(context.train))]
    n, wd = x.shape[0], context.model_config.weight_decay
    # minimises mean (x w - y)^2 + wd/2 ||w||^2 (the bias is penalised too, as the trainer does)
    w = np.linalg.solve(2 * x.T @ x / n + wd * np.eye(x.shape[1]), 2 * x.T @ context.train.label / n)
    state = context.model.state
    fitted = np.r_[state["1.weight"].double().numpy()[0], state["1.bias"].double().numpy()]
    np.testing.assert_allclose(fitted, w, atol=1e-4)


def test_exact_influence_on_ridge_matches_leave_one_out_retraining(ridge_context):
    context, staged = ridge_context
    prediction = context.model.module()(torch.tensor(staged.test.features))[:, 0].detach().numpy()
    query = staged.test.subset(np.array([int(np.argmax(np.abs(prediction - staged.test.label)))]))
    predicted, _ = removal_effects(context, InfluenceOptions(solver="exact", damping=0.0), query)
    top = np.argsort(-np.abs(predicted[0]))[:40]
    actual = leave_one_out_loss_changes(context.model, context.train, query, context.model_config, top)
    correlation = loo_correlation(predicted[0, top], actual)
    assert correlation["pearson"] >= 0.99, correlation


def test_estimators_without_the_family_are_refused_up_front():
    with pytest.raises(ConfigError, match="^estimator 'cleanlab' does not support family 'regression'$"):
        load_params(overrides=["family=regression", "estimators=[loss,cleanlab]"])
    with pytest.raises(ConfigError, match="family: 'tabular' is not one of 'classification', 'regression', 'gan', "
                                          "'diffusion', 'cascade', 'lm', 'graph'$"):
        load_params(overrides=["family=tabular"])
    with pytest.raises(ConfigError, match="corruption.kind: 'label_flip' is not one of 'none' or 'target_outliers'"):
        load_params(overrides=["family=regression", "corruption.kind=label_flip"])
    assert load_params().family == "classification"  # no family key: every existing params file


@pytest.mark.slow
def test_a_small_regression_run_reports_rmse(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CLEANSE_DEVICE": "cpu"}
    command = [sys.executable, "-m", "cleanse.cli", "run", "--params", str(ROOT / "examples" / "regression.yaml"),
               "--out", str(tmp_path / "run"), "--set", "tracking.enabled=false", "--set", "model.epochs=20",
               "--set", "estimators=[loss,influence,tracin]", "--set", "recommend.budget_factors=[]"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "reports" / "metrics.json").read_text())
    for key in ("baseline", "oracle", "random"):
        assert metrics[key]["test_rmse"] > 0
    assert metrics["oracle"]["test_rmse"] < metrics["baseline"]["test_rmse"]  # the outliers hurt
    for name in ("loss", "influence", "tracin"):
        entry = metrics["estimators"][name]
        assert {"test_rmse", "random_test_rmse", "n_removed"} <= set(entry["retrain"])
        assert entry["detection"]["average_precision"] > 0.5  # 10% outliers at 4 sd are easy to see
    assert "test_accuracy" not in json.dumps(metrics)

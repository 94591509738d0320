"""Batched ensembles and the Feldman & Zhang subsampled estimator against ground truth:
batched training = one-by-one training, the estimates = their definition computed model by model,
the SE's 1/sqrt(K) law, a planted near-duplicate, and resumable shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from cleanse.config import MemorizationOptions, ModelConfig
from cleanse.data.dataset import DatasetMeta
from cleanse.ensembles import correctness, ensemble_logits, train_ensemble
from cleanse.errors import ConfigError, DataError
from cleanse.estimators.base import ScoringContext
from cleanse.estimators.memorization import (
    MemorizationEstimator,
    influence_estimate,
    model_plan,
    self_estimate,
    shard_path,
    ensemble_key,
)
from cleanse.models.architectures import spec_for
from cleanse.models.trainer import TrainedModel, predict_proba, train_model
from tests.conftest import make_split

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    order = np.random.default_rng(1).permutation(len(data.target))
    return (data.data / 16).astype(np.float32)[order], data.target.astype(np.int64)[order]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_batched_equals_one_by_one(digits, optimizer):
    """Same seeds and masks (uneven subset sizes included): the batched models are the
    sequentially trained ones to float tolerance, and so are the estimates built on them."""
    x, y = digits[0][:240], digits[1][:240]
    config = ModelConfig(arch="mlp", hidden=[16], epochs=6, batch_size=32, lr=0.02, optimizer=optimizer)
    spec = spec_for("mlp", [16], (64,), 10)
    rng = np.random.default_rng(0)
    masks = rng.random((6, 240)) < 0.7  # subset sizes differ: models sit out steps they do not have
    seeds = np.array([5, 17, 23, 42, 99, 1234])
    ensemble = train_ensemble(spec, x, y, masks, seeds, config, device=CPU)
    batched_logits = ensemble_logits(ensemble, x)
    correct, prob = correctness(batched_logits, y)
    seq_prob = np.zeros_like(prob)
    for k in range(6):
        model = train_model(spec, x[masks[k]], y[masks[k]], config, seed=int(seeds[k]), device=CPU)
        for name, value in model.state.items():
            np.testing.assert_allclose(ensemble.state(k)[name].numpy(), value.numpy(), atol=2e-5)
        seq_prob[k] = predict_proba(model, x)[np.arange(240), y]
    np.testing.assert_allclose(prob, seq_prob, atol=1e-4)
    np.testing.assert_allclose(self_estimate(masks, prob).value, self_estimate(masks, seq_prob).value, atol=1e-4)


def test_estimates_match_their_definition():
    """mem / infl and their SEs against a per-entry loop over models (Alg. 1, steps 5-6)."""
    rng = np.random.default_rng(3)
    masks = rng.random((40, 7)) < 0.6
    values = rng.random((40, 5))
    est = influence_estimate(masks, values)
    for j in range(5):
        for i in range(7):
            inside, outside = values[masks[:, i], j], values[~masks[:, i], j]
            assert est.value[j, i] == pytest.approx(inside.mean() - outside.mean(), abs=1e-12)
            se = np.sqrt(inside.var(ddof=1) / inside.size + outside.var(ddof=1) / outside.size)
            assert est.se[j, i] == pytest.approx(se, abs=1e-12)
    square = rng.random((40, 7))
    np.testing.assert_allclose(self_estimate(masks, square).value, np.diag(influence_estimate(masks, square).value))


def test_plan_is_per_model_and_fixed_size():
    masks, seeds = model_plan(50, 0, 8, 0.7, seed=3)
    assert masks.shape == (8, 50) and (masks.sum(1) == 35).all()
    later, later_seeds = model_plan(50, 4, 8, 0.7, seed=3)  # a shard's models do not depend on the sharding
    assert (later == masks[4:]).all() and (later_seeds == seeds[4:]).all()
    assert len(set(seeds.tolist())) == 8


def test_lbfgs_and_bad_masks_are_rejected(digits):
    spec = spec_for("logreg", None, (64,), 10)
    x, y = digits[0][:20], digits[1][:20]
    with pytest.raises(ConfigError, match="model.optimizer"):
        train_ensemble(spec, x, y, np.ones((2, 20), bool), np.arange(2), ModelConfig(optimizer="lbfgs"))
    with pytest.raises(DataError, match="empty training subsets"):
        train_ensemble(spec, x, y, np.zeros((2, 20), bool), np.arange(2), ModelConfig(arch="logreg"))


def _context(x, y, config, *, cache_dir=None, n_train=None) -> ScoringContext:
    n = n_train or len(y)
    train = make_split(x[:n], y[:n])
    spec = spec_for(config.arch, config.hidden, x.shape[1:], 10)
    model = TrainedModel(spec=spec, state={})  # the estimator trains its own subset models
    return ScoringContext(train=train, val=train.subset(np.arange(10)), meta=DatasetMeta("digits", 10, x.shape[1:]),
                          model=model, model_config=config, seed=0, cache_dir=cache_dir)


MEMORIZING = ModelConfig(arch="mlp", hidden=[64], epochs=40, batch_size=32, lr=0.01, weight_decay=0.0)


def test_se_shrinks_as_one_over_sqrt_k(digits):
    """Mean SE over the training set at K = 32, 64, 128, 256: log-log slope about -1/2."""
    x, y = digits
    context = _context(x, y, ModelConfig(arch="logreg", epochs=3, batch_size=64, lr=0.05), n_train=200)
    options = MemorizationOptions(n_models=256, statistic="probability", shard_size=256)
    from cleanse.estimators.memorization import all_shards, stacked

    masks, values = stacked(all_shards(context, options)[0], "probability")
    ks = np.array([32, 64, 128, 256])
    mean_se = np.array([self_estimate(masks[:k], values[:k]).se.mean() for k in ks])
    slope = np.polyfit(np.log(ks), np.log(mean_se), 1)[0]
    assert -0.6 < slope < -0.4, (slope, mean_se)


def test_planted_near_duplicate_is_the_top_influence(digits):
    """A test image the plain models get wrong, copied into train with small noise: that copy is
    the training sample with the largest infl on it."""
    x, y = digits
    n_train = 300
    train_x, train_y = x[:n_train], y[:n_train]
    test_x, test_y = x[n_train:600], y[n_train:600]
    base = train_model(spec_for("mlp", [64], (64,), 10), train_x, train_y, MEMORIZING, seed=0, device=CPU)
    wrong = np.flatnonzero(predict_proba(base, test_x).argmax(1) != test_y)
    j = int(wrong[0])
    noisy = test_x[j] + np.random.default_rng(0).normal(0, 0.02, size=64).astype(np.float32)
    planted_x = np.concatenate([train_x, noisy[None]])
    planted_y = np.concatenate([train_y, test_y[j : j + 1]])
    context = _context(planted_x, planted_y, MEMORIZING)
    infl = MemorizationEstimator().pairwise(context, MemorizationOptions(n_models=64, shard_size=64),
                                            make_split(test_x[j : j + 1], test_y[j : j + 1]))
    assert infl.shape == (1, n_train + 1)
    assert int(infl[0].argmax()) == n_train, (infl[0].max(), infl[0, n_train])
    assert infl[0, n_train] >= 0.15  # a high-influence pair by the paper's threshold


def test_shards_are_cached_and_reused(digits, tmp_path):
    x, y = digits
    config = ModelConfig(arch="logreg", epochs=2, batch_size=64, lr=0.05)
    context = _context(x, y, config, cache_dir=tmp_path, n_train=150)
    options = MemorizationOptions(n_models=12, shard_size=5)
    first = MemorizationEstimator().score(context, options)
    assert first.meta["shards"] == 3 and first.meta["shards_trained"] == 3
    key = ensemble_key(context, options)
    files = [shard_path(tmp_path, key, *r) for r in [(0, 5), (5, 10), (10, 12)]]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = MemorizationEstimator().score(context, options)
    assert again.meta["shards_trained"] == 0 and again.table.equals(first.table)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    more = MemorizationEstimator().score(context, options.model_copy(update={"n_models": 15}))
    assert more.meta["shards_trained"] == 1  # shards 0-5 and 5-10 are reused by a larger K; 10-15 is new

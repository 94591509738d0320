"""The training engine (cleanse.models.engine) serves every training loop: the trainer, the batched
ensembles, f-INE's curriculum and FVM's validation fine-tune each train (the objective falls) with
every optimizer they accept, and the ones that cannot run an optimizer refuse it by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleanse import families
from cleanse.config import FineOptions, FvmOptions, ModelConfig
from cleanse.data.dataset import DatasetMeta
from cleanse.ensembles import ensemble_logits, train_ensemble
from cleanse.errors import ConfigError
from cleanse.estimators.base import ScoringContext
from cleanse.estimators.fine import _Curriculum
from cleanse.estimators.influence_fvm import fine_tune_on_validation
from cleanse.models import engine
from cleanse.models.architectures import spec_for
from cleanse.models.trainer import l2_penalty, seeded_model, train_model
from tests.conftest import make_split

LR = {"sgd": 0.05, "adam": 0.01, "lbfgs": 1.0}
TASK = families.get("classification")


@pytest.fixture(scope="module")
def blobs():
    """Three Gaussian classes in 4 dimensions, 90 rows: a problem every optimizer fits quickly."""
    rng = np.random.default_rng(0)
    label = np.repeat(np.arange(3), 30)
    features = (rng.normal(size=(90, 4)) + 2.0 * np.eye(3, 4)[label]).astype(np.float32)
    return features, label.astype(np.int64), spec_for("mlp", [8], (4,), 3)


def _config(optimizer: str) -> ModelConfig:
    return ModelConfig(arch="mlp", hidden=[8], optimizer=optimizer, lr=LR[optimizer], epochs=8, batch_size=16,
                       weight_decay=0.01, checkpoints=1)


def _objective(module: torch.nn.Module, features: np.ndarray, label: np.ndarray, weight_decay: float) -> float:
    with torch.no_grad():
        x, y = torch.as_tensor(features), torch.as_tensor(label)
        return float(TASK.mean_loss(module(x), y) + l2_penalty(list(module.parameters()), weight_decay))


@pytest.mark.parametrize("optimizer", engine.OPTIMIZERS)
def test_trainer_trains_with_every_optimizer(blobs, optimizer):
    features, label, spec = blobs
    config = _config(optimizer)
    start = _objective(seeded_model(spec, 3), features, label, config.weight_decay)
    model = train_model(spec, features, label, config, seed=3, device=torch.device("cpu"))
    assert model.final_train_loss < 0.6 * start
    assert model.history[-1]["train_loss"] < model.history[0]["train_loss"]


@pytest.mark.parametrize("optimizer", engine.OPTIMIZERS)
def test_ensembles_train_with_every_minibatch_optimizer_and_refuse_lbfgs(blobs, optimizer):
    features, label, spec = blobs
    config = _config(optimizer)
    masks = np.ones((2, label.size), dtype=bool)
    masks[1, :10] = False
    if optimizer not in engine.MINIBATCH_OPTIMIZERS:
        with pytest.raises(ConfigError, match=r"model\.optimizer: .*'adam' or 'sgd'.*got 'lbfgs'"):
            train_ensemble(spec, features, label, masks, np.arange(2), config, device=torch.device("cpu"))
        return
    ensemble = train_ensemble(spec, features, label, masks, np.arange(2), config, device=torch.device("cpu"))
    logits = ensemble_logits(ensemble, features)
    for k in range(2):
        start = _objective(seeded_model(spec, k), features[masks[k]], label[masks[k]], 0.0)
        trained = float(TASK.mean_loss(logits[k][masks[k]], torch.as_tensor(label[masks[k]])))
        assert trained < 0.6 * start


@pytest.mark.parametrize("optimizer", engine.OPTIMIZERS)
def test_fine_curriculum_trains_with_every_minibatch_optimizer_and_refuses_lbfgs(blobs, optimizer):
    features, label, spec = blobs
    config = _config(optimizer)
    split = make_split(features, label)
    model = train_model(spec, features, label, config, seed=1, device=torch.device("cpu"))
    context = ScoringContext(train=split, val=split, meta=DatasetMeta("blobs", 3, (4,)), model=model,
                             model_config=config, seed=1)
    x, y = context.tensors(split)

    def statistic(module: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return TASK.per_sample_loss(module(x), y).double().numpy()

    if optimizer not in engine.MINIBATCH_OPTIMIZERS:  # refused before any training, never swapped
        with pytest.raises(ConfigError, match=r"model\.optimizer: f-INE.*'adam' or 'sgd'.*got 'lbfgs'"):
            _Curriculum(context, FineOptions(), np.arange(label.size), label.size)
        return
    curriculum = _Curriculum(context, FineOptions(), np.arange(label.size), label.size)
    signals, inclusions, trained = curriculum.run(statistic, lambda m, p: np.zeros(label.size))
    start = statistic(seeded_model(spec, 1)).mean()
    assert signals.shape == inclusions.shape == (config.epochs * 4, label.size)
    # the signals are the per-round changes of every unit's loss: they add up to the whole fall
    np.testing.assert_allclose(signals.sum(0), statistic(trained) - statistic(seeded_model(spec, 1)), atol=1e-5)
    assert statistic(trained).mean() < 0.6 * start


def test_fvm_fine_tune_lowers_the_validation_objective(blobs):
    features, label, spec = blobs
    config = _config("adam")
    model = train_model(spec, features[:45], label[:45], config, seed=0, device=torch.device("cpu"))
    context = ScoringContext(train=make_split(features[:45], label[:45]), val=make_split(features[45:], label[45:]),
                             meta=DatasetMeta("blobs", 3, (4,)), model=model, model_config=config, seed=0)
    fm = context.functional(model.module())
    xv, yv = context.tensors(context.val)
    theta = fine_tune_on_validation(fm, xv, yv, FvmOptions(steps=30, lr=0.01), seed=0)
    with torch.no_grad():
        assert float(fm.objective(theta, xv, yv)) < float(fm.objective(fm.theta, xv, yv)) - 0.01


def test_unknown_optimizer_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"model\.optimizer must be one of adam, sgd, lbfgs, got 'rmsprop'"):
        engine.build_optimizer([torch.zeros(2, requires_grad=True)], "rmsprop", 0.1)

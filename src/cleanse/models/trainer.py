"""One trainer for every model: seeded, bit-for-bit repeatable on the CPU, with checkpoints.

Objective (the one influence functions differentiate): the mean loss of the model's family
(cross-entropy for classification, squared error for regression; :mod:`cleanse.families`) over
the training set plus ``weight_decay / 2 * ||theta||^2`` over all parameters. The penalty is part of the loss,
not a decoupled optimizer step, so the Hessian used by :mod:`cleanse.estimators.influence` is the
Hessian of exactly what was minimised.

Checkpoints are taken at ``model.checkpoints`` evenly (or geometrically) spaced epochs (the last
one is the final model), each with the learning rate in effect, for TracInCP (Pruthi et al., 2020).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cleanse import families
from cleanse.config import ModelConfig
from cleanse.errors import TrainingDivergedError
from cleanse.models import engine
from cleanse.models.architectures import INIT_LOCK, ModelSpec, build_model, default_device
from cleanse.progress import Progress

State = dict[str, torch.Tensor]


@dataclass
class Checkpoint:
    epoch: int
    lr: float
    state: State


@dataclass
class TrainedModel:
    spec: ModelSpec
    state: State
    checkpoints: list[Checkpoint] = field(default_factory=list)
    final_train_loss: float = float("nan")
    # One record per epoch, {"epoch", "train_loss"}: the mean minibatch objective (the closure's
    # for L-BFGS), for training curves (MLflow logs it with step = epoch).
    history: list[dict[str, float]] = field(default_factory=list)

    def module(self, device: torch.device | None = None) -> nn.Module:
        model = build_model(self.spec)
        model.load_state_dict(self.state)
        return model.to(device or torch.device("cpu")).eval()


def checkpoint_epochs(epochs: int, count: int, spacing: str = "even") -> list[int]:
    """Up to ``count`` distinct epochs in ``1..epochs``, always ending with ``epochs``.

    ``even``: ``epochs * k / count``. ``geometric``: ``epochs ** (k / (count - 1))`` for
    ``k = 0..count-1``, i.e. 1, ..., ``epochs`` with a constant ratio, filled up to ``count`` with
    the smallest unused epochs where rounding collides. TracInCP (Pruthi et al. 2020) approximates
    the sum over all steps by its checkpoints; a sample's contribution is concentrated in the epochs
    before the model fits it, which for easily fit samples (backdoor poisons) are the first few,
    where evenly spaced checkpoints of a long run never look.
    """
    count = min(count, epochs)
    if spacing == "even":
        return sorted({int(round(epochs * (k + 1) / count)) for k in range(count)})
    if spacing != "geometric":
        raise ValueError(f"unknown checkpoint spacing {spacing!r}; allowed: even, geometric")
    chosen = {int(round(epochs ** (k / (count - 1)))) for k in range(count)} if count > 1 else {epochs}
    fill = (e for e in range(1, epochs + 1) if e not in chosen)
    while len(chosen) < count:
        chosen.add(next(fill))
    return sorted(chosen)


def l2_penalty(parameters: Mapping[str, torch.Tensor] | Iterable[torch.Tensor], weight_decay: float) -> torch.Tensor:
    """``weight_decay / 2 * sum_p ||p||^2``, a 0-dim tensor (zero for no parameters)."""
    values = parameters.values() if isinstance(parameters, Mapping) else parameters
    squares = [(p * p).sum() for p in values]
    if not squares:
        return torch.zeros(())
    # left to right, as the objective has always been summed (the golden outputs depend on it)
    return 0.5 * weight_decay * functools.reduce(operator.add, squares)


def seeded_model(spec: ModelSpec, seed: int) -> nn.Module:
    """``build_model(spec)`` initialised from ``seed`` (the initialisation every trainer uses)."""
    # fork_rng saves and restores the process-wide generator, and INIT_LOCK (also held by every
    # build_model) keeps concurrent threads from drawing from it between the seeding and the
    # initialisation. Only the CPU generator initialises parameters; torch.manual_seed would also
    # queue a lazy CUDA/XPU/MTIA seeding with a captured stack per call, which dominates for many
    # small models.
    with INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build_model(spec)


def train_model(
    spec: ModelSpec,
    features: np.ndarray,
    label: np.ndarray,
    config: ModelConfig,
    *,
    seed: int,
    device: torch.device | None = None,
    init_state: State | None = None,
) -> TrainedModel:
    """Train ``spec`` on ``features`` ``(n, *feature_shape)`` and targets ``(n,)`` (class indices, or
    floats for regression) under the loss of ``spec.family``.

    The same ``seed`` gives the same initialisation and minibatch order; with fewer samples (a
    retrain after removal) the order is drawn from the same generator. ``init_state`` warm-starts
    (used by leave-one-out retraining).
    """
    device = device or default_device()
    model = seeded_model(spec, seed)
    if init_state is not None:
        model.load_state_dict(init_state)
    model = model.to(device)
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    task = families.get(spec.family)
    y = torch.as_tensor(label, dtype=task.target_dtype, device=device)
    n = x.shape[0]
    params = list(model.parameters())
    save_at = set(checkpoint_epochs(config.epochs, config.checkpoints, config.checkpoint_spacing))
    checkpoints: list[Checkpoint] = []
    history: list[dict[str, float]] = []
    reporter = Progress(f"train {spec.arch} on {n}", config.epochs, unit="epoch")

    def objective(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return task.mean_loss(model(xb), yb) + l2_penalty(params, config.weight_decay)

    optimizer = engine.build_optimizer(params, config.optimizer, config.lr)
    # L-BFGS: one full-batch step (up to 50 line-searched iterations) per epoch, in the data's
    # order; the others: one shuffled pass of minibatches per epoch.
    order_rng = torch.Generator().manual_seed(seed)
    if config.optimizer != "lbfgs":
        model.train()
    for epoch in range(1, config.epochs + 1):
        if config.optimizer == "lbfgs":
            loss = float(engine.step(optimizer, lambda: objective(x, y)))
        else:
            order = torch.randperm(n, generator=order_rng).to(device)
            # summed on the device: one sync per epoch
            total = engine.run_epoch(optimizer, lambda batch: objective(x[batch], y[batch]),
                                     engine.minibatches(order, config.batch_size), torch.zeros((), device=device))
            loss = float(total) / max(n, 1)
        history.append({"epoch": epoch, "train_loss": loss})
        reporter.update(loss=loss)
        # One check per epoch (the sum is already synchronised for the history): a non-finite
        # minibatch loss makes the sum non-finite, and every later step would only spread NaN.
        _stop_if_diverged(loss, epoch, config)
        if epoch in save_at:
            checkpoints.append(Checkpoint(epoch, config.lr, _snapshot(model)))
    reporter.close()
    model.eval()
    with torch.no_grad():
        final_loss = float(objective(x, y))
    _stop_if_diverged(final_loss, config.epochs, config)
    return TrainedModel(spec=spec, state=_snapshot(model), checkpoints=checkpoints, final_train_loss=final_loss,
                        history=history)


def _stop_if_diverged(loss: float, epoch: int, config: ModelConfig) -> None:
    if not np.isfinite(loss):
        raise TrainingDivergedError(
            f"training diverged: the training loss became {loss} in epoch {epoch} (model.optimizer="
            f"{config.optimizer}, model.lr={config.lr:g}, model.weight_decay={config.weight_decay:g}); lower "
            "model.lr or model.weight_decay"
        )


def _snapshot(model: nn.Module) -> State:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


@torch.no_grad()
def predict_proba(model: TrainedModel | nn.Module, features: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    """Softmax probabilities, shape ``(n, n_classes)``, float64."""
    module = model.module() if isinstance(model, TrainedModel) else model
    device = next(module.parameters()).device
    out = []
    for start in range(0, features.shape[0], batch_size):
        xb = torch.as_tensor(features[start : start + batch_size], dtype=torch.float32, device=device)
        out.append(torch.softmax(module(xb), dim=1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))

"""The training engine: how every training loop of cleanse builds its optimizer and takes a step.

The trainer (:mod:`cleanse.models.trainer`), f-INE's randomised curriculum
(:mod:`cleanse.estimators.fine`) and FVM's validation fine-tune
(:mod:`cleanse.estimators.influence_fvm`) build their optimizer with :func:`build_optimizer` and
step it with :func:`step` (or :func:`run_epoch` over minibatches); the batched ensembles
(:mod:`cleanse.ensembles`) update stacked parameters of K models at once and reproduce these
updates with :data:`ADAM_BETAS`, :data:`ADAM_EPS` and :data:`SGD_MOMENTUM` (L-BFGS has no batched
form: its line search is per model, so they refuse it with :func:`require_minibatch`).

Optimizers (``model.optimizer``): ``adam`` (torch's defaults), ``sgd`` (momentum 0.9), ``lbfgs``
(strong-Wolfe line search, up to 50 inner iterations per step; a step re-evaluates the objective,
so it takes a closure). A step minimises whatever the objective closure returns: the callers pass
the family's mean loss plus the L2 penalty, the objective influence functions differentiate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch

from cleanse.errors import ConfigError

OPTIMIZERS = ("adam", "sgd", "lbfgs")
MINIBATCH_OPTIMIZERS = ("adam", "sgd")
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS = 1e-8
SGD_MOMENTUM = 0.9


def build_optimizer(params: Sequence[torch.Tensor], kind: str, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``kind`` (one of :data:`OPTIMIZERS`) over ``params`` at learning rate ``lr``."""
    if kind == "lbfgs":
        return torch.optim.LBFGS(params, lr=lr, max_iter=50, tolerance_grad=1e-9, tolerance_change=1e-12,
                                 history_size=20, line_search_fn="strong_wolfe")
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    raise ConfigError(f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")


def require_minibatch(kind: str, who: str) -> None:
    """Refuse ``kind`` unless it is a minibatch optimizer (:data:`MINIBATCH_OPTIMIZERS`)."""
    if kind not in MINIBATCH_OPTIMIZERS:
        raise ConfigError(f"model.optimizer: {who} need a minibatch optimizer "
                          f"({' or '.join(repr(k) for k in MINIBATCH_OPTIMIZERS)}), got {kind!r}")


def step(optimizer: torch.optim.Optimizer, objective: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One optimizer step on ``objective()`` (a scalar); returns its value before the step, detached.

    L-BFGS evaluates the objective as often as its line search needs (a closure); the others once."""
    if isinstance(optimizer, torch.optim.LBFGS):
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        return optimizer.step(closure).detach()
    optimizer.zero_grad()
    loss = objective()
    loss.backward()
    optimizer.step()
    return loss.detach()


def run_epoch(optimizer: torch.optim.Optimizer, objective: Callable[[torch.Tensor], torch.Tensor],
              batches: Iterable[torch.Tensor], total: torch.Tensor | None = None) -> torch.Tensor:
    """One pass: a :func:`step` on ``objective(batch)`` for every row-index batch ``(b,)`` in order.

    Returns the batch-size-weighted sum of the losses before each step, accumulated on the device
    into ``total`` (one synchronisation per epoch when the caller reads it)."""
    for batch in batches:
        loss = step(optimizer, partial(objective, batch))
        total = loss * batch.numel() if total is None else total.add_(loss * batch.numel())
    return total if total is not None else torch.zeros(())


def minibatches(order: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    """``order`` ``(n,)`` cut into consecutive batches of ``batch_size`` (the last may be shorter)."""
    return (order[start : start + batch_size] for start in range(0, order.numel(), batch_size))


class StackedOptimizer:
    """Adam / SGD(momentum) on stacked parameters ``{name: (K, ...)}`` of K models with a per-model
    step count, matching ``torch.optim.Adam`` and ``torch.optim.SGD(momentum=0.9)`` (as
    :func:`build_optimizer` builds them) update for update, for the batched ensembles."""

    def __init__(self, params: dict[str, torch.Tensor], kind: str, lr: float):
        require_minibatch(kind, "stacked models")
        self.kind, self.lr = kind, lr
        self.first = {name: torch.zeros_like(p) for name, p in params.items()}
        self.second = {name: torch.zeros_like(p) for name, p in params.items()} if self.kind == "adam" else {}
        k = next(iter(params.values())).shape[0]
        self.steps = torch.zeros(k, dtype=torch.float64, device=next(iter(params.values())).device)

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
             active: torch.Tensor | None) -> None:
        """``active`` ``(K,)`` bool: models that take this step (``None`` = all)."""
        self.steps += 1 if active is None else active.to(self.steps.dtype)
        for name, p in params.items():
            g = grads[name]
            shape = (-1,) + (1,) * (p.ndim - 1)
            if self.kind == "adam":
                beta1, beta2 = ADAM_BETAS
                m = self.first[name].lerp(g, 1 - beta1)
                v = self.second[name] * beta2 + (1 - beta2) * g * g
                t = self.steps.clamp(min=1)
                step_size = (self.lr / (1 - beta1**t)).to(p.dtype).view(shape)
                bias2_sqrt = (1 - beta2**t).sqrt().to(p.dtype).view(shape)
                new = p - step_size * m / (v.sqrt() / bias2_sqrt + ADAM_EPS)
                self._commit(self.second, name, v, active, shape)
            else:
                m = self.first[name] * SGD_MOMENTUM + g
                new = p - self.lr * m
            self._commit(self.first, name, m, active, shape)
            if active is None:
                p.copy_(new)
            else:
                p.copy_(torch.where(active.view(shape), new, p))

    @staticmethod
    def _commit(store: dict[str, torch.Tensor], name: str, value: torch.Tensor, active: torch.Tensor | None,
                shape: tuple[int, ...]) -> None:
        store[name] = value if active is None else torch.where(active.view(shape), value, store[name])

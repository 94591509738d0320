"""The one GAN training step: losses, optimizer updates and the (D, G) update, shared by training,
replay, retraining from scratch and the influence estimators' backward passes (so they can never
disagree).

Losses (non-saturating, the ICLR 2021 code's ``modified_minmax``; spec §2.2): for a real batch
``x`` (B, *data_shape) with per-instance mask ``m`` (B,), latents ``z_d`` and ``z_g`` (B, z_dim):

    L_D = [sum_i m_i softplus(-D(x_i)) + sum_k softplus(D(G(z_d,k)))] / B
    L_G = mean_k softplus(-D(G(z_g,k)))

The divisor stays B when a real instance is masked out (spec §2.8, as SGD-influence's
counterfactual SGD). Weight decay is coupled L2: ``weight_decay * theta`` is added to each gradient.

Updates: ``simultaneous`` computes both gradients at (theta_D, theta_G) and applies both;
``alternating`` updates D first, then G's gradient is taken at (theta_D', theta_G).

Optimizers are pure functions ``(params, grads, state, lr) -> (params', state')`` written out here
(not torch.optim), so the influence pass can differentiate the increment ``params' - params``:
- ``sgd``: ``b' = momentum * b + g`` (``b`` absent when momentum is 0), ``theta' = theta - lr * b'``;
- ``adam``: ``m' = b1 m + (1-b1) g``, ``v' = b2 v + (1-b2) g^2``, bias corrections by the step count
  ``t``, ``theta' = theta - lr * m_hat / (sqrt(v_hat) + 1e-8)``.

Optimizer state is a flat dict: ``"D.step"``, ``"D.exp_avg.<param>"``, ``"D.exp_avg_sq.<param>"``,
``"D.momentum.<param>"`` and the same under ``"G."``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from cleanse.errors import ConfigError
from cleanse.families.gan.nets import GanSpec, build_discriminator, build_generator

Params = dict[str, Tensor]
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class GanRecipe:
    """How the GAN is trained (defaults: the ICLR 2021 2-D config at CPU size, spec §2.7)."""

    epochs: int = 30
    batch_size: int = 100
    lr_d: float = 1e-3
    lr_g: float = 1e-3
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.0
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    updates: Literal["simultaneous", "alternating"] = "simultaneous"
    trace_epochs: int = 1

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"GAN optimizer {self.optimizer!r} is not 'sgd' or 'adam'")
        if self.updates not in ("simultaneous", "alternating"):
            raise ConfigError(f"GAN updates {self.updates!r} is not 'simultaneous' or 'alternating'")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"GAN epochs and batch_size must be positive (got {self.epochs}, {self.batch_size})")
        if not 1 <= self.trace_epochs <= self.epochs:
            raise ConfigError(f"GAN trace_epochs must be in 1..epochs={self.epochs}, got {self.trace_epochs}")
        if self.lr_d <= 0 or self.lr_g <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("GAN lr_d and lr_g must be > 0, weight_decay >= 0 and momentum in [0, 1)")

    def to_json(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr_d": self.lr_d, "lr_g": self.lr_g,
                "optimizer": self.optimizer, "momentum": self.momentum, "betas": list(self.betas),
                "weight_decay": self.weight_decay, "updates": self.updates, "trace_epochs": self.trace_epochs}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GanRecipe:
        return cls(**{**data, "betas": tuple(data["betas"])})


@dataclass
class GanNets:
    """The two module skeletons whose parameters the functional step swaps in."""

    spec: GanSpec
    generator: nn.Module = field(init=False)
    discriminator: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.generator = build_generator(self.spec)
        self.discriminator = build_discriminator(self.spec)

    def G(self, g: Params, z: Tensor) -> Tensor:  # noqa: N802 (the paper's name)
        return functional_call(self.generator, g, (z,))

    def D(self, d: Params, x: Tensor) -> Tensor:  # noqa: N802
        return functional_call(self.discriminator, d, (x,))


def d_loss(nets: GanNets, g: Params, d: Params, real: Tensor, mask: Tensor, z_d: Tensor) -> Tensor:
    """L_D with real terms weighted by ``mask`` (B,); divisor = the number of latents (the batch size)."""
    real_terms = F.softplus(-nets.D(d, real))
    fake_terms = F.softplus(nets.D(d, nets.G(g, z_d)))
    return ((mask * real_terms).sum() + fake_terms.sum()) / z_d.shape[0]


def g_loss(nets: GanNets, g: Params, d: Params, z_g: Tensor) -> Tensor:
    """Non-saturating L_G = mean softplus(-D(G(z)))."""
    return F.softplus(-nets.D(d, nets.G(g, z_g))).mean()


def initial_state(recipe: GanRecipe, g: Params, d: Params) -> Params:
    """The optimizer state before the first step (zero buffers, step count 0)."""
    state: Params = {}
    for prefix, params in (("D", d), ("G", g)):
        if recipe.optimizer == "adam":
            state[f"{prefix}.step"] = torch.zeros((), dtype=torch.float64)
            for name, p in params.items():
                state[f"{prefix}.exp_avg.{name}"] = torch.zeros_like(p)
                state[f"{prefix}.exp_avg_sq.{name}"] = torch.zeros_like(p)
        elif recipe.momentum > 0:
            for name, p in params.items():
                state[f"{prefix}.momentum.{name}"] = torch.zeros_like(p)
    return state


def _sgd(params: Params, grads: Params, state: Params, lr: float, prefix: str,
         momentum: float) -> tuple[Params, Params]:
    new_params, new_state = {}, {}
    for name, p in params.items():
        direction = grads[name]
        if momentum > 0:
            direction = momentum * state[f"{prefix}.momentum.{name}"] + direction
            new_state[f"{prefix}.momentum.{name}"] = direction
        new_params[name] = p - lr * direction
    return new_params, new_state


def _adam(params: Params, grads: Params, state: Params, lr: float, prefix: str,
          betas: tuple[float, float]) -> tuple[Params, Params]:
    beta1, beta2 = betas
    count = state[f"{prefix}.step"] + 1
    t = float(count.item())
    correction1, correction2 = 1.0 - beta1**t, 1.0 - beta2**t
    new_params, new_state = {}, {f"{prefix}.step": count}
    for name, p in params.items():
        grad = grads[name]
        m = beta1 * state[f"{prefix}.exp_avg.{name}"] + (1.0 - beta1) * grad
        v = beta2 * state[f"{prefix}.exp_avg_sq.{name}"] + (1.0 - beta2) * grad * grad
        # clamp_min keeps sqrt's derivative finite where v is exactly 0 (a dead unit); it moves the
        # value by sqrt(tiny) ~ 1e-154 (float64) / 1e-19 (float32), far below eps.
        denom = torch.sqrt(v.clamp_min(torch.finfo(v.dtype).tiny) / correction2) + ADAM_EPS
        new_params[name] = p - lr * (m / correction1) / denom
        new_state[f"{prefix}.exp_avg.{name}"], new_state[f"{prefix}.exp_avg_sq.{name}"] = m, v
    return new_params, new_state


def optimizer_update(recipe: GanRecipe, params: Params, grads: Params, state: Params, lr: float,
                     prefix: str) -> tuple[Params, Params]:
    """One optimizer update of the net ``prefix`` ("D" or "G"): (params', its part of state')."""
    if recipe.optimizer == "adam":
        return _adam(params, grads, state, lr, prefix, recipe.betas)
    return _sgd(params, grads, state, lr, prefix, recipe.momentum)


def _gradient(loss: Tensor, params: Params, weight_decay: float, create_graph: bool) -> Params:
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
    return {n: grad + weight_decay * params[n] if weight_decay else grad for n, grad in zip(names, grads, strict=True)}


def _leaves(params: Params) -> Params:
    return {name: p.detach().requires_grad_(True) for name, p in params.items()}


def _detached(params: Params) -> Params:
    return {name: p.detach() for name, p in params.items()}


@dataclass
class StepOut:
    g: Params
    d: Params
    state: Params
    d_loss: Tensor
    g_loss: Tensor


def gan_step(nets: GanNets, recipe: GanRecipe, g: Params, d: Params, state: Params, real: Tensor, mask: Tensor,
             z_d: Tensor, z_g: Tensor, lr_d: float, lr_g: float, *, create_graph: bool = False) -> StepOut:
    """One training step from (g, d, state) on the real batch ``real`` (B, ...) with mask (B,).

    ``create_graph=False`` (training, replay): the outputs are detached; ``True`` (the influence
    passes): the caller passes leaves that require grad (params, mask, optionally the state) and
    the outputs keep the graph through both gradients, so a vector-Jacobian product of the new
    parameters gives the step's transposed Jacobian (spec §2.3, §2.4 item 2).
    """
    if not create_graph:
        g, d, state, mask = _leaves(g), _leaves(d), _detached(state), mask.detach()
    wd = recipe.weight_decay
    loss_d = d_loss(nets, g if create_graph else _detached(g), d, real, mask, z_d)
    grad_d = _gradient(loss_d, d, wd, create_graph)
    with torch.set_grad_enabled(create_graph):
        d_new, state_d = optimizer_update(recipe, d if create_graph else _detached(d), grad_d, state, lr_d, "D")
    d_for_g = d if recipe.updates == "simultaneous" else d_new
    if not create_graph:
        d_for_g = _detached(d_for_g)
    # L_G's gradient is the partial derivative at fixed theta_D'. With alternating updates theta_D'
    # depends on theta_G (through D's fake batch), so a fresh alias of g is the input: the gradient
    # w.r.t. the alias excludes the path through theta_D', while its graph still reaches g and d'.
    g_in = {name: p.view_as(p) for name, p in g.items()} if create_graph else g
    loss_g = g_loss(nets, g_in, d_for_g, z_g)
    grad_g = _gradient(loss_g, g_in, wd, create_graph)
    with torch.set_grad_enabled(create_graph):
        g_new, state_g = optimizer_update(recipe, g if create_graph else _detached(g), grad_g, state, lr_g, "G")
    new_state = {**state_d, **state_g}
    if not create_graph:
        return StepOut(_detached(g_new), _detached(d_new), _detached(new_state), loss_d.detach(), loss_g.detach())
    return StepOut(g_new, d_new, new_state, loss_d, loss_g)

"""Influence functions at (flat) validation minima: VM and FVM (Ye, Wu, Zhang, Jin & Chen, ICML 2025).

Standard influence functions break on noisy training data because the validation risk at the
trained parameters is sharp (the paper's Theorem 3.2 bounds the sign error by the SAM-style
worst-case validation risk). The fix: move to a (flat) minimum ``theta~`` of the *validation*
risk and measure each training gradient in the geometry of the validation curvature,

    s_i = g~_i^T (H~_val + lambda I)^-1 g~_i,   g~_i = grad l(z_i; theta~),  H~_val = curvature of R_val at theta~,

(the second-order change of the validation risk under the Newton step the sample induces; the
constant epsilon^2/2 is dropped). ``s_i >= 0``; **higher = more harmful** (a gradient that the
clean-validation solution cannot explain).

1. Start from the trained model ``theta*`` (fit on the noisy training set).
2. Fine-tune a copy on the validation set only, full batch with Adam: plain ERM for ``vm``;
   sharpness-aware for ``fvm``, either SAM (Foret et al., 2021: the gradient at
   ``theta + rho g/||g||``) or LPF-SGD with one Monte-Carlo sample (Bisla et al., 2022: the gradient
   at ``theta + eps``, ``eps ~ N(0, (sigma * rms(tensor))^2)`` per tensor), which the paper uses.
   The objective keeps the trainer's L2 term.
3. ``H~_val``: the Gauss-Newton matrix of the validation objective at ``theta~`` (positive
   semi-definite), inverted exactly for small models and by EK-FAC otherwise. The validation set is
   small (``n_val << p``), so damping is mandatory (default 1e-2).
4. Score every training sample.

The validation set must be clean; the metadata records the validation accuracy before and after
the fine-tune (the paper shows influence quality tracks it).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import ClassVar

import numpy as np
import torch
from torch.func import grad

from cleanse.config import FvmOptions, InfluenceOptions
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table
from cleanse.estimators.influence import InverseHessian
from cleanse.grads import FunctionalModel
from cleanse.models import engine


def _perturbation(fm: FunctionalModel, theta: torch.Tensor, gradient: torch.Tensor, options: FvmOptions,
                  generator: torch.Generator) -> torch.Tensor:
    if options.variant == "vm":
        return torch.zeros_like(theta)
    if options.sharpness == "sam":
        return options.rho * gradient / gradient.norm().clamp_min(1e-12)
    pieces, offset = [], 0
    for shape in fm.shapes:
        size = math.prod(shape)
        block = theta[offset : offset + size]
        rms = block.norm() / math.sqrt(size)
        noise = torch.randn(size, generator=generator, dtype=theta.dtype).to(theta.device)
        pieces.append(options.sigma * rms * noise)
        offset += size
    return torch.cat(pieces)


def fine_tune_on_validation(fm: FunctionalModel, xv: torch.Tensor, yv: torch.Tensor, options: FvmOptions,
                            seed: int) -> torch.Tensor:
    """``theta~``: ``options.steps`` full-batch Adam steps on the validation objective from ``fm.theta``."""
    theta = torch.nn.Parameter(fm.theta.detach().clone())
    optimizer = engine.build_optimizer([theta], "adam", options.lr)
    objective_grad = grad(lambda t: fm.objective(t, xv, yv))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(options.steps):
        current = theta.detach()
        gradient = objective_grad(current)
        epsilon = _perturbation(fm, current, gradient, options, generator)
        theta.grad = objective_grad(current + epsilon) if epsilon.abs().sum() > 0 else gradient
        optimizer.step()
    return theta.detach()


@torch.no_grad()
def _accuracy_and_loss(fm: FunctionalModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = fm.logits(theta, x)
    return float((logits.argmax(1) == y).double().mean()), float(fm.task.mean_loss(logits, y))


def validation_minimum_scores(context: ScoringContext, options: FvmOptions) -> tuple[np.ndarray, dict]:
    fm = context.functional(context.model.module(context.device))
    x, y = context.tensors(context.train)
    xv, yv = context.tensors(context.val)
    before = _accuracy_and_loss(fm, fm.theta, xv, yv)
    theta = fine_tune_on_validation(fm, xv, yv, options, context.seed)
    tilde = replace(fm, theta=theta)
    after = _accuracy_and_loss(tilde, theta, xv, yv)
    solver = options.solver
    if solver == "auto":
        solver = "exact" if fm.n_params <= options.exact_max_params else "ekfac"
    inverse = InverseHessian(tilde, xv, yv, InfluenceOptions(solver=solver, damping=options.damping,
                                                              exact_max_params=options.exact_max_params), context.seed)
    score, _ = inverse.quadratic_forms(x, y, 512 if inverse.exact is not None else 256)
    meta = {
        "variant": options.variant,
        "sharpness": options.sharpness if options.variant == "fvm" else None,
        "val_accuracy_before": before[0], "val_loss_before": before[1],
        "val_accuracy_after": after[0], "val_loss_after": after[1],
        **inverse.summary(),
    }
    return score, meta


class FlatValidationInfluenceEstimator:
    name: ClassVar[str] = "influence_fvm"
    reads_validation_labels: ClassVar[bool] = True
    options_type: ClassVar[type] = FvmOptions
    families: ClassVar[tuple[str, ...]] = ("classification",)

    def score(self, context: ScoringContext, options: FvmOptions) -> ScoreResult:
        score, meta = validation_minimum_scores(context, options)
        return ScoreResult(score_table(context.train.sample_id, score, fvm_influence=score), meta)

"""Influence functions (Koh & Liang, ICML 2017) with exact, CG and LiSSA inverse-HVP solvers.

Let ``H`` be the Hessian of the training objective (mean loss + L2 penalty) at the trained
parameters and ``g_i`` the loss gradient of training sample ``i``. Removing sample ``i`` changes
the loss on a point ``q`` by approximately

    delta_i(q) = (1/n) * grad L(q)^T (H + lambda I)^-1 g_i        (the removal effect)

so ``delta_i(q) > 0`` means ``i`` *helps* ``q`` (removing it raises ``q``'s loss).

- ``influence``: self-influence ``g_i^T (H + lambda I)^-1 g_i`` (>= 0), the classic mislabel
  detector (Koh & Liang §5.4): samples the model must bend to fit have large self-influence.
- ``influence_val``: the predicted change of the mean validation loss when ``i`` is removed,
  ``delta_i(val)``; ``score = -delta_i(val)``, so a sample whose removal *lowers* the validation
  loss (harmful) scores high.

Solver (``scorers.<name>.solver``): ``exact`` eigendecomposes ``H`` (small models); ``cg`` and
``lissa`` only use Hessian-vector products from ``torch.func``. ``auto`` takes ``exact`` when the
model has at most ``exact_max_params`` parameters, else ``cg``. LiSSA's repeats give a standard
error (``score_se``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import ClassVar

import numpy as np
import torch

from cleanse.config import InfluenceOptions
from cleanse.data.dataset import Split
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table
from cleanse.grads import (
    ExactInverse,
    FunctionalModel,
    SolverReport,
    cg_solve,
    exact_hessian,
    exact_inverse,
    grad_dots,
    hvp_fn,
    lissa_solve,
    mean_grad,
    per_sample_grads,
)


class InverseHessian:
    """``(H + damping I)^-1`` applied to blocks, by the configured solver."""

    def __init__(self, fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, options: InfluenceOptions, seed: int):
        self.fm, self.x, self.y, self.options, self.seed = fm, x, y, options, seed
        solver = options.solver
        if solver == "auto":
            solver = "exact" if fm.n_params <= options.exact_max_params else "cg"
        self.solver = solver
        self.exact: ExactInverse | None = None
        self.reports: list[SolverReport] = []
        if solver == "exact":
            self.exact = exact_inverse(exact_hessian(fm, x, y), options.damping)
            self.reports.append(self.exact.report)

    def solve(self, block: torch.Tensor) -> torch.Tensor:
        """Solve for ``block`` ``(p, k)``; returns ``(repeats, p, k)`` (``repeats = 1`` unless LiSSA)."""
        options = self.options
        if self.exact is not None:
            return self.exact.solve(block)[None]
        if self.solver == "cg":
            solution, report = cg_solve(
                hvp_fn(self.fm, self.x, self.y), block, damping=options.damping,
                max_iter=options.cg_max_iter, tol=options.cg_tol,
            )
            self.reports.append(report)
            return solution[None]
        estimates, report = lissa_solve(
            self.fm, self.x, self.y, block, damping=options.damping, depth=options.lissa_depth,
            repeats=options.lissa_repeats, scale=options.lissa_scale, batch_size=options.lissa_batch_size,
            seed=self.seed,
        )
        self.reports.append(report)
        return estimates

    def summary(self) -> dict:
        return {
            "solver": self.solver,
            "n_params": self.fm.n_params,
            "converged": all(report.converged for report in self.reports),
            "reports": [asdict(report) for report in self.reports[:5]],
        }


def _mean_and_se(per_repeat: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """Reduce ``(repeats, n)`` to the mean and its standard error (``None`` for one repeat)."""
    values = per_repeat.double().cpu()
    if values.shape[0] == 1:
        return values[0].numpy(), None
    return values.mean(0).numpy(), (values.std(0, unbiased=True) / np.sqrt(values.shape[0])).numpy()


def _setup(context: ScoringContext, options: InfluenceOptions) -> tuple[FunctionalModel, torch.Tensor, torch.Tensor, InverseHessian]:
    fm = FunctionalModel.of(context.model.module(context.device), context.model_config.weight_decay)
    x, y = context.tensors(context.train)
    return fm, x, y, InverseHessian(fm, x, y, options, context.seed)


def removal_effects(context: ScoringContext, options: InfluenceOptions, query: Split) -> tuple[np.ndarray, InverseHessian]:
    """``delta_i(q)`` for every query ``q`` and training sample ``i``: shape ``(n_query, n_train)``.

    Positive = removing training sample ``i`` is predicted to raise query ``q``'s loss (``i``
    supports ``q``'s label).
    """
    fm, x, y, inverse = _setup(context, options)
    xq, yq = context.tensors(query)
    return train_query_effects(fm, x, y, xq, yq, lambda block: inverse.solve(block).mean(0)), inverse


def train_query_effects(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor,
                        inverse_hvp: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """``delta_i(q) = (1/n) g_q^T (H + lambda I)^-1 g_i`` for any inverse-HVP solver.

    ``inverse_hvp`` maps a block ``(p, k)`` to ``(H + lambda I)^-1`` applied to it, ``(p, k)``
    (exact, CG, LiSSA, EK-FAC, ...). Returns ``(n_query, n_train)``, float64; positive = training
    sample ``i`` supports query ``q``'s label. One solve for all queries, then one forward-mode
    product over the training set per query (no per-sample training gradients are materialised).
    """
    query_grads = per_sample_grads(fm, xq, yq)  # (n_query, p)
    solved = inverse_hvp(query_grads.T)  # (p, n_query)
    n = x.shape[0]
    rows = [grad_dots(fm, x, y, solved[:, q].to(fm.theta.dtype)) / n for q in range(solved.shape[1])]
    return torch.stack(rows).double().cpu().numpy()


class SelfInfluenceEstimator:
    name: ClassVar[str] = "influence"
    options_type: ClassVar[type] = InfluenceOptions

    def score(self, context: ScoringContext, options: InfluenceOptions) -> ScoreResult:
        fm, x, y, inverse = _setup(context, options)
        chunk = 512 if inverse.exact is not None else 64
        values, errors = [], []
        for start in range(0, x.shape[0], chunk):
            grads = per_sample_grads(fm, x[start : start + chunk], y[start : start + chunk])  # (k, p)
            if inverse.exact is not None:
                per_repeat = inverse.exact.quadratic_form(grads)[None]
            else:
                solved = inverse.solve(grads.T)  # (repeats, p, k)
                per_repeat = torch.einsum("kp,rpk->rk", grads.double(), solved.double())
            mean, se = _mean_and_se(per_repeat)
            values.append(mean)
            errors.append(se)
        score = np.concatenate(values)
        columns = {"self_influence": score}
        if errors[0] is not None:
            columns["score_se"] = np.concatenate(errors)
        return ScoreResult(score_table(context.train.sample_id, score, **columns), inverse.summary())

    def pairwise(self, context: ScoringContext, options: InfluenceOptions, query: Split) -> np.ndarray:
        return removal_effects(context, options, query)[0]


class ValidationInfluenceEstimator:
    name: ClassVar[str] = "influence_val"
    options_type: ClassVar[type] = InfluenceOptions

    def score(self, context: ScoringContext, options: InfluenceOptions) -> ScoreResult:
        fm, x, y, inverse = _setup(context, options)
        xv, yv = context.tensors(context.val)
        solved = inverse.solve(mean_grad(fm, xv, yv)[:, None])  # (repeats, p, 1)
        n = x.shape[0]
        per_repeat = torch.stack([grad_dots(fm, x, y, solved[r, :, 0].to(fm.theta.dtype)) / n for r in range(solved.shape[0])])
        delta, se = _mean_and_se(per_repeat)
        columns = {"delta_val_loss": delta}
        if se is not None:
            columns["score_se"] = se
        return ScoreResult(score_table(context.train.sample_id, -delta, **columns), inverse.summary())

    def pairwise(self, context: ScoringContext, options: InfluenceOptions, query: Split) -> np.ndarray:
        return removal_effects(context, options, query)[0]

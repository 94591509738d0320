"""Influence functions (Koh & Liang, ICML 2017) with exact, CG, LiSSA and EK-FAC inverse-HVP solvers.

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
``lissa`` only use curvature-vector products from ``torch.func``; ``ekfac`` uses the
eigenvalue-corrected Kronecker factorisation of :mod:`cleanse.ekfac` (George et al., 2018; Grosse
et al., 2023). ``auto`` takes ``exact`` when the model has at most ``exact_max_params``
parameters; above that, ``ekfac`` for self-influence (one quadratic form per training sample, all
from one factorisation) and ``cg`` for the few right-hand sides of validation and query influence. LiSSA's repeats give a standard error (``score_se``).

Curvature (``curvature``): ``ggn`` (default) is the generalised Gauss-Newton matrix, which equals
the Hessian for logistic regression and is positive semi-definite for every network, so CG never
meets negative curvature and the exact solve needs no damping raise on non-convex MLPs (where the
Hessian is indefinite; Martens 2010, Bae et al. 2022 use it for the same reason). ``hessian`` is
the true Hessian. CG is preconditioned by EK-FAC by default (``cg_preconditioner``), which cuts
the iterations on the ill-conditioned curvature of MLPs from hundreds to about ten.

Damping defaults (added on top of the objective's L2 term): 1e-3 for every solver. A solver that
did not converge (CG above ``cg_tol``, LiSSA diverging) warns and records it in the metadata.

Documented LiSSA configuration that matches leave-one-out on logistic regression (tested):
``lissa_depth=1500, lissa_repeats=2, lissa_batch_size=300``, scale estimated by power iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch

from cleanse.config import InfluenceOptions
from cleanse.data.dataset import Split
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table
from cleanse.ekfac import EKFAC
from cleanse.grads import (
    ExactInverse,
    FunctionalModel,
    SolverReport,
    cg_solve,
    exact_hessian,
    exact_inverse,
    curvature_fn,
    grad_dots,
    last_layer_name,
    lissa_solve,
    mean_grad,
    per_sample_grads,
)
from cleanse.progress import progress


class InverseHessian:
    """``(H + damping I)^-1`` applied to blocks, by the configured solver."""

    def __init__(self, fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, options: InfluenceOptions, seed: int,
                 large_solver: str = "cg"):
        self.fm, self.x, self.y, self.options, self.seed = fm, x, y, options, seed
        solver = options.solver
        if solver == "auto":
            solver = "exact" if fm.n_params <= options.exact_max_params else large_solver
        self.solver = solver
        self.exact: ExactInverse | None = None
        self.ekfac: EKFAC | None = None
        self.reports: list[SolverReport] = []
        if solver == "exact":
            self.exact = exact_inverse(exact_hessian(fm, x, y, curvature=options.curvature), options.damping)
            self.reports.append(self.exact.report)
        if solver == "ekfac" or (solver == "cg" and options.cg_preconditioner == "ekfac"):
            # EK-FAC's inverse includes the L2 term; as a preconditioner it targets H + damping I.
            self.ekfac = EKFAC(fm, x, y, damping=options.damping, fisher=options.ekfac_fisher)
            if solver == "ekfac":
                self.reports.append(SolverReport("ekfac", options.damping, True, note=f"fisher={options.ekfac_fisher}"))

    def solve(self, block: torch.Tensor) -> torch.Tensor:
        """Solve for ``block`` ``(p, k)``; returns ``(repeats, p, k)`` (``repeats = 1`` unless LiSSA)."""
        options = self.options
        if self.exact is not None:
            return self.exact.solve(block)[None]
        if self.solver == "ekfac":
            return self.ekfac.solve(block)[None]
        if self.solver == "cg":
            solution, report = cg_solve(
                curvature_fn(self.fm, self.x, self.y, options.curvature), block, damping=options.damping,
                max_iter=options.cg_max_iter, tol=options.cg_tol,
                preconditioner=None if self.ekfac is None else self.ekfac.solve,
            )
            self.reports.append(report)
            return solution[None]
        estimates, report = lissa_solve(
            self.fm, self.x, self.y, block, damping=options.damping, depth=options.lissa_depth,
            repeats=options.lissa_repeats, scale=options.lissa_scale, batch_size=options.lissa_batch_size,
            seed=self.seed, curvature=options.curvature,
        )
        self.reports.append(report)
        return estimates

    def quadratic_forms(self, x: torch.Tensor, y: torch.Tensor, chunk: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``g_i^T (H + damping I)^-1 g_i`` for the loss gradients of ``(x, y)``: the mean over
        repeats, ``(n,)``, and its standard error (``None`` unless LiSSA)."""
        if self.solver == "ekfac":
            return self.ekfac.quadratic_forms(x, y).cpu().numpy(), None
        values, errors = [], []
        for start in progress(range(0, x.shape[0], chunk), f"influence: {x.shape[0]} quadratic forms", unit="chunk"):
            grads = per_sample_grads(self.fm, x[start : start + chunk], y[start : start + chunk])  # (k, p)
            if self.exact is not None:
                per_repeat = self.exact.quadratic_form(grads)[None]
            else:
                solved = self.solve(grads.T)  # (repeats, p, k)
                per_repeat = torch.einsum("kp,rpk->rk", grads.double(), solved.double())
            mean, se = _mean_and_se(per_repeat)
            values.append(mean)
            errors.append(se)
        if not values:
            return np.zeros(0), None
        return np.concatenate(values), None if errors[0] is None else np.concatenate(errors)

    def summary(self) -> dict:
        return {
            "solver": self.solver,
            "n_params": self.fm.n_params,
            "converged": all(report.converged for report in self.reports),
            "reports": [asdict(report) for report in self.reports[:5]],
        }


def _mean_and_se(per_repeat: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """Reduce ``(repeats, n)`` to the mean and its standard error (``None`` for one repeat)."""
    values = per_repeat.detach().double().cpu()
    if values.shape[0] == 1:
        return values[0].numpy(), None
    return values.mean(0).numpy(), (values.std(0, unbiased=True) / np.sqrt(values.shape[0])).numpy()


@dataclass
class Problem:
    """The differentiated model and how a split's inputs reach it.

    With ``layers="last"`` the model is the classifier head alone and its inputs are the frozen
    penultimate features (computed once): the same function of the head's parameters as the whole
    network, at a fraction of the cost of every gradient and curvature product.
    """

    fm: FunctionalModel
    features: Callable[[torch.Tensor], torch.Tensor]

    def tensors(self, context: ScoringContext, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = context.tensors(split)
        return self.features(x), y


def problem(context: ScoringContext, layers: str = "all") -> Problem:
    module = context.model.module(context.device)
    weight_decay = context.model_config.weight_decay
    if layers != "last":
        return Problem(FunctionalModel.of(module, weight_decay), lambda x: x)
    head = dict(module.named_modules())[last_layer_name(module)]

    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
        try:
            module(x)
        finally:
            handle.remove()
        return captured[0]

    return Problem(FunctionalModel.of(head, weight_decay), features)


def _setup(context: ScoringContext, options: InfluenceOptions,
           large_solver: str = "cg") -> tuple[Problem, torch.Tensor, torch.Tensor, InverseHessian]:
    prob = problem(context, options.layers)
    x, y = prob.tensors(context, context.train)
    return prob, x, y, InverseHessian(prob.fm, x, y, options, context.seed, large_solver)


def removal_effects(context: ScoringContext, options: InfluenceOptions, query: Split) -> tuple[np.ndarray, InverseHessian]:
    """``delta_i(q)`` for every query ``q`` and training sample ``i``: shape ``(n_query, n_train)``.

    Positive = removing training sample ``i`` is predicted to raise query ``q``'s loss (``i``
    supports ``q``'s label).
    """
    prob, x, y, inverse = _setup(context, options)
    xq, yq = prob.tensors(context, query)
    return train_query_effects(prob.fm, x, y, xq, yq, lambda block: inverse.solve(block).mean(0)), inverse


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
    rows = [grad_dots(fm, x, y, solved[:, q].to(fm.theta.dtype)) / n
            for q in progress(range(solved.shape[1]), "influence: train -> query products", unit="query")]
    return torch.stack(rows).detach().double().cpu().numpy()


class SelfInfluenceEstimator:
    name: ClassVar[str] = "influence"
    reads_validation_labels: ClassVar[bool] = False
    options_type: ClassVar[type] = InfluenceOptions

    def score(self, context: ScoringContext, options: InfluenceOptions) -> ScoreResult:
        # Self-influence needs one quadratic form per training sample. Above the exact size, CG would
        # solve n systems; EK-FAC gives all n forms from one factorisation (issue-6 benchmark on the
        # digits MLP: AUC 0.9965 in 1.1 s against last-layer CG's 0.996 in 6.0 s), so ``auto`` takes it here.
        _, x, y, inverse = _setup(context, options, large_solver="ekfac")
        # One CG system per chunk: larger chunks batch more right-hand sides per curvature product.
        score, se = inverse.quadratic_forms(x, y, 512 if inverse.exact is not None else 256)
        columns = {"self_influence": score}
        if se is not None:
            columns["score_se"] = se
        return ScoreResult(score_table(context.train.sample_id, score, **columns), inverse.summary())

    def pairwise(self, context: ScoringContext, options: InfluenceOptions, query: Split) -> np.ndarray:
        return removal_effects(context, options, query)[0]


class ValidationInfluenceEstimator:
    name: ClassVar[str] = "influence_val"
    reads_validation_labels: ClassVar[bool] = True
    options_type: ClassVar[type] = InfluenceOptions

    def score(self, context: ScoringContext, options: InfluenceOptions) -> ScoreResult:
        prob, x, y, inverse = _setup(context, options)
        fm = prob.fm
        xv, yv = prob.tensors(context, context.val)
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

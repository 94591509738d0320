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
et al., 2023). ``auto`` (the default) chooses by predicted cost (:func:`plan_solver`): the
candidates, from most to least accurate, are exact, EK-FAC-preconditioned CG, EK-FAC (expected
Fisher) and EK-FAC with one sampled label per sample on all layers, then exact and EK-FAC on the
last layer (``layers: last``); the first whose predicted cost, with a 25% margin for the cost
model's error, is at most ``cost_budget_epochs`` training epochs is taken. Costs are counted, not timed (:class:`CostModel`): multiply-adds of
forward/backward passes from the layer shapes, per-sample gradients, curvature-vector products,
``p^2``/``p^3`` dense work and the Kronecker factors' eigendecompositions, priced by a few
per-operation-class constants calibrated once (:data:`COST_CONSTANTS`) and divided by one
training epoch counted the same way. So the choice is a pure function of the architecture, n, the
workload and the options: the same parameters always give the same solver (and the same scores),
whatever the machine's load. The workload matters: self-influence needs n quadratic forms (CG
would solve n systems), validation and query influence a few solves and one pass over the
training set. The choice, the budget and every candidate's prediction (in epochs, by part) are
stored in the score metadata (``auto``). LiSSA's repeats give a standard error (``score_se``).

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
from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np
import torch

from cleanse.config import InfluenceOptions
from cleanse.data.dataset import Split
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table
from cleanse.ekfac import EKFAC
from cleanse.errors import ConfigError
from cleanse.grads import (
    ExactInverse,
    FunctionalModel,
    SolverReport,
    cg_solve,
    exact_hessian,
    exact_inverse,
    curvature_fn,
    grad_dots,
    lissa_solve,
    mean_grad,
    per_sample_grads,
)
from cleanse.estimators.influence_plan import (  # re-exported: tests and benchmarks import them from here
    ACCURACY_ORDER,
    COST_CONSTANTS,
    PREDICTION_MARGIN,
    CostModel,
    LayerShape,
    Problem,
    SolverPlan,
    Workload,
    epoch_seconds,
    layer_shapes,
    plan_solver,
    problem,
)
from cleanse.progress import progress

__all__ = ["ACCURACY_ORDER", "COST_CONSTANTS", "PREDICTION_MARGIN", "CostModel", "InverseHessian", "LayerShape",
           "Problem", "SelfInfluenceEstimator", "SolverPlan", "ValidationInfluenceEstimator", "Workload",
           "epoch_seconds", "layer_shapes", "plan_solver", "problem", "removal_effects", "train_query_effects"]


class InverseHessian:
    """``(H + damping I)^-1`` applied to blocks, by the configured solver (``exact``, ``cg``,
    ``lissa`` or ``ekfac``; ``auto`` is resolved by :func:`plan_solver` before construction)."""

    def __init__(self, fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, options: InfluenceOptions, seed: int):
        self.fm, self.x, self.y, self.options, self.seed = fm, x, y, options, seed
        solver = options.solver
        if solver == "auto":
            raise ValueError("InverseHessian needs a concrete solver; resolve 'auto' with plan_solver first")
        self.solver = solver
        self.plan: SolverPlan | None = None
        self.exact: ExactInverse | None = None
        self.ekfac: EKFAC | None = None
        self.reports: list[SolverReport] = []
        if solver == "exact":
            self.exact = exact_inverse(exact_hessian(fm, x, y, curvature=options.curvature), options.damping)
            self.reports.append(self.exact.report)
        if solver == "ekfac" or (solver == "cg" and options.cg_preconditioner == "ekfac"):
            # EK-FAC's inverse includes the L2 term; as a preconditioner it targets H + damping I.
            self.ekfac = EKFAC(fm, x, y, damping=options.damping, fisher=options.ekfac_fisher, seed=seed,
                               relative_damping=options.ekfac_damping == "relative")
            if solver == "ekfac":
                self.reports.append(SolverReport("ekfac", options.damping, True, note=f"fisher={options.ekfac_fisher}"
                                                 + (", damping relative" if self.ekfac.relative_damping else "")))

    def solve(self, block: torch.Tensor) -> torch.Tensor:
        """Solve for ``block`` ``(p, k)``; returns ``(repeats, p, k)`` (``repeats = 1`` unless LiSSA)."""
        options = self.options
        if self.exact is not None:
            return self.exact.solve(block)[None]
        if self.solver == "ekfac":
            assert self.ekfac is not None  # built in __init__ for this solver
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
            assert self.ekfac is not None  # built in __init__ for this solver
            return self.ekfac.quadratic_forms(x, y).cpu().numpy(), None
        values: list[np.ndarray] = []
        errors: list[np.ndarray] = []  # one per chunk when there are repeats (LiSSA), else none
        for start in progress(range(0, x.shape[0], chunk), f"influence: {x.shape[0]} quadratic forms", unit="chunk"):
            grads = per_sample_grads(self.fm, x[start : start + chunk], y[start : start + chunk])  # (k, p)
            if self.exact is not None:
                per_repeat = self.exact.quadratic_form(grads)[None]
            else:
                solved = self.solve(grads.T)  # (repeats, p, k)
                per_repeat = torch.einsum("kp,rpk->rk", grads.double(), solved.double())
            mean, se = _mean_and_se(per_repeat)
            values.append(mean)
            if se is not None:
                errors.append(se)
        if not values:
            return np.zeros(0), None
        return np.concatenate(values), np.concatenate(errors) if errors else None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "solver": self.solver,
            "layers": self.options.layers,
            "n_params": self.fm.n_params,
            "converged": all(report.converged for report in self.reports),
            "reports": [asdict(report) for report in self.reports[:5]],
        }
        if self.plan is not None:
            out["auto"] = self.plan.as_meta()
        return out


def _mean_and_se(per_repeat: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """Reduce ``(repeats, n)`` to the mean and its standard error (``None`` for one repeat)."""
    values = per_repeat.detach().double().cpu()
    if values.shape[0] == 1:
        return values[0].numpy(), None
    return values.mean(0).numpy(), (values.std(0, unbiased=True) / np.sqrt(values.shape[0])).numpy()


def _setup(context: ScoringContext, options: InfluenceOptions,
           workload: Workload) -> tuple[Problem, torch.Tensor, torch.Tensor, InverseHessian]:
    """The problem, its training tensors and the inverse; ``solver: auto`` is resolved by
    :func:`plan_solver` for ``workload`` and the plan is kept on the inverse (``summary()``)."""
    problems: dict[str, Problem] = {}
    plan = None
    if not context.task.supports_ekfac:
        # EK-FAC's Fisher is drawn from a softmax (cleanse.ekfac): other families solve without it.
        if options.solver == "ekfac":
            raise ConfigError(f"scorers.<influence>.solver: 'ekfac' needs a softmax output; family "
                              f"{context.task.name!r} allows auto, exact, cg, lissa")
        options = options.model_copy(update={"cg_preconditioner": "none"})
    if options.solver == "auto":
        plan = plan_solver(context, options, workload, problems=problems)
        options = plan.options(options)
    prob = problems.get(options.layers) or problem(context, options.layers)
    x, y = prob.tensors(context, context.train)
    inverse = InverseHessian(prob.fm, x, y, options, context.seed)
    inverse.plan = plan
    return prob, x, y, inverse


def removal_effects(context: ScoringContext, options: InfluenceOptions, query: Split) -> tuple[np.ndarray, InverseHessian]:
    """``delta_i(q)`` for every query ``q`` and training sample ``i``: shape ``(n_query, n_train)``.

    Positive = removing training sample ``i`` is predicted to raise query ``q``'s loss (``i``
    supports ``q``'s label).
    """
    prob, x, y, inverse = _setup(context, options, Workload("rhs", len(query)))
    xq, yq = prob.tensors(context, query)
    return train_query_effects(prob.fm, x, y, xq, yq, lambda block: inverse.solve(block).mean(0)), inverse


def train_query_effects(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor,
                        inverse_hvp: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """``delta_i(q) = (1/n) g_q^T (H + lambda I)^-1 g_i`` for any inverse-HVP solver.

    ``inverse_hvp`` maps a block ``(p, k)`` to ``(H + lambda I)^-1`` applied to it, ``(p, k)``
    (exact, CG, LiSSA, EK-FAC, ...). Returns ``(n_query, n_train)``, float64; positive = training
    sample ``i`` supports query ``q``'s label. One solve for all queries, then one pass over the
    training set for all of them (:func:`grad_dots`: no per-sample training gradient is materialised for
    complete Linear networks, blocks of them for adapters).
    """
    query_grads = per_sample_grads(fm, xq, yq)  # (n_query, p)
    solved = inverse_hvp(query_grads.T)  # (p, n_query)
    n = x.shape[0]
    # every query's direction in one pass over the training set (a forward and a backward pass
    # shared by all of them for Linear networks, materialised gradient blocks for adapters; see
    # grad_dots)
    return (grad_dots(fm, x, y, solved.to(fm.theta.dtype)).T / n).detach().double().cpu().numpy()


class SelfInfluenceEstimator:
    name: ClassVar[str] = "influence"
    reads_validation_labels: ClassVar[bool] = False
    options_type: ClassVar[type] = InfluenceOptions
    families: ClassVar[tuple[str, ...]] = ("classification", "regression", "graph", "lm")

    def score(self, context: ScoringContext, options: InfluenceOptions) -> ScoreResult:
        # Self-influence needs one quadratic form per training sample: CG would solve n systems, so
        # the cost model rules it out beyond tiny n; EK-FAC gives all n forms from one factorisation.
        _, x, y, inverse = _setup(context, options, Workload("self"))
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
    families: ClassVar[tuple[str, ...]] = ("classification", "regression")

    def score(self, context: ScoringContext, options: InfluenceOptions) -> ScoreResult:
        prob, x, y, inverse = _setup(context, options, Workload("rhs", 1))
        fm = prob.fm
        xv, yv = prob.tensors(context, context.val)
        solved = inverse.solve(mean_grad(fm, xv, yv)[:, None])  # (repeats, p, 1)
        n = x.shape[0]
        per_repeat = grad_dots(fm, x, y, solved[:, :, 0].T.to(fm.theta.dtype)).T / n  # (repeats, n), one pass
        delta, se = _mean_and_se(per_repeat)
        columns = {"delta_val_loss": delta}
        if se is not None:
            columns["score_se"] = se
        return ScoreResult(score_table(context.train.sample_id, -delta, **columns), inverse.summary())

    def pairwise(self, context: ScoringContext, options: InfluenceOptions, query: Split) -> np.ndarray:
        return removal_effects(context, options, query)[0]

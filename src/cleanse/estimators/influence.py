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

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch

from cleanse.config import InfluenceOptions, ModelConfig
from cleanse.data.dataset import Split
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table
from cleanse.ekfac import EKFAC
from cleanse.ekfac import _layers as ekfac_layers
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
    last_layer_name,
    lissa_solve,
    mean_grad,
    per_sample_grads,
)
from cleanse.progress import progress


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
            self.ekfac = EKFAC(fm, x, y, damping=options.damping, fisher=options.ekfac_fisher, seed=seed)
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
        out = {
            "solver": self.solver,
            "layers": self.options.layers,
            "n_params": self.fm.n_params,
            "converged": all(report.converged for report in self.reports),
            "reports": [asdict(report) for report in self.reports[:5]],
        }
        if self.plan is not None:
            out["auto"] = self.plan.as_meta()
        return out


# ------------------------------------------------------------------------------- choosing the solver
# Candidates from most to least accurate (``layers="all"``). Exact inverts the curvature itself;
# preconditioned CG solves the same systems to ``cg_tol``; EK-FAC approximates the curvature by
# Kronecker factors per layer; the last-layer problems drop every earlier layer's parameters.
# ``ekfac_sampled`` is EK-FAC with one label per sample drawn from the model (``ekfac_fisher:
# sampled``): the same factors in expectation at 1/C of the label-dependent work, so it can fit a
# budget the expected Fisher does not; it is tried only when ``ekfac_fisher`` is ``expected``.
ACCURACY_ORDER: tuple[tuple[str, str], ...] = (("exact", "all"), ("cg", "all"), ("ekfac", "all"),
                                               ("ekfac_sampled", "all"), ("exact", "last"), ("ekfac", "last"))
_LBFGS_EVALUATIONS = 50  # the trainer's L-BFGS max_iter (objective evaluations per epoch, at most)

# Seconds per unit of work of each operation class, on one CPU thread (float32 networks; the dense
# solves in float64). Fitted once by ``benchmarks/calibrate_costs.py`` (timed matrix products and
# eigh, one-epoch trainer runs, vmap per-sample gradients and curvature products on three MLPs; non-negative
# least squares) on the project's development machine (2-core x86-64, torch CPU, OMP_NUM_THREADS=1,
# shared with other jobs: the fastest of repeated timings), 2026-12-02. ``vmap_entry`` fitted to 0:
# vmap's per-sample cost scales with the model's multiply-adds here.
# Only their ratios matter: every prediction is divided by the predicted epoch, so a faster machine
# changes nothing and the choice is a pure function of the architecture, n, the workload and options.
COST_CONSTANTS: dict[str, float] = {
    "mac": 4.589e-11,  # a multiply-add of a batched forward/backward pass (training step, grad_dots, EK-FAC capture)
    "epoch": 6.582e-03,  # the trainer's fixed cost per epoch (shuffling, bookkeeping)
    "step": 1.121e-03,  # the fixed cost of one optimizer step (launches, zero_grad, autograd graph)
    "param_step": 1.943e-08,  # one parameter's share of an Adam/SGD update
    "vmap_mac": 4.830e-09,  # a multiply-add of a vmap(grad) per-sample gradient pass
    "vmap_entry": 0.0,  # one materialised per-sample gradient entry (n x p)
    "func_mac": 3.405e-10,  # a multiply-add of a torch.func curvature-vector product, per column
    "mm": 2.500e-11,  # a float32 flop of a large matrix product (EK-FAC covariances, rotations)
    "mm64": 4.167e-11,  # a float64 flop of a large matrix product (exact curvature, its forms)
    "eigh": 5.258e-10,  # one unit of d^3 of a float64 symmetric eigendecomposition
    "ekfac_call": 1.117e-03,  # the fixed cost of one layer's work on one EK-FAC row chunk, per labelling
}
_EKFAC_CHUNK = 512  # rows per chunk of EK-FAC's passes (cleanse.ekfac.EKFAC's chunk_size)


@dataclass(frozen=True)
class Workload:
    """What the solver must deliver. ``self``: one quadratic form ``g_i^T (H + lambda I)^-1 g_i`` per
    training sample; ``rhs``: ``k`` solves (the mean validation gradient, or one per query) and
    ``k`` forward-mode passes over the training set."""

    kind: str  # "self" | "rhs"
    k: int = 1


@dataclass
class SolverPlan:
    """The solver ``auto`` chose, and why: the predicted cost of every candidate it considered (in
    accuracy order, in training epochs) and the budget (``cost_budget_epochs``)."""

    solver: str
    layers: str
    budget_epochs: float
    predicted_epochs: float
    candidates: list[dict]
    within_budget: bool

    def options(self, options: InfluenceOptions) -> InfluenceOptions:
        """``options`` with the chosen solver, layers (and, for ``ekfac_sampled``, the Fisher) set."""
        update = {"solver": self.solver, "layers": self.layers}
        if self.solver == "ekfac_sampled":
            update.update(solver="ekfac", ekfac_fisher="sampled")
        return options.model_copy(update=update)

    def as_meta(self) -> dict:
        return {"chosen": f"{self.solver} ({self.layers} layers)", "solver": self.solver, "layers": self.layers,
                "predicted_epochs": self.predicted_epochs, "budget_epochs": self.budget_epochs,
                "within_budget": self.within_budget, "candidates": self.candidates}


@dataclass(frozen=True)
class LayerShape:
    """One Linear/Conv2d layer as the cost model sees it: ``n_in`` inputs (bias column included),
    ``out`` outputs, applied at ``positions`` places per sample (1 for Linear, the output pixels of
    a convolution)."""

    n_in: int
    out: int
    positions: int


def layer_shapes(fm: FunctionalModel, x_one: torch.Tensor) -> list[LayerShape] | None:
    """The Linear/Conv2d layers of ``fm`` from one forward pass of one row (shapes only; the values
    are not used), or ``None`` if ``fm`` has parameters in other layers (EK-FAC refuses those)."""
    try:
        layers = ekfac_layers(fm)
    except ConfigError:
        return None
    positions: dict[int, int] = {}
    hooks = [layer.module.register_forward_hook(
        lambda mod, args, out, index=index, width=layer.out_features:
        positions.__setitem__(index, int(out[0].numel()) // width))
        for index, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            fm.logits(fm.theta, x_one)
    finally:
        for hook in hooks:
            hook.remove()
    return [LayerShape(layer.n_in, layer.out_features, positions.get(index, 1)) for index, layer in enumerate(layers)]


class CostModel:
    """Predicted cost of each solver on one differentiated problem, by counting its work.

    From the layer shapes alone (no timing): ``F`` = the multiply-adds of one forward pass of one
    row (``sum_l n_in * out * positions``); a forward+backward pass is ``3F``, a curvature-vector
    product (forward mode, then reverse) ``4F`` per column. Each count is priced by its operation
    class in :data:`COST_CONSTANTS` and divided by one predicted training epoch, so every cost is in
    epochs. ``n`` rows, ``p`` parameters, ``C`` classes.
    """

    def __init__(self, fm: FunctionalModel, x_one: torch.Tensor, n: int, options: InfluenceOptions):
        self.fm, self.n, self.options = fm, n, options
        self.p = fm.n_params
        self.shapes = layer_shapes(fm, x_one)
        with torch.no_grad():
            self.classes = int(fm.logits(fm.theta, x_one).shape[-1])
        # without Linear/Conv2d shapes, a forward pass costs at least one multiply-add per parameter
        self.forward = (sum(s.n_in * s.out * s.positions for s in self.shapes) if self.shapes else self.p)
        self.linear_head = (options.curvature == "ggn" and isinstance(fm.module, torch.nn.Linear) and x_one.dim() == 2)
        self.all_linear = bool(self.shapes) and all(s.positions == 1 for s in self.shapes)

    def pass_seconds(self, rows: int, directions: int = 1) -> float:
        """A pass of ``g_i . v`` over ``rows`` rows for ``directions`` vectors (:func:`grad_dots`):
        one shared forward+backward and a per-row contraction for all-Linear networks, forward
        mode per direction otherwise."""
        c = COST_CONSTANTS
        if self.all_linear:
            return rows * (3 * self.forward * c["mac"] + 2 * directions * self.p * c["mm"])
        return directions * rows * 4 * self.forward * c["func_mac"]

    def grads_seconds(self, rows: int) -> float:
        """Materialised per-sample gradients ``(rows, p)`` (vmap of grad)."""
        c = COST_CONSTANTS
        return rows * (3 * self.forward * c["vmap_mac"] + self.p * c["vmap_entry"])

    def ekfac_seconds(self, sampled: bool) -> dict[str, float]:
        """EK-FAC's fit (:class:`cleanse.ekfac.EKFAC`): two passes over the rows with ``C`` label
        backward passes each (one for the sampled Fisher), the ``A`` and ``S`` covariances
        (``n_in^2`` and ``out^2`` per position), their eigendecompositions and the eigenvalue
        correction (rotating every per-sample gradient: ``n_in^2 + out^2 + n_in out`` per position)."""
        c, n, shapes = COST_CONSTANTS, self.n, self.shapes
        labels = 1 if sampled else self.classes
        backward = 2 * self.forward * c["mac"]
        covariances = sum(s.positions * (s.n_in**2 + labels * s.out**2) for s in shapes) * 2 * c["mm"]
        rotations = labels * sum(s.positions * (s.n_in**2 + s.out**2 + s.n_in * s.out) for s in shapes) * 2 * c["mm"]
        calls = 2 * math.ceil(n / _EKFAC_CHUNK) * (labels + 1) * len(shapes)
        return {"factor_passes": n * (2 * self.forward * c["mac"] + 2 * labels * backward + covariances + rotations),
                "factor_calls": calls * c["ekfac_call"],
                "factor_eigh": sum(s.n_in**3 + s.out**3 for s in shapes) * c["eigh"]}

    def ekfac_forms_seconds(self) -> float:
        """Quadratic forms over the training set from the factors: a forward+backward pass and one
        rotation per row (no per-sample gradient is formed for Linear layers)."""
        c = COST_CONSTANTS
        rotation = sum(s.positions * (s.n_in**2 + s.out**2 + (s.n_in * s.out if s.positions > 1 else 0))
                       for s in self.shapes) * 2 * c["mm"]
        calls = math.ceil(self.n / _EKFAC_CHUNK) * 2 * len(self.shapes)
        return self.n * (3 * self.forward * c["mac"] + rotation) + calls * c["ekfac_call"]

    def predict(self, solver: str, workload: Workload) -> dict[str, float]:
        """Predicted seconds (on the calibration machine) of ``solver`` for ``workload``, by part
        (their sum is the prediction). CG is priced at ``cg_max_iter`` iterations: its worst case."""
        c, n, p, k = COST_CONSTANTS, self.n, self.p, workload.k
        parts: dict[str, float] = {}
        if workload.kind == "rhs":
            parts["train_passes"] = self.pass_seconds(n, k)
        if solver == "exact":
            if self.linear_head:  # closed form: C Gram matrices (d+1)^2 and one (C (d+1))^2 per row
                aug = p // self.classes
                parts["curvature_matrix"] = 2 * n * (self.classes * aug**2 + p**2) * c["mm64"]
            else:  # p curvature-vector products over n rows
                parts["curvature_matrix"] = p * n * 4 * self.forward * c["func_mac"]
            parts["eigh"] = p**3 * c["eigh"]
            if workload.kind == "self":
                parts["forms"] = self.grads_seconds(n) + 2 * n * p * p * c["mm64"]
            else:
                parts["solve"] = 2 * k * p * p * c["mm64"]
        elif solver in ("ekfac", "ekfac_sampled"):
            parts.update(self.ekfac_seconds(solver == "ekfac_sampled" or self.options.ekfac_fisher == "sampled"))
            if workload.kind == "self":
                parts["forms"] = self.ekfac_forms_seconds()
        elif solver == "cg":
            if self.options.cg_preconditioner == "ekfac":
                parts.update({f"preconditioner_{key}": value for key, value in
                              self.ekfac_seconds(self.options.ekfac_fisher == "sampled").items()})
            columns = n if workload.kind == "self" else k
            parts["iterations"] = self.options.cg_max_iter * columns * n * 4 * self.forward * c["func_mac"]
            if workload.kind == "self":
                parts["gradients"] = self.grads_seconds(n)
        else:
            raise ValueError(f"no cost model for solver {solver!r}")
        return parts


def epoch_seconds(model_config: ModelConfig, n: int, fm: FunctionalModel, x_one: torch.Tensor) -> float:
    """One training epoch's predicted seconds (on the calibration machine): ``ceil(n / batch)``
    optimizer steps (a fixed cost and an update of every parameter each), a forward+backward
    pass over the n rows and the trainer's fixed cost per epoch. L-BFGS (one full-batch step per epoch) counts ``_LBFGS_EVALUATIONS``
    objective evaluations: the trainer's ``max_iter``, an upper bound."""
    c = COST_CONSTANTS
    shapes = layer_shapes(fm, x_one)
    forward = sum(s.n_in * s.out * s.positions for s in shapes) if shapes else fm.n_params
    if model_config.optimizer == "lbfgs":
        return c["epoch"] + _LBFGS_EVALUATIONS * (c["step"] + fm.n_params * c["param_step"]
                                                  + n * 3 * forward * c["mac"])
    steps = math.ceil(n / min(model_config.batch_size, max(n, 1)))
    return c["epoch"] + steps * (c["step"] + fm.n_params * c["param_step"]) + n * 3 * forward * c["mac"]


# Predictions are multiplied by this before they are compared with the budget. The calibrated
# constants predicted 0.6-1.2x of the measured cost (the n = 50,000 speed benchmark: sampled
# EK-FAC predicted 4.64 epochs, measured 5.46), so a candidate is taken only with room for that
# error and the budget holds as a measured bound, not only as a prediction.
PREDICTION_MARGIN = 1.25


def plan_solver(context: ScoringContext, options: InfluenceOptions, workload: Workload,
                problems: dict[str, Problem] | None = None) -> SolverPlan:
    """Resolve ``solver: auto`` by predicted cost: the most accurate candidate of
    :data:`ACCURACY_ORDER` whose predicted cost (:class:`CostModel`, in training epochs) times
    :data:`PREDICTION_MARGIN` is at most ``cost_budget_epochs``; if none fits, the cheapest is taken and ``within_budget`` is False.
    A pure function of the architecture, n, the workload and ``options`` (nothing is timed), so the
    same parameters always choose the same solver. ``exact`` is never considered above
    ``exact_max_params`` parameters (its ``(p, p)`` float64 matrices). ``layers: last`` restricts the
    search to the last layer. ``problems`` (layers -> :class:`Problem`) is filled with the problems
    built, for reuse."""
    problems = {} if problems is None else problems
    x_train, _ = context.tensors(context.train)
    n = int(x_train.shape[0])
    full = problems.setdefault("all", problem(context, "all")) if options.layers == "all" else problem(context, "all")
    epoch = epoch_seconds(context.model_config, n, full.fm, x_train[:1])
    order = [(s, l) for s, l in ACCURACY_ORDER if (options.layers == "all" or l == "last")
             and (s != "ekfac_sampled" or options.ekfac_fisher == "expected")]
    if options.layers == "last":
        order.insert(1, ("cg", "last"))
    models: dict[str, CostModel] = {}
    candidates: list[dict] = []
    for solver, layers in order:
        if layers not in models:
            prob = problems.setdefault(layers, problem(context, layers))
            models[layers] = CostModel(prob.fm, prob.features(x_train[:1]), n, options)
        costs = models[layers]
        row: dict = {"solver": solver, "layers": layers, "n_params": costs.p}
        if solver == "exact" and costs.p > options.exact_max_params:
            row.update(predicted_epochs=None, fits=False, why=f"{costs.p} parameters > exact_max_params (memory)")
        elif solver.startswith("ekfac") and not context.task.supports_ekfac:
            row.update(predicted_epochs=None, fits=False, why=f"EK-FAC needs a softmax output (family "
                       f"{context.task.name!r})")
        elif solver != "exact" and costs.shapes is None and (solver != "cg" or options.cg_preconditioner == "ekfac"):
            row.update(predicted_epochs=None, fits=False, why="EK-FAC needs Linear/Conv2d layers only")
        else:
            parts = {key: value / epoch for key, value in costs.predict(solver, workload).items()}
            predicted = sum(parts.values())
            row.update(predicted_epochs=predicted, fits=predicted * PREDICTION_MARGIN <= options.cost_budget_epochs,
                       parts_epochs=parts)
        candidates.append(row)
    chosen = next((row for row in candidates if row["fits"]), None)
    if chosen is None:
        chosen = min((row for row in candidates if row["predicted_epochs"] is not None),
                     key=lambda row: row["predicted_epochs"])
    return SolverPlan(solver=chosen["solver"], layers=chosen["layers"], budget_epochs=options.cost_budget_epochs,
                      predicted_epochs=chosen["predicted_epochs"], candidates=candidates,
                      within_budget=bool(chosen["fits"]))


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
    if layers != "last":
        return Problem(context.functional(module), lambda x: x)
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

    return Problem(context.functional(head), features)


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
    training set for all of them (:func:`grad_dots`; no per-sample training gradient is materialised).
    """
    query_grads = per_sample_grads(fm, xq, yq)  # (n_query, p)
    solved = inverse_hvp(query_grads.T)  # (p, n_query)
    n = x.shape[0]
    # every query's direction in one pass over the training set (a forward and a backward pass
    # shared by all of them for Linear networks; see grad_dots)
    return (grad_dots(fm, x, y, solved.to(fm.theta.dtype)).T / n).detach().double().cpu().numpy()


class SelfInfluenceEstimator:
    name: ClassVar[str] = "influence"
    reads_validation_labels: ClassVar[bool] = False
    options_type: ClassVar[type] = InfluenceOptions
    families: ClassVar[tuple[str, ...]] = ("classification", "regression")

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

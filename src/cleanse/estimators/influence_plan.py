"""Choosing the inverse-curvature solver for ``solver: auto`` (:func:`plan_solver`), and the
differentiated problem the solvers work on (:func:`problem`: the whole network or its last layer).

The choice is counted, not timed (:class:`CostModel`): multiply-adds of forward/backward passes
from the layer shapes, per-sample gradients, curvature-vector products, ``p^2``/``p^3`` dense work
and the Kronecker factors' eigendecompositions, priced by per-operation-class constants
(:data:`COST_CONSTANTS`) and divided by one training epoch counted the same way, so the same
parameters always choose the same solver. The solvers themselves and the estimators that use the
plan are in :mod:`cleanse.estimators.influence` (Koh & Liang, ICML 2017).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cleanse.config import InfluenceOptions, ModelConfig
from cleanse.data.dataset import Split
from cleanse.estimators.base import ScoringContext
from cleanse.ekfac import _layers as ekfac_layers
from cleanse.errors import ConfigError
from cleanse.grads import FunctionalModel, last_layer_name


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
        self.shapes = shapes = layer_shapes(fm, x_one)
        with torch.no_grad():
            self.classes = int(fm.logits(fm.theta, x_one).shape[-1])
        # without Linear/Conv2d shapes, a forward pass costs at least one multiply-add per parameter
        self.forward = (sum(s.n_in * s.out * s.positions for s in shapes) if shapes else self.p)
        self.linear_head = (options.curvature == "ggn" and isinstance(fm.module, torch.nn.Linear) and x_one.dim() == 2)
        self.all_linear = bool(shapes and all(s.positions == 1 for s in shapes))

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

    def ekfac_shapes(self) -> list[LayerShape]:
        """The layers EK-FAC factors; :func:`plan_solver` prices no EK-FAC work without them."""
        if self.shapes is None:
            raise ConfigError("EK-FAC needs Linear/Conv2d layers only")
        return self.shapes

    def ekfac_seconds(self, sampled: bool) -> dict[str, float]:
        """EK-FAC's fit (:class:`cleanse.ekfac.EKFAC`): two passes over the rows with ``C`` label
        backward passes each (one for the sampled Fisher), the ``A`` and ``S`` covariances
        (``n_in^2`` and ``out^2`` per position), their eigendecompositions and the eigenvalue
        correction (rotating every per-sample gradient: ``n_in^2 + out^2 + n_in out`` per position)."""
        c, n, shapes = COST_CONSTANTS, self.n, self.ekfac_shapes()
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
        c, shapes = COST_CONSTANTS, self.ekfac_shapes()
        rotation = sum(s.positions * (s.n_in**2 + s.out**2 + (s.n_in * s.out if s.positions > 1 else 0))
                       for s in shapes) * 2 * c["mm"]
        calls = math.ceil(self.n / _EKFAC_CHUNK) * 2 * len(shapes)
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

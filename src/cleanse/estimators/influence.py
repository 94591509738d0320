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
last layer (``layers: last``); each one's cost is predicted
from per-row costs timed on a few hundred training rows (curvature products, per-sample
gradients, forward-mode passes, an EK-FAC fit) and machine constants (a float64 matrix product,
an ``eigh``), extrapolated to n and p, and the first that fits ``cost_budget_epochs`` x one
training epoch (itself predicted from timed optimizer steps) is taken. The workload matters:
self-influence needs n quadratic forms (CG would solve n systems), validation and query
influence a few solves and one forward-mode pass over the training set per right-hand side. The
choice, the budget and every candidate's prediction are stored in the score metadata (``auto``).
Timings vary with the machine's load, so two runs near a budget boundary may choose differently:
set ``solver`` (and ``layers``) to pin one. LiSSA's repeats give a standard error (``score_se``).

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

import copy
import math
import time
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
from cleanse.models.trainer import l2_penalty
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
_PROBE_ROWS = 256  # rows on which the per-row costs are timed
_LBFGS_EVALUATIONS = 50  # the trainer's L-BFGS max_iter (objective evaluations per epoch, at most)
_PROBE_COLUMNS = 8  # curvature-product columns timed at once
_MACHINE: dict[str, float] = {}  # machine constants (matrix-product rate, eigh time), timed once per process


@dataclass(frozen=True)
class Workload:
    """What the solver must deliver. ``self``: one quadratic form ``g_i^T (H + lambda I)^-1 g_i`` per
    training sample; ``rhs``: ``k`` solves (the mean validation gradient, or one per query) and
    ``k`` forward-mode passes over the training set."""

    kind: str  # "self" | "rhs"
    k: int = 1


@dataclass
class SolverPlan:
    """The solver ``auto`` chose, and why: the predicted seconds of every candidate it considered
    (in accuracy order), the budget, and the one-epoch time the budget is tied to."""

    solver: str
    layers: str
    budget_s: float
    epoch_s: float
    predicted_s: float
    candidates: list[dict]
    probe_s: float
    within_budget: bool
    probes: dict[str, float]  # seconds of each timing probe (problem layers: quantity)

    def options(self, options: InfluenceOptions) -> InfluenceOptions:
        """``options`` with the chosen solver, layers (and, for ``ekfac_sampled``, the Fisher) set."""
        update = {"solver": self.solver, "layers": self.layers}
        if self.solver == "ekfac_sampled":
            update.update(solver="ekfac", ekfac_fisher="sampled")
        return options.model_copy(update=update)

    def as_meta(self) -> dict:
        return {"chosen": f"{self.solver} ({self.layers} layers)", "solver": self.solver, "layers": self.layers,
                "predicted_s": self.predicted_s, "budget_s": self.budget_s, "epoch_s_estimated": self.epoch_s,
                "within_budget": self.within_budget, "probe_s": self.probe_s, "probes": self.probes,
                "candidates": self.candidates}


def _best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of ``repeats`` runs of ``fn`` (other processes only ever slow a run down)."""
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def estimate_epoch_seconds(context: ScoringContext, steps: int = 16) -> float:
    """One training epoch's seconds, predicted from ``steps`` consecutive optimizer steps of the
    trainer's recipe (shuffled minibatches of ``model_config.batch_size``, cross-entropy + L2, Adam
    or SGD) on a copy of the trained model, scaled to ``ceil(n / batch)`` steps. Timed as a loop,
    as the trainer runs it: single steps timed apart ran 3x faster on the digits MLP (hot caches).
    L-BFGS (one full-batch step per epoch) counts ``_LBFGS_EVALUATIONS`` objective evaluations: the
    trainer's ``max_iter``, an upper bound."""
    config = context.model_config
    module = copy.deepcopy(context.model.module(context.device)).train()
    params = list(module.parameters())
    x, y = context.tensors(context.train)
    n = x.shape[0]
    batch = n if config.optimizer == "lbfgs" else min(config.batch_size, n)
    per_epoch = math.ceil(n / batch)
    steps = min(steps, per_epoch)
    optimizer = (torch.optim.SGD(params, lr=0.0, momentum=0.9) if config.optimizer == "sgd"
                 else torch.optim.Adam(params, lr=0.0))  # lr 0: the same work, the copy does not move
    order = torch.randperm(n, generator=torch.Generator().manual_seed(context.seed)).to(x.device)

    def step(rows: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x[rows]), y[rows]) + l2_penalty(params, config.weight_decay)
        loss.backward()
        optimizer.step()

    step(order[:batch])  # warm-up (allocations, optimizer state)
    started = time.perf_counter()
    for index in range(steps):
        step(order[index * batch: (index + 1) * batch])
    seconds = (time.perf_counter() - started) / steps * per_epoch
    return seconds * _LBFGS_EVALUATIONS if config.optimizer == "lbfgs" else seconds


class _CostModel:
    """Per-row and per-column costs of one differentiated problem, timed on ``_PROBE_ROWS`` rows and
    extrapolated linearly in n (every pass is a loop over row chunks) and, for the dense
    eigendecomposition, cubically in p. Each quantity is timed once, on first use."""

    def __init__(self, fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, options: InfluenceOptions):
        self.fm, self.x, self.y, self.options = fm, x, y, options
        self.n, self.p = x.shape[0], fm.n_params
        m = min(self.n, _PROBE_ROWS)
        self.m, self.xs, self.ys = m, x[:m], y[:m]
        self.spent: dict[str, float] = {}  # seconds each probe took (reported in the plan)
        self._cache: dict[str, float] = {}

    def _timed(self, key: str, fn: Callable[[], float]) -> float:
        if key not in self._cache:
            started = time.perf_counter()
            self._cache[key] = fn()
            self.spent[key] = time.perf_counter() - started
        return self._cache[key]

    def curvature_row_column(self) -> float:
        """Seconds per (training row x column) of a curvature-vector product."""
        def probe() -> float:
            apply = curvature_fn(self.fm, self.xs, self.ys, self.options.curvature)
            block = torch.randn(self.p, _PROBE_COLUMNS, generator=torch.Generator().manual_seed(0)).to(self.fm.theta)
            apply(block)  # warm-up: torch.func traces on the first call
            return _best_time(lambda: apply(block)) / (self.m * _PROBE_COLUMNS)
        return self._timed("curvature", probe)

    def curvature_matrix_seconds(self) -> float:
        """Building the ``(p, p)`` curvature: ``p`` curvature columns over n rows; for a linear head
        (closed form, :func:`cleanse.grads.linear_head_ggn_matrix`) its float64 products, ``C`` Gram
        matrices ``(d+1)^2`` and one ``(C (d+1))^2`` per row, at the timed matrix-product rate (timing
        it on a few hundred rows would mostly time its fixed ``p^2`` work: 2.3x over at 50,000 rows)."""
        if self.options.curvature == "ggn" and isinstance(self.fm.module, torch.nn.Linear) and self.x.dim() == 2:
            classes = self.fm.shapes[0][0]
            aug = self.p // classes
            return 2 * self.n * (classes * aug**2 + (classes * aug) ** 2) / self.matmul_flops()
        return self.p * self.n * self.curvature_row_column()

    def grads_row(self) -> float:
        """Seconds per row of materialised per-sample gradients."""
        return self._timed("grads", lambda: _best_time(lambda: per_sample_grads(self.fm, self.xs, self.ys)) / self.m)

    def dots_row(self) -> float:
        """Seconds per row of one forward-mode pass ``g_i . v`` over the training set."""
        direction = torch.ones_like(self.fm.theta)
        return self._timed("dots", lambda: _best_time(lambda: grad_dots(self.fm, self.xs, self.ys, direction)) / self.m)

    def matmul_flops(self) -> float:
        """Float64 matrix-product rate (flop/s), timed on a 512-square product (once per process)."""
        def probe() -> float:
            a = torch.randn(512, 512, dtype=torch.float64)
            return 2 * 512**3 / _best_time(lambda: a @ a)
        return self._machine("matmul", probe)

    def eigh_seconds(self) -> float:
        """``eigh`` of the ``(p, p)`` curvature: timed at ``min(p, 512)`` and scaled by ``p^3``."""
        size = min(self.p, 512)

        def probe() -> float:
            a = torch.randn(size, size, dtype=torch.float64)
            return _best_time(lambda: torch.linalg.eigh(a @ a.T), repeats=2)
        return self._machine(f"eigh{size}", probe) * (self.p / size) ** 3

    def _machine(self, key: str, fn: Callable[[], float]) -> float:
        """A property of the machine, not of the problem: timed once per process."""
        if key not in _MACHINE:
            started = time.perf_counter()
            _MACHINE[key] = fn()
            self.spent[key] = time.perf_counter() - started
        return _MACHINE[key]

    def ekfac_seconds(self, fisher: str | None = None) -> tuple[float, float]:
        """EK-FAC: (fit, quadratic forms over the training set), from a fit on the probe rows whose
        passes scale with n and whose factor eigendecompositions do not."""
        fisher = fisher or self.options.ekfac_fisher

        def probe() -> float:
            fit = EKFAC(self.fm, self.xs, self.ys, damping=self.options.damping, fisher=fisher)
            self._cache[f"ekfac_fixed_{fisher}"] = fit.seconds_eigh
            self._cache[f"ekfac_qf_row_{fisher}"] = _best_time(lambda: fit.quadratic_forms(self.xs, self.ys),
                                                               repeats=2) / self.m
            return fit.seconds_passes / self.m
        per_row = self._timed(f"ekfac_row_{fisher}", probe)
        return (self._cache[f"ekfac_fixed_{fisher}"] + per_row * self.n,
                self._cache[f"ekfac_qf_row_{fisher}"] * self.n)

    def predict(self, solver: str, workload: Workload) -> dict[str, float]:
        """Predicted seconds of ``solver`` on this problem for ``workload``, by part (their sum is
        the prediction). CG is priced at ``cg_max_iter`` iterations: its worst case."""
        n, p, k = self.n, self.p, workload.k
        parts: dict[str, float] = {}
        if workload.kind == "rhs":
            parts["train_passes"] = k * n * self.dots_row()
        if solver == "exact":
            parts["curvature_matrix"] = self.curvature_matrix_seconds()
            parts["eigh"] = self.eigh_seconds()
            if workload.kind == "self":
                parts["forms"] = n * self.grads_row() + 2 * n * p * p / self.matmul_flops()
            else:
                parts["solve"] = 2 * k * p * p / self.matmul_flops()
        elif solver in ("ekfac", "ekfac_sampled"):
            fit, forms = self.ekfac_seconds("sampled" if solver == "ekfac_sampled" else None)
            parts["factor_fit"] = fit
            if workload.kind == "self":
                parts["forms"] = forms
        elif solver == "cg":
            if self.options.cg_preconditioner == "ekfac":
                parts["preconditioner_fit"] = self.ekfac_seconds()[0]
            columns = n if workload.kind == "self" else k
            parts["iterations"] = self.options.cg_max_iter * columns * n * self.curvature_row_column()
            if workload.kind == "self":
                parts["gradients"] = n * self.grads_row()
        else:
            raise ValueError(f"no cost model for solver {solver!r}")
        return parts

    def lower_bound(self, solver: str, workload: Workload) -> float:
        """A lower bound from the curvature-product probe alone, to skip the costlier probes (0 for
        EK-FAC, which needs none)."""
        if solver == "exact":
            return self.curvature_matrix_seconds()
        if solver == "cg":
            # A curvature-vector product is a forward-mode and a reverse pass over the rows, at least
            # half the cost of the (cheaply timed) pass that dots every row's gradient with a vector;
            # this bound spares the curvature probe (torch.func tracing, seconds at 10^5 parameters).
            columns = self.n if workload.kind == "self" else workload.k
            return 0.5 * self.options.cg_max_iter * columns * self.n * self.dots_row()
        return 0.0


def plan_solver(context: ScoringContext, options: InfluenceOptions, workload: Workload,
                epoch_s: float | None = None, problems: dict[str, Problem] | None = None) -> SolverPlan:
    """Resolve ``solver: auto`` by predicted cost: the most accurate candidate of
    :data:`ACCURACY_ORDER` whose predicted seconds fit ``cost_budget_epochs`` x one epoch
    (``epoch_s``, else ``options.epoch_seconds``, else :func:`estimate_epoch_seconds`). Candidates
    are timed lazily in accuracy order and the search stops at the first whose prediction fits the
    budget left after the probes so far (the budget bounds the estimator's whole time, the epoch
    estimate and probes included); if none fits, the cheapest is taken and
    ``within_budget`` is False. ``exact`` is never considered above ``exact_max_params``
    parameters (its ``(p, p)`` float64 matrices). ``layers: last`` restricts the search to the
    last layer. ``problems`` (layers -> :class:`Problem`) is filled with the problems built, for reuse."""
    started = time.perf_counter()
    problems = {} if problems is None else problems
    epoch_s = epoch_s or options.epoch_seconds or estimate_epoch_seconds(context)
    budget = options.cost_budget_epochs * epoch_s
    order = [(s, l) for s, l in ACCURACY_ORDER if (options.layers == "all" or l == "last")
             and (s != "ekfac_sampled" or options.ekfac_fisher == "expected")]
    if options.layers == "last":
        order.insert(1, ("cg", "last"))
    models: dict[str, _CostModel] = {}
    candidates: list[dict] = []
    chosen: dict | None = None
    for solver, layers in order:
        if layers not in models:
            prob = problems.setdefault(layers, problem(context, layers))
            x, y = prob.tensors(context, context.train)
            models[layers] = _CostModel(prob.fm, x, y, options)
        costs = models[layers]
        row = {"solver": solver, "layers": layers, "n_params": costs.p}
        if solver == "exact" and costs.p > options.exact_max_params:
            row.update(predicted_s=None, fits=False, why=f"{costs.p} parameters > exact_max_params (memory)")
        elif (bound := costs.lower_bound(solver, workload)) > budget:
            row.update(predicted_s=bound, fits=False, why="lower bound over budget (curvature products alone)")
        else:
            parts = costs.predict(solver, workload)
            seconds = sum(parts.values())
            # the probes already spent count against the budget: it bounds the estimator's whole time
            left = budget - (time.perf_counter() - started)
            row.update(predicted_s=seconds, fits=seconds <= left, budget_left_s=left, parts=parts)
        candidates.append(row)
        if row["fits"]:
            chosen = row
            break
    if chosen is None:
        priced = [row for row in candidates if row["predicted_s"] is not None]
        chosen = min(priced, key=lambda row: row["predicted_s"])
    probe_s = time.perf_counter() - started
    probes = {f"{layers}:{key}": seconds for layers, model in models.items() for key, seconds in model.spent.items()}
    return SolverPlan(solver=chosen["solver"], layers=chosen["layers"], budget_s=budget, epoch_s=epoch_s,
                      predicted_s=chosen["predicted_s"], candidates=candidates, probe_s=probe_s,
                      within_budget=bool(chosen["fits"]), probes=probes)


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
           workload: Workload) -> tuple[Problem, torch.Tensor, torch.Tensor, InverseHessian]:
    """The problem, its training tensors and the inverse; ``solver: auto`` is resolved by
    :func:`plan_solver` for ``workload`` and the plan is kept on the inverse (``summary()``)."""
    problems: dict[str, Problem] = {}
    plan = None
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

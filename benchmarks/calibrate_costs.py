"""Fit the per-operation-class constants of the influence solver cost model.

``solver: auto`` (``cleanse.estimators.influence.plan_solver``) predicts each solver's cost by
counting its work (multiply-adds of forward/backward passes, per-sample gradients, curvature
products, dense products and eigendecompositions) and pricing each count by a constant of
``cleanse.estimators.influence.COST_CONSTANTS``. This script times the primitives and real code
paths on small MLPs (one thread), fits the constants (non-negative least squares where a time
has several parts) and prints them as the dict to paste, then checks the fitted model against
measured EK-FAC and exact solves. Run once per reference machine, not at scoring time:

    OMP_NUM_THREADS=1 python benchmarks/calibrate_costs.py     # about a minute
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from scipy.optimize import nnls

from cleanse.config import InfluenceOptions, ModelConfig
from cleanse.ekfac import EKFAC
from cleanse.estimators.influence import COST_CONSTANTS, CostModel, Workload, layer_shapes
from cleanse.models.architectures import spec_for
from cleanse.models.trainer import train_model
from cleanse.grads import FunctionalModel, curvature_fn, exact_hessian, exact_inverse, grad_dots, per_sample_grads

# (inputs, hidden..., classes): the default digits MLP and the speed benchmark's MLP
ARCHITECTURES = ((64, 64, 10), (256, 384, 128, 10), (64, 10))


def best(fn, repeats: int = 3) -> float:
    fn()  # warm-up (allocations, torch.func tracing)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)  # other processes only ever slow a run down


def mlp(sizes: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def data(sizes: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, sizes[0], generator=g), torch.randint(0, sizes[-1], (n,), generator=g)


def forward_macs(fm: FunctionalModel, x: torch.Tensor) -> int:
    return sum(s.n_in * s.out * s.positions for s in layer_shapes(fm, x[:1]))


def fit() -> dict[str, float]:
    c: dict[str, float] = {}
    for dtype, key in ((torch.float32, "mm"), (torch.float64, "mm64")):
        a = torch.randn(512, 512, dtype=dtype)
        c[key] = best(lambda: a @ a, 5) / (2 * 512**3)
    eigh = []
    for d in (256, 512, 768):
        a = torch.randn(d, d, dtype=torch.float64)
        s = a @ a.T
        eigh.append(best(lambda: torch.linalg.eigh(s), 2) / d**3)
    c["eigh"] = float(np.median(eigh))

    train_rows, train_times = [], []
    vmap_rows, vmap_times = [], []
    func = []
    for sizes in ARCHITECTURES:
        module = mlp(sizes)
        fm = FunctionalModel.of(module, 1e-3)
        x, y = data(sizes, 2048)
        forward, p = forward_macs(fm, x), fm.n_params
        # one epoch as the trainer runs it (Adam minibatches, L2, per-epoch bookkeeping)
        spec = spec_for("mlp", list(sizes[1:-1]), (sizes[0],), sizes[-1]) if len(sizes) > 2 else \
            spec_for("logreg", None, (sizes[0],), sizes[-1])
        features, labels = x.numpy(), y.numpy()
        for rows, batch in ((1024, 64), (2048, 64), (2048, 256)):
            config = ModelConfig(arch=spec.arch, hidden=list(sizes[1:-1]) or None, epochs=1, batch_size=batch,
                                 checkpoints=1)
            steps = math.ceil(rows / batch)
            train_rows.append([1, steps, steps * p, rows * 3 * forward])
            train_times.append(best(lambda: train_model(spec, features[:rows], labels[:rows], config, seed=0), 2))
        for rows in (256, 1024):
            vmap_rows.append([rows * 3 * forward, rows * p])
            vmap_times.append(best(lambda: per_sample_grads(fm, x[:rows], y[:rows]), 2))
        apply = curvature_fn(fm, x[:256], y[:256], "ggn")
        block = torch.randn(p, 8)
        func.append(best(lambda: apply(block), 2) / (8 * 256 * 4 * forward))
    (c["epoch"], c["step"], c["param_step"], c["mac"]), _ = nnls(np.array(train_rows, float), np.array(train_times))
    (c["vmap_mac"], c["vmap_entry"]), _ = nnls(np.array(vmap_rows, float), np.array(vmap_times))
    c["func_mac"] = float(np.median(func))
    # EK-FAC's fixed cost per layer, row chunk and labelling: the residual of its fits (factors and
    # quadratic forms) after the counted work, on the MLPs and logistic regression (one layer, C labels)
    COST_CONSTANTS.update(c, ekfac_call=0.0)
    calls, residuals = [], []
    for sizes in ARCHITECTURES:
        fm = FunctionalModel.of(mlp(sizes), 1e-3)
        x, y = data(sizes, 2048)
        costs = CostModel(fm, x[:1], x.shape[0], InfluenceOptions())
        for fisher in ("expected", "sampled"):
            def fit_and_forms() -> None:
                EKFAC(fm, x, y, damping=1e-3, fisher=fisher).quadratic_forms(x, y)
            def total(call: float) -> float:
                COST_CONSTANTS["ekfac_call"] = call
                return sum(costs.ekfac_seconds(fisher == "sampled").values()) + costs.ekfac_forms_seconds()
            predicted, count = total(0.0), total(1.0) - total(0.0)
            calls.append(count)
            residuals.append(best(fit_and_forms, 2) - predicted)
    (c["ekfac_call"],), _ = nnls(np.array(calls, float)[:, None], np.array(residuals))
    return {key: float(value) for key, value in c.items()}


def check() -> list[str]:
    """Predicted (with COST_CONSTANTS as set) against measured seconds of whole solver parts."""
    lines = []
    for sizes in ARCHITECTURES[:2]:
        fm = FunctionalModel.of(mlp(sizes), 1e-3)
        x, y = data(sizes, 4096)
        costs = CostModel(fm, x[:1], x.shape[0], InfluenceOptions())
        direction = torch.ones(fm.n_params)
        measured = {
            "grad_dots pass": best(lambda: grad_dots(fm, x, y, direction), 2),
            "ekfac fit": best(lambda: EKFAC(fm, x, y, damping=1e-3), 1),
            "ekfac sampled fit": best(lambda: EKFAC(fm, x, y, damping=1e-3, fisher="sampled"), 1),
        }
        predicted = {"grad_dots pass": costs.pass_seconds(x.shape[0]),
                     "ekfac fit": sum(costs.ekfac_seconds(False).values()),
                     "ekfac sampled fit": sum(costs.ekfac_seconds(True).values())}
        if fm.n_params <= 6000:  # timed once (no warm-up): minutes at 4,810 parameters
            started = time.perf_counter()
            exact_inverse(exact_hessian(fm, x[:1024], y[:1024], curvature="ggn"), 1e-3).quadratic_form(
                per_sample_grads(fm, x[:1024], y[:1024]))
            measured["exact (self), 1024 rows"] = time.perf_counter() - started
            predicted["exact (self), 1024 rows"] = sum(
                CostModel(fm, x[:1], 1024, InfluenceOptions()).predict("exact", Workload("self")).values())
        for key in measured:
            lines.append(f"{sizes} n={x.shape[0]} {key}: predicted {predicted[key]:.3f} s, measured "
                         f"{measured[key]:.3f} s (x{predicted[key] / measured[key]:.2f})")
    return lines


if __name__ == "__main__":
    torch.set_num_threads(1)
    started = time.perf_counter()
    fitted = fit()
    print("COST_CONSTANTS = {")
    for key, value in fitted.items():
        print(f'    "{key}": {value:.3e},')
    print("}")
    COST_CONSTANTS.update(fitted)
    print("\n".join(check()))
    print(f"calibration took {time.perf_counter() - started:.0f} s")
    assert all(math.isfinite(v) for v in fitted.values())

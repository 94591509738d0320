"""Speed benchmark: per-sample gradients and self-influence scoring time.

On synthetic data (``make_classification``, 256 features, 10 classes, 10% of the training labels
flipped uniformly to another class) and an MLP 256-384-128-10 (149,258 parameters) trained by
cleanse's own trainer (Adam, batch 256, 6 epochs, 3 checkpoints), for each n in the grid, in one
run:

1. per-sample gradient throughput: ``cleanse.grads.per_sample_grads`` (``vmap``) against a
   Python loop over samples (timed on a subset and extrapolated), the ``torch.func`` recipe on
   the parameter dict (a reference, not cleanse code) and cleanse's layer-wise squared norms;
2. scoring time of every registered cleanse estimator and of each peer (captum TracInCP and
   TracInCPFast, dattri TracIn / TRAK / explicit IF on the last layer, kronfluence EK-FAC), with
   the ROC-AUC and AP of each score against the flipped labels;
3. each scoring time divided by the time of one training epoch on the same data with the same
   batch size (and by the number of checkpoints the method reads): the distance to the physical
   limit of "one pass over the data per checkpoint".

A detector whose time, extrapolated linearly in n from the previous grid point, exceeds the
per-detector budget is skipped and the prediction recorded; the budget is also a hard limit.
Peers are optional imports (``benchmarks/setup_peers.sh`` builds ``.venv-bench``); absent ones
are recorded as skipped.

    .venv-bench/bin/python benchmarks/speed.py                  # full grid, n = 1k, 10k, 50k
    .venv/bin/python benchmarks/speed.py --grid smoke --out /tmp/speed.json --docs /tmp/bench.md

Writes the JSON to ``--out`` and rewrites the ``speed`` section of ``--docs`` (plus
``img/speed.png`` beside it).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # peers draw progress bars on every batch

import numpy as np
import torch
from _common import (
    REPO,
    RssMonitor,
    Stopwatch,
    TimeLimitExceeded,
    environment,
    fmt,
    jsonable,
    md_table,
    publish,
    relative_link,
    rerender,
    time_limit,
)

from cleanse import api

SECTION = "speed"
FLIP_FRACTION = 0.10
AUC_TOLERANCE = 0.01
TARGET_EPOCH_RATIO = 3.0  # self-influence <= 3 x one epoch per checkpoint
TARGET_SPEEDUP = 3.0  # >= 3x faster than the fastest peer at equal AUC
TARGET_INFLUENCE_EPOCHS = 5.0  # influence and influence_val (default solver: auto) <= 5 x one epoch
TARGET_PAIRWISE_EPOCHS = 2.0  # train -> query (8 probes) <= 2 x one epoch per checkpoint
TARGET_FINE_TRAINING_RUNS = 1.5  # f-INE <= 1.5 x one training run
N_PROBES = 8  # train -> query timing: the first 8 validation samples as probes
PAIRWISE = ("tracin", "influence")  # estimators whose train -> query cost is timed
# The layers a peer's score is computed on and its method, for comparisons of the same method on the
# same layers (a last-layer influence score against a last-layer influence peer).
PEER_LAYERS = {"captum TracInCPFast": "last", "captum TracInCP": "all", "dattri TracIn": "all", "dattri TRAK": "all",
               "dattri IF-explicit": "last", "kronfluence EK-FAC": "all"}
PEER_METHOD = {"captum TracInCPFast": "tracin", "captum TracInCP": "tracin", "dattri TracIn": "tracin",
               "dattri TRAK": "trak", "dattri IF-explicit": "influence", "kronfluence EK-FAC": "influence"}
PEER_ORDER = ["captum TracInCPFast", "captum TracInCP", "dattri TracIn", "dattri TRAK", "dattri IF-explicit",
              "kronfluence EK-FAC"]


@dataclass(frozen=True)
class Grid:
    """One benchmark configuration (``--grid``)."""

    ns: tuple[int, ...]
    n_val: int
    features: int
    informative: int
    classes: int
    hidden: tuple[int, ...]
    epochs: int
    batch_size: int
    checkpoints: int
    lr: float
    weight_decay: float
    budget_s: float
    memory_budget_mb: float
    loop_samples: int
    vmap_samples: int
    epoch_repeats: int
    proj_dim: int
    peer_batch: int


GRIDS = {
    "full": Grid(ns=(1_000, 10_000, 50_000), n_val=2_000, features=256, informative=32, classes=10, hidden=(384, 128),
                 epochs=6, batch_size=256, checkpoints=3, lr=1e-3, weight_decay=1e-3, budget_s=300.0,
                 memory_budget_mb=6_000.0, loop_samples=200, vmap_samples=1_024, epoch_repeats=3,
                 proj_dim=512, peer_batch=512),
    "smoke": Grid(ns=(200, 400), n_val=100, features=32, informative=8, classes=10, hidden=(32,), epochs=2,
                  batch_size=64, checkpoints=2, lr=1e-2, weight_decay=1e-3, budget_s=30.0, memory_budget_mb=2_000.0,
                  loop_samples=16, vmap_samples=64, epoch_repeats=1, proj_dim=16,
                  peer_batch=64),
}


# ----------------------------------------------------------------------------------------- data, model
@dataclass
class Problem:
    """One grid point: the data, the trained model and the timing denominator."""

    n: int
    prepared: Any  # cleanse.api.Prepared: the params, the staged splits, the trained model, its ScoringContext
    x: torch.Tensor
    y: torch.Tensor
    is_flipped: np.ndarray
    train_s: float
    epoch_s: float
    epoch_samples_s: list[float]
    train_samples_s: list[float]
    val_accuracy: float
    checkpoint_epochs: list[int]

    @property
    def context(self) -> Any:
        return self.prepared.context


def make_splits(n: int, grid: Grid, seed: int) -> tuple[Any, Any]:
    """``make_classification`` train/val splits; ``FLIP_FRACTION`` of the train labels flipped."""
    from sklearn.datasets import make_classification

    from cleanse.data.dataset import Split

    features, label = make_classification(
        n_samples=n + grid.n_val, n_features=grid.features, n_informative=grid.informative,
        n_redundant=grid.informative, n_classes=grid.classes, n_clusters_per_class=2, flip_y=0.0, random_state=seed,
    )
    features = features.astype(np.float32)
    label = label.astype(np.int64)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(n, int(round(FLIP_FRACTION * n)), replace=False)
    observed = label.copy()
    observed[flipped] = (label[flipped] + rng.integers(1, grid.classes, flipped.size)) % grid.classes
    is_flipped = np.zeros(n + grid.n_val, dtype=bool)
    is_flipped[flipped] = True

    def split(rows: slice) -> Split:
        ids = np.arange(n + grid.n_val, dtype=np.int64)[rows]
        return Split(ids, features[rows], observed[rows], label[rows], is_flipped[rows])

    return split(slice(0, n)), split(slice(n, n + grid.n_val))


def model_config(grid: Grid, epochs: int | None = None, checkpoints: int | None = None) -> Any:
    from cleanse.config import ModelConfig

    return ModelConfig(arch="mlp", hidden=list(grid.hidden), epochs=epochs or grid.epochs, batch_size=grid.batch_size,
                       lr=grid.lr, weight_decay=grid.weight_decay, optimizer="adam",
                       checkpoints=checkpoints or grid.checkpoints)


def bench_params(grid: Grid, seed: int, epochs: int | None = None, checkpoints: int | None = None) -> Any:
    """The run's params (embedded defaults) with the grid's model recipe and ``seed``."""
    from cleanse.config import load_params

    return load_params(None).model_copy(update={"model": model_config(grid, epochs, checkpoints), "seed": seed})


def make_staged(n: int, grid: Grid, seed: int) -> Any:
    """:func:`make_splits` as cleanse's staged data (no test split: nothing here is measured on one)."""
    from cleanse.data.dataset import DatasetMeta, StagedData

    train, val = make_splits(n, grid, seed)
    meta = DatasetMeta(name=f"make_classification-{n}", n_classes=grid.classes, feature_shape=(grid.features,),
                       corruption={"kind": "label_flip", "fraction": FLIP_FRACTION, "mode": "symmetric"})
    return StagedData(train=train, val=val, test=val.subset(np.zeros(0, dtype=np.int64)), meta=meta)


def build_problem(n: int, grid: Grid, seed: int) -> Problem:
    """Stage the data, train the model (checkpoints) and time one epoch separately."""
    from cleanse.models.trainer import predict_proba

    staged = make_staged(n, grid, seed)
    params, one_epoch = bench_params(grid, seed), bench_params(grid, seed, epochs=1, checkpoints=1)
    train, val = staged.train, staged.val
    # The first training in a process pays one-off costs (seconds: kernels, allocator), which would
    # inflate the training run that f-INE is divided by; a one-epoch run on a few rows takes them.
    api.fit(one_epoch, replace(staged, train=train.subset(np.arange(min(n, 256)))), device="cpu")
    with Stopwatch() as clock:
        trained = api.fit(params, staged, device="cpu")
    samples = []
    for _ in range(grid.epoch_repeats):  # the full training above warmed everything up
        with Stopwatch() as epoch_clock:
            api.fit(one_epoch, staged, device="cpu")
        samples.append(epoch_clock.seconds)
    val_accuracy = float((predict_proba(trained, val.features).argmax(1) == val.label).mean())
    prepared = api.Prepared(params, staged, trained, api.context(params, staged, trained, device="cpu"))
    x, y = prepared.context.tensors(train)
    return Problem(n=n, prepared=prepared, x=x, y=y, is_flipped=train.is_corrupted.copy(), train_s=clock.seconds,
                   train_samples_s=[clock.seconds],
                   epoch_s=float(np.min(samples)), epoch_samples_s=samples, val_accuracy=val_accuracy,
                   checkpoint_epochs=[c.epoch for c in trained.checkpoints])


def time_training(problem: Problem, grid: Grid, seed: int) -> tuple[float, float]:
    """Seconds of one epoch and of one whole training run on the problem's data, timed again."""
    out = []
    for params in (bench_params(grid, seed, epochs=1, checkpoints=1), bench_params(grid, seed)):
        with Stopwatch() as clock:
            api.fit(params, problem.prepared.staged, device="cpu")
        out.append(clock.seconds)
    return out[0], out[1]


# ----------------------------------------------------------------------------------- per-sample grads
def gradient_throughput(problem: Problem, grid: Grid) -> dict[str, Any]:
    """Samples/s of four ways to get per-sample gradients (or their norms) at the final model."""
    from torch.func import functional_call, grad, vmap

    from cleanse.grads import FunctionalModel, per_sample_grads, per_sample_sq_norms

    module = problem.context.model.module()
    fm = FunctionalModel.of(module, grid.weight_decay)
    x, y, n = problem.x, problem.y, problem.n
    m_vmap, m_loop = min(n, grid.vmap_samples), min(n, grid.loop_samples)
    out: dict[str, Any] = {}

    def record(name: str, measured_on: int, seconds: float, note: str) -> None:
        rate = measured_on / seconds
        out[name] = {"measured_on": measured_on, "seconds": seconds, "samples_per_s": rate,
                     "seconds_for_all_n": n / rate, "extrapolated": measured_on < n, "note": note}

    norms_vmap = []
    with Stopwatch() as clock:
        for start in range(0, m_vmap, 256):
            stop = min(start + 256, m_vmap)
            block = per_sample_grads(fm, x[start:stop], y[start:stop])
            norms_vmap.append(block.double().pow(2).sum(1))
    record("vmap (cleanse per_sample_grads)", m_vmap, clock.seconds,
           "vmap(grad) w.r.t. the flat parameter vector, chunks of 256; each (256, p) block is materialised")
    norms_vmap = torch.cat(norms_vmap)

    # FunctionalModel.of froze the module's own parameters; the loop differentiates through them.
    params = [parameter.requires_grad_(True) for parameter in module.parameters()]
    norms_loop = []
    with Stopwatch() as clock:
        for i in range(m_loop):
            loss = torch.nn.functional.cross_entropy(module(x[i:i + 1]), y[i:i + 1])
            flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
            norms_loop.append(flat.double().pow(2).sum())
    record("Python loop (autograd.grad per sample)", m_loop, clock.seconds,
           f"timed on the first {m_loop} samples, extrapolated linearly to n")
    norms_loop = torch.stack(norms_loop)

    named = {name: p.detach() for name, p in module.named_parameters()}

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(module, p, (xi[None],)), yi[None])

    per_dict = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    norms_dict = []
    with Stopwatch() as clock:
        for start in range(0, m_vmap, 256):
            stop = min(start + 256, m_vmap)
            grads = per_dict(named, x[start:stop], y[start:stop])
            block = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
            norms_dict.append(block.double().pow(2).sum(1))
    record("vmap over the parameter dict (torch.func recipe; reference, not cleanse)", m_vmap, clock.seconds,
           "vmap(grad) w.r.t. the dict of parameters, one cat per chunk of 256")
    norms_dict = torch.cat(norms_dict)

    with Stopwatch() as clock:
        norms_layer = per_sample_sq_norms(fm, x, y)
    record("layer-wise squared norms (cleanse per_sample_sq_norms)", n, clock.seconds,
           "||a||^2 ||delta||^2 per Linear layer: one forward + backward per chunk, no per-sample gradient")

    reference = norms_layer[:m_vmap]
    scale = float(reference.abs().max().clamp_min(1e-30))
    out["max_relative_disagreement"] = {
        "vmap_vs_layerwise": float((norms_vmap - reference).abs().max()) / scale,
        "param_dict_vs_layerwise": float((norms_dict - reference).abs().max()) / scale,
        "loop_vs_layerwise": float((norms_loop - norms_layer[:m_loop]).abs().max()) / scale,
    }
    return out


# --------------------------------------------------------------------------------------- detectors
@dataclass
class Detector:
    """A named scorer: ``run(problem) -> (scores, extra metadata)``; higher score = more suspicious."""

    name: str
    tool: str
    checkpoints: Callable[[Problem], int]
    run: Callable[[Problem], tuple[np.ndarray, dict[str, Any]]]
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    order: int = 1  # time grows like n ** order (for the extrapolation between grid points)
    memory_order: int = 0  # 1: peak memory grows with n (whole training set at once); 0: bounded by a batch


def _cleanse_options(name: str, grid: Grid) -> Any:
    from cleanse.config import InfluenceOptions
    from cleanse.estimators import registry

    if name in ("influence", "influence_val"):
        return InfluenceOptions()  # the default (solver: auto), as users run it
    if name == "influence_val [cg]":
        return InfluenceOptions(solver="cg")
    if name == "memorization":  # K = 1,000 models of this MLP exceed the budget; benchmarks/memorization.py times K = 1,000
        from cleanse.config import MemorizationOptions

        return MemorizationOptions(n_models=32, shard_size=32)
    return registry.get(name).options_type()


def classification_estimators() -> list[str]:
    """The registered estimators that support the classification family (others, e.g. a GAN's, refuse it)."""
    from cleanse.estimators import registry

    return registry.names_for("classification")


def cleanse_detectors(grid: Grid) -> list[Detector]:
    """Every registered estimator of the classification family (the benchmark's problem) with its
    default options (a new estimator is picked up as is), plus ``influence_val [cg]``: validation
    influence with the CG solver forced (the old benchmark configuration), for comparison with the
    ``auto`` choice."""
    notes = {
        "tracin": "all layers, all checkpoints, layer-wise norms",
        "loss": "final training loss (one forward pass)",
        "influence_val": "default options (solver auto: the most accurate solver predicted to fit 5 epochs)",
        "influence": "default options (solver auto: the most accurate solver predicted to fit 5 epochs)",
        "influence_val [cg]": "solver cg forced (EK-FAC-preconditioned, cg_max_iter 100), all layers",
        "cleanlab": "time includes the 5-fold cross-validation training",
        "fine": "default options; the ratio that matters is to the training run (x epoch / 6 epochs)",
    }
    detectors = []
    for name in [*classification_estimators(), "influence_val [cg]"]:
        options = _cleanse_options(name, grid)

        def run(problem: Problem, estimator: str = name.split(" ")[0],
                options: Any = options) -> tuple[np.ndarray, dict[str, Any]]:
            result = api.score_result(problem.prepared, estimator, options)
            return result.table["score"].to_numpy(), {"estimator_meta": result.meta}

        def checkpoints(problem: Problem, name: str = name) -> int:
            return len(problem.context.model.checkpoints) if name == "tracin" else 1

        detectors.append(Detector(name=name, tool="cleanse", checkpoints=checkpoints, run=run,
                                  options=options.model_dump(mode="json"), note=notes.get(name, ""),
                                  memory_order=0 if name in ("tracin", "influence", "influence_val") else 1))
    return detectors


def pairwise_timing(problem: Problem, grid: Grid, names: tuple[str, ...] = PAIRWISE) -> list[dict[str, Any]]:
    """Train -> query cost: each estimator's ``pairwise`` against ``N_PROBES`` validation samples
    (default options), in seconds, x one epoch, and x one epoch per checkpoint read."""
    from cleanse.data.dataset import Split
    from cleanse.estimators import registry

    val = problem.context.val
    rows = slice(0, N_PROBES)
    probes = Split(val.sample_id[rows], val.features[rows], val.label[rows], val.label_clean[rows],
                   val.is_corrupted[rows])
    out = []
    for name in names:
        estimator = registry.get(name)
        options = _cleanse_options(name, grid)
        checkpoints = len(problem.context.model.checkpoints) if name == "tracin" else 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Stopwatch() as clock:
                matrix = estimator.pairwise(problem.context, options, probes)
        out.append({"name": name, "probes": N_PROBES, "seconds": clock.seconds, "checkpoints": checkpoints,
                    "ratio_to_epoch": clock.seconds / problem.epoch_s,
                    "ratio_per_checkpoint": clock.seconds / problem.epoch_s / checkpoints,
                    "shape": list(matrix.shape), "finite": bool(np.isfinite(matrix).all())})
        print(f"[speed] n = {problem.n:,}: pairwise {name:<12} {clock.seconds:9.3f} s "
              f"({out[-1]['ratio_per_checkpoint']:.2f} x epoch per checkpoint)", flush=True)
    return out


def _peer_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("captum", "dattri", "kronfluence", "cleanlab"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _fresh_model(problem: Problem, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    from cleanse.models.architectures import build_model

    module = build_model(problem.context.model.spec)
    module.load_state_dict(state or problem.context.model.state)
    return module.eval()


def _last_layer_name(module: torch.nn.Module) -> str:
    return [name for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)][-1]


def _checkpoint_files(problem: Problem, folder: Path) -> list[str]:
    """captum reads checkpoints from files holding the state dict plus ``learning_rate``."""
    paths = []
    for i, checkpoint in enumerate(problem.context.model.checkpoints):
        path = folder / f"checkpoint_{i:02d}.pt"
        if not path.exists():
            torch.save({**checkpoint.state, "learning_rate": checkpoint.lr}, path)
        paths.append(str(path))
    return paths


def _load_checkpoint(model: torch.nn.Module, path: str) -> float:
    state = torch.load(path, weights_only=True)
    learning_rate = float(state.pop("learning_rate"))
    model.load_state_dict(state)
    return learning_rate


def _loader(problem: Problem, batch_size: int, x: torch.Tensor | None = None) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(problem.x if x is None else x, problem.y), batch_size=batch_size, shuffle=False)


def peer_detectors(grid: Grid, scratch: Path) -> tuple[list[Detector], dict[str, str]]:
    """The peer scorers whose package imports, and ``{name: reason}`` for those that do not."""
    from torch import nn

    detectors: list[Detector] = []
    missing: dict[str, str] = {}
    n_ckpt = lambda problem: len(problem.context.model.checkpoints)
    one = lambda problem: 1

    try:
        from captum.influence import TracInCP, TracInCPFast
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        for name in PEER_ORDER[:2]:
            missing[name] = f"captum not importable ({type(exc).__name__}: {exc})"
    else:
        def captum_fast(problem: Problem) -> tuple[np.ndarray, dict[str, Any]]:
            model = _fresh_model(problem)
            paths = _checkpoint_files(problem, scratch / f"n{problem.n}")
            tracin = TracInCPFast(model, _last_layer_name(model), _loader(problem, 2048), paths,
                                  checkpoints_load_func=_load_checkpoint, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
            return tracin.self_influence(outer_loop_by_checkpoints=True).detach().numpy(), {}

        def captum_cp(problem: Problem) -> tuple[np.ndarray, dict[str, Any]]:
            model = _fresh_model(problem)
            paths = _checkpoint_files(problem, scratch / f"n{problem.n}")
            tracin = TracInCP(model, _loader(problem, grid.peer_batch), paths, checkpoints_load_func=_load_checkpoint,
                              loss_fn=nn.CrossEntropyLoss(reduction="sum"), sample_wise_grads_per_batch=True)
            return tracin.self_influence(outer_loop_by_checkpoints=True).detach().numpy(), {}

        detectors += [
            Detector("captum TracInCPFast", "captum", n_ckpt, captum_fast, {"final_fc_layer": "last Linear"},
                     "last layer only, all checkpoints, loss reduction=sum, batch 2048"),
            Detector("captum TracInCP", "captum", n_ckpt, captum_cp, {"layers": "all", "sample_wise_grads_per_batch": True},
                     f"all layers, all checkpoints, batch {grid.peer_batch}"),
        ]

    try:
        from dattri.algorithm.influence_function import IFAttributorExplicit
        from dattri.algorithm.tracin import TracInAttributor
        from dattri.algorithm.trak import TRAKAttributor
        from dattri.task import AttributionTask
    except Exception as exc:  # noqa: BLE001
        for name in PEER_ORDER[2:5]:
            missing[name] = f"dattri not importable ({type(exc).__name__}: {exc})"
    else:
        def projector() -> dict[str, Any]:  # a fresh dict: dattri mutates its module-level default
            return {"proj_dim": grid.proj_dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}

        def dattri_tracin(problem: Problem) -> tuple[np.ndarray, dict[str, Any]]:
            model = _fresh_model(problem)

            def loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
                xi, yi = data
                return nn.functional.cross_entropy(torch.func.functional_call(model, params, xi.unsqueeze(0)), yi.unsqueeze(0))

            checkpoints = problem.context.model.checkpoints
            task = AttributionTask(loss_func=loss, model=model, checkpoints=[c.state for c in checkpoints])
            attributor = TracInAttributor(task, weight_list=torch.tensor([c.lr for c in checkpoints]),
                                          normalized_grad=False, projector_kwargs=projector(), device="cpu")
            return attributor.self_attribute(_loader(problem, 256)).detach().numpy(), {}

        def dattri_trak(problem: Problem) -> tuple[np.ndarray, dict[str, Any]]:
            model = _fresh_model(problem)

            def loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
                xi, yi = data
                return nn.functional.cross_entropy(torch.func.functional_call(model, params, xi.unsqueeze(0)), yi.unsqueeze(0))

            def correct_probability(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
                return torch.exp(-loss(params, data))

            task = AttributionTask(loss_func=loss, model=model, checkpoints=[problem.context.model.state])
            # no .cache() (it breaks self_attribute in 0.3.0); the loader is passed instead
            attributor = TRAKAttributor(task, correct_probability_func=correct_probability, projector_kwargs=projector(),
                                        device="cpu", regularization=1e-3)
            return attributor.self_attribute(_loader(problem, 256)).detach().numpy(), {}

        def dattri_if_explicit(problem: Problem) -> tuple[np.ndarray, dict[str, Any]]:
            # dattri builds the Hessian through the whole network even with layer_name set, so the last
            # layer is given as the model and the frozen penultimate features as the data (same function
            # of the last-layer parameters); one batch = the whole training set, because its
            # transform_test_rep sums H_b^-1 v over batches (exact only for a single batch).
            model = _fresh_model(problem)
            last = _last_layer_name(model)
            body = nn.Sequential(*list(model.children())[:-1])
            with torch.no_grad():
                penultimate = body(problem.x)
            head = nn.Linear(penultimate.shape[1], problem.context.meta.n_classes)
            head.load_state_dict({"weight": model.get_submodule(last).weight, "bias": model.get_submodule(last).bias})

            def loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
                xi, yi = data
                return nn.functional.cross_entropy(torch.func.functional_call(head, params, xi), yi)

            task = AttributionTask(loss_func=loss, model=head, checkpoints=[head.state_dict()])
            attributor = IFAttributorExplicit(task, device="cpu", regularization=1e-3)
            loader = _loader(problem, problem.n, x=penultimate)
            attributor.cache(loader)
            return attributor.self_attribute(loader).detach().numpy(), {}

        detectors += [
            Detector("dattri TracIn", "dattri", n_ckpt, dattri_tracin, {"proj_dim": grid.proj_dim},
                     f"all layers, all checkpoints, random projection to {grid.proj_dim} (always on in dattri)"),
            Detector("dattri TRAK", "dattri", one, dattri_trak, {"proj_dim": grid.proj_dim, "regularization": 1e-3},
                     f"final model, projection {grid.proj_dim}, regularization 1e-3"),
            Detector("dattri IF-explicit", "dattri", one, dattri_if_explicit, {"regularization": 1e-3},
                     "last layer only (frozen features), explicit Hessian, one batch = the whole training set, "
                     "regularization 1e-3", memory_order=1),
        ]

    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except Exception as exc:  # noqa: BLE001
        missing[PEER_ORDER[5]] = f"kronfluence not importable ({type(exc).__name__}: {exc})"
    else:
        class ClassificationTask(Task):
            def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
                inputs, labels = batch
                logits = model(inputs)
                if sample:  # the true Fisher samples labels from the model
                    with torch.no_grad():
                        labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
                return nn.functional.cross_entropy(logits, labels, reduction="sum")

            def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
                return self.compute_train_loss(batch, model)

        def kronfluence_ekfac(problem: Problem) -> tuple[np.ndarray, dict[str, Any]]:
            import logging

            from torch.utils.data import TensorDataset

            task = ClassificationTask()
            model = prepare_model(_fresh_model(problem), task)
            dataset = TensorDataset(problem.x, problem.y)
            with tempfile.TemporaryDirectory(dir=scratch) as output:
                analyzer = Analyzer(analysis_name="speed", model=model, task=task, cpu=True, disable_tqdm=True,
                                    output_dir=output, log_level=logging.WARNING)
                with Stopwatch() as factors:
                    analyzer.fit_all_factors(factors_name="ekfac", dataset=dataset, per_device_batch_size=grid.peer_batch,
                                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
                analyzer.compute_self_scores(scores_name="self", factors_name="ekfac", train_dataset=dataset,
                                             per_device_train_batch_size=grid.peer_batch,
                                             score_args=ScoreArguments(damping_factor=1e-3), overwrite_output_dir=True)
                scores = analyzer.load_self_scores("self")["all_modules"]
            return scores.detach().numpy(), {"factor_fit_s": factors.seconds}

        detectors.append(Detector("kronfluence EK-FAC", "kronfluence", one, kronfluence_ekfac, {"damping_factor": 1e-3},
                                  "final model, EK-FAC factors fitted on the training set, damping 1e-3"))
    return detectors, missing


# -------------------------------------------------------------------------------------------- runner
@dataclass
class History:
    """What each detector did at earlier grid points (for the linear extrapolation)."""

    last: dict[str, dict[str, Any]] = field(default_factory=dict)

    def predict(self, name: str, n: int, order: int = 1, memory_order: int = 0) -> tuple[float | None, float | None, int | None]:
        """Predicted seconds (growing like ``n ** order``) and extra MiB (like ``n ** memory_order``;
        ``None`` for batch-bound memory) at ``n`` from the last grid point."""
        previous = self.last.get(name)
        if previous is None:
            return None, None, None
        factor = n / previous["n"]
        seconds = previous.get("seconds") or previous.get("predicted_seconds")
        memory = previous.get("peak_rss_delta_mb") or previous.get("predicted_peak_rss_delta_mb")
        memory = memory * factor**memory_order if memory and memory > 0 and memory_order > 0 else None
        return (seconds * factor**order if seconds else None), memory, previous["n"]


def run_detector(detector: Detector, problem: Problem, grid: Grid, history: History) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    record: dict[str, Any] = {"name": detector.name, "tool": detector.tool, "options": detector.options,
                              "note": detector.note, "checkpoints": detector.checkpoints(problem)}
    predicted_s, predicted_mb, from_n = history.predict(detector.name, problem.n, detector.order, detector.memory_order)
    if from_n is not None:
        record["predicted_from"] = f"n = {from_n:,}, " + ("linear in n" if detector.order == 1 else f"n^{detector.order}")
    record["predicted_seconds"] = predicted_s
    record["predicted_peak_rss_delta_mb"] = predicted_mb
    if predicted_s is not None and predicted_s > grid.budget_s:
        record.update(status="skipped", reason=f"predicted {predicted_s:,.0f} s > budget {grid.budget_s:,.0f} s")
        return record
    if predicted_mb is not None and predicted_mb > grid.memory_budget_mb:
        record.update(status="skipped",
                      reason=f"predicted peak RSS +{predicted_mb:,.0f} MiB > budget {grid.memory_budget_mb:,.0f} MiB")
        return record

    gc.collect()
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught, RssMonitor() as memory, Stopwatch() as clock, \
                time_limit(grid.budget_s):
            warnings.simplefilter("always")
            scores, extra = detector.run(problem)
    except TimeLimitExceeded:
        record.update(status="timeout", seconds=None, predicted_seconds=grid.budget_s,
                      reason=f"stopped at the {grid.budget_s:,.0f} s budget (a lower bound)")
        return record
    except Exception as exc:  # noqa: BLE001 - a peer failing must not stop the benchmark
        record.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        return record
    finally:
        messages = sorted({str(w.message).splitlines()[0][:200] for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))})
        if messages:
            record["warnings"] = messages[:5]
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    record.update(status="ok", seconds=clock.seconds, peak_rss_delta_mb=memory.delta_mb, extra=jsonable(extra))
    if scores.shape[0] != problem.n or not np.isfinite(scores).all():
        record.update(auc=None, ap=None, score_problem=f"{scores.shape[0]} scores, {int((~np.isfinite(scores)).sum())} non-finite")
    else:
        record.update(auc=float(roc_auc_score(problem.is_flipped, scores)),
                      ap=float(average_precision_score(problem.is_flipped, scores)))
    return record


def add_ratios(record: dict[str, Any], epoch_s: float) -> None:
    seconds = record.get("seconds") or (record.get("predicted_seconds") if record.get("status") != "ok" else None)
    if seconds is None:
        return
    key = "" if record.get("status") == "ok" else "predicted_"
    record[f"{key}ratio_to_epoch"] = seconds / epoch_s
    record[f"{key}ratio_per_checkpoint"] = seconds / epoch_s / max(record["checkpoints"], 1)


def detector_layers(record: dict[str, Any]) -> str | None:
    """The layers a detector's score reads: a peer's from :data:`PEER_LAYERS`; cleanse influence's
    from the solver ``auto`` chose (its metadata); TracIn reads all layers."""
    if record["tool"] != "cleanse":
        return PEER_LAYERS.get(record["name"])
    meta = (record.get("extra") or {}).get("estimator_meta") or {}
    if "layers" in meta:
        return meta["layers"]
    return "all" if record["name"] in ("tracin", "trak", "influence_fvm") else None


def compare(detectors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each cleanse detector: the fastest peer whose AUC is within ``AUC_TOLERANCE`` (any method,
    any layers), and the fastest such peer of the same method on the same layers (a last-layer
    influence score against a last-layer influence peer). "Fastest" and the speed-ups compare
    seconds per epoch of the run each row was measured in (``ratio_to_epoch``): within one run that
    is the ratio of seconds, and for rows carried over from an earlier run it cancels the
    machine's different load."""
    ok = [d for d in detectors if d.get("status") == "ok" and d.get("auc") is not None]
    peers = [d for d in ok if d["tool"] != "cleanse"]
    cost = lambda d: d["ratio_to_epoch"]  # noqa: E731
    rows = []
    for mine in (d for d in ok if d["tool"] == "cleanse"):
        equal = [p for p in peers if abs(p["auc"] - mine["auc"]) <= AUC_TOLERANCE]
        better = [p for p in peers if p["auc"] > mine["auc"] + AUC_TOLERANCE]
        fastest_equal = min(equal, key=cost, default=None)
        layers = detector_layers(mine)
        method = mine["name"].split(" ")[0].removesuffix("_val")
        same = min((p for p in equal if layers is not None and PEER_LAYERS.get(p["name"]) == layers
                    and PEER_METHOD.get(p["name"]) == method), key=cost, default=None)
        fastest = min(peers, key=cost, default=None)
        rows.append({
            "cleanse": mine["name"], "auc": mine["auc"], "seconds": mine["seconds"], "layers": layers,
            "fastest_peer_equal_auc_same_layers": same and same["name"],
            "speedup_vs_fastest_peer_equal_auc_same_layers": same and cost(same) / cost(mine),
            "fastest_peer_equal_auc": fastest_equal and fastest_equal["name"],
            "fastest_peer_equal_auc_auc": fastest_equal and fastest_equal["auc"],
            "fastest_peer_equal_auc_seconds": fastest_equal and fastest_equal["seconds"],
            "speedup_vs_fastest_peer_equal_auc": fastest_equal and cost(fastest_equal) / cost(mine),
            "fastest_peer": fastest and fastest["name"],
            "fastest_peer_auc": fastest and fastest["auc"],
            "speedup_vs_fastest_peer": fastest and cost(fastest) / cost(mine),
            "peers_with_higher_auc": [p["name"] for p in better],
        })
    return rows


def _target(target: str, measured: float | None, limit: float, **extra: Any) -> dict[str, Any]:
    return {"target": target, "measured": measured, "met": None if measured is None else measured <= limit, **extra}


def headline(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets, read at the largest n of the grid (f-INE: at every n >= 10,000)."""
    last = runs[-1]
    by_name = {d["name"]: d for d in last["detectors"]}
    tracin = by_name.get("tracin")
    ratio = tracin.get("ratio_per_checkpoint") if tracin else None
    row = next((c for c in last["comparisons"] if c["cleanse"] == "tracin"), None)
    speedup = row and row["speedup_vs_fastest_peer_equal_auc"]
    out: dict[str, Any] = {
        "n": last["n"],
        "self_influence_epoch_ratio": {
            "detector": "tracin", "target": f"<= {TARGET_EPOCH_RATIO:g} x one epoch per checkpoint",
            "measured": ratio, "met": None if ratio is None else ratio <= TARGET_EPOCH_RATIO,
            "by_n": {str(r["n"]): next((d.get("ratio_per_checkpoint") for d in r["detectors"] if d["name"] == "tracin"), None)
                     for r in runs},
        },
        "speedup_vs_fastest_peer_at_equal_auc": {
            "detector": "tracin", "target": f">= {TARGET_SPEEDUP:g}x faster than the fastest peer with |dAUC| <= {AUC_TOLERANCE}",
            "measured": speedup, "peer": row and row["fastest_peer_equal_auc"],
            "met": None if speedup is None else speedup >= TARGET_SPEEDUP,
            "note": None if speedup is not None else (
                "no peer ran" if not any(d["tool"] != "cleanse" and d.get("status") == "ok" for d in last["detectors"])
                else "no peer reached an AUC within the tolerance"),
        },
    }
    for name in ("influence", "influence_val"):
        record = by_name.get(name) or {}
        measured = record.get("ratio_to_epoch") if record.get("status") == "ok" else None
        meta = (record.get("extra") or {}).get("estimator_meta") or {}
        out[f"{name}_epoch_ratio"] = _target(
            f"{name} (default solver auto) <= {TARGET_INFLUENCE_EPOCHS:g} x one epoch", measured,
            TARGET_INFLUENCE_EPOCHS, detector=name, auc=record.get("auc"), chosen=(meta.get("auto") or {}).get("chosen"),
            status=record.get("status"), reason=record.get("reason"))
    pairwise = last.get("pairwise") or []
    worst = max(pairwise, key=lambda r: r["ratio_per_checkpoint"], default=None)
    out["pairwise_epoch_ratio"] = _target(
        f"train -> query ({N_PROBES} probes) <= {TARGET_PAIRWISE_EPOCHS:g} x one epoch per checkpoint",
        worst and worst["ratio_per_checkpoint"], TARGET_PAIRWISE_EPOCHS,
        by_estimator={r["name"]: r["ratio_per_checkpoint"] for r in pairwise})
    fine = {str(r["n"]): d["seconds"] / r["train_s"] for r in runs for d in r["detectors"]
            if d["name"] == "fine" and d.get("status") == "ok" and r["n"] >= 10_000}
    out["fine_training_ratio"] = _target(
        f"fine <= {TARGET_FINE_TRAINING_RUNS:g} x one training run (n >= 10,000)", max(fine.values(), default=None),
        TARGET_FINE_TRAINING_RUNS, by_n=fine)
    return out


# ------------------------------------------------------------------------------------------- docs
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 6.2))
    names = [d["name"] for d in runs[0]["detectors"]]
    colors = plt.get_cmap("tab20").colors
    for index, name in enumerate(names):
        points = [(r["n"], d["ratio_per_checkpoint"]) for r in runs for d in r["detectors"]
                  if d["name"] == name and d.get("status") == "ok" and d.get("ratio_per_checkpoint")]
        if not points:
            continue
        tool = next(d["tool"] for d in runs[0]["detectors"] if d["name"] == name)
        left.plot(*zip(*points), marker="o" if tool == "cleanse" else "s", color=colors[(2 * index) % 20 + index // 10],
                  linestyle="-" if tool == "cleanse" else "--",
                  linewidth=2.2 if tool == "cleanse" else 1.2, label=name if tool != "cleanse" else f"cleanse {name}")
    left.axhline(TARGET_EPOCH_RATIO, color="grey", linestyle=":", linewidth=1)
    left.text(runs[0]["n"], TARGET_EPOCH_RATIO * 1.08, f"target {TARGET_EPOCH_RATIO:g}", color="grey", fontsize=8)
    left.set(xscale="log", yscale="log", xlabel="training samples n",
             ylabel="scoring time / (one epoch x checkpoints)", title="Scoring time per checkpoint, in training epochs")
    left.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    left.grid(True, which="both", alpha=0.3)
    methods = [k for k in runs[0]["throughput"] if k != "max_relative_disagreement"]
    for method in methods:
        right.plot([r["n"] for r in runs], [r["throughput"][method]["samples_per_s"] for r in runs], marker="o",
                   label=method)
    right.set(xscale="log", yscale="log", xlabel="training samples n", ylabel="samples / s",
              title="Per-sample gradient throughput")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    right.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render(result: dict[str, Any], docs: Path, out: Path, image: Path) -> str:
    config, env, runs, head = result["config"], result["environment"], result["runs"], result["headline"]
    lines = [
        "## Speed",
        "",
        f"*Generated by `benchmarks/speed.py --grid {result['grid']}` on {env['created']} (commit "
        f"`{(env['git_commit'] or 'unknown')[:12]}`, {env['python']}, torch {env['torch']}); raw numbers in "
        f"`{relative_link(out, REPO) if out.resolve().is_relative_to(REPO) else out.name}`. "
        f"Whole run: {result['total_seconds']:,.0f} s.*",
        "",
        f"**Setup.** `make_classification` ({config['features']} features, {config['classes']} classes), "
        f"{FLIP_FRACTION:.0%} of the training labels flipped uniformly to another class (the AUC/AP ground truth), "
        f"{config['n_val']:,} clean validation samples. MLP {config['architecture']} ({config['n_params']:,} parameters) "
        f"trained by cleanse's trainer: Adam lr {config['lr']:g}, L2 {config['weight_decay']:g}, batch "
        f"{config['batch_size']}, {config['epochs']} epochs, checkpoints at epochs {runs[0]['checkpoint_epochs']}. "
        "**One epoch** = `train_model` for one epoch on the same data and batch size, the fastest of "
        f"{config['epoch_repeats']} runs before the detectors and one after them (other jobs only slow a run down, so "
        "the ratios err high); it is the denominator of every ratio. **One training run** (f-INE's denominator) = "
        f"the fastest of the timed training and one retraining after the detectors. Per-detector budget {config['budget_s']:,.0f} s "
        "and +" f"{config['memory_budget_mb']:,.0f} MiB of peak RSS: a detector predicted to exceed either (time linear in n "
        "from the previous n; memory only for methods that hold the whole training set at once) is skipped and the "
        "prediction recorded; the time budget is also a hard limit. cleanse's estimators run with their default "
        "options, as users run them (`influence` and `influence_val`: `solver: auto`); `influence_val [cg]` forces "
        "the CG solver for comparison."
        + (f" Only these cleanse detectors were run: {', '.join(config['only'])}." if config.get("only") else "")
        + (" Rows marked *carried over* (every peer, and the cleanse detectors not run) were not rerun: they come "
           f"from the earlier results file `{Path(config['peers_from']).name}` (created {_carried_date(runs)}, same "
           "grid, data and model, measured under a different load and an earlier version of cleanse, so compare "
           "their seconds with care)." if config.get("peers_from") else ""),
        "",
        f"**Machine.** A shared {env['cpu_count']}-core VM (other developers' jobs ran at the same time: load average "
        f"{env['load_average_start'][0]:.1f} at the start, {env['load_average_end'][0]:.1f} at the end). torch ran "
        f"with {env['torch_threads']} thread(s): with 2 threads on the loaded machine an epoch took 10–40x longer "
        "(OpenMP threads spinning against other processes), so single-thread timings are the reproducible ones. "
        "Absolute seconds are noisy; the ratios are measured in the same run and are the numbers to quote.",
        "",
        f"### Targets (n = {head['n']:,})",
        "",
    ]
    ratio, speed = head["self_influence_epoch_ratio"], head["speedup_vs_fastest_peer_at_equal_auc"]
    speed_text = "–" if speed["measured"] is None else f"{speed['measured']:.2f}x vs {speed['peer']}"
    rows = [
        [f"cleanse TracIn self-influence {ratio['target']}", "–" if ratio["measured"] is None else
         f"{ratio['measured']:.2f}x (by n: " + ", ".join(f"{int(k):,}: {fmt(v)}" for k, v in ratio["by_n"].items()) + ")",
         fmt(ratio["met"])],
        [f"cleanse TracIn self-influence {speed['target']}", speed_text + (f" ({speed['note']})" if speed["note"] else ""),
         fmt(speed["met"])],
    ]
    for key in ("influence_epoch_ratio", "influence_val_epoch_ratio"):
        target = head.get(key)
        if target:
            measured = ("–" if target["measured"] is None else f"{target['measured']:.2f}x, {target['chosen']}, AUC "
                        f"{fmt(target['auc'], 4)}") if target["status"] == "ok" else f"{target['status']}: {target['reason']}"
            rows.append([target["target"], measured, fmt(target["met"])])
    if head.get("pairwise_epoch_ratio"):
        target = head["pairwise_epoch_ratio"]
        rows.append([target["target"], ", ".join(f"{k} {v:.2f}x" for k, v in target["by_estimator"].items()) or "–",
                     fmt(target["met"])])
    if head.get("fine_training_ratio"):
        target = head["fine_training_ratio"]
        rows.append([target["target"], ", ".join(f"n = {int(k):,}: {v:.2f}x" for k, v in target["by_n"].items()) or "–",
                     fmt(target["met"])])
    lines += [md_table(["target", "measured", "met"], rows), ""]
    lines += _auto_section(runs) + _pairwise_section(runs)

    lines += ["### Per-sample gradients", "",
              "Samples per second at the final model; *s for all n* is measured where *measured on* = n and "
              "extrapolated linearly otherwise (the loop and the vmap paths are timed on a subset: materialising "
              "all per-sample gradients would need n x p x 4 bytes).", ""]
    rows = []
    for run in runs:
        for method, value in run["throughput"].items():
            if method == "max_relative_disagreement":
                continue
            rows.append([f"{run['n']:,}", method, f"{value['measured_on']:,}", fmt(value["samples_per_s"], 0),
                         fmt(value["seconds_for_all_n"]) + (" (extrapolated)" if value["extrapolated"] else "")])
    lines += [md_table(["n", "method", "measured on", "samples/s", "s for all n"], rows), ""]
    dis = runs[-1]["throughput"]["max_relative_disagreement"]
    lines += ["Agreement of the squared gradient norms (max relative difference to the layer-wise norms): "
              + ", ".join(f"{k.replace('_', ' ')} {v:.1e}" for k, v in dis.items()) + ".", ""]

    lines += ["### Self-influence scoring time", "",
              "*x epoch* = scoring seconds / one epoch; *x epoch/ckpt* divides further by the checkpoints the "
              "method reads (1 for final-model methods). AUC and AP against the flipped labels. Skipped rows show "
              "the predicted time in italics.", ""]
    for run in runs:
        lines += [f"**n = {run['n']:,}**: one epoch {run['epoch_s']:.3f} s, training ({config['epochs']} epochs) "
                  f"{run['train_s']:.2f} s, validation accuracy {run['val_accuracy']:.3f}.", ""]
        rows = []
        for d in run["detectors"]:
            ok = d.get("status") == "ok"
            seconds = fmt(d.get("seconds")) if ok else (f"*{fmt(d.get('predicted_seconds'), 0)}*" if d.get("predicted_seconds") else "–")
            ratio_epoch = fmt(d.get("ratio_to_epoch")) if ok else (f"*{fmt(d.get('predicted_ratio_to_epoch'))}*" if d.get("predicted_ratio_to_epoch") else "–")
            ratio_ckpt = fmt(d.get("ratio_per_checkpoint")) if ok else (f"*{fmt(d.get('predicted_ratio_per_checkpoint'))}*" if d.get("predicted_ratio_per_checkpoint") else "–")
            status = d["status"] if ok else f"{d['status']}: {d.get('reason', '')}"
            if d.get("carried_from"):
                status += " (carried over)"
            rows.append([d["name"] if d["tool"] != "cleanse" else f"**{d['name']}**", d["tool"], status, seconds,
                         ratio_epoch, ratio_ckpt, d["checkpoints"], fmt(d.get("auc"), 4), fmt(d.get("ap"), 4),
                         fmt(d.get("peak_rss_delta_mb"), 0)])
        lines += [md_table(["detector", "tool", "status", "s", "x epoch", "x epoch/ckpt", "ckpts", "AUC", "AP",
                            "+RSS MiB"], rows), ""]

    last = runs[-1]
    lines += [f"### cleanse against the peers (n = {last['n']:,})", "",
              f"*equal AUC* = |AUC difference| <= {AUC_TOLERANCE}; speed-up = peer x epoch / cleanse x epoch "
              "(> 1: cleanse is faster). Only peers that ran count.", ""]
    rows = [[c["cleanse"], c.get("layers") or "–", fmt(c["auc"], 4), fmt(c["seconds"], 3),
             c["fastest_peer_equal_auc"] or "none", fmt(c["fastest_peer_equal_auc_auc"], 4),
             fmt(c["fastest_peer_equal_auc_seconds"], 3), fmt(c["speedup_vs_fastest_peer_equal_auc"]),
             c.get("fastest_peer_equal_auc_same_layers") or "none",
             fmt(c.get("speedup_vs_fastest_peer_equal_auc_same_layers")),
             c["fastest_peer"] or "none", fmt(c["speedup_vs_fastest_peer"]),
             ", ".join(c["peers_with_higher_auc"]) or "none"]
            for c in last["comparisons"]]
    lines += ["A speed-up is quoted against the peer's fastest configuration at equal AUC; *same method and layers* "
              "restricts the peers to those computing the same quantity (TracIn, TRAK or an influence function) on "
              "the same layers (all, or the last layer only) as the cleanse row. Speed-ups divide the x-epoch "
              "ratios, so rows carried over from an earlier run (a different load) compare fairly.", ""]
    lines += [md_table(["cleanse", "layers", "AUC", "s", "fastest peer at equal AUC", "its AUC", "its s", "speed-up",
                        "same method and layers", "speed-up", "fastest peer", "speed-up", "peers with higher AUC"],
                       rows), ""]
    lines += [f"![Scoring time per checkpoint and per-sample gradient throughput]({relative_link(image, docs.parent)})", ""]
    notes = result.get("notes") or []
    if notes:
        lines += ["**Notes.**", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def _carried_date(runs: list[dict[str, Any]]) -> str:
    return next((d["carried_from"] for r in runs for d in r["detectors"] if d.get("carried_from")), "unknown")


def _in_epochs(auto: dict[str, Any], value: float | None) -> float | None:
    """A prediction of ``auto``'s metadata in training epochs: results from before the analytic cost
    model stored seconds and the planner's estimated epoch (``epoch_s_estimated``)."""
    if value is None or "predicted_epochs" in auto:
        return value
    return value / auto["epoch_s_estimated"]


def _auto_predicted(auto: dict[str, Any], row: dict[str, Any]) -> float | None:
    return _in_epochs(auto, row.get("predicted_epochs", row.get("predicted_s")))


def _auto_section(runs: list[dict[str, Any]]) -> list[str]:
    """What ``solver: auto`` chose at each n, its prediction and the measured time."""
    rows = []
    for run in runs:
        for d in run["detectors"]:
            auto = ((d.get("extra") or {}).get("estimator_meta") or {}).get("auto")
            if not auto or d.get("status") != "ok":
                continue
            rejected = "; ".join(
                f"{c['solver']} ({c['layers']}) " + ("p > exact_max_params" if _auto_predicted(auto, c) is None
                                                     else f"{fmt(_auto_predicted(auto, c), 1)}")
                for c in auto["candidates"] if (c["solver"], c["layers"]) != (auto["solver"], auto["layers"]))
            chosen = auto["chosen"] + ("" if auto["within_budget"] else " (none fit: the cheapest)")
            rows.append([f"{run['n']:,}", d["name"], chosen, fmt(_auto_predicted(auto, auto), 2),
                         fmt(d["seconds"] / run["epoch_s"], 2), fmt(d["seconds"]), fmt(d.get("auc"), 4),
                         rejected or "–"])
    if not rows:
        return []
    return ["### Solver chosen by `auto`", "",
            "`solver: auto` counts each candidate's work from the architecture, n and the options (multiply-adds, "
            "dense products and eigendecompositions, priced by constants calibrated once by "
            "`benchmarks/calibrate_costs.py`), in training epochs, and takes the most accurate candidate (all "
            "layers: exact > preconditioned CG > EK-FAC > EK-FAC with one sampled label per sample; then the last "
            "layer: exact > EK-FAC) predicted to fit `cost_budget_epochs` (5). *predicted epochs* is the chosen "
            "candidate's prediction, *measured epochs* the measured scoring time over the benchmark's epoch. The "
            "choice and every candidate's prediction are in the score metadata (`scores/<name>.meta.json`, key "
            "`auto`).", "",
            md_table(["n", "estimator", "chosen", "predicted epochs", "measured epochs", "s", "AUC",
                      "rejected (predicted epochs)"], rows), ""]


def _pairwise_section(runs: list[dict[str, Any]]) -> list[str]:
    rows = [[f"{run['n']:,}", r["name"], r["probes"], fmt(r["seconds"]), fmt(r["ratio_to_epoch"]), r["checkpoints"],
             fmt(r["ratio_per_checkpoint"])] for run in runs for r in run.get("pairwise") or []]
    if not rows:
        return []
    return ["### Train -> query (probe) cost", "",
            f"`pairwise` against the first {N_PROBES} validation samples as probes, default options: the "
            "`(n_probes, n)` matrix of train -> probe scores. *x epoch/ckpt* divides by the checkpoints the "
            "method reads (TracIn: every saved checkpoint; influence: the final model).", "",
            md_table(["n", "estimator", "probes", "s", "x epoch", "ckpts", "x epoch/ckpt"], rows), ""]


def _influence_notes(result: dict[str, Any]) -> list[str]:
    """What auto chose at the largest n, and the influence rows against the peers on the same layers."""
    notes = []
    last = result["runs"][-1]
    for d in last["detectors"]:
        auto = ((d.get("extra") or {}).get("estimator_meta") or {}).get("auto")
        if not auto or d.get("status") != "ok":
            continue
        rejected = [c for c in auto["candidates"] if not c["fits"]]
        notes.append(
            f"{d['name']} at n = {last['n']:,}: auto chose {auto['chosen']} (predicted "
            f"{_auto_predicted(auto, auto):.2f} epochs, measured {d['seconds']:.1f} s = "
            f"{d['seconds'] / last['epoch_s']:.2f} epochs of {last['epoch_s']:.2f} s; budget "
            f"{_in_epochs(auto, auto.get('budget_epochs', auto.get('budget_s'))):.0f} epochs). Rejected as over "
            "budget: " + "; ".join(f"{c['solver']} ({c['layers']} layers) {_auto_predicted(auto, c):,.1f} epochs"
                                   for c in rejected if _auto_predicted(auto, c) is not None) + ".")
    for run in result["runs"]:
        for c in run["comparisons"]:
            if c["cleanse"] in ("influence", "influence_val") and c.get("fastest_peer_equal_auc_same_layers"):
                notes.append(
                    f"{c['cleanse']} at n = {run['n']:,} ({c['layers']} layers, {c['seconds']:.1f} s, AUC {c['auc']:.4f}) "
                    f"against the fastest influence peer at equal AUC on the same layers, "
                    f"{c['fastest_peer_equal_auc_same_layers']}: {c['speedup_vs_fastest_peer_equal_auc_same_layers']:.2f}x "
                    "(ratio of x-epoch costs).")
    return notes


def _fine_notes(result: dict[str, Any]) -> list[str]:
    """Why f-INE costs what it costs (its cost is a training run plus one forward pass per round)."""
    rows = [(r["n"], d["seconds"] / r["train_s"]) for r in result["runs"] for d in r["detectors"]
            if d["name"] == "fine" and d.get("status") == "ok" and r["n"] >= 10_000]
    if not rows:
        return []
    return ["f-INE costs " + ", ".join(f"{ratio:.2f}x a training run at n = {n:,}" for n, ratio in rows) + ". It is "
            "one training run on the randomised curriculum plus the query statistic, each unit's loss, evaluated "
            "on the whole training set at every round boundary: 4 rounds per epoch, 25 forward passes over n in "
            "6 epochs. Profiled at n = 10,000 the statistic was half of f-INE's time; one full-data forward pass "
            "runs near the core's peak (about 100 GFLOP/s single-threaded), while training steps of 256 rows do "
            "not, so the statistic's 25 passes cost about as much as the 6 epochs of training. The 1.25-1.3x "
            "measured earlier was the 2-rounds-per-epoch design (half the passes), which ranked the retraining "
            "ground truth worse (Spearman 0.56 against 0.76 on the digits MLP; docs/benchmarks.md, f-INE)."]


def notes_for(result: dict[str, Any]) -> list[str]:
    """Plain-language observations derived from the numbers (kept with the JSON)."""
    notes = []
    last = result["runs"][-1]
    tp = last["throughput"]
    vmap_rate = tp["vmap (cleanse per_sample_grads)"]["samples_per_s"]
    loop_rate = tp["Python loop (autograd.grad per sample)"]["samples_per_s"]
    dict_rate = tp["vmap over the parameter dict (torch.func recipe; reference, not cleanse)"]["samples_per_s"]
    notes.append(
        f"cleanse's `per_sample_grads` (vmap of the gradient w.r.t. the parameter dict, flattened afterwards) ran at "
        f"{vmap_rate:,.0f} samples/s, against {loop_rate:,.0f}/s for a Python loop and {dict_rate:,.0f}/s for the "
        "torch.func recipe. At this width the batched per-sample outer products are memory-bound, so a loop is "
        "competitive; the layer-wise norms that TracIn uses and the train -> query dots avoid per-sample "
        "gradients altogether (one forward and one backward pass per chunk).")
    tracin = next((d for d in last["detectors"] if d["name"] == "tracin" and d.get("status") == "ok"), None)
    peers = [d for d in last["detectors"] if d["tool"] != "cleanse" and d.get("status") == "ok"]
    if tracin and peers:
        notes.append(
            f"cleanse TracIn at n = {last['n']:,} ({tracin['seconds']:.2f} s, AUC {tracin['auc']:.4f}) against every peer that "
            "ran (ratio of x-epoch costs): " + "; ".join(f"{p['name']} {p['ratio_to_epoch'] / tracin['ratio_to_epoch']:.2f}x "
                                                  f"(AUC {p['auc']:.4f})" for p in peers)
            + ". captum TracInCPFast reads only the last layer: one forward pass per checkpoint, less than the forward "
            "and backward pass that all-layer TracIn needs, so a 3x lead over it is out of reach for an all-layer "
            "score; against the peers that compute the same all-layer quantity the lead is large.")
    for r in result["runs"]:
        for d in r["detectors"]:
            meta = (d.get("extra") or {}).get("estimator_meta") or {}
            if d.get("status") == "ok" and meta.get("solver") == "cg" and not meta.get("converged", True):
                report = (meta.get("reports") or [{}])[0]
                notes.append(f"{d['name']} at n = {r['n']:,}: CG did not converge ({report.get('iterations')} iterations, "
                             f"relative residual {report.get('residual', float('nan')):.3g}"
                             + ("; negative curvature" if "negative curvature" in report.get("note", "") else "")
                             + "): its time is a lower bound for a converged solve and its AUC is not that of exact "
                             "influence.")
    notes += _influence_notes(result) + _fine_notes(result)
    skipped = [(d["name"], r["n"], (d.get("reason") or "") + ("; carried over from the earlier run" if d.get("carried_from")
                                                               else ""))
               for r in result["runs"] for d in r["detectors"]
               if d.get("status") in ("skipped", "timeout", "failed") and "not importable" not in (d.get("reason") or "")]
    if skipped:
        notes.append("Not run: " + "; ".join(f"{name} at n = {n:,} ({reason})" for name, n, reason in skipped) + ".")
    missing = sorted({d["name"] for r in result["runs"] for d in r["detectors"] if "not importable" in (d.get("reason") or "")})
    if missing:
        notes.append("Peers not installed in this environment (recorded as skipped): " + ", ".join(missing)
                     + ". Run with `.venv-bench/bin/python` (see `benchmarks/setup_peers.sh`).")
    return notes


# -------------------------------------------------------------------------------------------- main
def carried_rows(path: Path, n: int, ran: set[str]) -> list[dict[str, Any]]:
    """The rows at ``n`` of an earlier results file for every detector not run now (the peers, and
    cleanse detectors left out by ``--only``), marked as carried over (with that file's date)."""
    import json

    previous = json.loads(Path(path).read_text())
    created = previous["environment"]["created"]
    return [{**d, "carried_from": created} for r in previous["runs"] if r["n"] == n for d in r["detectors"]
            if d["name"] not in ran]


def run(grid_name: str, out: Path, docs: Path | None, threads: int, seed: int, peers: str,
        budget_s: float | None = None, ns: tuple[int, ...] | None = None, only: list[str] | None = None,
        peers_from: Path | None = None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    grid = GRIDS[grid_name] if budget_s is None else replace(GRIDS[grid_name], budget_s=budget_s)
    grid = grid if ns is None else replace(grid, ns=tuple(ns))
    started = time.perf_counter()
    env = environment(threads)
    env["peers"] = _peer_versions()
    from cleanse.models.architectures import build_model, n_parameters, spec_for

    spec = spec_for("mlp", list(grid.hidden), (grid.features,), grid.classes)
    config = {**asdict(grid), "architecture": "-".join(map(str, (grid.features, *grid.hidden, grid.classes))),
              "n_params": n_parameters(build_model(spec)), "flip_fraction": FLIP_FRACTION, "seed": seed,
              "auc_tolerance": AUC_TOLERANCE, "peers": peers, "only": only,
              "peers_from": None if peers_from is None else str(peers_from)}
    runs: list[dict[str, Any]] = []
    history = History()
    with tempfile.TemporaryDirectory(prefix="cleanse-speed-") as scratch_dir:
        scratch = Path(scratch_dir)
        detectors = cleanse_detectors(grid)
        if only:
            detectors = [d for d in detectors if d.name in only]
        missing: dict[str, str] = {}
        if peers == "auto" and peers_from is None:
            found, missing = peer_detectors(grid, scratch)
            detectors += found
        elif peers_from is None:
            missing = {name: "peers disabled (--peers none)" for name in PEER_ORDER}
        for n in grid.ns:
            (scratch / f"n{n}").mkdir(exist_ok=True)
            print(f"[speed] n = {n:,}: training", flush=True)
            problem = build_problem(n, grid, seed)
            print(f"[speed] n = {n:,}: one epoch {problem.epoch_s:.3f} s; per-sample gradients", flush=True)
            throughput = gradient_throughput(problem, grid)
            records = []
            for detector in detectors:
                record = run_detector(detector, problem, grid, history)
                records.append(record)
                if record["status"] in ("ok", "skipped", "timeout"):
                    history.last[detector.name] = {"n": n, **record}
                print(f"[speed] n = {n:,}: {detector.name:<22} {record['status']:<8} "
                      f"{fmt(record.get('seconds'), 3):>9} s  AUC {fmt(record.get('auc'), 4)}  "
                      f"{record.get('reason', '')}", flush=True)
            records += [{"name": name, "tool": name.split()[0], "status": "skipped", "reason": reason, "checkpoints": None}
                        for name, reason in missing.items()]
            pairwise = pairwise_timing(problem, grid) if not only or any(p in only for p in PAIRWISE) else []
            # Other jobs on the machine slow any one timing down; the denominators are the fastest of
            # the timings taken before the detectors and one more after them, so ratios err high.
            retimed_epoch, retimed_train = time_training(problem, grid, seed)
            problem.epoch_samples_s.append(retimed_epoch)
            problem.epoch_s = min(problem.epoch_samples_s)
            problem.train_samples_s.append(retimed_train)
            problem.train_s = min(problem.train_samples_s)
            for record in records:
                add_ratios(record, problem.epoch_s)
            for row in pairwise:
                row["ratio_to_epoch"] = row["seconds"] / problem.epoch_s
                row["ratio_per_checkpoint"] = row["ratio_to_epoch"] / row["checkpoints"]
            if peers_from is not None:  # with the ratios of the run they were measured in
                records += carried_rows(peers_from, n, {d["name"] for d in records})
            runs.append({"n": n, "train_s": problem.train_s, "train_samples_s": problem.train_samples_s,
                         "epoch_s": problem.epoch_s,
                         "epoch_samples_s": problem.epoch_samples_s, "val_accuracy": problem.val_accuracy,
                         "checkpoint_epochs": problem.checkpoint_epochs, "throughput": throughput,
                         "detectors": records, "comparisons": compare(records), "pairwise": pairwise})
            del problem
            gc.collect()
    env["load_average_end"] = list(os.getloadavg())
    result = {"benchmark": "speed", "grid": grid_name, "environment": env, "config": config, "runs": runs,
              "headline": headline(runs), "total_seconds": time.perf_counter() - started}
    result["notes"] = notes_for(result)
    return publish(jsonable(result), out, docs, SECTION, plot, render)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speed.json")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md",
                        help="markdown file whose 'speed' section is rewritten ('' to skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see the docs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers", choices=["auto", "none"], default="auto",
                        help="auto: every installed peer; none: cleanse only")
    parser.add_argument("--budget", type=float, default=None, help="override the per-detector budget in seconds")
    parser.add_argument("--ns", type=int, nargs="+", default=None, help="override the grid's training-set sizes")
    parser.add_argument("--only", nargs="+", default=None, help="run only these cleanse detectors")
    parser.add_argument("--peers-from", type=Path, default=None,
                        help="carry the rows of every detector not run (the peers; cleanse detectors left out by "
                             "--only) over from this earlier results file (same grid and n)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: re-derive the notes and re-render the docs from the JSON at --out")
    args = parser.parse_args(argv)
    docs = None if str(args.docs) in ("", ".") else args.docs
    if args.render_only:
        rerender(args.out, docs, SECTION, notes_for, plot, render)
        print(f"[speed] re-rendered {docs} from {args.out}")
        return 0
    result = run(args.grid, args.out, docs, args.threads, args.seed, args.peers, args.budget, args.ns, args.only,
                 args.peers_from)
    head = result["headline"]
    print(f"[speed] wrote {args.out}" + (f" and {docs}" if docs else "") + f" in {result['total_seconds']:.0f} s")
    for key, target in head.items():
        if isinstance(target, dict):
            print(f"[speed] n = {head['n']:,}: {target['target']}: {target['measured']} (met {target['met']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

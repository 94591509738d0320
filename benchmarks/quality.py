"""Quality benchmark: every cleanse estimator against the peer tools, on one trained model per cell.

A *cell* is (dataset, corruption, model). In each cell the data are staged once (seed 0: split and
corruption fixed), the detection model is trained with the first training seed, and every detector
scores the training set of that same model in this process:

- every estimator in ``cleanse.estimators.registry`` (options from ``params.scorers``);
- AUM, a free baseline: minus the logit margin averaged over the training checkpoints
  (Pleiss et al., 2020);
- the peers, each imported only if installed (``benchmarks/setup_peers.sh``): cleanlab
  (label-quality scores from 5-fold out-of-sample probabilities), captum ``TracInCPFast`` and
  ``TracInCP``, dattri explicit influence functions, ``TracIn`` and ``TRAK``, kronfluence EK-FAC
  self-influence.

Detection metrics (ROC-AUC, AP, P@k with k = number corrupted) are computed against the ground
truth. Each detector's top-k is then removed and the model retrained with every training seed
(``cleanse.pipeline.retrain_without``); test accuracy and, for backdoors, the attack success rate
are reported as mean +- sd over seeds, next to no removal, random removal (an independent draw per
seed) and the oracle (exactly the corrupted samples removed).

    .venv-bench/bin/python benchmarks/quality.py                       # full grid, about 45 min on 2 cores
    .venv-bench/bin/python benchmarks/quality.py --grid smoke --out /tmp/q.json --docs /tmp/b.md
    .venv-bench/bin/python benchmarks/quality.py --render-only         # docs from an existing JSON

Writes the JSON (``--out``) and regenerates the "Quality" section of ``docs/benchmarks.md``
(between ``<!-- quality:start -->`` and ``<!-- quality:end -->``; the rest of the file is kept) with
its plots under ``docs/img/``.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import hashlib
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("CLEANSE_DEVICE", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")  # dattri and kronfluence draw progress bars

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TimeLimitExceeded, time_limit

from cleanse.config import Params, load_params
from cleanse.data.dataset import StagedData
from cleanse.data.stage import stage_data
from cleanse.estimators import registry
from cleanse.estimators.base import ScoringContext
from cleanse.evaluate import detection_metrics
from cleanse.models.architectures import n_parameters, spec_for
from cleanse.models.trainer import TrainedModel, predict_proba, train_model
from cleanse.pipeline import evaluate_model, random_ids, retrain_without

ROOT = Path(__file__).resolve().parent.parent
START_MARKER = "<!-- quality:start -->"
END_MARKER = "<!-- quality:end -->"

# ----------------------------------------------------------------------------- the grid

DATASETS = ("digits", "breast_cancer", "wine")

CORRUPTIONS: dict[str, list[str]] = {
    "sym20": ["corruption.kind=label_flip", "corruption.mode=symmetric", "corruption.fraction=0.2"],
    "pair40": ["corruption.kind=label_flip", "corruption.mode=pair", "corruption.fraction=0.4"],
    "backdoor5": ["corruption.kind=backdoor", "corruption.fraction=0.05", "corruption.target_class=0",
                  "corruption.trigger_size=3"],
}
CORRUPTION_LABEL = {"sym20": "20% symmetric flips", "pair40": "40% pair flips", "backdoor5": "5% backdoor"}

# Memorising MLP: no weight decay, trained until it fits ~100% of the (corrupted) training labels.
# Measured (seed 0): digits reaches 0.995-1.000 at epoch 180-210 with Adam lr 1e-3 (so 200 epochs);
# breast_cancer and wine reach 1.000 by epoch 90 (so 100 epochs).
MEMORISING_EPOCHS = {"digits": 200, "breast_cancer": 100, "wine": 100}

MODELS: dict[str, Callable[[str], list[str]]] = {
    "logreg": lambda ds: ["model.arch=logreg", "model.lr=0.01", "model.epochs=30", "model.weight_decay=0.001",
                          "model.checkpoints=5"],
    "mlp": lambda ds: ["model.arch=mlp", "model.hidden=[128]", "model.lr=0.001", "model.epochs=30",
                       "model.weight_decay=0.001", "model.checkpoints=5"],
    "mlp_mem": lambda ds: ["model.arch=mlp", "model.hidden=[256,256]", "model.lr=0.001",
                           f"model.epochs={MEMORISING_EPOCHS[ds]}", "model.weight_decay=0", "model.checkpoints=10"],
    "cnn": lambda ds: ["model.arch=cnn", "model.hidden=[16,32]", "model.lr=0.01", "model.epochs=30",
                       "model.weight_decay=0.001", "model.checkpoints=5"],
}
MODEL_LABEL = {
    "logreg": "logistic regression (Adam, wd 1e-3, 30 ep)",
    "mlp": "MLP 128, weight decay 1e-3 (30 ep)",
    "mlp_mem": "memorising MLP 256-256, no weight decay (to ~100% train acc)",
    "cnn": "small CNN 16-32 (30 ep)",
}


# Feldman-Zhang memorization with K = 100 subset models per cell instead of the default 1,000: the
# grid trains 3 detection seeds x 30 cells, and the flip-detection AUC was measured to be settled
# by K = 100 (docs/benchmarks.md, memorization section).
SCORER_OVERRIDES = ["scorers.memorization.n_models=100"]


@dataclass(frozen=True)
class Cell:
    dataset: str
    corruption: str
    model: str

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.corruption}/{self.model}"

    @property
    def regimes(self) -> list[str]:
        """The hard regimes this cell belongs to (the issue's targets are checked per regime)."""
        out = []
        if self.model == "mlp_mem":
            out.append("memorising MLP")
        if self.corruption == "pair40":
            out.append("40% pair flips")
        if self.corruption == "backdoor5":
            out.append("backdoor")
        return out

    def params(self, seed: int = 0) -> Params:
        return load_params(None, [
            f"seed={seed}", f"data.source=sklearn:{self.dataset}", *CORRUPTIONS[self.corruption],
            *MODELS[self.model](self.dataset), *SCORER_OVERRIDES, "tracking.enabled=false",
        ])


def full_grid() -> list[Cell]:
    """30 cells: 3 datasets x 3 corruptions x {logreg, mlp, memorising mlp} + the CNN on digits.

    Ordered with the memorising cells first: their retrains are the slowest and run in the
    background while the cheaper cells are scored.
    """
    cells = [Cell(ds, corruption, model) for ds in DATASETS for corruption in CORRUPTIONS
             for model in ("logreg", "mlp", "mlp_mem", "cnn") if model != "cnn" or ds == "digits"]
    return sorted(cells, key=lambda c: (c.model != "mlp_mem", c.dataset != "digits"))


def smoke_grid() -> list[Cell]:
    """Two tiny cells (seconds each): one label-noise cell and one backdoor cell (exercises ASR and targets)."""
    return [Cell("wine", "sym20", "logreg"), Cell("wine", "backdoor5", "logreg")]


GRIDS = {"full": full_grid, "smoke": smoke_grid}

# ----------------------------------------------------------------------------- detectors


@dataclass
class Bench:
    """What a detector may look at: one cell's staged data and its trained detection model."""

    cell: Cell
    params: Params
    staged: StagedData
    model: TrainedModel
    workdir: Path
    _checkpoint_files: list[str] | None = None

    @property
    def n_params(self) -> int:
        return n_parameters(self.model.module())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.as_tensor(self.staged.train.features, dtype=torch.float32),
                torch.as_tensor(self.staged.train.label, dtype=torch.long))

    def dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(*self.tensors())

    def loader(self, batch_size: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset(), batch_size=batch_size, shuffle=False)

    def checkpoints(self) -> list[Any]:
        return self.model.checkpoints or []

    def checkpoint_files(self) -> list[str]:
        """Checkpoints as files ``{"state_dict", "learning_rate"}`` (captum loads from paths)."""
        if self._checkpoint_files is None:
            self._checkpoint_files = []
            for checkpoint in self.checkpoints():
                path = self.workdir / f"ckpt_{checkpoint.epoch:04d}.pt"
                torch.save({"state_dict": checkpoint.state, "learning_rate": checkpoint.lr}, path)
                self._checkpoint_files.append(str(path))
        return self._checkpoint_files


@dataclass
class Detector:
    name: str
    family: str  # "cleanse" | "baseline" | "peer"
    fn: Callable[[Bench], tuple[np.ndarray, dict[str, Any]]]
    requires: tuple[str, ...] = ()
    note: str = ""


def _cleanse_detector(name: str) -> Detector:
    def run(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
        estimator = registry.get(name)
        options = getattr(bench.params.scorers, name, None)
        if options is None:
            options = estimator.options_type()
        context = ScoringContext(train=bench.staged.train, val=bench.staged.val, meta=bench.staged.meta,
                                 model=bench.model, model_config=bench.params.model, seed=bench.params.seed,
                                 device=torch.device("cpu"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = estimator.score(context, options)
        if result.table["sample_id"].to_list() != bench.staged.train.sample_id.tolist():
            raise RuntimeError(f"estimator {name} returned rows out of training order")
        meta = {key: value for key, value in result.meta.items() if key != "reports"}
        return result.table["score"].to_numpy(), _jsonable(meta)

    return Detector(f"cleanse {name}", "cleanse", run)


@torch.no_grad()
def det_aum(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """Minus the area under the margin: the logit margin z_y - max_{j != y} z_j averaged over checkpoints."""
    x, y = bench.tensors()
    module = bench.model.module()
    margins = []
    for checkpoint in bench.checkpoints() or [None]:
        if checkpoint is not None:
            module.load_state_dict(checkpoint.state)
        logits = module(x).double()
        own = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
        margins.append(own - other)
    return -torch.stack(margins).mean(0).numpy(), {"checkpoints": len(margins)}


def det_cleanlab(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """cleanlab as a user runs it: 5-fold out-of-sample probabilities from the cell's own recipe
    (independent folds and seeds from cleanse's ``cleanlab`` estimator), then
    ``get_label_quality_scores`` (self-confidence) for the ranking and ``find_label_issues``."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    train, seed = bench.staged.train, bench.params.seed
    started = time.perf_counter()
    probabilities = np.zeros((len(train), bench.staged.meta.n_classes))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed + 1)
    for fold, (fit, held) in enumerate(folds.split(train.features.reshape(len(train), -1), train.label)):
        model = train_model(bench.model.spec, train.features[fit], train.label[fit], bench.params.model,
                            seed=seed + 2000 + fold, device=torch.device("cpu"))
        probabilities[held] = predict_proba(model, train.features[held])
    prep = time.perf_counter() - started
    started = time.perf_counter()
    quality = get_label_quality_scores(train.label, probabilities, method="self_confidence")
    issues = find_label_issues(train.label, probabilities, filter_by="prune_by_noise_rate")
    scoring = time.perf_counter() - started
    truth = train.is_corrupted
    flagged = int(issues.sum())
    return 1.0 - quality, {
        "prep_seconds": prep, "score_seconds": scoring, "find_label_issues_flagged": flagged,
        "find_label_issues_precision": float(truth[issues].mean()) if flagged else None,
        "find_label_issues_recall": float(issues[truth].mean()) if truth.any() else None,
    }


def _ce_sum() -> nn.Module:
    return nn.CrossEntropyLoss(reduction="sum")


def _captum_load(model: nn.Module, path: str) -> float:
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    return float(checkpoint["learning_rate"])


def _last_linear(module: nn.Module) -> nn.Linear:
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1]


def det_captum_fast(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """captum TracInCPFast: last-layer TracInCP over all checkpoints (lr-weighted)."""
    from captum.influence import TracInCPFast

    model = bench.model.module()
    tracin = TracInCPFast(model, _last_linear(model), bench.dataset(), bench.checkpoint_files(),
                          checkpoints_load_func=_captum_load, loss_fn=_ce_sum(), batch_size=512)
    return tracin.self_influence(bench.loader(512)).detach().double().numpy(), {}


def det_captum_full(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """captum TracInCP: all layers, all checkpoints, per-sample gradients by batch."""
    from captum.influence import TracInCP

    model = bench.model.module()
    tracin = TracInCP(model, bench.dataset(), bench.checkpoint_files(), checkpoints_load_func=_captum_load,
                      loss_fn=_ce_sum(), batch_size=512, sample_wise_grads_per_batch=True)
    return tracin.self_influence(bench.loader(512)).detach().double().numpy(), {}


def _dattri_loss(model: nn.Module, n_feature_dims: int) -> Callable:
    """Mean cross-entropy in torch.func style; accepts a single unbatched sample (dattri vmaps over
    samples with in_dims=0, which strips the batch dimension)."""
    from torch.func import functional_call

    def loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = data
        if x.dim() == n_feature_dims:
            x = x.unsqueeze(0)
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y.reshape(-1))

    return loss


def _projector(bench: Bench) -> dict[str, Any]:
    # dattri's default 512 dims; never more than the number of parameters (tiny tabular models).
    return {"proj_dim": min(512, bench.n_params), "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}


def det_dattri_if(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """dattri IFAttributorExplicit on the last layer, damping 1e-3.

    Workarounds (peer-baselines.md): dattri builds the Hessian through the whole network even with
    ``layer_name``, so it gets the last layer as the model and the frozen penultimate features as
    the data (the same function of the last-layer parameters); and ``transform_test_rep`` sums
    per-batch inverses, so the train loader is one batch.
    """
    from dattri.algorithm.influence_function import IFAttributorExplicit
    from dattri.task import AttributionTask

    module = bench.model.module()
    assert isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Linear)
    x, y = bench.tensors()
    with torch.no_grad():
        features = module[:-1](x)
    last = copy.deepcopy(module[-1])
    task = AttributionTask(loss_func=_dattri_loss(last, 1), model=last,
                           checkpoints={k: v.detach().clone() for k, v in last.state_dict().items()})
    attributor = IFAttributorExplicit(task=task, regularization=1e-3, device="cpu")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, y), batch_size=len(y), shuffle=False)
    attributor.cache(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = attributor.self_attribute(loader)
    return scores.detach().double().numpy().reshape(-1), {"layer": "last", "params": n_parameters(last)}


def det_dattri_tracin(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """dattri TracInAttributor over all checkpoints, lr weights, random projection (it always projects)."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    module = bench.model.module()
    checkpoints = bench.checkpoints()
    task = AttributionTask(loss_func=_dattri_loss(module, len(bench.staged.meta.feature_shape)), model=module,
                           checkpoints=[c.state for c in checkpoints])
    attributor = TracInAttributor(task=task, weight_list=torch.tensor([c.lr for c in checkpoints]),
                                  normalized_grad=False, projector_kwargs=_projector(bench), device="cpu")
    scores = attributor.self_attribute(bench.loader(64))
    return scores.detach().double().numpy().reshape(-1), {"proj_dim": _projector(bench)["proj_dim"]}


def det_dattri_trak(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """dattri TRAKAttributor on the final model, damping 1e-3.

    Workarounds (peer-baselines.md): ``correct_probability_func`` receives an unflattened parameter
    dict (the docstring's ``@flatten_func`` crashes), and ``self_attribute(loader)`` without ``.cache()``.
    """
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.func import functional_call

    module = bench.model.module()
    n_dims = len(bench.staged.meta.feature_shape)

    def correct_probability(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = data
        logits = functional_call(module, params, (x.unsqueeze(0) if x.dim() == n_dims else x,))
        return torch.exp(-nn.functional.cross_entropy(logits, y.reshape(-1)))

    task = AttributionTask(loss_func=_dattri_loss(module, n_dims), model=module,
                           checkpoints=[{k: v.clone() for k, v in bench.model.state.items()}])
    attributor = TRAKAttributor(task=task, correct_probability_func=correct_probability,
                                projector_kwargs=_projector(bench), device="cpu", regularization=1e-3)
    scores = attributor.self_attribute(bench.loader(64))
    return scores.detach().double().numpy().reshape(-1), {"proj_dim": _projector(bench)["proj_dim"]}


def det_kronfluence(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """kronfluence EK-FAC self-influence (true Fisher from sampled labels), damping 1e-3."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    task = Classification()
    model = prepare_model(bench.model.module().float(), task)
    out = tempfile.mkdtemp(dir=bench.workdir)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    analyzer = Analyzer(analysis_name="quality", model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=out, log_level=logging.WARNING)
    dataset = bench.dataset()
    torch.manual_seed(bench.params.seed)
    analyzer.fit_all_factors(factors_name="ekfac", dataset=dataset, per_device_batch_size=256,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    analyzer.compute_self_scores(scores_name="self", factors_name="ekfac", train_dataset=dataset,
                                 per_device_train_batch_size=256, score_args=ScoreArguments(damping_factor=1e-3),
                                 overwrite_output_dir=True)
    scores = analyzer.load_self_scores("self")["all_modules"]
    return scores.detach().double().numpy().reshape(-1), {"damping": 1e-3}


def detectors() -> list[Detector]:
    out = [_cleanse_detector(name) for name in registry.names()]
    out.append(Detector("AUM", "baseline", det_aum, note="minus the checkpoint-mean margin (Pleiss et al. 2020)"))
    out += [
        Detector("cleanlab", "peer", det_cleanlab, ("cleanlab.filter", "cleanlab.rank")),
        Detector("captum TracInCPFast", "peer", det_captum_fast, ("captum.influence",)),
        Detector("captum TracInCP", "peer", det_captum_full, ("captum.influence",)),
        Detector("dattri IF-explicit", "peer", det_dattri_if, ("dattri.algorithm.influence_function", "dattri.task")),
        Detector("dattri TracIn", "peer", det_dattri_tracin, ("dattri.algorithm.tracin", "dattri.task")),
        Detector("dattri TRAK", "peer", det_dattri_trak, ("dattri.algorithm.trak", "dattri.task")),
        Detector("kronfluence EK-FAC", "peer", det_kronfluence, ("kronfluence.analyzer", "kronfluence.task")),
    ]
    return out


# (detector, applies(cell, n_params), reason): detector/cell pairs that cannot finish in useful time. Empty
# since self-influence takes EK-FAC above the exact size (it used to skip CG on the digits CNN and
# memorising MLP: 315 s and 660 s with 1 thread).
SKIP_RULES: list[tuple[str, Callable[[Cell, int], bool], str]] = []

# dattri IF-CG is not run anywhere: 195 s on the small digits MLP and the worst detector there
# (peer-baselines.md); dattri IF-explicit stands for dattri's influence functions.
NOT_RUN = {"dattri IF-CG": "195 s on the small digits MLP and the weakest detector there (peer-baselines.md); "
                           "dattri's influence function is represented by IF-explicit (last layer)"}


def _peer_status(requires: tuple[str, ...]) -> str | None:
    """``None`` when every module imports (imports are then warm, outside the timed scoring), else why not."""
    for module in requires:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            return f"not importable: {type(exc).__name__}: {exc}".strip()
    return None


def warm_imports(dets: list[Detector]) -> None:
    """Import every estimator module and peer before anything is timed."""
    for det in dets:
        _peer_status(det.requires)
    for name in registry.names():
        registry.get(name)
    for module in ("cleanlab.filter", "cleanlab.rank", "sklearn.metrics"):
        _peer_status((module,))


# ----------------------------------------------------------------------------- retraining


def _init_worker(device: str = "cpu") -> None:
    torch.set_num_threads(1)
    os.environ["CLEANSE_DEVICE"] = device
    warnings.simplefilter("ignore")


def retrain_job(params_json: dict[str, Any], staged: StagedData, removed_ids: np.ndarray, seed: int) -> dict[str, Any]:
    """Retrain the cell's recipe with training seed ``seed`` without ``removed_ids`` (split fixed)."""
    params = Params.model_validate(params_json).model_copy(update={"seed": seed})
    return retrain_without(params, staged, removed_ids)


class Retrainer:
    """Deduplicated retrain jobs on a process pool, throttled while the main process is scoring."""

    def __init__(self, jobs: int, device: str = "cpu") -> None:
        self.jobs = jobs
        self.device = device
        if jobs == 0 and device != "cpu":
            raise ValueError("--retrain-device other than cpu needs --jobs >= 1 (retrains run in worker processes)")
        self.pool = (ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                                         initargs=(device,))
                     if jobs > 0 else None)
        self.pending: list[tuple[str, tuple]] = []
        self.running: dict[Future, str] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.known: set[str] = set()

    @staticmethod
    def key(cell: Cell, removed_ids: np.ndarray, seed: int) -> str:
        digest = hashlib.sha1(np.sort(np.asarray(removed_ids, dtype=np.int64)).tobytes()).hexdigest()[:16]
        return f"{cell.key}|{seed}|{digest}"

    def submit(self, cell: Cell, params: Params, staged: StagedData, removed_ids: np.ndarray, seed: int) -> str:
        key = self.key(cell, removed_ids, seed)
        if key not in self.known:
            self.known.add(key)
            self.pending.append((key, (params.model_dump(mode="json"), staged, np.asarray(removed_ids), seed)))
        return key

    def preset(self, key: str, result: dict[str, Any]) -> None:
        self.known.add(key)
        self.results[key] = result

    def pump(self, limit: int | None = None) -> None:
        """Start pending jobs until ``limit`` are in flight; collect finished ones."""
        limit = self.jobs if limit is None else limit
        if self.pool is None:
            return
        for future in [f for f in self.running if f.done()]:
            self.results[self.running.pop(future)] = future.result()
        while self.pending and len(self.running) < limit:
            key, args = self.pending.pop(0)
            self.running[self.pool.submit(retrain_job, *args)] = key

    def drain(self, log: Callable[[str], None]) -> None:
        if self.pool is None:
            for key, args in self.pending:
                self.results[key] = retrain_job(*args)
            self.pending.clear()
            return
        total = len(self.pending) + len(self.running)
        last = time.perf_counter()
        while self.pending or self.running:
            self.pump()
            done, _ = wait(list(self.running), return_when=FIRST_COMPLETED)
            for future in done:
                self.results[self.running.pop(future)] = future.result()
            if time.perf_counter() - last > 60:
                last = time.perf_counter()
                log(f"  retrains: {total - len(self.pending) - len(self.running)}/{total} done")
        self.pool.shutdown()


# ----------------------------------------------------------------------------- one cell


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


DETECTOR_BUDGET_S: float | None = None  # set by --detector-budget


def _detect_once(det: Detector, bench: Bench, seed: int) -> dict[str, Any]:
    """Run one detector on one trained model: scores, detection metrics and the top-k ids."""
    train = bench.staged.train
    torch.manual_seed(seed)
    started = time.perf_counter()
    try:
        with time_limit(DETECTOR_BUDGET_S):
            score, extra = det.fn(bench)
    except TimeLimitExceeded as exc:
        return {"status": "over budget", "reason": f"{exc} (--detector-budget)"}
    except Exception as exc:  # noqa: BLE001 - one broken detector must not stop the grid
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
    seconds = time.perf_counter() - started
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if score.shape[0] != len(train):
        return {"status": "failed", "reason": f"returned {score.shape[0]} scores for {len(train)} samples"}
    out: dict[str, Any] = {"status": "ok"}
    if not np.all(np.isfinite(score)):
        out["non_finite_scores"] = int((~np.isfinite(score)).sum())
        score = np.nan_to_num(score, nan=-np.inf)
    prep = float(extra.pop("prep_seconds", 0.0))
    metrics = detection_metrics(score, train.is_corrupted)
    k = int(train.is_corrupted.sum())
    order = np.lexsort((np.arange(score.size), -score))
    out.update(score_seconds=float(extra.pop("score_seconds", seconds - prep)), prep_seconds=prep,
               extra=_jsonable(extra), top_k=train.sample_id[order[:k]],
               metrics={"roc_auc": metrics["roc_auc"], "average_precision": metrics["average_precision"],
                        "precision_at_k": metrics["precision_at_k"]})
    return out


def score_cell(cell: Cell, seeds: list[int], dets: list[Detector], retrainer: Retrainer,
               log: Callable[[str], None], detection_seeds: int | None = None,
               with_references: bool = True) -> dict[str, Any]:
    """Stage once (split and corruption fixed by the first seed); for each of the first
    ``detection_seeds`` training seeds (default all), train the detection model, run every detector
    on it and queue the retrain without its top-k with that seed. The remaining seeds only retrain,
    without the top-k of the last detection model. Returns the cell record with retrain *keys*
    (resolved by :func:`resolve_cell`).

    Detection metrics and scoring times are reported as the mean over the detection seeds, with the
    sd and the per-seed values alongside.
    """
    n_detect = len(seeds) if detection_seeds is None else max(1, min(detection_seeds, len(seeds)))
    params = cell.params(seed=seeds[0])
    staged = stage_data(params)
    train = staged.train
    spec = spec_for(params.model.arch, params.model.hidden, staged.meta.feature_shape, staged.meta.n_classes)
    k = int(train.is_corrupted.sum())
    record: dict[str, Any] = {
        "dataset": cell.dataset, "corruption": cell.corruption, "model": cell.model, "key": cell.key,
        "regimes": cell.regimes, "n_train": len(train), "n_test": len(staged.test), "k": k,
        "model_config": params.model.model_dump(mode="json"), "detection_models": [], "detectors": {},
    }
    references: dict[str, list[str]] = {"no removal": [], "random": [], "oracle": []}
    runs: dict[str, list[dict[str, Any]]] = {det.name: [] for det in dets}
    skipped: dict[str, str] = {}
    last_top_k: dict[str, np.ndarray] = {}

    def submit_references(seed: int) -> None:
        if not with_references:
            return
        for name, removed in (("no removal", np.zeros(0, dtype=np.int64)), ("random", random_ids(staged, k, seed)),
                              ("oracle", train.sample_id[train.is_corrupted])):
            references[name].append(retrainer.submit(cell, params, staged, removed, seed))

    for seed in seeds[:n_detect]:
        started = time.perf_counter()
        model = train_model(spec, train.features, train.label, params.model, seed=seed, device=torch.device("cpu"))
        train_seconds = time.perf_counter() - started
        fitted = predict_proba(model, train.features).argmax(1) == train.label
        n_params = n_parameters(model.module())
        record["n_params"] = n_params
        record["detection_models"].append({
            "seed": seed, "train_seconds": train_seconds, "train_accuracy": float(fitted.mean()),
            "train_accuracy_on_corrupted": float(fitted[train.is_corrupted].mean()) if k else None,
            **evaluate_model(model, staged),
        })
        log(f"[{cell.key} seed {seed}] n={len(train)} k={k} params={n_params} train {train_seconds:.1f}s "
            f"train_acc={fitted.mean():.3f} (corrupted {record['detection_models'][-1]['train_accuracy_on_corrupted']})")
        # No removal with this seed is the detection model itself (same seed, same data).
        no_removal = np.zeros(0, dtype=np.int64)
        retrainer.preset(Retrainer.key(cell, no_removal, seed),
                         {**evaluate_model(model, staged), "n_removed": 0, "n_corrupted_removed": 0})
        submit_references(seed)
        with tempfile.TemporaryDirectory(prefix="quality_") as workdir:
            bench = Bench(cell, params, staged, model, Path(workdir))
            for det in dets:
                if det.name in skipped:
                    continue
                reason = _peer_status(det.requires)
                if reason is None:
                    reason = next((why for name, applies, why in SKIP_RULES
                                   if name == det.name and applies(cell, n_params)), None)
                if reason is not None:
                    skipped[det.name] = reason
                    continue
                retrainer.pump(1)
                run = _detect_once(det, bench, params.seed)
                if run["status"] == "over budget":
                    skipped[det.name] = run["reason"]
                    log(f"  {det.name:<22} SKIPPED {run['reason']}")
                    continue
                runs[det.name].append(run)
                if run["status"] != "ok":
                    log(f"  {det.name:<22} FAILED {run['reason']}")
                    continue
                last_top_k[det.name] = run.pop("top_k")
                run["retrain"] = retrainer.submit(cell, params, staged, last_top_k[det.name], seed)
                m = run["metrics"]
                log(f"  {det.name:<22} AUC={m['roc_auc']:.3f} AP={m['average_precision']:.3f} "
                    f"P@k={m['precision_at_k']:.3f}  {run['score_seconds']:.2f}s (+{run['prep_seconds']:.1f}s prep)")
    # Retrain-only seeds: the same removals (the last detection model's top-k) under other training seeds.
    extra_retrains: dict[str, list[str]] = {name: [] for name in last_top_k}
    for seed in seeds[n_detect:]:
        submit_references(seed)
        for name, top_k in last_top_k.items():
            if name not in skipped:
                extra_retrains[name].append(retrainer.submit(cell, params, staged, top_k, seed))
    record["detection_seeds"] = seeds[:n_detect]
    record["retrain_seeds"] = seeds
    record["detection_model"] = record["detection_models"][0]
    record["references"] = references
    for det in dets:
        entry: dict[str, Any] = {"family": det.family}
        record["detectors"][det.name] = entry
        if det.name in skipped:
            entry.update(status="skipped", reason=skipped[det.name])
            continue
        failed = [run for run in runs[det.name] if run["status"] != "ok"]
        if failed:
            entry.update(status="failed", reason=failed[0]["reason"], traceback=failed[0].get("traceback"))
            continue
        ok = runs[det.name]
        per_metric = {name: [run["metrics"][name] for run in ok] for name in ok[0]["metrics"]}
        entry.update(
            status="ok",
            metrics={name: (float(np.mean(v)) if all(x is not None for x in v) else None) for name, v in per_metric.items()},
            metrics_sd={name: (float(np.std(v, ddof=1)) if len(v) > 1 and all(x is not None for x in v) else 0.0)
                        for name, v in per_metric.items()},
            metrics_values=per_metric,
            score_seconds=float(np.mean([run["score_seconds"] for run in ok])),
            prep_seconds=float(np.mean([run["prep_seconds"] for run in ok])),
            extra=ok[0]["extra"], retrain=[run["retrain"] for run in ok] + extra_retrains.get(det.name, []),
        )
        if any("non_finite_scores" in run for run in ok):
            entry["non_finite_scores"] = max(run.get("non_finite_scores", 0) for run in ok)
    for name, why in NOT_RUN.items():
        record["detectors"][name] = {"family": "peer", "status": "skipped", "reason": why}
    return record


def _summary(values: list[float | None]) -> dict[str, Any] | None:
    clean = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not clean:
        return None
    sd = float(np.std(clean, ddof=1)) if len(clean) > 1 else 0.0
    return {"mean": float(np.mean(clean)), "sd": sd, "values": clean}


def _resolve(keys: list[str], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = [results[key] for key in keys]
    out = {"test_accuracy": _summary([r["test_accuracy"] for r in rows]),
           "n_corrupted_removed": [r["n_corrupted_removed"] for r in rows]}
    if any("attack_success_rate" in r for r in rows):
        out["attack_success_rate"] = _summary([r.get("attack_success_rate") for r in rows])
    return out


def resolve_cell(record: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    record["references"] = {name: _resolve(keys, results) for name, keys in record["references"].items()}
    for entry in record["detectors"].values():
        if entry.get("status") == "ok":
            entry["retrain"] = _resolve(entry["retrain"], results)


# ----------------------------------------------------------------------------- targets


def _best(record: dict[str, Any], family: str) -> tuple[str, dict[str, Any]] | None:
    candidates = [(name, e) for name, e in record["detectors"].items()
                  if e.get("status") == "ok" and e["family"] == family and e["metrics"]["average_precision"] is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda item: item[1]["metrics"]["average_precision"])


def evaluate_targets(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per hard-regime cell: AP margin over the best peer, cleaned accuracy vs the oracle, ASR vs the oracle.

    "Best cleanse estimator" = the cleanse estimator with the highest AP in the cell; its cleaned
    accuracy and ASR are the ones compared with the oracle (mean over training seeds).
    """
    rows = []
    for record in cells:
        for regime in record["regimes"]:
            best_cleanse, best_peer = _best(record, "cleanse"), _best(record, "peer")
            row: dict[str, Any] = {"regime": regime, "cell": record["key"]}
            if best_cleanse is None:
                rows.append({**row, "note": "no cleanse estimator ran"})
                continue
            name, entry = best_cleanse
            ap = entry["metrics"]["average_precision"]
            row.update(best_cleanse=name, best_cleanse_ap=ap)
            if best_peer is not None:
                peer_ap = best_peer[1]["metrics"]["average_precision"]
                row.update(best_peer=best_peer[0], best_peer_ap=peer_ap, ap_margin=ap - peer_ap,
                           ap_target_met=bool(ap >= peer_ap + 0.05))
            oracle = record["references"]["oracle"]
            cleaned = entry["retrain"]
            if cleaned["test_accuracy"] and oracle["test_accuracy"]:
                acc, oracle_acc = cleaned["test_accuracy"]["mean"], oracle["test_accuracy"]["mean"]
                row.update(accuracy=acc, oracle_accuracy=oracle_acc, accuracy_gap=acc - oracle_acc,
                           accuracy_target_met=bool(acc >= oracle_acc - 0.005))
            if record["corruption"] == "backdoor5" and cleaned.get("attack_success_rate") and oracle.get("attack_success_rate"):
                asr, oracle_asr = cleaned["attack_success_rate"]["mean"], oracle["attack_success_rate"]["mean"]
                before = record["references"]["no removal"]["attack_success_rate"]["mean"]
                row.update(asr=asr, oracle_asr=oracle_asr, asr_before=before, asr_target_met=bool(asr <= oracle_asr + 0.02))
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- markdown


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pm(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "–"
    return f"{summary['mean']:.3f} ± {summary['sd']:.3f}"


def _met(flag: bool | None) -> str:
    return "–" if flag is None else ("**met**" if flag else "missed")


def _cell_table(record: dict[str, Any]) -> list[str]:
    backdoor = record["corruption"] == "backdoor5"
    ok = {name: e for name, e in record["detectors"].items() if e.get("status") == "ok"}
    best = {}
    for metric in ("roc_auc", "average_precision", "precision_at_k"):
        values = [e["metrics"][metric] for e in ok.values() if e["metrics"][metric] is not None]
        best[metric] = max(values) if values else None
    accs = [e["retrain"]["test_accuracy"]["mean"] for e in ok.values() if e["retrain"]["test_accuracy"]]
    best["acc"] = max(accs) if accs else None
    asrs = [e["retrain"]["attack_success_rate"]["mean"] for e in ok.values() if e["retrain"].get("attack_success_rate")]
    best["asr"] = min(asrs) if asrs else None

    def bold(text: str, value: float | None, target: float | None) -> str:
        return f"**{text}**" if value is not None and target is not None and abs(value - target) < 1e-12 else text

    header = "| detector | family | ROC-AUC | AP | P@k | score s | prep s | test acc after removing top-k |"
    rule = "|---|---|---|---|---|---|---|---|"
    if backdoor:
        header += " ASR after |"
        rule += "---|"
    lines = [header, rule]
    for name, e in ok.items():
        m = e["metrics"]
        acc = e["retrain"]["test_accuracy"]
        sd = e.get("metrics_sd", {})

        def with_sd(metric: str) -> str:
            text = _fmt(m[metric])
            return f"{text} ± {sd[metric]:.3f}" if m[metric] is not None and sd.get(metric) else text

        cells = [name, e["family"],
                 bold(with_sd("roc_auc"), m["roc_auc"], best["roc_auc"]),
                 bold(with_sd("average_precision"), m["average_precision"], best["average_precision"]),
                 bold(with_sd("precision_at_k"), m["precision_at_k"], best["precision_at_k"]),
                 f"{e['score_seconds']:.2f}", f"{e['prep_seconds']:.2f}",
                 bold(_pm(acc), acc["mean"] if acc else None, best["acc"])]
        if backdoor:
            asr = e["retrain"].get("attack_success_rate")
            cells.append(bold(_pm(asr), asr["mean"] if asr else None, best["asr"]))
        lines.append("| " + " | ".join(cells) + " |")
    labels = {"no removal": "*no removal*", "random": "*random k removed*", "oracle": "*oracle (corrupted removed)*"}
    for name, label in labels.items():
        ref = record["references"][name]
        cells = [label, "reference", "", "", "", "", "", _pm(ref["test_accuracy"])]
        if backdoor:
            cells.append(_pm(ref.get("attack_success_rate")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plots(data: dict[str, Any], img_dir: Path) -> list[str]:
    """AP per regime per detector (bars) and AP per cell per detector (heatmap); returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = data["cells"]
    names = [n for n in _detector_order(cells)]
    if not names:
        return []
    img_dir.mkdir(parents=True, exist_ok=True)
    files = []

    def ap(record: dict[str, Any], name: str) -> float:
        entry = record["detectors"].get(name, {})
        if entry.get("status") != "ok" or entry["metrics"]["average_precision"] is None:
            return float("nan")
        return entry["metrics"]["average_precision"]

    groups = {"easy (no hard regime)": [c for c in cells if not c["regimes"]]}
    for regime in ("memorising MLP", "40% pair flips", "backdoor"):
        groups[regime] = [c for c in cells if regime in c["regimes"]]
    groups = {g: cs for g, cs in groups.items() if cs}
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups) * max(1, len(names)) / 6), 4.5))
    width = 0.8 / len(names)
    colors = plt.get_cmap("tab20")
    for j, name in enumerate(names):
        means = [np.nanmean([ap(c, name) for c in cs]) if any(np.isfinite(ap(c, name)) for c in cs) else np.nan
                 for cs in groups.values()]
        ax.bar(np.arange(len(groups)) + (j - (len(names) - 1) / 2) * width, means, width, label=name, color=colors(j % 20))
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels([f"{g}\n({len(cs)} cells)" for g, cs in groups.items()])
    ax.set_ylabel("average precision (mean over cells)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2, loc="upper right", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Detection AP per regime (seed-0 detection model)")
    fig.tight_layout()
    fig.savefig(img_dir / "quality_ap.png", dpi=110)
    plt.close(fig)
    files.append("quality_ap.png")

    matrix = np.array([[ap(c, name) for name in names] for c in cells])
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(names), 1.2 + 0.28 * len(cells)))
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(cells)))
    ax.set_yticklabels([c["key"] for c in cells], fontsize=7)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=5.5,
                        color="white" if matrix[i, j] < 0.5 else "black")
    fig.colorbar(image, ax=ax, label="AP")
    ax.set_title("AP per cell (blank = skipped)")
    fig.tight_layout()
    fig.savefig(img_dir / "quality_ap_cells.png", dpi=110)
    plt.close(fig)
    files.append("quality_ap_cells.png")
    return files


def _detector_order(cells: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for record in cells:
        for name, entry in record["detectors"].items():
            if entry.get("status") == "ok" and name not in names:
                names.append(name)
    return names


def render_markdown(data: dict[str, Any], md_path: Path, img_dir: Path | None = None) -> str:
    """Regenerate the Quality section of ``md_path`` (between the markers) and its plots."""
    md_path = Path(md_path)
    img_dir = Path(img_dir) if img_dir is not None else md_path.parent / "img"
    meta, cells, targets = data["meta"], data["cells"], data["targets"]
    rel = os.path.relpath(img_dir, md_path.parent)
    plots = _plots(data, img_dir)

    out = [START_MARKER, "## Quality", ""]
    out += [
        f"Generated by `{meta['command']}` on {meta['finished']} "
        f"({meta['runtime_seconds'] / 60:.1f} min wall on {meta['machine']}). "
        f"Grid `{meta['grid']}`: {len(cells)} cells; training seeds {meta['seeds']} for every retrain "
        "(split and corruption fixed, seed 0); detectors scored on the models of the first "
        f"{meta.get('detection_seeds', len(meta['seeds']))} seed(s) (per cell below), the other seeds retraining without "
        "the last detection model's top-k. "
        "Raw numbers, per-seed values and every skip reason: "
        f"`{meta['json']}`.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        "Metrics: ROC-AUC, AP and P@k (k = number corrupted, so P@k = R@k) against the ground truth; "
        "*score s* is the detector's own time (perf_counter, this process, 1 thread); *prep s* is extra "
        "training a detector needs outside scoring (cleanlab's 5-fold fits; cleanse's `cleanlab` "
        "estimator includes its folds in *score s*). Test accuracy (clean labels) and attack success rate "
        "(share of triggered non-target test inputs classified as the target) are mean ± sd (ddof 1) over "
        "the training seeds after removing the detector's top-k and retraining from scratch. "
        "**Bold** = best in the column (highest; lowest ASR). AUM is a free baseline, not a peer. cleanse's "
        "`cleanlab` estimator wraps the same cleanlab calls as the `cleanlab` peer (with different folds and seeds).",
        "",
    ]
    for name in plots:
        out += [f"![{name}]({rel}/{name})", ""]

    out += ["### Targets (hard regimes)", "",
            "Per cell of each hard regime: the best cleanse estimator (highest AP) against the best peer "
            "(target AP ≥ peer + 0.05); its cleaned accuracy against the oracle (target ≥ oracle − 0.5 pt, "
            "means over seeds); for backdoors its ASR against the oracle's (target ≤ oracle + 2 pt).", "",
            "| regime | cell | best cleanse (AP) | best peer (AP) | AP margin | AP target | acc cleaned / oracle | "
            "acc target | ASR before → cleaned / oracle | ASR target |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for row in targets:
        if "best_cleanse" not in row:
            out.append(f"| {row['regime']} | {row['cell']} | {row.get('note', '')} | | | | | | | |")
            continue
        asr = (f"{row['asr_before']:.3f} → {row['asr']:.3f} / {row['oracle_asr']:.3f}" if "asr" in row else "–")
        out.append(
            f"| {row['regime']} | {row['cell']} | {row['best_cleanse']} ({row['best_cleanse_ap']:.3f}) | "
            f"{row.get('best_peer', '–')} ({_fmt(row.get('best_peer_ap'))}) | {_fmt(row.get('ap_margin'), 3)} | "
            f"{_met(row.get('ap_target_met'))} | {_fmt(row.get('accuracy'))} / {_fmt(row.get('oracle_accuracy'))} | "
            f"{_met(row.get('accuracy_target_met'))} | {asr} | {_met(row.get('asr_target_met'))} |")
    out += ["", "Summary (cells meeting each target / cells in the regime):", ""]
    out += ["| regime | AP ≥ best peer + 0.05 | acc ≥ oracle − 0.5 pt | ASR ≤ oracle + 2 pt |", "|---|---|---|---|"]
    for regime in dict.fromkeys(r["regime"] for r in targets):
        rows = [r for r in targets if r["regime"] == regime]

        def count(key: str) -> str:
            flags = [r[key] for r in rows if key in r]
            return f"{sum(flags)} / {len(flags)}" if flags else "–"

        out.append(f"| {regime} | {count('ap_target_met')} | {count('accuracy_target_met')} | {count('asr_target_met')} |")

    out += ["", "### Per cell", ""]
    for record in cells:
        dm = record["detection_model"]
        fitted = dm["train_accuracy_on_corrupted"]
        out += [f"#### {record['dataset']} · {CORRUPTION_LABEL[record['corruption']]} · {MODEL_LABEL[record['model']]}", "",
                f"n_train {record['n_train']}, k = {record['k']} corrupted, n_test {record['n_test']}, "
                f"{record['n_params']} parameters, {record['model_config']['epochs']} epochs. Detection model: "
                f"train accuracy {dm['train_accuracy']:.3f} on the given labels "
                f"({_fmt(fitted)} on the corrupted ones), test accuracy {dm['test_accuracy']:.3f}"
                + (f", ASR {dm['attack_success_rate']:.3f}" if "attack_success_rate" in dm else "")
                + f"; trained in {dm['train_seconds']:.1f} s (seed {dm['seed']}). Detection metrics and scoring times "
                f"are means (± sd) over {len(record.get('detection_models', [dm]))} detection seed(s), each "
                "seed's detectors scoring that seed's model; retrains use every training seed.", ""]
        out += _cell_table(record)
        skipped = [f"{n} ({e['status']}: {e['reason']})" for n, e in record["detectors"].items()
                   if e.get("status") in ("skipped", "failed") and n not in NOT_RUN]
        if skipped:
            out += ["", "Not run here: " + "; ".join(skipped) + "."]
        issues = record["detectors"].get("cleanlab", {}).get("extra", {})
        if issues.get("find_label_issues_flagged") is not None:
            out += ["", f"cleanlab `find_label_issues` flags {issues['find_label_issues_flagged']} "
                        f"(precision {_fmt(issues['find_label_issues_precision'])}, "
                        f"recall {_fmt(issues['find_label_issues_recall'])})."]
        out.append("")
    out += ["### Not run, and skip rules", ""] + [f"- {n} (nowhere): {why}" for n, why in NOT_RUN.items()]
    out += [f"- {n} (where it applies; see each cell): {why}" for n, _, why in SKIP_RULES]
    out += ["", END_MARKER]
    section = "\n".join(out) + "\n"

    existing = md_path.read_text() if md_path.is_file() else "# Benchmarks\n\n"
    if START_MARKER in existing and END_MARKER in existing:
        head, rest = existing.split(START_MARKER, 1)
        _, tail = rest.split(END_MARKER, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = existing.rstrip("\n") + "\n\n" + section
    md_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = md_path.with_suffix(md_path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(md_path)
    return section


# ----------------------------------------------------------------------------- main


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("cleanse", "cleanlab", "captum", "dattri", "kronfluence"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001
            out[name] = "not installed"
    return out


def run(grid: str, seeds: list[int], out: Path, docs: Path | None, jobs: int, only: list[str] | None = None,
        cell_patterns: list[str] | None = None, log: Callable[[str], None] = print,
        detection_seeds: int | None = None, retrain_device: str = "cpu",
        with_references: bool = True) -> dict[str, Any]:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    cells = GRIDS[grid]()
    dets = detectors()
    if only:
        dets = [d for d in dets if d.name in only or d.family == "cleanse" and "cleanse" in only]
    if cell_patterns:
        cells = [c for c in cells if any(fnmatch.fnmatch(c.key, pattern) for pattern in cell_patterns)]
    warm_imports(dets)
    retrainer = Retrainer(jobs, retrain_device)
    records = []
    for cell in cells:
        cell_started = time.perf_counter()
        records.append(score_cell(cell, seeds, dets, retrainer, log, detection_seeds, with_references))
        records[-1]["scoring_wall_seconds"] = time.perf_counter() - cell_started
        retrainer.pump(1)
    log(f"scoring done in {time.perf_counter() - started:.0f} s; waiting for retrains")
    retrainer.drain(log)
    for record in records:
        resolve_cell(record, retrainer.results)
    data = {
        "meta": {
            "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else
                       "python benchmarks/quality.py",
            "grid": grid, "seeds": seeds, "detection_seeds": detection_seeds or len(seeds),
            "retrain_device": retrain_device, "json": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
            "finished": time.strftime("%Y-%m-%d %H:%M"), "runtime_seconds": time.perf_counter() - started,
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, torch threads 1 per process, "
                       f"{max(jobs, 1)} retrain worker(s)",
            "versions": _versions(), "n_retrains": len(retrainer.results),
            "not_run": NOT_RUN, "skip_rules": {name: why for name, _, why in SKIP_RULES},
        },
        "cells": records,
    }
    data["targets"] = evaluate_targets(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(data), indent=1))
    log(f"wrote {out} ({data['meta']['runtime_seconds']:.0f} s, {len(retrainer.results)} retrains)")
    if docs is not None:
        render_markdown(data, docs)
        log(f"wrote {docs}")
    return data


def merge_runs(runs: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """One result from runs over cell subsets (e.g. run side by side on a many-core machine).

    A cell in several runs keeps the first run's record; the detectors a later run scored replace
    the earlier entries (recorded under ``replaced_detectors``).
    """
    order = {cell.key: i for i, cell in enumerate(full_grid())}
    cells: dict[str, dict[str, Any]] = {}
    for run_data in runs:
        for record in run_data["cells"]:
            if record["key"] not in cells:
                if not (record["references"].get("oracle") or {}).get("test_accuracy"):
                    print(f"merge: {record['key']} only appears in a detector-only run (--no-references); left out")
                    continue
                cells[record["key"]] = record
                continue
            # A later run of the same cell (e.g. ``--only`` one detector after a fix) replaces the
            # detectors it ran; the cell's references and other detectors stay from the first run.
            base = cells[record["key"]]
            if record["detection_models"][0]["seed"] != base["detection_models"][0]["seed"] or record["k"] != base["k"]:
                raise SystemExit(f"cell {record['key']}: runs disagree on the detection seed or the corruption")
            ran = {n: e for n, e in record["detectors"].items() if n not in NOT_RUN}
            base["detectors"].update(ran)
            base.setdefault("replaced_detectors", []).extend(ran)
    meta = dict(runs[0]["meta"])
    meta.update(
        command=f"{len(runs)} runs of python benchmarks/quality.py --cells ... side by side, merged with --merge",
        runtime_seconds=max(r["meta"]["runtime_seconds"] for r in runs),
        n_retrains=sum(r["meta"]["n_retrains"] for r in runs),
        machine=f"{len(runs)} processes side by side on: " + "; ".join(dict.fromkeys(r["meta"]["machine"] for r in runs)),
        json=str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
    )
    records = sorted(cells.values(), key=lambda r: order.get(r["key"], len(order)))
    data = {"meta": meta, "cells": records, "targets": evaluate_targets(records)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(data), indent=1))
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds for the retrains; the first trains the "
                                                          "detection model")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quality.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/benchmarks.md",
                        help="markdown file whose Quality section is regenerated; plots go to its img/ folder")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--jobs", type=int, default=2, help="retrain worker processes (0 = in this process)")
    parser.add_argument("--only", default=None, help="comma-separated detector names to run ('cleanse' = all "
                                                      "cleanse estimators); default all")
    parser.add_argument("--cells", default=None, help="comma-separated glob patterns on dataset/corruption/model, "
                                                       "e.g. 'digits/*/mlp_mem'; default the whole grid")
    parser.add_argument("--render-only", action="store_true", help="regenerate the docs from --out and exit")
    parser.add_argument("--detector-budget", type=float, default=None,
                        help="seconds one detector may take on one model; past it, the detector is skipped in "
                             "that cell and recorded as over budget")
    parser.add_argument("--detection-seeds", type=int, default=None,
                        help="score detectors on the models of only the first N training seeds (default all); "
                             "the other seeds retrain without the last detection model's top-k")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the no-removal/random/oracle retrains (for --only runs merged onto a full run)")
    parser.add_argument("--retrain-device", default="cpu", help="device of the retrain workers (cpu | cuda)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="combine the JSONs of runs on disjoint --cells into --out (grid order), recompute "
                             "the targets and regenerate the docs")
    args = parser.parse_args(argv)
    if args.merge:
        data = merge_runs([json.loads(path.read_text()) for path in args.merge], args.out)
        if not args.no_docs:
            render_markdown(data, args.docs)
        print(f"merged {len(args.merge)} runs ({len(data['cells'])} cells) into {args.out}")
        return 0
    if args.render_only:
        render_markdown(json.loads(args.out.read_text()), args.docs)
        print(f"wrote {args.docs}")
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    global DETECTOR_BUDGET_S
    DETECTOR_BUDGET_S = args.detector_budget

    def log(line: str) -> None:
        print(line, flush=True)

    run(args.grid, seeds, args.out, None if args.no_docs else args.docs, args.jobs,
        args.only.split(",") if args.only else None, args.cells.split(",") if args.cells else None, log,
        args.detection_seeds, args.retrain_device, not args.no_references)
    return 0


if __name__ == "__main__":
    sys.exit(main())

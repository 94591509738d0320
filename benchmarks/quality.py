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
  self-influence;
- the same peers given the clean validation split (rows ending in "(val)"): train -> validation
  attributions, each training sample scored by minus its summed helpfulness to the validation loss.

Two leagues. A detector that reads the validation labels (a cleanse estimator's own
``reads_validation_labels`` declaration; the "(val)" peers; the ``trusted`` baseline, a model fitted
on the validation split alone) is compared only with the peers given the same data; the others only
with the self-influence peers. Targets are counted per *fixed* estimator (estimator x regime ->
cells meeting the target), never for a per-cell best chosen with the ground truth.

Detection metrics (ROC-AUC, AP, P@k with k = number corrupted) are computed against the ground
truth. Each detector's top-k is then removed and the model retrained with every training seed
(``cleanse.pipeline.retrain_without``); test accuracy and, for backdoors, the attack success rate
are reported as mean +- sd over seeds, next to no removal, random removal (an independent draw per
seed) and the oracle (exactly the corrupted samples removed). When
``benchmarks/results/recommend.json`` (``benchmarks/recommend.py``) exists, the recommendation of
``cleanse run`` is shown next to the fixed estimators for the cells it covers.

    .venv-bench/bin/python benchmarks/quality.py                       # full grid, about 45 min on 2 cores
    .venv-bench/bin/python benchmarks/quality.py --grid smoke --out /tmp/q.json --docs /tmp/b.md
    .venv-bench/bin/python benchmarks/quality.py --render-only         # docs from an existing JSON
    # new detectors only, onto an existing result (no reference retrains, detection metrics only):
    .venv-bench/bin/python benchmarks/quality.py --only "cleanse trusted" --no-references --detect-only \
        --detection-seeds 1 --out /tmp/new.json --no-docs
    .venv-bench/bin/python benchmarks/quality.py --merge benchmarks/results/quality.json /tmp/new.json

Writes the JSON (``--out``) and regenerates the "Quality" section of ``docs/benchmarks.md``
(between ``<!-- quality:start -->`` and ``<!-- quality:end -->``; the rest of the file is kept) with
its plots under ``docs/img/``.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import functools
import hashlib
import importlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("CLEANSE_DEVICE", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")  # dattri and kronfluence draw progress bars

import numpy as np
import torch
from torch import nn

from _common import TimeLimitExceeded, time_limit

from cleanse import api
from cleanse.config import Params, load_params
from cleanse.data.dataset import StagedData
from cleanse.estimators import registry
from cleanse.evaluate import detection_metrics
from cleanse.models.architectures import n_parameters, spec_for
from cleanse.models.trainer import TrainedModel, predict_proba, train_model
from cleanse.pipeline import evaluate_model, random_ids, retrain_without

ROOT = Path(__file__).resolve().parent.parent
START_MARKER = "<!-- quality:start -->"
END_MARKER = "<!-- quality:end -->"
DEFAULT_RECOMMEND = ROOT / "benchmarks/results/recommend.json"

# ----------------------------------------------------------------------------- the grid

DATASETS = ("digits", "breast_cancer", "wine")

CORRUPTIONS: dict[str, list[str]] = {
    "sym20": ["corruption.kind=label_flip", "corruption.mode=symmetric", "corruption.fraction=0.2"],
    "pair40": ["corruption.kind=label_flip", "corruption.mode=pair", "corruption.fraction=0.4"],
    "backdoor5": ["corruption.kind=backdoor", "corruption.fraction=0.05", "corruption.target_class=0",
                  "corruption.trigger_size=3"],
}
# Multi-source pair flips: the 40% of samples that ``pair40`` picks (same seed, same samples), each
# relabelled from class c to one of the fixed classes c+1, c+2, c+3 (mod C; drawn uniformly per
# sample), so every class receives flips from three source classes instead of one. Single-source
# pair noise makes each flipped class one tight cluster inside its new label, which is what
# activation clustering splits off; these cells test whether that survives several sources. Needs
# C >= 3 (binary data has a single other class): digits (3 sources per class) and wine (C = 3, so
# c+1 and c+2 only: 2 sources). Applied after staging by :func:`multi_source_pair`.
CORRUPTIONS["multipair40"] = CORRUPTIONS["pair40"]
MULTI_SOURCE_OFFSETS = (1, 2, 3)
MULTI_SOURCE_DATASETS = ("digits", "wine")
CORRUPTION_LABEL = {"sym20": "20% symmetric flips", "pair40": "40% pair flips", "backdoor5": "5% backdoor",
                    "multipair40": "40% multi-source pair flips (c → c+1, c+2 or c+3)"}


def multi_source_pair(staged: StagedData, seed: int) -> StagedData:
    """Relabel ``pair40``'s flipped samples from ``c -> c+1`` to ``c -> c+o``, ``o`` drawn uniformly
    from the offsets in :data:`MULTI_SOURCE_OFFSETS` below the number of classes (seeded).

    The corrupted set (``is_corrupted``) is unchanged: every chosen sample still gets a wrong label.
    """
    n_classes = staged.meta.n_classes
    offsets = np.array([o for o in MULTI_SOURCE_OFFSETS if o < n_classes])
    if offsets.size < 2:
        raise ValueError(f"multi-source pair flips need at least 3 classes, the data has {n_classes}")
    train = staged.train
    chosen = np.flatnonzero(train.is_corrupted)
    rng = np.random.default_rng([seed, 4242])
    label = train.label.copy()
    label[chosen] = (train.label_clean[chosen] + rng.choice(offsets, size=chosen.size)) % n_classes
    is_corrupted = label != train.label_clean
    assert np.array_equal(is_corrupted, train.is_corrupted)
    return replace(staged, train=replace(train, label=label, is_corrupted=is_corrupted))

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
        if self.corruption == "multipair40":
            out.append("multi-source pair flips")
        return out

    def params(self, seed: int = 0) -> Params:
        return load_params(None, [
            f"seed={seed}", f"data.source=sklearn:{self.dataset}", *CORRUPTIONS[self.corruption],
            *MODELS[self.model](self.dataset), *SCORER_OVERRIDES, "tracking.enabled=false",
        ])

    def stage(self, params: Params) -> StagedData:
        """The staged splits of this cell (the pipeline's own corruption, then any benchmark-only one)."""
        staged = api.stage(params)
        if self.corruption == "multipair40":
            staged = multi_source_pair(staged, params.seed)
        return staged


def full_grid() -> list[Cell]:
    """37 cells: 3 datasets x 3 corruptions x {logreg, mlp, memorising mlp} + the CNN on digits (30),
    and multi-source pair flips on digits and wine (7).

    Ordered with the memorising cells first: their retrains are the slowest and run in the
    background while the cheaper cells are scored.
    """
    cells = [Cell(ds, corruption, model) for ds in DATASETS for corruption in CORRUPTIONS
             for model in ("logreg", "mlp", "mlp_mem", "cnn") if model != "cnn" or ds == "digits"
             if corruption != "multipair40" or ds in MULTI_SOURCE_DATASETS]
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

    def val_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean validation split (features, labels): the trusted data of the trusted league."""
        return (torch.as_tensor(self.staged.val.features, dtype=torch.float32),
                torch.as_tensor(self.staged.val.label, dtype=torch.long))

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


# Leagues: a detector that reads the clean validation labels ("trusted") is only compared with
# detectors given the same trusted data; one that reads only the (possibly corrupted) training set
# and the model ("untrusted") with the self-influence peers.
TRUSTED, UNTRUSTED = "trusted", "untrusted"
LEAGUE_LABEL = {UNTRUSTED: "no validation labels", TRUSTED: "reads the clean validation labels"}
# Baselines of the trusted league: cleanse estimators that are the bar, not a contender.
TRUSTED_BASELINES = ("trusted",)


@dataclass
class Detector:
    name: str
    family: str  # "cleanse" | "baseline" | "peer"
    fn: Callable[[Bench], tuple[np.ndarray, dict[str, Any]]]
    requires: tuple[str, ...] = ()
    note: str = ""
    league: str = UNTRUSTED
    unavailable: str | None = None  # why it cannot run here (checked before the first cell)


@functools.lru_cache(maxsize=None)
def cleanse_league(name: str) -> str | None:
    """The league of cleanse estimator ``name`` with the grid's scorer options (``params.scorers``
    plus :data:`SCORER_OVERRIDES`), from its own declaration; ``None`` when it cannot be imported."""
    from cleanse.estimators.base import reads_validation_labels

    try:
        estimator = registry.get(name)
    except Exception:  # noqa: BLE001 - not importable here: no declaration to read
        return None
    options = load_params(None, SCORER_OVERRIDES).scorers.of(name)
    return TRUSTED if reads_validation_labels(estimator, options) else UNTRUSTED


def _cleanse_detector(name: str) -> Detector:
    def run(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
        estimator = registry.get(name)
        options = bench.params.scorers.of(name)
        context = api.context(bench.params, bench.staged, bench.model, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = estimator.score(context, options)
        if result.table["sample_id"].to_list() != bench.staged.train.sample_id.tolist():
            raise RuntimeError(f"estimator {name} returned rows out of training order")
        meta = {key: value for key, value in result.meta.items() if key != "reports"}
        return result.table["score"].to_numpy(), _jsonable(meta)

    league = cleanse_league(name)
    unavailable = None
    if league is None:
        try:
            registry.get(name)
        except Exception as exc:  # noqa: BLE001 - recorded as the skip reason
            unavailable = f"estimator not importable here: {type(exc).__name__}: {exc}"
        league = TRUSTED if name in TRUSTED_BASELINES else UNTRUSTED
    family = "baseline" if name in TRUSTED_BASELINES else "cleanse"
    return Detector(f"cleanse {name}", family, run, league=league, unavailable=unavailable)


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


def _dattri_if_last_layer(bench: Bench) -> tuple[Any, nn.Linear, nn.Module]:
    """dattri IFAttributorExplicit on the last layer, damping 1e-3, with the frozen penultimate
    features as its data (returns the attributor, the last layer and the feature map).

    Workarounds (peer-baselines.md): dattri builds the Hessian through the whole network even with
    ``layer_name``, so it gets the last layer as the model and the frozen penultimate features as
    the data (the same function of the last-layer parameters); and ``transform_test_rep`` sums
    per-batch inverses, so the train loader is one batch.
    """
    from dattri.algorithm.influence_function import IFAttributorExplicit
    from dattri.task import AttributionTask

    module = bench.model.module()
    assert isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Linear)
    last = copy.deepcopy(module[-1])
    task = AttributionTask(loss_func=_dattri_loss(last, 1), model=last,
                           checkpoints={k: v.detach().clone() for k, v in last.state_dict().items()})
    return IFAttributorExplicit(task=task, regularization=1e-3, device="cpu"), last, module[:-1]


def _features_loader(features: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.utils.data.DataLoader:
    """The penultimate features of ``x`` with labels ``y``, as one batch."""
    with torch.no_grad():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features(x), y), batch_size=len(y))


def det_dattri_if(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """dattri IFAttributorExplicit self-influence on the last layer (:func:`_dattri_if_last_layer`)."""
    attributor, last, features = _dattri_if_last_layer(bench)
    loader = _features_loader(features, *bench.tensors())
    attributor.cache(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = attributor.self_attribute(loader)
    return scores.detach().double().numpy().reshape(-1), {"layer": "last", "params": n_parameters(last)}


def _dattri_tracin(bench: Bench) -> Any:
    """dattri TracInAttributor over all checkpoints, lr weights, random projection (it always projects)."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    module = bench.model.module()
    checkpoints = bench.checkpoints()
    task = AttributionTask(loss_func=_dattri_loss(module, len(bench.staged.meta.feature_shape)), model=module,
                           checkpoints=[c.state for c in checkpoints])
    return TracInAttributor(task=task, weight_list=torch.tensor([c.lr for c in checkpoints]),
                            normalized_grad=False, projector_kwargs=_projector(bench), device="cpu")


def det_dattri_tracin(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """dattri TracIn self-influence (:func:`_dattri_tracin`)."""
    scores = _dattri_tracin(bench).self_attribute(bench.loader(64))
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


def _kronfluence_factors(bench: Bench, name: str) -> tuple[Any, torch.utils.data.TensorDataset]:
    """A kronfluence Analyzer with EK-FAC factors fitted on the training set, and that dataset."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    task = _kronfluence_task()
    model = prepare_model(bench.model.module().float(), task)
    out = tempfile.mkdtemp(dir=bench.workdir)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    analyzer = Analyzer(analysis_name=name, model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=out, log_level=logging.WARNING)
    dataset = bench.dataset()
    torch.manual_seed(bench.params.seed)
    analyzer.fit_all_factors(factors_name="ekfac", dataset=dataset, per_device_batch_size=256,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    return analyzer, dataset


def det_kronfluence(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """kronfluence EK-FAC self-influence (true Fisher from sampled labels), damping 1e-3."""
    from kronfluence.arguments import ScoreArguments

    analyzer, dataset = _kronfluence_factors(bench, "quality")
    analyzer.compute_self_scores(scores_name="self", factors_name="ekfac", train_dataset=dataset,
                                 per_device_train_batch_size=256, score_args=ScoreArguments(damping_factor=1e-3),
                                 overwrite_output_dir=True)
    scores = analyzer.load_self_scores("self")["all_modules"]
    return scores.detach().double().numpy().reshape(-1), {"damping": 1e-3}


def _kronfluence_task() -> Any:
    """Cross-entropy classification task: true Fisher from sampled labels for the factors, the
    summed cross-entropy as the measurement."""
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

    return Classification()


# ---- trusted league: the same peers, attributing the clean validation loss to the training samples.
# Every tool returns train -> validation scores oriented as "helpful" (positive: training on the
# sample lowers the validation loss); the detector score is minus the sum over the validation set,
# so higher = raises the validation loss = more likely harmful. Orientation checked on
# wine/sym20/logreg (seed 0, 21 of 106 flipped): with this sign the five tools reach AP 0.70-0.98,
# with the opposite 0.11-0.18 (chance 0.20), and their Spearman correlation with cleanse
# ``influence_val``'s score (documented sign) is +0.52 to +1.00 (dattri IF-explicit: +1.00).


def _harmful(helpful: torch.Tensor, train_axis: int) -> np.ndarray:
    """Minus the summed helpfulness over the validation axis of a train x val (or val x train) matrix."""
    helpful = helpful.detach().double()
    return -helpful.sum(dim=1 - train_axis).numpy().reshape(-1)


def det_captum_fast_val(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """captum TracInCPFast ``influence(validation batch)``: (n_val, n_train) last-layer TracInCP."""
    from captum.influence import TracInCPFast

    model = bench.model.module()
    tracin = TracInCPFast(model, _last_linear(model), bench.dataset(), bench.checkpoint_files(),
                          checkpoints_load_func=_captum_load, loss_fn=_ce_sum(), batch_size=512)
    return _harmful(tracin.influence(bench.val_tensors()), train_axis=1), {"n_val": len(bench.staged.val)}


def det_captum_full_val(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """captum TracInCP ``influence(validation batch)``: all layers, all checkpoints."""
    from captum.influence import TracInCP

    model = bench.model.module()
    tracin = TracInCP(model, bench.dataset(), bench.checkpoint_files(), checkpoints_load_func=_captum_load,
                      loss_fn=_ce_sum(), batch_size=512, sample_wise_grads_per_batch=True)
    return _harmful(tracin.influence(bench.val_tensors()), train_axis=1), {"n_val": len(bench.staged.val)}


def det_dattri_if_val(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """dattri IFAttributorExplicit ``attribute(train, validation)`` on the last layer
    (:func:`_dattri_if_last_layer`)."""
    attributor, last, features = _dattri_if_last_layer(bench)
    train_loader = _features_loader(features, *bench.tensors())
    attributor.cache(train_loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        helpful = attributor.attribute(train_loader, _features_loader(features, *bench.val_tensors()))
    return _harmful(helpful, train_axis=0), {"layer": "last", "params": n_parameters(last)}  # helpful: (n_train, n_val)


def det_dattri_tracin_val(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """dattri TracIn ``attribute(train, validation)`` (:func:`_dattri_tracin`)."""
    # dattri recomputes every test gradient per training batch: the validation set as one batch and
    # training batches of 256 keep that to a few passes.
    val = torch.utils.data.TensorDataset(*bench.val_tensors())
    val_loader = torch.utils.data.DataLoader(val, batch_size=len(val))
    helpful = _dattri_tracin(bench).attribute(bench.loader(256), val_loader)  # (n_train, n_val)
    return _harmful(helpful, train_axis=0), {"proj_dim": _projector(bench)["proj_dim"]}


def det_kronfluence_val(bench: Bench) -> tuple[np.ndarray, dict[str, Any]]:
    """kronfluence EK-FAC pairwise scores (validation queries x training samples), damping 1e-3."""
    from kronfluence.arguments import ScoreArguments

    analyzer, dataset = _kronfluence_factors(bench, "quality_val")
    analyzer.compute_pairwise_scores(scores_name="val", factors_name="ekfac",
                                     query_dataset=torch.utils.data.TensorDataset(*bench.val_tensors()),
                                     train_dataset=dataset, per_device_query_batch_size=256,
                                     per_device_train_batch_size=256,
                                     score_args=ScoreArguments(damping_factor=1e-3), overwrite_output_dir=True)
    helpful = analyzer.load_pairwise_scores("val")["all_modules"]  # (n_val, n_train)
    return _harmful(helpful, train_axis=1), {"damping": 1e-3}


def trusted_peers() -> list[Detector]:
    """The peers of the trusted league: each tool's train -> validation attribution."""
    captum, dattri_if = ("captum.influence",), ("dattri.algorithm.influence_function", "dattri.task")
    return [
        Detector("captum TracInCPFast (val)", "peer", det_captum_fast_val, captum, league=TRUSTED),
        Detector("captum TracInCP (val)", "peer", det_captum_full_val, captum, league=TRUSTED),
        Detector("dattri IF-explicit (val)", "peer", det_dattri_if_val, dattri_if, league=TRUSTED),
        Detector("dattri TracIn (val)", "peer", det_dattri_tracin_val, ("dattri.algorithm.tracin", "dattri.task"),
                 league=TRUSTED),
        Detector("kronfluence EK-FAC (val)", "peer", det_kronfluence_val, ("kronfluence.analyzer", "kronfluence.task"),
                 league=TRUSTED),
    ]


def detectors() -> list[Detector]:
    names = registry.names_for("classification")
    out = [_cleanse_detector(name) for name in names]
    # The trusted baseline is always a row: skipped with the reason where the estimator is missing.
    out += [Detector(f"cleanse {name}", "baseline", _cleanse_detector(name).fn, league=TRUSTED,
                     unavailable=f"estimator {name!r} is not in cleanse's registry here")
            for name in TRUSTED_BASELINES if name not in names]
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
    return out + trusted_peers()


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
    for det in dets:
        if det.family in ("cleanse", "baseline") and det.name.startswith("cleanse ") and det.unavailable is None:
            registry.get(det.name.removeprefix("cleanse "))
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
               with_references: bool = True, retrain_detectors: bool = True) -> dict[str, Any]:
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
    staged = cell.stage(params)
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
                reason = det.unavailable or _peer_status(det.requires)
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
                top_k = run.pop("top_k")
                if retrain_detectors:
                    last_top_k[det.name] = top_k
                    run["retrain"] = retrainer.submit(cell, params, staged, top_k, seed)
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
        entry: dict[str, Any] = {"family": det.family, "league": det.league}
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
            extra=ok[0]["extra"],
            retrain=[run["retrain"] for run in ok if "retrain" in run] + extra_retrains.get(det.name, []),
        )
        if any("non_finite_scores" in run for run in ok):
            entry["non_finite_scores"] = max(run.get("non_finite_scores", 0) for run in ok)
    for name, why in NOT_RUN.items():
        record["detectors"][name] = {"family": "peer", "league": UNTRUSTED, "status": "skipped", "reason": why}
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

HARD_REGIMES = ("memorising MLP", "40% pair flips", "multi-source pair flips", "backdoor")
AP_MARGIN = 0.05  # AP target: at least the best peer of the same league + 0.05
ACC_SLACK = 0.005  # cleaned accuracy target: at least the oracle's - 0.5 pt
ASR_SLACK = 0.02  # backdoor target: ASR at most the oracle's + 2 pt


def league_of(name: str, entry: dict[str, Any]) -> str:
    """A detector row's league: as recorded, else from the estimator's own declaration (cleanse
    rows), else by name (the trusted-league peers end in "(val)"; every other peer reads no
    validation labels)."""
    if entry.get("league") in (TRUSTED, UNTRUSTED):
        return entry["league"]
    if name.startswith("cleanse "):
        estimator = name.removeprefix("cleanse ")
        league = cleanse_league(estimator)
        if league is not None:
            return league
        return TRUSTED if estimator in TRUSTED_BASELINES else UNTRUSTED
    return TRUSTED if name.endswith("(val)") else UNTRUSTED


def annotate(cells: list[dict[str, Any]]) -> None:
    """Stamp every detector entry with its league, and the trusted baselines' family (for results
    written before leagues were recorded)."""
    for record in cells:
        for name, entry in record["detectors"].items():
            entry["league"] = league_of(name, entry)
            if name.removeprefix("cleanse ") in TRUSTED_BASELINES:
                entry["family"] = "baseline"


def _ok_ap(entry: dict[str, Any] | None) -> float | None:
    if not entry or entry.get("status") != "ok":
        return None
    return entry["metrics"]["average_precision"]


def _best_peer(record: dict[str, Any], league: str) -> tuple[str, float] | None:
    """The best peer of ``league`` in this cell by AP. Choosing the peer with the ground truth can
    only favour the peers: the bar a fixed estimator has to clear."""
    peers = [(name, _ok_ap(e)) for name, e in record["detectors"].items()
             if e["family"] == "peer" and e.get("league") == league and _ok_ap(e) is not None]
    return max(peers, key=lambda item: item[1]) if peers else None


def contenders(cells: list[dict[str, Any]]) -> list[str]:
    """Every cleanse estimator and baseline row (the fixed estimators the targets are counted for),
    in first-seen order."""
    names: list[str] = []
    for record in cells:
        for name, entry in record["detectors"].items():
            if entry["family"] in ("cleanse", "baseline") and entry.get("status") == "ok" and name not in names:
                names.append(name)
    return names


def evaluate_targets(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (fixed estimator, hard-regime cell): its AP against the best peer of its league
    (and, in the trusted league, against the trusted baseline), its cleaned accuracy against the
    oracle, and for backdoors its ASR against the oracle's. No row ever picks an estimator by the
    ground truth: counts per estimator are sums of that estimator's own rows.
    """
    annotate(cells)
    baselines = [f"cleanse {name}" for name in TRUSTED_BASELINES]
    rows = []
    for name in contenders(cells):
        for record in cells:
            entry = record["detectors"].get(name)
            for regime in record["regimes"]:
                league = league_of(name, entry or {})
                row: dict[str, Any] = {"estimator": name, "league": league, "regime": regime, "cell": record["key"]}
                ap = _ok_ap(entry)
                if ap is None:
                    rows.append({**row, "ran": False, "note": (entry or {}).get("reason", "not measured in this cell")})
                    continue
                row.update(ran=True, ap=ap)
                peer = _best_peer(record, league)
                if peer is not None:
                    row.update(best_peer=peer[0], best_peer_ap=peer[1], ap_margin=ap - peer[1],
                               ap_target_met=bool(ap >= peer[1] + AP_MARGIN))
                base_ap = next((_ok_ap(record["detectors"].get(b)) for b in baselines
                                if _ok_ap(record["detectors"].get(b)) is not None), None)
                if league == TRUSTED and base_ap is not None and name not in baselines:
                    row.update(trusted_ap=base_ap, trusted_target_met=bool(ap >= base_ap + AP_MARGIN))
                oracle, cleaned = record["references"]["oracle"], entry["retrain"]
                if cleaned.get("test_accuracy") and oracle.get("test_accuracy"):
                    acc, oracle_acc = cleaned["test_accuracy"]["mean"], oracle["test_accuracy"]["mean"]
                    row.update(accuracy=acc, oracle_accuracy=oracle_acc, accuracy_gap=acc - oracle_acc,
                               accuracy_target_met=bool(acc >= oracle_acc - ACC_SLACK))
                if (record["corruption"] == "backdoor5" and cleaned.get("attack_success_rate")
                        and oracle.get("attack_success_rate")):
                    asr, oracle_asr = cleaned["attack_success_rate"]["mean"], oracle["attack_success_rate"]["mean"]
                    row.update(asr=asr, oracle_asr=oracle_asr, asr_target_met=bool(asr <= oracle_asr + ASR_SLACK))
                rows.append(row)
    return rows


def target_counts(rows: list[dict[str, Any]], key: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """``(estimator, regime) -> (met, evaluated, cells in the regime)`` for target ``key``; an
    estimator that did not run in a cell, or a cell without the comparison, is not evaluated."""
    out: dict[tuple[str, str], tuple[int, int, int]] = {}
    for row in rows:
        met, evaluated, total = out.get((row["estimator"], row["regime"]), (0, 0, 0))
        flag = row.get(key)
        out[(row["estimator"], row["regime"])] = (met + bool(flag), evaluated + (flag is not None), total + 1)
    return out


# ----------------------------------------------------------------------------- recommendation


def load_recommendations(path: Path) -> dict[str, dict[str, Any]] | None:
    """Per cell, the recommendation of ``cleanse run`` (``benchmarks/recommend.py``'s per-seed
    records) summarised over seeds: the estimators it chose, its AP and cleaned accuracy, and the
    oracle's and no removal's accuracy from the same runs. ``None`` when the file is absent."""
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    if isinstance(raw, dict):
        raw = next((v for k, v in raw.items() if k in ("records", "runs", "results", "cells") and isinstance(v, list)), [])
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for rec in raw:
        if isinstance(rec, dict) and "cell" in rec and isinstance(rec.get("recommended"), dict):
            by_cell.setdefault(rec["cell"], []).append(rec)

    def get(rec: dict[str, Any] | None, *path: str) -> float | None:
        for key in path:
            if not isinstance(rec, dict):
                return None
            rec = rec.get(key)
        return float(rec) if isinstance(rec, (int, float)) and math.isfinite(float(rec)) else None

    def mean(values: list[float | None]) -> float | None:
        clean = [v for v in values if v is not None]
        return float(np.mean(clean)) if clean else None

    out = {}
    for cell, recs in by_cell.items():
        out[cell] = {
            "seeds": sorted(rec.get("seed") for rec in recs if rec.get("seed") is not None),
            "estimators": sorted({str(rec["recommended"].get("estimator")) for rec in recs}),
            "ap": mean([get(rec, "recommended", "detection", "average_precision") for rec in recs]),
            "accuracy": mean([get(rec, "recommended", "retrain", "test_accuracy") for rec in recs]),
            "asr": mean([get(rec, "recommended", "retrain", "attack_success_rate") for rec in recs]),
            "oracle_accuracy": mean([get(rec, "oracle", "retrain", "test_accuracy") or get(rec, "oracle", "test_accuracy")
                                     for rec in recs]),
            "baseline_accuracy": mean([get(rec, "baseline", "retrain", "test_accuracy")
                                       or get(rec, "baseline", "test_accuracy") for rec in recs]),
        }
    return out


RECOMMENDATION = "recommendation (cleanse run)"


def recommendation_rows(cells: list[dict[str, Any]], recs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Target rows for the recommendation, in the trusted league (it chooses by validation
    accuracy), for the hard-regime cells recommend.json covers; the format of :func:`evaluate_targets`."""
    rows = []
    for record in cells:
        rec = recs.get(record["key"])
        if rec is None:
            continue
        for regime in record["regimes"]:
            row: dict[str, Any] = {"estimator": RECOMMENDATION, "league": TRUSTED, "regime": regime,
                                   "cell": record["key"], "ran": rec["ap"] is not None}
            if rec["ap"] is not None:
                row["ap"] = rec["ap"]
                peer = _best_peer(record, TRUSTED)
                if peer is not None:
                    row.update(best_peer=peer[0], best_peer_ap=peer[1], ap_target_met=bool(rec["ap"] >= peer[1] + AP_MARGIN))
            if rec["accuracy"] is not None and rec["oracle_accuracy"] is not None:
                row["accuracy_target_met"] = bool(rec["accuracy"] >= rec["oracle_accuracy"] - ACC_SLACK)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- markdown


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pm(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "–"
    return f"{summary['mean']:.3f} ± {summary['sd']:.3f}"


def _short(name: str) -> str:
    return name.removeprefix("cleanse ")


def _regimes(cells: list[dict[str, Any]]) -> list[str]:
    return [r for r in HARD_REGIMES if any(r in c["regimes"] for c in cells)]


def _count_table(rows: list[dict[str, Any]], names: list[str], regimes: list[str], key: str,
                 cells: list[dict[str, Any]]) -> list[str]:
    """Estimator x regime: cells meeting target ``key`` / cells in the regime (not-evaluated cells noted)."""
    counts = target_counts(rows, key)
    lines = ["| estimator | " + " | ".join(f"{r} ({sum(r in c['regimes'] for c in cells)})" for r in regimes)
             + " | all hard rows |", "|---|" + "---|" * (len(regimes) + 1)]
    for name in names:
        texts, met_all, total_all, gaps = [], 0, 0, 0
        for regime in regimes:
            met, evaluated, total = counts.get((name, regime), (0, 0, 0))
            if total == 0:
                total = sum(regime in c["regimes"] for c in cells)
            missing = total - evaluated
            texts.append(f"{met} / {total}" + (f" ({missing} n/e)" if missing else ""))
            met_all, total_all, gaps = met_all + met, total_all + total, gaps + missing
        lines.append(f"| {_short(name)} | " + " | ".join(texts) + f" | **{met_all} / {total_all}**"
                     + (f" ({gaps} n/e)" if gaps else "") + " |")
    return lines


def _league_ap_table(cells: list[dict[str, Any]], league: str) -> list[str]:
    """Cells x detectors of one league: AP of every fixed estimator and peer (no per-cell best)."""
    names = [n for n in _detector_order(cells) if any(c["detectors"].get(n, {}).get("league") == league for c in cells)]
    own = [n for n in names if not any(c["detectors"].get(n, {}).get("family") == "peer" for c in cells)]
    peers = [n for n in names if n not in own]
    lines = ["| cell | " + " | ".join(_short(n) for n in own) + " | " + " | ".join(f"*{n}*" for n in peers) + " |",
             "|---|" + "---|" * (len(own) + len(peers))]
    for record in cells:
        values = [_fmt(_ok_ap(record["detectors"].get(n))) for n in own + peers]
        lines.append(f"| {record['key']} | " + " | ".join(values) + " |")
    return lines


def _ap_range(cells: list[dict[str, Any]], name: str) -> str:
    values = [_ok_ap(c["detectors"].get(name)) for c in cells]
    values = [v for v in values if v is not None]
    return f"{min(values):.3f}–{max(values):.3f} ({len(values)} cells)" if values else "not run"


def _recommendation_table(cells: list[dict[str, Any]], recs: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| cell | seeds | recommended estimator(s) | AP | best fixed estimator AP (which) | best trusted peer AP | "
             "acc cleaned / oracle / no removal |", "|---|---|---|---|---|---|---|"]
    for record in cells:
        rec = recs.get(record["key"])
        if rec is None:
            continue
        fixed = [(n, _ok_ap(record["detectors"].get(n))) for n in contenders([record])]
        fixed = [(n, ap) for n, ap in fixed if ap is not None]
        best = max(fixed, key=lambda item: item[1]) if fixed else None
        peer = _best_peer(record, TRUSTED)
        lines.append(
            f"| {record['key']} | {','.join(map(str, rec['seeds']))} | {', '.join(rec['estimators'])} | {_fmt(rec['ap'])} | "
            + (f"{best[1]:.3f} ({_short(best[0])})" if best else "–") + f" | {_fmt(peer[1] if peer else None)} | "
            f"{_fmt(rec['accuracy'])} / {_fmt(rec['oracle_accuracy'])} / {_fmt(rec['baseline_accuracy'])} |")
    return lines


def _cell_table(record: dict[str, Any]) -> list[str]:
    backdoor = record["corruption"] == "backdoor5"
    ok = {name: e for name, e in record["detectors"].items() if e.get("status") == "ok"}

    def best_of(league: str, metric: str) -> float | None:
        values = [e["metrics"][metric] for e in ok.values() if e["league"] == league and e["metrics"][metric] is not None]
        return max(values) if values else None

    def bold(text: str, value: float | None, target: float | None) -> str:
        return f"**{text}**" if value is not None and target is not None and abs(value - target) < 1e-12 else text

    header = "| detector | league | family | ROC-AUC | AP | P@k | score s | prep s | test acc after removing top-k |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    if backdoor:
        header += " ASR after |"
        rule += "---|"
    lines = [header, rule]
    for league in (UNTRUSTED, TRUSTED):
        for name, e in ok.items():
            if e["league"] != league:
                continue
            m, acc, sd = e["metrics"], e["retrain"]["test_accuracy"], e.get("metrics_sd", {})

            def with_sd(metric: str) -> str:
                text = _fmt(m[metric])
                text = f"{text} ± {sd[metric]:.3f}" if m[metric] is not None and sd.get(metric) else text
                return bold(text, m[metric], best_of(league, metric))

            cells = [name, "val labels" if league == TRUSTED else "–", e["family"], with_sd("roc_auc"),
                     with_sd("average_precision"), with_sd("precision_at_k"), f"{e['score_seconds']:.2f}",
                     f"{e['prep_seconds']:.2f}", _pm(acc)]
            if backdoor:
                cells.append(_pm(e["retrain"].get("attack_success_rate")))
            lines.append("| " + " | ".join(cells) + " |")
    labels = {"no removal": "*no removal*", "random": "*random k removed*", "oracle": "*oracle (corrupted removed)*"}
    for name, label in labels.items():
        ref = record["references"][name]
        cells = [label, "", "reference", "", "", "", "", "", _pm(ref["test_accuracy"])]
        if backdoor:
            cells.append(_pm(ref.get("attack_success_rate")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plots(data: dict[str, Any], img_dir: Path) -> list[str]:
    """Per league: AP per regime per detector (bars) and AP per cell per detector (heatmaps side by
    side); returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = data["cells"]
    leagues = {league: [n for n in _detector_order(cells)
                        if any(c["detectors"].get(n, {}).get("league") == league for c in cells)]
               for league in (UNTRUSTED, TRUSTED)}
    leagues = {league: names for league, names in leagues.items() if names}
    if not leagues:
        return []
    img_dir.mkdir(parents=True, exist_ok=True)

    def ap(record: dict[str, Any], name: str) -> float:
        value = _ok_ap(record["detectors"].get(name))
        return float("nan") if value is None else value

    groups = {"easy (no hard regime)": [c for c in cells if not c["regimes"]]}
    for regime in HARD_REGIMES:
        groups[regime] = [c for c in cells if regime in c["regimes"]]
    groups = {g: cs for g, cs in groups.items() if cs}
    fig, axes = plt.subplots(1, len(leagues), figsize=(7.5 * len(leagues), 4.8), squeeze=False)
    colors = plt.get_cmap("tab20")
    for ax, (league, names) in zip(axes[0], leagues.items()):
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            means = [np.nanmean([ap(c, name) for c in cs]) if any(np.isfinite(ap(c, name)) for c in cs) else np.nan
                     for cs in groups.values()]
            hatch = "//" if any(c["detectors"].get(name, {}).get("family") == "peer" for c in cells) else None
            ax.bar(np.arange(len(groups)) + (j - (len(names) - 1) / 2) * width, means, width, label=_short(name),
                   color=colors(j % 20), hatch=hatch, edgecolor="white" if hatch else None, linewidth=0)
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels([f"{g}\n({len(cs)} cells)" for g, cs in groups.items()], fontsize=7)
        ax.set_ylabel("average precision (mean over cells)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.14))
        ax.set_title(f"League: {LEAGUE_LABEL[league]} (hatched = peer)", fontsize=9)
    fig.savefig(img_dir / "quality_ap.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    widths = [len(names) for names in leagues.values()]
    fig, axes = plt.subplots(1, len(leagues), figsize=(2.5 + 0.5 * sum(widths), 1.4 + 0.26 * len(cells)),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for k, (ax, (league, names)) in enumerate(zip(axes[0], leagues.items())):
        matrix = np.array([[ap(c, name) for name in names] for c in cells])
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_short(n) for n in names], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(cells)))
        ax.set_yticklabels([c["key"] for c in cells] if k == 0 else [], fontsize=7)
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=5.5,
                            color="white" if matrix[i, j] < 0.5 else "black")
        n_own = sum(not _is_peer(cells, n) for n in names)
        ax.axvline(n_own - 0.5, color="white", linewidth=3)  # own estimators | peers
        ax.set_title(LEAGUE_LABEL[league] + " (peers right of the line)", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="AP", fraction=0.02)
    fig.suptitle("AP per cell, by league (blank = not run)", fontsize=10)
    fig.savefig(img_dir / "quality_ap_cells.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return ["quality_ap.png", "quality_ap_cells.png"]


def _is_peer(cells: list[dict[str, Any]], name: str) -> bool:
    return any(c["detectors"].get(name, {}).get("family") == "peer" for c in cells)


def _detector_order(cells: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for record in cells:
        for name, entry in record["detectors"].items():
            if entry.get("status") == "ok" and name not in names:
                names.append(name)
    # Own estimators and baselines first, then the peers.
    return sorted(names, key=lambda n: _is_peer(cells, n))


def render_markdown(data: dict[str, Any], md_path: Path, img_dir: Path | None = None,
                    recommend_path: Path | None = None) -> str:
    """Regenerate the Quality section of ``md_path`` (between the markers) and its plots; with
    ``recommend_path`` (default ``benchmarks/results/recommend.json``) present, the recommendation's
    rows too."""
    md_path = Path(md_path)
    img_dir = Path(img_dir) if img_dir is not None else md_path.parent / "img"
    meta, cells = data["meta"], data["cells"]
    targets = evaluate_targets(cells)
    recs = load_recommendations(Path(recommend_path) if recommend_path is not None else DEFAULT_RECOMMEND)
    if recs:
        targets += recommendation_rows(cells, recs)
    rel = os.path.relpath(img_dir, md_path.parent)
    plots = _plots(data, img_dir)
    regimes = _regimes(cells)
    names = contenders(cells) + ([RECOMMENDATION] if recs else [])
    by_league = {league: [n for n in names if any(r["estimator"] == n and r["league"] == league for r in targets)]
                 for league in (UNTRUSTED, TRUSTED)}
    detector_leagues = {league: [n for n in _detector_order(cells)
                                 if any(c["detectors"].get(n, {}).get("league") == league for c in cells)]
                        for league in (UNTRUSTED, TRUSTED)}

    out = [START_MARKER, "## Quality", ""]
    out += [
        f"Generated by `{meta['command']}` on {meta['finished']} "
        f"({meta['runtime_seconds'] / 60:.1f} min wall on {meta['machine']}). "
        f"Grid `{meta['grid']}`: {len(cells)} cells; training seeds {meta['seeds']} for every retrain unless a cell "
        "says otherwise (split and corruption fixed, seed 0); detectors scored on the models of the first "
        f"{meta.get('detection_seeds', len(meta['seeds']))} seed(s) (per cell below), the other seeds retraining without "
        "the last detection model's top-k. Raw numbers, per-seed values and every skip reason: "
        f"`{meta['json']}`.",
        "",
        *(["Runs merged in afterwards (new detectors or cells, on the same detection models; `--merge`):", "",
            *[f"{i}. `{r['command']}` ({r['finished']}, {r['runtime_seconds'] / 60:.1f} min wall on {r['machine']})"
              for i, r in enumerate(meta["merged_runs"], 1)], ""] if meta.get("merged_runs") else []),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        "Metrics: ROC-AUC, AP and P@k (k = number corrupted, so P@k = R@k) against the ground truth; "
        "*score s* is the detector's own time (perf_counter, this process, 1 thread); *prep s* is extra "
        "training a detector needs outside scoring (cleanlab's 5-fold fits). Test accuracy (clean labels) and "
        "attack success rate (share of triggered non-target test inputs classified as the target) are "
        "mean ± sd (ddof 1) over the training seeds after removing the detector's top-k and retraining from scratch; "
        "\"–\" where a detector was scored for detection only.",
        "",
        "### Two leagues",
        "",
        "cleanse treats the validation split as trusted: it is never corrupted. An estimator that reads its "
        "labels has information that a self-influence tool run on the training set alone does not, so every "
        "detector is placed in a league and compared only with the peers given the same data:",
        "",
        *[f"- **{LEAGUE_LABEL[league]}**: cleanse estimators and baselines " + ", ".join(_short(n) for n in names if not _is_peer(cells, n))
          + "; peers " + (", ".join(n for n in names if _is_peer(cells, n)) or "none") + "."
          for league, names in detector_leagues.items()],
        "",
        "A cleanse estimator's league is its own declaration (`reads_validation_labels` with the grid's options). "
        "The trusted-league peers are the same tools attributing the clean validation loss to the training samples "
        "(captum `influence(validation batch)`, dattri `attribute(train, validation)`, kronfluence pairwise scores "
        "with the validation set as queries); a training sample's score is minus its summed helpfulness, i.e. "
        "higher = raises the validation loss. `trusted` is the baseline of that league: "
        "a model fitted on the validation split alone, each training sample scored by its loss under the given "
        "label. AUM (minus the checkpoint-mean logit margin, Pleiss et al. 2020) is a free baseline of the other league.",
        "",
        "Peer settings: cleanse `trak`'s ridge (`scorers.trak.damping` 0.3, relative to the mean diagonal) was "
        "chosen on the linear datamodeling score (`benchmarks/influence.py`: digits with 20% symmetric flips, split "
        "seed 0 — the training split of this grid's digits/sym20 cells —, logistic regression and MLP, 30 retrained "
        "random halves, the first 20 test samples as queries). That is tuning on attribution, not on detection, "
        "but on this grid's own digits data; the flip-detection AUC of its self-scores moved by 0.001 over the "
        "dampings tried. dattri's TRAK runs at `regularization` 1e-3 (absolute) and was tuned on nothing; the other "
        "peers run at their defaults or at damping 1e-3.",
        "",
    ]
    for name in plots:
        out += [f"![{name}]({rel}/{name})", ""]

    out += ["### Targets per fixed estimator", "",
            "Each estimator is held fixed across the grid; a count is the number of hard-regime cells where that "
            f"estimator meets the target. The bar is the best peer **of the same league** in that cell + {AP_MARGIN} "
            "AP (the best peer is chosen per cell with the ground truth, which can only favour the peers). Nothing is "
            "chosen per cell for cleanse: there is no \"best cleanse estimator\" row. *n/e* = not evaluated: the "
            "estimator did not run in that many cells, or the comparison was missing there (no peer of the league "
            "ran, or no retrain); those cells count as not met. *All hard rows*: a cell in two hard regimes "
            "(a memorising MLP on pair flips or a backdoor) counts in both.", ""]
    for league in (UNTRUSTED, TRUSTED):
        if not by_league[league]:
            continue
        out += [f"**{LEAGUE_LABEL[league].capitalize()}**: AP ≥ best peer of the league + {AP_MARGIN}", ""]
        out += _count_table([r for r in targets if r["league"] == league], by_league[league], regimes,
                            "ap_target_met", cells) + [""]
    baselines = [f"cleanse {b}" for b in TRUSTED_BASELINES]
    if any(r.get("trusted_target_met") is not None for r in targets):
        trusted_rows = [r for r in targets if r["league"] == TRUSTED and r["estimator"] not in baselines]
        out += [f"**{LEAGUE_LABEL[TRUSTED].capitalize()}**: AP ≥ the `trusted` baseline + {AP_MARGIN}", ""]
        out += _count_table(trusted_rows, [n for n in by_league[TRUSTED] if n not in baselines], regimes,
                            "trusted_target_met", cells) + [""]
    out += [f"Cleaned accuracy ≥ oracle − {ACC_SLACK * 100:.1f} pt (means over seeds), every estimator "
            "(a cell where it was scored for detection only is n/e):", ""]
    out += _count_table(targets, names, regimes, "accuracy_target_met", cells) + [""]
    if "backdoor" in regimes:
        out += [f"Backdoor ASR ≤ oracle + {ASR_SLACK * 100:.0f} pt after removing the top-k:", ""]
        out += _count_table(targets, names, ["backdoor"], "asr_target_met", cells) + [""]

    out += ["AP ranges of the trusted league over the grid (min–max over the cells where it ran): "
            + "; ".join(f"{_short(n)} {_ap_range(cells, n)}" for n in detector_leagues[TRUSTED]) + ".", ""]
    multi = [c for c in cells if c["corruption"] == "multipair40"]
    if multi:
        single = [c for c in cells if c["corruption"] == "pair40" and c["dataset"] in MULTI_SOURCE_DATASETS]
        ac = "cleanse activation_clustering"
        out += ["**Single- vs multi-source pair flips.** With 40% single-source pair flips every class c+1 receives "
                "its flips from class c alone, so the flipped samples form one tight cluster inside their new label: "
                "exactly what activation clustering (2-means per label) splits off. In the multi-source cells the "
                "same samples go to c+1, c+2 or c+3, so a label holds its own samples and up to three foreign clusters. "
                f"Activation clustering: AP {_ap_range(single, ac)} on single-source pair flips (digits, wine) and "
                f"{_ap_range(multi, ac)} on multi-source ones. Per cell (AP):", ""]
        out += _league_ap_table(multi, UNTRUSTED) + [""] + _league_ap_table(multi, TRUSTED) + [""]
    if recs:
        out += ["### Recommendation", "",
                f"`cleanse run`'s recommended cleaned model (`{os.path.relpath(DEFAULT_RECOMMEND, ROOT)}`, written by "
                "`benchmarks/recommend.py`), next to the fixed estimators of this grid, for the cells it covers. The "
                "recommendation picks by validation accuracy, so it is counted in the trusted league (row "
                f"*{RECOMMENDATION}* above). Its accuracies are from its own runs (oracle and no removal alike); the best "
                "fixed estimator is shown for reference only (chosen with the ground truth).", ""]
        out += _recommendation_table(cells, recs) + [""]

    out += ["### AP by league", "", "Every detector's AP per cell (peers in italics); no cell-wise best.", ""]
    for league in (UNTRUSTED, TRUSTED):
        out += [f"**{LEAGUE_LABEL[league].capitalize()}**", ""] + _league_ap_table(cells, league) + [""]

    out += ["### Per cell", ""]
    for record in cells:
        dm = record["detection_model"]
        fitted = dm["train_accuracy_on_corrupted"]
        seeds = record.get("retrain_seeds", meta["seeds"])
        out += [f"#### {record['dataset']} · {CORRUPTION_LABEL[record['corruption']]} · {MODEL_LABEL[record['model']]}", "",
                f"n_train {record['n_train']}, k = {record['k']} corrupted, n_test {record['n_test']}, "
                f"{record['n_params']} parameters, {record['model_config']['epochs']} epochs. Detection model: "
                f"train accuracy {dm['train_accuracy']:.3f} on the given labels "
                f"({_fmt(fitted)} on the corrupted ones), test accuracy {dm['test_accuracy']:.3f}"
                + (f", ASR {dm['attack_success_rate']:.3f}" if "attack_success_rate" in dm else "")
                + f"; trained in {dm['train_seconds']:.1f} s (seed {dm['seed']}). Detection metrics and scoring times "
                f"are means (± sd) over {len(record.get('detection_models', [dm]))} detection seed(s); retrains use "
                f"training seeds {seeds}. **Bold** = best in the column within the league.", ""]
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
    out += [f"- {r['cell']}: {r['reason']}; not merged" for r in meta.get("merge_rejected") or []]
    missing = {n: [c["key"] for c in cells if n not in c["detectors"]] for n in _detector_order(cells)}
    out += [f"- {n}: not measured in {len(keys)} cell(s): {', '.join(keys)}" for n, keys in missing.items() if keys]
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
        with_references: bool = True, exclude: list[str] | None = None,
        retrain_detectors: bool = True) -> dict[str, Any]:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    cells = GRIDS[grid]()
    dets = detectors()
    if only:
        dets = [d for d in dets if d.name in only or d.family == "cleanse" and "cleanse" in only]
    if exclude:
        dets = [d for d in dets if d.name not in exclude]
    if cell_patterns:
        cells = [c for c in cells if any(fnmatch.fnmatch(c.key, pattern) for pattern in cell_patterns)]
    warm_imports(dets)
    retrainer = Retrainer(jobs, retrain_device)
    records = []
    for cell in cells:
        cell_started = time.perf_counter()
        records.append(score_cell(cell, seeds, dets, retrainer, log, detection_seeds, with_references,
                                  retrain_detectors))
        records[-1]["scoring_wall_seconds"] = time.perf_counter() - cell_started
        retrainer.pump(1)
    log(f"scoring done in {time.perf_counter() - started:.0f} s; waiting for retrains")
    retrainer.drain(log)
    for record in records:
        resolve_cell(record, retrainer.results)
    data = {
        "meta": {
            "command": "python benchmarks/quality.py " + shlex.join(sys.argv[1:]) if sys.argv[1:] else
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
    """One result from runs over cell subsets (e.g. run side by side on a many-core machine), or
    from a complete run and later runs of new detectors or cells on top of it.

    A cell in several runs keeps the first run's record; the detectors a later run scored replace
    the earlier entries (recorded under ``replaced_detectors``), after checking that both runs
    trained the same detection model. Later runs are listed in ``meta.merged_runs``.
    """
    order = {cell.key: i for i, cell in enumerate(full_grid())}
    cells: dict[str, dict[str, Any]] = {}
    overlay = False  # a later run re-scoring cells of an earlier one (not disjoint runs side by side)
    rejected: list[dict[str, str]] = []
    for index, run_data in enumerate(runs):
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
            overlay = True
            if record["detection_models"][0]["seed"] != base["detection_models"][0]["seed"] or record["k"] != base["k"]:
                raise SystemExit(f"cell {record['key']}: runs disagree on the detection seed or the corruption")
            new_model, old_model = record["detection_model"], base["detection_model"]
            if any(abs(new_model[m] - old_model[m]) > 1e-9 for m in ("test_accuracy", "train_accuracy")):
                # Not the same detection model (e.g. convolutions on another CPU): its detectors would
                # not be comparable with the cell's others, so they are left out and listed.
                why = (f"{', '.join(n for n in record['detectors'] if n not in NOT_RUN)} from merged run "
                       f"{index}: its detection model differs (test accuracy "
                       f"{new_model['test_accuracy']:.4f} vs {old_model['test_accuracy']:.4f})")
                rejected.append({"cell": record["key"], "reason": why})
                print(f"merge: {record['key']}: {why}; left out")
                continue
            ran = {n: e for n, e in record["detectors"].items() if n not in NOT_RUN}
            base["detectors"].update(ran)
            base.setdefault("replaced_detectors", []).extend(ran)
    meta = dict(runs[0]["meta"])
    if not overlay and not meta.get("merged_runs"):  # disjoint runs side by side: one wall time
        meta.update(
            command=f"{len(runs)} runs of python benchmarks/quality.py --cells ... side by side, merged with --merge",
            runtime_seconds=max(r["meta"]["runtime_seconds"] for r in runs),
            machine=f"{len(runs)} processes side by side on: "
                    + "; ".join(dict.fromkeys(r["meta"]["machine"] for r in runs)),
        )
    # Every run merged in after the first, with its own command (new detectors or cells added later).
    if overlay or meta.get("merged_runs"):
        meta["merged_runs"] = list(meta.get("merged_runs") or []) + [
            {key: r["meta"].get(key) for key in ("command", "finished", "runtime_seconds", "machine")}
            for r in runs[1:]]
    meta["merge_rejected"] = list(meta.get("merge_rejected") or []) + rejected
    meta.update(n_retrains=sum(r["meta"]["n_retrains"] for r in runs),
                json=str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out))
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
    parser.add_argument("--exclude", default=None, help="comma-separated detector names not to run")
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
    parser.add_argument("--detect-only", action="store_true",
                        help="detection metrics only: no retrain without the detectors' top-k (their cleaned "
                             "accuracy is then not reported)")
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
        args.detection_seeds, args.retrain_device, not args.no_references,
        args.exclude.split(",") if args.exclude else None, not args.detect_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())

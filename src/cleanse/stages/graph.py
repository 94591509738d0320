"""The stage graph, declared once: every stage's name, what it reads and writes, the params keys it
depends on, and whether it runs once per estimator.

Everything that runs the pipeline is derived from :data:`GRAPH`: :func:`cleanse.stages.runner.run_all`
(``cleanse run``), the ``cleanse <stage>`` sub-commands, the Prefect flow's tasks and ``dvc.yaml``
(``cleanse dvc-yaml``; a test checks the checked-in file against it). A new stage is one entry
here and its runner function.

Paths are relative to the output root (``--out``); ``{e}`` stands for the estimator of a
per-estimator stage. A stage's upstream stages are the ones whose outputs hold its inputs
(:func:`upstream`), so the order of execution follows from the paths, not from a second list.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What every stage's code depends on besides its runner module (DVC deps; relative to src/cleanse).
# The families are among them: modelio fits, evaluates and verifies through them, and the
# fingerprints read their noise-estimate inputs. Every module of every family package is listed
# (found here, one file each: a folder would hash __pycache__ too), so a new family or module is a
# dependency once dvc.yaml is regenerated (tests/test_dvc_yaml.py says when it is stale). The graph
# library (cleanse.graphs: loaders, models, simulators) is what the graph and cascade families fit
# and verify with, so its modules are listed the same way.
_PACKAGE = Path(__file__).resolve().parents[1]
FAMILY_CODE = tuple(sorted(path.relative_to(_PACKAGE).as_posix()
                           for pattern in ("families/*/*.py", "graphs/*.py") for path in _PACKAGE.glob(pattern)))
SHARED_CODE = ("config.py", "storage.py", "stages/common.py", "stages/fingerprints.py", "stages/modelio.py",
               "families/__init__.py", "families/base.py", *FAMILY_CODE)
STAGED = ("data/staged/train.parquet", "data/staged/val.parquet", "data/staged/test.parquet", "data/staged/meta.json")
MODEL_CODE = ("data/dataset.py", "models/__init__.py", "models/architectures.py", "models/engine.py", "models/fit.py",
              "models/trainer.py")


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    ``run`` and ``fingerprint`` are ``"module:function"`` names (imported when called, so the CLI
    starts fast): ``run(params, layout[, estimator])`` computes the stage and returns ``product``'s
    path; ``fingerprint(params[, estimator])`` is what ``marker`` (its ``meta.json``) records when
    the outputs are fresh. A stage without a fingerprint always runs.
    """

    name: str
    run: str
    help: str
    per_estimator: bool = False
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    code: tuple[str, ...] = ()  # library modules (relative to src/cleanse) whose code shapes the outputs
    fingerprint: str | None = None
    marker: str | None = None
    product: str | None = None
    in_run: bool = True  # False: DVC and the CLI only (``source``: file digests for DVC)
    own_command: bool = False  # True: the CLI and the flow give it a hand-written command/task (``report``)
    note: str = ""  # why, for readers of dvc.yaml
    dvc: dict[str, Any] = field(default_factory=dict)  # extra dvc.yaml keys (always_changed, metrics, plots)

    def path(self, template: str, root: Path, estimator: str | None = None) -> Path:
        return root / self.expand(template, estimator)

    def expand(self, template: str, estimator: str | None) -> str:
        return template.replace("{e}", estimator) if estimator is not None else template

    def function(self) -> Callable[..., Any]:
        return _resolve(self.run)

    def expected(self, params: Any, estimator: str | None = None) -> str | None:
        """The fingerprint the stage's outputs record when fresh (None: the stage always runs)."""
        if self.fingerprint is None:
            return None
        fn = _resolve(self.fingerprint)
        return fn(params, estimator) if self.per_estimator else fn(params)

    def label(self, estimator: str | None = None) -> str:
        return f"{self.name} {estimator}" if estimator is not None else self.name


def _resolve(name: str) -> Callable[..., Any]:
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


_FP = "cleanse.stages.fingerprints"

GRAPH: tuple[Stage, ...] = (
    Stage(
        "source", "cleanse.stages.data:run_source",
        "Record the data and probe files' content digests -> data/source.json (DVC's data dependency).",
        outputs=("data/source.json", "data/probes_source.json"), in_run=False,
        note="The data file's (and a probe file's) content digest: dvc.yaml cannot list data.source as a\n"
             "dependency (sklearn:digits is no file), so this cheap stage runs on every repro and writes\n"
             "data/source.json (data/probes_source.json); a file replaced at the same path changes the\n"
             "record and reruns `stage` (or `query`/`score`) and everything after it, an unchanged one\n"
             "leaves the records as they were and the rest is skipped. `dvc status` lists it as \"always\n"
             "changed\". s3:// sources are recorded by ETag (and version id).",
        dvc={"always_changed": True}),
    Stage(
        "stage", "cleanse.stages.data:run_stage", "Load, validate, split and corrupt the data -> data/staged/.",
        inputs=("data/source.json",), outputs=STAGED, params=("seed", "data", "corruption"),
        code=("data/__init__.py", "data/corruption.py", "data/dataset.py", "data/sources.py", "data/splits.py",
              "data/stage.py"),
        fingerprint=f"{_FP}:stage_fingerprint", marker="data/staged/meta.json", product="data/staged"),
    Stage(
        "train", "cleanse.stages.fit:run_train", "Train the base model -> models/base/.",
        inputs=STAGED, outputs=("models/base",), params=("seed", "model", "query.kind"),
        code=("evaluate.py", *MODEL_CODE),
        fingerprint=f"{_FP}:train_fingerprint", marker="models/base/meta.json", product="models/base",
        note="models/base holds model.safetensors, checkpoints/ and meta.json (the fingerprint).\n"
             "query.kind: model.checkpoint_spacing auto is geometric with probes."),
    Stage(
        "query", "cleanse.stages.fit:run_query", "Record the probes (query.kind) -> query/.",
        inputs=("data/probes_source.json", *STAGED, "models/base"), outputs=("query",), params=("seed", "query"),
        code=("data/corruption.py", *MODEL_CODE, "query.py"),
        fingerprint=f"{_FP}:query_fingerprint", marker="query/query.json", product="query",
        note="The probes the score and retrain stages use (the same deterministic choice), recorded for\n"
             "the report and for review: probes.parquet and heldout.parquet (with probes) and query.json,\n"
             "which says `kind: none` when there are none."),
    Stage(
        "score", "cleanse.stages.score:run_score", "Score every training sample with one estimator -> scores/<estimator>.parquet.",
        per_estimator=True,
        inputs=("data/probes_source.json", "data/staged/train.parquet", "data/staged/val.parquet",
                "data/staged/meta.json", "models/base"),
        outputs=("scores/{e}.parquet", "scores/{e}.meta.json", "scores/{e}.pairwise.npy", "scores/{e}"),
        params=("seed", "model", "scorers.{e}", "query"),
        code=(*MODEL_CODE, "grads.py", "estimators/__init__.py", "estimators/registry.py", "estimators/base.py",
              "estimators/loss.py", "estimators/confident_learning.py", "estimators/influence.py",
              "estimators/influence_plan.py",
              "estimators/tracin.py", "estimators/trak.py", "estimators/influence_fvm.py", "ekfac.py", "projection.py",
              "ensembles.py", "estimators/memorization.py", "estimators/activations.py", "estimators/trusted.py",
              "estimators/holdout_ensemble.py", "estimators/fine.py", "finfluence.py", "attribution.py", "query.py",
              "stages/fit.py"),
        fingerprint=f"{_FP}:score_fingerprint", marker="scores/{e}.meta.json", product="scores/{e}.parquet",
        note="data/probes_source.json: a query.path file's content (kind: file). params: seed (fold splits,\n"
             "LiSSA sampling), model (cleanlab retrains folds; weight_decay enters the influence/TracIn\n"
             "objective), query (train -> probe scores when query.kind is not none). The estimator modules\n"
             "cannot be picked per estimator from a templated list (module names differ from estimator\n"
             "names), so every score@E depends on all of them. scores/<e>.pairwise.npy is the (n_query,\n"
             "n_train) train -> probe matrix; zero rows without probes. scores/<e>/: what the estimator writes\n"
             "beside its scores (artifacts.json lists it; e.g. dmin's per-query top-k, memorization's infl_test)."),
    Stage(
        "detect", "cleanse.stages.score:run_detect", "Turn one estimator's scores into flags -> flags/<estimator>.parquet.",
        per_estimator=True, inputs=("scores/{e}.parquet", "scores/{e}.meta.json"),
        outputs=("flags/{e}.parquet", "flags/{e}.meta.json"), params=("detect",), code=("detect.py",),
        fingerprint=f"{_FP}:detect_fingerprint", marker="flags/{e}.meta.json", product="flags/{e}.parquet"),
    Stage(
        "retrain", "cleanse.stages.retrain:run_retrain",
        "Retrain without one estimator's flags (and without a random set of the same size).",
        per_estimator=True,
        inputs=("data/probes_source.json", *STAGED, "flags/{e}.parquet", "flags/{e}.meta.json", "models/base",
                "scores/{e}.parquet"),
        outputs=("retrain/{e}.json",), params=("seed", "model", "query", "cleansing", "scorers.{e}", "evaluate.retrain_seeds"),
        code=("data/dataset.py", "data/corruption.py", "evaluate.py", *MODEL_CODE[1:], "cleansing.py", "query.py",
              "stages/retrain_seeds.py"),
        fingerprint=f"{_FP}:retrain_fingerprint", marker="retrain/{e}.json", product="retrain/{e}.json",
        note="data/corruption.py: backdoor triggers at evaluation; cleansing.py: iterative cleansing\n"
             "re-scores the probes each round."),
    Stage(
        "references", "cleanse.stages.retrain:run_references",
        "Baseline, oracle and random-removal retrains -> retrain/references.json.",
        inputs=(*STAGED, "models/base"), outputs=("retrain/references.json",),
        params=("seed", "model", "evaluate.retrain_seeds"),
        code=("data/dataset.py", "data/corruption.py", "evaluate.py", *MODEL_CODE[1:], "stages/retrain_seeds.py"),
        fingerprint=f"{_FP}:references_fingerprint", marker="retrain/references.json",
        product="retrain/references.json"),
    Stage(
        "recommend", "cleanse.stages.recommend:run_recommend",
        "Choose one cleaned model without ground truth -> recommend/recommend.json, models/recommended/.",
        inputs=(*STAGED, "models/base", "query", "scores", "flags", "retrain"),
        outputs=("recommend/recommend.json", "models/recommended"),
        params=("seed", "model", "estimators", "detect", "query", "cleansing", "recommend", "scorers.trusted",
                "evaluate.retrain_seeds"),
        code=("recommend.py", "estimators/trusted.py", "evaluate.py", "models/trainer.py", "stages/retrain_seeds.py"),
        fingerprint=f"{_FP}:recommend_fingerprint", marker="recommend/recommend.json",
        product="recommend/recommend.json",
        note="One cleaned model chosen without ground truth: every estimator's cleaned model and \"no\n"
             "removal\" compete on held-out probe behaviour and validation accuracy; the best rankings are\n"
             "retrained at the noise count the validation split estimates (scorers.trusted's logistic regression;\n"
             "without an estimate, the winner at recommend.budget_factors times its budget)."),
    Stage(
        "report", "cleanse.report:run_report",
        "Write reports/metrics.json, plots and report.html; print the comparison table.",
        inputs=(*STAGED, "models/base", "scores", "flags", "retrain", "query", "recommend/recommend.json"),
        outputs=("reports/report.html", "reports/comparison.md", "reports/flagged"),
        params=("estimators", "scorers", "evaluate", "tracking"),
        code=("data/dataset.py", "evaluate.py", "report.py", "report_plots.py", "attribution_report.py",
              "tracking/__init__.py",
              "tracking/models.py", "tracking/runs.py", "tracking/stages.py", "tracking/store.py"),
        own_command=True,
        note="Logs to MLflow when tracking.enabled (mlflow.db and mlartifacts/ in the repo root, or\n"
             "MLFLOW_TRACKING_URI); those are side effects, not outputs. models/base: top-flagged image\n"
             "grids use the base model's predictions; scores, flags, retrain: every estimator's results (the\n"
             "estimator list is templated, so these are the directories score@/detect@/retrain@ write);\n"
             "query: probe image grids. scorers: only read when evaluate.lds / evaluate.stability rerun the\n"
             "estimators. reports/flagged: <estimator>.csv top flagged, <estimator>.png image grids.",
        dvc={"metrics": [{"reports/metrics.json": {"cache": False}}],
             "plots": [{"reports/pr": {"x": "recall", "y": "precision", "title": "Finding the corrupted samples",
                                       "x_label": "recall", "y_label": "precision"}},
                       "reports/pr_curves.png", "reports/score_histograms.png"]}),
)

BY_NAME = {stage.name: stage for stage in GRAPH}


def _covers(output: str, path: str) -> bool:
    """True when ``output`` is ``path`` or a folder holding it, or ``path`` is a folder holding ``output``."""
    return output == path or path.startswith(output + "/") or output.startswith(path + "/")


def upstream(stage: Stage) -> list[Stage]:
    """The stages whose outputs hold one of ``stage``'s inputs (in graph order)."""
    return [other for other in GRAPH if other is not stage
            and any(_covers(output, path) for output in other.outputs for path in stage.inputs)]


def run_stages() -> list[Stage]:
    """The stages ``cleanse run`` and the Prefect flow execute, in graph order."""
    return [stage for stage in GRAPH if stage.in_run]


def steps(estimators: list[str]) -> list[tuple[Stage, str | None]]:
    """The run's steps in execution order: each stage once, a run of consecutive per-estimator
    stages expanded estimator by estimator (``score a, detect a, retrain a, score b, ...``)."""
    out: list[tuple[Stage, str | None]] = []
    block: list[Stage] = []
    for stage in [*run_stages(), None]:
        if stage is not None and stage.per_estimator:
            block.append(stage)
            continue
        out += [(member, name) for name in estimators for member in block]
        block = []
        if stage is not None:
            out.append((stage, None))
    return out

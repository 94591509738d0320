"""MLflow logging: the only module that imports mlflow.

One parent run per pipeline run and one nested child run per estimator and per reference
(baseline, oracle, random), so that ``test_accuracy`` (and ``attack_success_rate``,
``n_removed``, ...) of estimators and references share charts. The parent is opened when the
pipeline starts (:func:`open_pipeline_run`), each stage logs as it finishes (:func:`log_stage`),
and the report stage closes it (:func:`close_pipeline_run`) with the comparison table as its
description (``mlflow.note.content``). Tags: ``git_commit`` and ``config_fingerprint``.

What goes where:

- parent: run-level params (seed, data, corruption, model, detect, estimators, and query /
  cleansing / evaluate when used) plus ``<estimator>.<option>`` of the estimators that run; the
  staged splits as dataset inputs; ``train_loss`` per epoch and ``val_loss`` / ``val_accuracy``
  per checkpoint (step = epoch); the base model (an MLflow pyfunc model: safetensors weights, a
  JSON spec and a code file, nothing pickled); the reference metrics (``oracle.test_accuracy``);
  ``reports/``.
- estimator child: ``estimator``, ``budget`` and ``<estimator>.<option>`` params; detection
  (``roc_auc``, ``average_precision``, ...) and retrain (``test_accuracy``, ...) metrics; scores,
  flags and plots; the cleaned model.
- reference child (tag ``kind: reference``): the same metric names as an estimator's.

Several processes (DVC stages) and threads (Prefect tasks) share one parent: its id is recorded in
``<out>/mlflow_run.json`` keyed by the run's configuration fingerprint, and every call goes through
an :class:`MlflowClient` with explicit run ids (never the fluent active-run stack).

Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a server, for the UI); otherwise the embedded
default, a sqlite file ``<out>/mlflow.db``, created atomically (migrated in a temporary file, then
linked into place). With any local store, artifacts go to ``<out>/mlartifacts`` (on S3 for an
``s3://`` output root); with a server, to the server's artifact destination.

Every URI that is printed, tagged or put in an error message has its credentials stripped
(:mod:`cleanse.uris`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

from cleanse.config import Params, fingerprint, flatten
from cleanse.errors import CleanseError
from cleanse.lock import pid_alive
from cleanse.storage import Layout, read_json, write_json, write_tensors
from cleanse.uris import redact, without_credentials

RUN_RECORD = "mlflow_run.json"
DESCRIPTION_TAG = "mlflow.note.content"
# MLflow 3's UI opens an experiment of unknown kind in its GenAI layout (traces, judges); this kind
# opens the model-training layout (runs table, charts) that these runs are made for.
EXPERIMENT_KIND = "mlflow.experimentKind"
REFERENCES = ("baseline", "oracle", "random")
# One process-wide lock: the run record (read-modify-write) and run creation must not interleave
# between Prefect's task threads. Logging is cheap next to the stages, so it is held throughout.
_LOCK = threading.RLock()


class TrackingError(CleanseError):
    """MLflow refused or could not be reached; the message names the (redacted) tracking URI."""


# ----------------------------------------------------------------------------- URIs and store


def tracking_uri(layout: Layout) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layout.root / 'mlflow.db'}"


def display_uri(layout: Layout) -> str:
    """The tracking URI with any password stripped: the only form that is printed or logged."""
    return redact(tracking_uri(layout))


def artifact_location(layout: Layout) -> str:
    """Artifacts of a local store: ``<out>/mlartifacts``, which for an S3 output root is an s3://
    URI (MLflow's S3 store uses boto3's credential chain and ``MLFLOW_S3_ENDPOINT_URL``, which
    defaults here to ``AWS_ENDPOINT_URL``)."""
    if layout.remote is None:
        return (layout.root / "mlartifacts").as_uri()
    from cleanse.remote import endpoint

    if endpoint():
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint())
    return f"{layout.remote.rstrip('/')}/mlartifacts"


def git_commit(cwd: Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for a server or other database)."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


@functools.lru_cache(maxsize=1)
def _schema_head() -> str:
    """MLflow's latest schema revision (reading alembic's script directory takes a while)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


# (path, inode) of stores found complete in this process: checked once, not before every call
_complete: set[tuple[str, int]] = set()


def _store_problem(path: Path) -> str | None:
    """Why the sqlite file at ``path`` is not a complete MLflow store, or None when it is one.

    A migration killed half-way (or stopped by a full disk) leaves ``_alembic_tmp_*`` tables or an
    ``alembic_version`` behind MLflow's head, and every later run then fails inside alembic."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
            version = (connection.execute("select version_num from alembic_version").fetchone()
                       if "alembic_version" in tables else None)
    except sqlite3.DatabaseError as exc:
        return f"not a readable sqlite database ({exc})"
    leftovers = sorted(name for name in tables if name.startswith("_alembic_tmp"))
    if leftovers:
        return f"interrupted schema migration ({', '.join(leftovers)})"
    if version is None:
        return "no schema version (its creation was interrupted)"
    if version[0] != _schema_head():
        return f"schema version {version[0]}, not MLflow's {_schema_head()}"
    return None


def _holds_runs(path: Path) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
            return any(connection.execute(f"select count(*) from {table}").fetchone()[0] > 0  # noqa: S608 (fixed names)
                       for table in ("runs", "registered_models") if table in tables)
    except sqlite3.DatabaseError:
        return True  # unreadable: it may hold runs, so it is never deleted


def _temporaries(path: Path) -> list[Path]:
    """Temporary stores (and their journals) being created next to ``path``: ``.<name>.<pid>.<hex>.tmp*``."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp*"))


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporary stores whose creating process is gone (killed while migrating)."""
    for tmp in _temporaries(path):
        parts = tmp.name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        if pid is None or (pid != os.getpid() and not pid_alive(pid)):
            tmp.unlink(missing_ok=True)


def _create_store(path: Path, artifact_root: str) -> None:
    """Create and fully migrate a store in a temporary sibling, then link it into place.

    ``os.link`` never replaces: when another process made the store first, its store (and any run
    already in it) is kept and this one is dropped. Killed or out of space at any moment, this
    leaves no ``path`` at all, only a temporary file that the next call removes."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", artifact_root)
        store.engine.dispose()
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        for leftover in path.parent.glob(f"{tmp.name}*"):
            leftover.unlink(missing_ok=True)


def ensure_store(layout: Layout) -> None:
    """Make sure the embedded sqlite store is complete before MLflow opens it (no-op for a server).

    A half-made store (creation killed or out of space with an older cleanse, or by hand) that
    holds no runs is rebuilt; one that holds runs is refused with a one-line error."""
    path = _sqlite_file(tracking_uri(layout))
    if path is None:
        return
    with _LOCK:
        if path.exists() and (str(path), path.stat().st_ino) in _complete:
            return
        _remove_stale_temporaries(path)
        if path.exists():
            problem = _store_problem(path)
            if problem is None:
                _complete.add((str(path), path.stat().st_ino))
                return
            if _holds_runs(path):
                raise TrackingError(f"MLflow store {path}: {problem}, and it holds runs; back it up, then run "
                                    f"`mlflow db upgrade sqlite:///{path}` or move it away")
            path.unlink()
        _create_store(path, artifact_location(layout))


# ----------------------------------------------------------------------------- errors and env


def _guarded(function: Any) -> Any:
    """Restore ``MLFLOW_TRACKING_URI`` afterwards and turn MLflow's failures into one-line
    :class:`TrackingError`s with credentials stripped (MLflow's own messages and tracebacks embed
    the tracking URI, password included)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            return function(*args, **kwargs)
        except CleanseError:
            raise
        except Exception as exc:
            from mlflow.exceptions import MlflowException

            text = str(exc)
            if not (isinstance(exc, (MlflowException, OSError, sqlite3.Error)) or redact(text) != text
                    or type(exc).__module__.split(".")[0] in ("requests", "urllib3", "sqlalchemy", "alembic")):
                raise
            line = redact(text).strip().splitlines()[0] if text.strip() else type(exc).__name__
            uri = redact(previous) if previous else "the embedded store"
            # from None: the chained traceback would print the unredacted message again
            raise TrackingError(f"MLflow ({uri}): {type(exc).__name__}: {line[:500]}") from None
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous

    return wrapper


def _client(layout: Layout) -> Any:
    from mlflow.tracking import MlflowClient

    ensure_store(layout)
    return MlflowClient(tracking_uri=tracking_uri(layout))


def _experiment(client: Any, params: Params, layout: Layout) -> str:
    """The experiment's id (created if new)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is not None:
        if EXPERIMENT_KIND not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        return experiment.experiment_id
    # A tracking server decides where artifacts go; a local store keeps them beside the outputs
    # (MLflow's own default would be ./mlruns in whatever directory the run started from).
    uri = tracking_uri(layout)
    location = None if uri.startswith(("http://", "https://")) else artifact_location(layout)
    try:
        return client.create_experiment(params.tracking.experiment, artifact_location=location,
                                        tags={EXPERIMENT_KIND: "custom_model_development"})
    except MlflowException as exc:  # another process created it in between
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(params.tracking.experiment).experiment_id


# ----------------------------------------------------------------------------- params and values


def _numeric(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_numeric(f"{prefix}{key}.", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out[f"{prefix}{key}"] = float(value)
    return out


def estimator_params(params: Params, name: str) -> dict[str, str]:
    """``<name>.<option>`` for one estimator's options (prefixed, so that parallel-coordinates
    plots and param columns name the estimator)."""
    prefix = f"scorers.{name}."
    return {f"{name}.{key.removeprefix(prefix)}": value for key, value in flatten(params).items()
            if key.startswith(prefix)}


def run_params(params: Params) -> dict[str, str]:
    """The parent run's params: the run-level sections, the optional ones only when in use, and
    the options of the estimators that run (not those of every registered estimator)."""
    sections = ["seed", "data.", "corruption.", "model.", "estimators", "detect."]
    if params.query.kind != "none":
        sections.append("query.")
    if params.cleansing.iterative:
        sections.append("cleansing.")
    if params.evaluate.lds or params.evaluate.stability:
        sections.append("evaluate.")
    out = {key: value for key, value in flatten(params).items()
           if any(key == section or key.startswith(section) for section in sections)}
    for name in params.estimators:
        out.update(estimator_params(params, name))
    return out


def _child_params(params: Params, name: str) -> dict[str, str]:
    """The columns every child shares (``estimator``, ``budget``), then the estimator's options."""
    common = {"estimator": name, "budget": params.detect.budget if name not in REFERENCES else "reference"}
    return common | (estimator_params(params, name) if name not in REFERENCES else {})


def _log(client: Any, run_id: str, *, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
         tags: dict[str, Any] | None = None, step: int = 0) -> None:
    """One ``log_batch`` per 100 params / 1000 metrics (MLflow's batch limits)."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    metric_list = [Metric(key, float(value), now, step) for key, value in (metrics or {}).items()]
    param_list = [Param(key, str(value)[:6000]) for key, value in (params or {}).items()]
    tag_list = [RunTag(key, str(value)) for key, value in (tags or {}).items()]
    for start in range(0, len(param_list), 100):
        client.log_batch(run_id, params=param_list[start:start + 100])
    for start in range(0, len(tag_list), 100):
        client.log_batch(run_id, tags=tag_list[start:start + 100])
    for start in range(0, len(metric_list), 1000):
        client.log_batch(run_id, metrics=metric_list[start:start + 1000])


# ----------------------------------------------------------------------------- the run record


def _read_record(layout: Layout) -> dict[str, Any]:
    path = layout.root / RUN_RECORD
    try:
        return read_json(path) if path.is_file() else {}
    except (ValueError, CleanseError):  # unreadable: start a new record rather than fail the stage
        return {}


def _write_record(layout: Layout, record: dict[str, Any]) -> None:
    layout.ensure_root()
    write_json(record, layout.root / RUN_RECORD)


def _run_status(client: Any, run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.status
    except MlflowException:
        return None


def _run_name(params: Params) -> str:
    source = params.data.source.rstrip("/")
    return "cleanse-" + source.split(":")[-1].split("/")[-1].split(".")[0]


def _open(params: Params, layout: Layout, tags: dict[str, Any] | None = None, *, create: bool = True,
          reopen_closed: bool = False) -> tuple[Any, dict[str, Any] | None]:
    """The client and the record entry of this configuration's parent run: the recorded one while
    it is RUNNING (or, with ``reopen_closed``, whatever its status), else a new one (None when
    ``create`` is false)."""
    from cleanse.pipeline import run_fingerprint

    client = _client(layout)
    key = run_fingerprint(params)
    address = without_credentials(tracking_uri(layout))
    record = _read_record(layout)
    entry = record.get(key)
    if entry is not None and entry.get("tracking_uri") == address:
        status = _run_status(client, entry["run_id"])
        if status == "RUNNING" or (status is not None and reopen_closed):
            if tags:
                _log(client, entry["run_id"], tags=tags)
            return client, entry
    if not create:
        return client, None
    experiment_id = _experiment(client, params, layout)
    run_tags = {"git_commit": git_commit(), "config_fingerprint": key, "dataset": params.data.source,
                "corruption": params.corruption.kind, "kind": "pipeline",
                DESCRIPTION_TAG: f"cleanse pipeline on `{params.data.source}` with {', '.join(params.estimators)}: "
                                 "running; the comparison table replaces this note when the report stage finishes."}
    run = client.create_run(experiment_id, run_name=_run_name(params), tags={**run_tags, **(tags or {})})
    _log(client, run.info.run_id, params=run_params(params))
    entry = {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": address, "children": {},
             "logged": [], "metrics_digest": None}
    record[key] = entry
    _write_record(layout, record)
    return client, entry


def _save_entry(params: Params, layout: Layout, entry: dict[str, Any]) -> None:
    from cleanse.pipeline import run_fingerprint

    record = _read_record(layout)
    record[run_fingerprint(params)] = entry
    _write_record(layout, record)


def _child(client: Any, params: Params, entry: dict[str, Any], name: str) -> str:
    """The child run of an estimator or reference (created under the parent on first use)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run_id = entry["children"].get(name)
    if run_id is not None and _run_status(client, run_id) is not None:
        return run_id
    kind = "reference" if name in REFERENCES else "estimator"
    parent = client.get_run(entry["run_id"])
    tags = {MLFLOW_PARENT_RUN_ID: entry["run_id"], "kind": kind, kind: name,
            "config_fingerprint": parent.data.tags.get("config_fingerprint", ""),
            "git_commit": parent.data.tags.get("git_commit", "")}
    run = client.create_run(entry["experiment_id"], run_name=name, tags=tags)
    _log(client, run.info.run_id, params=_child_params(params, name))
    entry["children"][name] = run.info.run_id
    return run.info.run_id


# ----------------------------------------------------------------------------- models and data


_MODEL_CODE = '''"""A cleanse model as an MLflow pyfunc model, loaded from code: safetensors weights and a JSON
spec (no pickle). predict(features (n, *feature_shape) or (n, n_features)) -> probabilities
(n, n_classes), float32. The cleanse package travels with the model (code_paths)."""

import json

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class CleanseModel(PythonModel):
    def load_context(self, context):
        from safetensors.torch import load_file

        from cleanse.models.architectures import ModelSpec, build_model

        with open(context.artifacts["spec"]) as handle:
            self.spec = ModelSpec.from_json(json.load(handle))
        self.module = build_model(self.spec)
        self.module.load_state_dict(load_file(context.artifacts["weights"]))
        self.module.eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        features = np.asarray(model_input, dtype=np.float32).reshape(-1, *self.spec.feature_shape)
        with torch.no_grad():
            return torch.softmax(self.module(torch.from_numpy(features)), dim=1).numpy()


mlflow.models.set_model(CleanseModel())
'''


def _log_model(client: Any, params: Params, run_id: str, spec: dict[str, Any], weights: Path, *, artifact_path: str,
               alias: str, description: str) -> str | None:
    """Log weights + spec as a pyfunc model under ``artifact_path`` of ``run_id``; register it
    as a new version of ``tracking.register_as`` with ``alias`` (when set). Returns the version."""
    import mlflow.pyfunc
    import numpy as np
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import cleanse

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the stage logs
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *spec["feature_shape"]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec["n_classes"]))]))
    with tempfile.TemporaryDirectory(prefix="cleanse-model-") as folder:
        code = Path(folder) / "cleanse_model.py"
        code.write_text(_MODEL_CODE)
        spec_file = Path(folder) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        target = Path(folder) / "model"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pyfunc.save_model(str(target), python_model=str(code),
                                     artifacts={"weights": str(weights), "spec": str(spec_file)},
                                     code_paths=[str(Path(cleanse.__file__).parent)], signature=signature,
                                     pip_requirements=["torch", "safetensors", "numpy", "pydantic", "polars"])
        for cache in target.rglob("__pycache__"):
            for item in cache.iterdir():
                item.unlink()
            cache.rmdir()
        client.log_artifacts(run_id, str(target), artifact_path)
    name = params.tracking.register_as
    if not name:
        return None
    try:
        client.create_registered_model(name, description="cleanse models: the base model (alias `base`) and each "
                                                         "estimator's cleaned model (alias `cleaned-<estimator>`)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                          description=description, tags={"alias": alias})
    client.set_registered_model_alias(name, alias, version.version)
    return version.version


def _log_datasets(client: Any, run_id: str, layout: Layout, staged: Any) -> None:
    """The staged splits as dataset inputs (name, content digest, source address)."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    from cleanse.pipeline import content_digest

    inputs = []
    for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
        path = layout.split(split)
        data = getattr(staged, split)
        digest = content_digest(str(path)).removeprefix("sha256:")[:16]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways": a file either way
            dataset = mlflow.data.from_numpy(data.features, targets=data.label, source=layout.location(path),
                                             name=f"{staged.meta.name}-{split}", digest=digest)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    client.log_inputs(run_id, datasets=inputs)


def _training_curves(client: Any, run_id: str, layout: Layout, params: Params) -> None:
    """``train_loss`` per epoch (the trainer's history) and ``val_loss`` / ``val_accuracy`` at each
    saved checkpoint, all with step = epoch."""
    import numpy as np

    from cleanse.models.architectures import ModelSpec
    from cleanse.models.trainer import TrainedModel, predict_proba
    from cleanse.pipeline import STAGE_META_NAME, load_staged
    from cleanse.storage import read_tensors

    meta = read_json(layout.base_model / STAGE_META_NAME)
    for record in meta.get("history", []):
        _log(client, run_id, metrics={"train_loss": record["train_loss"]}, step=int(record["epoch"]))
    val = load_staged(layout, params).val
    if len(val) == 0:
        return
    spec = ModelSpec.from_json(meta["spec"])
    for checkpoint in meta.get("checkpoints", []):
        model = TrainedModel(spec, read_tensors(layout.base_model / checkpoint["file"]))
        probabilities = predict_proba(model, val.features)
        picked = probabilities[np.arange(len(val)), val.label]
        _log(client, run_id, step=int(checkpoint["epoch"]),
             metrics={"val_loss": float(-np.log(np.clip(picked, 1e-12, None)).mean()),
                      "val_accuracy": float((probabilities.argmax(1) == val.label).mean())})


# ----------------------------------------------------------------------------- stages


def _log_one(client: Any, entry: dict[str, Any], params: Params, layout: Layout, stage: str, estimator: str | None,
             model: Any = None) -> None:
    import numpy as np

    from cleanse.pipeline import STAGE_META_NAME, load_staged

    parent = entry["run_id"]
    if stage == "stage":
        staged = load_staged(layout, params)
        _log(client, parent, metrics={"n_train": len(staged.train), "n_val": len(staged.val),
                                      "n_test": len(staged.test), "n_corrupted": int(staged.train.is_corrupted.sum())})
        _log_datasets(client, parent, layout, staged)
    elif stage == "train":
        meta = read_json(layout.base_model / STAGE_META_NAME)
        _log(client, parent, metrics={"base.test_accuracy": meta["test_accuracy"], "train_seconds": meta["seconds"],
                                      **({"base.attack_success_rate": meta["attack_success_rate"]}
                                         if "attack_success_rate" in meta else {})})
        _training_curves(client, parent, layout, params)
        _log_model(client, params, parent, meta["spec"], layout.base_model / "model.safetensors",
                   artifact_path="model", alias="base", description=f"base model, run {parent}")
    elif stage == "score":
        child = _child(client, params, entry, estimator)
        meta = read_json(layout.scores_meta(estimator))
        _log(client, child, metrics={"seconds": meta["seconds"]})
        for path in (layout.scores(estimator), layout.scores_meta(estimator)):
            client.log_artifact(child, str(path), "scores")
    elif stage == "detect":
        from cleanse.evaluate import detection_metrics
        from cleanse.storage import read_table

        child = _child(client, params, entry, estimator)
        staged = load_staged(layout, params)
        truth = dict(zip(staged.train.sample_id.tolist(), staged.train.is_corrupted.tolist()))
        flags = read_table(layout.flags(estimator))
        is_corrupted = np.array([truth[i] for i in flags["sample_id"].to_list()], dtype=bool)
        detection = detection_metrics(flags["score"].to_numpy(), is_corrupted)
        _log(client, child, metrics=_numeric("", detection) | {"n_flagged": int(flags["is_flagged"].sum())})
        client.log_artifact(child, str(layout.flags(estimator)), "flags")
    elif stage == "retrain":
        child = _child(client, params, entry, estimator)
        result = read_json(layout.retrain_result(estimator))
        cleaned = result["cleaned"]
        _log(client, child, metrics=_numeric("", {k: v for k, v in cleaned.items() if not isinstance(v, (list, dict))})
             | {"random_test_accuracy": result["random_same_count"]["test_accuracy"], "n_flagged": result["n_flagged"],
                "retrain_seconds": result["seconds"]})
        for round_ in result.get("rounds", []):
            _log(client, child, step=int(round_["round"]),
                 metrics=_numeric("cleansing.", {k: v for k, v in round_.items()
                                                 if k != "round" and not isinstance(v, list)}))
        if model is not None:
            weights = Path(tempfile.mkdtemp(prefix="cleanse-cleaned-")) / "model.safetensors"
            try:
                write_tensors(model.state, weights)
                _log_model(client, params, child, model.spec.to_json(), weights, artifact_path="model",
                           alias=f"cleaned-{estimator}",
                           description=f"retrained without the {cleaned['n_removed']} samples {estimator} flagged")
            finally:
                shutil.rmtree(weights.parent, ignore_errors=True)
    elif stage == "references":
        references = read_json(layout.retrain_result("references"))
        for name in REFERENCES:
            if name not in references:
                continue
            values = references[name]
            if name == "baseline":
                values = {**values, "n_removed": 0, "n_corrupted_removed": 0}
            child = _child(client, params, entry, name)
            _log(client, child, metrics=_numeric("", values))
            _log(client, parent, metrics=_numeric(f"{name}.", values))
    elif stage == "recommend":
        from cleanse.pipeline import recommend_dir, recommended_model_dir

        chosen = read_json(recommend_dir(layout) / "recommend.json")
        values = {k: v for k, v in chosen["cleaned"].items() if not isinstance(v, (list, dict))}
        _log(client, parent, metrics=_numeric("recommended.", values),
             tags={"recommended.estimator": chosen["estimator"],
                   "recommended.budget_factor": str(chosen["budget_factor"])})
        client.log_artifact(parent, str(recommend_dir(layout) / "recommend.json"), "recommend")
        model_meta = read_json(recommended_model_dir(layout) / "meta.json")
        _log_model(client, params, parent, model_meta["spec"], recommended_model_dir(layout) / "model.safetensors",
                   artifact_path="recommended_model", alias="recommended",
                   description=f"recommended: {chosen['estimator']} ({chosen['n_removed']} samples removed), "
                               f"run {parent}")
    else:
        raise ValueError(f"unknown stage {stage!r}")


def _stage_keys(params: Params) -> list[tuple[str, str | None]]:
    keys: list[tuple[str, str | None]] = [("stage", None), ("train", None), ("references", None)]
    for name in params.estimators:
        keys += [("score", name), ("detect", name), ("retrain", name)]
    return keys + [("recommend", None)]


def _key(stage: str, estimator: str | None) -> str:
    return stage if estimator is None else f"{stage}:{estimator}"


@_guarded
def open_pipeline_run(params: Params, layout: Layout, tags: dict[str, Any] | None = None) -> str | None:
    """Open (or reuse, while it is RUNNING) this configuration's parent run; returns its id, or
    None when ``tracking.enabled`` is false. ``tags`` are added either way (e.g. the Prefect flow
    run's id and URL)."""
    if not params.tracking.enabled:
        return None
    with _LOCK:
        _, entry = _open(params, layout, {key: redact(str(value)) for key, value in (tags or {}).items()})
        return entry["run_id"]


@_guarded
def log_stage(params: Params, layout: Layout, stage: str, estimator: str | None = None, *, model: Any = None) -> None:
    """Log what ``stage`` (``stage``, ``train``, ``score``, ``detect``, ``retrain``,
    ``references``) just wrote, into the parent (opened if needed) or the estimator's child.
    ``model``: the cleaned :class:`TrainedModel` of a ``retrain`` stage, logged as an MLflow model.
    No-op unless ``tracking.enabled``."""
    if not params.tracking.enabled:
        return
    with _LOCK:
        client, entry = _open(params, layout)
        _log_one(client, entry, params, layout, stage, estimator, model)
        if _key(stage, estimator) not in entry["logged"]:
            entry["logged"].append(_key(stage, estimator))
        _save_entry(params, layout, entry)


def _finish(client: Any, entry: dict[str, Any], params: Params, layout: Layout, metrics: dict[str, Any]) -> None:
    """Log what the running stages did not (stages skipped as fresh, a run logged afterwards),
    the report, the description, and close the parent as FINISHED."""
    from cleanse.report import markdown_table

    for stage, estimator in _stage_keys(params):
        if _key(stage, estimator) not in entry["logged"]:
            _log_one(client, entry, params, layout, stage, estimator)
            entry["logged"].append(_key(stage, estimator))
    parent = entry["run_id"]
    reference = {key: metrics[key] for key in REFERENCES if key in metrics}
    _log(client, parent, metrics=_numeric("", reference) | {"n_train": metrics["dataset"]["n_train"],
                                                            "n_corrupted": metrics["dataset"]["n_corrupted"]})
    if layout.reports.is_dir():
        client.log_artifacts(parent, str(layout.reports), "reports")
    for name in metrics["estimators"]:
        child = _child(client, params, entry, name)
        for folder in ("flagged", "probes"):
            for plot in sorted((layout.reports / folder).glob(f"{name}.*")):
                client.log_artifact(child, str(plot), folder)
    dataset = metrics["dataset"]
    description = (f"### cleanse: {dataset['name']}, {dataset['n_train']} training samples, "
                   f"{dataset['n_corrupted']} corrupted ({dataset['corruption']})\n\n{markdown_table(metrics)}\n\n"
                   "Detection metrics use k = number corrupted; `test_acc` is after removing each method's flags "
                   "and retraining with the same seed and recipe. Each estimator and reference is a child run with "
                   "the same metric names (`test_accuracy`, ...). Full report: `reports/report.html`.")
    _log(client, parent, tags={DESCRIPTION_TAG: description})
    for child in entry["children"].values():
        if _run_status(client, child) == "RUNNING":
            client.set_terminated(child, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    entry["metrics_digest"] = fingerprint(metrics)


@_guarded
def close_pipeline_run(params: Params, layout: Layout, metrics: dict[str, Any] | None = None, *,
                       status: str = "FINISHED") -> str | None:
    """Close this configuration's parent run: ``FINISHED`` (after logging ``metrics``, the report
    and the description) or ``FAILED`` (the pipeline failed; only a run that is open is touched).
    Returns the run id (None when tracking is disabled or, for FAILED, no run was open)."""
    if not params.tracking.enabled:
        return None
    with _LOCK:
        if status != "FINISHED":
            client, entry = _open(params, layout, create=False)
            if entry is None:
                return None
            for run_id in [*entry["children"].values(), entry["run_id"]]:
                if _run_status(client, run_id) == "RUNNING":
                    client.set_terminated(run_id, status)
            return entry["run_id"]
        client, entry = _open(params, layout)
        _finish(client, entry, params, layout, metrics)
        _save_entry(params, layout, entry)
    layout.publish()  # an embedded store (mlflow.db) beside an S3 output root goes up with it
    return entry["run_id"]


@_guarded
def log_pipeline(params: Params, layout: Layout, metrics: dict[str, Any], *, run_name: str | None = None) -> str:
    """Log a finished pipeline run (whatever ``tracking.enabled`` says); returns the parent run id.

    When the report stage already closed this configuration's parent with these metrics, that
    run's id is returned and nothing is logged twice."""
    with _LOCK:
        client, entry = _open(params, layout, create=False, reopen_closed=True)
        if entry is not None and entry.get("metrics_digest") == fingerprint(metrics) \
                and _run_status(client, entry["run_id"]) == "FINISHED":
            return entry["run_id"]
        client, entry = _open(params, layout)
        if run_name:
            client.set_tag(entry["run_id"], "mlflow.runName", run_name)
        _finish(client, entry, params, layout, metrics)
        _save_entry(params, layout, entry)
    layout.publish()
    return entry["run_id"]


@_guarded
def log_longtail(params: Params, layout: Layout, report: dict[str, Any]) -> str:
    """Log the memorization long-tail report (numbers, report.md/json and images) as one run."""
    from cleanse.pipeline import score_fingerprint

    client = _client(layout)
    experiment_id = _experiment(client, params, layout)
    tags = {"git_commit": git_commit(), "config_fingerprint": score_fingerprint(params, "memorization"),
            "estimator": "memorization"}
    run = client.create_run(experiment_id, run_name="memorization-longtail", tags=tags)
    run_id = run.info.run_id
    try:
        _log(client, run_id, params=estimator_params(params, "memorization"))
        numbers = {key: report[key] for key in ("mem", "marginal_utility")}
        numbers["pairs"] = {key: value for key, value in report["pairs"].items() if key != "top"}
        _log(client, run_id, metrics=_numeric("", numbers))
        directory = layout.reports / "memorization"
        if directory.is_dir():
            client.log_artifacts(run_id, str(directory), "memorization")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id

"""Parent and child runs: their params, the run record ``<out>/mlflow_run.json`` shared by
processes (DVC stages) and threads (Prefect tasks), and MLflow's errors as one-line
:class:`~cleanse.tracking.store.TrackingError`\ s without credentials."""

from __future__ import annotations

import functools
import os
import sqlite3
from typing import Any, Literal, overload

from cleanse.config import Params, flatten
from cleanse.errors import CleanseError
from cleanse.storage import Layout, read_json, write_json
from cleanse.tracking.store import TrackingError, artifact_location, ensure_store, git_commit, require_mlflow, tracking_uri
from cleanse.uris import redact, without_credentials

RUN_RECORD = "mlflow_run.json"
DESCRIPTION_TAG = "mlflow.note.content"
# MLflow 3's UI opens an experiment of unknown kind in its GenAI layout (traces, judges); this kind
# opens the model-training layout (runs table, charts) that these runs are made for.
EXPERIMENT_KIND = "mlflow.experimentKind"
REFERENCES = ("baseline", "oracle", "random")


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
    require_mlflow()
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


@overload
def _open(params: Params, layout: Layout, tags: dict[str, Any] | None = None, *, create: Literal[True] = True,
          reopen_closed: bool = False) -> tuple[Any, dict[str, Any]]: ...


@overload
def _open(params: Params, layout: Layout, tags: dict[str, Any] | None = None, *, create: bool,
          reopen_closed: bool = False) -> tuple[Any, dict[str, Any] | None]: ...


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

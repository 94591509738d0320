"""MLflow logging: the only module that imports mlflow.

One parent run per pipeline run (flattened params, reference metrics, the report and plots) and
one nested child run per estimator (its detection and retrain metrics, scores and flags). Tags:
``git_commit`` and ``config_fingerprint``.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a server, for the UI); otherwise the embedded
default, a sqlite file ``<out>/mlflow.db``. With any local store, artifacts go to
``<out>/mlartifacts`` (on S3 for an ``s3://`` output root); with a server, to the server's artifact
destination (e.g. ``mlflow server --artifacts-destination s3://bucket/mlartifacts``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from cleanse.config import Params, flatten
from cleanse.storage import Layout


def tracking_uri(layout: Layout) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layout.root / 'mlflow.db'}"


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


def _numeric(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_numeric(f"{prefix}{key}.", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out[f"{prefix}{key}"] = float(value)
    return out


def _restores_tracking_uri(function: Any) -> Any:
    """``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, which :func:`tracking_uri`
    reads: without restoring it, every later run in the same process (a worker, a sweep) would log
    into this run's store."""
    import functools

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            return function(*args, **kwargs)
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous

    return wrapper


def _experiment(params: Params, layout: Layout) -> str:
    """Point MLflow at the layout's tracking URI and return the experiment's id (created if new)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(layout)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    # A tracking server decides where artifacts go; a local store keeps them beside the outputs
    # (MLflow's own default would be ./mlruns in whatever directory the run started from).
    location = None if uri.startswith(("http://", "https://")) else artifact_location(layout)
    return client.create_experiment(params.tracking.experiment, artifact_location=location)


@_restores_tracking_uri
def log_pipeline(params: Params, layout: Layout, metrics: dict[str, Any], *, run_name: str | None = None) -> str:
    """Log a finished pipeline run; returns the parent run id."""
    import mlflow

    from cleanse.pipeline import run_fingerprint

    experiment_id = _experiment(params, layout)
    tags = {"git_commit": git_commit(), "config_fingerprint": run_fingerprint(params),
            "dataset": metrics["dataset"]["name"], "corruption": metrics["dataset"]["corruption"]}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name or f"cleanse-{metrics['dataset']['name']}",
                          tags=tags) as parent:
        mlflow.log_params(flatten(params))
        reference = {key: metrics[key] for key in ("baseline", "oracle", "random") if key in metrics}
        mlflow.log_metrics(_numeric("", reference) | {"n_train": metrics["dataset"]["n_train"],
                                                      "n_corrupted": metrics["dataset"]["n_corrupted"]})
        if layout.reports.is_dir():
            mlflow.log_artifacts(str(layout.reports), artifact_path="reports")
        for name, result in metrics["estimators"].items():
            with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True,
                                  tags={**tags, "estimator": name}):
                options = {key.removeprefix(f"scorers.{name}."): value for key, value in flatten(params).items()
                           if key.startswith(f"scorers.{name}.")}
                mlflow.log_params(options | {"estimator": name})
                mlflow.log_metrics(_numeric("", {k: v for k, v in result.items() if k not in ("detection", "cleansing")}) |
                                   _numeric("", result["detection"]))
                for round_ in result.get("cleansing", {}).get("rounds", []):
                    mlflow.log_metrics(_numeric("cleansing.", {k: v for k, v in round_.items() if k != "round"}),
                                       step=round_["round"])
                for path in (layout.scores(name), layout.scores_meta(name), layout.flags(name)):
                    if path.is_file():
                        mlflow.log_artifact(str(path), artifact_path=path.parent.name)
                for plot in (layout.reports / "flagged").glob(f"{name}.*"):
                    mlflow.log_artifact(str(plot), artifact_path="flagged")
                for plot in (layout.reports / "probes").glob(f"{name}.*"):
                    mlflow.log_artifact(str(plot), artifact_path="probes")
    layout.publish()  # an embedded store (mlflow.db) beside an S3 output root goes up with it
    return parent.info.run_id


@_restores_tracking_uri
def log_longtail(params: Params, layout: Layout, report: dict[str, Any]) -> str:
    """Log the memorization long-tail report (numbers, report.md/json and images) as one run."""
    import mlflow

    from cleanse.pipeline import score_fingerprint

    experiment_id = _experiment(params, layout)
    tags = {"git_commit": git_commit(), "config_fingerprint": score_fingerprint(params, "memorization"),
            "estimator": "memorization"}
    with mlflow.start_run(experiment_id=experiment_id, run_name="memorization-longtail", tags=tags) as run:
        options = {key.removeprefix("scorers.memorization."): value for key, value in flatten(params).items()
                   if key.startswith("scorers.memorization.")}
        mlflow.log_params(options)
        numbers = {key: report[key] for key in ("mem", "marginal_utility")}
        numbers["pairs"] = {key: value for key, value in report["pairs"].items() if key != "top"}
        mlflow.log_metrics(_numeric("", numbers))
        directory = layout.reports / "memorization"
        if directory.is_dir():
            mlflow.log_artifacts(str(directory), artifact_path="memorization")
        return run.info.run_id

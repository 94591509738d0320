"""What each pipeline stage logs, and the entry points the pipeline, the CLI and the flows call:
:func:`open_pipeline_run`, :func:`log_stage`, :func:`close_pipeline_run`, :func:`log_pipeline`
and :func:`log_longtail`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from cleanse.config import Params, fingerprint
from cleanse.storage import Layout, read_json, write_tensors
from cleanse.tracking.models import _log_datasets, _log_model, _training_curves
from cleanse.tracking.runs import (DESCRIPTION_TAG, REFERENCES, _child, _client, _experiment, _guarded, _log,
                                   _numeric, _open, _run_status, _save_entry, estimator_params)
from cleanse.tracking.store import _LOCK, git_commit
from cleanse.uris import redact



def _headline(params: Params, outcome: dict[str, Any]) -> str:
    """The family's headline outcome in ``outcome`` (``test_accuracy``, ``test_rmse``, ``test_fid``;
    :mod:`cleanse.families`)."""
    from cleanse import families

    task = families.get(params.family)
    return str((task.outcome_keys_in(outcome) or task.outcome_keys)[0])


def _pyfunc(params: Params) -> bool:
    """Whether the family's models are logged as MLflow pyfunc models (else as plain files)."""
    from cleanse import families

    return bool(families.get(params.family).mlflow_pyfunc)

def _log_estimator(client: Any, entry: dict[str, Any], params: Params, layout: Layout, stage: str, estimator: str,
                   model: Any = None) -> None:
    """What ``score``, ``detect`` or ``retrain`` of one estimator wrote, into the estimator's child run."""
    import numpy as np

    from cleanse.pipeline import load_staged

    if stage == "score":
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
             | {f"random_{_headline(params, cleaned)}": result["random_same_count"][_headline(params, cleaned)],
                "n_flagged": result["n_flagged"],
                "retrain_seconds": result["seconds"]})
        for round_ in result.get("rounds", []):
            _log(client, child, step=int(round_["round"]),
                 metrics=_numeric("cleansing.", {k: v for k, v in round_.items()
                                                 if k != "round" and not isinstance(v, list)}))
        if model is not None and not _pyfunc(params):  # the family's own files
            from cleanse import families

            folder = Path(tempfile.mkdtemp(prefix="cleanse-cleaned-"))
            try:
                families.get(params.family).save_model(model, folder, {"estimator": estimator})
                client.log_artifacts(child, str(folder), "model")
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        elif model is not None:
            weights = Path(tempfile.mkdtemp(prefix="cleanse-cleaned-")) / "model.safetensors"
            try:
                write_tensors(model.state, weights)
                _log_model(client, params, child, model.spec.to_json(), weights, artifact_path="model",
                           alias=f"cleaned-{estimator}",
                           description=f"retrained without the {cleaned['n_removed']} samples {estimator} flagged")
            finally:
                shutil.rmtree(weights.parent, ignore_errors=True)


def _log_one(client: Any, entry: dict[str, Any], params: Params, layout: Layout, stage: str, estimator: str | None,
             model: Any = None) -> None:
    from cleanse.pipeline import STAGE_META_NAME, load_staged

    if stage in ("score", "detect", "retrain"):
        if estimator is None:
            raise ValueError(f"stage {stage!r} logs one estimator, and none was named")
        _log_estimator(client, entry, params, layout, stage, estimator, model)
        return
    parent = entry["run_id"]
    if stage == "stage":
        staged = load_staged(layout, params)
        _log(client, parent, metrics={"n_train": len(staged.train), "n_val": len(staged.val),
                                      "n_test": len(staged.test), "n_corrupted": int(staged.train.is_corrupted.sum())})
        _log_datasets(client, parent, layout, staged)
    elif stage == "train":
        meta = read_json(layout.base_model / STAGE_META_NAME)
        _log(client, parent, metrics={f"base.{_headline(params, meta)}": meta[_headline(params, meta)],
                                      "train_seconds": meta["seconds"],
                                      **({"base.attack_success_rate": meta["attack_success_rate"]}
                                         if "attack_success_rate" in meta else {})})
        _training_curves(client, parent, layout, params)
        if not _pyfunc(params):
            client.log_artifacts(parent, str(layout.base_model), "model")
        else:
            _log_model(client, params, parent, meta["spec"], layout.base_model / "model.safetensors",
                       artifact_path="model", alias="base", description=f"base model, run {parent}")
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
        if not _pyfunc(params):
            client.log_artifacts(parent, str(recommended_model_dir(layout)), "recommended_model")
            return
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
            client, running = _open(params, layout, create=False)
            if running is None:
                return None
            for run_id in [*running["children"].values(), running["run_id"]]:
                if _run_status(client, run_id) == "RUNNING":
                    client.set_terminated(run_id, status)
            return running["run_id"]
        if metrics is None:
            raise ValueError("a run closed as FINISHED needs the report's metrics")
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
        client, logged = _open(params, layout, create=False, reopen_closed=True)
        if logged is not None and logged.get("metrics_digest") == fingerprint(metrics) \
                and _run_status(client, logged["run_id"]) == "FINISHED":
            return logged["run_id"]
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

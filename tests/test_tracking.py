"""MLflow as its users expect, on tiny iris / logistic-regression runs against a sqlite store in
tmp_path: the description, reference child runs, params, runs opened at the start, training
curves, models, dataset inputs, a self-contained report.html, an atomic store and redaction."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cleanse.storage import Layout, read_json
from tests.conftest import small_params

TINY = ["data.source=sklearn:iris", "model.arch=logreg", "model.epochs=12", "model.checkpoints=3",
        "tracking.enabled=true"]
REGISTERED = "iris-logreg"


@pytest.fixture(autouse=True)
def _embedded_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _client(layout: Layout):
    from mlflow.tracking import MlflowClient

    from cleanse.tracking import tracking_uri

    return MlflowClient(tracking_uri=tracking_uri(layout))


def _runs(client, kind: str | None = None):
    experiment = client.get_experiment_by_name("cleanse")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [run for run in runs if kind is None or run.data.tags.get("kind") == kind]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One finished run with two estimators: ``(params, layout, metrics, parent run)``."""
    from cleanse.pipeline import run_all

    previous = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        params = small_params(*TINY, 'estimators=["loss","influence"]', f"tracking.register_as={REGISTERED}")
        layout = Layout.at(tmp_path_factory.mktemp("tracked"))
        metrics = run_all(params, layout, log=lambda line: None)
        client = _client(layout)
        (parent,) = _runs(client, "pipeline")
        yield params, layout, metrics, parent
    finally:
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def _children(client, parent_id: str):
    experiment = client.get_run(parent_id).info.experiment_id
    return {run.info.run_name: run for run in
            client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")}


def test_description_is_the_comparison_table(tracked):
    from cleanse.report import _fmt, comparison_rows

    _, _, metrics, parent = tracked
    description = parent.data.tags["mlflow.note.content"]
    lines = description.splitlines()
    for row in comparison_rows(metrics):
        expected = "| " + " | ".join(_fmt(value) for value in row.values()) + " |"
        assert expected in lines, expected
    assert any(line.startswith("| baseline (no removal) |") for line in lines)
    assert any(line.startswith("| oracle |") for line in lines)
    assert any(line.startswith("| random removal") for line in lines)
    assert parent.info.status == "FINISHED"


def test_reference_children_share_metric_names_with_estimators(tracked):
    params, layout, metrics, parent = tracked
    children = _children(_client(layout), parent.info.run_id)
    assert set(children) == {"baseline", "oracle", "random", "loss", "influence"}
    estimator_keys = set(children["loss"].data.metrics)
    for name in ("baseline", "oracle", "random"):
        child = children[name]
        assert child.data.tags["kind"] == "reference"
        assert child.data.params["estimator"] == name
        assert {"test_accuracy", "n_removed", "n_corrupted_removed"} <= set(child.data.metrics) <= estimator_keys
        assert child.data.metrics["test_accuracy"] == pytest.approx(metrics[name]["test_accuracy"])
    assert children["oracle"].data.metrics["n_removed"] == metrics["dataset"]["n_corrupted"]
    assert children["baseline"].data.metrics["n_removed"] == 0
    for name in params.estimators:
        child = children[name]
        assert child.data.tags["kind"] == "estimator"
        result = metrics["estimators"][name]
        assert child.data.metrics["test_accuracy"] == pytest.approx(result["retrain"]["test_accuracy"])
        assert child.data.metrics["roc_auc"] == pytest.approx(result["detection"]["roc_auc"])
        assert child.data.metrics["n_flagged"] == result["n_flagged"]
        assert child.info.status == "FINISHED"


def test_params_are_few_prefixed_and_only_for_estimators_that_ran(tracked):
    params, layout, _, parent = tracked
    keys = set(parent.data.params)
    assert len(keys) < 60, len(keys)  # the flattened configuration has 113+
    assert "model.arch" in keys and "influence.solver" in keys and "loss.statistic" in keys
    assert not any(key.startswith(("scorers.", "tracin.", "cleanlab.", "trak.", "fine.", "tracking.", "cleansing."))
                   for key in keys), sorted(keys)
    children = _children(_client(layout), parent.info.run_id)
    influence = children["influence"].data.params
    assert influence["estimator"] == "influence" and influence["budget"] == params.detect.budget
    assert influence["influence.cg_max_iter"] == str(params.scorers.influence.cg_max_iter)
    assert not any("." not in key for key in set(influence) - {"estimator", "budget"})
    assert set(children["loss"].data.params) == {"estimator", "budget", "loss.statistic"}


def test_runs_open_at_the_start_and_stages_log_as_they_finish(tracked):
    _, layout, _, parent = tracked
    client = _client(layout)
    staged_at = (layout.staged_meta.stat().st_mtime) * 1000
    report_at = layout.metrics.stat().st_mtime * 1000
    assert parent.info.start_time <= staged_at + 1  # opened before the first stage wrote
    assert parent.info.end_time >= report_at - 1  # closed after the report
    children = _children(client, parent.info.run_id)
    (scored,) = client.get_metric_history(children["loss"].info.run_id, "seconds")
    (detected,) = client.get_metric_history(children["loss"].info.run_id, "roc_auc")
    assert scored.timestamp <= detected.timestamp <= report_at + 1  # logged by the stages, not the report
    assert (layout.flags("loss").stat().st_mtime * 1000 - 1 <= detected.timestamp)
    record = read_json(layout.root / "mlflow_run.json")
    (entry,) = record.values()
    assert entry["run_id"] == parent.info.run_id


def test_training_curves_per_epoch(tracked):
    params, layout, _, parent = tracked
    client = _client(layout)
    history = sorted(client.get_metric_history(parent.info.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, params.model.epochs + 1))
    assert history[-1].value < history[0].value  # logistic regression's loss falls
    meta = read_json(layout.base_model / "meta.json")
    assert [m.value for m in history] == pytest.approx([h["train_loss"] for h in meta["history"]])
    val = sorted(client.get_metric_history(parent.info.run_id, "val_accuracy"), key=lambda m: m.step)
    assert [m.step for m in val] == [c["epoch"] for c in meta["checkpoints"]]
    assert all(0 <= m.value <= 1 for m in val)
    assert len(client.get_metric_history(parent.info.run_id, "val_loss")) == len(val)


def test_models_logged_without_pickle_and_registered(tracked):
    import mlflow.pyfunc

    from cleanse.pipeline import load_staged
    from cleanse.tracking import tracking_uri

    params, layout, metrics, parent = tracked
    client = _client(layout)
    base = client.get_model_version_by_alias(REGISTERED, "base")
    assert base.run_id == parent.info.run_id
    children = _children(client, parent.info.run_id)
    for name in params.estimators:
        assert client.get_model_version_by_alias(REGISTERED, f"cleaned-{name}").run_id == children[name].info.run_id
    stored = list((layout.root / "mlartifacts").rglob("*"))
    assert any(path.name == "model.safetensors" for path in stored)
    assert not [path for path in stored if path.suffix in (".pkl", ".pickle", ".pt", ".pth")]
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(layout))
    try:
        model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}@base")
        test = load_staged(layout, params).test
        probabilities = model.predict(test.features.astype(np.float32))
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert probabilities.shape == (len(test), 3)
    accuracy = float((probabilities.argmax(1) == test.label_clean).mean())
    assert accuracy == pytest.approx(metrics["baseline"]["test_accuracy"])


def test_dataset_inputs(tracked):
    _, layout, _, parent = tracked
    inputs = {item.dataset.name: item for item in parent.inputs.dataset_inputs}
    assert set(inputs) == {"iris-train", "iris-val", "iris-test"}
    train = inputs["iris-train"]
    assert train.dataset.digest == hashlib.sha256(layout.split("train").read_bytes()).hexdigest()[:16]
    assert str(layout.split("train")) in train.dataset.source
    assert {tag.key: tag.value for tag in train.tags}["mlflow.data.context"] == "training"


def test_report_html_is_self_contained(tracked):
    _, layout, _, _ = tracked
    page = (layout.reports / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) >= 2  # PR curves and histograms
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert not [href for href in re.findall(r'href="([^"]*)"', page) if not href.startswith("data:")]


def test_logging_again_does_not_duplicate_the_run(tracked):
    from cleanse.tracking import log_pipeline

    params, layout, metrics, parent = tracked
    assert log_pipeline(params, layout, metrics) == parent.info.run_id
    assert len(_runs(_client(layout), "pipeline")) == 1


def test_separate_stage_calls_and_threads_share_one_parent(tmp_path):
    """DVC runs each stage in its own process and Prefect runs estimators in threads: every stage
    finds the same parent through <out>/mlflow_run.json, and the report closes it."""
    from concurrent.futures import ThreadPoolExecutor

    from cleanse import pipeline
    from cleanse.report import run_report
    from cleanse.tracking import log_pipeline

    params = small_params(*TINY, 'estimators=["loss","influence"]')
    layout = Layout.at(tmp_path)
    pipeline.run_stage(params, layout)
    pipeline.run_train(params, layout)
    pipeline.run_query(params, layout)

    def branch(name: str) -> None:
        pipeline.run_score(params, layout, name)
        pipeline.run_detect(params, layout, name)
        pipeline.run_retrain(params, layout, name)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(branch, name) for name in params.estimators]
        futures.append(pool.submit(pipeline.run_references, params, layout))
        for future in futures:
            future.result()
    client = _client(layout)
    (parent,) = _runs(client, "pipeline")
    assert parent.info.status == "RUNNING"
    assert set(_children(client, parent.info.run_id)) == {"loss", "influence", "baseline", "oracle", "random"}
    pipeline.run_recommend(params, layout)
    assert client.get_run(parent.info.run_id).data.tags["recommended.estimator"] in {"none", "loss", "influence"}
    assert log_pipeline(params, layout, run_report(params, layout)) == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert len(_runs(client, "pipeline")) == 1


def test_a_failed_pipeline_marks_the_run_failed(tmp_path, monkeypatch):
    from cleanse import pipeline

    params = small_params(*TINY, 'estimators=["loss"]')

    def broken(*args, **kwargs):
        raise RuntimeError("references broke")

    from cleanse.stages import retrain

    monkeypatch.setattr(retrain, "run_references", broken)  # where the stage graph finds it
    layout = Layout.at(tmp_path)
    with pytest.raises(RuntimeError, match="references broke"):
        pipeline.run_all(params, layout, log=lambda line: None)
    client = _client(layout)
    (parent,) = _runs(client, "pipeline")
    assert parent.info.status == "FAILED"
    assert _children(client, parent.info.run_id)["loss"].info.status == "FAILED"


def test_flow_run_tags_are_recorded_without_credentials(tmp_path):
    from cleanse.tracking import open_pipeline_run

    params = small_params(*TINY, 'estimators=["loss"]')
    layout = Layout.at(tmp_path)
    url = "https://bob:hunter2@prefect.example/flow-runs/flow-run/1234"
    run_id = open_pipeline_run(params, layout, {"prefect.flow_run_id": "1234", "prefect.flow_run_url": url})
    assert open_pipeline_run(params, layout) == run_id  # reused while running
    tags = _client(layout).get_run(run_id).data.tags
    assert tags["prefect.flow_run_id"] == "1234"
    assert "hunter2" not in tags["prefect.flow_run_url"] and tags["prefect.flow_run_url"].endswith("/1234")


def test_mlflow_errors_name_the_server_without_its_password(tmp_path, monkeypatch):
    from cleanse.tracking import TrackingError, display_uri, open_pipeline_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:hunter2@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    layout = Layout.at(tmp_path)
    assert "hunter2" not in display_uri(layout) and "127.0.0.1:9" in display_uri(layout)
    with pytest.raises(TrackingError) as caught:
        open_pipeline_run(small_params(*TINY, 'estimators=["loss"]'), layout)
    message = str(caught.value)
    assert "hunter2" not in message and "127.0.0.1:9" in message and "\n" not in message
    assert caught.value.__suppress_context__  # the unredacted original is not printed as its cause


# ----------------------------------------------------------------------------- the store


_KILL_DURING_MIGRATION = """
import os, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine

@event.listens_for(Engine, "before_cursor_execute")
def _kill(conn, cursor, statement, *args):
    if "_alembic_tmp_" in statement:  # inside a batch migration: the moment of the reported failure
        os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "cleanse":
    from cleanse.storage import Layout
    from cleanse.tracking import ensure_store
    ensure_store(Layout.at(sys.argv[2]))
else:  # what MLflow does by itself: migrate the store in place
    from mlflow.tracking import MlflowClient
    MlflowClient("sqlite:///" + sys.argv[2] + "/mlflow.db").search_experiments()
"""


def _killed_while_migrating(how: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-c", _KILL_DURING_MIGRATION, how, str(out)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def _tiny_run_completes(out: Path) -> None:
    from cleanse.pipeline import run_all

    params = small_params(*TINY, 'estimators=["loss"]')
    layout = Layout.at(out)
    run_all(params, layout, log=lambda line: None)
    (parent,) = _runs(_client(layout), "pipeline")
    assert parent.info.status == "FINISHED"
    assert not list(out.glob(".mlflow.db.*"))


def test_a_kill_while_the_store_is_created_leaves_no_store(tmp_path):
    out = tmp_path / "out"
    _killed_while_migrating("cleanse", out)
    assert not (out / "mlflow.db").exists()  # only a temporary file, never a half-made store
    assert list(out.glob(".mlflow.db.*.tmp*"))
    _tiny_run_completes(out)


def test_a_half_migrated_store_without_runs_is_rebuilt(tmp_path):
    out = tmp_path / "out"
    _killed_while_migrating("mlflow", out)
    from cleanse.tracking import _store_problem

    assert _store_problem(out / "mlflow.db") is not None
    # the reported state: MLflow by itself can no longer open the store
    opened = subprocess.run([sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
                             "MlflowClient('sqlite:///' + sys.argv[1]).search_experiments()", str(out / "mlflow.db")],
                            capture_output=True, text=True, timeout=300)
    assert opened.returncode != 0
    _tiny_run_completes(out)


def test_a_half_migrated_store_with_runs_is_refused_in_one_line(tmp_path):
    from cleanse.tracking import TrackingError, open_pipeline_run

    layout = Layout.at(tmp_path)
    params = small_params(*TINY, 'estimators=["loss"]')
    open_pipeline_run(params, layout)
    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        connection.execute("create table _alembic_tmp_model_versions (x integer)")
    before = (tmp_path / "mlflow.db").read_bytes()
    with pytest.raises(TrackingError, match=r"_alembic_tmp_model_versions.*holds runs") as caught:
        open_pipeline_run(small_params(*TINY, 'estimators=["loss"]', "seed=3"), layout)
    assert "\n" not in str(caught.value)
    assert (tmp_path / "mlflow.db").read_bytes() == before


def test_a_full_disk_while_the_store_is_created_leaves_no_store(tmp_path, monkeypatch):
    import errno

    import mlflow.store.db.utils as db_utils

    from cleanse.tracking import TrackingError, open_pipeline_run

    upgrade = db_utils._upgrade_db

    def full(engine):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(db_utils, "_upgrade_db", full)
    out = tmp_path / "out"
    with pytest.raises(TrackingError, match="No space left on device"):
        open_pipeline_run(small_params(*TINY, 'estimators=["loss"]'), Layout.at(out))
    assert not (out / "mlflow.db").exists() and not list(out.glob(".mlflow.db.*"))
    monkeypatch.setattr(db_utils, "_upgrade_db", upgrade)
    _tiny_run_completes(out)


def test_concurrent_store_creation_keeps_one_store(tmp_path):
    from cleanse.tracking import ensure_store

    layout = Layout.at(tmp_path)
    errors: list[BaseException] = []

    def create() -> None:
        try:
            ensure_store(layout)
        except BaseException as exc:  # noqa: BLE001 (collected for the assertion)
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    from cleanse.tracking import _store_problem

    assert _store_problem(tmp_path / "mlflow.db") is None
    assert not list(tmp_path.glob(".mlflow.db.*"))


# ----------------------------------------------------------------------------- the Prefect flow


def test_flow_run_opens_the_parent_with_links_and_failures_mark_it_failed(prefect_api, tmp_path, monkeypatch):
    from cleanse.estimators import registry
    from flows.cleanse_flow import cleanse_flow

    overrides = [*TINY, "corruption.fraction=0.15"]
    out = tmp_path / "ok"
    state = cleanse_flow(None, overrides, str(out), ["loss"], return_state=True)
    assert state.is_completed(), state
    client = _client(Layout.at(out))
    (parent,) = _runs(client, "pipeline")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert parent.data.tags["prefect.flow_run_name"]
    assert "| loss |" in parent.data.tags["mlflow.note.content"]
    assert set(_children(client, parent.info.run_id)) == {"loss", "baseline", "oracle", "random"}

    monkeypatch.setitem(registry._REGISTRY, "tracin", "tests.test_flow:PlantedFailure")
    out = tmp_path / "failed"
    state = cleanse_flow(None, overrides, str(out), ["loss", "tracin"], return_state=True)
    assert state.is_failed(), state
    (parent,) = _runs(_client(Layout.at(out)), "pipeline")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)

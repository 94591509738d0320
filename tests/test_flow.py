"""The Prefect flow and tasks on a tiny configuration (iris, logistic regression), against a
temporary Prefect API (``prefect_test_harness``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("CLEANSE_DEVICE", "cpu")

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = ["loss", "tracin", "influence"]
TINY = ["data.source=sklearn:iris", "model.arch=logreg", "model.epochs=5", "corruption.fraction=0.15"]


@pytest.mark.timeout(180)
def test_flow_runs_every_stage_and_reports(prefect_api, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.cleanse_flow import cleanse_flow
    from tasks.report import ARTIFACT_KEY

    monkeypatch.chdir(ROOT)  # the default params_file="params.yaml" is resolved against the cwd
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow goes to <out>/mlflow.db
    out = tmp_path / "out"
    state = cleanse_flow(overrides=TINY, out=str(out), estimators=ESTIMATORS, return_state=True)
    assert state.is_completed(), state.message
    metrics = state.result()

    written = json.loads((out / "reports" / "metrics.json").read_text())
    assert sorted(written["estimators"]) == sorted(ESTIMATORS) and list(metrics["estimators"]) == ESTIMATORS
    assert written["dataset"]["name"] == "iris" and written["dataset"]["n_corrupted"] > 0
    for name in ESTIMATORS:
        assert (out / "scores" / f"{name}.parquet").is_file()
        assert (out / "flags" / f"{name}.parquet").is_file()
        assert (out / "retrain" / f"{name}.json").is_file()
    assert (out / "reports" / "report.html").is_file()
    assert (out / "mlflow.db").is_file()

    with get_client(sync_client=True) as client:
        run_id = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=run_id))
    markdown = [a for a in artifacts if a.type == "markdown" and a.key == ARTIFACT_KEY]
    assert len(markdown) == 1
    assert all(name in markdown[0].data for name in ESTIMATORS) and "| method |" in markdown[0].data
    assert "mlflow" in markdown[0].data


def test_stage_task_fn_skips_fresh_output(tmp_path):
    from cleanse.pipeline import STAGE_META_NAME
    from tasks import STAGE_TASKS

    stage = STAGE_TASKS["stage"]

    overrides = [*TINY, "tracking.enabled=false"]
    path = stage.fn(None, overrides, str(tmp_path))
    assert path == str(tmp_path / "data" / "staged") and isinstance(path, str)
    meta = Path(path) / STAGE_META_NAME
    written_at = meta.stat().st_mtime_ns
    assert stage.fn(None, overrides, str(tmp_path)) == path  # fresh: skipped, nothing rewritten
    assert meta.stat().st_mtime_ns == written_at
    stage.fn(None, overrides, str(tmp_path), fresh=True)  # forced: rewritten
    assert meta.stat().st_mtime_ns != written_at


@pytest.mark.timeout(240)
def test_sweep_flow_runs_one_child_flow_per_value(prefect_api, tmp_path):
    """The Prefect sweep parameter: ``values`` of ``corruption.fraction``, one output root each."""
    from flows.cleanse_flow import cleanse_sweep

    small = [*TINY, "tracking.enabled=false"]
    results = cleanse_sweep(None, "corruption.fraction", [0.1, 0.3], small, str(tmp_path), ["loss"])
    assert list(results) == ["corruption.fraction=0.1", "corruption.fraction=0.3"]
    corrupted = []
    for label, metrics in results.items():
        written = json.loads((tmp_path / label / "reports" / "metrics.json").read_text())
        assert written == metrics and list(written["estimators"]) == ["loss"]
        corrupted.append(written["dataset"]["n_corrupted"])
    n_train = results["corruption.fraction=0.1"]["dataset"]["n_train"]
    assert 0 < corrupted[0] < corrupted[1] <= n_train, corrupted


# ----------------------------------------------------------------------------- default estimators, failures

# An MLP, not logreg: the Gauss-Newton products of a lone Linear layer are closed-form, an MLP's go
# through forward-mode AD, which influence and influence_val then use concurrently.
DEFAULTS_TINY = ["data.source=sklearn:iris", "model.arch=mlp", "model.hidden=[8]", "model.epochs=8",
                 "corruption.fraction=0.15", "scorers.cleanlab.folds=3", "tracking.enabled=false"]


def _score_tables(out: Path, names: list[str]) -> dict[str, object]:
    import pandas as pd

    return {name: pd.read_parquet(out / "scores" / f"{name}.parquet") for name in names}


def assert_same_scores(flow_out: Path, cli_out: Path, names: list[str], rtol: float = 1e-6) -> None:
    """Score tables of two runs agree: same ids in the same order, scores to ``rtol``."""
    import numpy as np

    ours, theirs = _score_tables(flow_out, names), _score_tables(cli_out, names)
    for name in names:
        a, b = ours[name], theirs[name]
        assert a["sample_id"].tolist() == b["sample_id"].tolist(), name
        assert np.isfinite(a["score"]).all() and a["score"].std() > 0, name
        np.testing.assert_allclose(a["score"], b["score"], rtol=rtol, atol=1e-9 * float(b["score"].abs().max()),
                                   err_msg=name)
        flags_a = __import__("pandas").read_parquet(flow_out / "flags" / f"{name}.parquet")
        flags_b = __import__("pandas").read_parquet(cli_out / "flags" / f"{name}.parquet")
        assert flags_a["is_flagged"].tolist() == flags_b["is_flagged"].tolist(), name


@pytest.mark.timeout(600)
def test_flow_with_default_estimators_matches_cli(prefect_api, tmp_path, monkeypatch):
    """The default estimators, concurrently on Prefect's thread pool, give the CLI's (sequential)
    score tables, flags and recommendation; influence and influence_val share torch's forward-mode AD and cleanlab
    would fork a pool without n_jobs. The library's progress lines reach the run's log."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    monkeypatch.setenv("CLEANSE_PROGRESS_SECONDS", "0")  # a progress line per update
    from cleanse.config import load_params
    from cleanse.pipeline import run_all
    from cleanse.storage import Layout
    from flows.cleanse_flow import cleanse_flow

    names = load_params(None, []).estimators
    assert {"influence", "influence_val", "cleanlab"} <= set(names)
    state = cleanse_flow(None, DEFAULTS_TINY, str(tmp_path / "flow"), return_state=True)
    assert state.is_completed(), state.message
    params = load_params(None, DEFAULTS_TINY)
    assert params.estimators == names
    cli_metrics = run_all(params, Layout.at(tmp_path / "cli"), log=lambda line: None)
    assert_same_scores(tmp_path / "flow", tmp_path / "cli", names)
    flow_metrics = json.loads((tmp_path / "flow" / "reports" / "metrics.json").read_text())
    for name in names:
        assert flow_metrics["estimators"][name]["detection"] == cli_metrics["estimators"][name]["detection"], name
    untimed = lambda entry: {key: value for key, value in entry.items() if key != "seconds"}  # noqa: E731
    assert untimed(flow_metrics["recommended"]) == untimed(json.loads(json.dumps(cli_metrics["recommended"])))

    APILogHandler().flush()  # the log worker sends in batches: drain it
    with get_client(sync_client=True) as client:
        logs: list = []
        while True:  # the server returns one page (at most 200) per call
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[state.state_details.flow_run_id])), limit=200, offset=len(logs))
            logs += page
            if len(page) < 200:
                break
    messages = [log.message for log in logs]
    assert any(m.startswith("train mlp on ") and "epoch 8/8 (100%)" in m for m in messages), messages[:20]
    assert any(m.startswith("cleanlab: 3 out-of-sample folds: fold 3/3") for m in messages), messages[:20]


class PlantedFailure:
    """An estimator that always fails (registered in place of ``tracin`` by the failure test)."""

    name = "tracin"

    def score(self, context, options):
        raise RuntimeError("planted failure in the scorer")


@pytest.mark.timeout(300)
def test_failing_estimator_fails_the_flow(prefect_api, tmp_path, monkeypatch):
    from cleanse.estimators import registry
    from flows.cleanse_flow import FlowFailed, cleanse_flow

    monkeypatch.setitem(registry._REGISTRY, "tracin", "tests.test_flow:PlantedFailure")
    out = tmp_path / "out"
    state = cleanse_flow(None, DEFAULTS_TINY, str(out), ["loss", "tracin"], return_state=True)
    assert state.is_failed(), state
    assert "score tracin failed: RuntimeError: planted failure in the scorer" in state.message
    assert "\n" not in state.message
    with pytest.raises(FlowFailed, match=r"^score tracin failed: RuntimeError: planted failure in the scorer "
                                         r"\(2 more not completed: detect tracin, retrain tracin\)$"):
        state.result()
    assert (out / "scores" / "loss.parquet").is_file()  # the healthy branch finished
    assert not (out / "scores" / "tracin.parquet").exists()
    assert not (out / "reports").exists()  # no report from partial results

    # The CLI's flow path: one line naming the stage and the reason, non-zero exit, no report.
    from typer.testing import CliRunner

    from cleanse.cli import app

    cli_out = tmp_path / "cli"
    args = ["run", "--prefect", "--out", str(cli_out), "--set", 'estimators=["loss","tracin"]']
    for override in DEFAULTS_TINY:
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and not isinstance(result.exception, FlowFailed), result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == ["error: score tracin failed: RuntimeError: planted failure in the scorer "
                     "(2 more not completed: detect tracin, retrain tracin)"], result.output
    assert not (cli_out / "reports").exists()


def test_influence_scoring_is_thread_safe(wine_context):
    """influence, influence_val and tracin (forward-mode products: Gauss-Newton blocks of the MLP's
    exact Hessian, g_i . v) scored in three threads at once, 12 times, equal the sequential scores
    bit for bit. Without the lock in cleanse.grads.jvp this raised "no level exists" or returned
    wrong scores within a few rounds."""
    import threading

    import numpy as np

    from cleanse.estimators import registry
    from tests.conftest import small_params

    context, _ = wine_context
    params = small_params()
    names = ["influence", "influence_val", "tracin"]

    def run(name: str) -> np.ndarray:
        return registry.get(name).score(context, params.scorers.of(name)).table["score"].to_numpy()

    sequential = {name: run(name) for name in names}
    for _ in range(12):
        results: dict[str, object] = {}

        def work(name: str) -> None:
            try:
                results[name] = run(name)
            except Exception as exc:  # noqa: BLE001 - reported below
                results[name] = exc

        threads = [threading.Thread(target=work, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name in names:
            assert not isinstance(results[name], Exception), results[name]
            assert np.array_equal(results[name], sequential[name]), name


def test_retries_skip_user_errors_and_apply_to_remote_runs():
    from prefect.states import Failed

    from cleanse.config import load_params
    from cleanse.errors import ConfigError, DataError
    from tasks._common import RETRIES, retry_if_transient, task_options

    assert retry_if_transient(None, None, Failed(data=ConnectionError("endpoint reset"))) is True
    assert retry_if_transient(None, None, Failed(data=DataError("data.source: no such file"))) is False
    assert retry_if_transient(None, None, Failed(data=ConfigError("model.lr: must be > 0"))) is False
    local = load_params(None, DEFAULTS_TINY)
    assert task_options(local, "/tmp/x") == {}
    remote = task_options(local, "s3://bucket/runs/x")
    assert remote["retries"] == RETRIES > 0 and remote["retry_condition_fn"] is retry_if_transient
    assert task_options(load_params(None, ["data.source=s3://bucket/data.parquet"]), "/tmp/x")["retries"] == RETRIES

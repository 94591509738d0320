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
    from tasks.stage import stage

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

"""The whole loop on a small problem: artifacts, metrics schema, repeatability, resume, MLflow."""

from __future__ import annotations

import json

import polars as pl
import pytest

from cleanse.pipeline import run_all
from cleanse.storage import Layout
from tests.conftest import small_params

ESTIMATORS = "estimators=[loss,cleanlab,influence,influence_val,tracin]"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    params = small_params(ESTIMATORS)
    layout = Layout.at(tmp_path_factory.mktemp("run"))
    metrics = run_all(params, layout, log=lambda line: None)
    return params, layout, metrics


def test_metrics_json_schema(finished):
    params, layout, metrics = finished
    on_disk = json.loads(layout.metrics.read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["dataset"]["n_corrupted"] == round(0.2 * on_disk["dataset"]["n_train"])
    assert set(on_disk) >= {"dataset", "baseline", "oracle", "random", "estimators"}
    assert set(on_disk["estimators"]) == set(params.estimators)
    for result in on_disk["estimators"].values():
        assert set(result["detection"]) == {"roc_auc", "average_precision", "precision_at_k", "recall_at_k", "k"}
        assert result["detection"]["k"] == on_disk["dataset"]["n_corrupted"]
        assert 0 <= result["retrain"]["test_accuracy"] <= 1
        assert result["seconds"] >= 0
    # The oracle removes exactly the corrupted samples.
    assert on_disk["oracle"]["n_removed"] == on_disk["dataset"]["n_corrupted"]


def test_artifacts_and_report(finished):
    params, layout, _ = finished
    for name in params.estimators:
        flags = pl.read_parquet(layout.flags(name))
        assert flags.columns == ["sample_id", "score", "rank", "is_flagged"]
        assert flags["rank"].to_list() == list(range(1, flags.height + 1))
        assert flags["score"].is_sorted(descending=True)
    page = (layout.reports / "report.html").read_text()
    assert "pr_curves.png" in page and "score_histograms.png" in page
    assert (layout.reports / "pr_curves.png").stat().st_size > 1000
    assert (layout.root / "models" / "base" / "model.safetensors").is_file()
    checkpoints = sorted((layout.root / "models" / "base" / "checkpoints").glob("*.safetensors"))
    assert len(checkpoints) == params.model.checkpoints


def test_same_params_give_byte_identical_scores(finished, tmp_path):
    params, layout, _ = finished
    again = Layout.at(tmp_path)
    run_all(params, again, log=lambda line: None)
    for name in params.estimators:
        assert layout.scores(name).read_bytes() == again.scores(name).read_bytes(), name
        assert layout.flags(name).read_bytes() == again.flags(name).read_bytes(), name
    assert (layout.root / "models/base/model.safetensors").read_bytes() == (again.root / "models/base/model.safetensors").read_bytes()


def test_resume_skips_fresh_stages_and_reruns_stale_ones(finished):
    params, layout, _ = finished
    lines: list[str] = []
    run_all(params, layout, log=lines.append)
    assert all(line.startswith("[skip]") for line in lines)
    changed = small_params(ESTIMATORS, "scorers.tracin.checkpoints=last")
    lines.clear()
    run_all(changed, layout, log=lines.append)
    rerun = sorted(line.split(":")[0].split("] ")[1].split(" (")[0] for line in lines if line.startswith("[done]"))
    assert rerun == ["detect tracin", "recommend", "retrain tracin", "score tracin"]
    run_all(params, layout, log=lambda line: None)  # restore for other tests


def test_image_grid_and_backdoor_attack_success(tmp_path):
    params = small_params("data.source=sklearn:digits", "model.arch=cnn", "model.hidden=[8,16]", "model.epochs=8",
                          "corruption.kind=backdoor", "corruption.fraction=0.05", "estimators=[loss,tracin]")
    metrics = run_all(params, Layout.at(tmp_path), log=lambda line: None)
    assert metrics["baseline"]["attack_success_rate"] > 0.5  # the backdoor took
    assert metrics["oracle"]["attack_success_rate"] < 0.2  # and removing the poisons undoes it
    assert "attack_success_rate" in metrics["estimators"]["tracin"]["retrain"]
    assert (tmp_path / "reports" / "flagged" / "tracin.png").stat().st_size > 1000


def test_mlflow_parent_and_child_runs(finished, monkeypatch):
    from mlflow.tracking import MlflowClient

    from cleanse.tracking import log_pipeline, tracking_uri

    params, layout, metrics = finished
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parent_id = log_pipeline(params, layout, metrics)
    client = MlflowClient(tracking_uri=tracking_uri(layout))
    parent = client.get_run(parent_id)
    assert parent.data.metrics["oracle.test_accuracy"] == pytest.approx(metrics["oracle"]["test_accuracy"])
    assert parent.data.params["model.arch"] == "mlp"
    assert len(parent.data.tags["config_fingerprint"]) == 16
    assert "git_commit" in parent.data.tags
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    children = [child for child in runs if child.data.tags["kind"] == "estimator"]  # the others: references
    assert sorted(child.data.tags["estimator"] for child in children) == sorted(params.estimators)
    for child in children:
        name = child.data.tags["estimator"]
        assert child.data.metrics["roc_auc"] == pytest.approx(metrics["estimators"][name]["detection"]["roc_auc"])
        artifacts = [item.path for item in client.list_artifacts(child.info.run_id, "scores")]
        assert f"scores/{name}.parquet" in artifacts
    assert any(item.path == "reports/report.html" for item in client.list_artifacts(parent_id, "reports"))


def test_logging_a_run_does_not_redirect_the_next_run(tmp_path, monkeypatch):
    """MLflow exports MLFLOW_TRACKING_URI when a tracking URI is set; a second run in the same
    process (a worker, a sweep) must still log into its own output root."""
    import os

    from cleanse import pipeline
    from cleanse.storage import read_json
    from cleanse.tracking import log_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = small_params('estimators=["loss"]', "tracking.enabled=true")
    for name in ("first", "second"):
        pipeline.run_all(params, Layout(tmp_path / name))
        log_pipeline(params, Layout(tmp_path / name), read_json(tmp_path / name / "reports" / "metrics.json"))
        assert "MLFLOW_TRACKING_URI" not in os.environ
        assert (tmp_path / name / "mlflow.db").is_file()

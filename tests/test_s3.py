"""S3 as a location, against a real S3 server (SeaweedFS, see the ``s3_server`` fixture).

* ``--out s3://bucket/prefix``: every artifact lands in the bucket with the local bytes, the MLflow
  artifacts go to S3 too, and a run from an empty work folder resumes from the bucket alone;
* credentials never reach params, MLflow or the output;
* faults (wrong credentials, missing bucket, unreachable server, server stopped mid-run) give a
  clear error within a bounded time and leave no partial artifact;
* an ``s3://`` data source.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cleanse import remote
from cleanse.cli import app
from cleanse.errors import DataError
from cleanse.pipeline import run_all
from cleanse.storage import Layout, fetch_input
from tests.conftest import SMALL_OVERRIDES, small_params

FAST = ["data.source=sklearn:iris", "model.arch=logreg", "model.epochs=5", 'estimators=["loss"]']


def _prefix(name: str) -> str:
    return f"s3://cleanse/{name}-{uuid.uuid4().hex[:8]}"


def _cli(*args: str) -> tuple[int, str, float]:
    started = time.monotonic()
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output, time.monotonic() - started


def _assert_records_describe_their_data(uri: str) -> None:
    """Every stage record on S3 sits beside complete, readable data (what a resume relies on)."""
    objects = remote.list_objects(uri)
    expected = {"data/staged/meta.json": ["data/staged/train.parquet", "data/staged/val.parquet",
                                          "data/staged/test.parquet"],
                "models/base/meta.json": ["models/base/model.safetensors"]}
    for relative in objects:
        if relative.startswith("scores/") and relative.endswith(".meta.json"):
            expected[relative] = [relative.replace(".meta.json", ".parquet")]
    for record, data in expected.items():
        if record in objects:
            assert all(item in objects for item in data), (record, sorted(objects))


def test_s3_output_root_holds_every_artifact_and_resumes(s3_env, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from cleanse.tracking import log_pipeline, tracking_uri

    uri = _prefix("run")
    params = small_params(*FAST, "tracking.enabled=true")
    layout = Layout.at(uri)
    assert layout.remote == uri and layout.root.is_relative_to(tmp_path / "work")
    metrics = run_all(params, layout, log=lambda line: None)
    run_id = log_pipeline(params, layout, metrics)

    objects = remote.list_objects(uri)
    local = [p.relative_to(layout.root).as_posix() for p in layout.root.rglob("*") if p.is_file()]
    assert "mlflow.db" in local and "reports/metrics.json" in local and "scores/loss.parquet" in local
    for relative in local:  # every artifact (and the embedded MLflow store) is in the bucket, byte for byte
        assert relative in objects and remote._same(layout.root / relative, objects[relative]), relative
    # MLflow: the parent run's and the child run's artifacts are on S3 (MLFLOW_S3_ENDPOINT_URL)
    client = MlflowClient(tracking_uri(layout))
    parent = client.get_run(run_id)
    assert parent.info.artifact_uri.startswith(f"{uri}/mlartifacts/")
    (child,) = client.search_runs([parent.info.experiment_id],  # the other children: the references
                                  f"tags.mlflow.parentRunId = '{run_id}' and tags.kind = 'estimator'")
    artifacts = [key for key in objects if key.startswith("mlartifacts/")]
    assert any(key.endswith(f"{run_id}/artifacts/reports/metrics.json") for key in artifacts), artifacts
    assert any(key.endswith(f"{child.info.run_id}/artifacts/scores/loss.parquet") for key in artifacts), artifacts
    # credentials: not in the MLflow params, the tracking store or any artifact
    secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    assert all(secret not in str(value) for value in parent.data.params.values())
    for path in layout.root.rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path
    assert json.loads((layout.metrics).read_text()) == metrics

    # A fresh machine (empty work folder) resumes from the bucket alone: nothing is recomputed.
    monkeypatch.setenv("CLEANSE_WORK_DIR", str(tmp_path / "elsewhere"))
    lines: list[str] = []
    again = run_all(params, Layout.at(uri), log=lines.append)
    assert lines and all(line.startswith("[skip]") for line in lines), lines
    assert again == metrics


def test_wrong_credentials_fail_fast_and_write_nothing(s3_env, monkeypatch, tmp_path):
    uri = _prefix("badkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + uuid.uuid4().hex)
    code, output, seconds = _cli("run", "--out", uri, *sum((["--set", o] for o in [*SMALL_OVERRIDES, *FAST]), []))
    assert code == 2, output
    assert "refused the credentials" in output and uri in output, output
    assert "not-the-secret" not in output
    assert seconds < 30
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env["AWS_SECRET_ACCESS_KEY"])
    assert remote.list_objects(uri) == {}
    assert not any(p.is_file() for p in (tmp_path / "work").rglob("*"))


def test_missing_bucket_is_named(s3_env, tmp_path):
    code, output, seconds = _cli("run", "--out", "s3://no-such-bucket-here/run", "--set", "tracking.enabled=false")
    assert code == 2 and "bucket 'no-such-bucket-here' does not exist" in output, output
    assert seconds < 30
    assert not any(p.is_file() for p in (tmp_path / "work").rglob("*"))


def test_unreachable_server_is_bounded(s3_env, monkeypatch):
    from ops.stack import _free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    started = time.monotonic()
    with pytest.raises(remote.RemoteError, match="cannot reach S3 at http://127.0.0.1:.* after 3 attempts"):
        Layout.at("s3://cleanse/anything")
    assert time.monotonic() - started < 30


def test_server_stopped_mid_run(s3_env, monkeypatch, tmp_path):
    """The server dies after ``train``: the run stops with a clear error within a bounded time; the
    bucket holds only complete stages; after a restart the run resumes and completes."""
    from ops.stack import Stack

    server = Stack(tmp_path / "own-s3")
    server.up(worker=False, services=("s3",), ports={"s3": 0}, echo=lambda *_: None)
    try:
        for key, value in server.env().items():
            if key.startswith("AWS_"):
                monkeypatch.setenv(key, value)
        uri = _prefix("killed")
        params = small_params(*FAST, "tracking.enabled=false")
        lines: list[str] = []

        def log(line: str) -> None:
            lines.append(line)
            if line.startswith("[done] train"):
                server.down(echo=lambda *_: None)

        started = time.monotonic()
        layout = Layout.at(uri)
        with pytest.raises(remote.RemoteError, match="cannot reach S3 .* is the server running"):
            run_all(params, layout, log=log)
        assert time.monotonic() - started < 60
        assert lines[-1].startswith("[done] train"), lines
        assert not list((tmp_path / "work").rglob("*.tmp"))

        server.up(worker=False, services=("s3",), echo=lambda *_: None)  # same data and keys
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.env()["AWS_ENDPOINT_URL"])
        objects = remote.list_objects(uri)
        assert "models/base/meta.json" in objects and "reports/metrics.json" not in objects
        _assert_records_describe_their_data(uri)
        lines.clear()
        monkeypatch.setenv("CLEANSE_WORK_DIR", str(tmp_path / "elsewhere"))
        metrics = run_all(params, Layout.at(uri), log=lines.append)
        assert lines[:2] == ["[skip] stage: up to date", "[skip] train: up to date"], lines
        assert "reports/metrics.json" in remote.list_objects(uri) and metrics["estimators"].keys() == {"loss"}
    finally:
        server.down(echo=lambda *_: None)


def test_s3_data_source(s3_env, tmp_path):
    from sklearn.datasets import load_iris

    iris = load_iris()
    frame = pl.DataFrame({"features": iris.data.astype(np.float32).tolist(), "label": iris.target.astype(np.int64)})
    local = tmp_path / "iris.parquet"
    frame.write_parquet(local)
    uri = _prefix("data") + "/iris.parquet"
    bucket, key = remote.split_uri(uri)
    remote.client().upload_file(str(local), bucket, key)
    assert fetch_input(uri, tmp_path / "cache").read_bytes() == local.read_bytes()
    staged = small_params(f"data.source={uri}")
    from cleanse.data.stage import stage_data

    data = stage_data(staged)
    assert len(data.train) + len(data.val) + len(data.test) == 150
    with pytest.raises(DataError, match="no such object"):
        fetch_input(uri.replace("iris", "missing"), tmp_path / "cache")
    assert not any(Path(p).name.endswith(".tmp") for p in (tmp_path / "cache").iterdir())

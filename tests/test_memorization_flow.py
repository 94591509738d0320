"""The memorization flow: the same numbers on the thread runner, on a DaskTaskRunner with a
LocalCluster and on a RayTaskRunner with a local Ray, the long-tail report with its Prefect artifact and MLflow run, and a killed run that
resumes without retraining its finished shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.source=sklearn:digits", "data.test_fraction=0.2", "model.hidden=[16]", "model.epochs=8",
        "corruption.fraction=0.2", "scorers.memorization.n_models=40", "scorers.memorization.shard_size=10",
        "scorers.memorization.utility_seeds=2"]


def _shard_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "cache" / "memorization").glob("*/shard_*.safetensors")}


@pytest.fixture(scope="module")
def thread_run(prefect_api, tmp_path_factory):
    from flows.memorization import memorization_flow, task_runner

    out = tmp_path_factory.mktemp("thread")
    flow = memorization_flow.with_options(task_runner=task_runner("thread", workers=2))
    state = flow(None, TINY, str(out), return_state=True)
    assert state.is_completed(), state.message
    return out, state


def test_thread_run_writes_scores_influence_and_report(thread_run, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tasks.memorization import ARTIFACT_KEY

    out, state = thread_run
    summary = state.result()
    assert summary["shards_trained"] == 4 and len(_shard_files(out)) == 4
    table = pl.read_parquet(out / "scores" / "memorization.parquet")
    n_train = table.height
    infl = np.load(out / "scores" / "memorization" / "infl_test.npy", mmap_mode="r")
    n_test = pl.read_parquet(out / "data" / "staged" / "test.parquet").height
    assert infl.shape == (n_test, n_train) and infl.dtype == np.float32
    assert np.load(out / "scores" / "memorization" / "infl_test_se.npy").shape == (n_test, n_train)
    report = json.loads((out / "reports" / "memorization" / "report.json").read_text())
    assert report["n_models"] == 40 and (out / "reports" / "memorization" / "top_memorized.png").is_file()
    utility = report["marginal_utility"]
    assert utility["n_removed"] == int((table["score"].to_numpy() >= 0.25).sum())
    assert 0.5 < utility["full"]["test_accuracy"] <= 1
    assert (out / "mlflow.db").is_file()
    with get_client(sync_client=True) as client:
        run_id = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=run_id))
    markdown = [a for a in artifacts if a.key == ARTIFACT_KEY]
    assert len(markdown) == 1 and "Marginal utility" in markdown[0].data and "mlflow" in markdown[0].data


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("runner", "extra"), [("dask", "prefect_dask"), ("ray", "prefect_ray")])
def test_distributed_runner_gives_the_same_numbers(thread_run, tmp_path, monkeypatch, runner, extra):
    """A LocalCluster (dask) or a local Ray: the shards train in other processes, the numbers do not move."""
    pytest.importorskip(extra)  # installed by the dev extra
    import prefect.settings

    from flows.memorization import memorization_flow, task_runner

    # Worker processes find the test API through the environment (the harness sets it in-process).
    monkeypatch.setenv("PREFECT_API_URL", prefect.settings.PREFECT_API_URL.value())
    out = tmp_path / runner
    flow = memorization_flow.with_options(task_runner=task_runner(runner, workers=2))
    state = flow(None, [*TINY, "tracking.enabled=false"], str(out), report=False, return_state=True)
    assert state.is_completed(), state.message
    expected = pl.read_parquet(thread_run[0] / "scores" / "memorization.parquet")
    assert pl.read_parquet(out / "scores" / "memorization.parquet").equals(expected)
    for name in ("infl_test.npy", "infl_test_se.npy"):
        np.testing.assert_array_equal(np.load(out / "scores" / "memorization" / name),
                                      np.load(thread_run[0] / "scores" / "memorization" / name))


@pytest.mark.timeout(300)
def test_killed_run_resumes_without_retraining_finished_shards(thread_run, tmp_path):
    import prefect.settings

    from flows.memorization import memorization_flow, task_runner

    out = tmp_path / "killed"
    overrides = [*TINY, "tracking.enabled=false"]
    command = [sys.executable, str(ROOT / "flows" / "memorization.py"), "--params", "", "--out", str(out),
               "--workers", "1", "--no-report", *[arg for o in overrides for arg in ("--set", o)]]
    env = {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not _shard_files(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = _shard_files(out)
    assert 1 <= len(finished) < 4, f"kill landed after {len(finished)} shards"

    flow = memorization_flow.with_options(task_runner=task_runner("thread", workers=2))
    summary = flow(None, overrides, str(out), report=False)
    assert summary["shards_trained"] == 4 - len(finished)
    after = _shard_files(out)
    assert {name: after[name] for name in finished} == finished  # not rewritten
    expected = pl.read_parquet(thread_run[0] / "scores" / "memorization.parquet")
    assert pl.read_parquet(out / "scores" / "memorization.parquet").equals(expected)

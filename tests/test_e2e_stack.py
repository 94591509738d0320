"""Browser end-to-end test of ``cleanse stack`` (marked ``e2e``: not in the default suite; ``.ci/run``
runs it after installing Debian's chromium).

``cleanse stack up`` -> ``cleanse run`` (as the Prefect flow, output root on the stack's S3, MLflow
on the stack's server) and a run of the ``cleanse/local`` deployment through the stack's worker ->
headless Chromium reads the Prefect UI (the flow runs are listed as Completed) and the MLflow UI
(the parent run, its child runs and their metrics), by the rendered page text -> ``cleanse stack
down`` leaves no process behind. Screenshots go to ``$CLEANSE_E2E_ARTIFACTS`` (default
``.ci/artifacts/e2e``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("CLEANSE_E2E_ARTIFACTS", REPO / ".ci" / "artifacts" / "e2e"))
RUN = ["--set", "data.source=sklearn:iris", "--set", "model.arch=logreg", "--set", "model.epochs=5",
       "--set", "model.checkpoints=2", "--set", 'estimators=["loss","tracin"]', "--set", "tracking.enabled=true",
       "--set", "tracking.experiment=cleanse-e2e"]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    result = subprocess.run([str(BIN / "cleanse"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"cleanse {' '.join(args)} exited {result.returncode}:\n{output[-6000:]}"
    return output


def _chromium(url: str, *extra: str, budget_ms: int = 20000) -> str:
    with tempfile.TemporaryDirectory(prefix="cleanse-chromium-") as profile:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
             "--disable-quic", f"--user-data-dir={profile}", "--window-size=1400,1000",
             f"--virtual-time-budget={budget_ms}", *extra, url],
            capture_output=True, text=True, timeout=180)
    return result.stdout


def page_text(url: str, screenshot: str, *, expect: tuple[str, ...] = (), attempts: int = 4) -> str:
    """The rendered page's visible text (scripts and styles dropped), and a screenshot of it.

    Both UIs are single-page apps that fetch their data after the first render; on a busy machine
    the virtual-time budget can run out before the fetch returns, so the page is loaded again, with
    a longer budget, until every string in ``expect`` is on it (or the attempts are spent).
    """
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    text = ""
    for attempt in range(attempts):
        budget = 20000 * min(attempt + 1, 3)
        dom = _chromium(url, "--dump-dom", budget_ms=budget)
        dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
        text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())
        if all(item in text for item in expect):
            break
        time.sleep(2)
    _chromium(url, f"--screenshot={ARTIFACTS / screenshot}", budget_ms=budget)
    (ARTIFACTS / screenshot).with_suffix(".txt").write_text(text)
    return text


def _mlflow(env: dict[str, str], experiment: str) -> dict:
    code = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient()
exp = client.get_experiment_by_name(sys.argv[1])
runs = client.search_runs([exp.experiment_id])
print(json.dumps({"experiment_id": exp.experiment_id, "runs": [
    {"id": r.info.run_id, "name": r.info.run_name, "parent": r.data.tags.get("mlflow.parentRunId"),
     "metrics": r.data.metrics, "artifact_uri": r.info.artifact_uri} for r in runs]}))
"""
    out = subprocess.run([sys.executable, "-c", code, experiment], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _flow_runs(env: dict[str, str]) -> list[dict]:
    code = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    print(json.dumps([{"id": str(r.id), "name": r.name, "state": r.state.type.value,
                       "deployment": str(r.deployment_id) if r.deployment_id else None}
                      for r in client.read_flow_runs()]))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (`apt-get install chromium`)")
def test_stack_run_shows_in_both_uis_and_down_leaves_nothing(tmp_path):
    from cleanse.stack import Stack, _alive

    state_dir = tmp_path / "stack"
    stack = Stack(state_dir)
    try:
        up = _cli("stack", "up", "--dir", str(state_dir), timeout=900)
        urls = stack.state()["urls"]
        for url in urls.values():
            assert url.startswith("http://127.0.0.1:") and url in up or url.endswith("/api")
        assert "healthy" in _cli("stack", "status", "--dir", str(state_dir))
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
        env |= stack.env() | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "CLEANSE_WORK_DIR": str(tmp_path / "work"),
                              "CLEANSE_DEVICE": "cpu"}
        exported = _cli("stack", "env", "--dir", str(state_dir))
        assert f"PREFECT_API_URL={urls['prefect_api']}" in exported
        assert ".gitignore" in os.listdir(state_dir) and oct(os.stat(state_dir / "credentials.env").st_mode)[-3:] == "600"

        # 1. `cleanse run` against the stack: a Prefect flow run, MLflow runs, outputs on S3
        ran = _cli("run", *RUN, "--out", "s3://cleanse/e2e", env=env)
        assert "report: " in ran or "tracin" in ran
        # 2. the deployment, run by the stack's worker (what a click on "Run" in the Prefect UI does)
        params = json.dumps({"overrides": [RUN[i + 1] for i in range(0, len(RUN), 2)],
                             "out": str(tmp_path / "deployment-out")})
        watched = subprocess.run([str(BIN / "prefect"), "deployment", "run", "cleanse/local", "--params", params,
                                  "--watch", "--watch-timeout", "600"], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=660)
        assert watched.returncode == 0, (watched.stdout + watched.stderr)[-4000:]
        assert (tmp_path / "deployment-out" / "reports" / "metrics.json").is_file()

        flow_runs = _flow_runs(env)
        assert len(flow_runs) == 2 and all(run["state"] == "COMPLETED" for run in flow_runs), flow_runs
        tracked = _mlflow(env, "cleanse-e2e")
        parents = [run for run in tracked["runs"] if run["parent"] is None]
        children = [run for run in tracked["runs"] if run["parent"] is not None]
        assert len(parents) == 2 and len(children) == 4, tracked
        assert all(run["artifact_uri"].startswith("mlflow-artifacts:") for run in tracked["runs"])
        check_env = {**os.environ, **{k: v for k, v in env.items() if k.startswith("AWS_")}}
        mlartifacts = subprocess.run(
            [sys.executable, "-c", "import json,sys; from cleanse import remote; "
             "print(json.dumps(sorted(remote.list_objects(sys.argv[1]))))", "s3://cleanse/mlartifacts"],
            env=check_env, capture_output=True, text=True, timeout=120)
        keys = json.loads(mlartifacts.stdout.strip().splitlines()[-1])
        assert any(key.endswith("artifacts/reports/metrics.json") for key in keys), keys[:20]
        outputs = json.loads(subprocess.run(
            [sys.executable, "-c", "import json,sys; from cleanse import remote; "
             "print(json.dumps(sorted(remote.list_objects(sys.argv[1]))))", "s3://cleanse/e2e"],
            env=check_env, capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1])
        assert {"reports/metrics.json", "scores/tracin.parquet", "models/base/model.safetensors"} <= set(outputs)

        # 3. the Prefect UI lists both flow runs as completed
        listing = page_text(f"{urls['prefect']}/runs", "prefect-runs.png",
                            expect=tuple(run["name"] for run in flow_runs))
        for run in flow_runs:
            assert run["name"] in listing, listing[:3000]
            detail = page_text(f"{urls['prefect']}/runs/flow-run/{run['id']}", f"prefect-run-{run['name']}.png",
                               expect=(run["name"], "Completed"))
            assert run["name"] in detail and "Completed" in detail, detail[:3000]

        # 4. the MLflow UI: the parent run, its child runs, and their metrics
        parent = next(run for run in parents if any(c["parent"] == run["id"] for c in children))
        base = f"{urls['mlflow']}/#/experiments/{tracked['experiment_id']}"
        parent_page = page_text(f"{base}/runs/{parent['id']}", "mlflow-parent-run.png",
                                expect=(parent["name"], "Child runs", "baseline.test_accuracy"))
        assert parent["name"] in parent_page and "Child runs" in parent_page, parent_page[:3000]
        child_list = parent_page.split("Child runs", 1)[1][:300]
        assert all(c["name"] in child_list for c in children if c["parent"] == parent["id"]), child_list
        for metric in ("baseline.test_accuracy", "n_train"):
            assert metric in parent_page, parent_page[:3000]
        for child in (c for c in children if c["parent"] == parent["id"]):
            child_page = page_text(f"{base}/runs/{child['id']}", f"mlflow-child-{child['name']}.png",
                                   expect=(child["name"], "roc_auc", "Parent run"))
            assert child["name"] in child_page and "roc_auc" in child_page, child_page[:3000]
            assert f"Parent run {parent['name']}" in child_page, child_page[:3000]
        table = page_text(f"{base}/runs?compareRunsMode=TABLE", "mlflow-runs-table.png",
                          expect=(parent["name"], "matching runs"))
        assert parent["name"] in table and f"{len(tracked['runs'])} matching runs" in table, table[:3000]
    finally:
        pids = stack.pids()
        down = subprocess.run([str(BIN / "cleanse"), "stack", "down", "--dir", str(state_dir)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    assert pids and not [pid for pid in pids if _alive(pid)], "processes left behind after `cleanse stack down`"
    assert stack.pids() == []
    assert "FAIL" not in down.stdout

"""Browser end-to-end test of ``cleanse stack`` (marked ``e2e``: not in the default suite; ``.ci/run``
runs it after installing Debian's chromium).

``cleanse stack up`` -> ``cleanse run`` (as the Prefect flow, output root on the stack's S3, MLflow
on the stack's server) and a run of the ``cleanse/local`` deployment through the stack's worker ->
headless Chromium reads the Prefect UI (the flow runs are listed as Completed) and the MLflow UI
(the parent run, its child runs and their metrics), by the rendered page text, then drives the
MLflow UI over the DevTools protocol for two screenshots: the parent run's description (the
comparison table) and the ``test_accuracy`` chart with estimators and references together ->
``cleanse stack down`` leaves no process behind. Screenshots go to ``$CLEANSE_E2E_ARTIFACTS``
(default ``.ci/artifacts/e2e``).
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
       "--set", "tracking.experiment=cleanse-e2e", "--set", "tracking.register_as=cleanse-e2e"]


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


class Browser:
    """Headless Chromium driven over the DevTools protocol (a websocket), for pages that need a
    click before the screenshot (an expanded run group, an opened chart, "Show more")."""

    def __init__(self, width: int = 1600, height: int = 1000) -> None:
        import socket
        import urllib.request

        from websockets.sync.client import connect

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.profile = tempfile.mkdtemp(prefix="cleanse-chromium-")
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-sync", "--disable-background-networking", "--disable-component-update",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             f"--remote-debugging-port={self.port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        page = None
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as answer:
                    page = next(item for item in json.load(answer) if item["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                time.sleep(0.3)
        assert page is not None, "chromium's DevTools endpoint did not come up"
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.calls = 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: object) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=120))
            if message.get("id") == self.calls:
                assert "error" not in message, f"{method}: {message['error']}"
                return message.get("result", {})

    def js(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expect: tuple[str, ...], timeout: float = 120) -> str:
        """The page's text once every string in ``expect`` is on it (or when ``timeout`` ends)."""
        deadline = time.time() + timeout
        text = ""
        while time.time() < deadline:
            text = str(self.js("document.body ? document.body.innerText : ''") or "")
            if all(item in text for item in expect):
                break
            time.sleep(1)
        return text

    def goto(self, url: str, expect: tuple[str, ...]) -> str:
        self.call("Page.navigate", url=url)
        return self.wait_for(expect)

    def click(self, script: str) -> object:
        """Run ``script`` (which clicks something) and let the page settle."""
        value = self.js(script)
        time.sleep(3)
        return value

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        import base64

        path = ARTIFACTS / name
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        self.socket.close()
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


# Close MLflow's assistant side panel when it is open (it takes a third of the page).
_CLOSE_ASSISTANT = """(() => { const close = [...document.querySelectorAll('button')]
  .find(b => b.getAttribute('aria-label') === 'Close'); if (close) close.click(); return !!close; })()"""


_OPEN_TEST_ACCURACY_CHART = """(() => { const title = [...document.querySelectorAll('span,div,h3,h4')]
  .find(x => x.childElementCount === 0 && x.innerText.trim() === 'test_accuracy');
  let card = title; for (let i = 0; i < 8 && card; i++) { card = card.parentElement;
    const full = card.querySelector('button[data-component-id="fullscreen_button_chartcard"]');
    if (full) { full.click(); return true; } } return false; })()"""
_SCROLL_CHARTS_DOWN = """(() => { const titles = [...document.querySelectorAll('span,div,h3,h4')]
  .filter(x => x.childElementCount === 0 && x.innerText.trim().endsWith('test_accuracy'));
  if (titles.length) titles[titles.length - 1].scrollIntoView();
  for (const el of document.querySelectorAll('*')) {
    if (el.scrollHeight > el.clientHeight + 20) el.scrollTop += el.clientHeight; } })()"""


def mlflow_screenshots(mlflow_url: str, experiment_id: str, parent: dict, names: list[str]) -> tuple[str, str]:
    """The parent run's description and the ``test_accuracy`` chart of its child runs (estimators
    and references), as ``mlflow-description.png`` and ``mlflow-chart.png``; returns the texts."""
    browser = Browser()
    try:
        base = f"{mlflow_url}/#/experiments/{experiment_id}"
        browser.goto(f"{base}/runs/{parent['id']}", ("Description", "baseline (no removal)"))
        browser.click(_CLOSE_ASSISTANT)
        browser.click("""(() => { const more = [...document.querySelectorAll('button,a,span')]
          .find(x => x.innerText && x.innerText.trim() === 'Show more'); if (more) more.click();
          const title = [...document.querySelectorAll('span,div,h2,h3,h4')]
          .find(x => x.childElementCount === 0 && x.innerText.trim() === 'Description');
          if (title) title.scrollIntoView(); })()""")
        description = browser.wait_for(("oracle", *names))
        browser.screenshot("mlflow-description.png")

        browser.goto(f"{base}/runs?compareRunsMode=CHART", (parent["name"], "Model metrics"))
        browser.click(_CLOSE_ASSISTANT)
        # show the first parent's child runs (charts plot the visible runs), then the test_accuracy chart
        browser.click("""document.querySelector('button[data-component-id*="runnamecellrenderer"]').click()""")
        browser.wait_for(("oracle", "baseline", "random"))
        browser.click("""(() => { const input = document.querySelector('input[placeholder="Search metric charts"]');
          const set = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
          set.call(input, 'test_accuracy'); input.dispatchEvent(new Event('input', {bubbles: true})); })()""")
        # charts below the fold are rendered lazily: scroll until the plain test_accuracy card exists
        for _ in range(12):
            if browser.click(_OPEN_TEST_ACCURACY_CHART):
                break
            browser.click(_SCROLL_CHARTS_DOWN)
        chart = browser.wait_for(("test_accuracy", "oracle", "random", "baseline", *names))
        browser.screenshot("mlflow-chart.png")
    finally:
        browser.close()
    (ARTIFACTS / "mlflow-description.txt").write_text(description)
    (ARTIFACTS / "mlflow-chart.txt").write_text(chart)
    return description, chart


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
    from cleanse.lock import pid_alive as _alive
    from ops.stack import Stack

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
        # per parent: one child per estimator (loss, tracin) and per reference (baseline, oracle, random)
        assert len(parents) == 2 and len(children) == 2 * (2 + 3), tracked
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
        for child in (c for c in children if c["parent"] == parent["id"] and "roc_auc" in c["metrics"]):
            child_page = page_text(f"{base}/runs/{child['id']}", f"mlflow-child-{child['name']}.png",
                                   expect=(child["name"], "roc_auc", "Parent run"))
            assert child["name"] in child_page and "roc_auc" in child_page, child_page[:3000]
            assert f"Parent run {parent['name']}" in child_page, child_page[:3000]
        table = page_text(f"{base}/runs?compareRunsMode=TABLE", "mlflow-runs-table.png",
                          expect=(parent["name"], "matching runs"))
        assert parent["name"] in table and f"{len(tracked['runs'])} matching runs" in table, table[:3000]

        # 5. the parent's description is the comparison table; estimators and references share a chart
        description, chart = mlflow_screenshots(urls["mlflow"], tracked["experiment_id"], parent, ["loss", "tracin"])
        for row in ("baseline (no removal)", "random removal", "oracle", "loss", "tracin"):
            assert row in description, description[:3000]
        legend = chart.split("test_accuracy")[-1]
        for name in ("loss", "tracin", "baseline", "oracle", "random"):
            assert name in legend, chart[-2000:]
    finally:
        pids = stack.pids()
        down = subprocess.run([str(BIN / "cleanse"), "stack", "down", "--dir", str(state_dir)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    assert pids and not [pid for pid in pids if _alive(pid)], "processes left behind after `cleanse stack down`"
    assert stack.pids() == []
    assert "FAIL" not in down.stdout

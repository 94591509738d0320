"""dvc.yaml end to end, in a throw-away git + DVC repository built from the working tree.

One ``dvc repro`` of the whole pipeline on a tiny problem (iris, logistic regression, every estimator
from params.yaml), then: a second ``dvc repro`` runs nothing, ``dvc metrics show`` reads
``reports/metrics.json``, and changing one estimator's option (``scorers.tracin.checkpoints``) reruns
exactly ``score@tracin``, ``detect@tracin``, ``retrain@tracin`` and ``report``.

The ``cleanse`` on PATH is this checkout's (editable install); ``src/`` is copied only because the
stages list source files as dependencies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

# a minute or more each: outside the default suite, run by .ci/run (pytest -m integration)
pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RUNNING = re.compile(r"Running stage '([^']+)'")

# Small enough that a stage costs little more than its imports.
SMALL = {
    ("data", "source"): "sklearn:iris",
    ("corruption", "fraction"): 0.2,
    ("model", "arch"): "logreg",
    ("model", "epochs"): 5,
    ("model", "batch_size"): 32,
    ("model", "lr"): 0.05,
    ("model", "checkpoints"): 2,
    ("scorers", "cleanlab", "folds"): 3,
    ("tracking", "enabled"): False,
}


def _small_params() -> dict[str, Any]:
    """The project's params.yaml (so new keys stay in step) with SMALL applied."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for path, value in SMALL.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return params


def _env(pycache: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "CLEANSE_DEVICE": "cpu",
        "GIT_AUTHOR_NAME": "cleanse-test", "GIT_AUTHOR_EMAIL": "test@cleanse.invalid",
        "GIT_COMMITTER_NAME": "cleanse-test", "GIT_COMMITTER_EMAIL": "test@cleanse.invalid",
    })
    if env.pop("PYTHONDONTWRITEBYTECODE", ""):
        # Every stage is a fresh `cleanse` process whose cost is mostly importing torch, sklearn and
        # scipy; without bytecode caching each one recompiles them (~2x slower). Cache the bytecode
        # outside the source trees instead, kept between test runs.
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


class Project:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env

    def run(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{output[-4000:]}"
        return output

    def dvc(self, *args: str, timeout: float = 300) -> str:
        return self.run(str(VENV_BIN / "dvc"), *args, timeout=timeout)

    def repro(self) -> tuple[list[str], str]:
        # about 30 stage processes, each importing torch: minutes on two busy cores
        output = self.dvc("repro", timeout=1200)
        return RUNNING.findall(output), output

    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, params: dict[str, Any]) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A git + DVC repository holding dvc.yaml, small params and src/, after one full ``dvc repro``."""
    if not (VENV_BIN / "dvc").exists() or not (VENV_BIN / "cleanse").exists():
        pytest.skip(f"dvc and cleanse must be installed beside {sys.executable}")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    pycache = cache.mkdir("cleanse-pycache") if cache is not None else tmp_path_factory.mktemp("pycache")
    root = tmp_path_factory.mktemp("dvc-project")
    shutil.copytree(REPO / "src", root / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    if (REPO / ".gitignore").is_file():
        shutil.copy2(REPO / ".gitignore", root / ".gitignore")
    project = Project(root, _env(Path(pycache)))
    project.write_params(_small_params())
    project.run("git", "init", "-q")
    project.run("git", "config", "user.name", "cleanse-test")
    project.run("git", "config", "user.email", "test@cleanse.invalid")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "project")
    project.dvc("init", "-q")
    project.dvc("config", "core.analytics", "false")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "dvc init")

    ran, output = project.repro()
    estimators = project.params()["estimators"]
    fan_out = {f"{stage}@{name}" for stage in ("score", "detect", "retrain") for name in estimators}
    assert set(ran) == {"source", "stage", "train", "query", "references", "recommend", "report"} | fan_out, output[-4000:]
    assert len(ran) == len(set(ran)), ran
    return project


def test_repro_writes_every_artifact(project: Project) -> None:
    root = project.root
    estimators = project.params()["estimators"]
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert sorted(metrics["estimators"]) == sorted(estimators)
    assert metrics["dataset"]["name"] == "iris" and metrics["dataset"]["n_corrupted"] > 0
    for name in estimators:
        for path in (f"scores/{name}.parquet", f"scores/{name}.meta.json", f"flags/{name}.parquet",
                     f"flags/{name}.meta.json", f"retrain/{name}.json", f"reports/pr/{name}.csv"):
            assert (root / path).is_file(), path
        # No probes in params.yaml: the train -> probe matrix is an output with zero rows.
        assert np.load(root / "scores" / f"{name}.pairwise.npy").shape == (0, metrics["dataset"]["n_train"])
    for path in ("data/staged/meta.json", "models/base/meta.json", "retrain/references.json",
                 "reports/report.html", "reports/comparison.md", "reports/pr_curves.png"):
        assert (root / path).is_file(), path
    # Every stage is locked; tracking was off, so no MLflow store appeared.
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert len(lock["stages"]) == 7 + 3 * len(estimators)
    # No probes in params.yaml: query/ records that, and holds no probe tables.
    assert json.loads((root / "query" / "query.json").read_text())["kind"] == "none"
    assert not (root / "query" / "probes.parquet").exists()
    assert not (root / "mlflow.db").exists()


def test_metrics_show(project: Project) -> None:
    shown = json.loads(project.dvc("metrics", "show", "--json"))
    data = next(iter(shown.values()))["data"]["reports/metrics.json"]["data"]
    assert sorted(data["estimators"]) == sorted(project.params()["estimators"])
    assert "test_accuracy" in data["baseline"]


def test_plots_show(project: Project) -> None:
    shown = json.loads(project.dvc("plots", "show", "--json", "--out", str(project.root / "dvc_plots")))
    assert not shown.get("errors"), shown.get("errors")
    for name in project.params()["estimators"]:
        (plot,) = shown["data"][f"reports/pr/{name}.csv"]
        rows = plot["content"]["data"]["values"]
        assert rows and {"recall", "precision"} <= set(rows[0])


def test_second_repro_runs_nothing(project: Project) -> None:
    # Only `source` (always run: it records the data file's content digest) runs, and changes nothing.
    ran, output = project.repro()
    assert ran == ["source"], output[-4000:]
    assert "Stage 'stage' didn't change, skipping" in output, output[-4000:]


def test_one_estimator_option_reruns_only_its_chain(project: Project) -> None:
    params = project.params()
    tracin = params["scorers"]["tracin"]
    tracin["checkpoints"] = new = "last" if tracin["checkpoints"] != "last" else "all"
    project.write_params(params)

    ran, output = project.repro()
    assert sorted(ran) == ["detect@tracin", "recommend", "report", "retrain@tracin", "score@tracin", "source"], output[-4000:]
    assert ran[-1] == "report"
    assert "didn't change, skipping" in output
    meta = json.loads((project.root / "scores" / "tracin.meta.json").read_text())
    assert meta["options"]["checkpoints"] == new
    ran, output = project.repro()
    assert ran == ["source"], output[-4000:]


def test_s3_remote_round_trip(project: Project, s3_server) -> None:
    """``dvc push`` to S3, delete the cache and every output, ``dvc pull``: the same bytes return.
    The keys go to ``.dvc/config.local`` (never committed)."""
    import hashlib
    import uuid

    env = s3_server.env()
    uncached = set()  # e.g. reports/metrics.json: kept in git, not in the DVC cache
    for stage in yaml.safe_load((project.root / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get("do", stage).get(kind, []):
                if isinstance(item, dict):
                    uncached |= {path for path, options in item.items() if (options or {}).get("cache") is False}
    outputs = {}
    for stage in yaml.safe_load((project.root / "dvc.lock").read_text())["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] in uncached:
                continue
            path = project.root / out["path"]
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            outputs |= {p.relative_to(project.root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in files}
    assert "scores/loss.parquet" in outputs and "models/base/model.safetensors" in outputs
    project.dvc("remote", "add", "-d", "store", f"s3://cleanse/dvc-{uuid.uuid4().hex[:8]}")
    project.dvc("remote", "modify", "store", "endpointurl", env["AWS_ENDPOINT_URL"])
    project.dvc("remote", "modify", "--local", "store", "access_key_id", env["AWS_ACCESS_KEY_ID"])
    project.dvc("remote", "modify", "--local", "store", "secret_access_key", env["AWS_SECRET_ACCESS_KEY"])
    assert env["AWS_SECRET_ACCESS_KEY"] not in (project.root / ".dvc" / "config").read_text()
    assert "config.local" in (project.root / ".dvc" / ".gitignore").read_text()
    project.dvc("push")

    shutil.rmtree(project.root / ".dvc" / "cache")
    for relative in outputs:
        (project.root / relative).unlink()
    project.dvc("pull")
    pulled = {relative: hashlib.md5((project.root / relative).read_bytes()).hexdigest() for relative in outputs}
    assert pulled == outputs

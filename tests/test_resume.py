"""Resume, staleness and concurrency on one ``--out``.

- A data file replaced at the same path reruns ``stage`` and everything after it (the stage
  fingerprint holds the file's content digest), under ``cleanse run`` and ``dvc repro`` (the
  ``source`` stage records the digest as DVC's dependency).
- Configurations that mean the same fingerprint the same (``hidden: [64]`` and the default).
- One writer per ``--out``: a second ``cleanse run`` is refused with one line naming the holder;
  the lock dies with its holder (``kill -9``) and a stale one is taken over.
- The kill -9 matrix on iris (``benchmarks/kill_matrix.py --quick``), marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cleanse import lock, pipeline
from cleanse.config import load_params
from cleanse.errors import ArtifactError, DataError
from cleanse.storage import Layout

REPO = Path(__file__).resolve().parents[1]
CLEANSE = [sys.executable, "-m", "cleanse.cli"]
TINY = ["model.arch=logreg", "model.epochs=5", "model.batch_size=32", "model.lr=0.05", "corruption.fraction=0.2",
        "estimators=[loss,tracin]", "tracking.enabled=false"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API", "CLEANSE_LOCK"))}
    env.update(OMP_NUM_THREADS="1", CLEANSE_DEVICE="cpu")
    return env


def _cleanse(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*CLEANSE, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _write_iris(path: Path, *, shift: float = 0.0, drop: int = 0) -> None:
    from sklearn.datasets import load_iris

    data = load_iris()
    features = data.data.astype(np.float32) + shift
    np.savez(path, X=features[drop:], y=data.target[drop:].astype(np.int64))


def _run_args(source: Path, out: Path) -> list[str]:
    args = ["run", "--out", str(out), "--set", f"data.source={source}"]
    for item in TINY:
        args += ["--set", item]
    return args


# ----------------------------------------------------------------------------- fingerprints


def test_equivalent_configurations_fingerprint_equal() -> None:
    default = load_params(None, [])
    explicit = load_params(None, ["model.hidden=[64]"])
    assert default.model.hidden is None and explicit.model.hidden == [64]
    for fingerprint in (pipeline.train_fingerprint, pipeline.references_fingerprint, pipeline.run_fingerprint):
        assert fingerprint(default) == fingerprint(explicit)
    assert pipeline.score_fingerprint(default, "influence") == pipeline.score_fingerprint(explicit, "influence")
    # ... and configurations that differ still differ.
    assert pipeline.train_fingerprint(load_params(None, ["model.hidden=[32]"])) != pipeline.train_fingerprint(default)
    # A logistic regression has no hidden layers, whatever `hidden` says; the CNN default is its own.
    logreg = [load_params(None, ["model.arch=logreg", f"model.hidden={h}"]) for h in ("[8]", "[64]", "null")]
    assert len({pipeline.train_fingerprint(p) for p in logreg}) == 1
    assert (pipeline.train_fingerprint(load_params(None, ["model.arch=cnn"]))
            == pipeline.train_fingerprint(load_params(None, ["model.arch=cnn", "model.hidden=[16,32]"])))
    # memorization's epochs: null means model.epochs.
    assert (pipeline.score_fingerprint(default, "memorization")
            == pipeline.score_fingerprint(load_params(None, ["scorers.memorization.epochs=30"]), "memorization"))


def test_content_digest_follows_the_bytes(tmp_path: Path) -> None:
    source = tmp_path / "d.npz"
    _write_iris(source)
    first = pipeline.content_digest(str(source))
    assert first is not None and first.startswith("sha256:")
    assert pipeline.content_digest(f"file://{source}") == first
    assert pipeline.content_digest("sklearn:iris") is None
    params = load_params(None, [f"data.source={source}"])
    stage_before = pipeline.stage_fingerprint(params)
    _write_iris(source, shift=0.5)  # same path, same size, other bytes
    assert pipeline.content_digest(str(source)) != first
    assert pipeline.stage_fingerprint(params) != stage_before
    # The same bytes rewritten (a new mtime, so the cache misses): the same digest.
    second, stage_second = pipeline.content_digest(str(source)), pipeline.stage_fingerprint(params)
    _write_iris(source, shift=0.5)
    os.utime(source, ns=(10**9, 10**9))
    assert pipeline.content_digest(str(source)) == second and pipeline.stage_fingerprint(params) == stage_second


def test_source_record_names_a_missing_file(tmp_path: Path) -> None:
    params = load_params(None, [f"data.source={tmp_path / 'nope.npz'}"])
    with pytest.raises(DataError, match="file not found"):
        pipeline.run_source(params, Layout.at(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing written, not even the lock's folder


def test_replaced_data_file_reruns_stage_and_after(tmp_path: Path) -> None:
    source, out = tmp_path / "data.npz", tmp_path / "out"
    _write_iris(source)
    first = _cleanse(*_run_args(source, out), cwd=tmp_path)
    assert "[done] stage" in first.stderr
    scores_before = pl.read_parquet(out / "scores" / "loss.parquet")
    meta_before = json.loads((out / "data" / "staged" / "meta.json").read_text())

    again = _cleanse(*_run_args(source, out), cwd=tmp_path)  # unchanged: everything resumes
    assert "[done]" not in again.stderr and "[skip] stage" in again.stderr

    _write_iris(source, shift=0.25, drop=15)  # replaced at the same path
    third = _cleanse(*_run_args(source, out), cwd=tmp_path)
    for label in ("stage", "train", "query", "score loss", "detect loss", "retrain loss", "score tracin",
                  "references"):
        assert f"[done] {label}" in third.stderr, (label, third.stderr[-2000:])
    assert "[skip]" not in third.stderr
    meta_after = json.loads((out / "data" / "staged" / "meta.json").read_text())
    assert meta_after["fingerprint"] != meta_before["fingerprint"]
    assert sum(meta_after["n"].values()) == sum(meta_before["n"].values()) - 15
    scores_after = pl.read_parquet(out / "scores" / "loss.parquet")
    assert scores_after.height != scores_before.height


# ----------------------------------------------------------------------------- the lock


def test_second_concurrent_run_is_refused(tmp_path: Path) -> None:
    source, out = tmp_path / "data.npz", tmp_path / "out"
    _write_iris(source)
    first = subprocess.Popen([*CLEANSE, *_run_args(source, out)], cwd=tmp_path, env=_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while lock.holder(out) is None and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could start"
    second = _cleanse(*_run_args(source, out), cwd=tmp_path, check=False)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 2, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out "), lines
    assert f"pid {first.pid} on {socket.gethostname()}, started 20" in lines[0]
    # The refused run wrote nothing; the first one's artifacts are complete, and its lock is gone.
    assert "Traceback" not in second.stderr
    assert not (out / lock.LOCK_NAME).exists()
    rerun = _cleanse(*_run_args(source, out), cwd=tmp_path)
    assert "[done]" not in rerun.stderr  # every stage fresh: nothing half-written to redo


HOLD = """
import sys, time
from cleanse import lock
lock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_lock_dies_with_its_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.OutputLockedError, match=f"pid {holder.pid} on "):
            lock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / lock.LOCK_NAME).exists()  # kill -9 left the file, but not the lock
    with lock.out_lock(tmp_path):
        assert lock.holder(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / lock.LOCK_NAME).exists()


ORPHAN = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": int(sys.argv[2]), "host": socket.gethostname(), "started": "then"}).encode())
print("held", flush=True)
time.sleep(120)
"""


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    """The flock is kept by an orphan (as a forked worker of a killed run would) while the recorded
    holder is dead: the next run takes the lock over."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = subprocess.Popen([sys.executable, "-c", ORPHAN, str(tmp_path / lock.LOCK_NAME), str(dead.pid)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout.readline().strip() == "held"
        with lock.out_lock(tmp_path, wait=0):
            assert lock.holder(tmp_path)["pid"] == os.getpid()
    finally:
        orphan.kill()
        orphan.wait()
    # A live recorded holder is not taken over.
    alive = subprocess.Popen([sys.executable, "-c", ORPHAN, str(tmp_path / lock.LOCK_NAME), str(os.getppid())],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert alive.stdout.readline().strip() == "held"
        with pytest.raises(lock.OutputLockedError, match=f"pid {os.getppid()} on"):
            lock.acquire(tmp_path, wait=0.3)
    finally:
        alive.kill()
        alive.wait()


CHILD = """
import sys
from cleanse import lock
try:
    lock.acquire(sys.argv[1])
except lock.OutputLockedError:
    print("refused")
else:
    print("inherited")
"""


def test_lock_is_reentrant_and_passes_to_child_processes(tmp_path: Path) -> None:
    with lock.out_lock(tmp_path):
        with lock.out_lock(tmp_path):  # a stage inside run_all, or a flow's task
            pass
        assert lock.holder(tmp_path)["pid"] == os.getpid()  # still held after the inner release
        inherited = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                                   env=os.environ.copy())
        assert inherited.stdout.strip() == "inherited", inherited.stderr
        stranger = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                                  env={k: v for k, v in os.environ.items() if k != "CLEANSE_OUT_LOCKS"})
        assert stranger.stdout.strip() == "refused", stranger.stderr
    # released: no entry for this root is passed to children any more
    assert str(lock.lock_path(tmp_path)) not in os.environ.get("CLEANSE_OUT_LOCKS", "")
    assert not (tmp_path / lock.LOCK_NAME).exists()


def test_lock_on_an_unusable_out_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="cannot create the lock file"):
        lock.acquire(blocker / "out")


# ----------------------------------------------------------------------------- kill -9 matrix


@pytest.mark.slow
def test_kill_matrix_quick(tmp_path: Path) -> None:
    """Two kills of the iris job at random moments, each rerun to completion: identical scores,
    flags and metrics, no temporary file, a readable MLflow store (~1.5 min on two cores)."""
    results = tmp_path / "km.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "kill_matrix.py"), "--quick", "--kills-cli", "2",
                    "--kills-flow", "0", "--seed", "3", "--results", str(results), "--work", str(tmp_path / "w")],
                   check=True, env=_env(), timeout=900, capture_output=True)
    report = json.loads(results.read_text())
    assert report["summary"]["done"] == 2 and report["summary"]["ok"] == 2, report["kills"]
    for kill in report["kills"]:
        assert kill["diff"]["compared"] >= 10 and not kill["diff"]["differ"] and not kill["temp_left"]
        assert kill["mlflow"]["readable"] and kill["mlflow"]["runs"] >= 1


# ----------------------------------------------------------------------------- dvc repro


@pytest.mark.slow
def test_dvc_repro_reruns_stage_when_the_data_file_is_replaced(tmp_path: Path) -> None:
    """``dvc repro`` with ``data.source`` a local file: replacing the file reruns ``stage`` and
    everything after it; an unchanged file reruns nothing but the (always run) ``source`` record.
    Slow: three repros of nine stages, each a fresh process (~1.5 min quiet, 4.5 min loaded)."""
    import shutil

    from tests.test_dvc import VENV_BIN, Project, _env as dvc_env, _small_params

    if not (VENV_BIN / "dvc").exists():
        pytest.skip(f"dvc must be installed beside {sys.executable}")
    root = tmp_path / "project"
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    project = Project(root, dvc_env(tmp_path / "pycache"))
    params = _small_params()
    params["estimators"] = ["loss"]
    params["data"]["source"] = "inputs/iris.npz"
    (root / "inputs").mkdir()
    _write_iris(root / "inputs" / "iris.npz")
    project.write_params(params)
    for args in (("git", "init", "-q"), ("git", "add", "-A"), ("git", "commit", "-q", "-m", "project")):
        project.run(*args)
    project.dvc("init", "-q")

    ran, output = project.repro()
    chain = {"stage", "train", "query", "score@loss", "detect@loss", "retrain@loss", "references", "report"}
    assert set(ran) == chain | {"source"}, output[-3000:]
    before = pl.read_parquet(root / "scores" / "loss.parquet")
    ran, output = project.repro()
    assert ran == ["source"], output[-3000:]

    _write_iris(root / "inputs" / "iris.npz", shift=0.25, drop=15)  # replaced at the same path
    ran, output = project.repro()
    assert set(ran) == chain | {"source"}, output[-3000:]
    after = pl.read_parquet(root / "scores" / "loss.parquet")
    assert after.height != before.height
    record = json.loads((root / "data" / "source.json").read_text())
    assert record["digest"] == pipeline.content_digest(str(root / "inputs" / "iris.npz"))


def test_a_fresh_lock_holder_sweeps_killed_writers_temporaries(tmp_path: Path) -> None:
    from cleanse.storage import write_json

    left = [tmp_path / "scores" / ".loss.parquet.k3j2h1g0.tmp", tmp_path / "models" / "base" / ".model.safetensors.ab12cd34.tmp"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    keep = [tmp_path / "scores" / "loss.parquet", tmp_path / "notes.tmp", tmp_path / ".editor.tmp"]
    for path in keep:
        path.write_bytes(b"x")
    with lock.out_lock(tmp_path):
        assert not any(path.exists() for path in left)
        write_json({"a": 1}, tmp_path / "scores" / "x.json")  # its own temporaries are renamed away
    assert all(path.exists() for path in keep)  # outside the artifact folders, or not a temporary
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["loss.parquet", "x.json"]


def test_flow_run_is_refused_while_another_run_holds_the_out(tmp_path: Path) -> None:
    """``cleanse run --prefect`` takes the same lock (for the whole flow) before Prefect starts."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = _cleanse("run", "--prefect", "--out", str(out), "--set", "data.source=sklearn:iris",
                           "--set", "tracking.enabled=false", cwd=tmp_path, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert f"is in use by pid {holder.pid} on {socket.gethostname()}" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == [lock.LOCK_NAME]  # nothing written beside the lock


def test_s3_source_digest_follows_the_object(s3_env, tmp_path: Path) -> None:
    """An s3:// data source is fingerprinted by its ETag: replacing the object makes ``stage`` stale."""
    from cleanse import remote

    local = tmp_path / "iris.npz"
    _write_iris(local)
    uri = "s3://cleanse/resume-test/iris.npz"
    bucket, key = remote.split_uri(uri)
    remote.client().upload_file(str(local), bucket, key)
    params = load_params(None, [f"data.source={uri}"])
    first, stage_first = pipeline.content_digest(uri), pipeline.stage_fingerprint(params)
    assert first is not None and first.startswith("etag:")
    assert pipeline.content_digest(uri) == first  # stable while the object is unchanged
    _write_iris(local, shift=0.5)
    remote.client().upload_file(str(local), bucket, key)
    assert pipeline.content_digest(uri) != first
    assert pipeline.stage_fingerprint(params) != stage_first
    with pytest.raises(ArtifactError, match="data.source"):
        pipeline.content_digest("s3://cleanse/resume-test/missing.npz")

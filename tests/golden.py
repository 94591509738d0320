"""Golden fingerprints of two complete ``cleanse run`` outputs, so that a refactor can be proven
output-identical.

The two runs (:data:`RUNS`), each a real ``cleanse run --fresh`` in a subprocess with one BLAS/OpenMP
thread (thread count changes floating-point summation order), from an empty working directory (so
no ``params.yaml`` is picked up: the embedded defaults of :mod:`cleanse.config` apply):

- ``default``: the README's first command, the embedded defaults at full size (scikit-learn digits,
  10% symmetric label flips, the MLP, every default estimator and stage), with MLflow tracking off
  (tracking only logs; it changes no output);
- ``backdoor``: digits with 5% backdoor poisons, ``query.kind: triggered`` (8 triggered probes,
  which also switch ``cleansing.iterative`` on), estimators ``loss`` (retrained once),
  ``influence`` and ``tracin`` (cleansed iteratively with their train -> probe scores). Reduced to
  stay small: 15 training epochs instead of 30 and ``cleansing.step`` 20 instead of 12 (fewer
  retraining rounds); every stage still runs.

What is fingerprinted, per run: every ``scores/<estimator>.parquet`` (its decoded columns: name,
dtype and the values' bytes, in file order, so parquet writer metadata cannot matter), every
``scores/<estimator>.pairwise.npy`` (shape, dtype, bytes) and ``reports/metrics.json`` after
:func:`canonical_metrics`, the one documented canonicalisation: keys named ``seconds`` or ending in
``_seconds`` (wall-clock durations: a stage's, a cleansing round's retraining and scoring) are dropped, and the output directory's absolute path is replaced by ``<out>``. Everything
else must be byte-identical.

Floating-point results differ between CPU instruction sets and torch builds, so hashes and score
vectors are recorded per platform (:func:`platform_key`: torch version, torch's CPU capability, the
machine), each platform with its own ``<run>.<platform slug>.npz`` (float32 ``score`` of every
estimator, in sample-id order). On a recorded platform every output must hash identically and the
vectors match that platform's. On a platform not recorded, the vectors are compared with those of
every recorded platform by rank: the same top-k flagged ids (k = the number of corrupted training
samples) and a Spearman correlation of at least 0.999 per estimator. Values are not compared there,
because an estimator that retrains models (cleanlab's cross-validation folds) carries a last-bit
difference through SGD into differences of a few percent (measured: AVX-512 against AVX2, 0.075 of
the largest cleanlab score, Spearman 0.9994, same top 108).

Re-record, from a clean ``git worktree`` of the commit::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m tests.golden record        # outputs changed on purpose: drops the other platforms
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m tests.golden add-platform  # same code, a new platform: keeps the others
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
FINGERPRINTS = GOLDEN_DIR / "fingerprints.json"

RUNS: dict[str, list[str]] = {
    "default": ["tracking.enabled=false"],
    "backdoor": ["tracking.enabled=false", "corruption.kind=backdoor", "corruption.fraction=0.05",
                 "query.kind=triggered", "estimators=[loss,influence,tracin]", "model.epochs=15",
                 "cleansing.step=20"],
}


def is_volatile(key: str) -> bool:
    """Whether a metrics.json key holds a wall-clock duration (dropped at every depth)."""
    return key == "seconds" or key.endswith("_seconds")


def platform_key() -> str:
    """Where bit-identical floating point can be expected: torch version, CPU capability, machine."""
    import torch

    return f"torch={torch.__version__};cpu={torch.backends.cpu.get_cpu_capability()};machine={platform.machine()}"


def run_pipeline(name: str, out: Path) -> Path:
    """``cleanse run --fresh`` of run ``name`` into ``out``, single-threaded, with no params.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "CLEANSE_DEVICE": "cpu", "PYTHONHASHSEED": "0"}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):  # no server: the plain in-process path
        env.pop(key, None)
    command = [sys.executable, "-m", "cleanse.cli", "run", "--fresh", "--out", str(out / "run")]
    for override in RUNS[name]:
        command += ["--set", override]
    done = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"golden run {name!r} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return out / "run"


def canonical_metrics(metrics: Any, root: str) -> Any:
    """``metrics.json`` without what varies between runs of the same code: wall-clock keys
    (:func:`is_volatile`) are dropped, the run directory ``root`` in strings becomes ``<out>``."""
    if isinstance(metrics, dict):
        return {key: canonical_metrics(value, root) for key, value in metrics.items() if not is_volatile(key)}
    if isinstance(metrics, list):
        return [canonical_metrics(value, root) for value in metrics]
    if isinstance(metrics, str):
        return metrics.replace(root, "<out>")
    return metrics


def _sha(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def table_hash(path: Path) -> str:
    """SHA-256 of a parquet file's decoded columns (name, dtype, values), not of its bytes."""
    import polars as pl

    frame = pl.read_parquet(path)
    parts: list[bytes] = []
    for column in frame.columns:
        values = np.ascontiguousarray(frame[column].to_numpy())
        parts += [column.encode(), str(values.dtype).encode(), values.tobytes()]
    return _sha(*parts)


def array_hash(path: Path) -> str:
    values = np.load(path, allow_pickle=False)
    return _sha(str(values.shape).encode(), str(values.dtype).encode(), np.ascontiguousarray(values).tobytes())


def fingerprint(run: Path) -> dict[str, Any]:
    """Hashes of one run's score tables, train -> probe matrices and canonical metrics.json."""
    hashes = {f"scores/{path.name}": table_hash(path) for path in sorted((run / "scores").glob("*.parquet"))}
    hashes |= {f"scores/{path.name}": array_hash(path) for path in sorted((run / "scores").glob("*.pairwise.npy"))}
    metrics = json.loads((run / "reports" / "metrics.json").read_text(encoding="utf-8"))
    canonical = json.dumps(canonical_metrics(metrics, str(run.resolve())), sort_keys=True).encode()
    hashes["reports/metrics.json"] = _sha(canonical)
    return hashes


def score_vectors(run: Path) -> dict[str, np.ndarray]:
    """``{estimator: score}`` (float32, by ascending sample id) and ``_sample_id`` of one run."""
    import polars as pl

    vectors: dict[str, np.ndarray] = {}
    for path in sorted((run / "scores").glob("*.parquet")):
        frame = pl.read_parquet(path).sort("sample_id")
        vectors["_sample_id"] = frame["sample_id"].to_numpy().astype(np.int64)
        vectors[path.stem] = frame["score"].to_numpy().astype(np.float32)
    return vectors


def top_k(sample_id: np.ndarray, score: np.ndarray, k: int) -> set[int]:
    """The ``k`` highest-scoring ids (ties by ascending id, as :func:`cleanse.detect.flag`)."""
    order = np.lexsort((sample_id, -score.astype(np.float64)))
    return {int(i) for i in sample_id[order[:k]]}


def produce(names: list[str], workdir: Path) -> dict[str, Path]:
    """Run the named golden runs side by side (one thread each) under ``workdir``."""
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = {name: pool.submit(run_pipeline, name, workdir / name) for name in names}
        return {name: future.result() for name, future in futures.items()}


def platform_slug(key: str) -> str:
    """A file-name form of :func:`platform_key` (``torch-2.13.0-cpu-cpu-avx2-machine-x86_64``)."""
    return re.sub(r"[^a-z0-9.]+", "-", key.lower()).strip("-")


def vectors_path(name: str, key: str) -> Path:
    return GOLDEN_DIR / f"{name}.{platform_slug(key)}.npz"


def record(keep_other_platforms: bool) -> None:
    """Run both golden runs and record this platform's hashes and ``<run>.<slug>.npz`` vectors.

    ``keep_other_platforms``: the code's outputs did not change, only a platform is added; the run
    definitions must then be the recorded ones. Otherwise every other platform's record is dropped
    (its files deleted), since it no longer describes the code."""
    GOLDEN_DIR.mkdir(exist_ok=True)
    key = platform_key()
    old = json.loads(FINGERPRINTS.read_text(encoding="utf-8")) if FINGERPRINTS.exists() else None
    with tempfile.TemporaryDirectory(prefix="cleanse-golden-") as tmp:
        runs = produce(list(RUNS), Path(tmp))
        golden: dict[str, Any] = {"runs": {}, "platforms": {key: {}}}
        for name, run in runs.items():
            metrics = json.loads((run / "reports" / "metrics.json").read_text(encoding="utf-8"))
            golden["runs"][name] = {"overrides": RUNS[name], "n_corrupted": metrics["dataset"]["n_corrupted"]}
            golden["platforms"][key][name] = fingerprint(run)
            np.savez_compressed(vectors_path(name, key), **score_vectors(run))
    if keep_other_platforms and old is not None:
        if old["runs"] != golden["runs"]:
            sys.exit("the runs' definitions or corruption counts changed: use `record`, not `add-platform`")
        golden["platforms"] = {**old["platforms"], key: golden["platforms"][key]}
    else:
        for stale in GOLDEN_DIR.glob("*.npz"):
            if not any(stale == vectors_path(name, key) for name in RUNS):
                stale.unlink()
    FINGERPRINTS.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"recorded {FINGERPRINTS} on {key} (platforms: {sorted(golden['platforms'])})")


if __name__ == "__main__":
    if sys.argv[1:] not in (["record"], ["add-platform"]):
        sys.exit("usage: python -m tests.golden record | add-platform")
    record(keep_other_platforms=sys.argv[1] == "add-platform")

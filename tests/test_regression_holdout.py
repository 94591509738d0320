"""A copy of ``examples/regression.yaml`` with the keys a user changes first (seed, split sizes,
model size, a float-target file of their own instead of diabetes, the corruption's fraction and
scale) still runs end to end, and ``reports/metrics.json`` carries every key the family promises,
finite, with a detector well above chance.

The data are synthetic so that the ground truth is known: ``y = x w + 0.5 sin(2 x_0) + noise``,
shifted and scaled far from zero (the family z-scores the target with training statistics), with
``corruption.fraction`` of the training targets moved by ``corruption.scale`` standard deviations.
A ranking by chance has average precision equal to the corruption fraction.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "regression.yaml"
ESTIMATORS = ("loss", "influence", "influence_val", "tracin", "trak")


def _synthetic(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=d)
    y = x @ w + 0.5 * np.sin(2 * x[:, 0]) + 0.2 * rng.normal(size=n)
    return x, 250.0 + 40.0 * y  # far from zero mean and unit scale


def _write_source(kind: str, folder: Path) -> dict:
    """The source file and the ``data`` keys that point at it."""
    if kind == "npz":
        x, y = _synthetic(300, 6, seed=11)
        np.savez(folder / "train.npz", X=x, y=y)
        return {"source": str(folder / "train.npz")}
    x, y = _synthetic(520, 8, seed=12)
    table = pl.DataFrame({f"f{i}": x[:, i] for i in range(x.shape[1])}).with_columns(
        pl.Series("target", y), pl.Series("row", np.arange(1000, 1000 + len(y))))
    table.write_parquet(folder / "train.parquet")
    return {"source": str(folder / "train.parquet"), "label_column": "target", "id_column": "row",
            "features": [f"f{i}" for i in range(x.shape[1])]}


# (source kind, seed, val/test fractions, hidden, epochs, corruption fraction, scale, MLflow tracking)
VARIANTS = {
    "npz-small": ("npz", 5, 0.2, 0.2, [16], 30, 0.15, 5.0, False),
    "parquet-larger": ("parquet", 3, 0.1, 0.2, [48], 40, 0.08, 3.0, True),  # tracking as in the example
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_changed_copy_of_the_regression_example_reports_every_metric(tmp_path, variant):
    kind, seed, val_fraction, test_fraction, hidden, epochs, fraction, scale, tracking = VARIANTS[variant]
    params = yaml.safe_load(EXAMPLE.read_text())
    assert params["family"] == "regression" and list(params["estimators"]) == list(ESTIMATORS)
    params["seed"] = seed
    params["data"].update(_write_source(kind, tmp_path), val_fraction=val_fraction, test_fraction=test_fraction)
    params["corruption"].update(fraction=fraction, scale=scale)
    params["model"].update(hidden=hidden, epochs=epochs)
    params["tracking"]["enabled"] = tracking  # the store is <out>/mlflow.db unless MLFLOW_TRACKING_URI is set
    copy = tmp_path / "params.yaml"
    copy.write_text(yaml.safe_dump(params))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CLEANSE_DEVICE": "cpu"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "cleanse.cli", "run", "--params", str(copy), "--out",
                           str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "reports" / "metrics.json").read_text())

    def finite(value) -> bool:
        return isinstance(value, (int, float)) and math.isfinite(value)

    for reference in ("baseline", "oracle", "random"):
        assert finite(metrics[reference]["test_rmse"]) and metrics[reference]["test_rmse"] > 0, reference
    assert set(metrics["estimators"]) == set(ESTIMATORS)
    precision = {}
    for name in ESTIMATORS:
        entry = metrics["estimators"][name]
        assert finite(entry["retrain"]["test_rmse"]), (name, entry["retrain"])
        detection = entry["detection"]
        for key in ("roc_auc", "average_precision", "precision_at_k", "recall_at_k"):
            assert finite(detection[key]) and 0 <= detection[key] <= 1, (name, key, detection)
        precision[name] = detection["average_precision"]
    n_train, n_corrupted = metrics["dataset"]["n_train"], metrics["dataset"]["n_corrupted"]
    assert n_corrupted == max(1, round(fraction * n_train))
    # chance is the corruption fraction; shifts of 3-5 sd stand out to the best detector
    assert max(precision.values()) > max(0.6, 4 * fraction), precision
    recommended = metrics["recommended"]
    assert recommended["estimator"] in (*ESTIMATORS, "none")
    assert finite(recommended["retrain"]["test_rmse"])
    assert "test_accuracy" not in json.dumps(metrics)
    assert (tmp_path / "run" / "mlflow.db").is_file() == tracking

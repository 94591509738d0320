"""Bad input: a clear error naming the problem, exit status 2, and no partial artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cleanse.cli import app

FAST = ["--set", "tracking.enabled=false", "--set", "model.epochs=2", "--set", "estimators=[loss]"]


def _run(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def _files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def _npz(tmp_path: Path, features: np.ndarray, labels: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, X=features, y=labels)
    return path


def _features(n: int = 60) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp: ["--set", "estimators=[loss,shapley]"], "unknown estimator 'shapley'; allowed: loss, cleanlab"),
        (lambda tmp: ["--set", "data.source=sklearn:mnist"], "unknown source 'sklearn:mnist'; allowed: sklearn:digits"),
        (lambda tmp: ["--set", "data.source=imagenet"], "unknown source 'imagenet'"),
        (lambda tmp: ["--set", f"data.source={tmp}/missing.parquet"], "file not found"),
        (lambda tmp: ["--set", f"data.source={_npz(tmp, _features(), np.repeat([0, 1, -1], 20))}"], "labels out of range"),
        (lambda tmp: ["--set", f"data.source={_npz(tmp, _features(), np.repeat([0, 1, 3], 20))}"], "labels out of range"),
        (lambda tmp: ["--set", f"data.source={_npz(tmp, np.where(np.arange(240).reshape(60, 4) == 13, np.nan, _features()), np.repeat([0, 1, 2], 20))}"], "NaN"),
        (lambda tmp: ["--set", "corruption.fraction=1.5"], "corruption.fraction: must lie in (0, 1)"),
        (lambda tmp: ["--set", "corruption.fraction=0"], "corruption.fraction: must lie in (0, 1)"),
        (lambda tmp: ["--set", "data.val_fraction=-0.1"], "data.val_fraction: must lie in (0, 1)"),
        (lambda tmp: ["--set", "corruption.kind=flip"], "corruption.kind: 'flip' is not one of 'none', 'label_flip' or 'backdoor'"),
        (lambda tmp: ["--set", "model.arch=cnn", "--set", "data.source=sklearn:wine"], "'cnn' needs image data"),
        (lambda tmp: ["--set", "model.epochs=many"], "model.epochs"),
        (lambda tmp: ["--set", "detect.budget=all"], "detect.budget: 'all' is not one of 'auto', 'fraction' or 'count'"),
        (lambda tmp: ["--set", "no_such_section.key=1"], "no_such_section: unknown key"),
        (lambda tmp: ["--params", str(tmp / "nope.yaml")], "params file not found"),
    ],
    ids=["unknown-estimator", "unknown-builtin", "unknown-source", "missing-file", "negative-label", "label-gap",
         "nan-features", "fraction-above-1", "fraction-zero", "negative-val-fraction", "unknown-corruption",
         "cnn-on-tabular", "non-integer", "unknown-budget", "unknown-key", "missing-params"],
)
def test_bad_input_is_named_and_leaves_nothing(tmp_path, make_args, message):
    out = tmp_path / "out"
    result = _run(["run", *FAST, *make_args(tmp_path), "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.output
    assert _files(out) == []


def test_out_that_is_a_file(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    result = _run(["run", *FAST, "--out", str(target)])
    assert result.exit_code == 2
    assert "exists and is not a directory" in result.output
    assert target.read_text() == "keep me"


def test_stage_before_its_inputs_names_the_missing_artifact(tmp_path):
    result = _run(["score", "--estimator", "loss", *FAST, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "missing staged data" in result.output


def test_unknown_estimator_in_a_stage_command(tmp_path):
    result = _run(["score", "--estimator", "nope", *FAST, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown estimator 'nope'" in result.output


def test_stale_upstream_is_refused(tmp_path):
    assert _run(["stage", *FAST, "--out", str(tmp_path)]).exit_code == 0
    assert _run(["train", *FAST, "--out", str(tmp_path)]).exit_code == 0
    result = _run(["score", "-e", "loss", *FAST, "--set", "model.epochs=3", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "another configuration" in result.output


def test_a_failed_write_keeps_the_previous_artifact(tmp_path):
    from cleanse.storage import atomic_path, write_json

    target = write_json({"version": 1}, tmp_path / "a.json")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"version": 2, "half')
        raise RuntimeError("killed mid-write")
    assert target.read_text().strip().endswith("}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]

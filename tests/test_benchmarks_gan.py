"""Smoke test of benchmarks/gan.py: every part (accuracy against replay, cleansing verified by replay
and from scratch, planted outliers, cost) on tiny sizes, end to end, and its docs section."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

# a minute or more: outside the default suite, run by .ci/run (pytest -m integration)
pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gan.py"


def test_smoke_run_measures_every_part_and_renders_its_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- speed:start -->\nkeep me\n<!-- speed:end -->\n")
    out = tmp_path / "gan.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--seeds", "2", "--planted-seeds", "1", "--targets", "20",
               "--window-targets-digits", "8", "--windows", "1,2", "--cache", str(tmp_path / "cache"),
               "--out", str(out), "--docs", str(docs)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert not [r for r in data["runs"] if "error" in r]
    summary = data["summary"]
    cells = {(row["cell"], row["window"]) for row in summary["accuracy"]}
    assert cells == {("gaussian2d", 1), ("gaussian2d", 2), ("digits", 1), ("digits", 2), ("gaussian2d_paper", 1)}
    for row in summary["accuracy"]:
        assert -1 <= row["agreement"]["itd"]["kendall_tau"] <= 1 and 0 <= row["agreement"]["itd"]["jaccard_top10"] <= 1
        assert row["itd_over_traced"] > 0 and row["replay_all_over_itd"] > 0
    # the exact ITD is the replay's derivative: on a tiny float64 2-D GAN it must rank the removals well
    small = next(r for r in summary["accuracy"] if r["cell"] == "gaussian2d_paper")
    assert small["agreement"]["itd"]["kendall_tau"] > 0.6
    # ITD with the exact adjoint is the replay's derivative: against a small-mask replay it ranks (almost) exactly
    assert summary["linearity"][0]["itd_vs_derivative"]["kendall_tau"] > 0.95
    clean = summary["cleansing"]["cleansing/gaussian2d"]
    rows = {(r["method"], r["k"], r["verify"]) for r in clean["cells"]}
    assert {("influence", 0.01, "replay"), ("isolation_forest", 0.2, "replay"), ("dloss", 0.05, "scratch")} <= rows
    assert all(math.isfinite(r["mean"]) for r in clean["cells"])
    planted = summary["cleansing"]["planted/digits"]
    assert set(planted["average_precision"]) == {"influence", "random", "dloss", "isolation_forest"}
    assert any(r["method"] == "oracle" for r in planted["cells"])
    text = docs.read_text()
    assert "keep me" in text and "<!-- gan:start -->" in text and "GAN data cleansing" in text
    assert (tmp_path / "img" / "gan.png").stat().st_size > 1000

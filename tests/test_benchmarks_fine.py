"""Smoke test of benchmarks/fine.py: a tiny ground truth and every single-run variant end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# a minute or more each: outside the default suite, run by .ci/run (pytest -m integration)
pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "fine.py"


def test_smoke_run_measures_and_renders_its_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- speed:start -->\nkeep me\n<!-- speed:end -->\n")
    out = tmp_path / "fine.json"
    command = [sys.executable, str(SCRIPT), "--models", "logreg", "--models-per-arm", "3", "--seeds", "2",
               "--out", str(out), "--docs", str(docs)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model = json.loads(out.read_text())["models"][0]
    assert len(model["units"]) == 40 and {u["kind"] for u in model["units"]} == {
        "flipped", "atypical", "ordinary", "group of 10 flipped"}
    for variant in model["variants"].values():
        assert len(variant["mu_hat"]) == 40 and -1 <= variant["spearman"] <= 1 and variant["cost_ratio"] > 0
    assert set(model["stability"]) == {"fine", "influence", "tracin", "trak"}
    text = docs.read_text()
    assert "keep me" in text and "<!-- fine:start -->" in text and "Spearman vs truth" in text
    assert (tmp_path / "img" / "fine.png").stat().st_size > 1000

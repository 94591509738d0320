"""Smoke test of benchmarks/influence.py: the tiny grid end to end, so the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# a minute or more each: outside the default suite, run by .ci/run (pytest -m integration)
pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "influence.py"


def test_smoke_grid_writes_every_section(tmp_path):
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\n## Speed\n\nwritten by another script; keep me\n")
    out = tmp_path / "influence.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--grid", "smoke", "--peers", "none", "--threads", "1",
                             "--out", str(out), "--docs", str(docs)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    for row in data["cg"]["rows"].values():
        assert 0 <= row["roc_auc"] <= 1 and row["seconds"] >= 0
    assert data["loo"]["rows"]["exact"]["pearson"] > 0.5  # 8 points on wine; the real LOO bars are in test_influence_solvers
    for block in data["lds"].values():
        assert any(label.startswith("cleanse TRAK") for label in block["rows"])
        assert all(-1 <= row["lds"] <= 1 for row in block["rows"].values() if row.get("lds") is not None)
    assert {"VM", "FVM (SAM)", "influence (self, train curvature)"} <= set(data["fvm"][0]["rows"])
    from cleanse.estimators import registry

    assert set(data["stability"]["rows"]) == set(registry.names_for("classification"))
    text = docs.read_text()
    assert "keep me" in text and text.count("<!-- influence:start -->") == 1
    assert "### Linear datamodeling score" in text and "### Rank stability" in text

"""Smoke run of ``benchmarks/memorization.py`` on its tiny grid, so the script cannot rot: the JSON
has the documented structure, the batched and sequential models agree, and only the script's own
section of the docs file is rewritten."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# a minute or more each: outside the default suite, run by .ci/run (pytest -m integration)
pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
FOREIGN = "<!-- speed:start -->\n## Speed\n\nowned by another script\n<!-- speed:end -->"


def test_memorization_benchmark_smoke(tmp_path: Path) -> None:
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\n" + FOREIGN + "\n")
    out = tmp_path / "memorization.json"
    process = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memorization.py"), "--grid", "smoke",
                              "--out", str(out), "--docs", str(docs)], cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    result = json.loads(out.read_text())
    speed, quality = result["speed"], result["quality"]
    assert result["benchmark"] == "memorization" and result["grid"] == "smoke"
    assert speed["batched_s"] > 0 and speed["speedup"] > 0 and speed["max_abs_param_difference"] < 1e-4
    for statistic in ("accuracy", "probability"):
        assert 0 <= quality[statistic]["roc_auc"] <= 1 and quality[statistic]["se"]["mean_se"]
    assert len(quality["planted"]["rank_of_copy"]) == quality["planted"]["count"]
    text = docs.read_text()
    assert FOREIGN in text and "<!-- memorization:start -->" in text and "### Targets" in text
    assert (tmp_path / "docs" / "img" / "memorization.png").is_file()

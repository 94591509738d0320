"""Smoke test of benchmarks/lm.py: a tiny base and data, one seed end to end (every re-fine-tune at two
training seeds) and two stability runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# minutes: outside the default suite, run by .ci/run (pytest -m integration)
pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "lm.py"


def test_smoke_run_measures_and_renders_its_section(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- speed:start -->\nkeep me\n<!-- speed:end -->\n")
    out = tmp_path / "lm.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--seeds", "0", "--stability-runs", "2", "--retrain-seeds", "2",
               "--out", str(out),
               "--docs", str(docs), "--work", str(tmp_path / "work")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads(out.read_text())
    row = saved["runs"][0]
    assert row["planted"] == 3 and 0 <= row["oracle"] <= 1 and 0 <= row["baseline"] <= 1
    # every re-fine-tune at 2 training seeds: steer_rate is their mean, judged against the oracle's interval
    oracle = row["oracle_over_seeds"]
    assert row["retrain_seeds"] == 2 and len(oracle["values"]) == 2 and row["oracle_interval"] == oracle["interval"]
    assert row["oracle"] == pytest.approx(sum(oracle["values"]) / 2)
    for name in ("loss", "tracin", "trak", "fine"):
        entry = row["estimators"][name]
        assert 0 <= entry["average_precision"] <= 1 and 0 <= entry["steer_rate"] <= 1 and entry["seconds"] > 0
        assert entry["steer_rate"] == pytest.approx(sum(entry["steer_rate_over_seeds"]["values"]) / 2)
        assert entry["must_show"] == (entry["n_flagged"] <= 4.5 and entry["steer_rate"] <= oracle["interval"][1])
        fixed = entry["fixed_budget"]  # the top floor(1.5 x 3) = 4 removed and re-fine-tuned
        assert fixed["count"] == 4 and 0 <= fixed["hits"] <= 3 and 0 <= fixed["steer_rate"] <= 1
    assert row["estimators"]["fine"]["cost_ratio"] > 0
    agreement = saved["stability"]["agreement"]
    assert set(agreement) == {"tracin", "trak", "fine"}
    assert all(0 <= a["top_k_jaccard"] <= 1 and 0 <= a["auto_jaccard"] <= 1 for a in agreement.values())
    assert all(0 <= r["ordinary_flag_rate"] <= 1 for r in saved["stability"]["fine_val"])
    text = docs.read_text()
    assert "keep me" in text and "<!-- lm:start -->" in text and "steer_rate" in text
    assert (tmp_path / "img" / "lm.png").stat().st_size > 1000

"""Smoke test of benchmarks/backdoor.py: the tiny grid end to end (one seed), so the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# a minute or more each: outside the default suite, run by .ci/run (pytest -m integration)
pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "backdoor.py"


def test_smoke_grid_measures_and_renders_its_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- speed:start -->\nkeep me\n<!-- speed:end -->\n")
    out = tmp_path / "backdoor.json"
    cache = tmp_path / "jobs.jsonl"
    command = [sys.executable, str(SCRIPT), "--grid", "smoke", "--seeds", "0", "--jobs", "0", "--out", str(out),
               "--docs", str(docs), "--cache", str(cache)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    backdoor = next(row for row in data["summary"] if row["cell"] == "wine/backdoor5/logreg")
    # Probes find what self-influence cannot, and cleansing lowers the attack success rate.
    assert backdoor["ap"]["tracin (triggered probes)"] > backdoor["ap"]["tracin (self)"] + 0.3
    assert backdoor["asr_after"] < backdoor["asr_before"]
    rounds = data["backdoor_jobs"][0]["cleansing"]["rounds"]
    assert rounds[0]["n_removed"] == 0 and len(rounds) >= 2
    noise = next(row for row in data["summary"] if row["cell"] == "wine/sym20/logreg")
    assert set(noise["ap"]) == {f"{name} ({kind})" for name in ("tracin", "influence", "fine")
                                for kind in ("self", "val_errors")}
    text = docs.read_text()
    assert "keep me" in text and "<!-- backdoor:start -->" in text and "wine/backdoor5/logreg" in text
    assert (tmp_path / "img" / "backdoor.png").stat().st_size > 1000
    # A rerun with the cache computes nothing and publishes the same numbers.
    again = subprocess.run([*command, "--cached-only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(out.read_text())["summary"] == data["summary"]


def _fake_job(seed: int, n_removed: int, k: int = 10) -> dict:
    detectors = {"tracin (triggered probes)": {"average_precision": 0.9, "roc_auc": 0.95}}
    outcome = {"attack_success_rate": 0.0, "test_accuracy": 0.9}
    return {"cell": "fake/backdoor5/mlp", "seed": seed, "n_train": 200, "k": k, "step": 2, "base": outcome,
            "detectors": detectors, "oracle": outcome,
            "cleansing": {"stopped": "behaviour_gone", "rounds": [{}, {}], "n_removed": n_removed,
                          "n_corrupted_removed": k, **outcome}}


def test_removal_budget_is_checked_per_seed_not_on_the_mean():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from backdoor import summarise

    # Mean removal 14 <= 15 = 1.5 x 10 poisons, but seed 2 removed 22: the cell misses the budget.
    row = summarise([_fake_job(0, 10), _fake_job(1, 10), _fake_job(2, 22)])[0]
    assert row["removed"] == 14.0
    assert row["removed_per_seed"] == [10, 10, 22]
    assert row["budget_seeds"] == 2 and row["budget_met"] is False
    # Exactly 1.5 x k is within the budget.
    row = summarise([_fake_job(0, 15), _fake_job(1, 11)])[0]
    assert row["budget_seeds"] == 2 and row["budget_met"] is True

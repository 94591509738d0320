"""benchmarks/stability.py: its pure helpers against hand counts and a closed form, and (slow) one
cell end to end with its docs section rendered beside another script's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import stability  # noqa: E402


def test_top_k_takes_the_highest_scores_and_breaks_ties_by_lower_index() -> None:
    score = np.array([0.1, 0.9, 0.5, 0.9, 0.5])
    assert stability.top_k(score, 1) == {1}
    assert stability.top_k(score, 3) == {1, 3, 2}
    assert stability.top_k(score, 0) == set()


def test_jaccard_and_its_mean_over_pairs_match_hand_counts() -> None:
    a, b, c = {1, 2, 3}, {2, 3, 4}, {7}
    assert stability.jaccard(a, b) == pytest.approx(2 / 4)
    assert stability.jaccard(a, c) == 0.0
    assert np.isnan(stability.jaccard(set(), set()))
    # pairs (a, b) 0.5, (a, c) 0, (b, c) 0
    assert stability.mean_pairwise_jaccard([a, b, c]) == pytest.approx(0.5 / 3)
    # pairs of two empty sets abstain: (a, {}) 0 counts, ({}, {}) does not
    assert stability.mean_pairwise_jaccard([a, set(), set()]) == 0.0
    assert stability.mean_pairwise_jaccard([set(), set()]) is None
    with pytest.raises(ValueError, match="at least two runs"):
        stability.mean_pairwise_jaccard([a])


def test_agreement_of_independent_random_sets_is_the_chance_level() -> None:
    """Two independent uniform k-subsets of n share k^2/n members on average, so the Jaccard index
    is about k / (2n - k): the floor a method with no stable signal sits on (0.11 for k = n / 5)."""
    rng = np.random.default_rng(0)
    n, k = 1000, 200
    sets = [set(rng.choice(n, size=k, replace=False).tolist()) for _ in range(40)]
    assert stability.mean_pairwise_jaccard(sets) == pytest.approx(stability.chance_jaccard(n, k), rel=0.03)
    assert stability.chance_jaccard(n, k) == pytest.approx(200 / 1800)


def test_flag_rates_split_the_flagged_set_by_the_truth() -> None:
    truth = np.array([True, True, False, False, False, False])
    rates = stability.flag_rates({0, 2, 3}, truth)
    assert rates == {"corrupted": 0.5, "ordinary": 0.5}
    assert stability.flag_rates(set(), truth) == {"corrupted": 0.0, "ordinary": 0.0}


def test_agreement_reads_the_top_k_and_the_auto_sets_of_each_run() -> None:
    runs = [{"top_k": {1, 2}, "auto": {1}}, {"top_k": {1, 2}, "auto": {1, 5, 6}}]
    out = stability.agreement(runs)
    assert out == {"top_k_jaccard": 1.0, "auto_jaccard": pytest.approx(1 / 3), "auto_sizes": [1, 3]}


@pytest.mark.slow  # ~30 s: the digits CNN cell trained and scored twice
def test_one_cell_end_to_end_renders_its_section(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- lm:start -->\nkeep me\n<!-- lm:end -->\n")
    out = tmp_path / "stability.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "stability.py"), "--cells", "digits/sym20/cnn", "--runs", "2",
               "--out", str(out), "--docs", str(docs)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cell = json.loads(out.read_text())["cells"][0]
    assert cell["k"] == 215 and cell["runs"] == 2
    assert set(cell["methods"]) == {label for label, _, _ in stability.METHODS}
    for method in cell["methods"].values():
        assert 0 <= method["top_k_jaccard"] <= 1
        # None: every run flagged nothing (f-INE's self rule on this cell), so there is no agreement to read
        assert method["auto_jaccard"] is None or 0 <= method["auto_jaccard"] <= 1
        assert (method["auto_jaccard"] is None) == (max(method["auto_sizes"]) == 0)
        assert len(method["ordinary_flag_rate"]) == 2 and all(0 <= r <= 1 for r in method["ordinary_flag_rate"])
    # TracIn finds the flips on this cell (AP 0.98 in the quality grid): its top-k is far above chance
    assert cell["methods"]["tracin"]["top_k_jaccard"] > 0.5
    assert cell["methods"]["fine (val)"]["nominal"] == pytest.approx(0.025)
    text = docs.read_text()
    assert "keep me" in text and "<!-- stability:start -->" in text and "digits/sym20/cnn" in text
    assert (tmp_path / "img" / "stability.png").stat().st_size > 1000
    unknown = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stability.py"), "--cells", "digits/nope/cnn",
                              "--no-docs", "--out", str(tmp_path / "none.json")], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert unknown.returncode != 0 and unknown.stderr.strip().splitlines()[-1].startswith("stability: unknown cell")
    assert not (tmp_path / "none.json").exists()


def test_too_few_runs_exit_with_one_line() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stability.py"), "--runs", "1", "--no-docs"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["stability: --runs must be at least 2, got 1"]

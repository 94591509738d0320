"""benchmarks/cascade.py --smoke: every method runs, is verified by Monte Carlo, and the docs
section renders (a BA graph of 80 nodes, IC, b = 2 % of the edges)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cascade_benchmark_smoke(tmp_path: Path):
    out, docs = tmp_path / "c.json", tmp_path / "benchmarks.md"
    subprocess.run([sys.executable, str(REPO / "benchmarks/cascade.py"), "--smoke", "--models", "IC", "--fractions",
                    "0.02", "--out", str(out), "--docs", str(docs)], check=True, cwd=REPO, capture_output=True)
    result = json.loads(out.read_text())
    methods = {r["method"] for r in result["runs"]}
    assert methods == {"oneshot", "relax", "sgreedy", "greedy_mc", "degree", "betweenness", "pagerank", "eigen_drop",
                       "random"}
    by = {r["method"]: r for r in result["runs"]}
    # the spread-aware methods cut more than random, each verified by fresh Monte Carlo
    for method in ("oneshot", "relax", "greedy_mc"):
        assert by[method]["spread"] + 3 * by[method]["spread_se"] < by["random"]["spread"]
    assert "Influence minimisation (DiffIM)" in docs.read_text()

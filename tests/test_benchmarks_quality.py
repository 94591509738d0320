"""Smoke test of benchmarks/quality.py: the tiny grid end to end, so the script cannot rot.

Runs in the main .venv, where the peers (captum, dattri, kronfluence) are not installed: they must
be recorded as skipped with the reason, and everything else must still run. In .venv-bench the
same test also runs the peers.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

# a minute or more each: outside the default suite, run by .ci/run (pytest -m integration)
pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quality.py"


def _load_script():
    if str(SCRIPT.parent) not in sys.path:  # the script imports its sibling helper, as when run directly
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("benchmarks_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("quality")
    docs = out_dir / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\n## Speed\n\nwritten by another script; keep me\n")
    out = out_dir / "quality.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--grid", "smoke", "--seeds", "0,1", "--jobs", "0",
         "--out", str(out), "--docs", str(docs)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), docs, out


def test_every_cell_has_detection_metrics_and_reference_rows(smoke):
    data, _, _ = smoke
    assert [c["key"] for c in data["cells"]] == ["wine/sym20/logreg", "wine/backdoor5/logreg"]
    for cell in data["cells"]:
        assert cell["k"] > 0
        ran = {name: e for name, e in cell["detectors"].items() if e["status"] == "ok"}
        # Every registered cleanse estimator and the free AUM baseline ran.
        from cleanse.estimators import registry

        assert {f"cleanse {name}" for name in registry.names_for("classification")} | {"AUM"} <= set(ran)
        for entry in ran.values():
            metrics = entry["metrics"]
            assert set(metrics) == {"roc_auc", "average_precision", "precision_at_k"}
            assert 0 <= metrics["roc_auc"] <= 1 and 0 < metrics["average_precision"] <= 1
            assert entry["score_seconds"] >= 0
            assert len(entry["retrain"]["test_accuracy"]["values"]) == 2
        assert set(cell["references"]) == {"no removal", "random", "oracle"}
        oracle = cell["references"]["oracle"]
        assert oracle["n_corrupted_removed"] == [cell["k"], cell["k"]]
        assert cell["references"]["no removal"]["n_corrupted_removed"] == [0, 0]
        for reference in cell["references"].values():
            summary = reference["test_accuracy"]
            assert len(summary["values"]) == 2 and summary["sd"] >= 0
        # A peer (either league) and the trusted baseline are either run or skipped with a reason,
        # never silently missing.
        for name in ("cleanlab", "captum TracInCPFast", "captum TracInCP", "dattri IF-explicit",
                     "dattri TracIn", "dattri TRAK", "kronfluence EK-FAC", "captum TracInCPFast (val)",
                     "captum TracInCP (val)", "dattri IF-explicit (val)", "dattri TracIn (val)",
                     "kronfluence EK-FAC (val)", "cleanse trusted"):
            entry = cell["detectors"][name]
            assert entry["status"] in ("ok", "skipped"), entry
            assert entry["league"] == ("trusted" if name.endswith("(val)") or name == "cleanse trusted"
                                       else "untrusted")
            if entry["status"] == "skipped":
                assert entry["reason"]


def test_backdoor_cell_reports_attack_success_and_targets(smoke):
    data, _, _ = smoke
    backdoor = data["cells"][1]
    assert backdoor["regimes"] == ["backdoor"]
    for reference in backdoor["references"].values():
        assert reference["attack_success_rate"] is not None
    assert backdoor["references"]["oracle"]["attack_success_rate"]["mean"] <= 1
    # One target row per fixed estimator in the one hard-regime cell; none names a per-cell best.
    rows = data["targets"]
    assert {r["cell"] for r in rows} == {"wine/backdoor5/logreg"} and {r["regime"] for r in rows} == {"backdoor"}
    ran = [r for r in rows if r["ran"]]
    assert len({r["estimator"] for r in ran}) == len(ran) >= 10
    assert not any("best_cleanse" in r for r in rows)
    for row in ran:
        assert {"accuracy_target_met", "asr_target_met"} <= set(row)


def test_markdown_section_renders_between_markers_and_keeps_other_sections(smoke):
    data, docs, out = smoke
    text = docs.read_text()
    assert "written by another script; keep me" in text
    assert text.count("<!-- quality:start -->") == 1 and text.count("<!-- quality:end -->") == 1
    section = text.split("<!-- quality:start -->")[1]
    assert "## Quality" in section and "| detector | league | family | ROC-AUC | AP | P@k |" in section
    assert "*oracle (corrupted removed)*" in section and "### Targets per fixed estimator" in section
    assert (docs.parent / "img" / "quality_ap.png").stat().st_size > 0

    # Re-rendering from the JSON replaces the section in place instead of appending a second one.
    quality = _load_script()
    quality.render_markdown(json.loads(out.read_text()), docs)
    again = docs.read_text()
    assert again.count("## Quality") == 1 and "keep me" in again


# ----------------------------------------------------------------------------- targets, leagues, rendering
# Fast tests on synthetic results: no training.


def _entry(family: str, league: str, ap: float, acc: float | None = None) -> dict:
    summary = None if acc is None else {"mean": acc, "sd": 0.0, "values": [acc]}
    return {"family": family, "league": league, "status": "ok", "score_seconds": 0.1, "prep_seconds": 0.0,
            "metrics": {"roc_auc": ap, "average_precision": ap, "precision_at_k": ap},
            "retrain": {"test_accuracy": summary, "n_corrupted_removed": [1]}}


def _cell(key: str, detectors: dict, oracle_acc: float = 0.9) -> dict:
    dataset, corruption, model = key.split("/")
    regimes = (["memorising MLP"] if model == "mlp_mem" else []) + (["40% pair flips"] if corruption == "pair40" else [])
    ref = {"test_accuracy": {"mean": oracle_acc, "sd": 0.0, "values": [oracle_acc]}, "n_corrupted_removed": [1]}
    dm = {"seed": 0, "train_seconds": 1.0, "train_accuracy": 1.0, "train_accuracy_on_corrupted": 1.0,
          "test_accuracy": 0.8}
    return {"dataset": dataset, "corruption": corruption, "model": model, "key": key, "regimes": regimes,
            "n_train": 100, "n_test": 50, "k": 40, "n_params": 10, "model_config": {"epochs": 1},
            "detection_models": [dm], "detection_model": dm, "retrain_seeds": [0],
            "references": {"no removal": ref, "random": ref, "oracle": ref}, "detectors": detectors}


@pytest.fixture(scope="module")
def quality():
    return _load_script()


def test_targets_count_each_fixed_estimator_never_the_per_cell_best(quality):
    # activation_clustering wins cell A, trak wins cell B: a per-cell best would meet the target
    # in both cells; each fixed estimator meets it in one.
    peer = _entry("peer", "untrusted", 0.60)
    cells = [
        _cell("digits/pair40/mlp", {"cleanse activation_clustering": _entry("cleanse", "untrusted", 0.95, 0.90),
                                    "cleanse trak": _entry("cleanse", "untrusted", 0.50, 0.80), "captum TracInCP": peer}),
        _cell("wine/pair40/mlp", {"cleanse activation_clustering": _entry("cleanse", "untrusted", 0.40, 0.80),
                                  "cleanse trak": _entry("cleanse", "untrusted", 0.90, 0.80), "captum TracInCP": peer}),
    ]
    rows = quality.evaluate_targets(cells)
    assert not any("best_cleanse" in row for row in rows)
    counts = quality.target_counts(rows, "ap_target_met")
    assert counts[("cleanse activation_clustering", "40% pair flips")] == (1, 2, 2)
    assert counts[("cleanse trak", "40% pair flips")] == (1, 2, 2)
    accuracy = quality.target_counts(rows, "accuracy_target_met")
    assert accuracy[("cleanse activation_clustering", "40% pair flips")] == (1, 2, 2)
    # The peer is never a contender.
    assert {row["estimator"] for row in rows} == {"cleanse activation_clustering", "cleanse trak"}


def test_each_league_is_measured_against_its_own_peers(quality):
    cell = _cell("digits/pair40/logreg", {
        "cleanse activation_clustering": _entry("cleanse", "untrusted", 0.80),
        "cleanse influence_fvm": _entry("cleanse", "trusted", 0.80),
        "cleanse trusted": _entry("baseline", "trusted", 0.70),
        "captum TracInCP": _entry("peer", "untrusted", 0.95),
        "captum TracInCP (val)": _entry("peer", "trusted", 0.50),
    })
    rows = {row["estimator"]: row for row in quality.evaluate_targets([cell])}
    assert rows["cleanse activation_clustering"]["best_peer"] == "captum TracInCP"
    assert rows["cleanse activation_clustering"]["ap_target_met"] is False
    assert rows["cleanse influence_fvm"]["best_peer"] == "captum TracInCP (val)"
    assert rows["cleanse influence_fvm"]["ap_target_met"] is True
    # The trusted baseline is the second bar of its league: 0.80 >= 0.70 + 0.05.
    assert rows["cleanse influence_fvm"]["trusted_target_met"] is True
    assert "trusted_target_met" not in rows["cleanse activation_clustering"]
    assert "trusted_target_met" not in rows["cleanse trusted"]


def test_league_of_follows_each_estimator_declaration(quality):
    from cleanse.config import load_params
    from cleanse.estimators import registry
    from cleanse.estimators.base import reads_validation_labels

    scorers = load_params(None, quality.SCORER_OVERRIDES).scorers
    checked = 0
    for name in registry.names_for("classification"):
        try:
            estimator = registry.get(name)
        except ImportError:
            continue  # registered but not importable here: the benchmark records it as skipped
        options = scorers.of(name)
        expected = "trusted" if reads_validation_labels(estimator, options) else "untrusted"
        assert quality.league_of(f"cleanse {name}", {}) == expected, name
        checked += 1
    assert checked >= 10
    assert quality.league_of("cleanse influence_fvm", {}) == "trusted"
    assert quality.league_of("cleanse activation_clustering", {}) == "untrusted"
    assert quality.league_of("captum TracInCP (val)", {}) == "trusted"
    assert quality.league_of("captum TracInCP", {}) == "untrusted"
    assert quality.league_of("AUM", {}) == "untrusted"


def test_multi_source_pair_flips_reach_each_class_from_several_classes(quality):
    import numpy as np

    from cleanse import api

    cell = quality.Cell("digits", "multipair40", "logreg")
    params = cell.params(0)
    staged, single = cell.stage(params), api.stage(params)
    train = staged.train
    # The same samples as 40% pair flips, relabelled; every one of them wrong.
    assert np.array_equal(train.is_corrupted, single.train.is_corrupted)
    assert abs(train.is_corrupted.mean() - 0.4) < 0.01
    flipped = train.is_corrupted
    offsets = (train.label[flipped] - train.label_clean[flipped]) % staged.meta.n_classes
    assert set(offsets.tolist()) == {1, 2, 3}
    for target in range(staged.meta.n_classes):
        sources = set(train.label_clean[flipped & (train.label == target)].tolist())
        assert len(sources) == 3, (target, sources)
    assert "multi-source pair flips" in cell.regimes


def test_render_from_fake_results_shows_leagues_counts_and_recommendation(quality, tmp_path):
    cells = [
        _cell("digits/pair40/mlp_mem", {
            "cleanse activation_clustering": _entry("cleanse", "untrusted", 0.95, 0.90),
            "cleanse influence_fvm": _entry("cleanse", "trusted", 0.70, 0.85),
            "cleanse trusted": _entry("baseline", "trusted", 0.98, 0.90),
            "captum TracInCP": _entry("peer", "untrusted", 0.60, 0.80),
            "captum TracInCP (val)": _entry("peer", "trusted", 0.90, 0.85)}),
        _cell("wine/multipair40/logreg", {
            "cleanse activation_clustering": _entry("cleanse", "untrusted", 0.30, 0.80),
            "captum TracInCP": _entry("peer", "untrusted", 0.40)}),
    ]
    cells[1]["regimes"] = ["multi-source pair flips"]
    data = {"meta": {"command": "fake", "finished": "now", "runtime_seconds": 60, "machine": "test", "grid": "fake",
                     "seeds": [0], "json": "fake.json", "versions": {"python": "3"}}, "cells": cells}
    recommend = tmp_path / "recommend.json"
    recommend.write_text(json.dumps([
        {"cell": "digits/pair40/mlp_mem", "seed": s, "recommended": {"estimator": "influence_fvm",
         "detection": {"average_precision": 0.97}, "retrain": {"test_accuracy": 0.89}},
         "oracle": {"retrain": {"test_accuracy": 0.9}}, "baseline": {"retrain": {"test_accuracy": 0.7}}}
        for s in (0, 1)]))
    docs = tmp_path / "benchmarks.md"
    section = quality.render_markdown(data, docs, tmp_path / "img", recommend_path=recommend)
    assert "best cleanse (AP)" not in section and "best_cleanse" not in json.dumps(data)
    assert "**No validation labels**: AP ≥ best peer of the league + 0.05" in section
    assert "**Reads the clean validation labels**: AP ≥ best peer of the league + 0.05" in section
    # activation_clustering: met in the pair cell (0.95 >= 0.60 + 0.05), not in the multi-source cell.
    assert "| activation_clustering | 1 / 1 | 1 / 1 | 0 / 1 | **2 / 3** |" in section
    # influence_fvm against the trusted peer (0.90): missed; the recommendation (0.97): met.
    # (Not measured in the multi-source cell: not evaluated there, counted as not met.)
    assert "| influence_fvm | 0 / 1 | 0 / 1 | 0 / 1 (1 n/e) | **0 / 3** (1 n/e) |" in section
    assert f"| {quality.RECOMMENDATION} | 1 / 1 | 1 / 1 | 0 / 1 (1 n/e) | **2 / 3** (1 n/e) |" in section
    assert "| digits/pair40/mlp_mem | 0,1 | influence_fvm | 0.970 |" in section
    assert (tmp_path / "img" / "quality_ap_cells.png").stat().st_size > 0

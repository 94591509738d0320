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

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quality.py"


def _load_script():
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

        assert {f"cleanse {name}" for name in registry.names()} | {"AUM"} <= set(ran)
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
        # A peer is either run or skipped with a reason, never silently missing.
        for name in ("cleanlab", "captum TracInCPFast", "captum TracInCP", "dattri IF-explicit",
                     "dattri TracIn", "dattri TRAK", "kronfluence EK-FAC"):
            entry = cell["detectors"][name]
            assert entry["status"] in ("ok", "skipped"), entry
            if entry["status"] == "skipped":
                assert entry["reason"]


def test_backdoor_cell_reports_attack_success_and_targets(smoke):
    data, _, _ = smoke
    backdoor = data["cells"][1]
    assert backdoor["regimes"] == ["backdoor"]
    for reference in backdoor["references"].values():
        assert reference["attack_success_rate"] is not None
    assert backdoor["references"]["oracle"]["attack_success_rate"]["mean"] <= 1
    [target] = data["targets"]
    assert target["regime"] == "backdoor" and target["cell"] == "wine/backdoor5/logreg"
    assert target["best_cleanse"].startswith("cleanse ")
    assert {"accuracy_target_met", "asr_target_met"} <= set(target)


def test_markdown_section_renders_between_markers_and_keeps_other_sections(smoke):
    data, docs, out = smoke
    text = docs.read_text()
    assert "written by another script; keep me" in text
    assert text.count("<!-- quality:start -->") == 1 and text.count("<!-- quality:end -->") == 1
    section = text.split("<!-- quality:start -->")[1]
    assert "## Quality" in section and "| detector | family | ROC-AUC | AP | P@k |" in section
    assert "*oracle (corrupted removed)*" in section and "### Targets (hard regimes)" in section
    assert (docs.parent / "img" / "quality_ap.png").stat().st_size > 0

    # Re-rendering from the JSON replaces the section in place instead of appending a second one.
    quality = _load_script()
    quality.render_markdown(json.loads(out.read_text()), docs)
    again = docs.read_text()
    assert again.count("## Quality") == 1 and "keep me" in again

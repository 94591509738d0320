"""Smoke runs of ``benchmarks/speed.py`` and ``benchmarks/scale.py`` on their tiny grids, so the
scripts cannot rot: the JSON they write has the documented structure, and each rewrites only its
own section of the docs file (a third, foreign section survives byte for byte)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

# a minute or more each: outside the default suite, run by .ci/run (pytest -m integration)
pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
QUALITY = "<!-- quality:start -->\n## Quality\n\nowned by another script | keep me\n<!-- quality:end -->"
PEERS = {"captum TracInCPFast", "captum TracInCP", "dattri TracIn", "dattri TRAK", "dattri IF-explicit",
         "kronfluence EK-FAC"}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both smoke grids, run at the same time into one docs file that already has a foreign section."""
    root = tmp_path_factory.mktemp("bench")
    docs = root / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\nIntro written by hand.\n\n" + QUALITY + "\n")
    paths = {"speed": root / "results" / "speed.json", "scale": root / "results" / "scale.json", "docs": docs}
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--grid", "smoke", "--out", str(paths[name]),
             "--docs", str(docs)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name in ("speed", "scale")
    }
    for name, process in processes.items():
        output, _ = process.communicate(timeout=240)
        assert process.returncode == 0, f"{name}.py --grid smoke failed:\n{output[-4000:]}"
    return paths


def test_speed_json_structure(smoke_runs: dict[str, Path]) -> None:
    from cleanse.estimators import registry

    estimators = set(registry.names_for("classification"))
    assert {"loss", "influence", "tracin", "fine"} <= estimators
    result = json.loads(smoke_runs["speed"].read_text())
    assert result["benchmark"] == "speed" and result["grid"] == "smoke"
    assert result["config"]["n_params"] > 0 and result["total_seconds"] > 0
    assert [run["n"] for run in result["runs"]] == list(result["config"]["ns"])
    for run in result["runs"]:
        assert run["epoch_s"] > 0 and len(run["checkpoint_epochs"]) == result["config"]["checkpoints"]
        throughput = run["throughput"]
        assert {"vmap (cleanse per_sample_grads)", "Python loop (autograd.grad per sample)",
                "layer-wise squared norms (cleanse per_sample_sq_norms)"} <= set(throughput)
        assert all(value < 1e-4 for value in throughput["max_relative_disagreement"].values())
        detectors = {d["name"]: d for d in run["detectors"]}
        assert estimators | PEERS <= set(detectors)
        for name in estimators:  # every cleanse estimator of the family runs on the smoke grid
            d = detectors[name]
            assert d["status"] == "ok", d
            assert 0.0 <= d["auc"] <= 1.0 and 0.0 <= d["ap"] <= 1.0
            assert d["ratio_to_epoch"] > 0 and math.isclose(d["ratio_per_checkpoint"] * d["checkpoints"], d["ratio_to_epoch"])
        assert detectors["tracin"]["checkpoints"] == result["config"]["checkpoints"]
        for name in PEERS:  # installed peers run; missing ones are recorded as skipped with the reason
            assert detectors[name]["status"] in ("ok", "skipped"), detectors[name]
            if detectors[name]["status"] == "skipped":
                assert detectors[name]["reason"]
        assert {c["cleanse"] for c in run["comparisons"]} == estimators | {"influence_val [cg]"}
        for name in ("influence", "influence_val"):  # the default solver: auto, with its choice recorded
            assert detectors[name]["options"]["solver"] == "auto"
            auto = detectors[name]["extra"]["estimator_meta"]["auto"]
            assert auto["predicted_epochs"] > 0 and auto["budget_epochs"] == 5 and auto["candidates"]
            assert auto["chosen"] == f"{auto['solver']} ({auto['layers']} layers)"
        assert detectors["influence_val [cg]"]["extra"]["estimator_meta"]["solver"] == "cg"
        pairwise = {r["name"]: r for r in run["pairwise"]}
        assert set(pairwise) == {"tracin", "influence"}
        for row in pairwise.values():
            assert row["shape"] == [8, run["n"]] and row["finite"] and row["seconds"] > 0
            assert math.isclose(row["ratio_per_checkpoint"] * row["checkpoints"], row["ratio_to_epoch"])
    head = result["headline"]
    for key in ("influence_epoch_ratio", "influence_val_epoch_ratio", "pairwise_epoch_ratio"):
        assert head[key]["measured"] > 0 and head[key]["met"] in (True, False), key
    assert head["fine_training_ratio"]["met"] is None  # the f-INE target is read at n >= 10,000 only
    assert head["n"] == result["runs"][-1]["n"]
    assert head["self_influence_epoch_ratio"]["measured"] > 0
    assert head["self_influence_epoch_ratio"]["met"] in (True, False)
    assert set(head["speedup_vs_fastest_peer_at_equal_auc"]) >= {"measured", "met", "peer", "target"}


def test_scale_json_structure(smoke_runs: dict[str, Path]) -> None:
    result = json.loads(smoke_runs["scale"].read_text())
    assert result["benchmark"] == "scale" and result["grid"] == "smoke"
    points = result["points"]
    assert [p["n"] for p in points] == list(result["config"]["ns"])
    for p in points:
        assert p["seconds"]["total"] > 0 and p["seconds"]["total"] >= p["seconds"]["scoring"]
        assert p["rss_mb"]["peak"] >= p["rss_mb"]["before_work"] > 0
        assert p["rss_mb"]["peak_anon_sampled"] > 0 and p["rss_mb"]["peak_file_sampled"] > 0
        assert p["scores"]["finite"] and 0 < p["scores"]["sum_over_k"] <= 1.0 + 1e-6
        assert math.isclose(p["memmap_mb"] * 2**20, p["n"] * result["config"]["k"] * 4, rel_tol=0.01)
    analysis = result["analysis"]
    assert analysis["peak_rss_ratio"] > 0 and analysis["peak_rss_met"] in (True, False)
    assert len(analysis["loglog_slopes"]) == len(points) - 1


def test_docs_sections_rendered_and_foreign_section_kept(smoke_runs: dict[str, Path]) -> None:
    docs = smoke_runs["docs"]
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nIntro written by hand.\n")
    assert QUALITY in text
    for name, heading in (("speed", "## Speed"), ("scale", "## Scale")):
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        assert text.count(start) == 1 and text.count(end) == 1
        section = text[text.index(start):text.index(end)]
        assert heading in section and "|---|" in section
        assert (docs.parent / "img" / f"{name}.png").stat().st_size > 1000
        assert f"](img/{name}.png)" in section
    speed = text[text.index("<!-- speed:start -->"):text.index("<!-- speed:end -->")]
    assert "### Targets" in speed and "### Per-sample gradients" in speed and "tracin" in speed
    scale = text[text.index("<!-- scale:start -->"):text.index("<!-- scale:end -->")]
    assert "### Targets" in scale and "peak RSS" in scale


def test_rerendering_replaces_only_its_section(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _common import replace_section, update_docs_section
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    docs = tmp_path / "benchmarks.md"
    update_docs_section(docs, "speed", "first")
    assert docs.read_text().startswith("# Benchmarks") and "first" in docs.read_text()
    docs.write_text(docs.read_text() + "\n" + QUALITY + "\ntrailer\n")
    update_docs_section(docs, "speed", "second")
    text = docs.read_text()
    assert "second" in text and "first" not in text and QUALITY in text and text.endswith("trailer\n")
    with pytest.raises(ValueError, match="only one of its two markers"):
        replace_section("<!-- scale:start -->\nbroken", "scale", "x")

"""``params.evaluate``: LDS and rank stability in the report when enabled, absent by default."""

from __future__ import annotations

import json

from cleanse.pipeline import run_all
from cleanse.storage import Layout
from tests.conftest import small_params


def test_report_adds_lds_and_stability_when_enabled(tmp_path):
    params = small_params("estimators=[loss,tracin,trak]", "evaluate.lds=true", "evaluate.lds_subsets=6",
                          "evaluate.lds_queries=4", "evaluate.stability=true", "evaluate.stability_seeds=2",
                          "scorers.trak.proj_dim=64")
    layout = Layout.at(tmp_path / "run")
    metrics = run_all(params, layout, log=lambda line: None)
    attribution = json.loads(layout.metrics.read_text())["attribution"]
    assert attribution == json.loads(json.dumps(metrics["attribution"]))
    # Only estimators with train -> query attributions get an LDS.
    assert set(attribution["lds"]["estimators"]) == {"tracin", "trak"}
    for result in attribution["lds"]["estimators"].values():
        assert -1 <= result["lds"] <= 1
    stability = attribution["stability"]
    assert set(stability["estimators"]) == {"loss", "tracin", "trak"} and stability["seeds"] == [0, 1]
    for result in stability["estimators"].values():
        assert -1 <= result["spearman"] <= 1 and 0 <= result["top_k_jaccard"] <= 1


def test_report_has_no_attribution_section_by_default():
    params = small_params()
    assert not params.evaluate.lds and not params.evaluate.stability

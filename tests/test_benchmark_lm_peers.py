"""benchmarks/lm_peers.py: which layers kronfluence tracks (the LoRA factors, on a real peft model),
the ranking metrics, and (slow, needs .venv-bench's kronfluence) a tiny run end to end whose
kronfluence scores must agree in sign with cleanse's influence on the same fine-tune."""

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

import lm_peers  # noqa: E402


def test_lora_modules_keeps_the_adapter_factors_only() -> None:
    attn = "lm.base_model.model.transformer.h.0.attn.c_attn"
    names = ["", "lm", attn, f"{attn}.base_layer", f"{attn}.lora_A", f"{attn}.lora_A.default",
             f"{attn}.lora_B.default", "lm.base_model.model.lm_head", "x.lora_dropout.default", "x.lora_A_extra.default"]
    assert lm_peers.lora_modules(names) == [names[5], names[6]]


def test_lora_modules_of_the_family_scorer_are_its_trained_linear_layers() -> None:
    pytest.importorskip("peft")
    import torch

    from cleanse.families.lm.config import LmBaseConfig
    from cleanse.families.lm.model import build_scorer
    from cleanse.families.lm.pretrain import gpt2_config

    architecture = gpt2_config(LmBaseConfig(n_layer=2, n_embd=16, n_head=2), 50).to_diff_dict()
    spec = {"architecture": architecture, "lora": {"rank": 2, "alpha": 4, "targets": ["c_attn", "c_fc"]},
            "lora_seed": 0, "length": 8, "response_len": 2}
    scorer = build_scorer(spec)
    modules = dict(scorer.named_modules())
    tracked = lm_peers.lora_modules(list(modules))
    assert len(tracked) == 2 * 2 * 2  # A and B, two targets, two layers
    assert all(isinstance(modules[name], torch.nn.Linear) for name in tracked)
    trained = {name for name, p in scorer.named_parameters() if p.requires_grad}
    assert trained == {f"{name}.weight" for name in tracked}


def test_ranking_metrics_against_the_planted_set() -> None:
    planted = np.array([False, True, False, True, False])
    assert lm_peers.ranking_metrics(np.array([0.0, 2.0, 0.1, 3.0, -1.0]), planted) == {
        "average_precision": pytest.approx(1.0), "precision_at_k": pytest.approx(1.0)}
    worst = lm_peers.ranking_metrics(np.array([3.0, 0.0, 2.0, -1.0, 1.0]), planted)
    assert worst["precision_at_k"] == 0.0 and worst["average_precision"] == pytest.approx((1 / 4 + 2 / 5) / 2)


def test_merge_runs_adds_seeds_and_methods_and_keeps_the_rest() -> None:
    saved = [{"seed": 0, "fit_seconds": 1.0, "methods": {"tracin": {"seconds": 2.0}, "kronfluence": {"seconds": 3.0}}}]
    new = [{"seed": 2, "fit_seconds": 5.0, "methods": {"influence": {"seconds": 9.0}}},
           {"seed": 0, "fit_seconds": 7.0, "methods": {"influence": {"seconds": 4.0}, "kronfluence": {"seconds": 3.5}}}]
    merged = lm_peers.merge_runs(saved, new)
    assert [row["seed"] for row in merged] == [0, 2]
    assert merged[0]["fit_seconds"] == 1.0  # the saved row's own fine-tune
    assert merged[0]["methods"] == {"tracin": {"seconds": 2.0}, "kronfluence": {"seconds": 3.5},
                                    "influence": {"seconds": 4.0}}
    assert merged[1]["methods"] == {"influence": {"seconds": 9.0}}
    assert saved[0]["methods"] == {"tracin": {"seconds": 2.0}, "kronfluence": {"seconds": 3.0}}  # not mutated


@pytest.mark.slow
@pytest.mark.integration  # ~2 min: pretrains a tiny base, fine-tunes, four attributions
def test_smoke_run_orients_kronfluence_like_cleanse_influence(tmp_path: Path) -> None:
    pytest.importorskip("kronfluence")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- lm:start -->\nkeep me\n<!-- lm:end -->\n")
    out = tmp_path / "lm_peers.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "lm_peers.py"), "--smoke", "--seeds", "0", "--out", str(out),
               "--docs", str(docs)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    row = json.loads(out.read_text())["runs"][0]
    peer = row["methods"]["kronfluence"]
    assert peer["tracked_modules"] == 4 and peer["factor_seconds"] > 0 and peer["score_seconds"] > 0
    for name in ("tracin", "trak", "influence", "kronfluence"):
        assert 0 <= row["methods"][name]["average_precision"] <= 1 and row["methods"][name]["seconds_per_probe"] > 0
    # both are inverse-curvature influence of the same probes on the same adapters: same orientation
    assert row["methods"]["influence"]["spearman_with_kronfluence"] > 0.5
    text = docs.read_text()
    assert "keep me" in text and "<!-- lm-peers:start -->" in text

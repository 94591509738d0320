"""benchmarks/gpu_lm.py: the on-paper estimate's counts against the published model sizes and a
real peft model, the blockwise projection against the dense one, and (slow) the CPU dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_lm  # noqa: E402


def test_parameter_counts_match_the_published_llama_sizes() -> None:
    # Llama-3.1-8B: 8,030,261,248 parameters; Llama-3.2-1B (tied head): 1,235,814,400
    assert gpu_lm.SHAPES["llama-8b"].n_params() == 8_030_261_248
    assert gpu_lm.SHAPES["llama-1b"].n_params() == 1_235_814_400
    # rank 16 on q, k, v, o of 32 blocks: 16 x (8192 + 5120 + 5120 + 8192) x 32
    assert gpu_lm.n_adapter_params(gpu_lm.SHAPES["llama-8b"], 16, gpu_lm.ATTENTION) == 13_631_488
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        gpu_lm.n_adapter_params(gpu_lm.SHAPES["tiny"], 4, ["c_attn"])


def test_estimate_scales_as_its_formulas_say() -> None:
    shape = gpu_lm.SHAPES["llama-8b"]
    kwargs = dict(rank=16, targets=gpu_lm.ATTENTION, response=64, proj_dim=4096, peak_tflops=989.0, mfu=0.4)
    plain = gpu_lm.estimate(shape, batch=8, seq=512, checkpointing=False, **kwargs)
    double = gpu_lm.estimate(shape, batch=16, seq=512, checkpointing=False, **kwargs)
    saved = gpu_lm.estimate(shape, batch=8, seq=512, checkpointing=True, **kwargs)
    assert plain["weights_gib"] == pytest.approx(2 * 8_030_261_248 / 1024**3)
    assert plain["adapter_state_gib"] == pytest.approx(16 * 13_631_488 / 1024**3)
    assert double["activations_gib"] == pytest.approx(2 * plain["activations_gib"])
    assert double["step_seconds"] == pytest.approx(2 * plain["step_seconds"])
    assert plain["sample_grad_seconds"] == pytest.approx(plain["step_seconds"] / 8)
    # checkpointing keeps one hidden state per block and recomputes the forward: 1.5x the FLOPs
    assert saved["activations_gib"] < plain["activations_gib"] / 8
    assert saved["step_tflop"] == pytest.approx(1.5 * plain["step_tflop"])
    # about 6 N T FLOPs per token would be full fine-tuning; frozen weights make it about 4 N T
    assert 3.5 < plain["step_tflop"] * 1e12 / (8 * 512 * 8.03e9) < 4.5


def test_adapter_count_equals_the_peft_model_and_projection_the_dense_one() -> None:
    pytest.importorskip("peft")
    import torch

    model = gpu_lm.build_model(gpu_lm.SHAPES["tiny"], 4, gpu_lm.ATTENTION, torch.device("cpu"), torch.float32)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == gpu_lm.n_adapter_params(gpu_lm.SHAPES["tiny"], 4, gpu_lm.ATTENTION)
    assert sum(p.numel() for p in model.parameters()) - trained == gpu_lm.SHAPES["tiny"].n_params()
    flat = torch.randn(3, 250, generator=torch.Generator().manual_seed(1))
    blocked = gpu_lm.project_blockwise(flat, 16, seed=5, block=64)
    generator = torch.Generator()
    pieces = []
    for index, start in enumerate(range(0, 250, 64)):
        generator.manual_seed(5 * 1_000_003 + index)
        pieces.append(torch.randn(min(64, 250 - start), 16, generator=generator))
    assert torch.allclose(blocked, flat @ torch.cat(pieces) / 4.0, atol=1e-5)


@pytest.mark.slow  # ~1-2 min: tiny Llama steps on the CPU, then the lm flow end to end at smoke size
def test_dry_run_measures_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu_lm.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_lm.py"), "--dry-run", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads(out.read_text())
    step = saved["step"]
    assert step["device"] == "cpu" and step["n_adapter_params"] == 3584 and step["step_seconds"] > 0
    assert step["projected_shape"] == [3, 64] and step["sample_grad_seconds"] > 0
    assert set(saved["estimate"]) == {"tiny", "llama-8b"}
    assert set(saved["flow"]["estimators"]) == {"loss", "tracin", "trak", "fine"}
    assert 0 <= saved["flow"]["steer_rate"]["oracle"] <= 1

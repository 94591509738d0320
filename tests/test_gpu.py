"""CUDA checks (``@pytest.mark.gpu``; CI has no GPU, so ``-m gpu`` runs them where one exists).

The same trained model is scored on the CPU and on the GPU: every registered estimator must give
the same ranking (the arithmetic differs only in float rounding and reduction order), the whole
loop must run on CUDA end to end, and the seeded projection must not depend on the device.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def cpu_context():
    from tests.conftest import context_for, small_params

    context, _ = context_for(small_params("scorers.influence.solver=exact"))
    return context


def _registered() -> list[str]:
    from cleanse.estimators import registry

    return registry.names_for("classification")


@pytest.mark.parametrize("name", _registered())
def test_estimator_ranks_agree_between_cpu_and_cuda(cpu_context, name):
    from cleanse.config import Params
    from cleanse.estimators import registry

    options = Params().scorers.of(name)
    estimator = registry.get(name)
    on_cpu = estimator.score(cpu_context, options).table["score"].to_numpy()
    on_gpu = registry.get(name).score(dataclasses.replace(cpu_context, device=CUDA), options).table["score"].to_numpy()
    assert np.isfinite(on_gpu).all()
    rho = spearmanr(on_cpu, on_gpu).statistic
    assert rho >= 0.99, f"{name}: CPU/GPU Spearman {rho:.4f}"


def test_the_whole_loop_runs_on_cuda(tmp_path, monkeypatch):
    import json

    from cleanse import pipeline
    from cleanse.storage import Layout
    from tests.conftest import small_params

    monkeypatch.setenv("CLEANSE_DEVICE", "cuda")
    params = small_params("estimators=[\"loss\",\"tracin\",\"influence\"]")
    pipeline.run_all(params, Layout(tmp_path))
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert sorted(metrics["estimators"]) == ["influence", "loss", "tracin"]
    for entry in metrics["estimators"].values():
        assert entry["detection"]["roc_auc"] > 0.6


def test_projection_is_device_independent():
    from cleanse.projection import projection_matrix

    on_cpu = projection_matrix(300, 16, seed=4)
    on_gpu = projection_matrix(300, 16, seed=4, device=CUDA)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_cpu, on_gpu.cpu())


def test_dmin_signatures_and_sketch_agree_on_cpu_and_cuda():
    """DMin (issue 18): the same UNet's per-sample signatures and their sketch on CUDA agree with
    the CPU's (inputs on the CPU follow the model to its device). Compared by cosine per (sample,
    timestep), since cuDNN may run the convolutions in TF32."""
    pytest.importorskip("diffusers")
    from sklearn.datasets import load_digits

    from cleanse.families.diffusion.models import ddpm_scheduler, small_unet
    from cleanse.families.diffusion.signatures import signatures
    from cleanse.families.diffusion.sketch import Sketch
    from cleanse.families.diffusion.timesteps import cube_timesteps, shared_noise

    digits = load_digits()
    images = torch.from_numpy((digits.images[:6] / 8.0 - 1.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(digits.target[:6].astype(np.int64))
    timesteps, noise = torch.from_numpy(cube_timesteps(1000, 4)), shared_noise(0, (1, 8, 8), 4)
    model = small_unet(n_classes=10, seed=1)
    on_cpu = signatures(model, ddpm_scheduler(), images, noise, timesteps, labels)
    on_cuda = signatures(model.to(CUDA), ddpm_scheduler(), images, noise, timesteps, labels)
    assert on_cuda.device.type == "cuda"
    assert float(torch.nn.functional.cosine_similarity(on_cuda.cpu(), on_cpu, dim=-1).min()) > 0.999
    sketch = Sketch.make(on_cpu.shape[-1], (256, 4096), seed=42)
    sketched_cuda, sketched_cpu = sketch(on_cuda)[4096].cpu(), sketch(on_cpu)[4096]
    assert float(torch.nn.functional.cosine_similarity(sketched_cuda, sketched_cpu, dim=-1).min()) > 0.999

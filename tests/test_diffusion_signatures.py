"""DMin signatures (issue 18) on a tiny diffusers UNet2DModel and 8x8 digits: the cube-law
timesteps, the shared noise, per-sample gradients from vmap(grad) against one backward pass per
(sample, timestep), the LoRA path (adapter parameters only), and a planted duplicate retrieved
first, exactly and through the sketch and the HNSW index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from cleanse.families.diffusion.models import add_lora, ddpm_scheduler, small_unet
from cleanse.families.diffusion.signatures import influence, noisy_inputs, parameter_names, signatures
from cleanse.families.diffusion.timesteps import cube_timesteps, shared_noise


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((digits.images[:n] / 8.0 - 1.0).astype(np.float32)).unsqueeze(1)  # [-1, 1]
    return images, torch.from_numpy(digits.target[:n].astype(np.int64))


def _loop_gradients(model, scheduler, images, noise, timesteps, labels, names):
    """The reference: one backward pass per (sample, timestep), shape (N, S, D)."""
    noisy, target = noisy_inputs(scheduler, images, noise, timesteps)
    params = dict(model.named_parameters())
    rows = []
    for i in range(images.shape[0]):
        for s in range(timesteps.shape[0]):
            model.zero_grad(set_to_none=True)
            kwargs = {} if labels is None else {"class_labels": labels[i:i + 1]}
            out = model(noisy[i, s:s + 1], timesteps[s:s + 1], **kwargs).sample
            ((out[0] - target[i, s]) ** 2).mean().backward()
            rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    return torch.stack(rows).reshape(images.shape[0], timesteps.shape[0], -1)


def test_cube_law_timesteps_and_the_shared_noise():
    assert cube_timesteps(1000, 10).tolist() == [999, 998, 991, 972, 935, 874, 783, 656, 487, 270]
    assert cube_timesteps(100, 4).tolist() == [99, 98, 87, 57]  # floor((k/4)^3 * 100) = 0, 1, 12, 42
    noise = shared_noise(3, (1, 8, 8), 5)
    assert noise.shape == (5, 1, 8, 8) and torch.equal(noise[0], noise[4])
    assert torch.equal(noise, shared_noise(3, (1, 8, 8), 5))  # fixed: the same for every call
    assert not torch.equal(noise, shared_noise(4, (1, 8, 8), 5))
    distinct = shared_noise(3, (1, 8, 8), 5, distinct=True)
    assert not torch.equal(distinct[0], distinct[1])
    assert abs(float(distinct.mean())) < 0.2 and abs(float(distinct.std()) - 1.0) < 0.15


@pytest.mark.parametrize("conditional", [False, True])
def test_vmap_gradients_equal_one_backward_pass_per_sample(conditional):
    images, labels = _digits(3)
    labels = labels if conditional else None
    model = small_unet(n_classes=10 if conditional else None, seed=1)
    scheduler = ddpm_scheduler()
    timesteps = torch.from_numpy(cube_timesteps(1000, 3))
    noise = shared_noise(0, (1, 8, 8), 3, distinct=True)
    names = parameter_names(model)
    raw = signatures(model, scheduler, images, noise, timesteps, labels, names, batch_size=2, normalised=False)
    reference = _loop_gradients(model, scheduler, images, noise, timesteps, labels, names)
    assert raw.shape == (3, 3, sum(p.numel() for p in model.parameters()))
    assert float((raw - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    unit = signatures(model, scheduler, images, noise, timesteps, labels, names, batch_size=3)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3, 3))
    torch.testing.assert_close(unit, reference / reference.norm(dim=-1, keepdim=True), rtol=1e-4, atol=1e-6)
    if conditional:  # the label enters the gradient
        relabelled = signatures(model, scheduler, images, noise, timesteps, (labels + 1) % 10, names)
        assert float((relabelled - unit).abs().max()) > 1e-3


def test_the_lora_path_differentiates_only_the_adapters():
    images, labels = _digits(2)
    model = add_lora(small_unet(n_classes=10, seed=1), rank=2, init_scale=0.05, seed=0)
    scheduler = ddpm_scheduler()
    timesteps = torch.from_numpy(cube_timesteps(1000, 2))
    noise = shared_noise(0, (1, 8, 8), 2)
    names = parameter_names(model, "adapters")
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert parameter_names(model) == names  # the base weights are frozen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    raw = signatures(model, scheduler, images, noise, timesteps, labels, names, normalised=False)
    adapter_size = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert raw.shape == (2, 2, adapter_size) and adapter_size < sum(p.numel() for p in model.parameters()) // 10
    reference = _loop_gradients(model, scheduler, images, noise, timesteps, labels, names)
    assert float((raw - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    assert float(raw.abs().max()) > 0  # lora_B != 0, so lora_A has a gradient too
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(Exception, match="no LoRA adapters"):
        parameter_names(small_unet(seed=1), "adapters")


def test_a_planted_duplicate_is_retrieved_first():
    """A query that is a training image, or a near copy of it, ranks that image first by the
    uncompressed DMin score, by the sketch's exact scan and through the HNSW index."""
    from cleanse.families.diffusion.index import HnswIndex, exact_topk, flatten
    from cleanse.families.diffusion.sketch import Sketch

    images, labels = _digits(40)
    model = small_unet(n_classes=10, seed=2)
    scheduler = ddpm_scheduler()
    timesteps = torch.from_numpy(cube_timesteps(1000, 4))
    noise = shared_noise(0, (1, 8, 8), 4)
    train = signatures(model, scheduler, images, noise, timesteps, labels, batch_size=20)
    planted = [5, 17, 33]
    generator = torch.Generator().manual_seed(0)
    near = (images[planted] + 0.05 * torch.randn(3, 1, 8, 8, generator=generator)).clamp(-1, 1)
    queries = signatures(model, scheduler, torch.cat([images[planted], near]), noise, timesteps,
                         labels[planted].repeat(2))
    scores = influence(queries, train)
    assert scores.argmax(dim=1).tolist() == planted * 2
    torch.testing.assert_close(scores[:3, planted].diagonal(), torch.ones(3))
    # At initialisation the high-noise timesteps make same-class signatures nearly parallel (the
    # nearest other training image has cosine 0.9997 here), so the sketch needs v >= 2^12 to keep
    # the duplicate first (at v = 2^8 and 2^10, 60% and 85% of the training images rank first for
    # themselves, all of them from 2^12 on).
    sketch = Sketch.make(train.shape[-1], (2 ** 12, 2 ** 14), seed=42)
    for v in sketch.sizes:
        database, probe = flatten(sketch(train)[v]), flatten(sketch(queries)[v])
        _, rows = exact_topk(database, probe, k=5)
        assert rows[:, 0].tolist() == planted * 2
        _, ids = HnswIndex.build(database).search(probe, k=5)
        assert ids[:, 0].tolist() == planted * 2


def test_fitting_lowers_the_denoising_loss_and_is_reproducible():
    from cleanse.errors import ConfigError
    from cleanse.families.diffusion.train import fit_ddpm, sample_ddpm

    images, labels = _digits(128)
    scheduler = ddpm_scheduler()
    model = small_unet(n_classes=10, seed=0)
    history = fit_ddpm(model, scheduler, images, labels, epochs=4, batch_size=32, seed=0)
    assert len(history) == 4 and history[-1] < 0.6 * history[0], history
    again = small_unet(n_classes=10, seed=0)
    assert fit_ddpm(again, scheduler, images, labels, epochs=4, batch_size=32, seed=0) == history
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    drawn = sample_ddpm(model, scheduler, 4, (1, 8, 8), torch.tensor([0, 1, 2, 3]), steps=20, seed=5)
    assert drawn.shape == (4, 1, 8, 8) and float(drawn.abs().max()) <= 1.0
    assert torch.equal(drawn, sample_ddpm(model, scheduler, 4, (1, 8, 8), torch.tensor([0, 1, 2, 3]), steps=20, seed=5))
    with pytest.raises(ConfigError, match="3 labels for 128 images"):
        fit_ddpm(model, scheduler, images, labels[:3], epochs=1)

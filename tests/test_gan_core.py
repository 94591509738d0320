"""GAN family core: networks, the shared training step, the traced window and its replay.

The replay of the traced window must reproduce the trained parameters bit for bit on the CPU
(issue 17), for both architectures, both optimizers and both update schemes; the masked replay is
the counterfactual ground truth of the influence estimators.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleanse.errors import ConfigError, DataError
from cleanse.families.gan.nets import GanSpec, build_discriminator, build_generator, paper_mlp_spec, params_of
from cleanse.families.gan.step import GanNets, d_loss, gan_step, initial_state
from cleanse.families.gan.trace import GanTrace
from cleanse.families.gan.training import GanRecipe, replay, retrain_gan, train_gan

CONV = GanSpec("conv", (1, 8, 8), 8, (16, 8), (8, 16), "float32")


def gaussian2d(n: int, seed: int = 0) -> torch.Tensor:
    """The paper's single correlated Gaussian: mean (1, 1), covariance [[1, .8], [.8, 1]]."""
    draws = np.random.default_rng(seed).multivariate_normal([1.0, 1.0], [[1.0, 0.8], [0.8, 1.0]], size=n)
    return torch.tensor(draws, dtype=torch.float64)


def images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    blobs = torch.tanh(torch.randn(n, 1, 8, 8, generator=gen) + torch.linspace(-1, 1, 8).view(1, 1, 1, 8))
    return blobs.to(torch.float32)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_paper_fc_gan_has_its_layers_shapes_and_glorot_init():
    spec = paper_mlp_spec()
    g, d = build_generator(spec, seed=3), build_discriminator(spec, seed=3)
    shapes_g = {k: tuple(v.shape) for k, v in params_of(g).items()}
    shapes_d = {k: tuple(v.shape) for k, v in params_of(d).items()}
    assert list(shapes_g.values()) == [(32, 10), (32, 32), (2, 32), (2,)]  # hidden layers without bias
    assert list(shapes_d.values()) == [(64, 2), (64, 64), (1, 64), (1,)]
    assert all(p.dtype == torch.float64 for p in g.parameters())
    w = params_of(g)["2.weight"]  # 32 x 32: Glorot bound sqrt(6 / 64)
    assert w.abs().max() <= (6 / 64) ** 0.5 and w.abs().max() > 0.9 * (6 / 64) ** 0.5
    assert g(torch.zeros(5, 10, dtype=torch.float64)).shape == (5, 2)
    assert d(torch.zeros(5, 2, dtype=torch.float64)).shape == (5,)
    assert _equal(params_of(build_generator(spec, seed=3)), params_of(g))
    assert not _equal(params_of(build_generator(spec, seed=4)), params_of(g))
    assert GanSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_conv_gan_maps_latents_to_images_in_range_and_images_to_logits(shape):
    spec = GanSpec("conv", shape, 16, (32, 16), (16, 32), "float32")
    fake = build_generator(spec)(torch.randn(4, 16))
    assert fake.shape == (4, *shape) and fake.abs().max() <= 1.0
    assert build_discriminator(spec)(fake).shape == (4,)


def test_bad_specs_and_data_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="divisible by 4"):
        GanSpec("conv", (1, 10, 10), 8, (8, 8), (8, 8), "float32")
    with pytest.raises(ConfigError, match="trace_epochs"):
        GanRecipe(epochs=2, trace_epochs=3)
    with pytest.raises(DataError, match="dtype"):
        train_gan(paper_mlp_spec(), GanRecipe(epochs=1), gaussian2d(200).float(), seed=0)
    with pytest.raises(ConfigError, match="batch_size"):
        train_gan(paper_mlp_spec(), GanRecipe(epochs=1), gaussian2d(50), seed=0)


def test_the_mask_weights_real_terms_and_keeps_the_divisor():
    spec, nets = paper_mlp_spec(), GanNets(paper_mlp_spec())
    g, d = params_of(build_generator(spec)), params_of(build_discriminator(spec))
    x, z = gaussian2d(4), torch.randn(4, 10, dtype=torch.float64)
    full = d_loss(nets, g, d, x, torch.ones(4, dtype=torch.float64), z)
    dropped = d_loss(nets, g, d, x, torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64), z)
    real_term = torch.nn.functional.softplus(-nets.D(d, x[2:3]))[0]
    torch.testing.assert_close(full - dropped, real_term / 4, rtol=1e-12, atol=0)


CASES = [("mlp", "sgd", "simultaneous", 0.0), ("mlp", "sgd", "alternating", 0.9),
         ("mlp", "adam", "simultaneous", 0.0), ("mlp", "adam", "alternating", 0.0),
         ("conv", "sgd", "simultaneous", 0.5), ("conv", "adam", "alternating", 0.0)]


@pytest.mark.parametrize(("arch", "optimizer", "updates", "momentum"), CASES)
def test_replay_of_the_traced_window_is_bit_for_bit(arch, optimizer, updates, momentum, tmp_path):
    spec, data = (paper_mlp_spec(), gaussian2d(250)) if arch == "mlp" else (CONV, images(130))
    recipe = GanRecipe(epochs=3, batch_size=50 if arch == "mlp" else 40, optimizer=optimizer, momentum=momentum,
                       updates=updates, trace_epochs=2, weight_decay=1e-3, lr_d=1e-2, lr_g=1e-2)
    trained = train_gan(spec, recipe, data, seed=7)
    assert trained.trace.steps == 2 * (data.shape[0] // recipe.batch_size)
    assert len(trained.history) == 3 and np.isfinite(trained.history[-1]["d_loss"])
    start = params_of(build_generator(spec, seed=7))
    assert not _equal(start, trained.g_state)  # training moved G
    g, d = replay(spec, recipe, trained.trace, data)
    assert _equal(g, trained.g_state) and _equal(d, trained.d_state)
    # through the safetensors file
    trained.trace.save(tmp_path / "trace.safetensors")
    loaded = GanTrace.load(tmp_path / "trace.safetensors")
    assert _equal(loaded.optimizer_start, trained.trace.optimizer_start)
    g2, d2 = replay(spec, recipe, loaded, data)
    assert _equal(g2, trained.g_state) and _equal(d2, trained.d_state)
    # the all-ones counterfactual is the replay
    g3, d3 = replay(spec, recipe, trained.trace, data, keep=torch.ones(data.shape[0]))
    assert _equal(g3, g) and _equal(d3, d)


def test_counterfactual_replay_changes_only_through_instances_in_the_window():
    spec, data = paper_mlp_spec(), gaussian2d(230)
    recipe = GanRecipe(epochs=2, batch_size=50, lr_d=1e-2, lr_g=1e-2)
    trained = train_gan(spec, recipe, data, seed=1)
    seen = trained.trace.in_window(230)
    assert int(seen.sum()) == 200  # 4 full batches; 30 rows sit the traced epoch out
    outside, inside = int(torch.nonzero(~seen)[0]), int(torch.nonzero(seen)[0])
    for row, changes in ((outside, False), (inside, True)):
        keep = torch.ones(230, dtype=torch.float64)
        keep[row] = 0.0
        g, d = replay(spec, recipe, trained.trace, data, keep=keep)
        assert _equal(g, trained.g_state) is not changes and _equal(d, trained.d_state) is not changes
    # G sees the removal only through D (simultaneous updates: one step later), so D moves more
    keep = torch.ones(230, dtype=torch.float64)
    keep[inside] = 0.0
    g, d = replay(spec, recipe, trained.trace, data, keep=keep)
    moved_d = max(float((d[k] - trained.d_state[k]).abs().max()) for k in d)
    assert moved_d > 1e-8


def test_retrain_from_scratch_with_all_ones_is_training_and_a_mask_changes_it():
    spec, data = CONV, images(90)
    recipe = GanRecipe(epochs=2, batch_size=30, optimizer="adam", lr_d=1e-3, lr_g=1e-3)
    trained = train_gan(spec, recipe, data, seed=5)
    same = retrain_gan(spec, recipe, data, 5, torch.ones(90))
    assert _equal(same.g_state, trained.g_state) and _equal(same.d_state, trained.d_state)
    keep = torch.ones(90)
    keep[:9] = 0.0
    other = retrain_gan(spec, recipe, data, 5, keep)
    assert not _equal(other.d_state, trained.d_state)
    assert _equal(other.trace.start_g, trained.trace.start_g) is False  # the mask acts before the window too


def test_optimizer_state_is_part_of_the_trace():
    spec = paper_mlp_spec()
    g, d = params_of(build_generator(spec)), params_of(build_discriminator(spec))
    adam = initial_state(GanRecipe(optimizer="adam"), g, d)
    assert {"D.step", "G.step", "D.exp_avg.1.weight", "G.exp_avg_sq.4.bias"} <= set(adam)
    assert set(initial_state(GanRecipe(momentum=0.9), g, d)) == {f"{p}.momentum.{k}" for p, s in (("D", d), ("G", g))
                                                                  for k in s}
    assert initial_state(GanRecipe(), g, d) == {}


@pytest.mark.parametrize(("optimizer", "updates"), [("sgd", "alternating"), ("adam", "alternating"),
                                                    ("adam", "simultaneous")])
def test_the_differentiable_step_computes_the_same_update_as_training(optimizer, updates):
    """create_graph=True (the influence passes) must not change the arithmetic: with alternating
    updates a naive G gradient would also follow theta_G -> D's fakes -> theta_D'."""
    spec, nets = paper_mlp_spec(), GanNets(paper_mlp_spec())
    recipe = GanRecipe(optimizer=optimizer, updates=updates, momentum=0.0)
    g, d = params_of(build_generator(spec, 2)), params_of(build_discriminator(spec, 2))
    state = initial_state(recipe, g, d)
    gen = torch.Generator().manual_seed(0)
    x, z_d, z_g = (torch.randn(6, k, dtype=torch.float64, generator=gen) for k in (2, 10, 10))
    mask = torch.ones(6, dtype=torch.float64)
    plain = gan_step(nets, recipe, g, d, state, x, mask, z_d, z_g, 0.1, 0.1)
    leaves = {k: v.clone().requires_grad_(True) for k, v in g.items()}, {k: v.clone().requires_grad_(True)
                                                                           for k, v in d.items()}
    graph = gan_step(nets, recipe, *leaves, state, x, mask.requires_grad_(True), z_d, z_g, 0.1, 0.1, create_graph=True)
    for new, ref in ((graph.g, plain.g), (graph.d, plain.d)):
        for k in ref:
            torch.testing.assert_close(new[k].detach(), ref[k], rtol=1e-14, atol=1e-16)

"""The hand-written numpy pass of the MONSTOR-style surrogate (issue 20's one-shot speed): its spread and
its gradient in the keep-weights must be autograd's (float32) to float32 precision, at x = 1 (one-shot),
at continuous weights and with edges cut (the relaxation's steps and rounded cuts), on a surrogate whose
MLP matters; and its Adam must be torch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleanse.graphs.monstor_pass import MonstorPass
from cleanse.graphs.selection import AutogradPass, _Adam, oneshot_scores, top_edges
from cleanse.graphs.surrogate import SpreadSurrogate, SurrogateConfig, fit_surrogate, make_instances


def _graph(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A sparse random digraph (out-degree about 3) with a few certain edges (p = 1), so that nodes
    saturate, and probabilities in [0.05, 0.9] elsewhere."""
    gen = np.random.default_rng(seed)
    pairs = {(int(u), int(v)) for u, v in gen.integers(0, n, (3 * n, 2)) if u != v}
    ei = np.array(sorted(pairs)).T
    p = gen.uniform(0.05, 0.9, ei.shape[1])
    p[gen.random(ei.shape[1]) < 0.05] = 1.0
    return ei, p


def _surrogate(ei: np.ndarray, p: np.ndarray, n: int, layers: int = 4) -> SpreadSurrogate:
    torch.manual_seed(5)
    model = SpreadSurrogate(ei, p, n, SurrogateConfig(kind="monstor", layers=layers)).eval()
    with torch.no_grad():
        model.step[-1].bias.fill_(1.5)  # a correction of the size training gives, so every MLP path counts
    return model


@pytest.mark.parametrize("layers", [1, 4, 6])
def test_numpy_pass_is_autograds_spread_and_gradient(layers):
    ei, p = _graph()
    model, seeds = _surrogate(ei, p, 60, layers), np.array([0, 7, 30])
    hood = model.neighbourhood(seeds)
    fast, reference = MonstorPass.of(model, hood), AutogradPass(model, hood)
    m = int(hood.edges.shape[0])
    gen = np.random.default_rng(1)
    cut = np.ones(m)
    cut[gen.choice(m, m // 5, replace=False)] = 0.0
    for x in (np.ones(m), gen.uniform(0.0, 1.0, m), cut):
        value, grad = fast.spread_and_gradient(x)
        expected, expected_grad = reference.spread_and_gradient(x)
        assert value == pytest.approx(expected, rel=1e-6) and fast.spread(x) == value
        scale = np.abs(expected_grad).max()
        assert scale > 0.1  # a gradient that matters
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5 * scale)


def test_numpy_one_shot_ranks_as_autograd_on_a_trained_surrogate():
    """On a surrogate fitted to Monte Carlo labels (the benchmark's recipe, small), the one-shot
    scores and their top cut are autograd's."""
    ei, p = _graph(80, seed=3)
    gen, seeds = np.random.default_rng(0), np.array([1, 2, 3])
    train = make_instances("IC", ei, p, 80, seeds, 12, 100, gen)
    model = SpreadSurrogate(ei, p, 80, SurrogateConfig(kind="monstor", epochs=3))
    fit_surrogate(model, train)
    hood = model.neighbourhood(seeds)
    expected = np.zeros(ei.shape[1])
    expected[hood.edges.numpy()] = AutogradPass(model, hood).spread_and_gradient(np.ones(hood.edges.shape[0]))[1]
    score = oneshot_scores(model, seeds)
    np.testing.assert_allclose(score, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    gaps = np.diff(np.sort(expected)[::-1][:11])
    if np.abs(gaps).min() > 1e-4 * np.abs(expected).max():  # no float tie inside the top 10
        assert np.array_equal(top_edges(score, 10), top_edges(expected, 10))


def test_mlp_conversion_follows_parameter_edits():
    ei, p = _graph()
    model, seeds = _surrogate(ei, p, 60), np.array([0])
    hood = model.neighbourhood(seeds)
    x = np.ones(int(hood.edges.shape[0]))
    before = MonstorPass.of(model, hood).spread(x)
    with torch.no_grad():
        model.step[-1].bias.fill_(-3.0)
    after = MonstorPass.of(model, hood).spread(x)
    assert after < before - 1 and after == pytest.approx(AutogradPass(model, hood).spread(x), rel=1e-6)


def test_adam_is_torchs():
    gen = np.random.default_rng(2)
    a = gen.normal(size=7)
    param = torch.tensor(a.copy(), requires_grad=True)
    opt, ours = torch.optim.Adam([param], lr=0.5), _Adam(7, 0.5)
    for _ in range(6):
        grad = gen.normal(size=7)
        param.grad = torch.tensor(grad)
        opt.step()
        ours.step(a, grad)
    np.testing.assert_allclose(a, param.detach().numpy(), rtol=1e-12)

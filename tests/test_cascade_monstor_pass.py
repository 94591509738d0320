"""The hand-written pass of the MONSTOR-style surrogate (issue 20's one-shot speed), in both backends
(numpy calls and the numba kernel, where numba imports): its spread and its gradient in the keep-weights
must be autograd's (float32) to float32 precision, at x = 1 (one-shot), at continuous weights and with
edges cut (the relaxation's steps and rounded cuts), on a surrogate whose MLP matters; and its Adam must
be torch's."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from cleanse.errors import ConfigError
from cleanse.graphs.monstor_pass import BACKENDS, MonstorPass
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


def test_numba_is_the_default_backend():
    assert BACKENDS == ("numba", "numpy")  # numba is in the graph extra, which the tests install


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers", [1, 4, 6])
def test_pass_is_autograds_spread_and_gradient(layers, backend):
    ei, p = _graph()
    model, seeds = _surrogate(ei, p, 60, layers), np.array([0, 7, 30])
    hood = model.neighbourhood(seeds)
    fast, reference = MonstorPass.of(model, hood, backend), AutogradPass(model, hood)
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


def test_one_shot_ranks_as_autograd_on_a_trained_surrogate():
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_conversion_follows_parameter_edits(backend):
    ei, p = _graph()
    model, seeds = _surrogate(ei, p, 60), np.array([0])
    hood = model.neighbourhood(seeds)
    x = np.ones(int(hood.edges.shape[0]))
    before = MonstorPass.of(model, hood, backend).spread(x)
    with torch.no_grad():
        model.step[-1].bias.fill_(-3.0)
    after = MonstorPass.of(model, hood, backend).spread(x)
    assert after < before - 1 and after == pytest.approx(AutogradPass(model, hood).spread(x), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_without_out_edges_spread_only_themselves(backend):
    """No node has inflow at any layer: the MLP runs on no rows, the spread is the seed count and the
    gradient is autograd's (only the seeds' degree features reach the MLP, whose output is unused)."""
    ei, p = _graph()
    sinks = np.setdiff1d(np.arange(60), ei[0])[:2]
    model = _surrogate(ei, p, 60)
    hood = model.neighbourhood(sinks)
    x = np.ones(int(hood.edges.shape[0]))
    value, grad = MonstorPass.of(model, hood, backend).spread_and_gradient(x)
    assert value == len(sinks) == 2
    np.testing.assert_allclose(grad, AutogradPass(model, hood).spread_and_gradient(x)[1], atol=1e-7)


def test_unknown_backend_is_refused():
    ei, p = _graph()
    model = _surrogate(ei, p, 60)
    with pytest.raises(ConfigError, match="backend must be one of"):
        MonstorPass.of(model, model.neighbourhood(np.array([0])), "cuda")


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


def test_without_numba_the_numpy_pass_runs():
    """Where numba does not import (it is in the graph extra), the numpy backend is the only one and the
    default, and building a surrogate does not fail."""
    code = ("import sys; sys.modules['numba'] = None\n"
            "import numpy as np\n"
            "from cleanse.graphs.monstor_pass import BACKENDS, MonstorPass, warm_kernel\n"
            "from cleanse.graphs.surrogate import SpreadSurrogate, SurrogateConfig\n"
            "model = SpreadSurrogate(np.array([[0, 1], [1, 2]]), np.array([0.5, 0.5]), 3, SurrogateConfig(kind='monstor'))\n"
            "hood = model.neighbourhood(np.array([0]))\n"
            "print(BACKENDS, MonstorPass.of(model, hood).backend, warm_kernel())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["('numpy',)", "numpy", "0.0"]


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("layers", [1, 2, 4])
def test_compiled_neighbourhood_search_is_the_numpy_one(shuffled, layers):
    """The compiled search (the default where numba imports) returns the numpy search's edges, order,
    ``flowing``, nodes and local ids, on part of the graph (1-2 layers) and on all of it (4 layers)."""
    from cleanse.graphs.monstor_kernel import neighbourhood

    ei, p = _graph(60, seed=2)
    if shuffled:
        order = np.random.default_rng(1).permutation(ei.shape[1])
        ei, p = ei[:, order], p[order]
    model = _surrogate(ei, p, 60, layers)
    sizes = set()
    for seeds in (np.array([0]), np.array([3, 50, 51]), np.array([7, 7, 40]), np.arange(60)):
        expected = model._search(seeds)
        hood = model.neighbourhood(seeds)
        numpy_hood = model.neighbourhood(seeds, "numpy")
        assert numpy_hood.flowing == hood.flowing
        for a, b in zip((hood.edges, hood.src, hood.dst, hood.p, hood.seeds), (numpy_hood.edges, numpy_hood.src,
                                                                             numpy_hood.dst, numpy_hood.p, numpy_hood.seeds)):
            assert torch.equal(a, b)
        got = neighbourhood(model._out.order, model._out.start, model._in.order, model._in.start, model._src_np,
                            model._dst_np, seeds, layers, 60)
        assert tuple(got[1].tolist()) == expected[1] == hood.flowing
        for a, b in zip((got[0], got[2], got[3], got[4]), (expected[0], expected[2], expected[3], expected[4])):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(hood.edges.numpy(), expected[0])
        sizes.add(expected[0].size == ei.shape[1])
    assert True in sizes and (layers == 4 or False in sizes)  # the relabelling and the global-id case

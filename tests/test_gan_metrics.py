"""GAN metrics (issue 17): FID against closed forms and scipy, with a finite-difference gradient
check; IS at its bounds; ALL against a direct numpy computation; the D-loss and its direction;
the feature classifier's accuracy on held-out digits; Isolation Forest scores on planted outliers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group
from sklearn.datasets import load_digits
from torch import nn

from cleanse.errors import ConfigError
from cleanse.families.gan import metrics as M
from cleanse.families.gan.features import FEATURE_DIM, FeatureNet, train_feature_net
from cleanse.families.gan.outliers import isolation_forest_scores


@dataclass(frozen=True)
class Spec:  # the fields of GanSpec the metrics read
    data_shape: tuple[int, ...]
    z_dim: int
    dtype: str


IMG = Spec((1, 8, 8), 6, "float32")
TOY = Spec((2,), 3, "float64")


def image_g(spec) -> nn.Module:
    return nn.Sequential(nn.Linear(spec.z_dim, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))


def toy_g(spec) -> nn.Module:
    return nn.Sequential(nn.Linear(spec.z_dim, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def toy_d(spec) -> nn.Module:
    return nn.Sequential(nn.Linear(2, 1), nn.Flatten(0)).double()


def params(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.normal_(p, std=0.7)
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = (d.data / 16.0 * 2 - 1).astype(np.float32).reshape(-1, 1, 8, 8)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order[:1300]], d.target[order[:1300]], x[order[1300:]], d.target[order[1300:]]


@pytest.fixture(scope="module")
def net(digits):
    torch.set_num_threads(1)
    x, y, xt, yt = digits
    return train_feature_net(x, y, seed=0, epochs=20, test_images=xt, test_labels=yt)


# ----------------------------------------------------------------------------- FID


def test_fid_of_two_gaussians_matches_the_closed_form():
    """Rotated covariances S_k = R D_k R^T commute, so Tr (S1 S2)^1/2 = sum sqrt(d1 d2): the FID is
    ||mu1 - mu2||^2 + sum (sqrt d1 - sqrt d2)^2, from sample moments of 200k draws within MC error."""
    rng = np.random.default_rng(1)
    f = 5
    rot = ortho_group.rvs(f, random_state=2)
    d1, d2 = rng.uniform(0.2, 3.0, f), rng.uniform(0.2, 3.0, f)
    mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
    s1, s2 = rot @ np.diag(d1) @ rot.T, rot @ np.diag(d2) @ rot.T
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum())
    exact = M.frechet_distance_exact(mu1, s1, mu2, s2)
    assert exact == pytest.approx(closed, rel=1e-10)
    a, b = rng.multivariate_normal(mu1, s1, 200_000), rng.multivariate_normal(mu2, s2, 200_000)
    (ma, ca), (mb, cb) = M.mean_cov(torch.as_tensor(a)), M.mean_cov(torch.as_tensor(b))
    sampled = M.frechet_distance_torch(ma, ca, mb, cb).item()
    assert sampled == pytest.approx(closed, abs=0.05)
    assert M.frechet_distance_exact(ma.numpy(), ca.numpy(), mb.numpy(), cb.numpy()) == pytest.approx(sampled, rel=1e-9)
    assert M.frechet_distance_exact(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_differentiable_fid_equals_scipy_on_non_commuting_covariances():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
        s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
        mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
        torch_value = M.frechet_distance_torch(*(torch.as_tensor(v) for v in (mu1, s1, mu2, s2))).item()
        assert torch_value == pytest.approx(M.frechet_distance_exact(mu1, s1, mu2, s2), rel=1e-9)


def test_differentiable_fid_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    real = torch.as_tensor(rng.normal(size=(60, 4)) @ rng.normal(size=(4, 4)))
    mu_r, cov_r = M.mean_cov(real)
    fake = torch.as_tensor(rng.normal(size=(40, 4)) * 0.5 + 1.0, dtype=torch.float64).requires_grad_(True)

    def fid(x):
        return M.frechet_distance_torch(*M.mean_cov(x), mu_r, cov_r)

    assert torch.autograd.gradcheck(fid, (fake,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_fid_metric_on_fixed_latents_is_deterministic_exact_and_differentiable(digits, net):
    x, _, xt, _ = digits
    metric = M.make_metric("fid", real=torch.as_tensor(xt), spec=IMG, n_latents=300, seed=5, feature_net=net,
                           build_g=image_g)
    assert metric.direction == -1
    g = params(image_g(IMG), 0)
    fn = metric.differentiable(IMG)
    value = fn(g, {})
    exact = metric.evaluate(g, {}, IMG)
    assert value.item() == pytest.approx(exact, rel=1e-5)
    again = M.make_metric("fid", real=torch.as_tensor(xt), spec=IMG, n_latents=300, seed=5, feature_net=net,
                          build_g=image_g)
    assert again.evaluate(g, {}, IMG) == exact
    other = M.make_metric("fid", real=torch.as_tensor(xt), spec=IMG, n_latents=300, seed=6, feature_net=net,
                          build_g=image_g)
    assert other.evaluate(g, {}, IMG) != exact
    # Real digits score far better than the random generator's blobs, and real-vs-real is small.
    real_only = M.mean_cov(torch.as_tensor(net.embed(x)))
    floor = M.frechet_distance_exact(*(t.numpy() for t in real_only), *(t.numpy() for t in M.mean_cov(
        torch.as_tensor(net.embed(xt)))))
    assert floor < 0.2 * exact
    # The gradient w.r.t. the generator's parameters: a directional central difference.
    grads = torch.autograd.grad(fn({k: v.requires_grad_(True) for k, v in g.items()}, {}), list(g.values()))
    direction = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in g.items()}
    analytic = sum(float((gr * direction[k]).sum()) for gr, k in zip(grads, g))
    h = 1e-2
    plus = metric.evaluate({k: v.detach() + h * direction[k] for k, v in g.items()}, {}, IMG)
    minus = metric.evaluate({k: v.detach() - h * direction[k] for k, v in g.items()}, {}, IMG)
    assert analytic == pytest.approx((plus - minus) / (2 * h), rel=0.03)


# ----------------------------------------------------------------------------- IS


def test_inception_score_bounds_and_a_direct_computation():
    assert M.inception_score(torch.zeros(50, 10)).item() == pytest.approx(1.0, abs=1e-12)
    confident = 60.0 * nn.functional.one_hot(torch.arange(100) % 10, 10).double()
    assert M.inception_score(confident).item() == pytest.approx(10.0, rel=1e-9)
    one_class = 60.0 * nn.functional.one_hot(torch.zeros(100, dtype=torch.long), 10).double()
    assert M.inception_score(one_class).item() == pytest.approx(1.0, abs=1e-9)
    logits = np.random.default_rng(8).normal(size=(30, 4)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    py = p.mean(0)
    direct = np.exp(np.mean([(pi * np.log(pi / py)).sum() for pi in p]))
    assert M.inception_score(torch.as_tensor(logits)).item() == pytest.approx(direct, rel=1e-10)


def test_is_metric_rises_for_a_generator_of_real_digits(digits, net):
    """A generator whose output is a real digit picked by a one-hot latent scores near 10 (the
    classifier is confident and the classes balanced); a constant grey image scores near 1."""
    _, _, xt, yt = digits
    protos = torch.as_tensor(np.stack([xt[yt == c][0] for c in range(10)]).reshape(10, 64))
    spec = Spec((1, 8, 8), 10, "float32")

    def picker(spec):
        return nn.Sequential(nn.Linear(10, 64, bias=False), nn.Unflatten(1, (1, 8, 8)))

    metric = M.make_metric("is", real=torch.as_tensor(xt), spec=spec, n_latents=500, seed=0, feature_net=net,
                           build_g=picker)
    assert metric.direction == 1
    constant = {"0.weight": torch.zeros(64, 10)}  # every sample the same image: one predicted class
    assert metric.evaluate(constant, {}, spec) == pytest.approx(1.0, abs=1e-6)
    # z ~ N(0, I): its largest coordinate picks a real digit of that class, so the classes are balanced.
    onehot_g = M.make_metric("is", real=torch.as_tensor(xt), spec=spec, n_latents=500, seed=0, feature_net=net,
                             build_g=lambda s: _ArgmaxPicker(protos))
    assert onehot_g.evaluate({}, {}, spec) > 8.5


class _ArgmaxPicker(nn.Module):
    def __init__(self, protos: torch.Tensor) -> None:
        super().__init__()
        self.protos = protos

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.protos[z.argmax(1)].reshape(-1, 1, 8, 8)


# ----------------------------------------------------------------------------- ALL and D-loss


def test_all_equals_a_direct_numpy_kde():
    real = torch.as_tensor(np.random.default_rng(9).normal(size=(40, 2)) + 1.0)
    metric = M.make_metric("all", real=real, spec=TOY, n_latents=25, seed=1, build_g=toy_g)
    assert metric.direction == 1
    g = params(toy_g(TOY), 1)
    value = metric.differentiable(TOY)(g, {}).item()
    generated = torch.func.functional_call(toy_g(TOY), g, (M.fixed_latents(1, 25, 3, torch.float64),)).detach().numpy()
    x = real.numpy()
    dens = np.array([np.mean([np.exp(-0.5 * np.sum((xi - gi) ** 2)) / (2 * np.pi) for gi in generated]) for xi in x])
    assert value == pytest.approx(np.log(dens).mean(), rel=1e-12)
    assert metric.evaluate(g, {}, TOY) == value
    # Moving the generated points onto the real distribution raises ALL.
    shifted = dict(g)
    shifted["2.bias"] = g["2.bias"] + torch.as_tensor(x.mean(0) - generated.mean(0))
    assert metric.evaluate(shifted, {}, TOY) > value


def test_dloss_value_and_direction():
    rng = np.random.default_rng(10)
    train = torch.as_tensor(rng.normal(size=(50, 2)) + 3.0)
    metric = M.make_metric("dloss", real=train[:5], spec=TOY, n_latents=30, seed=2, train_data=train,
                           build_g=toy_g, build_d=toy_d)
    assert metric.direction == -1
    g = params(toy_g(TOY), 2)
    fake = torch.func.functional_call(toy_g(TOY), g, (M.fixed_latents(2, 30, 3, torch.float64),)).detach().numpy()
    good = {"0.weight": torch.tensor([[1.0, 1.0]], dtype=torch.float64), "0.bias": torch.tensor([-3.0],
                                                                                             dtype=torch.float64)}
    bad = {k: -v for k, v in good.items()}

    def softplus(v):
        return np.log1p(np.exp(v))

    def direct(d):
        w, b = d["0.weight"].numpy()[0], d["0.bias"].numpy()[0]
        return softplus(-(train.numpy() @ w + b)).mean() + softplus(fake @ w + b).mean()

    assert metric.evaluate(g, good, TOY) == pytest.approx(direct(good), rel=1e-12)
    # A discriminator that tells real (around (3, 3)) from fake apart has the lower loss.
    assert metric.evaluate(g, good, TOY) < metric.evaluate(g, bad, TOY)
    fn = metric.differentiable(TOY)
    d_req = {k: v.clone().requires_grad_(True) for k, v in good.items()}
    g_req = {k: v.clone().requires_grad_(True) for k, v in g.items()}
    grads = torch.autograd.grad(fn(g_req, d_req), [*g_req.values(), *d_req.values()])
    assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)


def test_harm_direction_is_the_sign_of_improvement():
    """direction * (M(after) - M(before)) > 0 exactly when the metric improved."""
    assert M.DIRECTIONS == {"all": 1, "fid": -1, "is": 1, "dloss": -1}
    for name, better, worse in (("all", -1.0, -2.0), ("is", 5.0, 2.0), ("fid", 3.0, 9.0), ("dloss", 0.5, 1.2)):
        assert M.DIRECTIONS[name] * (better - worse) > 0


# ----------------------------------------------------------------------------- feature net, bad input


def test_feature_net_accuracy_and_round_trip(digits, net, tmp_path):
    _, _, xt, yt = digits
    assert net.accuracy >= 0.97
    assert np.mean(net.predict(xt) == yt) == net.accuracy
    assert net.features(torch.as_tensor(xt[:3])).shape == (3, FEATURE_DIM)
    net.save(tmp_path / "fnet.safetensors")
    back = FeatureNet.load(tmp_path / "fnet.safetensors")
    assert back.accuracy == net.accuracy and back.data_shape == (1, 8, 8)
    assert np.array_equal(back.embed(xt[:20]), net.embed(xt[:20]))
    unmeasured = train_feature_net(xt[:64], yt[:64], seed=0, epochs=1)
    unmeasured.save(tmp_path / "plain.safetensors")
    assert "NaN" not in (tmp_path / "plain.json").read_text()
    assert np.isnan(FeatureNet.load(tmp_path / "plain.safetensors").accuracy)
    # An untrained net (same architecture) is near chance: the accuracy check can fail.
    x, y, _, _ = digits
    untrained = train_feature_net(x[:64], y[:64], seed=0, epochs=0, test_images=xt, test_labels=yt)
    assert untrained.accuracy < 0.5


def test_bad_input_is_refused_in_one_line(digits, net):
    _, _, xt, _ = digits
    real = torch.as_tensor(xt)
    cases = [
        (dict(name="kid"), "not one of"),
        (dict(name="fid"), "feature classifier"),
        (dict(name="fid", feature_net=net, n_latents=FEATURE_DIM), "must exceed"),
        (dict(name="dloss"), "training data"),
    ]
    for kwargs, message in cases:
        args = dict(real=real, spec=IMG, n_latents=200, seed=0, build_g=image_g) | kwargs
        with pytest.raises(ConfigError, match=message) as info:
            M.make_metric(args.pop("name"), **args)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="shape"):
        net.features(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ConfigError, match="single class"):
        train_feature_net(xt[:20], np.zeros(20, dtype=np.int64), seed=0)


# ----------------------------------------------------------------------------- Isolation Forest


def test_isolation_forest_ranks_planted_far_points_first():
    rng = np.random.default_rng(11)
    angle, radius = rng.uniform(0, 2 * np.pi, 15), rng.uniform(6, 8, 15)
    x = np.vstack([rng.normal(size=(300, 2)), np.c_[radius * np.cos(angle), radius * np.sin(angle)]])
    scores = isolation_forest_scores(x, seed=0)
    assert scores.shape == (315,)
    assert set(np.argsort(-scores)[:15]) == set(range(300, 315))
    assert np.array_equal(scores, isolation_forest_scores(x, seed=0))
    with pytest.raises(ConfigError, match="rows"):
        isolation_forest_scores(x[:1], seed=0)


# ----------------------------------------------------------------------------- the family's own nets


def test_metrics_on_the_family_networks_match_finite_differences(digits, net):
    """With the default factories (nets.build_generator / build_discriminator): every metric's
    gradient along a random direction of (G, D) parameters equals a central difference of its
    exact evaluation, all in float64 (the feature net cast with ``astype``) so that a step of 1e-7
    resolves the derivative: in float32 the difference quotient of the conv GAN's IS drifts by 2%
    between steps of 1e-3 and 1e-4 (ReLU and max-pool kinks, float32 rounding), in float64 it
    agrees with autograd to 1e-8."""
    from cleanse.families.gan.nets import GanSpec, build_discriminator, build_generator, params_of, paper_mlp_spec

    mlp = paper_mlp_spec()
    conv = GanSpec("conv", (1, 8, 8), 8, (16, 8), (8, 16), "float64")
    net64 = net.astype(torch.float64)
    real2d = torch.as_tensor(np.random.default_rng(12).normal(size=(80, 2)) + 1.0)
    _, _, xt, _ = digits
    cases = [
        (mlp, M.make_metric("all", real=real2d, spec=mlp, n_latents=100, seed=0), 1e-7, 1e-5),
        (mlp, M.make_metric("dloss", real=real2d, spec=mlp, n_latents=100, seed=0, train_data=real2d), 1e-7, 1e-5),
        (conv, M.make_metric("fid", real=torch.as_tensor(xt), spec=conv, n_latents=200, seed=0, feature_net=net64),
         1e-7, 1e-5),
        (conv, M.make_metric("is", real=torch.as_tensor(xt), spec=conv, n_latents=200, seed=0, feature_net=net64),
         1e-7, 1e-5),
    ]
    for spec, metric, h, rel in cases:
        g, d = params_of(build_generator(spec, seed=1)), params_of(build_discriminator(spec, seed=1))
        fn = metric.differentiable(spec)
        gr = {k: v.clone().requires_grad_(True) for k, v in g.items()}
        dr = {k: v.clone().requires_grad_(True) for k, v in d.items()}
        value = fn(gr, dr)
        assert value.item() == pytest.approx(metric.evaluate(g, d, spec), rel=1e-5), metric.name
        grads = torch.autograd.grad(value, [*gr.values(), *dr.values()], allow_unused=True)
        gen = torch.Generator().manual_seed(3)
        step = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in {**g, **{"D." + k: v for k, v in
                                                                                              d.items()}}.items()}
        keys = [*g, *("D." + k for k in d)]
        analytic = sum(float((gv * step[k]).sum()) for gv, k in zip(grads, keys) if gv is not None)
        moved = [({k: v + s * h * step[k] for k, v in g.items()}, {k: v + s * h * step["D." + k] for k, v in d.items()})
                 for s in (1, -1)]
        numeric = (metric.evaluate(*moved[0], spec) - metric.evaluate(*moved[1], spec)) / (2 * h)
        assert analytic == pytest.approx(numeric, rel=rel, abs=1e-8), metric.name
        assert abs(analytic) > 1e-6, metric.name

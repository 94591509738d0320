"""GAN evaluation metrics as deterministic, differentiable functions of the parameters.

Terashita et al. (ICLR 2021) score a training instance by the predicted change of an evaluation
metric ``M`` when it is removed; ``M`` must be differentiable in the generator's (and for the
D-loss, the discriminator's) parameters. Every metric here is built on FIXED latents
``z`` ``(n_latents, z_dim)`` (standard normal, stream ``"gan.metric_latents"``) and a fixed real
set, so ``M`` is a deterministic function of ``(g_params, d_params)``.

- ``all`` (direction +1): KDE average log-likelihood (spec §2.5). With ``g_i = G(z_i)`` flattened
  to ``d`` values, ``ALL = mean_x log[(1/n) sum_i N(x; g_i, I_d)]`` over the real held-out points
  ``x``: unit-variance isotropic Gaussian kernels, natural log.
- ``fid`` (direction -1): Fréchet distance between Gaussians fitted to the feature net's
  penultimate features (:mod:`.features`) of the real set and of ``G(z)``:
  ``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})`` (covariances with divisor ``n - 1``).
  Differentiable form: ``Tr (S_r S_g)^{1/2} = Tr (A S_g A)^{1/2}`` with ``A = S_r^{1/2}``, through
  ``torch.linalg.eigh`` of the symmetric PSD ``A S_g A`` with eigenvalues clamped at
  ``1e-10 * max(1, largest)`` (their square root has an infinite slope at 0). Exact evaluation:
  ``scipy.linalg.sqrtm(S_r S_g)``, real part.
- ``is`` (direction +1): ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y|x)`` the feature net's
  softmax on ``G(z)`` and ``p(y)`` its mean.
- ``dloss`` (direction -1): the discriminator's non-saturating loss
  ``mean_j softplus(-D(x_j)) + mean_i softplus(D(G(z_i)))`` over ALL real training instances
  ``x_j`` and the fixed fakes (differentiable in both networks).

Influence sign (contract): harm score = ``direction * I_j`` with ``I_j = M(without j) - M``.
A :class:`MetricFn` is ``(g_params, d_params) -> scalar Tensor``; it evaluates
``build_generator(spec)`` / ``build_discriminator(spec)`` (:mod:`cleanse.families.gan.nets`)
with ``torch.func.functional_call``; ``build_g``/``build_d`` replace those factories (tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from cleanse import seeds
from cleanse.errors import ConfigError
from cleanse.families.gan.features import FEATURE_DIM, FeatureNet

if TYPE_CHECKING:
    from cleanse.families.gan.nets import GanSpec

MetricFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]
ModuleFactory = Callable[[Any], nn.Module]
METRICS = ("all", "fid", "is", "dloss")
DIRECTIONS = {"all": 1, "fid": -1, "is": 1, "dloss": -1}


class GanMetric(Protocol):
    name: str
    direction: int

    def differentiable(self, spec: GanSpec) -> MetricFn: ...

    def evaluate(self, g_state: dict[str, torch.Tensor], d_state: dict[str, torch.Tensor], spec: GanSpec) -> float: ...


def _default_g(spec: Any) -> nn.Module:
    from cleanse.families.gan.nets import build_generator

    return build_generator(spec)


def _default_d(spec: Any) -> nn.Module:
    from cleanse.families.gan.nets import build_discriminator

    return build_discriminator(spec)


def _dtype(spec: Any) -> torch.dtype:
    return torch.float64 if spec.dtype == "float64" else torch.float32


def fixed_latents(seed: int, n: int, z_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The metric's latents ``(n, z_dim)``, standard normal, from stream ``"gan.metric_latents"``."""
    generator = torch.Generator().manual_seed(seeds.torch_seed(seed, "gan.metric_latents"))
    return torch.randn(n, z_dim, generator=generator, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- closed forms


def kde_average_log_likelihood(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """ALL of ``real`` ``(m, ...)`` under unit Gaussian kernels on ``generated`` ``(n, ...)``."""
    g = generated.reshape(generated.shape[0], -1)
    x = real.reshape(real.shape[0], -1).to(g.dtype)
    d = g.shape[1]
    sq = (x * x).sum(1, keepdim=True) - 2 * x @ g.T + (g * g).sum(1)[None, :]
    log_density = torch.logsumexp(-0.5 * sq, dim=1) - math.log(g.shape[0]) - 0.5 * d * math.log(2 * math.pi)
    return log_density.mean()


def mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(f,)`` and covariance ``(f, f)`` (divisor ``n - 1``) of ``features`` ``(n, f)``."""
    mu = features.mean(0)
    centred = features - mu
    return mu, centred.T @ centred / (features.shape[0] - 1)


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric PSD matrix (negative eigenvalues set to 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_torch(mu_g: torch.Tensor, cov_g: torch.Tensor, mu_r: torch.Tensor, cov_r: torch.Tensor,
                           sqrt_cov_r: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable Fréchet distance (see the module docstring); ``sqrt_cov_r`` may be given."""
    a = psd_sqrt(cov_r) if sqrt_cov_r is None else sqrt_cov_r
    inner = a @ cov_g @ a
    values = torch.linalg.eigvalsh(0.5 * (inner + inner.T))
    floor = 1e-10 * max(1.0, float(values.max().detach()))
    trace_sqrt = values.clamp(min=floor).sqrt().sum()
    diff = mu_g - mu_r
    return diff @ diff + torch.trace(cov_g) + torch.trace(cov_r) - 2 * trace_sqrt


def frechet_distance_exact(mu_g: np.ndarray, cov_g: np.ndarray, mu_r: np.ndarray, cov_r: np.ndarray) -> float:
    """FID in float64 with ``scipy.linalg.sqrtm(S_r S_g)`` (its real part: the product's
    eigenvalues are real and >= 0, rounding leaves tiny imaginary parts)."""
    from scipy.linalg import sqrtm

    root = np.real(sqrtm(np.asarray(cov_r, float) @ np.asarray(cov_g, float)))
    diff = np.asarray(mu_g, float) - np.asarray(mu_r, float)
    return float(diff @ diff + np.trace(cov_g) + np.trace(cov_r) - 2 * np.trace(root))


def inception_score(logits: torch.Tensor) -> torch.Tensor:
    """``exp(mean_x KL(p(y|x) || p(y)))`` of class logits ``(n, C)``; in ``[1, C]``."""
    log_p = torch.log_softmax(logits.to(torch.float64), dim=1)
    log_py = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])
    return torch.exp((log_p.exp() * (log_p - log_py[None, :])).sum(1).mean())


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean softplus(-D(real)) + mean softplus(D(fake))`` (the non-saturating D loss)."""
    return nn.functional.softplus(-real_logits).mean() + nn.functional.softplus(fake_logits).mean()


# ----------------------------------------------------------------------------- metric objects


@dataclass
class _Metric:
    """One metric on fixed latents ``z`` and a fixed real set (see the module docstring)."""

    name: str
    z: torch.Tensor
    real: torch.Tensor
    feature_net: FeatureNet | None
    train_data: torch.Tensor | None
    build_g: ModuleFactory
    build_d: ModuleFactory
    direction: int = 0
    _real_stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.direction = DIRECTIONS[self.name]
        if self.name == "fid":
            assert self.feature_net is not None
            mu, cov = mean_cov(torch.as_tensor(self.feature_net.embed(self.real)))
            self._real_stats = (mu, cov, psd_sqrt(cov))

    def _generated(self, g_params: dict[str, torch.Tensor], spec: Any) -> torch.Tensor:
        module = self.build_g(spec)
        return functional_call(module, g_params, (self.z.to(_dtype(spec)),))

    def differentiable(self, spec: Any) -> MetricFn:
        """``(g_params, d_params) -> M`` as a scalar tensor, differentiable in the parameters."""
        generator = self.build_g(spec)
        dtype = _dtype(spec)
        z = self.z.to(dtype)
        if self.name == "all":
            real = self.real.to(dtype)
            return lambda g, d: kde_average_log_likelihood(functional_call(generator, g, (z,)), real)
        net, stats = self.feature_net, self._real_stats
        if self.name == "is":
            assert net is not None
            classifier: FeatureNet = net
            return lambda g, d: inception_score(classifier.logits(functional_call(generator, g, (z,)))).to(dtype)
        if self.name == "fid":
            assert net is not None and stats is not None
            mu_r, cov_r, sqrt_r = stats

            def fid(g: dict[str, torch.Tensor], d: dict[str, torch.Tensor]) -> torch.Tensor:
                mu_g, cov_g = mean_cov(net.features(functional_call(generator, g, (z,))).to(torch.float64))
                return frechet_distance_torch(mu_g, cov_g, mu_r, cov_r, sqrt_r).to(dtype)

            return fid
        discriminator = self.build_d(spec)
        assert self.train_data is not None
        train = self.train_data.to(dtype)

        def dloss(g: dict[str, torch.Tensor], d: dict[str, torch.Tensor]) -> torch.Tensor:
            fake = functional_call(generator, g, (z,))
            return discriminator_loss(functional_call(discriminator, d, (train,)).reshape(-1),
                                      functional_call(discriminator, d, (fake,)).reshape(-1))

        return dloss

    def evaluate(self, g_state: dict[str, torch.Tensor], d_state: dict[str, torch.Tensor], spec: Any) -> float:
        """The metric's value (FID exactly, with scipy), on the same latents; no gradients."""
        with torch.no_grad():
            if self.name != "fid":
                return float(self.differentiable(spec)(g_state, d_state))
            assert self.feature_net is not None and self._real_stats is not None
            features = self.feature_net.embed(self._generated(g_state, spec))
        mu_r, cov_r, _ = self._real_stats
        mu_g, cov_g = mean_cov(torch.as_tensor(features))
        return frechet_distance_exact(mu_g.numpy(), cov_g.numpy(), mu_r.numpy(), cov_r.numpy())


def make_metric(
    name: str,
    *,
    real: torch.Tensor,
    spec: Any,
    n_latents: int,
    seed: int,
    feature_net: FeatureNet | None = None,
    train_data: torch.Tensor | None = None,
    build_g: ModuleFactory | None = None,
    build_d: ModuleFactory | None = None,
) -> GanMetric:
    """The metric ``name`` on ``n_latents`` fixed latents and the held-out ``real`` set
    ``(m, *data_shape)``. ``fid``/``is`` need ``feature_net``; ``dloss`` needs ``train_data``
    ``(n, *data_shape)``. ``spec``: a :class:`~cleanse.families.gan.nets.GanSpec` (``z_dim``,
    ``dtype`` and ``data_shape`` are read)."""
    if name not in METRICS:
        raise ConfigError(f"metric: {name!r} is not one of {', '.join(METRICS)}")
    if n_latents < 2:
        raise ConfigError(f"metric {name}: n_latents is {n_latents}; need at least 2")
    real = torch.as_tensor(real)
    if name in ("fid", "is"):
        if feature_net is None:
            raise ConfigError(f"metric {name}: needs the feature classifier (image data only)")
        if name == "fid" and n_latents <= FEATURE_DIM:
            raise ConfigError(f"metric fid: n_latents {n_latents} must exceed the feature dimension "
                              f"{FEATURE_DIM}, or the generated covariance is singular")
    if name in ("all", "fid") and real.shape[0] < 2:
        raise ConfigError(f"metric {name}: the real set has {real.shape[0]} rows; need at least 2")
    if name == "dloss" and train_data is None:
        raise ConfigError("metric dloss: needs the training data (the D loss on real + fake)")
    z = fixed_latents(seed, n_latents, int(spec.z_dim), _dtype(spec))
    return _Metric(name=name, z=z, real=real, feature_net=feature_net,
                   train_data=None if train_data is None else torch.as_tensor(train_data),
                   build_g=build_g or _default_g, build_d=build_d or _default_d)

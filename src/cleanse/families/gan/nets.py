"""The GAN family's networks: the paper's fully connected GAN for 2-D data and a small conv GAN.

Shapes: the generator maps latents ``z`` (B, z_dim) to instances (B, *data_shape); the
discriminator maps instances (B, *data_shape) to logits (B,) (higher = "real").

- ``arch: mlp`` -- the FCGAN of Terashita et al. (ICLR 2021, "Influence Estimation for GANs"):
  G: z_dim -> [Dense h, ReLU, no bias] x len(hidden_g) -> Dense prod(data_shape) (with bias);
  D: prod(data_shape) -> [Dense h, ReLU, no bias] x len(hidden_d) -> Dense 1 (with bias).
  The paper's sizes are z_dim 10, hidden_g (32, 32), hidden_d (64, 64), float64.
- ``arch: conv`` -- a small all-conv GAN for (C, H, W) images with H and W divisible by 4
  (sklearn digits 8x8, MNIST-like 28x28); our layout, chosen to train in seconds on a CPU:
  G: Dense z_dim -> c0 * H/4 * W/4, layer norm, ELU, ConvT(c0 -> c1, 4, stride 2, pad 1),
  layer norm, ELU, ConvT(c1 -> C, 4, 2, 1), tanh (pixels in [-1, 1]) with hidden_g = (c0, c1);
  D: Conv(C -> c0, 4, 2, 1), ELU, Conv(c0 -> c1, 4, 2, 1), layer norm, ELU,
  Dense c1 * H/4 * W/4 -> 1 with hidden_d = (c0, c1).
  ELU, not the DCGAN's ReLU/LeakyReLU: the influence estimators linearise the removal of an
  instance, and with kinked activations the conv GAN's response to a whole removal was far from
  its derivative (Kendall tau 0.38-0.55 between ITD and the removal replay on a small 8x8 check,
  0.99 with ELU; the ICLR 2021 DCGAN used smooth sigmoids for the same reason of smoothness).
  Layer norm (``GroupNorm`` with one group: statistics over (C, H, W) of one instance) rather than
  batch norm, so that no instance's output depends on the other members of its batch -- the
  per-instance mask of the influence estimators needs that.

Initialisation: Glorot (Xavier) uniform weights and zero biases, as the ICLR 2021 code, drawn from
``cleanse.seeds.torch_seed(seed, "gan.init", 0)`` for G and index 1 for D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cleanse.errors import ConfigError
from cleanse.seeds import torch_seed

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class GanSpec:
    """What the two networks are: architecture, instance shape, latent size, widths and dtype."""

    arch: Literal["mlp", "conv"]
    data_shape: tuple[int, ...]
    z_dim: int
    hidden_g: tuple[int, ...]
    hidden_d: tuple[int, ...]
    dtype: Literal["float64", "float32"]

    def __post_init__(self) -> None:
        if self.arch not in ("mlp", "conv"):
            raise ConfigError(f"GAN arch {self.arch!r} is not 'mlp' or 'conv'")
        if self.dtype not in DTYPES:
            raise ConfigError(f"GAN dtype {self.dtype!r} is not 'float64' or 'float32'")
        if self.z_dim < 1 or any(h < 1 for h in (*self.hidden_g, *self.hidden_d)):
            raise ConfigError(f"GAN z_dim and hidden widths must be positive (got {self.z_dim}, "
                              f"{self.hidden_g}, {self.hidden_d})")
        if self.arch == "conv":
            if len(self.data_shape) != 3 or self.data_shape[1] % 4 or self.data_shape[2] % 4:
                raise ConfigError(f"conv GAN needs data_shape (C, H, W) with H and W divisible by 4, "
                                  f"got {self.data_shape}")
            if len(self.hidden_g) != 2 or len(self.hidden_d) != 2:
                raise ConfigError("conv GAN needs two channel widths in hidden_g and in hidden_d")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def data_dim(self) -> int:
        return math.prod(self.data_shape)

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "data_shape": list(self.data_shape), "z_dim": self.z_dim,
                "hidden_g": list(self.hidden_g), "hidden_d": list(self.hidden_d), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GanSpec:
        return cls(arch=data["arch"], data_shape=tuple(data["data_shape"]), z_dim=int(data["z_dim"]),
                   hidden_g=tuple(data["hidden_g"]), hidden_d=tuple(data["hidden_d"]), dtype=data["dtype"])


def paper_mlp_spec(data_dim: int = 2) -> GanSpec:
    """The ICLR 2021 FCGAN: G 10 -> 32 -> 32 -> data_dim, D data_dim -> 64 -> 64 -> 1, float64."""
    return GanSpec("mlp", (data_dim,), 10, (32, 32), (64, 64), "float64")


class _Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


class _Squeeze(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0])


def _mlp(sizes: list[int], out: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out, bias=False), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], out))
    return layers


def _glorot(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                nn.init.xavier_uniform_(param, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:  # layer-norm scales
                param.fill_(1.0)
    return module


def build_generator(spec: GanSpec, seed: int = 0) -> nn.Module:
    """G: z (B, z_dim) -> x (B, *data_shape), Glorot-initialised from the ``gan.init`` stream of ``seed``."""
    if spec.arch == "mlp":
        layers = [*_mlp([spec.z_dim, *spec.hidden_g], spec.data_dim), _Reshape(spec.data_shape)]
    else:
        channels, height, width = spec.data_shape
        c0, c1 = spec.hidden_g
        h, w = height // 4, width // 4
        layers = [nn.Linear(spec.z_dim, c0 * h * w), _Reshape((c0, h, w)), nn.GroupNorm(1, c0), nn.ELU(),
                  nn.ConvTranspose2d(c0, c1, 4, 2, 1), nn.GroupNorm(1, c1), nn.ELU(),
                  nn.ConvTranspose2d(c1, channels, 4, 2, 1), nn.Tanh()]
    net = nn.Sequential(*layers).to(spec.torch_dtype)
    return _glorot(net, torch_seed(seed, "gan.init", 0))


def build_discriminator(spec: GanSpec, seed: int = 0) -> nn.Module:
    """D: x (B, *data_shape) -> logits (B,), Glorot-initialised from the ``gan.init`` stream of ``seed``."""
    if spec.arch == "mlp":
        layers = [nn.Flatten(), *_mlp([spec.data_dim, *spec.hidden_d], 1), _Squeeze()]
    else:
        channels, height, width = spec.data_shape
        c0, c1 = spec.hidden_d
        layers = [nn.Conv2d(channels, c0, 4, 2, 1), nn.ELU(), nn.Conv2d(c0, c1, 4, 2, 1),
                  nn.GroupNorm(1, c1), nn.ELU(), nn.Flatten(),
                  nn.Linear(c1 * (height // 4) * (width // 4), 1), _Squeeze()]
    net = nn.Sequential(*layers).to(spec.torch_dtype)
    return _glorot(net, torch_seed(seed, "gan.init", 1))


def params_of(module: nn.Module) -> dict[str, Tensor]:
    """The module's parameters as a detached name -> tensor dict (copies)."""
    return {name: param.detach().clone() for name, param in module.named_parameters()}


def load_module(module: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """``module`` with ``state`` copied in, in eval mode, gradients off."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name not in state:
                raise ConfigError(f"GAN state has no parameter {name!r}; it was saved for another GanSpec")
            param.copy_(state[name])
            param.requires_grad_(False)
    return module.eval()

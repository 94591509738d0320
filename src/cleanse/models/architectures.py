"""Model architectures: a linear model (multinomial logistic regression; ridge regression), an MLP
and a small CNN.

All take inputs of shape ``(batch, *feature_shape)`` and return ``(batch, n_classes)`` outputs:
logits for classification, ``n_classes = 1`` predictions for regression. ``ModelSpec.family``
names the family whose loss fits the model (:mod:`cleanse.families`).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from cleanse.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's structure (weights live in safetensors)."""

    arch: str
    feature_shape: tuple[int, ...]
    n_classes: int
    hidden: tuple[int, ...]
    family: str = "classification"

    def to_json(self) -> dict[str, Any]:
        out = {**asdict(self), "feature_shape": list(self.feature_shape), "hidden": list(self.hidden)}
        if self.family == "classification":  # the key is absent from models saved before families existed
            del out["family"]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            arch=data["arch"],
            feature_shape=tuple(data["feature_shape"]),
            n_classes=int(data["n_classes"]),
            hidden=tuple(data["hidden"]),
            family=data.get("family", "classification"),
        )


def parameter_count(spec: ModelSpec) -> int:
    """The number of parameters ``build_model(spec)`` would allocate, computed from the spec alone
    (Python integers: no overflow, nothing allocated)."""
    n_inputs = 1
    for size in spec.feature_shape:
        n_inputs *= int(size)
    if spec.arch in LINEAR_ARCHS:
        return (n_inputs + 1) * spec.n_classes
    if spec.arch == "mlp":
        total, width = 0, n_inputs
        for hidden in spec.hidden:
            total += (width + 1) * int(hidden)
            width = int(hidden)
        return total + (width + 1) * spec.n_classes
    if spec.arch == "cnn" and len(spec.feature_shape) == 3:
        channels, height, width = (int(size) for size in spec.feature_shape)
        total = 0
        for out_channels in spec.hidden:
            total += (channels * 9 + 1) * int(out_channels)
            channels, height, width = int(out_channels), (height + 1) // 2, (width + 1) // 2
        return total + (channels * height * width + 1) * spec.n_classes
    return 0  # build_model names the problem


# One Linear layer on the flattened input: logistic regression under cross-entropy, ridge regression
# under squared error with the L2 penalty.
LINEAR_ARCHS = ("logreg", "ridge")

# Training holds each parameter four times in float32 (weights, gradients, Adam's two moments).
BYTES_PER_PARAMETER = 16


def memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the OS does not say."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(spec: ModelSpec) -> int:
    """Refuse a model whose training state cannot fit in this machine's memory; return its parameter count."""
    count = parameter_count(spec)
    available = memory_bytes()
    if available is not None and count * BYTES_PER_PARAMETER > available:
        raise ConfigError(
            f"model.hidden: {list(spec.hidden)} gives {count:,} parameters, whose training state "
            f"(~{count * BYTES_PER_PARAMETER / 2**30:,.1f} GiB) cannot fit in this machine's "
            f"{available / 2**30:,.1f} GiB of memory; use smaller widths"
        )
    return count


# torch initialises parameters from the process-wide CPU generator. Every construction holds this
# lock inside fork_rng, so that concurrent threads (Prefect's task runner) never draw from the
# generator between another thread's seeding and its initialisation (a TrainedModel.module() in
# one branch used to shift a cleanlab fold model's initialisation in another), and so that no
# construction moves the generator for anyone else. Reentrant: seeded_model seeds inside it.
INIT_LOCK = threading.RLock()


def build_model(spec: ModelSpec) -> nn.Module:
    """A model with torch's default initialisation drawn from the process-wide generator as it
    stands (left unchanged afterwards); use :func:`cleanse.models.trainer.seeded_model` for a
    seeded initialisation, or load a state into it."""
    check_fits_in_memory(spec)  # before torch tries to allocate it
    with INIT_LOCK, torch.random.fork_rng(devices=[]):
        return _construct(spec)


def _construct(spec: ModelSpec) -> nn.Module:
    n_inputs = 1
    for size in spec.feature_shape:
        n_inputs *= size
    if spec.arch in LINEAR_ARCHS:
        return nn.Sequential(nn.Flatten(), nn.Linear(n_inputs, spec.n_classes))
    if spec.arch == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = n_inputs
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, spec.n_classes))
        return nn.Sequential(*layers)
    if spec.arch == "cnn":
        if len(spec.feature_shape) != 3:
            raise ConfigError(
                f"model.arch: 'cnn' needs image data (C, H, W) but the features have shape {list(spec.feature_shape)}; "
                "use 'logreg' or 'mlp', or set data.image_shape"
            )
        channels, height, width = spec.feature_shape
        conv_layers: list[nn.Module] = []
        for out_channels in spec.hidden:
            conv_layers += [nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=1), nn.ReLU()]
            channels = out_channels
            height, width = (height + 1) // 2, (width + 1) // 2
        return nn.Sequential(*conv_layers, nn.Flatten(), nn.Linear(channels * height * width, spec.n_classes))
    raise ConfigError(f"model.arch: {spec.arch!r} is not one of 'logreg', 'ridge', 'mlp', 'cnn'")


def n_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


DEFAULT_HIDDEN = {"logreg": [], "ridge": [], "mlp": [64], "cnn": [16, 32]}


def spec_for(arch: str, hidden: list[int] | None, feature_shape: tuple[int, ...], n_classes: int,
             family: str = "classification") -> ModelSpec:
    """The :class:`ModelSpec` for a configured architecture; ``hidden=None`` takes the arch's default."""
    if arch in LINEAR_ARCHS:
        hidden = []
    elif hidden is None:
        hidden = DEFAULT_HIDDEN[arch]
    return ModelSpec(arch=arch, feature_shape=tuple(feature_shape), n_classes=n_classes, hidden=tuple(hidden),
                     family=family)


def default_device() -> torch.device:
    """CUDA when present (or ``CLEANSE_DEVICE`` when set), else the CPU."""
    import os

    requested = os.environ.get("CLEANSE_DEVICE")
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

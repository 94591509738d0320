"""The fitted model of the diffusion family and what its estimators read (DMin, Lin, Lao & Zhao,
arXiv 2412.08637): :class:`FittedDiffusion` (the network, scheduler, spec, detector, generation
settings), :class:`DiffusionContext`, the network built from a spec, and the denoising loss the
outcome reports (:mod:`cleanse.families.diffusion.family`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from cleanse.errors import ConfigError

if TYPE_CHECKING:
    from cleanse.config import Params
    from cleanse.families.diffusion.params import DiffusionParams
    from cleanse.data.dataset import DatasetMeta, Split
    from cleanse.families.diffusion.watermark import WatermarkDetector

LOSS_DRAWS = 4  # timestep/noise draws per image in test_loss and val_loss


def _diffusion(params: Params) -> DiffusionParams:
    """``params`` as the diffusion family's (the stages pass the shared base type)."""
    return cast("DiffusionParams", params)


def build_unet(spec: dict[str, Any]) -> nn.Module:
    """The (untrained) network of ``spec`` (:func:`spec_for`), LoRA adapters included."""
    from cleanse.families.diffusion.models import add_lora, small_unet

    channels, size = int(spec["image_shape"][0]), int(spec["image_shape"][1])
    n_classes = spec["n_classes"]
    if n_classes is not None and spec.get("null_class") is not None:
        n_classes += 1  # the null label of classifier-free guidance
    model = small_unet(size, channels, tuple(spec["widths"]), n_classes, bool(spec["attention"]),
                       seed=int(spec["seed"]))
    lora = spec.get("lora")
    if lora:
        model = add_lora(model, rank=int(lora["rank"]), alpha=lora["alpha"], seed=int(spec["seed"]))
    return model


def spec_for(params: Params, meta: DatasetMeta, seed: int) -> dict[str, Any]:
    """Everything the network and scheduler are rebuilt from (stored in ``meta.json``)."""
    model = _diffusion(params).model
    lora = model.lora
    return {"image_shape": list(meta.feature_shape), "widths": list(model.widths), "attention": model.attention,
            "n_classes": meta.n_classes if model.conditional else None,
            "num_train_timesteps": model.num_train_timesteps, "prediction_type": model.prediction_type,
            "lora": {"rank": lora.rank, "alpha": lora.alpha} if lora.enabled else None, "seed": seed,
            "null_class": meta.n_classes if model.conditional and model.label_dropout > 0 else None,
            "label_dropout": model.label_dropout}


@dataclass
class FittedDiffusion:
    """A trained DDPM with what its outcome needs. ``generation``: ``steps``, ``n_watermark``,
    ``per_class``, ``guidance`` and the watermark's ``target_class`` (None without a watermark)."""

    model: nn.Module
    scheduler: Any
    spec: dict[str, Any]
    history: list[float]
    detector: WatermarkDetector | None
    seed: int
    generation: dict[str, Any] = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return self.spec["n_classes"] is not None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        shape = self.spec["image_shape"]
        return int(shape[0]), int(shape[1]), int(shape[2])

    def generate(self, count: int, label: int | None, seed: int, steps: int | None = None) -> torch.Tensor:
        """``count`` generations ``(count, C, H, W)`` in [-1, 1] conditioned on ``label`` (ignored
        by an unconditional model), ancestral DDPM sampling seeded by ``seed`` over ``steps``
        (default ``generation.steps``), with ``generation.guidance`` (classifier-free guidance)."""
        from cleanse.families.diffusion.train import sample_ddpm

        labels = torch.full((count,), int(label), dtype=torch.long) if self.conditional and label is not None else None
        if self.conditional and labels is None:
            raise ConfigError("generation: a class-conditional model needs a label to generate")
        return sample_ddpm(self.model, self.scheduler, count, self.image_shape, labels,
                           steps=steps or int(self.generation.get("steps", 100)), seed=seed,
                           guidance=float(self.generation.get("guidance", 1.0)), null_label=self.spec.get("null_class"))

    def digest(self) -> str:
        """sha256 of the network's state (names, dtypes, shapes, bytes): the signature cache's key."""
        from cleanse.families.gan.family import state_digest

        return state_digest(self.model.state_dict())


@dataclass(frozen=True)
class DiffusionContext:
    """What the diffusion estimators read: the staged splits (``train`` row i = data row i), the
    fitted DDPM, the run's params and seed, and the cache folder. Estimators must not read
    ``is_corrupted`` or ``meta.corruption``'s planted ids."""

    train: Split
    val: Split
    meta: DatasetMeta
    model: FittedDiffusion
    params: Any
    seed: int
    cache_dir: Path | None = None

    def images(self, split: Split | None = None) -> torch.Tensor:
        """``split``'s (default: training) images ``(n, C, H, W)`` float32 in [-1, 1]."""
        return torch.as_tensor((self.train if split is None else split).features, dtype=torch.float32)

    def conditions(self, split: Split | None = None) -> torch.Tensor | None:
        """``split``'s conditioning labels ``(n,)`` long, or None for an unconditional model."""
        if not self.model.conditional:
            return None
        return torch.as_tensor((self.train if split is None else split).label, dtype=torch.long)


def denoising_loss(fitted: FittedDiffusion, split: Split, seed: int, member: int, batch_size: int = 256) -> float:
    """The mean DDPM objective of ``split``'s images, each at :data:`LOSS_DRAWS` timesteps and
    noises drawn from member ``member`` of the ``diffusion.outcome`` stream of ``seed``."""
    from cleanse.seeds import rng

    images = torch.as_tensor(split.features, dtype=torch.float32)
    n, steps = images.shape[0], int(fitted.scheduler.config.num_train_timesteps)
    draws = rng(seed, "diffusion.outcome", member)
    timesteps = torch.from_numpy(draws.integers(0, steps, (n, LOSS_DRAWS)).astype(np.int64))
    noise = torch.from_numpy(draws.standard_normal((n, LOSS_DRAWS, *images.shape[1:])).astype(np.float32))
    labels = torch.as_tensor(split.label, dtype=torch.long) if fitted.conditional else None
    fitted.model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            b = images[rows].shape[0]
            x0 = images[rows].repeat_interleave(LOSS_DRAWS, 0)
            eps, t = noise[rows].reshape(b * LOSS_DRAWS, *images.shape[1:]), timesteps[rows].reshape(-1)
            noisy = fitted.scheduler.add_noise(x0, eps, t)
            target = _target(fitted.scheduler, x0, eps, t)
            kwargs = {} if labels is None else {"class_labels": labels[rows].repeat_interleave(LOSS_DRAWS)}
            out = fitted.model(noisy, t, **kwargs).sample
            total += float(((out - target) ** 2).mean(dim=(1, 2, 3)).sum())
    return total / (n * LOSS_DRAWS)


def _target(scheduler: Any, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    return scheduler.get_velocity(x0, eps, t) if kind == "v_prediction" else x0

"""The images DMin attributes (Lin, Lao & Zhao, arXiv 2412.08637, section 4: generated test
images, treated as ``x0`` exactly like training images; spec part B 3.1 and 3.8).

- :func:`generation_queries`: ``generation.per_class`` seeded generations per condition (the class
  a class-conditional model is conditioned on; each query's ``source`` is that condition), or, for
  an unconditional model, ``per_class * n_classes`` generations with source ``-1`` (unknown);
- :func:`file_queries`: user-supplied images from an ``.npz`` (``images``, optional ``labels`` and
  ``source``), brought to the training images' scale ([-1, 1]) and size;
- :func:`harm_queries`: what the estimators' scores attribute: with the watermark corruption the
  target class's generations that the family's detector flags, else every generation query.

Every draw is seeded from the run seed (``diffusion.queries`` member = class,
``diffusion.harm_queries``), so the same run gives the same queries in every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cleanse.data.dataset import DatasetMeta
from cleanse.errors import DataError
from cleanse.seeds import torch_seed


@dataclass(frozen=True)
class QuerySet:
    """Query images ``(Q, C, H, W)`` float32 in [-1, 1]; ``conditions`` ``(Q,)`` long (the class
    label fed to a conditional model) or None; ``source`` ``(Q,)`` int64 (-1 = unknown); ``seeds``
    ``(Q,)`` int64 (the generator seed of each image's batch, -1 for file images); ``kind`` says
    where they came from; ``note`` any fallback taken."""

    images: torch.Tensor
    conditions: torch.Tensor | None
    source: np.ndarray
    seeds: np.ndarray
    kind: str
    note: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The set as named tensors (for a safetensors file beside the results)."""
        out = {"images": self.images, "source": torch.from_numpy(self.source), "seeds": torch.from_numpy(self.seeds)}
        if self.conditions is not None:
            out["conditions"] = self.conditions
        return out


def is_conditional(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` (a diffusers ``UNet2DModel``) takes class labels."""
    return getattr(unet, "class_embedding", None) is not None


def _generate(fitted: Any, count: int, shape: tuple[int, ...], label: int | None, steps: int | None,
              seed: int) -> torch.Tensor:
    from cleanse.families.diffusion.train import sample_ddpm

    labels = None if label is None else torch.full((count,), label, dtype=torch.long)
    return sample_ddpm(fitted.model, fitted.scheduler, count, shape, labels, steps=steps, seed=seed)


def _image_shape(context: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in context.meta.feature_shape)


def generation_queries(context: Any) -> QuerySet:
    """``generation.per_class`` generations for each class (module docstring), classes in order."""
    generation = context.params.generation
    unet = context.model.model
    shape, n_classes = _image_shape(context), int(context.meta.n_classes)
    if not is_conditional(unet):
        seed = torch_seed(context.seed, "diffusion.queries", 0)
        count = generation.per_class * n_classes
        generated = _generate(context.model, count, shape, None, generation.steps, seed)
        return QuerySet(generated, None, np.full(count, -1, dtype=np.int64), np.full(count, seed, dtype=np.int64),
                        "generated", "unconditional model: query sources unknown")
    images: list[torch.Tensor] = []
    conditions: list[torch.Tensor] = []
    seeds: list[np.ndarray] = []
    for label in range(n_classes):
        seed = torch_seed(context.seed, "diffusion.queries", label)
        images.append(_generate(context.model, generation.per_class, shape, label, generation.steps, seed))
        conditions.append(torch.full((generation.per_class,), label, dtype=torch.long))
        seeds.append(np.full(generation.per_class, seed, dtype=np.int64))
    condition = torch.cat(conditions)
    return QuerySet(torch.cat(images), condition, condition.numpy().astype(np.int64), np.concatenate(seeds),
                    "generated")


def to_model_scale(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1]: uint8 or floats above 1 are read as [0, 255], non-negative floats as
    [0, 1], anything with negative values as already in [-1, 1]."""
    x = images.astype(np.float32)
    if images.dtype == np.uint8 or x.max(initial=0.0) > 1.0:
        return x / 127.5 - 1.0
    return x * 2.0 - 1.0 if x.min(initial=0.0) >= 0.0 else x


def file_queries(path: str | Path, meta: DatasetMeta) -> QuerySet:
    """The images of the ``.npz`` at ``path`` (``images`` ``(Q, H, W)`` or ``(Q, C, H, W)``; optional
    ``labels`` and ``source`` ``(Q,)``), scaled (:func:`to_model_scale`) and resized (bilinear,
    antialiased) to ``meta.feature_shape``. ``source`` defaults to ``labels``, else -1."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"queries.file: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            data = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"queries.file: {path} is not a readable .npz ({exc})") from None
    if "images" not in data:
        raise DataError(f"queries.file: {path} has no 'images' array (found {sorted(data)})")
    images = data["images"]
    if images.ndim == 3:
        images = images[:, None]
    channels, height, width = (int(d) for d in meta.feature_shape)
    if images.ndim != 4 or images.shape[1] != channels or images.shape[0] == 0:
        raise DataError(f"queries.file: images of shape {data['images'].shape} do not fit "
                        f"{channels}-channel images (Q, {channels}, H, W)")
    x = torch.from_numpy(to_model_scale(images))
    if x.shape[2:] != (height, width):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                                            align_corners=False).clamp(-1, 1)
    q = x.shape[0]
    for name in ("labels", "source"):
        if name in data and data[name].shape != (q,):
            raise DataError(f"queries.file: {name} has shape {data[name].shape}, expected ({q},)")
    labels = data.get("labels")
    if labels is not None and ((labels < 0) | (labels >= meta.n_classes)).any():
        raise DataError(f"queries.file: labels must lie in [0, {meta.n_classes})")
    conditions = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    source = data.get("source", labels)
    source = np.full(q, -1, dtype=np.int64) if source is None else source.astype(np.int64)
    return QuerySet(x.contiguous(), conditions, source, np.full(q, -1, dtype=np.int64), "file")


def retrieval_queries(context: Any) -> QuerySet:
    """The queries whose top-k are stored per query: ``queries.file`` when set, else the
    generation queries."""
    file = getattr(context.params.queries, "file", None)
    return file_queries(file, context.meta) if file else generation_queries(context)


def harm_queries(context: Any) -> QuerySet:
    """With the watermark corruption (the fitted model's ``generation.target_class`` and
    ``detector``): ``generation.n_watermark`` generations of the target class, kept where the
    detector flags them (all of them, noted, when it flags none); else the generation queries."""
    target = context.model.generation.get("target_class")  # None without the watermark corruption
    detector = context.model.detector
    if target is None or detector is None:
        return generation_queries(context)
    target = int(target)
    count = int(context.params.generation.n_watermark)
    seed = torch_seed(context.seed, "diffusion.harm_queries")
    label = target if is_conditional(context.model.model) else None
    images = _generate(context.model, count, _image_shape(context), label, context.params.generation.steps, seed)
    flags = np.asarray(detector.flags(images), dtype=bool)
    note = ""
    if not flags.any():
        flags[:] = True
        note = f"the detector flagged none of {count} target-class generations; all of them attributed"
    conditions = None if label is None else torch.full((int(flags.sum()),), target, dtype=torch.long)
    n = int(flags.sum())
    return QuerySet(images[torch.from_numpy(flags)], conditions, np.full(n, target, dtype=np.int64),
                    np.full(n, seed, dtype=np.int64), "harm", note)

"""The diffusion family's ``stage`` step: training images for a DDPM, split, with a planted
watermark or planted duplicates and their ground truth (DMin, Lin, Lao & Zhao, arXiv 2412.08637;
spec part B 3.7).

Sources (images ``(n, C, H, W)`` float32 in [-1, 1], read by :func:`cleanse.families.gan.data.load_images`):
``sklearn:digits`` (8x8), ``mnist`` (the MNIST test set in ``/work/shared/data/mnist_test``,
28x28), an image ``.npz``; each resized (bilinear, antialiased) to ``data.image_size`` when given.

- One source: ``label`` = the image's class (what the model is conditioned on) and ``source`` =
  ``label``: the class is the "source" whose detection DMin's retrieval is scored on
  (``meta.sources`` = ``<name>/<class>``). Rows: a ``diffusion.data`` permutation of the source's
  rows cut into train, validation and test; ``sample_id`` = the row in the source.
- ``mixed:<a>+<b>[+...]``: every split takes an equal share of each set (the first sets one more
  when it does not divide), each set's rows in its own ``diffusion.data`` permutation (member = set
  index); ``label`` = ``source`` = the set's index (the model is conditioned on the set), images
  resized to the first set's size (or ``image_size``) and channel count; ``sample_id`` = the row
  in the concatenation of the sets, in the order named.

Corruption (training split only; ``label_clean`` = ``label``: no label noise in this family):

- ``watermark``: ``max(1, round(fraction * n_t))`` of the ``n_t`` training images of
  ``target_class``, chosen on stream ``diffusion.plant``, get the patch
  (:func:`cleanse.families.diffusion.watermark.plant_patch`); those rows are ``is_corrupted``.
- ``duplicates``: one training image of ``target_class`` (``diffusion.plant``) replaces
  ``copies - 1`` other training images of that class, so ``copies`` rows hold it; all of them are
  ``is_corrupted`` (the oracle removes the image entirely). The replaced rows keep their ids.

``meta.corruption`` records kind, target class, the patch, ``planted_ids`` (sorted) and
``n_corrupted`` (and ``original_id`` for duplicates).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cleanse import seeds
from cleanse.data.dataset import DatasetMeta, Split, StagedData
from cleanse.errors import ConfigError
from cleanse.families.diffusion.config import MNIST
from cleanse.families.diffusion.watermark import Patch, plant_patch


def resolve_source(name: str) -> str:
    """The loadable path or name of a source (``mnist`` -> the shared MNIST test set)."""
    return MNIST if name == "mnist" else name


def _load(part: str) -> tuple[np.ndarray, np.ndarray, str]:
    from cleanse.families.gan.data import load_images

    images, labels, name = load_images(resolve_source(part), "data.source")
    return images, labels, "mnist" if part == "mnist" else name


def load_parts(parts: list[str], image_size: int | None) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Every source of ``parts`` as (images, labels, name), all of one shape: the first's channels
    and ``image_size`` (default: the first's height) on each side (bilinear, antialiased)."""
    from cleanse.families.gan.data import _fit_images

    loaded = [_load(part) for part in parts]
    channels, height = int(loaded[0][0].shape[1]), int(loaded[0][0].shape[2])
    size = image_size if image_size is not None else height
    shape = (channels, size, size)
    return [(images if tuple(images.shape[1:]) == shape else _fit_images(images, shape), labels, name)
            for images, labels, name in loaded]


def _shares(n: int, k: int) -> list[int]:
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def stage_diffusion_data(params: Any) -> StagedData:
    """Train/validation/test splits of ``params.data`` with ``params.corruption`` planted in the
    training split; see the module docstring."""
    data, corruption = params.data, params.corruption
    parts = data.parts()
    loaded = load_parts(parts, data.image_size)
    sizes = (data.n_train, data.n_val, data.n_test)
    rows: list[list[np.ndarray]] = [[], [], []]  # per split: global row indices
    if len(parts) == 1:
        images, labels, name = loaded[0]
        if sum(sizes) > images.shape[0]:
            raise ConfigError(f"data: n_train + n_val + n_test = {sum(sizes)} but {data.source} holds only "
                              f"{images.shape[0]} images")
        order = seeds.rng(params.seed, "diffusion.data").permutation(images.shape[0])
        bounds = np.cumsum((0, *sizes))
        for index in range(3):
            rows[index].append(order[bounds[index]:bounds[index + 1]])
        source_of = labels.astype(np.int64)
        n_classes = int(labels.max()) + 1
        names = tuple(f"{name}/{c}" for c in range(n_classes))
    else:
        offsets = np.cumsum([0] + [part[0].shape[0] for part in loaded])
        images = np.concatenate([part[0] for part in loaded])
        source_of = np.concatenate([np.full(part[0].shape[0], j, dtype=np.int64) for j, part in enumerate(loaded)])
        for j, part in enumerate(loaded):
            need = [_shares(n, len(parts))[j] for n in sizes]
            if sum(need) > part[0].shape[0]:
                raise ConfigError(f"data: {parts[j]} holds {part[0].shape[0]} images, fewer than its share "
                                  f"{sum(need)} of n_train + n_val + n_test")
            order = seeds.rng(params.seed, "diffusion.data", j).permutation(part[0].shape[0]) + offsets[j]
            bounds = np.cumsum((0, *need))
            for index in range(3):
                rows[index].append(order[bounds[index]:bounds[index + 1]])
        labels = source_of
        n_classes = len(parts)
        names = tuple(part[2] for part in loaded)
        name = "mixed-" + "-".join(names)

    def split(index: int) -> Split:
        ids = np.concatenate(rows[index]).astype(np.int64)
        return Split(sample_id=ids, features=images[ids], label=labels[ids].astype(np.int64),
                     label_clean=labels[ids].astype(np.int64), is_corrupted=np.zeros(ids.size, dtype=bool),
                     source=source_of[ids].astype(np.int64))

    train = split(0)
    if corruption.kind != "none" and corruption.target_class >= n_classes:
        raise ConfigError(f"corruption.target_class: {corruption.target_class} is not a class of {data.source} "
                          f"(0..{n_classes - 1})")
    train, record = _plant(train, corruption, params.seed)
    meta = DatasetMeta(name=name, n_classes=n_classes, feature_shape=tuple(int(v) for v in images.shape[1:]),
                       corruption=record, sources=names)
    return StagedData(train=train, val=split(1), test=split(2), meta=meta)


def _plant(train: Split, corruption: Any, seed: int) -> tuple[Split, dict[str, Any]]:
    """``train`` with the watermark or duplicates planted, and the ``meta.corruption`` record."""
    kind = corruption.kind
    if kind == "none":
        return train, {"kind": "none", "n_corrupted": 0}
    target = np.flatnonzero(train.label == corruption.target_class)
    rng = seeds.rng(seed, "diffusion.plant")
    features = train.features.copy()
    record: dict[str, Any] = {"kind": kind, "target_class": int(corruption.target_class),
                              "n_target_train": int(target.size)}
    if kind == "watermark":
        if target.size == 0:
            raise ConfigError(f"corruption.target_class: no training image of class {corruption.target_class}")
        patch = Patch(corruption.patch_size, corruption.patch_value, corruption.corner)
        patch.region(*features.shape[-2:])  # refuses a patch larger than the images
        count = max(1, int(round(corruption.fraction * target.size)))
        planted = np.sort(rng.choice(target, size=count, replace=False))
        features[planted] = plant_patch(features[planted], patch)
        record.update({"fraction": float(corruption.fraction), "patch": patch.to_json()})
    else:
        if corruption.copies > target.size:
            raise ConfigError(f"corruption.copies: {corruption.copies} exceeds the {target.size} training images of "
                              f"class {corruption.target_class}")
        planted = np.sort(rng.choice(target, size=corruption.copies, replace=False))
        original = int(planted[0])
        features[planted] = features[original]
        record.update({"copies": int(corruption.copies), "original_id": int(train.sample_id[original])})
    flags = np.zeros(len(train), dtype=bool)
    flags[planted] = True
    record.update({"planted_ids": sorted(int(i) for i in train.sample_id[planted]), "n_corrupted": int(planted.size)})
    return Split(sample_id=train.sample_id, features=features, label=train.label, label_clean=train.label_clean,
                 is_corrupted=flags, group=train.group, source=train.source), record

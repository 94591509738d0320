"""Corruptions injected into the training split, with the ground truth kept.

- ``label_flip`` / ``symmetric``: a random ``fraction`` of training labels is replaced by a label
  drawn uniformly from the other classes.
- ``label_flip`` / ``pair``: ``y -> (y + 1) mod C`` (asymmetric, structured noise).
- ``backdoor``: a random ``fraction`` of the training samples that are *not* of the target class
  receive a trigger (a bright square patch in the bottom-right corner of an image, or a fixed
  pattern of ``trigger_size`` tabular features set to +3 standard deviations) and are relabelled to
  the target class. The attack success rate is the fraction of triggered test inputs of the other
  classes that the model assigns to the target class (Gu et al., BadNets, 2017).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from cleanse.config import CorruptionConfig
from cleanse.data.dataset import Split
from cleanse.errors import ConfigError
from cleanse.seeds import generator


def corrupt(
    train: Split, config: CorruptionConfig, *, n_classes: int, seed: int
) -> tuple[Split, dict[str, Any] | None]:
    """Return the corrupted training split and the trigger spec (``None`` unless a backdoor)."""
    if config.kind == "none":
        return train, None
    rng = generator(seed, "corruption")
    n = len(train)
    if config.kind == "label_flip":
        count = max(1, round(config.fraction * n))
        chosen = np.sort(rng.choice(n, size=count, replace=False))
        label = train.label.copy()
        if config.mode == "pair":
            label[chosen] = (label[chosen] + 1) % n_classes
        else:
            offsets = rng.integers(1, n_classes, size=count)
            label[chosen] = (label[chosen] + offsets) % n_classes
        is_corrupted = label != train.label_clean
        return replace(train, label=label, is_corrupted=is_corrupted), None
    if config.target_class >= n_classes:
        raise ConfigError(
            f"corruption.target_class: {config.target_class} is out of range; the data has classes 0..{n_classes - 1}"
        )
    trigger = make_trigger(train.features, config, rng)
    eligible = np.flatnonzero(train.label_clean != config.target_class)
    count = max(1, round(config.fraction * n))
    if count > eligible.size:
        raise ConfigError(
            f"corruption.fraction: {config.fraction} asks for {count} poisons but only {eligible.size} samples "
            "are outside the target class"
        )
    chosen = np.sort(rng.choice(eligible, size=count, replace=False))
    features = train.features.copy()
    features[chosen] = apply_trigger(features[chosen], trigger)
    label = train.label.copy()
    label[chosen] = config.target_class
    is_corrupted = np.zeros(n, dtype=bool)
    is_corrupted[chosen] = True
    return replace(train, features=features, label=label, is_corrupted=is_corrupted), trigger


def make_trigger(features: np.ndarray, config: CorruptionConfig, rng: np.random.Generator) -> dict[str, Any]:
    """A JSON-serialisable trigger spec for :func:`apply_trigger`."""
    if features.ndim == 4:
        _, _, height, width = features.shape
        size = min(config.trigger_size, height, width)
        return {"kind": "patch", "size": size, "value": float(features.max()), "target_class": config.target_class}
    n_features = int(np.prod(features.shape[1:]))
    size = min(config.trigger_size, n_features)
    indices = np.sort(rng.choice(n_features, size=size, replace=False)).tolist()
    return {"kind": "features", "indices": indices, "value": 3.0, "target_class": config.target_class}


def apply_trigger(features: np.ndarray, trigger: dict[str, Any]) -> np.ndarray:
    """Return a copy of ``features`` (shape ``(n, ...)``) with the trigger stamped on every row."""
    out = np.array(features, dtype=np.float32, copy=True)
    if trigger["kind"] == "patch":
        size = trigger["size"]
        out[..., -size:, -size:] = trigger["value"]
    else:
        flat = out.reshape(out.shape[0], -1)
        flat[:, trigger["indices"]] = trigger["value"]
        out = flat.reshape(out.shape)
    return out

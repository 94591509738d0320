"""Stratified, seeded train/val/test splits, and feature standardisation with train statistics."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from cleanse import seeds
from cleanse.errors import DataError


def stratified_split(
    label: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices ``(train, val, test)``, each sorted, stratified by ``label``."""
    index = np.arange(label.shape[0])
    counts = np.bincount(label)
    if counts.min() < 3:
        rare = np.flatnonzero(counts < 3).tolist()
        raise DataError(f"class(es) {rare} have fewer than 3 samples; a stratified train/val/test split needs 3")
    try:
        rest, test = train_test_split(index, test_size=test_fraction, stratify=label,
                                      random_state=seeds.sklearn_seed(seed, "split.test"))
        train, val = train_test_split(
            rest, test_size=val_fraction / (1 - test_fraction), stratify=label[rest],
            random_state=seeds.sklearn_seed(seed, "split.val"),
        )
    except ValueError as exc:
        raise DataError(f"cannot split the data with data.val_fraction/test_fraction: {exc}") from exc
    return np.sort(train), np.sort(val), np.sort(test)


def standardizer(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of ``train_features`` (shape ``(n, d)``); constant features keep scale 1."""
    mean = train_features.mean(axis=0)
    scale = train_features.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)

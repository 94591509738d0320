"""The regression family's ``stage`` step: source -> split, standardised, target-outlier-corrupted data.

Corruption ``target_outliers`` (the regression analogue of label noise): a random ``fraction`` of
the training targets is shifted by ``scale`` standard deviations of the (clean) training targets,
each with a random sign; ``label_clean`` keeps the original target and ``is_corrupted`` marks the
shifted rows. Validation and test splits stay clean.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from sklearn.model_selection import train_test_split

from cleanse.data.dataset import DatasetMeta, Split, StagedData
from cleanse.data.sources import load_source
from cleanse.data.splits import standardizer
from cleanse.errors import DataError
from cleanse.families.regression.config import RegressionCorruptionConfig
from cleanse.seeds import generator, sklearn_seed


def random_split(n: int, *, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Row indices ``(train, val, test)``, each sorted; seeded like the stratified split, unstratified."""
    index = np.arange(n)
    try:
        rest, test = train_test_split(index, test_size=test_fraction, random_state=sklearn_seed(seed, "split.test"))
        train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                      random_state=sklearn_seed(seed, "split.val"))
    except ValueError as exc:
        raise DataError(f"cannot split the data with data.val_fraction/test_fraction: {exc}") from exc
    return np.sort(train), np.sort(val), np.sort(test)


def target_outliers(train: Split, config: RegressionCorruptionConfig, *, seed: int) -> Split:
    """``train`` with ``round(fraction * n)`` (at least 1) targets shifted by ``+-scale * sd``."""
    if config.kind == "none":
        return train
    rng = generator(seed, "corruption")
    n = len(train)
    count = max(1, round(config.fraction * n))
    chosen = np.sort(rng.choice(n, size=count, replace=False))
    sign = rng.choice(np.array([-1.0, 1.0]), size=count)
    label = train.label_clean.astype(np.float64, copy=True)
    label[chosen] += sign * config.scale * float(train.label_clean.std())
    is_corrupted = np.zeros(n, dtype=bool)
    is_corrupted[chosen] = True
    return replace(train, label=label, is_corrupted=is_corrupted)


def stage_regression(params) -> StagedData:  # noqa: ANN001  (a RegressionParams)
    """Load ``params.data.source`` (a float target), split it at random, standardise features (and,
    by default, the target) with the training split's statistics, and corrupt the training split."""
    raw = load_source(params.data, target="real")
    n = raw.label.shape[0]
    train_idx, val_idx, test_idx = random_split(n, val_fraction=params.data.val_fraction,
                                                test_fraction=params.data.test_fraction, seed=params.seed)
    features = raw.features
    if params.data.standardize and features.ndim != 4:
        flat = features.reshape(n, -1)
        mean, scale = standardizer(flat[train_idx])
        features = ((flat - mean) / scale).reshape(features.shape).astype(np.float32)
    target = raw.label.astype(np.float64)
    if params.data.standardize_target:
        centre, spread = float(target[train_idx].mean()), float(target[train_idx].std())
        target = (target - centre) / (spread if spread > 1e-12 else 1.0)

    def split(index: np.ndarray) -> Split:
        return Split(sample_id=raw.sample_id[index], features=features[index], label=target[index],
                     label_clean=target[index], is_corrupted=np.zeros(index.size, dtype=bool),
                     group=None if raw.group is None else raw.group[index])

    train = target_outliers(split(train_idx), params.corruption, seed=params.seed)
    meta = DatasetMeta(name=raw.name, n_classes=1, feature_shape=raw.feature_shape,
                       corruption={**params.corruption.model_dump(mode="json"),
                                   "n_corrupted": int(train.is_corrupted.sum())})
    return StagedData(train=train, val=split(val_idx), test=split(test_idx), meta=meta)

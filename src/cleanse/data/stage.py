"""The ``stage`` step as a pure function: source -> validated, split, standardised, corrupted data."""

from __future__ import annotations

import numpy as np

from cleanse.config import Params
from cleanse.errors import ConfigError
from cleanse.data.corruption import corrupt
from cleanse.data.dataset import DatasetMeta, Split, StagedData
from cleanse.data.sources import load_source
from cleanse.data.splits import standardizer, stratified_split


def stage_data(params: Params) -> StagedData:
    """The ``stage`` step of ``params.family`` (:meth:`cleanse.families.base.Family.stage`)."""
    from cleanse import families

    return families.get(params.family).stage(params)


def stage_classification(params: Params) -> StagedData:
    """Classification: load ``params.data.source``, split it, and corrupt the training split.

    Validation and test splits stay clean. Tabular features are standardised with the training
    split's statistics (computed before corruption); images are left as loaded.
    """
    raw = load_source(params.data)
    _check_trigger_fits(params, raw.features.shape[1:])
    train_idx, val_idx, test_idx = stratified_split(
        raw.label, val_fraction=params.data.val_fraction, test_fraction=params.data.test_fraction, seed=params.seed
    )
    features = raw.features
    is_image = features.ndim == 4
    if params.data.standardize and not is_image:
        flat = features.reshape(features.shape[0], -1)
        mean, scale = standardizer(flat[train_idx])
        features = ((flat - mean) / scale).reshape(features.shape).astype(np.float32)

    def split(index: np.ndarray) -> Split:
        return Split(
            sample_id=raw.sample_id[index],
            features=features[index],
            label=raw.label[index],
            label_clean=raw.label[index],
            is_corrupted=np.zeros(index.size, dtype=bool),
            group=None if raw.group is None else raw.group[index],
        )

    train, trigger = corrupt(split(train_idx), params.corruption, n_classes=raw.n_classes, seed=params.seed)
    meta = DatasetMeta(
        name=raw.name,
        n_classes=raw.n_classes,
        feature_shape=raw.feature_shape,
        corruption={**params.corruption.model_dump(mode="json"), "n_corrupted": int(train.is_corrupted.sum())},
        trigger=trigger,
    )
    if params.query.kind == "file" and params.query.path:
        # The probes are read after training; a bad probe file is refused here, before any artifact.
        from cleanse.query import read_probe_file

        read_probe_file(params.query.path, meta)
    return StagedData(train=train, val=split(val_idx), test=split(test_idx), meta=meta)


def _check_trigger_fits(params: Params, feature_shape: tuple[int, ...]) -> None:
    """A backdoor trigger must fit the inputs: at most ``H`` and ``W`` pixels per side for images
    ``(C, H, W)``, at most the number of features for tabular data (it is never silently shrunk)."""
    corruption = params.corruption
    if corruption.kind != "backdoor":
        return
    if len(feature_shape) == 3:
        limit, what = min(feature_shape[1:]), f"the image side ({feature_shape[1]}x{feature_shape[2]})"
    else:
        limit, what = int(np.prod(feature_shape)), f"the number of features ({int(np.prod(feature_shape))})"
    if corruption.trigger_size > limit:
        raise ConfigError(f"corruption.trigger_size: {corruption.trigger_size} is larger than {what}; use at most "
                          f"{limit}")

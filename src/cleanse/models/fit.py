"""Fit ``params.model`` on a split: the one place the run's architecture and recipe meet the data
(the train stage, every "without these units" retrain and :mod:`cleanse.api` call it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cleanse.config import Params
    from cleanse.data.dataset import DatasetMeta, Split


def model_spec(params: Params, meta: DatasetMeta) -> Any:
    """The architecture ``params.model`` describes, sized for ``meta``'s features and classes."""
    from cleanse.models.architectures import spec_for

    return spec_for(params.model.arch, params.model.hidden, meta.feature_shape, meta.n_classes, family=params.family)


def fit_model(params: Params, split: Split, meta: DatasetMeta, *, seed: int | None = None, device: Any = None) -> Any:
    """Train ``params.model`` on ``split`` (its features and given labels) with ``seed`` (default
    ``params.seed``) on ``device`` (default :func:`cleanse.models.architectures.default_device`)."""
    from cleanse.models.architectures import default_device
    from cleanse.models.trainer import train_model

    return train_model(model_spec(params, meta), split.features, split.label, params.model,
                       seed=params.seed if seed is None else seed, device=default_device() if device is None else device)

"""Models on disk and their evaluation: safetensors weights and checkpoints with a ``meta.json``,
the evaluation every retrain records, and retraining with the same seed and recipe without a set
of training samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cleanse import seeds
from cleanse.config import Params
from cleanse.data.dataset import StagedData
from cleanse.stages.fingerprints import STAGE_META_NAME
from cleanse.storage import read_json


def _family(model: Any, family: str | None) -> Any:
    from cleanse import families

    return families.get(family if family is not None else model.spec.family)


def save_model(model: Any, directory: Path, extra: dict[str, Any], family: str | None = None) -> None:
    """The family's files of ``model`` (:meth:`cleanse.families.base.Family.save_model`: safetensors
    and a ``meta.json`` with ``extra``, written last); ``family`` defaults to ``model.spec.family``.
    A family whose models carry no ``spec.family`` records ``family`` in ``meta.json`` itself."""
    _family(model, family).save_model(model, directory, extra)


def load_model(directory: Path) -> Any:
    """The model :func:`save_model` wrote (its family from ``meta.json``)."""
    from cleanse import families

    meta = read_json(directory / STAGE_META_NAME)
    family = meta.get("family") or meta.get("spec", {}).get("family", "classification")
    return families.get(family).load_model(directory)


def evaluate_model(model: Any, staged: StagedData, query: Any = None, family: str | None = None) -> dict[str, float]:
    """The outcome of ``model``'s family (:meth:`cleanse.families.base.Family.outcome`): for
    classification test and validation accuracy, the attack success rate for backdoors and, with
    probes (a :class:`cleanse.query.QuerySet`), the held-out probes' behaviour rate; for regression
    test and validation RMSE; ``family`` defaults to ``model.spec.family``."""
    return _family(model, family).outcome(model, staged, query)


def retrain_without(params: Params, staged: StagedData, removed_ids: np.ndarray, query: Any = None,
                    base: Any = None) -> dict[str, float]:
    """Retrain with the same seed and recipe on the training split minus ``removed_ids``."""
    return retrained_without(params, staged, removed_ids, query, base)[1]


def retrained_without(params: Params, staged: StagedData, removed_ids: np.ndarray,
                      query: Any = None, base: Any = None) -> tuple[Any, dict[str, float]]:
    """:func:`retrain_without`, also returning the retrained model (logged to MLflow); ``query``:
    the run's probes, whose held-out part is checked (:func:`evaluate_model`); ``base``: the base
    model, for families that verify by replaying its recorded fit. Verified by the family
    (:meth:`cleanse.families.base.Family.verify_without`): for classification and regression
    retrained with the same seed and recipe."""
    from cleanse import families

    return families.get(params.family).verify_without(params, staged, removed_ids, query, base)


def random_ids(staged: StagedData, count: int, seed: int) -> np.ndarray:
    rng = seeds.rng(seed, "random_ids")
    return rng.choice(staged.train.sample_id, size=min(count, len(staged.train)), replace=False)

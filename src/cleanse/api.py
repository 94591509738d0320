"""The library in memory: stage the data, fit the model and build the scoring context without
writing an output root, then score with any registered estimator.

The same steps as the pipeline's ``stage`` and ``train`` stages (:mod:`cleanse.stages`), with the
same seeds and recipe, so a score computed here equals the one ``cleanse run`` writes for the same
configuration (on the same device)::

    from cleanse import api
    from cleanse.config import load_params

    prepared = api.prepare(load_params(None, ["data.source=sklearn:wine"]))
    scores = api.score(prepared, "influence")  # one row per training sample; higher = more likely harmful

Benchmarks use this instead of rebuilding stage -> train -> context by hand; ``stage_seed`` fixes
the split and corruption while ``params.seed`` varies the model (the seed studies).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cleanse.config import Params
from cleanse.data.dataset import StagedData


@dataclass(frozen=True)
class Prepared:
    """A staged dataset, the model fitted on its (corrupted) training split, and the
    :class:`cleanse.estimators.base.ScoringContext` estimators score against."""

    params: Params
    staged: StagedData
    model: Any  # cleanse.models.trainer.TrainedModel
    context: Any  # cleanse.estimators.base.ScoringContext


def _device(device: Any) -> Any:
    import torch

    from cleanse.models.architectures import default_device

    return default_device() if device is None else torch.device(device)


def stage(params: Params, *, stage_seed: int | None = None) -> StagedData:
    """Load, split and corrupt the data as the ``stage`` stage does (``stage_seed``: the seed of the
    split and corruption, default ``params.seed``)."""
    from cleanse.data.stage import stage_data

    return stage_data(params if stage_seed is None else params.model_copy(update={"seed": stage_seed}))


def fit(params: Params, staged: StagedData, *, seed: int | None = None, device: Any = None) -> Any:
    """Train ``params.model`` on the training split as the ``train`` stage does, through the
    family's :meth:`~cleanse.families.base.Family.fit` (``seed``: default ``params.seed``).
    ``device`` (default :func:`cleanse.models.architectures.default_device`) applies to the families
    that fit with the shared trainer; the others choose their own device, as the stage does."""
    from cleanse import families
    from cleanse.families.base import Family
    from cleanse.models.fit import fit_model

    task = families.get(params.family)
    if type(task).fit is Family.fit:
        return fit_model(params, staged.train, staged.meta, seed=seed, device=_device(device))
    return task.fit(params, staged.train, staged.meta, seed=seed)


def context(params: Params, staged: StagedData, model: Any, *, device: Any = None,
            cache_dir: Path | None = None) -> Any:
    """The scoring context of ``model`` (``cache_dir``: where expensive intermediates may be kept;
    None keeps them in memory): the family's own (:meth:`~cleanse.families.base.Family.scoring_context`)
    unless the family uses the shared one, which is built on ``device``."""
    from cleanse import families
    from cleanse.estimators.base import ScoringContext
    from cleanse.families.base import Family

    task = families.get(params.family)
    if type(task).scoring_context is not Family.scoring_context:
        return task.scoring_context(params, staged, model, cache_dir)
    return ScoringContext(train=staged.train, val=staged.val, meta=staged.meta, model=model,
                          model_config=params.model, seed=params.seed, device=_device(device), cache_dir=cache_dir)


def prepare(params: Params, *, stage_seed: int | None = None, device: Any = None,
            cache_dir: Path | None = None) -> Prepared:
    """:func:`stage`, :func:`fit` and :func:`context` in one call."""
    staged = stage(params, stage_seed=stage_seed)
    model = fit(params, staged, device=device)
    return Prepared(params, staged, model, context(params, staged, model, device=device, cache_dir=cache_dir))


def options(params: Params, estimator: str, **updates: Any) -> Any:
    """``estimator``'s options from ``params`` (``scorers.<estimator>``), with ``updates`` applied."""
    base = params.scorers.of(estimator)
    return base.model_copy(update=updates) if updates else base


def score(prepared: Prepared, estimator: str, estimator_options: Any = None) -> pl.DataFrame:
    """``estimator``'s table (``sample_id, score, ...``; one row per training sample in training
    order; higher score = more likely harmful) with ``estimator_options`` or the params' own."""
    return score_result(prepared, estimator, estimator_options).table


def score_result(prepared: Prepared, estimator: str, estimator_options: Any = None) -> Any:
    """:func:`score`'s :class:`cleanse.estimators.base.ScoreResult` (the table and its meta)."""
    from cleanse.estimators import registry

    chosen = options(prepared.params, estimator) if estimator_options is None else estimator_options
    return registry.get(estimator).score(prepared.context, chosen)


def score_probes(prepared: Prepared, estimator: str, query: Any, estimator_options: Any = None) -> tuple[Any, Any]:
    """Score against probes (a :class:`cleanse.query.QuerySet`, or None for self-scores) as the
    ``score`` stage does: ``(ScoreResult, (n_query, n_train) matrix or None)``, aggregated by
    ``query.aggregate``."""
    from cleanse.attribution import score_with_query
    from cleanse.estimators import registry

    chosen = options(prepared.params, estimator) if estimator_options is None else estimator_options
    return score_with_query(registry.get(estimator), prepared.context, chosen, query,
                            prepared.params.query.aggregate)


def probes(prepared: Prepared) -> Any:
    """The run's probes (``query.kind``; None without), the deterministic choice of the ``query`` stage."""
    from cleanse.query import query_for

    return query_for(prepared.params, prepared.staged, prepared.model)


def evaluate(prepared: Prepared, model: Any = None, query: Any = None) -> dict[str, float]:
    """The outcome of ``model`` (default: the prepared one) as every retrain records it."""
    from cleanse.stages.modelio import evaluate_model

    return evaluate_model(prepared.model if model is None else model, prepared.staged, query,
                          family=prepared.params.family)


def retrain_without(prepared: Prepared, removed_ids: np.ndarray, query: Any = None) -> dict[str, float]:
    """Retrain with the same seed and recipe without ``removed_ids``; its evaluation."""
    from cleanse.stages.modelio import retrain_without as retrain

    return retrain(prepared.params, prepared.staged, removed_ids, query, base=prepared.model)

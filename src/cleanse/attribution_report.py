"""Optional attribution-quality evaluations for the report (``params.evaluate``; off by default).

- ``evaluate.lds``: the linear datamodeling score (:func:`cleanse.evaluate.lds`) of every
  selected estimator that has a ``pairwise`` method, against models retrained on
  ``lds_subsets`` random halves of the training set, averaged over the first ``lds_queries`` test
  points (margin output).
- ``evaluate.stability``: rank stability (:func:`cleanse.evaluate.rank_stability`) of every
  selected estimator's scores across ``stability_seeds`` training seeds (split and corruption
  fixed; seed ``params.seed + s``), with ``k`` = the number of corrupted samples (or 10% of the
  training set without ground truth).

Both retrain many models, so they run only when enabled.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from cleanse.config import Params
from cleanse.data.dataset import StagedData
from cleanse.estimators import registry
from cleanse.estimators.base import ScoringContext
from cleanse.evaluate import lds, rank_stability, retrained_subset_outputs, subset_masks
from cleanse.models.architectures import default_device, spec_for
from cleanse.models.trainer import TrainedModel, train_model


def _context(params: Params, staged: StagedData, model: TrainedModel) -> ScoringContext:
    return ScoringContext(train=staged.train, val=staged.val, meta=staged.meta, model=model,
                          model_config=params.model, seed=params.seed, device=default_device())


def lds_metrics(params: Params, staged: StagedData, model: TrainedModel) -> dict[str, Any]:
    settings = params.evaluate
    query = staged.test.subset(np.arange(min(settings.lds_queries, len(staged.test))))
    masks = subset_masks(len(staged.train), settings.lds_subsets, seed=params.seed)
    outputs = retrained_subset_outputs(model.spec, staged.train, query, params.model, masks, seed=params.seed)
    context = _context(params, staged, model)
    out: dict[str, Any] = {"n_subsets": settings.lds_subsets, "n_queries": len(query), "estimators": {}}
    for name in params.estimators:
        estimator = registry.get(name)
        if not hasattr(estimator, "pairwise"):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attributions = estimator.pairwise(context, params.scorers.of(name), query)
        result = lds(attributions, masks, outputs)
        out["estimators"][name] = {"lds": result["lds"], "lds_se": result["lds_se"]}
    return out


def stability_metrics(params: Params, staged: StagedData) -> dict[str, Any]:
    settings = params.evaluate
    spec = spec_for(params.model.arch, params.model.hidden, staged.meta.feature_shape, staged.meta.n_classes)
    k = int(staged.train.is_corrupted.sum()) or max(1, len(staged.train) // 10)
    scores: dict[str, list[np.ndarray]] = {name: [] for name in params.estimators}
    for offset in range(settings.stability_seeds):
        seed = params.seed + offset
        model = train_model(spec, staged.train.features, staged.train.label, params.model, seed=seed,
                            device=torch.device("cpu"))
        context = _context(params.model_copy(update={"seed": seed}), staged, model)
        for name in params.estimators:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = registry.get(name).score(context, params.scorers.of(name))
            scores[name].append(result.table["score"].to_numpy())
    return {"seeds": [params.seed + s for s in range(settings.stability_seeds)], "k": k,
            "estimators": {name: rank_stability(np.stack(values), k=k) for name, values in scores.items()}}


def attribution_metrics(params: Params, staged: StagedData, model: TrainedModel) -> dict[str, Any]:
    """``{"lds": ..., "stability": ...}`` for the evaluations enabled in ``params.evaluate``."""
    out: dict[str, Any] = {}
    if params.evaluate.lds:
        out["lds"] = lds_metrics(params, staged, model)
    if params.evaluate.stability:
        out["stability"] = stability_metrics(params, staged)
    return out

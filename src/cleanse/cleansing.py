"""Group-aware iterative cleansing: remove, retrain, re-score the probes, repeat.

Poisons act together: with half of a backdoor's poisons removed the rest still carry it, and the
ranking of the survivors changes once the model is retrained without the first ones. So each round
removes the ``cleansing.step`` top-ranked samples, retrains from scratch with the same seed and
recipe, and re-scores the probes on the new model; it stops as soon as at most
``cleansing.stop_rate`` of the *held-out* probes (never scored) still show the behaviour, or when
the budget (``cleansing.max_fraction`` of the training set, ``cleansing.max_rounds``) is spent.

Round 0 is the model before any removal. Every round records the ids flagged in it, the held-out
behaviour rate, clean test accuracy and (for backdoors) the attack success rate on the test set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from cleanse.config import Params
from cleanse.data.dataset import StagedData
from cleanse.query import QuerySet


def _ranked_ids(sample_id: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Ids by descending score, ties by ascending id (as :func:`cleanse.detect.flag`)."""
    order = np.lexsort((sample_id, -np.asarray(score, dtype=np.float64)))
    return np.asarray(sample_id)[order]


def cleanse_iteratively(
    params: Params, staged: StagedData, estimator: Any, options: BaseModel, query: QuerySet, *,
    base_model: Any, first_score: np.ndarray | None = None, device: torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the loop for one estimator; return ``{"rounds": [...], "removed_ids", "stopped", "final"}``.

    ``first_score`` ``(n_train,)`` (in ``staged.train`` order) reuses the score stage's ranking for
    round 1; otherwise the base model is scored here.
    """
    from cleanse.attribution import score_with_query
    from cleanse.estimators.base import ScoringContext
    from cleanse.models.architectures import default_device, spec_for
    from cleanse.models.trainer import predict_proba, train_model
    from cleanse.pipeline import evaluate_model

    device = device or default_device()
    config = params.cleansing
    n = len(staged.train)
    budget = max(1, int(math.floor(config.max_fraction * n)))
    spec = spec_for(params.model.arch, params.model.hidden, staged.meta.feature_shape, staged.meta.n_classes)
    removed: list[int] = []
    rounds: list[dict[str, Any]] = []
    model = base_model
    stopped = "max_rounds"
    for index in range(config.max_rounds + 1):
        rate = query.behaviour_rate(predict_proba(model.module(), query.heldout.features))
        kept_mask = ~np.isin(staged.train.sample_id, removed)
        record = {"round": index, "n_removed": len(removed),
                  "n_corrupted_removed": int(staged.train.is_corrupted[~kept_mask].sum()),
                  "heldout_behaviour_rate": rate, **evaluate_model(model, staged)}
        if rounds:
            record["flagged_ids"] = rounds[-1].pop("next_ids")
        rounds.append(record)
        if log is not None:
            log(f"round {index}: removed {len(removed)} ({record['n_corrupted_removed']} corrupted), held-out "
                f"behaviour {rate:.3f}, test acc {record['test_accuracy']:.3f}"
                + (f", ASR {record['attack_success_rate']:.3f}" if "attack_success_rate" in record else ""))
        if not rate > config.stop_rate:  # also stops on nan (no held-out probes to check)
            stopped = "behaviour_gone"
            break
        if len(removed) >= budget:
            stopped = "budget_spent"
            break
        if index == config.max_rounds:
            break
        kept = staged.train.subset(kept_mask)
        if index == 0 and first_score is not None:
            score = np.asarray(first_score, dtype=np.float64)
        else:
            context = ScoringContext(train=kept, val=staged.val, meta=staged.meta, model=model,
                                     model_config=params.model, seed=params.seed, device=device)
            score = score_with_query(estimator, context, options, query, params.query.aggregate)[0].table["score"].to_numpy()
        take = _ranked_ids(kept.sample_id, score)[: min(config.step, budget - len(removed))]
        rounds[-1]["next_ids"] = take.tolist()
        removed += take.tolist()
        remaining = staged.train.without(np.asarray(removed))
        model = train_model(spec, remaining.features, remaining.label, params.model, seed=params.seed, device=device)
    rounds[-1].pop("next_ids", None)
    return {"rounds": rounds, "removed_ids": removed, "stopped": stopped, "budget": budget,
            "final": {k: v for k, v in rounds[-1].items() if k not in ("round", "flagged_ids")}, "model": model}

"""Group-aware iterative cleansing: remove, retrain, re-score the probes, repeat.

Poisons act together: with half of a backdoor's poisons removed the rest still carry it, and the
ranking of the survivors changes once the model is retrained without the first ones. So each round
removes the ``cleansing.step`` top-ranked samples, retrains from scratch with the same seed and
recipe, and re-scores the probes on the new model; it stops as soon as at most
``cleansing.stop_rate`` of the *held-out* probes (never scored) still show the behaviour, or when
the budget (``cleansing.max_fraction`` of the training set, ``cleansing.max_rounds``) is spent.

From round 2 on only the probes the retrained model still gets wrong are attributed
(``cleansing.refresh_probes``): the poisons that survive are what keeps those failing.

Once the behaviour is gone, removed samples whose label is none of the probes' labels, or whose
label the cleansed model agrees with, are put back (``cleansing.readmit``) and the model
retrained; that last round is kept only if the behaviour stays gone (else the first half of
them is tried, at most 3 retrains).

With ``cleansing.step: outlier`` a round removes the survivors whose score is a high outlier of
the survivors' scores (:func:`cleanse.detect.outlier_mask`, level ``detect.alpha``) instead of a
fixed number, and the loop also stops when no survivor is one: the total removed is decided by the
scores, never by the ground truth.

Only estimators with train -> probe scores are cleansed this way (:func:`iterates`); the retrain
stage retrains the others once without their flags. What the loop needs of a family (refit without
the removed samples, which probes still show the behaviour, a scoring context, whether to readmit)
is :meth:`cleanse.families.base.Family.cleansing_rounds`: :class:`ClassifierRounds` by default.

Round 0 is the model before any removal. Every round records the ids flagged in it, the held-out
behaviour rate, clean test accuracy and (for backdoors) the attack success rate on the test set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from cleanse.config import Params
from cleanse.data.dataset import Split, StagedData
from cleanse.progress import progress
from cleanse.query import QuerySet


def iterates(params: Params, estimator: str) -> bool:
    """Whether the retrain stage cleanses ``estimator`` iteratively: ``cleansing.iterative`` is on
    and the estimator has train -> probe scores (:func:`cleanse.attribution.supports_query`) to
    re-rank the survivors with. The others (``loss``, ``cleanlab``, ...) would only re-rank by their
    own self-scores, which do not see the behaviour the loop stops on; they are retrained once
    without their flags."""
    if not params.cleansing.iterative:
        return False
    from cleanse.attribution import supports_query
    from cleanse.estimators import registry

    return supports_query(registry.get(estimator))


def _ranked_ids(sample_id: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Ids by descending score, ties by ascending id (as :func:`cleanse.detect.flag`)."""
    order = np.lexsort((sample_id, -np.asarray(score, dtype=np.float64)))
    return np.asarray(sample_id)[order]


class ClassifierRounds:
    """What the loop needs of a family whose models are classifiers (the default of
    :meth:`cleanse.families.base.Family.cleansing_rounds`): retrain with the run's seed and recipe,
    a probe shows the behaviour when it is predicted as its label, readmission by label."""

    readmits = True

    def __init__(self, params: Params, staged: StagedData, device: torch.device, spec: Any = None) -> None:
        from cleanse.models.architectures import spec_for

        self.params, self.staged, self.device = params, staged, device
        self.spec = spec or spec_for(params.model.arch, params.model.hidden, staged.meta.feature_shape,
                                     staged.meta.n_classes)

    def fit(self, remaining: Split) -> Any:
        from cleanse.models.trainer import train_model

        return train_model(self.spec, remaining.features, remaining.label, self.params.model, seed=self.params.seed,
                           device=self.device)

    def shows(self, model: Any, probes: Split) -> np.ndarray:
        """``(k,)`` bool: ``model`` predicts each probe as its behaviour label."""
        from cleanse.models.trainer import predict_proba

        return predict_proba(model.module(), probes.features).argmax(1) == probes.label

    def heldout_rate(self, query: QuerySet, model: Any) -> float:
        from cleanse.models.trainer import predict_proba

        return query.behaviour_rate(predict_proba(model.module(), query.heldout.features))

    def context(self, kept: Split, model: Any) -> Any:
        from cleanse.estimators.base import ScoringContext

        return ScoringContext(train=kept, val=self.staged.val, meta=self.staged.meta, model=model,
                              model_config=self.params.model, seed=self.params.seed, device=self.device)


def _current_probes(query: QuerySet, model: Any, rounds: Any) -> QuerySet:
    """``query`` restricted to the probes ``model`` still shows the behaviour on (for a classifier:
    still gets wrong); unchanged if none or all.

    Once most poisons are gone, a probe the retrained model classifies correctly mostly measures
    support for its label in general; the probes it still fails on are what the survivors cause.
    (Adding the removed samples the retrained model contradicts as extra probes was tried and
    measured worse on the digits backdoor cells: it pulled in ordinary samples of other classes.)
    """
    from dataclasses import replace

    shows = rounds.shows(model, query.probes)
    if shows.all() or not shows.any():
        return query
    return replace(query, probes=query.probes.subset(shows))


def _round_record(staged: StagedData, removed: list[int], rate: float, model: Any, family: str) -> dict[str, Any]:
    """What every round logs about ``model`` trained without ``removed``."""
    from cleanse.pipeline import evaluate_model

    taken = np.isin(staged.train.sample_id, removed)
    return {"n_removed": len(removed), "n_corrupted_removed": int(staged.train.is_corrupted[taken].sum()),
            "heldout_behaviour_rate": rate, **evaluate_model(model, staged, family=family)}


READMIT_TRIES = 3


def readmit_agreeing(params: Params, staged: StagedData, query: QuerySet, spec: Any, model: Any, removed: list[int],
                     device: torch.device, log: Callable[[str], None] | None) -> tuple[Any, list[int], dict[str, Any]] | None:
    """Put back removed samples that cannot be what causes the behaviour; keep that only if the
    retrained model shows the behaviour on no more held-out probes than ``model`` (or ``stop_rate``).

    Two kinds of removed sample are put back:

    - those whose label is none of the behaviour's labels (the probes' labels). The samples that
      make a model send inputs to class ``y`` carry label ``y``: dirty-label poisons are relabelled
      to it, clean-label poisons are of it, and a mislabelled sample explains an error towards
      its (wrong) label. The last rounds, ranking the few surviving poisons, also pick up hard
      samples of other classes; leaving those out costs clean accuracy for nothing.
    - those whose label the cleansed ``model`` predicts. The ranking also removes ordinary samples
      of the behaviour's label (they support it too). A model without the poisons disagrees with
      a poison's label (a triggered 3 labelled 0 is predicted 3) but agrees with an ordinary
      sample's, so agreement separates the two after the fact.

    Neither rule is perfect (a poison whose source input already looks like the target class is
    agreed with), so if the behaviour returns, the first half of the candidates (other labels
    first, then by the cleansed model's confidence in the label) is tried instead, up to
    ``READMIT_TRIES`` retrains in all. Returns ``(model, removed, round record)``, or ``None``
    when nothing could be put back.
    """
    from cleanse.models.trainer import predict_proba

    rounds = ClassifierRounds(params, staged, device, spec)
    cleansed = model.module()
    candidates = staged.train.subset(np.isin(staged.train.sample_id, removed))
    probabilities = predict_proba(cleansed, candidates.features)
    confidence = probabilities[np.arange(len(candidates)), candidates.label]
    other_label = ~np.isin(candidates.label, query.probes.label)
    agrees = probabilities.argmax(1) == candidates.label
    # Other labels first (they sort as confidence 2), then agreed-with samples by confidence.
    eligible = np.flatnonzero(other_label | agrees)
    priority = np.where(other_label, 2.0, confidence)[eligible]
    ranked = candidates.sample_id[eligible[np.argsort(-priority, kind="stable")]]
    size = len(ranked)
    # Never worse than the cleansed model itself (which the loop only hands over at <= stop_rate).
    threshold = max(params.cleansing.stop_rate, rounds.heldout_rate(query, model))
    for _ in range(READMIT_TRIES):
        if size == 0:
            return None
        back = set(ranked[:size].tolist())
        still_removed = [i for i in removed if i not in back]
        remaining = staged.train.without(np.asarray(still_removed, dtype=np.int64))
        retrained = rounds.fit(remaining)
        rate = rounds.heldout_rate(query, retrained)
        kept = rate <= threshold or not np.isfinite(rate)
        if log is not None:
            log(f"readmit: {len(back)} of {len(removed)} removed samples (other labels, or agreed with); held-out "
                f"behaviour after putting them back {rate:.3f} ({'kept' if kept else 'reverted'})")
        if kept:
            record = {**_round_record(staged, still_removed, rate, retrained, params.family), "n_readmitted": len(back),
                      "readmitted_ids": sorted(back)}
            return retrained, still_removed, record
        size //= 2
    return None


def cleanse_iteratively(
    params: Params, staged: StagedData, estimator: Any, options: BaseModel, query: QuerySet, *,
    base_model: Any, first_score: np.ndarray | None = None, device: torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the loop for one estimator; return ``{"rounds": [...], "removed_ids", "stopped", "final"}``.

    ``first_score`` ``(n_train,)`` (in ``staged.train`` order) reuses the score stage's ranking for
    round 1; otherwise the base model is scored here.
    """
    from cleanse import families
    from cleanse.attribution import score_with_query
    from cleanse.detect import outlier_mask
    from cleanse.models.architectures import default_device

    device = device or default_device()
    family = families.get(params.family)
    hooks = family.cleansing_rounds(params, staged, device)
    config = params.cleansing
    n = len(staged.train)
    budget = max(1, int(math.floor(config.max_fraction * n)))
    removed: list[int] = []
    rounds: list[dict[str, Any]] = []
    model = base_model
    stopped = "max_rounds"
    for index in progress(range(config.max_rounds + 1), "cleansing: rounds", unit="round"):
        rate = hooks.heldout_rate(query, model)
        kept_mask = ~np.isin(staged.train.sample_id, removed)
        record = {"round": index, **_round_record(staged, removed, rate, model, params.family)}
        if rounds:
            record["flagged_ids"] = rounds[-1].pop("next_ids")
        rounds.append(record)
        if log is not None:
            log(f"round {index}: removed {len(removed)} ({record['n_corrupted_removed']} corrupted), held-out "
                f"behaviour {rate:.3f}, {family.outcome_keys[0]} {record[family.outcome_keys[0]]:.3f}"
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
            context = hooks.context(kept, model)
            probes = _current_probes(query, model, hooks) if config.refresh_probes else query
            record["n_probes_scored"] = len(probes.probes)
            started = time.perf_counter()
            score = score_with_query(estimator, context, options, probes, params.query.aggregate)[0].table["score"].to_numpy()
            record["score_seconds"] = time.perf_counter() - started  # re-scoring dominates the loop's cost
        if config.step == "outlier":
            outliers = outlier_mask(score, alpha=params.detect.alpha)
            take = _ranked_ids(kept.sample_id[outliers], score[outliers])[: budget - len(removed)]
            if not take.size:
                stopped = "no_outliers"
                break
        else:
            take = _ranked_ids(kept.sample_id, score)[: min(config.step, budget - len(removed))]
        rounds[-1]["next_ids"] = take.tolist()
        removed += take.tolist()
        remaining = staged.train.without(np.asarray(removed))
        started = time.perf_counter()
        model = hooks.fit(remaining)
        record["retrain_seconds"] = time.perf_counter() - started
    rounds[-1].pop("next_ids", None)
    if config.readmit and hooks.readmits and stopped == "behaviour_gone" and removed:
        outcome = readmit_agreeing(params, staged, query, hooks.spec, model, removed, device, log)
        if outcome is not None:
            model, removed, record = outcome
            record["round"] = len(rounds)
            rounds.append(record)
    return {"rounds": rounds, "removed_ids": removed, "stopped": stopped, "budget": budget,
            "final": {k: v for k, v in rounds[-1].items() if k not in ("round", "flagged_ids", "readmitted_ids")}, "model": model}

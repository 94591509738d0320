"""The ``recommend`` stage: one cleaned model, chosen without ground truth (:mod:`cleanse.recommend`)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cleanse.config import Params
from cleanse.stages.common import load_staged, recommend_dir, recommended_model_dir
from cleanse.stages.common import locked as _locked
from cleanse.stages.common import probes as _probes
from cleanse.stages.common import track as _track
from cleanse.stages.fingerprints import recommend_fingerprint, references_fingerprint, retrain_fingerprint
from cleanse.stages.fingerprints import require_fresh as _require_fresh
from cleanse.stages.modelio import load_model, retrained_without, save_model
from cleanse.stages.retrain_seeds import OVER_SEEDS, over_seeds
from cleanse.storage import Layout, read_json, read_table, write_json


def _removed_ids(layout: Layout, estimator: str, result: dict[str, Any]) -> np.ndarray:
    if "removed_ids" in result:  # iterative cleansing records what it removed
        return np.asarray(result["removed_ids"], dtype=np.int64)
    flags = read_table(layout.flags(estimator))
    return flags.filter(pl.col("is_flagged"))["sample_id"].to_numpy().astype(np.int64)


@_locked
def run_recommend(params: Params, layout: Layout) -> Path:
    """Choose one cleaned model without ground truth (:mod:`cleanse.recommend`): "no removal" and
    every estimator's cleaned model compete on held-out probe behaviour (with probes) and validation
    accuracy; the best few are retrained at the noise count the validation split estimates (or,
    without an estimate, the winner at ``recommend.budget_factors`` times its budget) and the best
    of those and the winner is kept. Writes ``recommend/recommend.json`` and ``models/recommended/``."""
    from cleanse import families
    from cleanse.recommend import (FINALISTS, NO_REMOVAL, Candidate, budget_counts, choose, consistency, finalists,
                                   ranked, top_ids)

    staged = load_staged(layout, params)
    references = read_json(layout.retrain_result("references"))
    _require_fresh(layout.retrain_result("references"), references_fingerprint(params), "reference retrains")
    started = time.perf_counter()
    query = _probes(params, layout, staged)
    base = load_model(layout.base_model)
    nan = float("nan")
    stop_rate = params.cleansing.stop_rate

    def candidate(name: str, removed: np.ndarray, result: dict[str, Any], factor: float = 1.0) -> Candidate:
        return Candidate(name, removed, families.get(params.family).selection_score(result),
                         float(result.get("heldout_behaviour_rate", nan) if query is not None else nan), factor)

    candidates = [candidate(NO_REMOVAL, np.zeros(0, dtype=np.int64), references["baseline"])]
    results: dict[str, dict[str, Any]] = {}
    for name in params.estimators:
        _require_fresh(layout.retrain_result(name), retrain_fingerprint(params, name), f"{name} retrain result")
        results[name] = read_json(layout.retrain_result(name))
        removed = _removed_ids(layout, name, results[name])
        proposed = candidate(name, removed, results[name]["cleaned"])
        if results[name].get("iterative"):  # the loop's removals need not be its first ranking's top
            scores = read_table(layout.scores(name))
            proposed = replace(proposed, consistency=consistency(scores["sample_id"].to_numpy(),
                                                                 scores["score"].to_numpy(), removed))
        candidates.append(proposed)
    order = ranked(candidates, stop_rate=stop_rate)
    first = order[0]
    winner = candidates[first]
    trained: dict[int, Any] = {}  # second-round candidate index -> (model, evaluation)

    def retrain_ranking(index: int, count: int, factor: float | None = None) -> None:
        name = candidates[index].estimator
        scores = read_table(layout.scores(name))
        removed = top_ids(scores["sample_id"].to_numpy(), scores["score"].to_numpy(), count)
        model, result = retrained_without(params, staged, removed, query, base)
        result = over_seeds(params, result, lambda seeded: retrained_without(seeded, staged, removed, query, base)[1])
        own = max(candidates[index].n_removed, 1)
        candidates.append(candidate(name, removed, result, round(count / own, 3) if factor is None else factor))
        trained[len(candidates) - 1] = (model, result)

    # The budget (an iterative loop chose its own removals, so its ranking is not re-cut).
    iterative = [name for name in results if results[name].get("iterative")]
    estimate = families.get(params.family).noise_count_estimate(params, staged)
    noise_count = None if estimate is None else estimate["noise_count"]
    cap = max(1, int(params.detect.max_fraction * len(staged.train)))
    if noise_count is not None and noise_count >= 1:
        noise_count = min(noise_count, cap)
        for index in finalists(candidates, order, FINALISTS, exclude=iterative):
            if noise_count != candidates[index].n_removed:
                retrain_ranking(index, noise_count)
    elif winner.estimator != NO_REMOVAL and winner.estimator not in iterative:
        for factor, count in budget_counts(winner.n_removed, params.recommend.budget_factors, len(staged.train),
                                           params.detect.max_fraction):
            retrain_ranking(first, count, factor)
    contenders = [first, *trained]
    chosen_index = contenders[choose([candidates[i] for i in contenders], stop_rate=stop_rate)]
    chosen = candidates[chosen_index]
    if chosen_index in trained:
        model, evaluation = trained[chosen_index]
    elif chosen.estimator == NO_REMOVAL:
        model, evaluation = base, dict(references["baseline"])
    else:  # the same seed and recipe as the retrain stage: the same model
        model, evaluation = retrained_without(params, staged, chosen.removed_ids, query, base)
        seeded = results[chosen.estimator]["cleaned"]
        if OVER_SEEDS in seeded:  # evaluate.retrain_seeds > 1: that stage's mean over the same training seeds
            evaluation = {**evaluation, **{key: seeded[key] for key in seeded[OVER_SEEDS]["values"]},
                          OVER_SEEDS: seeded[OVER_SEEDS]}
    evaluation = {**evaluation, "n_removed": chosen.n_removed,
                  "n_corrupted_removed": int(staged.train.is_corrupted[np.isin(staged.train.sample_id,
                                                                               chosen.removed_ids)].sum())}
    save_model(model, recommended_model_dir(layout), {"fingerprint": recommend_fingerprint(params),
                                                      "estimator": chosen.estimator, **evaluation},
               family=params.family)
    if estimate is not None:  # the count as used: capped at detect.max_fraction
        estimate = {**estimate, "noise_count": noise_count}
    write_json({"fingerprint": recommend_fingerprint(params), "estimator": chosen.estimator,
                "budget_factor": chosen.budget_factor, "n_removed": chosen.n_removed,
                "removed_ids": chosen.removed_ids.tolist(), "cleaned": evaluation, "noise_estimate": estimate,
                "rule": "held-out probe behaviour (with probes), then validation accuracy, then fewer removed, "
                        "then the ranking that agrees with the removal; budget: the trusted split's noise-count "
                        "estimate for the best first-round rankings (cofit_svm: its own count, never re-cut); trusted "
                        "is left out when cofit_svm, which refines it, also ran",
                "candidates": [c.summary() for c in candidates], "chosen": chosen_index,
                "seconds": time.perf_counter() - started}, recommend_dir(layout) / "recommend.json")
    _track(params, layout, "recommend")
    layout.publish()
    return recommend_dir(layout) / "recommend.json"

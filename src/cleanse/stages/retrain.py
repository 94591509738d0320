"""The ``retrain`` stage (one estimator: one-shot or iterative cleansing) and the ``references``
stage (baseline, oracle and random removal)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cleanse.config import Params
from cleanse.data.dataset import StagedData
from cleanse.errors import ConfigError
from cleanse.stages.common import load_staged, locked, probes, track
from cleanse.stages.fingerprints import (
    STAGE_META_NAME,
    detect_fingerprint,
    references_fingerprint,
    require_fresh,
    retrain_fingerprint,
    train_fingerprint,
)
from cleanse.stages.modelio import evaluate_model, load_model, random_ids, retrain_without, retrained_without
from cleanse.stages.retrain_seeds import over_seeds
from cleanse.storage import Layout, read_table, write_json


@locked
def run_retrain(params: Params, layout: Layout, estimator: str) -> Path:
    """Retrain without the estimator's flags, and without a random set of the same size (each at
    ``evaluate.retrain_seeds`` training seeds: :mod:`cleanse.stages.retrain_seeds`)."""
    staged = load_staged(layout, params)
    meta_path = layout.flags(estimator).with_suffix(".meta.json")
    require_fresh(meta_path, detect_fingerprint(params, estimator), f"{estimator} flags")
    flags = read_table(layout.flags(estimator))
    flagged = flags.filter(pl.col("is_flagged"))["sample_id"].to_numpy()
    started = time.perf_counter()
    from cleanse.cleansing import iterates

    if iterates(params, estimator):
        return _retrain_iteratively(params, layout, estimator, staged, started)
    base = load_model(layout.base_model)
    query = probes(params, layout, staged)
    cleaned_model, cleaned = retrained_without(params, staged, flagged, query, base)
    cleaned = over_seeds(params, cleaned, lambda seeded: retrain_without(seeded, staged, flagged, query, base))
    random = _random_removal(params, staged, flagged.size, base)
    write_json({"estimator": estimator, "fingerprint": retrain_fingerprint(params, estimator),
                "seconds": time.perf_counter() - started, "n_flagged": int(flagged.size),
                "cleaned": cleaned, "random_same_count": random}, layout.retrain_result(estimator))
    track(params, layout, "retrain", estimator, model=cleaned_model)
    layout.publish()
    return layout.retrain_result(estimator)


def _retrain_iteratively(params: Params, layout: Layout, estimator: str, staged: StagedData, started: float) -> Path:
    """Iterative cleansing (:mod:`cleanse.cleansing`); every round is kept in the result."""
    from cleanse.cleansing import cleanse_iteratively
    from cleanse.estimators import registry
    from cleanse.query import query_for

    model = load_model(layout.base_model)
    query = query_for(params, staged, model)
    if query is None:  # Params refuses cleansing.iterative with query.kind none; the loop stops on probes
        raise ConfigError("cleansing.iterative needs probes to stop on; set query.kind (val_errors, triggered or file)")
    scores = read_table(layout.scores(estimator))
    order = {sid: i for i, sid in enumerate(scores["sample_id"].to_list())}
    first = scores["score"].to_numpy()[[order[sid] for sid in staged.train.sample_id.tolist()]]
    loop = cleanse_iteratively(params, staged, registry.get(estimator), params.scorers.of(estimator), query,
                               base_model=model, first_score=first)
    removed = np.asarray(loop["removed_ids"], dtype=np.int64)
    cleaned = {**loop["final"], "n_removed": int(removed.size),
               "n_corrupted_removed": int(staged.train.is_corrupted[np.isin(staged.train.sample_id, removed)].sum())}
    # the loop's last fit is the retrain at the run seed; the other training seeds retrain the same removal
    cleaned = over_seeds(params, cleaned, lambda seeded: retrain_without(seeded, staged, removed, query, model))
    random = _random_removal(params, staged, removed.size, None)
    write_json({"estimator": estimator, "fingerprint": retrain_fingerprint(params, estimator),
                "seconds": time.perf_counter() - started, "n_flagged": int(removed.size), "iterative": True,
                "stopped": loop["stopped"], "rounds": loop["rounds"], "removed_ids": removed.tolist(),
                "cleaned": cleaned, "random_same_count": random}, layout.retrain_result(estimator))
    track(params, layout, "retrain", estimator, model=loop["model"])  # the cleansed model, as the one-shot path logs
    layout.publish()
    return layout.retrain_result(estimator)


@locked
def run_references(params: Params, layout: Layout) -> Path:
    """Baseline (the base model: no removal), oracle (exactly the corrupted removed), and random
    removal of as many samples as were corrupted."""
    staged = load_staged(layout, params)
    require_fresh(layout.base_model / STAGE_META_NAME, train_fingerprint(params), "base model")
    base = load_model(layout.base_model)
    query = probes(params, layout, staged)
    baseline = evaluate_model(base, staged, query, family=params.family)
    nothing = np.zeros(0, dtype=np.int64)
    baseline = over_seeds(params, baseline, lambda seeded: _without_counts(
        retrain_without(seeded, staged, nothing, query, base)))
    out: dict[str, Any] = {"fingerprint": references_fingerprint(params), "baseline": baseline}
    corrupted = staged.train.sample_id[staged.train.is_corrupted]
    if corrupted.size:
        oracle = retrain_without(params, staged, corrupted, base=base)
        out["oracle"] = over_seeds(params, oracle, lambda seeded: retrain_without(seeded, staged, corrupted, base=base))
        out["random"] = _random_removal(params, staged, corrupted.size, base)
    write_json(out, layout.retrain_result("references"))
    track(params, layout, "references")
    layout.publish()
    return layout.retrain_result("references")


def _random_removal(params: Params, staged: StagedData, count: int, base: Any) -> dict[str, Any]:
    """Retrained without ``count`` random training samples (one set, drawn from the run seed);
    ``base``: the base model, or None to let the family refit it (as the iterative path always has)."""
    removed = random_ids(staged, count, params.seed)
    return over_seeds(params, retrain_without(params, staged, removed, base=base),
                      lambda seeded: retrain_without(seeded, staged, removed, base=base))


def _without_counts(outcome: dict[str, Any]) -> dict[str, Any]:
    """The baseline's outcome keys: a retrain without nothing, less its removal counts."""
    return {key: value for key, value in outcome.items() if key not in ("n_removed", "n_corrupted_removed")}

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
from cleanse.storage import Layout, read_table, write_json


@locked
def run_retrain(params: Params, layout: Layout, estimator: str) -> Path:
    """Retrain without the estimator's flags, and without a random set of the same size."""
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
    cleaned_model, cleaned = retrained_without(params, staged, flagged, probes(params, layout, staged), base)
    random = retrain_without(params, staged, random_ids(staged, flagged.size, params.seed), base=base)
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
    random = retrain_without(params, staged, random_ids(staged, removed.size, params.seed))
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
    baseline = evaluate_model(base, staged, probes(params, layout, staged), family=params.family)
    out: dict[str, Any] = {"fingerprint": references_fingerprint(params), "baseline": baseline}
    corrupted = staged.train.sample_id[staged.train.is_corrupted]
    if corrupted.size:
        out["oracle"] = retrain_without(params, staged, corrupted, base=base)
        out["random"] = retrain_without(params, staged, random_ids(staged, corrupted.size, params.seed), base=base)
    write_json(out, layout.retrain_result("references"))
    track(params, layout, "references")
    layout.publish()
    return layout.retrain_result("references")

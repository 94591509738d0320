"""The ``score`` and ``detect`` stages (one estimator each)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cleanse.config import Params
from cleanse.stages.common import load_staged, locked, pairwise_path, track
from cleanse.stages.fingerprints import detect_fingerprint, require_fresh, score_fingerprint
from cleanse.stages.fit import scoring_context
from cleanse.storage import Layout, read_table, write_json, write_npy, write_table


@locked
def run_score(params: Params, layout: Layout, estimator: str) -> Path:
    """Write ``scores/<estimator>.parquet`` and its ``.meta.json``."""
    from cleanse.estimators import registry

    from cleanse.attribution import score_with_query
    from cleanse.query import query_for

    scorer = registry.get(estimator)
    staged = load_staged(layout, params)
    context = scoring_context(params, layout, staged)
    # The same deterministic choice as run_query (which records it under query/).
    query = query_for(params, staged, context.model)
    from cleanse.grads import forward_ad_wait_seconds

    # The scorer's own time: waits for another thread's forward-mode section (concurrent tasks
    # in one process, see cleanse.grads.jvp) are not its work.
    started, waited = time.perf_counter(), forward_ad_wait_seconds()
    result, matrix = score_with_query(scorer, context, params.scorers.of(estimator), query, params.query.aggregate)
    seconds = time.perf_counter() - started - (forward_ad_wait_seconds() - waited)
    # Always written (no probes, or no train -> probe scores: zero rows), so that it is a DVC output
    # of score@<estimator> and a stale matrix from an earlier configuration never survives.
    empty = np.zeros((0, len(context.train)), dtype=np.float32)
    write_npy(empty if matrix is None else matrix, pairwise_path(layout, estimator))
    table = result.table
    if table["sample_id"].to_list() != context.train.sample_id.tolist():
        raise RuntimeError(f"estimator {estimator} returned rows out of training order")
    write_table(table, layout.scores(estimator))
    if hasattr(scorer, "write_artifacts"):  # e.g. memorization's (n_test, n_train) influence memmap
        artifacts = scorer.write_artifacts(context, params.scorers.of(estimator), staged.test,
                                           layout.root / "scores" / estimator)
        result.meta["artifacts"] = artifacts
    # Always written, so that scores/<estimator>/ exists as a DVC output of score@<estimator>.
    write_json(result.meta.get("artifacts", {}), layout.root / "scores" / estimator / "artifacts.json")
    write_json({"estimator": estimator, "fingerprint": score_fingerprint(params, estimator), "seconds": seconds,
                "orientation": "one row per training sample; higher score = more likely harmful",
                "options": params.scorers.of(estimator).model_dump(mode="json"), **result.meta},
               layout.scores_meta(estimator))
    track(params, layout, "score", estimator)
    layout.publish()
    return layout.scores(estimator)


@locked
def run_detect(params: Params, layout: Layout, estimator: str) -> Path:
    """Write ``flags/<estimator>.parquet`` (``sample_id, score, rank, is_flagged``)."""
    from cleanse.detect import flag

    require_fresh(layout.scores_meta(estimator), score_fingerprint(params, estimator), f"{estimator} scores")
    flags = flag(read_table(layout.scores(estimator)), params.detect)
    write_table(flags, layout.flags(estimator))
    write_json({"estimator": estimator, "fingerprint": detect_fingerprint(params, estimator),
                "n_flagged": int(flags["is_flagged"].sum()), "budget": params.detect.budget},
               layout.flags(estimator).with_suffix(".meta.json"))
    track(params, layout, "detect", estimator)
    layout.publish()
    return layout.flags(estimator)

"""The ``train`` and ``query`` stages, and the scoring context built from their outputs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cleanse.config import Params
from cleanse.data.dataset import StagedData
from cleanse.stages.common import load_base_model, load_staged, locked, query_dir, track
from cleanse.stages.fingerprints import query_fingerprint, train_fingerprint
from cleanse.stages.modelio import evaluate_model, save_model
from cleanse.storage import Layout, write_json, write_table


@locked
def run_train(params: Params, layout: Layout) -> Path:
    """Train the base model on the (corrupted) training split; write ``models/base/``."""
    from cleanse import families

    task = families.get(params.family)
    staged = load_staged(layout, params)
    started = time.perf_counter()
    model = task.fit(params, staged.train, staged.meta)
    seconds = time.perf_counter() - started
    save_model(model, layout.base_model, {"fingerprint": train_fingerprint(params), "seconds": seconds,
                                          **evaluate_model(model, staged, family=params.family),
                                          **task.training_record(model)}, family=params.family)
    track(params, layout, "train")
    layout.publish()
    return layout.base_model


def scoring_context(params: Params, layout: Layout, staged: StagedData | None = None) -> Any:
    """What the estimators read, built by the family (:meth:`cleanse.families.base.Family.scoring_context`)."""
    from cleanse import families

    staged = staged if staged is not None else load_staged(layout, params)
    return families.get(params.family).scoring_context(params, staged, load_base_model(params, layout),
                                                       layout.root / "cache")


@locked
def run_query(params: Params, layout: Layout) -> Path:
    """Record the probes under ``query/``: ``probes.parquet`` and ``heldout.parquet`` (``label`` =
    the behaviour label) and ``query.json`` (the summary and fingerprint; ``kind: none`` and no
    tables when the run has no probes). The score stages make the same deterministic choice."""
    from cleanse.query import query_for

    query = query_for(params, load_staged(layout, params), load_base_model(params, layout))
    folder = query_dir(layout)
    if query is None:  # an earlier configuration's probes must not survive
        for name in ("probes.parquet", "heldout.parquet"):
            (folder / name).unlink(missing_ok=True)
    else:
        write_table(query.probes.to_frame(), folder / "probes.parquet")
        write_table(query.heldout.to_frame(), folder / "heldout.parquet")
    summary = query.summary() if query is not None else {"kind": "none"}
    write_json({**summary, "fingerprint": query_fingerprint(params)}, folder / "query.json")
    layout.publish()
    return folder

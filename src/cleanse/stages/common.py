"""What the stage runners share: the output root's lock, MLflow logging of a finished stage, the
artifact paths that :class:`cleanse.storage.Layout` does not name, and loading a stage's inputs
(refused when they were produced with another configuration)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from cleanse.config import Params
from cleanse.data.dataset import DatasetMeta, Split, StagedData
from cleanse.lock import out_lock
from cleanse.stages.fingerprints import STAGE_META_NAME, require_fresh, stage_fingerprint, train_fingerprint
from cleanse.stages.modelio import load_model
from cleanse.storage import Layout, read_json, read_table


def locked(stage: Any) -> Any:
    """Run ``stage(params, layout, ...)`` holding the output root's lock (:mod:`cleanse.lock`):
    reentrant, so ``run_all`` and the CLI, which hold it already, pass straight through, and a
    second process on the same ``--out`` is refused before it writes anything."""

    @functools.wraps(stage)
    def wrapper(params: Params, layout: Layout, *args: Any, **kwargs: Any) -> Any:
        with out_lock(layout.root):
            return stage(params, layout, *args, **kwargs)

    return wrapper


def track(params: Params, layout: Layout, stage: str, estimator: str | None = None, **extra: Any) -> None:
    """Log a finished stage to MLflow (:func:`cleanse.tracking.log_stage`) when tracking is on."""
    if params.tracking.enabled:
        from cleanse.tracking import log_stage

        log_stage(params, layout, stage, estimator, **extra)


def source_records(layout: Layout) -> tuple[Path, Path]:
    """``data/source.json`` and ``data/probes_source.json``: what :func:`run_source` writes."""
    return layout.root / "data" / "source.json", layout.root / "data" / "probes_source.json"


def query_dir(layout: Layout) -> Path:
    return layout.root / "query"


def pairwise_path(layout: Layout, estimator: str) -> Path:
    """``(n_query, n_train)`` train -> probe matrix (``np.load(path, mmap_mode="r")``); positive =
    proponent. Zero rows when the run had no probes or the estimator has no train -> probe scores."""
    return layout.root / "scores" / f"{estimator}.pairwise.npy"


def recommend_dir(layout: Layout) -> Path:
    """``recommend.json`` (the choice, every candidate and the recommended model's evaluation) and
    ``models/recommended/`` (its weights)."""
    return layout.root / "recommend"


def recommended_model_dir(layout: Layout) -> Path:
    return layout.root / "models" / "recommended"


def load_staged(layout: Layout, params: Params | None = None) -> StagedData:
    if params is not None:
        require_fresh(layout.staged_meta, stage_fingerprint(params), "staged data")
    meta = DatasetMeta.from_json(read_json(layout.staged_meta))
    splits = {name: Split.from_frame(read_table(layout.split(name)), meta.feature_shape) for name in ("train", "val", "test")}
    return StagedData(meta=meta, **splits)


def load_base_model(params: Params, layout: Layout) -> Any:
    """The trained base model, refused when it was trained with another configuration."""
    require_fresh(layout.base_model / STAGE_META_NAME, train_fingerprint(params), "base model")
    return load_model(layout.base_model)


def probes(params: Params, layout: Layout, staged: StagedData) -> Any:
    """The run's probes (the deterministic choice :func:`run_query` records), None without."""
    if params.query.kind == "none":
        return None
    from cleanse.query import query_for

    return query_for(params, staged, load_model(layout.base_model))

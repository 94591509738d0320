"""Retrieval quality of the diffusion family's estimators (Lin, Lao & Zhao, arXiv 2412.08637,
section 4: "detection rate"; spec part B 3.5).

- Source detection, :func:`precision_at_k`: for each query with a known source, the fraction of its
  top-k training images whose source equals the query's (the class for single-source sets, the
  data set for mixed ones), averaged over those queries; higher = better.
- Planted duplicates (``corruption.kind: duplicates``), :func:`duplicate_recall`: among the
  generations that reproduce the duplicated image (:func:`reproducing`: closer to it than half its
  distance to any other training image), the fraction whose top-10 holds a planted copy.

Both read each estimator's stored per-query table ``scores/<name>/queries.parquet`` (written by
the estimators' ``write_artifacts``, :mod:`cleanse.estimators.dmin`); the evaluation, not the
estimators, reads the ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cleanse.data.dataset import StagedData
from cleanse.storage import Layout, read_table, read_tensors

DEFAULT_KS = (5, 10, 50)


def precision_at_k(retrieved_sources: np.ndarray, query_source: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """``{"precision_at_<k>": mean over queries of the fraction of the first k retrieved sources
    equal to the query's}`` for ``retrieved_sources`` ``(Q, K)`` (rank order; -1 where fewer were
    retrieved, counted as misses) and ``query_source`` ``(Q,)``. Queries of unknown source (< 0)
    are left out; a k above K is left out."""
    retrieved = np.asarray(retrieved_sources)
    source = np.asarray(query_source)
    known = source >= 0
    out: dict[str, float] = {}
    if retrieved.ndim != 2 or not known.any():
        return out
    hits = retrieved[known] == source[known, None]
    for k in ks:
        if k <= retrieved.shape[1]:
            out[f"precision_at_{k}"] = float(hits[:, :k].mean())
    return out


def queries_path(layout: Layout, estimator: str) -> Path:
    return layout.root / "scores" / estimator / "queries.parquet"


def _ranked(table: pl.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``(Q, K)`` of ``column`` in rank order (-1 padding) and each query's source ``(Q,)``."""
    query_id, rank = table["query_id"].to_numpy(), table["rank"].to_numpy()
    q = int(query_id.max()) + 1 if table.height else 0
    k = int(rank.max()) if table.height else 0
    matrix = np.full((q, k), -1, dtype=np.int64)
    matrix[query_id, rank - 1] = table[column].to_numpy()
    source = np.full(q, -1, dtype=np.int64)
    source[query_id] = table["query_source"].to_numpy()
    return matrix, source


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel L2 distances ``(len(a), len(b))``."""
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return np.sqrt(np.maximum((a ** 2).sum(1)[:, None] - 2 * a @ b.T + (b ** 2).sum(1)[None, :], 0.0))


def reproducing(query_images: np.ndarray, train_images: np.ndarray, planted: np.ndarray,
                margin: float = 0.5) -> np.ndarray:
    """``(Q,)`` bool: whether each query reproduces a planted image: its pixel L2 distance to the
    nearest planted row is below ``margin`` times the distance from that row to the nearest
    unplanted training image (closer to the copy than any other training image is), so a query
    that merely happens to have a copy as its nearest neighbour does not count."""
    planted = np.asarray(planted, dtype=bool)
    if not planted.any() or planted.all():
        return np.zeros(query_images.shape[0], dtype=bool)
    to_copies = _distances(query_images, train_images[planted])
    nearest = to_copies.argmin(axis=1)
    isolation = _distances(train_images[planted], train_images[~planted]).min(axis=1)
    return to_copies[np.arange(len(nearest)), nearest] < margin * isolation[nearest]


def duplicate_recall(retrieved_ids: np.ndarray, planted_ids: np.ndarray, reproduces: np.ndarray,
                     k: int = 10) -> tuple[float | None, int]:
    """Recall@k of the planted copies over the reproducing queries, and how many there are
    (None when no query reproduces them)."""
    rows = np.asarray(reproduces, dtype=bool)
    if not rows.any():
        return None, 0
    hit = np.isin(retrieved_ids[rows, :k], np.asarray(planted_ids)).any(axis=1)
    return float(hit.mean()), int(rows.sum())


def estimator_retrieval(params: Any, staged: StagedData, layout: Layout, estimator: str) -> dict[str, Any] | None:
    """The retrieval metrics of one estimator, or None when it stored no queries table."""
    path = queries_path(layout, estimator)
    if not path.is_file():
        return None
    table = read_table(path)
    evaluate = getattr(params, "evaluate", None)
    ks = tuple(getattr(evaluate, "retrieval_k", None) or DEFAULT_KS)
    sources, query_source = _ranked(table, "sample_source")
    result: dict[str, Any] = {**precision_at_k(sources, query_source, ks),
                              "n_queries": int((query_source >= 0).sum()), "k": int(sources.shape[1])}
    corruption = getattr(params, "corruption", None)
    images_path = path.with_name("queries.safetensors")
    if getattr(corruption, "kind", None) == "duplicates" and images_path.is_file():
        ids, _ = _ranked(table, "sample_id")
        planted = np.asarray(staged.train.is_corrupted, dtype=bool)
        queries = read_tensors(images_path)["images"].numpy()
        reproduces = reproducing(queries, np.asarray(staged.train.features), planted)
        recall, count = duplicate_recall(ids, np.asarray(staged.train.sample_id)[planted], reproduces)
        result.update({"duplicate_recall_at_10": recall, "n_reproducing": count})
    return result


def retrieval_evaluations(params: Any, staged: StagedData, layout: Layout,
                          metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{estimator: {"retrieval": {precision_at_<k>..., n_queries, k[, duplicate_recall_at_10,
    n_reproducing]}}}`` for every estimator of the run that stored a queries table (none when
    ``evaluate.retrieval`` is false)."""
    if not getattr(getattr(params, "evaluate", None), "retrieval", True):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name in params.estimators:
        result = estimator_retrieval(params, staged, layout, name)
        if result is not None:
            out[name] = {"retrieval": result}
    return out

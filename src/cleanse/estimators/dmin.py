"""DMin: the training images responsible for generated images (Lin, Lao & Zhao, "DMin: Scalable
Training Data Influence Estimation for Diffusion Models", arXiv 2412.08637; spec part B 3).

Every training image ``i`` and query image ``q`` gets a signature (:mod:`cleanse.families.diffusion
.signatures`): the gradient of the diffusion loss at S cube-law timesteps with one shared noise,
L2-normalised per timestep, then sketched to ``v = size`` entries per timestep
(:mod:`cleanse.families.diffusion.sketch`). The compressed influence is

    Infl_v(i, q) = sum_s <C(ghat_s(q)), C(ghat_s(i))>         (in [-S, S]; higher = more influential)

an unbiased estimate of S times the uncompressed mean of per-timestep cosines. The training
signatures are cached shard by shard (:mod:`cleanse.families.diffusion.caching`).

- ``score`` (one row per training image, training order): ``mean over harm queries q of
  Infl_v(i, q)`` (:func:`cleanse.families.diffusion.queries.harm_queries`: with the watermark
  corruption, the target class's generations the family's detector flags). Higher = the image
  pushed the model toward the harmful generations more = more harmful.
- ``write_artifacts``: for every retrieval query (generations per class, or ``queries.file``), the
  top-k training images from the HNSW index (or the exact scan), stored in
  ``scores/<name>/queries.parquet`` (``query_id, rank, sample_id, score, query_source,
  sample_source``) with the query images in ``scores/<name>/queries.safetensors``.

:class:`AttributionEstimator` is the shape shared with the baselines (:mod:`.pixel_nn`,
:mod:`.dtrak`): they differ only in the vectors and the similarity.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
from pydantic import BaseModel

from cleanse.data.dataset import Split
from cleanse.estimators.base import ScoreResult, score_table
from cleanse.estimators.dmin_options import DminOptions
from cleanse.families.diffusion.queries import train_source  # also read here by the plots
from cleanse.storage import write_table, write_tensors

QUERY_COLUMNS = ("query_id", "rank", "sample_id", "score", "query_source", "sample_source")


def stored_k(context: Any, k: int) -> int:
    """Training images kept per query: ``k``, at least the largest ``evaluate.retrieval_k``, at
    most the training set."""
    wanted = list(getattr(getattr(context.params, "evaluate", None), "retrieval_k", None) or [])
    return int(min(len(context.train), max([k, *wanted])))


def query_table(scores: np.ndarray, rows: np.ndarray, query_source: np.ndarray, split: Split) -> pl.DataFrame:
    """The per-query top-k table from ``scores`` and ``rows`` ``(Q, k)`` (training positions, -1 where
    the index found fewer), ranks from 1."""
    q, k = rows.shape
    valid = rows >= 0
    positions = np.where(valid, rows, 0)
    return pl.DataFrame({
        "query_id": pl.Series(np.repeat(np.arange(q), k)[valid.ravel()], dtype=pl.Int64),
        "rank": pl.Series(np.tile(np.arange(1, k + 1), q)[valid.ravel()], dtype=pl.Int64),
        "sample_id": pl.Series(np.asarray(split.sample_id)[positions][valid], dtype=pl.Int64),
        "score": pl.Series(scores[valid].astype(np.float64), dtype=pl.Float64),
        "query_source": pl.Series(np.repeat(query_source, k)[valid.ravel()], dtype=pl.Int64),
        "sample_source": pl.Series(train_source(split)[positions][valid], dtype=pl.Int64),
    })


class AttributionEstimator(ABC):
    """Score = mean similarity to the harm queries; artifacts = top-k per retrieval query.
    Subclasses give the training vectors ``(n, d)``, the query vectors ``(Q, d)`` and the top-k."""

    name: ClassVar[str]
    options_type: ClassVar[type[BaseModel]]
    families: ClassVar[tuple[str, ...]] = ("diffusion",)
    reads_validation_labels: ClassVar[bool] = False  # queries are generations; no validation labels are read

    @abstractmethod
    def train_vectors(self, context: Any, options: Any) -> np.ndarray:
        """The training vectors ``(n, d)``."""

    @abstractmethod
    def query_vectors(self, context: Any, options: Any, queries: Any) -> np.ndarray:
        """The query vectors ``(Q, d)``."""

    def similarities(self, context: Any, options: Any, train: np.ndarray, query: np.ndarray) -> np.ndarray:
        """``(Q, n)`` similarities of every query to every training image (default: inner products)."""
        return query.astype(np.float64) @ train.astype(np.float64).T

    def topk(self, context: Any, options: Any, train: np.ndarray, query: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and training positions ``(Q, k)``, best first (default: the exact scan)."""
        from cleanse.families.diffusion.index import exact_topk

        return exact_topk(train, query, k)

    def extra_meta(self, context: Any, options: Any, train: np.ndarray) -> dict[str, Any]:
        return {}

    def score(self, context: Any, options: Any) -> ScoreResult:
        from cleanse.families.diffusion.queries import watermark_queries, watermark_signal

        started = time.perf_counter()
        train = self.train_vectors(context, options)
        cached = time.perf_counter() - started
        harm, reference = watermark_queries(context)
        similarity = self.similarities(context, options, train, self.query_vectors(context, options, harm))
        columns = {"harm_influence": similarity.mean(axis=0), "max_influence": similarity.max(axis=0)}
        score = columns["harm_influence"]
        contrast = getattr(options, "reference", "none") == "unflagged" and reference is not None
        signal: dict[str, Any] = {}
        if contrast and reference is not None:
            # flags no likelier than on generations that cannot carry the watermark are false
            # positives: contrasting them with the unflagged ones splits the class at random and
            # inverts the ranking, so the plain mean (reference: none) is used instead
            signal = watermark_signal(context, len(harm), len(harm) + len(reference))
            contrast = signal["significant"] is not False
            signal["reference_used"] = "unflagged" if contrast else "none"
            if not contrast:
                signal["note"] = (f"reference: unflagged fell back to none: the detector flagged {signal['flagged']} of "
                                  f"{signal['generated']} target-class generations and {signal['clean_flagged']} of "
                                  f"{signal['clean_generated']} of the other classes (one-sided Fisher p = "
                                  f"{signal['p_value']:.3g} >= {signal['level']}): no evidence the model generates "
                                  "the watermark")
        if contrast and reference is not None:
            # what the watermarked generations owe an image beyond what any generation of the
            # class owes it: the class's shared influence cancels
            columns["reference_influence"] = self.similarities(
                context, options, train, self.query_vectors(context, options, reference)).mean(axis=0)
            score = score - columns["reference_influence"]
        table = score_table(context.train.sample_id, score, **columns)
        return ScoreResult(table, {"n_harm_queries": len(harm), "harm_queries": harm.kind,
                                   "n_reference_queries": len(reference) if contrast and reference is not None else 0,
                                   **({"harm_note": harm.note} if harm.note else {}),
                                   **({"watermark_signal": signal} if signal else {}),
                                   **({"note": signal["note"]} if "note" in signal and not contrast else {}),
                                   "train_vectors_seconds": cached, "vector_dim": int(train.shape[1]),
                                   "orientation": "score = mean over the harm queries of the training image's "
                                                  "influence on them (minus the mean over the reference queries "
                                                  "with reference: unflagged); higher = more responsible",
                                   **self.extra_meta(context, options, train)})

    def write_artifacts(self, context: Any, options: Any, test: Split, directory: Path) -> dict[str, str]:
        """``queries.parquet`` (the top-k of every retrieval query) and ``queries.safetensors``
        (their images, conditions, sources, seeds) under ``directory``."""
        from cleanse.families.diffusion.queries import retrieval_queries

        queries = retrieval_queries(context)
        train = self.train_vectors(context, options)
        query = self.query_vectors(context, options, queries)
        started = time.perf_counter()
        scores, rows = self.topk(context, options, train, query, stored_k(context, options.k))
        seconds = (time.perf_counter() - started) / max(len(queries), 1)
        directory = Path(directory)
        table = query_table(scores, rows, queries.source, context.train)
        paths = {"queries": write_table(table, directory / "queries.parquet"),
                 "query_images": write_tensors(queries.tensors(), directory / "queries.safetensors",
                                               {"kind": queries.kind, "seconds_per_query": f"{seconds:.6g}"})}
        return {name: str(path) for name, path in paths.items()}


class GradientAttributionEstimator(AttributionEstimator):
    """Vectors from the gradient signatures of ``options.size`` (:mod:`cleanse.families.diffusion
    .caching`): the training ones from the shard cache, the queries' through the same transform."""

    def train_vectors(self, context: Any, options: Any) -> np.ndarray:
        from cleanse.families.diffusion.caching import cached_vectors

        return cached_vectors(context, options, options.size)

    def query_vectors(self, context: Any, options: Any, queries: Any) -> np.ndarray:
        from cleanse.families.diffusion.caching import transform
        from cleanse.families.diffusion.index import flatten

        return flatten(transform(context, options, queries.images, queries.conditions)[options.size])


class DminEstimator(GradientAttributionEstimator):
    name: ClassVar[str] = "dmin"
    options_type: ClassVar[type[BaseModel]] = DminOptions

    def topk(self, context: Any, options: DminOptions, train: np.ndarray, query: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray]:
        if options.index == "exact":
            return super().topk(context, options, train, query, k)
        from cleanse.families.diffusion.caching import cached_index

        return cached_index(context, options, options.size, train).search(query, k)

    def extra_meta(self, context: Any, options: DminOptions, train: np.ndarray) -> dict[str, Any]:
        return {"size": options.size, "timesteps": options.timesteps, "index": options.index,
                "dtype": options.dtype,
                "bytes_per_sample": int(options.timesteps * sum(options.sizes) * (2 if options.dtype == "float16" else 4))}

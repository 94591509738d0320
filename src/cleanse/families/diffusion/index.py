"""Storing DMin signatures and retrieving the top-k training samples of a query (Lin, Lao & Zhao,
arXiv 2412.08637, section 3.4; spec part B 3.4).

A sample's stored vector is its sketched signature ``(S, v)`` flattened to ``S * v`` entries, so
an inner product of two stored vectors is the compressed influence ``sum_s <C(ghat_s(q)),
C(ghat_s(i))>`` (DMin sums over timesteps where the uncompressed score averages; the ranking is the
same). Higher = more influential.

- :func:`exact_topk`: the exact scan, the reference every approximate result is measured against.
- :class:`HnswIndex`: faiss's HNSW graph with the inner-product metric and DMin's hnswlib settings
  (M = 16, ef_construction = 200, ef_search = 100), written as one index file. faiss is the store
  because it gives DMin's own index (HNSW, inner product, the same knobs) on ``numpy`` alone, its
  index serialises to bytes (written atomically beside the run's other artifacts, so an ``s3://``
  output is published by :mod:`cleanse.remote` like every other file), and it needs no training
  pass or minimum row count (an IVF-PQ table such as LanceDB's does, and quantises the scores).
- :class:`ShardCache`: signatures cached one shard at a time so that a killed caching run resumes;
  each shard is a safetensors file plus its own record (size and SHA-256), written after it, so
  shards computed in parallel by different workers never write the same file;
  ``manifest.meta.json`` lists the complete shards. The records end in ``.meta.json``, so an
  ``s3://`` output root publishes them after their shards (:meth:`cleanse.remote.Mirror.publish`):
  a publish cut short leaves a shard without a record, which the next run recomputes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cleanse.errors import ArtifactError, ConfigError
from cleanse.families.diffusion.models import require
from cleanse.storage import read_json, read_tensors, write_bytes, write_json, write_tensors

HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 16, 200, 100  # DMin's hnswlib settings


def flatten(sketched: torch.Tensor | np.ndarray) -> np.ndarray:
    """Sketched signatures ``(n, S, v)`` as stored vectors ``(n, S * v)`` float32, C-contiguous."""
    array = sketched.detach().cpu().numpy() if isinstance(sketched, torch.Tensor) else np.asarray(sketched)
    return np.ascontiguousarray(array.reshape(array.shape[0], -1), dtype=np.float32)


def exact_topk(database: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest inner products of each query with the database, by a full scan: scores
    ``(Q, k)`` float32 (descending) and row indices ``(Q, k)`` int64; ties go to the lower row.
    ``database`` ``(N, d)``, ``queries`` ``(Q, d)``; the scan reads ``chunk`` rows at a time."""
    if database.shape[1] != queries.shape[1]:
        raise ConfigError(f"index: queries of dim {queries.shape[1]} for a database of dim {database.shape[1]}")
    k = min(k, database.shape[0])
    best_scores = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((queries.shape[0], 0), dtype=np.int64)
    for start in range(0, database.shape[0], chunk):
        scores = queries.astype(np.float32) @ database[start:start + chunk].astype(np.float32).T
        rows = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_rows = np.concatenate([best_rows, rows], axis=1)
        order = np.lexsort((all_rows, -all_scores), axis=1)[:, :k]
        best_scores = np.take_along_axis(all_scores, order, axis=1)
        best_rows = np.take_along_axis(all_rows, order, axis=1)
    return best_scores.astype(np.float32), best_rows


class HnswIndex:
    """An HNSW inner-product index of stored vectors ``(n, d)`` keyed by int64 sample ids."""

    def __init__(self, index: Any) -> None:
        self.index = index

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray | None = None, *, m: int = HNSW_M,
              ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH,
              threads: int = 1, float16: bool = False) -> HnswIndex:
        """The index of ``vectors`` ``(n, d)`` under ``ids`` ``(n,)`` (default ``0..n-1``). With
        ``threads = 1`` the graph, and so every result, is the same on every run. ``float16``:
        the vectors are stored as float16 codes (faiss IndexHNSWSQ, QT_fp16: half the bytes, inner
        products of the rounded entries)."""
        faiss = require("faiss")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.arange(vectors.shape[0], dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if ids.shape != (vectors.shape[0],):
            raise ConfigError(f"index: {ids.shape[0]} ids for {vectors.shape[0]} vectors")
        faiss.omp_set_num_threads(threads)
        if float16:
            graph = faiss.IndexHNSWSQ(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16, m, faiss.METRIC_INNER_PRODUCT)
            graph.train(vectors)  # fp16 codes have nothing to fit; faiss wants the call
        else:
            graph = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = ef_construction
        graph.hnsw.efSearch = ef_search
        index = faiss.IndexIDMap2(graph)
        index.add_with_ids(vectors, ids)
        return cls(index)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-``k`` by inner product: scores ``(Q, k)`` float32 (descending) and sample
        ids ``(Q, k)`` int64 (-1 where fewer than ``k`` were found)."""
        faiss = require("faiss")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(f"index: queries of shape {queries.shape} for an index of dim {self.dim}")
        if ef_search is not None:
            faiss.downcast_index(self.index.index).hnsw.efSearch = ef_search
        scores, ids = self.index.search(queries, min(k, len(self)))
        return scores.astype(np.float32), ids.astype(np.int64)

    def save(self, path: str | Path) -> Path:
        """The index as one file at ``path`` (atomic)."""
        faiss = require("faiss")
        return write_bytes(faiss.serialize_index(self.index).tobytes(), path)

    @classmethod
    def load(cls, path: str | Path) -> HnswIndex:
        faiss = require("faiss")
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"missing index {path}; build the index first")
        return cls(faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8)))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ShardCache:
    """Signature shards under ``root``: ``shard_{i:05d}.safetensors`` (any tensors, e.g.
    ``sample_id`` ``(n,)`` and ``v{size}`` ``(n, S, size)``) and ``shard_{i:05d}.meta.json`` (its size
    and SHA-256 and the cache's ``key``), the record written only after the shard file. A shard is
    complete when its record exists, names the current ``key`` and matches the file; anything else
    (no record, a truncated or replaced file, another key) is computed again. ``key`` is a
    JSON-able description of what the signatures depend on (model, timesteps, noise, sketch)."""

    def __init__(self, root: str | Path, key: dict[str, Any]) -> None:
        self.root = Path(root)
        self.key = key

    def shard_path(self, shard: int) -> Path:
        return self.root / f"shard_{shard:05d}.safetensors"

    def record_path(self, shard: int) -> Path:
        return self.root / f"shard_{shard:05d}.meta.json"

    def complete(self, shard: int) -> bool:
        path, record = self.shard_path(shard), self.record_path(shard)
        if not (path.is_file() and record.is_file()):
            return False
        try:
            info = read_json(record)
        except ValueError:
            return False
        return bool(info.get("key") == self.key and info.get("bytes") == path.stat().st_size
                    and info.get("sha256") == _digest(path))

    def pending(self, n_shards: int) -> list[int]:
        return [shard for shard in range(n_shards) if not self.complete(shard)]

    def write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        """Store one shard: the file, then its record (both atomic)."""
        path = self.shard_path(shard)
        write_tensors({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, path)
        write_json({"key": self.key, "bytes": path.stat().st_size, "sha256": _digest(path),
                    "rows": int(next(iter(tensors.values())).shape[0])}, self.record_path(shard))

    def read(self, shard: int) -> dict[str, torch.Tensor]:
        if not self.complete(shard):
            raise ArtifactError(f"signature shard {shard} under {self.root} is missing or incomplete; "
                                "run the caching again")
        return read_tensors(self.shard_path(shard))

    def fill(self, n_shards: int, compute: Callable[[int], dict[str, torch.Tensor]],
             run: Callable[[Callable[[int], None], list[int]], Iterable[Any]] | None = None) -> list[int]:
        """Compute and store every shard that is not complete (``compute(shard)`` gives its tensors),
        then write ``manifest.meta.json``; the shards computed. ``run(task, shards)`` maps the per-shard
        task over the pending shards (default: in order, here; a Dask or Ray runner may pass its
        own, since shards write disjoint files)."""
        todo = self.pending(n_shards)

        def task(shard: int) -> None:
            self.write(shard, compute(shard))

        if run is not None:
            list(run(task, todo))
        else:
            for shard in todo:
                task(shard)
        missing = self.pending(n_shards)
        if missing:
            raise ArtifactError(f"signature shards {missing[:5]} under {self.root} were not written")
        write_json({"key": self.key, "shards": n_shards,
                    "rows": [read_json(self.record_path(s))["rows"] for s in range(n_shards)]},
                   self.root / "manifest.meta.json")
        return todo

    def load(self, n_shards: int, name: str) -> torch.Tensor:
        """Tensor ``name`` of every shard, concatenated along the first axis in shard order."""
        return torch.cat([self.read(shard)[name] for shard in range(n_shards)], dim=0)

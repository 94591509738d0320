"""Random projections of per-sample gradients, streamed to a resumable ``.npy`` memmap.

``phi_i = P^T g_i / sqrt(k)`` with ``P`` a ``(p, k)`` matrix of i.i.d. Rademacher (+-1) or standard
Gaussian entries (Johnson-Lindenstrauss): ``E[phi_i . phi_j] = g_i . g_j``. ``P`` is generated
blockwise from ``seed`` so the same seed gives the same projection on every machine, and it is
held once in memory (``p * k`` floats); per-sample gradients are materialised only one chunk of
samples at a time, so memory does not grow with ``n``. This is the featurisation TRAK (Park et
al., ICML 2023) builds on; the CPU path here is the reference for any accelerated one.

Resumability: :class:`ProjectedGradientStore` writes ``features.npy`` (``(n, k)`` float32, open
with ``np.load(path, mmap_mode="r")``), ``done.npy`` (one flag per chunk, set after the chunk is
flushed) and ``meta.json`` (shape, projection kind, seed, fingerprint). Reopening with another
fingerprint is refused; reopening with the same one skips finished chunks.

Memory. Rows are written and read with positional file I/O (``os.pwrite``/``os.pread``) rather
than through a mapping: pages of a mapping that were touched count towards the process's resident
set until the kernel evicts them, so a pass over a 1M-row memmap would grow the RSS with ``n``.
Page-cache pages that are read or written through a file descriptor do not.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from cleanse import seeds
from cleanse.errors import ArtifactError
from cleanse.storage import write_json

ProjectionKind = Literal["rademacher", "gaussian"]


def projection_matrix(p: int, k: int, *, kind: ProjectionKind = "rademacher", seed: int = 0,
                      block_rows: int = 65536, dtype: torch.dtype = torch.float32,
                      device: torch.device | None = None) -> torch.Tensor:
    """The ``(p, k)`` projection, scaled by ``1/sqrt(k)``; rows are generated in seeded blocks."""
    blocks = []
    for block, start in enumerate(range(0, p, block_rows)):
        rows = min(block_rows, p - start)
        generator = torch.Generator().manual_seed(seeds.torch_seed(seed, "projection.block", block))
        if kind == "rademacher":
            values = torch.randint(0, 2, (rows, k), generator=generator, dtype=torch.int8).to(dtype) * 2 - 1
        elif kind == "gaussian":
            values = torch.randn(rows, k, generator=generator, dtype=dtype)
        else:
            raise ValueError(f"projection kind {kind!r} is not one of 'rademacher', 'gaussian'")
        blocks.append(values)
    return (torch.cat(blocks) / math.sqrt(k)).to(device or torch.device("cpu"))


@dataclass
class ProjectedGradientStore:
    """An ``(n, k)`` float32 memmap filled chunk by chunk, with per-chunk done flags."""

    directory: Path
    n: int
    k: int
    chunk_size: int
    fingerprint: str

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n / self.chunk_size)

    @property
    def features_path(self) -> Path:
        return self.directory / "features.npy"

    @property
    def done_path(self) -> Path:
        return self.directory / "done.npy"

    def open(self) -> tuple[np.memmap, np.memmap]:
        """Open (creating if needed) the feature memmap and the done flags."""
        meta_path = self.directory / "meta.json"
        meta = {"shape": [self.n, self.k], "dtype": "float32", "chunk_size": self.chunk_size,
                "orientation": "one row per training sample", "fingerprint": self.fingerprint}
        if meta_path.is_file():
            existing = json.loads(meta_path.read_text())
            if existing != meta:
                raise ArtifactError(
                    f"{self.directory} holds projected gradients of another configuration "
                    f"(fingerprint {existing.get('fingerprint')}, shape {existing.get('shape')}); "
                    "remove it or choose another directory"
                )
            features = np.load(self.features_path, mmap_mode="r+")
            done = np.load(self.done_path, mmap_mode="r+")
            return features, done
        self.directory.mkdir(parents=True, exist_ok=True)
        features = np.lib.format.open_memmap(self.features_path, mode="w+", dtype=np.float32, shape=(self.n, self.k))
        done = np.lib.format.open_memmap(self.done_path, mode="w+", dtype=np.bool_, shape=(self.n_chunks,))
        done.flush()
        write_json(meta, meta_path)  # last: its presence means the files above exist
        return features, done

    def is_complete(self) -> bool:
        return self.done_path.is_file() and bool(np.load(self.done_path).all())

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` ``(m, k)`` at row ``start`` of ``features.npy``."""
        write_rows(self.features_path, start, rows)


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a C-ordered ``.npy`` file (read from its header)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = reader(handle)
        if fortran_order:
            raise ArtifactError(f"{path}: expected a C-ordered array")
        return tuple(shape), np.dtype(dtype), handle.tell()


def write_rows(path: Path, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` into the 2-D ``.npy`` file at ``path`` from row ``start`` (positional I/O)."""
    shape, dtype, offset = _npy_layout(path)
    data = np.ascontiguousarray(rows, dtype=dtype)
    if data.ndim != 2 or data.shape[1] != shape[1] or start + data.shape[0] > shape[0]:
        raise ValueError(f"rows of shape {data.shape} do not fit {path} {shape} at row {start}")
    row_bytes = shape[1] * dtype.itemsize
    descriptor = os.open(path, os.O_WRONLY)
    try:
        view, position = data.data.cast("B"), offset + start * row_bytes  # data.data: the array's buffer
        while view:
            written = os.pwrite(descriptor, view, position)
            view, position = view[written:], position + written
    finally:
        os.close(descriptor)


def row_blocks(features: np.ndarray, chunk_size: int):
    """Yield ``(start, block)`` over the rows of an ``(n, k)`` array in blocks of ``chunk_size``.

    A whole ``.npy`` memmap (as returned by ``np.load(path, mmap_mode="r")``) is read with
    ``os.pread`` so that the pass does not leave its pages in the resident set.
    """
    path = getattr(features, "filename", None)
    if isinstance(features, np.memmap) and path and Path(path).is_file():
        shape, dtype, offset = _npy_layout(Path(path))
        if shape == features.shape and dtype == features.dtype and features.offset == offset:
            row_bytes = shape[1] * dtype.itemsize
            descriptor = os.open(path, os.O_RDONLY)
            try:
                for start in range(0, shape[0], chunk_size):
                    rows = min(chunk_size, shape[0] - start)
                    raw = _pread_all(descriptor, rows * row_bytes, offset + start * row_bytes)
                    yield start, np.frombuffer(raw, dtype=dtype).reshape(rows, shape[1])
            finally:
                os.close(descriptor)
            return
    for start in range(0, features.shape[0], chunk_size):
        yield start, np.asarray(features[start : start + chunk_size])


def _pread_all(descriptor: int, size: int, position: int) -> bytes:
    parts, remaining = [], size
    while remaining:
        chunk = os.pread(descriptor, remaining, position)
        if not chunk:
            raise ArtifactError(f"unexpected end of file reading {size} bytes at {position}")
        parts.append(chunk)
        remaining -= len(chunk)
        position += len(chunk)
    return b"".join(parts) if len(parts) > 1 else parts[0]


def project_to_store(
    per_sample_grads: Callable[[int, int], torch.Tensor],
    projection: torch.Tensor,
    store: ProjectedGradientStore,
    *,
    progress: Callable[[int], None] | None = None,
) -> np.memmap:
    """Fill ``store`` with ``per_sample_grads(start, stop) @ projection`` chunk by chunk.

    ``per_sample_grads(start, stop)`` returns the ``(stop - start, p)`` gradients of those rows.
    Chunks already flagged done are skipped, so a killed run resumes where it stopped.
    """
    features, done = store.open()
    for chunk in range(store.n_chunks):
        if done[chunk]:
            continue
        start, stop = chunk * store.chunk_size, min((chunk + 1) * store.chunk_size, store.n)
        grads = per_sample_grads(start, stop)
        store.write_rows(start, (grads.to(projection.dtype) @ projection).cpu().numpy())
        done[chunk] = True
        done.flush()
        if progress is not None:
            progress(stop - start)
    return features


def gram_matrix(features: np.ndarray, *, chunk_size: int = 8192) -> np.ndarray:
    """``Phi^T Phi`` (``(k, k)``, float64) accumulated over row chunks of an ``(n, k)`` (memmap) array."""
    k = features.shape[1]
    gram = np.zeros((k, k), dtype=np.float64)
    for _, block in row_blocks(features, chunk_size):
        block = block.astype(np.float64)
        gram += block.T @ block
    return gram


def projected_self_scores(features: np.ndarray, *, damping: float = 1e-3, chunk_size: int = 8192) -> np.ndarray:
    """``phi_i^T (Phi^T Phi + damping * mean_diag * I)^-1 phi_i`` for every row, shape ``(n,)``.

    The TRAK self-score (a leverage score of the projected gradients). Two streaming passes over
    the memmap; memory is ``O(k^2 + chunk_size * k)`` whatever ``n`` is. ``damping`` is relative
    to the mean diagonal of ``Phi^T Phi`` so it does not depend on the gradient scale.
    """
    from scipy.linalg import solve_triangular

    gram = gram_matrix(features, chunk_size=chunk_size)
    ridge = damping * max(float(np.trace(gram)) / gram.shape[0], 1e-30)
    factor = np.linalg.cholesky(gram + ridge * np.eye(gram.shape[0]))
    out = np.empty(features.shape[0], dtype=np.float64)
    for start, block in row_blocks(features, chunk_size):
        block = block.astype(np.float64)
        solved = solve_triangular(factor, block.T, lower=True)  # L^-1 phi_i, column-wise
        out[start : start + block.shape[0]] = (solved * solved).sum(0)
    return out

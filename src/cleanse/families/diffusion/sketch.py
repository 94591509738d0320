"""DMin's gradient compression (Lin, Lao & Zhao, arXiv 2412.08637, section 3.3; spec part B 3.3):
pad, permute, random signs, group sums -- one permutation and one random projection (OPORP, Li &
Li, 2023), several sizes from one pass.

For a vector ``a`` of ``D`` entries and a size ``v``:

1. pad ``a`` with zeros to ``D'``, the smallest multiple of the largest requested size;
2. permute the ``D'`` entries with one fixed permutation ``pi`` (shared by every sample and
   timestep);
3. multiply entry-wise by one fixed Rademacher vector ``r`` in {-1, +1}^D' (a vector, not a
   ``D x v`` matrix: O(D) memory);
4. sum ``v`` contiguous groups of ``D'/v`` entries: ``C(a)_j = sum_{i in group j} r_i a_pi(i)``.

Inner products are preserved in expectation over ``r``: ``E <C(a), C(b)> = <a, b>`` (the cross
terms ``r_i r_k a_i b_k``, i != k, have mean zero), for any permutation. Over the random
permutation as well, with ``D`` divisible by ``v`` (no padding), the variance is (Li & Li, 2023,
Theorem 1 with Rademacher signs)

    Var <C(a), C(b)> = (1/v) (||a||^2 ||b||^2 + <a, b>^2 - 2 sum_i a_i^2 b_i^2) (D - v) / (D - 1),

which falls like 1/v and vanishes at ``v = D``. Padding only adds zero entries, so it changes the
``D`` of the formula but not the unbiasedness. A smaller size's groups are unions of adjacent
groups of the largest size, so every size is a further group sum of the largest one's sketch: the
sizes share ``pi`` and ``r`` and cost one pass over ``D``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cleanse.errors import ConfigError
from cleanse.seeds import rng

DEFAULT_SIZES = tuple(2 ** k for k in range(8, 17))  # 2^8 ... 2^16
# Sketch.from_parts: above this many entries of the (rows, largest) output, the row-block scatter
# (measured faster from 2^16 for 160 rows; the column scatter is faster at 2^12)
_SCATTER_BY_COLUMN_MAX = 160 * 8192
_ROW_BLOCK = 16


@dataclass(frozen=True)
class Sketch:
    """The fixed compression of ``dim``-entry vectors to each of ``sizes``: ``permutation``
    ``(D',)`` int64 and ``signs`` ``(D',)`` float32 (+-1), ``D'`` the padded length."""

    dim: int
    sizes: tuple[int, ...]
    permutation: torch.Tensor
    signs: torch.Tensor

    @classmethod
    def make(cls, dim: int, sizes: Sequence[int] = DEFAULT_SIZES, seed: int = 42) -> Sketch:
        """The sketch of ``seed``'s ``diffusion.sketch`` stream (member 0: the permutation, member 1:
        the signs). ``sizes`` must each divide the largest (powers of two do)."""
        sizes = tuple(sorted({int(v) for v in sizes}))
        if dim < 1 or not sizes or sizes[0] < 1:
            raise ConfigError(f"sketch: dim {dim} and sizes {list(sizes)} must be positive")
        largest = sizes[-1]
        if any(largest % v for v in sizes):
            raise ConfigError(f"sketch: sizes {list(sizes)} must each divide the largest, {largest}")
        padded = -(-dim // largest) * largest
        permutation = torch.from_numpy(rng(seed, "diffusion.sketch", 0).permutation(padded).astype(np.int64))
        signs = torch.from_numpy(rng(seed, "diffusion.sketch", 1).choice(np.array([-1.0, 1.0], dtype=np.float32),
                                                                         size=padded))
        return cls(dim, sizes, permutation, signs)

    @property
    def padded(self) -> int:
        return int(self.permutation.shape[0])

    def __call__(self, vectors: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{v: C_v(vectors)}`` for every size, each ``(..., v)`` in ``vectors``' dtype, for
        ``vectors`` ``(..., dim)`` (a signature batch ``(b, S, D)`` gives ``(b, S, v)``)."""
        if vectors.shape[-1] != self.dim:
            raise ConfigError(f"sketch: vectors of {vectors.shape[-1]} entries for a sketch of dim {self.dim}")
        out = self.from_parts([vectors.reshape(-1, self.dim)])
        return {v: sketched.reshape(*vectors.shape[:-1], v) for v, sketched in out.items()}

    def from_parts(self, parts: Sequence[torch.Tensor], row_scale: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """``{v: C_v(rows)}``, each ``(P, v)``, of the ``P`` rows whose consecutive column blocks are
        ``parts`` (each ``(P, d_k)``, ``sum d_k = dim``: e.g. one block per parameter of a gradient),
        every row multiplied by ``row_scale`` ``(P, 1)`` when given. The same as calling the sketch
        on the concatenated (and scaled) rows, by linearity, without ever writing them."""
        if sum(part.shape[-1] for part in parts) != self.dim:
            raise ConfigError(f"sketch: parts of {sum(p.shape[-1] for p in parts)} entries for a sketch of dim {self.dim}")
        largest = self.sizes[-1]
        signs, group = self._placement(parts[0].dtype, parts[0].device)
        # Scatter each original entry, signed, into its group of the largest size (the padding
        # adds zeros): the same sums as permuting and reshaping, without the (..., D') copies.
        rows = parts[0].shape[0]
        top = parts[0].new_zeros(rows, largest)
        if rows * largest > _SCATTER_BY_COLUMN_MAX:
            # A column scatter over all rows strides through the whole (P, largest) block for every
            # entry; once that block outgrows the CPU caches, one contiguous copy of the rows and a
            # scatter a few rows at a time is about twice as fast (2^16: 0.15 s against 0.29 s for
            # 160 rows of D = 164,689 on one core)
            signed = torch.cat(list(parts), dim=1).mul_(signs)
            index = group.expand(min(_ROW_BLOCK, rows), -1)
            for start in range(0, rows, _ROW_BLOCK):
                block = signed[start:start + _ROW_BLOCK]
                top[start:start + block.shape[0]].scatter_add_(1, index[:block.shape[0]], block)
            del signed
        else:
            offset = 0
            for part in parts:
                width = part.shape[-1]
                top.index_add_(1, group[offset:offset + width], part * signs[offset:offset + width])
                offset += width
        if row_scale is not None:
            top.mul_(row_scale)
        out = {largest: top}
        for v in reversed(self.sizes[:-1]):  # each size from the smallest larger one it divides: O(largest) in all
            above = min(u for u in out if u % v == 0)
            out[v] = out[above].reshape(-1, v, above // v).sum(-1)
        return {v: out[v] for v in self.sizes}

    def __getstate__(self) -> dict[str, object]:
        """Pickled (a Dask or Ray worker) without the cached placements: they are rebuilt there."""
        return {name: value for name, value in self.__dict__.items() if name != "_placements"}

    def _placement(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each original entry's sign ``(dim,)`` and group of the largest size ``(dim,)`` int64, built
        once per dtype and device (not once per batch)."""
        cache: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = \
            self.__dict__.setdefault("_placements", {})
        key = (dtype, torch.device(device))
        if key not in cache:
            position = torch.empty_like(self.permutation)
            position[self.permutation] = torch.arange(self.padded)
            position = position[:self.dim]
            group = position // (self.padded // self.sizes[-1])
            cache[key] = (self.signs[position].to(device, dtype), group.to(device))
        return cache[key]


def oporp_variance(a: np.ndarray, b: np.ndarray, v: int) -> float:
    """The variance of ``<C(a), C(b)>`` over the random permutation and signs (module docstring),
    for ``a``, ``b`` ``(D,)`` with ``D`` divisible by ``v``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a.shape[0]
    if d % v:
        raise ConfigError(f"sketch: the closed-form variance needs D ({d}) divisible by v ({v})")
    core = float(a @ a) * float(b @ b) + float(a @ b) ** 2 - 2.0 * float((a * a) @ (b * b))
    return core / v * (d - v) / (d - 1)


def dense_projection(vectors: torch.Tensor, size: int, seed: int, block: int = 4096) -> torch.Tensor:
    """The dense Gaussian (Johnson-Lindenstrauss) baseline at the same size: ``vectors @ G``,
    ``G`` ``(D, size)`` with entries ``N(0, 1/size)`` (so inner products are unbiased), drawn in
    row blocks of ``block`` from the ``projection.block`` stream so that ``G`` is never held whole.
    Shape ``(..., size)``. Memory and time O(D * size): the cost DMin's sketch avoids."""
    dim = vectors.shape[-1]
    out = torch.zeros(*vectors.shape[:-1], size, dtype=vectors.dtype, device=vectors.device)
    for index, start in enumerate(range(0, dim, block)):
        rows = min(block, dim - start)
        g = rng(seed, "projection.block", index).standard_normal((rows, size)) / np.sqrt(size)
        out += vectors[..., start:start + rows] @ torch.from_numpy(g.astype(np.float32)).to(vectors.device, vectors.dtype)
    return out

"""The MONSTOR-style spread surrogate's forward pass and its gradient in the edge keep-weights, written
out by hand in numpy for one seed set (DiffIM's one-shot gradient and relaxation steps, Lee et
al., AAAI 2025, arXiv 2502.01031; the surrogate is :class:`cleanse.graphs.surrogate.SpreadSurrogate`
with ``kind="monstor"``).

Why: on the seeds' neighbourhood of a small graph (jazz 5,484 edges, power_grid 1,830) one autograd
pass costs about 1.5-3 ms of CPU, most of it torch's per-op dispatch and graph bookkeeping, not
arithmetic. The same computation in numpy, with the reverse pass derived once by hand, costs about half
of that. Two exact savings on top: the shared MLP runs only on the nodes whose output is used (not a
seed, inflow > 0: elsewhere ``pi`` is the seed row whatever the MLP says, so its gradient there is 0),
and layer ``k`` only on the edges whose source lies within ``k`` hops of a seed (``Neighbourhood.flowing``:
every other source has ``pi = 0`` at that layer, so its edges carry no flow and get no gradient there).

Two backends, one switch (``MonstorPass.backend``, :data:`BACKENDS`): ``"numba"``, the same maths compiled
(:mod:`cleanse.graphs.monstor_kernel`: one call instead of about a hundred numpy calls of 1-3 us each), the
default where numba imports; ``"numpy"``, the calls below, the fallback without numba and the reference the
kernel is tested against. :func:`warm_kernel` pays the kernel's one-off compile or cache load.

It computes what ``SpreadSurrogate.local_spread`` computes (same formulas, same ``eps`` scale of the
noisy-or, same clamp of ``q``): the noisy-or, the logits and the sigmoid in float64, the MLP in float32
as torch runs it (in float64 the MLP's matrix products made the pass about a third slower on power_grid).
``tests/test_cascade_monstor_pass.py`` checks spread and gradient against autograd to float32 precision.

Shapes (one row, the neighbourhood's ``n`` nodes and ``m`` edges): ``x`` (m,) keep-weights in [0, 1]
(edge ``e`` acts with weight ``w_e = p_e x_e``); the spread ``sum_v pi_v`` is a float and its gradient
``d spread / d x`` (m,), positive where cutting an edge lowers the spread.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import cast

import numpy as np
from scipy.special import expit
import torch
from torch import nn

from cleanse.errors import ConfigError
from cleanse.graphs.surrogate import NOISY_OR_EPS, Neighbourhood, SpreadSurrogate

try:  # numba is in the graph extra; without it every pass is the numpy one below
    from cleanse.graphs import monstor_kernel as _kernel
except ImportError:  # pragma: no cover - exercised only where numba is missing
    _kernel = None  # type: ignore[assignment]

BACKENDS: tuple[str, ...] = ("numba", "numpy") if _kernel is not None else ("numpy",)
_KEEP = 1 - NOISY_OR_EPS
_warm: list[float] = []  # the kernel's one-off compile (or cache load) seconds, once per process


def checked_backend(backend: str | None, what: str) -> str:
    """``backend`` (None: the default, numba where it imports) if it is one of :data:`BACKENDS`; else a
    one-line :class:`ConfigError` naming ``what`` chose it."""
    backend = backend or BACKENDS[0]
    if backend not in BACKENDS:
        raise ConfigError(f"{what} backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def warm_kernel() -> float:
    """Compile the numba pass, or load it from numba's cache, once per process (a no-op without numba or
    after the first call); returns the seconds this call spent. Called where a monstor surrogate is
    built, so that no timed selection pays it."""
    if _kernel is None or _warm:
        return 0.0
    _warm.append(_kernel.warm())
    return _warm[0]


@dataclass(frozen=True)
class _Mlp:
    """The shared MLP ``6 -> h -> h -> 1`` as float32: ``first`` (7, h) is the transposed weight with the
    bias as its last row (the features carry a column of ones), ``second`` (h, h) the transposed weight
    and ``second_bias`` (h,); ``last`` (h,) and ``last_bias``; ``first_back`` (h, 6) and ``second_back``
    (h, h) the untransposed weights the reverse pass multiplies by, contiguous."""

    first: np.ndarray
    second: np.ndarray
    second_bias: np.ndarray
    last: np.ndarray
    last_bias: float
    first_back: np.ndarray
    second_back: np.ndarray


_MLPS: weakref.WeakKeyDictionary[SpreadSurrogate, tuple[tuple[torch.Tensor, ...], tuple[int, ...], _Mlp]] = (
    weakref.WeakKeyDictionary())


def _mlp(model: SpreadSurrogate) -> _Mlp:
    """The model's MLP as arrays, converted once per version of its parameters (``_version`` counts
    in-place writes, so an optimiser step or an edit under ``no_grad`` converts again; a parameter
    replaced by another tensor converts again too). Read through ``_modules``: indexing ``nn.Sequential``
    cost more than the rest of this check."""
    linear = [cast(nn.Linear, layer) for layer in model.step._modules.values()][0::2]
    params = tuple(t for layer in linear for t in (layer.weight, layer.bias))
    version = tuple(t._version for t in params)
    cached = _MLPS.get(model)
    if cached is None or cached[1] != version or any(a is not b for a, b in zip(cached[0], params)):
        warm_kernel()
        (w1, b1), (w2, b2), (w3, b3) = ((layer.weight.detach().numpy(), layer.bias.detach().numpy()) for layer in linear)
        first = np.ascontiguousarray(np.vstack([w1.T, b1]))  # C order, the layout the kernel is compiled for
        cached = params, version, _Mlp(first, np.ascontiguousarray(w2.T), b2, w3[0].copy(), float(b3[0]),
                                       np.ascontiguousarray(w1), np.ascontiguousarray(w2))
        _MLPS[model] = cached
    return cached[2]


@dataclass(frozen=True)
class MonstorPass:
    """One neighbourhood and the surrogate's MLP: ``src``/``dst`` (m,) local node ids, ``p`` (m,) base
    weights, ``seeds`` (n,) 0/1 float64; the MLP is applied once per entry of ``flowing``, layer ``k``
    on the edges ``[:flowing[k]]`` (the others have a source with ``pi = 0`` there: no flow, no gradient)."""

    src: np.ndarray
    dst: np.ndarray
    p: np.ndarray
    seeds: np.ndarray
    mlp: _Mlp
    flowing: tuple[int, ...]
    backend: str = BACKENDS[0]

    @classmethod
    def of(cls, model: SpreadSurrogate, hood: Neighbourhood, backend: str = BACKENDS[0]) -> MonstorPass:
        """The pass of ``model`` (kind ``monstor``) on ``hood``: array views and two small copies.
        ``backend``: ``"numba"`` (the compiled :mod:`cleanse.graphs.monstor_kernel`, the default where
        numba imports) or ``"numpy"`` (the same maths in numpy calls, below)."""
        return cls(hood.src.numpy(), hood.dst.numpy(), hood.p.numpy().astype(np.float64),
                   hood.seeds.numpy()[0].astype(np.float64),
                   _mlp(model), hood.flowing, checked_backend(backend, "monstor pass"))

    def spread(self, x: np.ndarray) -> float:
        """The spread estimate with keep-weights ``x`` (m,)."""
        if self.backend == "numba":
            return self._compiled(x, False)[0]
        return float(self._forward(x, None).sum())

    def spread_and_gradient(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """The spread estimate and ``d spread / d x`` (m,) at ``x`` (m,): the forward pass keeps what the
        reverse pass needs, then the reverse pass runs the layers backwards."""
        if self.backend == "numba":
            return self._compiled(x, True)
        tape: list[tuple[np.ndarray, ...]] = []
        pi = self._forward(x, tape)
        return float(pi.sum()), self._backward(tape)

    def _compiled(self, x: np.ndarray, gradient: bool) -> tuple[float, np.ndarray]:
        # one argument type per array (float64 C-contiguous x, int64 flowing): each new combination
        # would compile the kernel again
        mlp = self.mlp
        spread, grad = _kernel.monstor_pass(
            self.src, self.dst, self.p, self.seeds, np.array(self.flowing, dtype=np.int64),
            np.ascontiguousarray(x, dtype=np.float64), mlp.first, mlp.second, mlp.second_bias, mlp.last,
            mlp.last_bias, mlp.first_back, mlp.second_back, gradient)
        return float(spread), grad

    def _forward(self, x: np.ndarray, tape: list[tuple[np.ndarray, ...]] | None) -> np.ndarray:
        src, dst, s, n, mlp = self.src, self.dst, self.seeds, self.seeds.size, self.mlp
        w = self.p * x
        w_in, w_out = np.bincount(dst, w, n), np.bincount(src, w, n)
        feats = np.empty((n, 7), dtype=np.float32)  # [pi, s, q, inflow, in-degree, out-degree, 1 (the bias)]
        feats[:, 1], feats[:, 4], feats[:, 5], feats[:, 6] = s, np.log1p(w_in), np.log1p(w_out), 1.0
        free, pi = s == 0, s
        if tape is not None:
            tape.append((w, w_in, w_out))
        for c in self.flowing:
            pi_src = pi.take(src[:c])
            flow = w[:c] * pi_src
            neg_flow = -_KEEP * flow  # kept: 1 + neg_flow is the reverse pass's 1 - (1 - eps) flow, exactly
            log_stay = np.bincount(dst[:c], np.log1p(neg_flow), n)
            q = -np.expm1(log_stay)
            inflow = np.bincount(dst[:c], flow, n)
            feats[:, 0], feats[:, 2], feats[:, 3] = pi, q, inflow
            rows = np.flatnonzero(free & (inflow > 0))  # the nodes whose MLP output is used
            # ReLUs in place: relu(h) > 0 exactly where h > 0, so the reverse pass needs only the outputs;
            # take, not feats[rows]: numpy's fancy row gather was 5x slower at these sizes
            relu1 = feats.take(rows, axis=0) @ mlp.first
            np.maximum(relu1, 0.0, out=relu1)
            relu2 = relu1 @ mlp.second
            relu2 += mlp.second_bias
            np.maximum(relu2, 0.0, out=relu2)
            q_rows, log_stay_rows = q.take(rows), log_stay.take(rows)
            q_floor = np.maximum(q_rows, NOISY_OR_EPS)
            z = np.log(q_floor) - log_stay_rows + relu2 @ mlp.last
            z += mlp.last_bias
            pi = s.copy()
            pi[rows] = sigmoid = expit(z)
            if tape is not None:
                tape.append((pi_src, neg_flow, rows, log_stay_rows, q_rows, q_floor, relu1, relu2, z, sigmoid))
        return pi

    def _backward(self, tape: list[tuple[np.ndarray, ...]]) -> np.ndarray:
        """Reverse mode through :meth:`_forward`: ``g_pi`` (n,) is ``d spread / d pi`` after each layer;
        ``g_w`` (m,) collects ``d spread / d w`` from every layer's flows and from the degree features."""
        src, dst, n, mlp = self.src, self.dst, self.seeds.size, self.mlp
        w, w_in, w_out = tape[0]
        g_pi: np.ndarray = np.ones(n)
        g_w = np.zeros(w.size)
        degree_rows, degree_grads = [], []  # summed into nodes once, after the layers
        for k in range(len(self.flowing), 0, -1):
            pi_src, neg_flow, rows, log_stay, q, q_floor, relu1, relu2, z, sigmoid = tape[k]
            c = neg_flow.size
            # sigmoid'(z) as sigmoid(z) sigmoid(-z): both factors keep their digits when the node saturates
            g_z = g_pi.take(rows) * sigmoid * expit(-z)
            # the ReLU masks as float32 factors (exact 0/1): multiplying by a bool array casts it on the fly,
            # 2x slower; (mask * last) * g_z is the same product as (g_z * last) * mask
            g_hidden2 = (relu2 > 0).astype(np.float32)
            g_hidden2 *= mlp.last
            g_hidden2 *= g_z.astype(np.float32)[:, None]
            g_hidden1 = g_hidden2 @ mlp.second_back
            g_hidden1 *= (relu1 > 0).astype(np.float32)
            g_feats = g_hidden1 @ mlp.first_back  # (rows, 6); the MLP's other rows have no gradient
            g_q = g_feats[:, 2] + np.where(q >= NOISY_OR_EPS, g_z / q_floor, 0.0)
            # 1-D per-node arrays: gathering rows of an (n, 3) array by dst was 10x slower than 1-D gathers
            g_log_stay, g_inflow = np.zeros(n), np.zeros(n)
            g_log_stay[rows] = -g_z - g_q * np.exp(log_stay)  # q = -expm1(log_stay)
            g_inflow[rows] = g_feats[:, 3]
            degree_rows.append(rows)
            degree_grads.append(g_feats[:, 4:])
            targets = dst[:c]
            g_log_stay *= _KEEP  # per node, before the gather: (keep * g)[dst] is keep * g[dst], exactly
            g_flow = g_inflow.take(targets) - g_log_stay.take(targets) / (1 + neg_flow)
            g_w[:c] += g_flow * pi_src
            if k > 1:  # the first layer's pi is the seed row, a constant
                # astype: bincount of no edges (seeds without out-edges) is an int array
                g_pi = np.bincount(src[:c], g_flow * w[:c], n).astype(np.float64, copy=False)
                g_pi[rows] += g_feats[:, 0]
        rows, g_degrees = np.concatenate(degree_rows), np.concatenate(degree_grads)
        g_in_degree, g_out_degree = np.bincount(rows, g_degrees[:, 0], n), np.bincount(rows, g_degrees[:, 1], n)
        g_w += (g_in_degree / (1 + w_in)).take(dst) + (g_out_degree / (1 + w_out)).take(src)
        return g_w * self.p

"""Influence of each training instance on a GAN evaluation metric: ITD (backward adjoint pass
through the traced window) and AID (implicit, at the final parameters).

Terashita, Ohashi, Nonaka, Kanemaru, "Influence Estimation for GANs" (ICLR 2021) and Terashita,
Ohashi, Hara, "Data Cleansing for GANs" (TNNLS 2025, arXiv 2504.00603); spec §2.3, §2.4.

Sign convention (both estimators): ``I_j ~ M(theta^{-j}_T) - M(theta_T)``, the predicted change of
the metric ``M`` when instance ``j`` is removed (its real-loss mask ``m_j`` goes 1 -> 0, divisor
unchanged). Harm = ``direction * I_j`` (the family's business).

The step map ``Phi(theta, m)`` of a training step (both nets, both updates, the optimizer; see
:mod:`cleanse.families.gan.step`) is differentiated by double backprop: the step is rebuilt with
``create_graph=True`` from leaves ``theta_t`` and a mask leaf ``m`` (B,) of ones, and one
``torch.autograd.grad`` of ``<u, Phi(theta_t, m) - theta_t>`` gives both ``K_t^T u`` (``K_t`` =
d increment / d theta: the diagonal Hessian blocks and the D-G cross Jacobians, spec §2.3) and
``d<u, increment>/dm_i`` for every batch member at once (the mask trick, spec §2.4 item 3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from cleanse.families.gan.nets import GanSpec
from cleanse.families.gan.step import GanNets, GanRecipe, Params, StepOut, gan_step
from cleanse.families.gan.trace import GanTrace
from cleanse.families.gan.training import check_data, run_steps
from cleanse.progress import Progress
from cleanse.seeds import rng, torch_seed

MetricFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]  # (g_params, d_params) -> scalar


def metric_gradient(metric: MetricFn, g: Params, d: Params) -> tuple[Params, Params]:
    """(dM/d theta_G, dM/d theta_D) at (g, d); zeros for a net the metric does not depend on."""
    g_leaf = {k: v.detach().requires_grad_(True) for k, v in g.items()}
    d_leaf = {k: v.detach().requires_grad_(True) for k, v in d.items()}
    leaves = [*g_leaf.values(), *d_leaf.values()]
    grads = torch.autograd.grad(metric(g_leaf, d_leaf), leaves, allow_unused=True)
    flat = [torch.zeros_like(p) if grad is None else grad.detach() for p, grad in zip(leaves, grads, strict=True)]
    return dict(zip(g_leaf, flat[: len(g_leaf)], strict=True)), dict(zip(d_leaf, flat[len(g_leaf):], strict=True))


@dataclass
class _Tape:
    """One training step rebuilt with ``create_graph=True`` from leaves (params, a mask of ones
    (B,), and the carried optimizer buffers): ``out`` keeps the graph for one VJP."""

    g: Params
    d: Params
    state: Params
    carried: list[str]
    mask: Tensor
    out: StepOut


def _tape_step(nets: GanNets, recipe: GanRecipe, g: Params, d: Params, state: Params, real: Tensor, z_d: Tensor,
               z_g: Tensor, lr_d: float, lr_g: float, carry_state: bool) -> _Tape:
    """The step at (g, d, state) with its graph; the previous optimizer state is a constant unless
    ``carry_state`` (then its float buffers are leaves too)."""
    g_leaf = {k: v.detach().requires_grad_(True) for k, v in g.items()}
    d_leaf = {k: v.detach().requires_grad_(True) for k, v in d.items()}
    carried = [k for k in state if not k.endswith(".step")] if carry_state else []
    s_leaf = {k: (v.detach().requires_grad_(True) if k in carried else v.detach()) for k, v in state.items()}
    mask = torch.ones(real.shape[0], dtype=real.dtype, requires_grad=True)
    out = gan_step(nets, recipe, g_leaf, d_leaf, s_leaf, real, mask, z_d, z_g, lr_d, lr_g, create_graph=True)
    return _Tape(g_leaf, d_leaf, s_leaf, carried, mask, out)


def _tape_vjp(tape: _Tape, u_g: Params, u_d: Params,
              u_state: Params | None) -> tuple[Params, Params, Params | None, Tensor]:
    """One transposed-Jacobian product of the taped step.

    Returns (K^T u)_G, (K^T u)_D, the new optimizer-state adjoint (when ``u_state`` is given, else
    None) and d<u, Phi(theta, m)>/dm (B,), all from one plain VJP of the scalar
    ``<u, Phi(theta, m) - theta>`` (+ ``<u_state, state'>``): the graph is used once, no
    retain_graph, no graph of the VJP itself. (A scalar rather than ``grad_outputs``: passing
    cotangents makes torch import its symbolic-shapes machinery, ~1 s, on a process's first call.)
    """
    out, carried = tape.out, tape.carried if u_state is not None else []
    terms = [((out.g[k] - leaf) * u_g[k]).sum() for k, leaf in tape.g.items()]
    terms += [((out.d[k] - leaf) * u_d[k]).sum() for k, leaf in tape.d.items()]
    if u_state is not None:
        terms += [(out.state[k] * u_state[k]).sum() for k in carried]
    inputs = [*tape.g.values(), *tape.d.values(), tape.mask, *(tape.state[k] for k in carried)]
    grads = torch.autograd.grad(torch.stack(terms).sum(), inputs, allow_unused=True)
    flat = [torch.zeros_like(x) if grad is None else grad for x, grad in zip(inputs, grads, strict=True)]
    n_g, n_d = len(tape.g), len(tape.d)
    kt_g = dict(zip(tape.g, flat[:n_g], strict=True))
    kt_d = dict(zip(tape.d, flat[n_g: n_g + n_d], strict=True))
    new_u_state = None if u_state is None else dict(zip(carried, flat[n_g + n_d + 1:], strict=True))
    return kt_g, kt_d, new_u_state, flat[n_g + n_d]


def _adjoint_step(nets: GanNets, recipe: GanRecipe, g: Params, d: Params, state: Params, real: Tensor,
                  z_d: Tensor, z_g: Tensor, lr_d: float, lr_g: float, u_g: Params, u_d: Params,
                  u_state: Params | None) -> tuple[Params, Params, Params | None, Tensor]:
    """:func:`_tape_vjp` of the step at (g, d, state), rebuilt here."""
    tape = _tape_step(nets, recipe, g, d, state, real, z_d, z_g, lr_d, lr_g, u_state is not None)
    return _tape_vjp(tape, u_g, u_d, u_state)


def _mix(u: Params, kt_u: Params, damping: float, scale: float) -> Params:
    """u <- (1 - damping) u + scale K^T u (spec §2.4 item 6; damping 0, scale 1 = the exact adjoint)."""
    return {k: (1.0 - damping) * u[k] + scale * kt_u[k] for k in u}


SNAPSHOT_BYTES = 256 * 2**20  # the window's per-step states kept in memory at once (beyond: checkpointing)


def _checkpoint_stride(trace: GanTrace) -> int:
    """Steps between stored states: 1 (every state) when the window's states fit in SNAPSHOT_BYTES,
    else about sqrt(steps), so that at most ~2 sqrt(steps) states are held (one extra replay)."""
    tensors = [*trace.start_g.values(), *trace.start_d.values(), *trace.optimizer_start.values()]
    per_state = sum(t.numel() * t.element_size() for t in tensors)
    if per_state * trace.steps <= SNAPSHOT_BYTES:
        return 1
    return max(1, int(np.ceil(np.sqrt(trace.steps))))


State = tuple[Params, Params, Params]  # (g, d, optimizer state)


def _window_states(nets: GanNets, recipe: GanRecipe, trace: GanTrace, data: Tensor, begin: int, end: int,
                   stride: int, start: State | None = None) -> list[State]:
    """The states before steps begin, begin + stride, ... (< end), then the state after step end - 1,
    replayed from ``start`` (default: the trace's start, begin = 0) with the training arithmetic."""
    g, d, state = start or (trace.start_g, trace.start_d, trace.optimizer_start)
    states: list[State] = []
    for first in range(begin, end, stride):
        states.append((g, d, state))
        last = min(first + stride, end)
        window = slice(first, last)
        g, d, state = run_steps(nets, recipe, g, d, state, data, None, trace.batches[window], trace.z_d[window],
                                trace.z_g[window], trace.lr_d[window], trace.lr_g[window])
    states.append((g, d, state))
    return states


TAPE_BYTES = 256 * 2**20  # the saved tensors of the steps whose graphs are kept from the forward replay


def _saved_bytes(build: Callable[[], _Tape]) -> tuple[_Tape, int]:
    """``build()`` and the bytes of the tensors its graph saves (an upper bound: views count fully)."""
    sizes: list[int] = []

    def pack(x: Tensor) -> Tensor:
        sizes.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        tape = build()
    return tape, sum(sizes)


def _taped_window(nets: GanNets, recipe: GanRecipe, trace: GanTrace, data: Tensor,
                  carry_state: bool) -> tuple[list[_Tape | State], State]:
    """The forward replay of the window for a window whose states fit: each step's input as a
    :class:`_Tape` (the step already built with its graph, so the backward sweep does not build it a
    second time; the replay continues from the taped step's detached outputs, the same arithmetic)
    while the graphs fit in ``TAPE_BYTES`` (sized on the first step), then as plain states."""
    g, d, state = trace.start_g, trace.start_d, trace.optimizer_start
    items: list[_Tape | State] = []
    budget: int | None = None
    for t in range(trace.steps):
        args = (nets, recipe, g, d, state, data[trace.batches[t]], trace.z_d[t], trace.z_g[t],
                float(trace.lr_d[t]), float(trace.lr_g[t]), carry_state)
        if budget is None:
            tape, per_step = _saved_bytes(lambda: _tape_step(*args))
            budget = TAPE_BYTES // max(per_step, 1)
        if t < budget:
            tape = tape if t == 0 else _tape_step(*args)
            items.append(tape)
            g, d = ({k: v.detach() for k, v in p.items()} for p in (tape.out.g, tape.out.d))
            state = {k: v.detach() for k, v in tape.out.state.items()}
        else:
            items.append((g, d, state))
            window = slice(t, t + 1)
            g, d, state = run_steps(nets, recipe, g, d, state, data, None, trace.batches[window], trace.z_d[window],
                                    trace.z_g[window], trace.lr_d[window], trace.lr_g[window])
    return items, (g, d, state)


def itd_influence(spec: GanSpec, recipe: GanRecipe, trace: GanTrace, data: Tensor, metric: MetricFn, *,
                  damping: float = 0.0, scale: float = 1.0, progress: bool = False,
                  optimizer_adjoint: bool = False) -> np.ndarray:
    """ITD: ``I_j ~ M(theta^{-j}_T) - M(theta_T)`` for every training row, (n,) float64.

    Replays the window (the same arithmetic as training), storing each step's input, already built
    with its graph while the graphs fit in ``TAPE_BYTES`` (so the replay and the backward sweep
    build each step once; or, for a window whose states exceed ``SNAPSHOT_BYTES``, every
    ~sqrt(S)-th state, recomputing each segment's states once more on the way back), sets
    ``u = dM/dtheta_T`` (G part and D part), then for t = S-1 .. 0 (for alternating updates the
    step's G-update is differentiated before its D-update, by the chain rule inside the step):
    ``I_j -= d<u, Phi_t(theta_t, m)>/dm_j`` for the batch members (with the current u = u_{t+1}),
    then ``u <- (1 - damping) u + scale K_t^T u``. Rows never in a traced batch get 0.

    With damping 0 and scale 1 this is the exact derivative ``-dM(theta_T(m))/dm_j`` of the replay
    for SGD without momentum. For momentum SGD and Adam the previous buffers are constants (spec
    §2.4 item 2; the papers' choice); ``optimizer_adjoint=True`` instead carries an adjoint for the
    buffers as well, which makes it the exact derivative for every optimizer.
    """
    check_data(spec, recipe, data)
    nets = GanNets(spec)
    stride = _checkpoint_stride(trace)
    snapshots: list[_Tape | State] = []
    if stride == 1:
        snapshots, (g_T, d_T, _) = _taped_window(nets, recipe, trace, data, optimizer_adjoint)
    else:
        segments = _window_states(nets, recipe, trace, data, 0, trace.steps, stride)
        g_T, d_T, _ = segments.pop()
    u_g, u_d = metric_gradient(metric, g_T, d_T)
    u_state = ({k: torch.zeros_like(v) for k, v in trace.optimizer_start.items() if not k.endswith(".step")}
               if optimizer_adjoint else None)
    influence = torch.zeros(data.shape[0], dtype=torch.float64)
    reporter = Progress("gan influence: itd", total=trace.steps, unit="step") if progress else None
    for t in reversed(range(trace.steps)):
        if not snapshots:  # recompute the states of the segment that ends at step t
            begin = (t // stride) * stride
            snapshots = [*_window_states(nets, recipe, trace, data, begin, t + 1, 1, segments[t // stride])[:-1]]
        item = snapshots.pop()
        rows = trace.batches[t]
        tape = item if isinstance(item, _Tape) else _tape_step(
            nets, recipe, *item, data[rows], trace.z_d[t], trace.z_g[t], float(trace.lr_d[t]),
            float(trace.lr_g[t]), optimizer_adjoint)
        kt_g, kt_d, u_state, mask_grad = _tape_vjp(tape, u_g, u_d, u_state)
        del tape, item  # frees the step's graph
        influence.index_add_(0, rows, -mask_grad.to(torch.float64))
        u_g, u_d = _mix(u_g, kt_g, damping, scale), _mix(u_d, kt_d, damping, scale)
        if reporter is not None:
            reporter.update()
    if reporter is not None:
        reporter.close()
    return influence.numpy()


def aid_influence(spec: GanSpec, recipe: GanRecipe, g_state: Params, d_state: Params, data: Tensor,
                  metric: MetricFn, *, depth: int, damping: float, scale: float, seed: int, batch_size: int,
                  progress: bool = False) -> np.ndarray:
    """AID: implicit-differentiation influence at the final parameters, (n,) float64.

    The trained parameters are treated as a fixed point ``theta* = Phi(theta*, m)`` of the step map
    ``Phi`` = one plain SGD step (the recipe's update scheme, learning rates and weight decay, no
    momentum or Adam buffers: the final optimizer state is not an input here). By the implicit
    function theorem ``d theta*/dm_i = (I - dPhi/dtheta)^{-1} dPhi/dm_i``, so
    ``I_i = -w^T dPhi/dm_i`` with ``w = (I - K^T)^{-1} dM/dtheta`` (``K`` = d increment / d theta).

    The Neumann form (a deliberate choice, spec §2.4 "Pitfall"): ``w_0 = dM/dtheta``,
    ``w_{k+1} = dM/dtheta + (1 - damping) w_k + scale K_k^T w_k`` for ``depth`` iterations, each
    ``K_k`` on a fresh minibatch of ``batch_size`` rows and fresh latents (``gan.aid`` stream), so
    ``w`` is the truncated series ``sum_k A^k dM/dtheta`` -- not the published code's power
    iteration, whose re-injection of dM/dtheta is discarded and which returns only ``A^K dM``.
    Then one pass over all rows in chunks of ``batch_size``: ``I_i = -(B/n) d<w, Phi(theta, m)>/dm_i``,
    where ``B/n`` is the chance that row i is in a step's batch. ``depth`` steps of the series then
    stand for a traced window of ``depth`` steps, so ``depth ~ epochs * n / B`` makes AID comparable
    in size to ITD over that many epochs.
    """
    check_data(spec, replace(recipe, batch_size=batch_size), data)
    plain = replace(recipe, optimizer="sgd", momentum=0.0, batch_size=batch_size)
    nets, n = GanNets(spec), data.shape[0]
    grad_g, grad_d = metric_gradient(metric, g_state, d_state)
    w_g, w_d = dict(grad_g), dict(grad_d)
    draws = rng(seed, "gan.aid")
    generator = torch.Generator().manual_seed(torch_seed(seed, "gan.aid"))

    def latents() -> tuple[Tensor, Tensor]:
        shape = (batch_size, spec.z_dim)
        return (torch.randn(*shape, generator=generator, dtype=spec.torch_dtype),
                torch.randn(*shape, generator=generator, dtype=spec.torch_dtype))

    reporter = Progress("gan influence: aid", total=depth + -(-n // batch_size), unit="step") if progress else None
    for _ in range(depth):
        rows = torch.from_numpy(draws.choice(n, size=batch_size, replace=False).astype(np.int64))
        z_d, z_g = latents()
        kt_g, kt_d, _, _ = _adjoint_step(nets, plain, g_state, d_state, {}, data[rows], z_d, z_g, recipe.lr_d,
                                         recipe.lr_g, w_g, w_d, None)
        w_g = {k: grad_g[k] + v for k, v in _mix(w_g, kt_g, damping, scale).items()}
        w_d = {k: grad_d[k] + v for k, v in _mix(w_d, kt_d, damping, scale).items()}
        if reporter is not None:
            reporter.update()
    influence = torch.zeros(n, dtype=torch.float64)
    for begin in range(0, n, batch_size):
        rows = torch.arange(begin, min(begin + batch_size, n))
        z_d, z_g = latents()
        _, _, _, mask_grad = _adjoint_step(nets, plain, g_state, d_state, {}, data[rows], z_d, z_g, recipe.lr_d,
                                           recipe.lr_g, w_g, w_d, None)
        influence[rows] = -(batch_size / n) * mask_grad.to(torch.float64)
        if reporter is not None:
            reporter.update()
    if reporter is not None:
        reporter.close()
    return influence.numpy()


__all__ = ["MetricFn", "aid_influence", "itd_influence", "metric_gradient"]

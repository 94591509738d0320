"""Per-sample gradients of a family's loss, via ``torch.func`` (curvature products live in
:mod:`cleanse.curvature`, inverse-curvature solvers in :mod:`cleanse.solvers`; both are
re-exported here).

Conventions. The differentiated parameters are handled as one flat vector ``theta`` of length
``p`` (the order of ``module.named_parameters()``, restricted to the ones the family
differentiates: all, the last layer, or adapters; :meth:`cleanse.families.base.Family.differentiated`).
The training objective is ``J(theta) = mean_i l(z_i; theta) + weight_decay / 2 * ||theta||^2``
(what the trainer minimises), with ``l`` the family's per-unit loss
(:meth:`cleanse.families.base.Family.per_sample_loss`: cross-entropy for classification, squared
error for regression), and ``H`` is its Hessian. Per-sample gradients ``g_i = grad_theta l(z_i; theta)``
exclude the penalty. Matrices of gradients have shape ``(n, p)``.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

if TYPE_CHECKING:
    from cleanse.families.base import Family


# torch keeps forward-mode AD state per process, not per thread: ``torch.func.jvp`` enters a global
# dual level and counts its nesting in a module global. Two threads in jvp at once (estimators
# scored concurrently in Prefect's thread pool) exit each other's level: "Trying to access a forward
# AD level with an invalid index", or, worse, silently wrong tangents. Every forward-mode product
# in cleanse goes through :func:`jvp`, which admits one thread at a time. Reentrant, so a jvp
# nested in a jvp (same thread) does not deadlock.
_FORWARD_AD_LOCK = threading.RLock()
_waits = threading.local()


def jvp(func: Callable[..., Any], primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...]) -> Any:
    """``torch.func.jvp(func, primals, tangents)``, serialised across threads (see above).

    Time spent waiting for another thread's forward-mode section is added to
    :func:`forward_ad_wait_seconds` of the calling thread, so stage timings can exclude it.
    """
    started = time.perf_counter()
    with _FORWARD_AD_LOCK:
        _waits.seconds = getattr(_waits, "seconds", 0.0) + (time.perf_counter() - started)
        return torch.func.jvp(func, primals, tangents)


def forward_ad_wait_seconds() -> float:
    """Seconds this thread has spent waiting in :func:`jvp` for other threads (monotone; take differences)."""
    return getattr(_waits, "seconds", 0.0)


def _default_task() -> Family:
    from cleanse import families

    return families.get()


@dataclass
class FunctionalModel:
    """A module split into a pure function of a flat vector of the parameters that are
    differentiated, with the family (``task``) whose loss is differentiated. ``complete``: every
    parameter of the module is in ``theta`` (the others are held fixed as the module's own)."""

    module: nn.Module
    names: list[str]
    shapes: list[torch.Size]
    theta: torch.Tensor
    weight_decay: float
    task: Family = field(default_factory=_default_task)
    complete: bool = True

    @classmethod
    def of(cls, module: nn.Module, weight_decay: float, task: Family | None = None,
           layers: str = "all") -> FunctionalModel:
        """``module`` (copied) as a function of the parameters ``task`` differentiates for
        ``layers`` (``all``, ``last``, ``adapters``); ``task`` defaults to classification."""
        # Gradients flow through ``theta`` only; the module's own tensors are constants. A copy, so
        # that the caller's module keeps its training mode and requires_grad flags.
        task = task if task is not None else _default_task()
        module = copy.deepcopy(module).eval().requires_grad_(False)
        every = list(module.named_parameters())
        chosen = set(task.differentiated(module, layers))
        named = [(name, parameter) for name, parameter in every if name in chosen]
        theta = torch.cat([parameter.detach().reshape(-1) for _, parameter in named])
        return cls(module, [n for n, _ in named], [p.shape for _, p in named], theta, weight_decay, task,
                   len(named) == len(every))

    @property
    def n_params(self) -> int:
        return int(self.theta.numel())

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = math.prod(shape)
            out[name] = theta[offset : offset + size].reshape(shape)
            offset += size
        return out

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's output ``(n, k)`` at ``theta`` (logits for classification)."""
        return functional_call(self.module, self.unflatten(theta), (x,))

    def sample_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one sample (``x`` without a batch axis), a scalar."""
        return self.task.per_sample_loss(self.logits(theta, x.unsqueeze(0)), y.unsqueeze(0))[0]

    def losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses, shape ``(n,)``."""
        return self.task.per_sample_loss(self.logits(theta, x), y)

    def objective(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss plus the L2 penalty: the trainer's objective."""
        return self.losses(theta, x, y).mean() + 0.5 * self.weight_decay * (theta * theta).sum()


def per_sample_grads(
    fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, *, chunk_size: int = 256, theta: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample loss gradients ``g_i``, shape ``(n, p)``, via ``vmap(grad)`` in chunks.

    The gradient is taken with respect to the parameter dictionary and flattened afterwards:
    differentiating through the flat vector's slicing would make every sample's backward pass
    scatter into a zero vector of length ``p``, which measured about 3x slower.
    """
    theta = fm.theta if theta is None else theta
    params = fm.unflatten(theta)

    def sample_loss(named: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        output = functional_call(fm.module, named, (xi.unsqueeze(0),))
        return fm.task.per_sample_loss(output, yi.unsqueeze(0))[0]

    one = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    blocks = []
    for s in range(0, x.shape[0], chunk_size):
        named = one(params, x[s : s + chunk_size], y[s : s + chunk_size])
        blocks.append(torch.cat([named[name].reshape(named[name].shape[0], -1) for name in fm.names], dim=1))
    return torch.cat(blocks) if blocks else x.new_zeros((0, fm.n_params))


def last_layer_name(module: nn.Module) -> str:
    """The name of the last submodule that owns parameters (the classifier head)."""
    owners = [name for name, child in module.named_modules() if list(child.parameters(recurse=False))]
    return owners[-1]


def _linear_only(module: nn.Module) -> list[nn.Linear] | None:
    """The module's Linear layers if they hold every parameter, else ``None``."""
    linears = []
    for child in module.modules():
        own = list(child.parameters(recurse=False))
        if not own:
            continue
        if not isinstance(child, nn.Linear):
            return None
        linears.append(child)
    return linears


def per_sample_sq_norms(
    fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, *, chunk_size: int = 4096, theta: torch.Tensor | None = None
) -> torch.Tensor:
    """``||g_i||^2`` for every sample, shape ``(n,)``, float64.

    For networks whose parameters all sit in ``nn.Linear`` layers fed 2-D inputs, the per-sample
    gradient of a layer is the outer product ``delta_i a_i^T`` (plus ``delta_i`` for the bias), so
    ``||g_i||^2 = sum_layers ||a_i||^2 ||delta_i||^2 + ||delta_i||^2``: one forward and one
    backward pass per chunk, the cost of a training step, and no per-sample gradient is
    materialised. Other architectures fall back to :func:`per_sample_grads`.
    """
    theta = fm.theta if theta is None else theta
    linears = _linear_only(fm.module) if fm.complete else None
    if linears is None:
        return torch.cat([per_sample_grads(fm, x[s : s + 256], y[s : s + 256], theta=theta).double().pow(2).sum(1)
                          for s in range(0, x.shape[0], 256)]) if x.shape[0] else x.new_zeros(0, dtype=torch.float64)
    totals = []
    for s in range(0, x.shape[0], chunk_size):
        xb, yb = x[s : s + chunk_size], y[s : s + chunk_size]
        captured = _linear_activations_and_deltas(fm, linears, xb, yb, theta)
        if captured is None:
            totals.append(per_sample_grads(fm, xb, yb, theta=theta).double().pow(2).sum(1))
            continue
        total = torch.zeros(xb.shape[0], dtype=torch.float64, device=x.device)
        for layer, inputs, delta in captured:
            delta_sq = delta.double().pow(2).sum(1)
            total += inputs.double().pow(2).sum(1) * delta_sq
            if layer.bias is not None:
                total += delta_sq
        totals.append(total)
    return torch.cat(totals) if totals else x.new_zeros(0, dtype=torch.float64)


# Rows per materialised gradient block in :func:`grad_dots`, capped so that a block holds at most
# _BLOCK_ENTRIES entries (64 MiB of float32) however many parameters are differentiated.
_BLOCK_ROWS = 64
_BLOCK_ENTRIES = 1 << 24


def materialises(fm: FunctionalModel, directions: int) -> bool:
    """Whether :func:`grad_dots` forms the per-sample gradients in ``(rows, p)`` blocks for
    ``directions`` vectors, rather than one forward-mode pass per direction.

    True when only part of the network is differentiated (``not fm.complete``: LoRA adapters in a
    frozen transformer, or ``layers: last``) and there are at least two directions. Forward mode
    pushes a tangent through every layer downstream of the differentiated parameters once per
    direction; one ``vmap(grad)`` pass gives all ``p`` entries of every row at once, and ``p`` is a
    fraction of the network, so the block is small (at most :data:`_BLOCK_ENTRIES` entries). On
    the lm family (examples/lm.yaml: 4,608 adapter parameters, 32 probes) this is what makes TracIn's
    and influence's probe scores cheap (docs/benchmarks.md, ``lm-peers``). With one direction
    forward mode is a single pass too and needs no block. Complete networks
    keep their paths: all-Linear ones share one forward and backward pass between directions, and
    for the others ``p`` is the whole network, whose per-sample gradients cost about ten times a
    forward-mode pass per multiply-add (``vmap_mac`` against ``func_mac`` in
    :data:`cleanse.estimators.influence_plan.COST_CONSTANTS`, calibrated on MLPs).
    """
    return not fm.complete and directions >= 2


def grad_dots(
    fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, direction: torch.Tensor, *,
    chunk_size: int = 4096, theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """``g_i . v`` for every sample and direction: ``direction`` ``(p,)`` gives ``(n,)``, a block
    ``(p, k)`` gives ``(n, k)``. Three paths, chosen from the model and ``k`` alone (never from
    the data), each exact up to float rounding:

    - all ``nn.Linear`` parameters fed 2-D inputs (complete models): ``g_i`` is ``delta_il a_il^T``
      per layer (plus ``delta_il`` for the bias), so one forward and one backward pass per chunk
      give every ``a`` and ``delta``, and ``g_i . v = sum_l delta_il^T V_l a_il`` is one matrix
      product per layer for all ``k`` directions at once (TracIn and influence score 8 probes in
      about the time of one); no per-sample gradient is materialised;
    - part of the network differentiated and ``k >= 2`` (:func:`materialises`): per-sample
      gradients in blocks of at most 64 rows (:func:`per_sample_grads`), times the ``(p, k)`` block;
    - otherwise one forward-mode derivative of the per-sample losses per direction (:func:`jvp`).
    """
    theta = fm.theta if theta is None else theta
    single = direction.dim() == 1
    block = direction[:, None] if single else direction
    linears = _linear_only(fm.module) if fm.complete else None
    rows = max(1, min(_BLOCK_ROWS, _BLOCK_ENTRIES // max(fm.n_params, 1)))
    out = []
    for s in range(0, x.shape[0], chunk_size):
        xb, yb = x[s : s + chunk_size], y[s : s + chunk_size]
        dots = _linear_grad_dots(fm, linears, xb, yb, block, theta) if linears is not None else None
        if dots is None and materialises(fm, block.shape[1]):
            dots = torch.cat([per_sample_grads(fm, xb[r : r + rows], yb[r : r + rows], theta=theta) @ block
                              for r in range(0, xb.shape[0], rows)])
        if dots is None:
            dots = torch.stack([jvp(lambda t: fm.losses(t, xb, yb), (theta,), (block[:, j],))[1]
                                for j in range(block.shape[1])], dim=1)
        out.append(dots)
    result = torch.cat(out) if out else x.new_zeros(0, block.shape[1])
    return result[:, 0] if single else result


def _linear_activations_and_deltas(fm: FunctionalModel, linears: list[nn.Linear], x: torch.Tensor, y: torch.Tensor,
                                   theta: torch.Tensor) -> list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] | None:
    """One forward and one backward pass: each Linear layer's inputs ``a`` ``(n, in)`` and output
    gradients ``delta`` ``(n, out)``; the gradient of the summed loss w.r.t. a layer's output is each
    row's own delta. ``None`` when a layer sees inputs that are not 2-D, or its output does not
    reach the loss (no gradient)."""
    captured: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
    by_id = {id(layer): layer for layer in linears}  # the hooks see nn.Module; these are the Linear layers

    def keep(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append((by_id[id(layer)], inputs[0].detach(), output))

    handles = [layer.register_forward_hook(keep) for layer in linears]
    try:
        leaf = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            fm.task.per_sample_loss(fm.logits(leaf, x), y).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    deltas = []
    for layer, inputs, output in captured:
        if inputs.dim() != 2 or output.grad is None:
            return None
        deltas.append((layer, inputs, output.grad))
    return deltas


def _linear_grad_dots(fm: FunctionalModel, linears: list[nn.Linear], x: torch.Tensor, y: torch.Tensor,
                      block: torch.Tensor, theta: torch.Tensor) -> torch.Tensor | None:
    """``(n, k)`` dots of the per-sample gradients of an all-Linear network with ``block`` ``(p, k)``;
    ``None`` when a layer sees inputs that are not 2-D (the caller falls back to forward mode)."""
    captured = _linear_activations_and_deltas(fm, linears, x, y, theta)
    if captured is None:
        return None
    slices = _parameter_slices(fm)
    k = block.shape[1]
    total = x.new_zeros(x.shape[0], k, dtype=block.dtype)
    names = {id(module): name for name, module in fm.module.named_modules()}
    for layer, inputs, delta in captured:
        prefix = names[id(layer)]
        key = f"{prefix}." if prefix else ""
        out_features, in_features = layer.weight.shape
        delta = delta.to(block.dtype)  # (n, out)
        weights = block[slices[f"{key}weight"]].T.reshape(k, out_features, in_features)
        # (n, in) x (in, k * out) -> (n, k, out), contracted with delta over out
        projected = (inputs.to(block.dtype) @ weights.permute(2, 0, 1).reshape(in_features, k * out_features))
        total += torch.bmm(projected.reshape(-1, k, out_features), delta[:, :, None])[:, :, 0]  # one pass, no temp
        if layer.bias is not None:
            total += delta @ block[slices[f"{key}bias"]]
    return total


def _parameter_slices(fm: FunctionalModel) -> dict[str, slice]:
    """Each named parameter's slice of the flat vector ``theta``."""
    out, offset = {}, 0
    for name, shape in zip(fm.names, fm.shapes):
        size = math.prod(shape)
        out[name] = slice(offset, offset + size)
        offset += size
    return out


def mean_grad(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of the mean loss over ``(x, y)`` (no penalty), shape ``(p,)``."""
    theta = fm.theta if theta is None else theta
    return grad(lambda t: fm.losses(t, x, y).mean())(theta)



# Re-exported: the curvature products and solvers were split out of this module.
from cleanse.curvature import (  # noqa: E402  (after FunctionalModel, which they import)
    HVP,
    _linear_head_ggn,
    curvature_fn,
    exact_hessian,
    ggn_fn,
    hvp_fn,
    linear_head_ggn_matrix,
)
from cleanse.solvers import (  # noqa: E402
    ExactInverse,
    SolverReport,
    cg_solve,
    exact_inverse,
    lissa_solve,
    on_active,
    top_eigenvalue,
)

__all__ = ["HVP", "ExactInverse", "FunctionalModel", "SolverReport", "_linear_head_ggn", "cg_solve", "curvature_fn",
           "exact_hessian", "exact_inverse", "forward_ad_wait_seconds", "ggn_fn", "grad_dots", "hvp_fn", "jvp",
           "last_layer_name", "linear_head_ggn_matrix", "lissa_solve", "materialises", "mean_grad", "on_active",
           "per_sample_grads", "per_sample_sq_norms", "top_eigenvalue"]

"""Eigenvalue-corrected Kronecker-factored curvature (EK-FAC) for Linear and Conv2d layers.

George, Laurent, Bouthillier, Ballas & Vincent, "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis" (NeurIPS 2018); used for influence functions by Grosse et al.,
"Studying Large Language Model Generalization with Influence Functions" (2023).

For a layer with weight ``W`` ``(out, in)`` and bias ``b`` the parameters are handled as the
augmented matrix ``M = [W | b]`` of shape ``(out, in + 1)`` (inputs get a trailing 1). The
per-sample gradient is ``DW_i = sum_l delta_il a_il^T`` (one term for Linear layers, one per output
position ``l`` for Conv2d, whose inputs ``a_il`` are unfolded patches), with ``a`` the layer input
and ``delta`` the loss gradient with respect to the layer output (pre-activation).

1. Kronecker factors ``A = E[a a^T]`` (``(in+1, in+1)``) and ``S = E[delta delta^T]``
   (``(out, out)``), eigendecomposed in float64: ``A = Q_A L_A Q_A^T``, ``S = Q_S L_S Q_S^T``.
2. Eigenvalue correction: ``Lambda_ab = E[((Q_S^T DW Q_A)_ab)^2]``, the exact diagonal of the
   layer's curvature in the Kronecker eigenbasis.
3. ``(F + lambda I)^-1 v`` per layer: ``Q_S [(Q_S^T V Q_A) / (Lambda + lambda)] Q_A^T``.

The expectation is over training inputs and, for ``fisher="expected"`` (the default), over labels
drawn from the model's own predictive distribution, enumerated exactly over the classes (the
true Fisher, which for cross-entropy equals the Gauss-Newton matrix). ``fisher="sampled"`` draws
one label per sample from the model's predictive distribution instead (Kronfluence's default;
an unbiased estimate of the same factors at ``1/C`` of the label-dependent work: one backward
pass and one set of ``(out, out)`` products per sample instead of ``C``; the draws are seeded).
``fisher="empirical"`` uses the observed labels. The objective's L2 term
``weight_decay * I`` is added to every eigenvalue (it is isotropic, so it is exact in any basis).
Layers are treated as independent (block-diagonal curvature).

Sequence families (``Family.sequence_fisher``, the language model's LoRA matrices): a Linear layer
applied to ``(n, T, in)`` sequences has one term ``delta_it a_it^T`` per position ``t``, like a
convolution's patches, and the Fisher's labels are the response tokens, one softmax over the
vocabulary per scored position (``Family.fisher_outputs``; Grosse et al., 2023, §3.1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from cleanse.errors import ConfigError
from cleanse.grads import FunctionalModel

FisherKind = Literal["expected", "sampled", "empirical"]


@dataclass
class _Layer:
    module: nn.Module
    weight_slice: slice
    bias_slice: slice | None
    out_features: int
    in_features: int  # without the bias column
    # set by the fit (empty until then)
    q_a: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    q_s: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    eigenvalues: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (out, in + 1)

    @property
    def n_in(self) -> int:
        return self.in_features + (1 if self.bias_slice is not None else 0)


def _layers(fm: FunctionalModel) -> list[_Layer]:
    """Map every Linear/Conv2d layer to its slices of the flat parameter vector; refuse others."""
    offsets: dict[str, slice] = {}
    start = 0
    for name, shape in zip(fm.names, fm.shapes):
        size = int(torch.Size(shape).numel())
        offsets[name] = slice(start, start + size)
        start += size
    layers = []
    for prefix, child in fm.module.named_modules():
        key = f"{prefix}." if prefix else ""
        own = [name for name, _ in child.named_parameters(recurse=False) if f"{key}{name}" in offsets]
        if not own:
            continue
        if not isinstance(child, (nn.Linear, nn.Conv2d)):
            raise ConfigError(
                f"solver 'ekfac' supports Linear and Conv2d layers only; layer {prefix!r} is a {type(child).__name__}"
            )
        if isinstance(child, nn.Conv2d) and child.groups != 1:
            raise ConfigError(f"solver 'ekfac': grouped convolution {prefix!r} is not supported")
        weight = child.weight
        layers.append(_Layer(
            module=child,
            weight_slice=offsets[f"{key}weight"],
            bias_slice=offsets.get(f"{key}bias") if child.bias is not None else None,
            out_features=weight.shape[0],
            in_features=int(weight[0].numel()),
        ))
    return layers


def _unfold(layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Layer inputs as ``(n, in, L)`` columns: ``L = 1`` for Linear on rows, the sequence positions
    for Linear on ``(n, T, in)`` sequences (each position is one term of the gradient, like a
    convolution's patch), patches for Conv2d."""
    if isinstance(layer, nn.Linear):
        if inputs.dim() > 2:
            return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).transpose(1, 2)
        return inputs.reshape(inputs.shape[0], -1, 1)
    if not isinstance(layer, nn.Conv2d):
        raise TypeError(f"EK-FAC factors Linear and Conv2d layers, not {type(layer).__name__}")
    if isinstance(layer.padding, str):  # "same" / "valid": unfold takes the numbers only
        raise ConfigError(f"EK-FAC needs Conv2d padding as numbers, not padding={layer.padding!r}")
    return nn.functional.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                stride=layer.stride)


def _hooked(fm: FunctionalModel, layers: list[_Layer], forward: Callable[[torch.Tensor], tuple[Any, torch.Tensor | None]]
            ) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
    """``forward(theta) -> (result, used)`` at a leaf ``theta`` that requires grad (so the layer
    outputs are differentiable nodes): the result, every layer's inputs as float64 columns
    ``(n, in+1, L)`` (zeroed at positions outside ``used`` ``(n, L)`` unless it is None) and the
    layers' outputs."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(layers):
        def keep(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, index: int = index) -> None:
            inputs[index] = args[0].detach()
            outputs[index] = out

        hooks.append(layer.module.register_forward_hook(keep))
    try:
        with torch.enable_grad():
            result, used = forward(fm.theta.detach().requires_grad_(True))
    finally:
        for hook in hooks:
            hook.remove()
    activations = []
    for index, layer in enumerate(layers):
        a = _unfold(layer.module, inputs[index]).double()
        if used is not None and a.shape[2] == used.shape[1]:
            a = a * used[:, None, :].to(a.dtype)
        if layer.bias_slice is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1, a.shape[2])], dim=1)
        activations.append(a)
    return result, activations, [outputs[i] for i in range(len(layers))]


def _capture(fm: FunctionalModel, layers: list[_Layer], x: torch.Tensor, targets: list[torch.Tensor],
             weights: list[torch.Tensor]) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """For each target labelling, each layer's ``(a, delta, weight)``: ``a`` ``(n, in+1, L)``,
    ``delta`` ``(n, out, L)`` (the per-sample loss gradient w.r.t. the layer output), float64."""
    logits, activations, outs = _hooked(fm, layers, lambda theta: (fm.logits(theta, x), None))
    result = []
    for target, weight in zip(targets, weights):
        with torch.enable_grad():
            # The family's per-sample loss, summed: each row's output gradient is its own loss's.
            loss = fm.task.per_sample_loss(logits, target).sum()
        with torch.enable_grad():
            deltas = torch.autograd.grad(loss, outs, retain_graph=True)
        per_layer = []
        for layer, a, delta in zip(layers, activations, deltas):
            per_layer.append((a, _output_columns(layer, delta), weight))
        result.append(per_layer)
    return result


def _output_columns(layer: _Layer, delta: torch.Tensor) -> torch.Tensor:
    """Output gradients as ``(n, out, L)`` float64, matching :func:`_unfold`'s columns."""
    if isinstance(layer.module, nn.Linear) and delta.dim() > 2:
        return delta.double().reshape(delta.shape[0], -1, layer.out_features).transpose(1, 2)
    return delta.double().reshape(delta.shape[0], layer.out_features, -1)


def _capture_tokens(fm: FunctionalModel, layers: list[_Layer], x: torch.Tensor, fisher: FisherKind,
                    generator: torch.Generator) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """:func:`_capture` for a family whose units are sequences scored by one softmax per position
    (:meth:`~cleanse.families.base.Family.fisher_outputs`: logits ``(n, R, C)``, loss weights
    ``(n, R)``, observed tokens ``(n, R)``, used input positions ``(n, T)``). A unit's loss under
    labels ``y`` is ``-sum_r weight_r log softmax(logits_r)[y_r]``; the Fisher draws ``y`` from the
    model (Grosse et al., 2023; Kronfluence). ``expected`` enumerates one position's ``C`` labels
    at a time (``R C`` backward passes): the positions' labels are independent and each score has
    zero mean, so the cross-position terms of ``E[DW DW^T]`` vanish and this is the exact
    expectation. ``sampled`` draws every position's label at once (one backward pass). Inputs at
    unused positions (padding after the last target) are zeroed: their output gradients are zero,
    so only the ``A`` factor would see them."""
    def forward(theta: torch.Tensor) -> tuple[Any, torch.Tensor]:
        outputs = fm.task.fisher_outputs(fm, theta, x)
        return outputs, outputs[3]

    (logits, weight, observed, _), activations, outs = _hooked(fm, layers, forward)
    ones = torch.ones(logits.shape[0], dtype=torch.float64, device=x.device)
    labellings: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.enable_grad():
        logp = torch.log_softmax(logits, dim=-1)
        n, positions, classes = logp.shape
        if fisher == "expected":
            probs = logp.detach().exp().double()
            labellings = [(-(weight[:, r] * logp[:, r, c]).sum(), probs[:, r, c])
                          for r in range(positions) for c in range(classes)]
        else:
            labels = observed
            if fisher == "sampled":
                flat = logp.detach().exp().double().reshape(-1, classes).cpu()
                labels = torch.multinomial(flat, 1, generator=generator).reshape(n, positions).to(x.device)
            labellings = [(-(weight * logp.gather(-1, labels[..., None])[..., 0]).sum(), ones)]
    result = []
    for loss, label_weight in labellings:
        with torch.enable_grad():
            deltas = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
        result.append([(a, _output_columns(layer, torch.zeros_like(out) if delta is None else delta), label_weight)
                       for layer, a, out, delta in zip(layers, activations, outs, deltas)])
    return result


def _captured(fm: FunctionalModel, layers: list[_Layer], x: torch.Tensor, y: torch.Tensor, fisher: FisherKind,
              generator: torch.Generator) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Each labelling's per-layer ``(a, delta, weight)`` for the Fisher of ``fm``'s family."""
    if fm.task.sequence_fisher:
        return _capture_tokens(fm, layers, x, fisher, generator)
    targets, weights = _labellings(fm, x, y, fisher, generator)
    return _capture(fm, layers, x, targets, weights)


def _labellings(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, fisher: FisherKind,
                generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ones = torch.ones(y.shape[0], dtype=torch.float64, device=y.device)
    if fisher == "empirical":
        return [y], [ones]
    with torch.no_grad():
        probs = torch.softmax(fm.logits(fm.theta, x), dim=1).double()
    if fisher == "sampled":
        drawn = torch.multinomial(probs.cpu(), 1, generator=generator).flatten().to(y.device)
        return [drawn], [ones]
    classes = probs.shape[1]
    return ([torch.full_like(y, c) for c in range(classes)], [probs[:, c] for c in range(classes)])


class EKFAC:
    """EK-FAC approximation of the curvature of ``fm``'s objective on ``(x, y)``.

    ``solve(V)`` returns ``(F_ekfac + (weight_decay + damping) I)^-1 V`` for ``V`` ``(p, k)``;
    ``quadratic_forms(x, y)`` returns ``g_i^T (...)^-1 g_i`` for every sample without materialising
    gradients of Linear layers.
    """

    def __init__(self, fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, *, damping: float,
                 fisher: FisherKind = "expected", chunk_size: int = 512, seed: int = 0, relative_damping: bool = False):
        self.fm, self.damping, self.seed, self.relative_damping = fm, damping, seed, relative_damping
        self.layers = _layers(fm)
        # Where the fit's time goes, for the solver cost model: the passes over the data scale
        # with n, the factor eigendecompositions do not.
        self.seconds_passes = 0.0
        self.seconds_eigh = 0.0
        started = time.perf_counter()
        self._fit(x, y, fisher, chunk_size)
        self.seconds_passes = time.perf_counter() - started - self.seconds_eigh

    def _fit(self, x: torch.Tensor, y: torch.Tensor, fisher: FisherKind, chunk_size: int) -> None:
        layers = self.layers
        a_cov = [torch.zeros(l.n_in, l.n_in, dtype=torch.float64, device=x.device) for l in layers]
        s_cov = [torch.zeros(l.out_features, l.out_features, dtype=torch.float64, device=x.device) for l in layers]
        n = x.shape[0]
        chunks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
        # the same seeded draws in both passes, so sampled labels agree between the factors and
        # the eigenvalue correction
        generator = torch.Generator().manual_seed(self.seed)
        for start, stop in chunks:
            captured = _captured(self.fm, layers, x[start:stop], y[start:stop], fisher, generator)
            for index in range(len(layers)):
                a = captured[0][index][0]
                a_cov[index] += torch.einsum("nil,njl->ij", a, a)
                for per_label in captured:
                    _, delta, weight = per_label[index]
                    # two-operand contractions: a three-operand einsum may form (n, out, out)
                    s_cov[index] += torch.einsum("nol,nql->oq", delta * weight[:, None, None], delta)
        started = time.perf_counter()
        for layer, a, s in zip(layers, a_cov, s_cov):
            layer.q_a = torch.linalg.eigh(a / n)[1]
            layer.q_s = torch.linalg.eigh(s / n)[1]
            layer.eigenvalues = torch.zeros(layer.out_features, layer.n_in, dtype=torch.float64, device=x.device)
        self.seconds_eigh = time.perf_counter() - started
        generator = torch.Generator().manual_seed(self.seed)
        for start, stop in chunks:
            rotated_inputs: dict[int, torch.Tensor] = {}  # (Q_A^T a)^2 per layer: label-independent
            for per_label in _captured(self.fm, layers, x[start:stop], y[start:stop], fisher, generator):
                for index, (layer, (a, delta, weight)) in enumerate(zip(layers, per_label)):
                    if a.shape[2] == 1:
                        # Linear: the rotated gradient is the outer product (Q_S^T delta)(Q_A^T a)^T, so
                        # its squares sum as one (out, n) x (n, in+1) product; no (n, out, in+1) tensor.
                        if index not in rotated_inputs:
                            rotated_inputs[index] = (a[:, :, 0] @ layer.q_a).pow(2)
                        sd = (delta[:, :, 0] @ layer.q_s).pow(2) * weight[:, None]
                        layer.eigenvalues += sd.T @ rotated_inputs[index]
                    else:
                        rotated = self._rotated_grads(layer, a, delta)
                        layer.eigenvalues += torch.einsum("n,noi->oi", weight, rotated.pow(2))
        for layer in layers:
            layer.eigenvalues /= n

    @staticmethod
    def _rotated_grads(layer: _Layer, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``Q_S^T DW_i Q_A`` for every sample: ``(n, out, in+1)``."""
        sa = torch.einsum("nil,ij->njl", a, layer.q_a)
        sd = torch.einsum("nol,oq->nql", delta, layer.q_s)
        return torch.einsum("nql,njl->nqj", sd, sa)

    @property
    def shift(self) -> float:
        return self.fm.weight_decay + self.damping

    def layer_shift(self, layer: _Layer) -> float:
        """What is added to the layer's eigenvalues: the L2 term plus ``damping``, or with
        ``relative_damping`` plus ``damping`` times the mean of the layer's corrected eigenvalues
        (Kronfluence's heuristic with ``damping`` 0.1; per layer, as the adapters' ``lora_A`` and
        ``lora_B`` curvatures differ by orders of magnitude)."""
        if self.relative_damping:
            return self.fm.weight_decay + self.damping * float(layer.eigenvalues.mean())
        return self.shift

    def _to_matrix(self, layer: _Layer, block: torch.Tensor) -> torch.Tensor:
        """Columns of ``block`` ``(p, k)`` -> ``(k, out, in+1)`` augmented matrices of this layer."""
        k = block.shape[1]
        weight = block[layer.weight_slice].T.reshape(k, layer.out_features, layer.in_features)
        if layer.bias_slice is None:
            return weight
        return torch.cat([weight, block[layer.bias_slice].T.reshape(k, layer.out_features, 1)], dim=2)

    def solve(self, block: torch.Tensor) -> torch.Tensor:
        """``(F + shift I)^-1 block`` for ``block`` ``(p, k)``; parameters outside the layers are
        impossible (construction refuses them)."""
        out = torch.zeros_like(block, dtype=torch.float64)
        for layer in self.layers:
            matrix = self._to_matrix(layer, block.double())
            rotated = layer.q_s.T @ matrix @ layer.q_a
            scaled = rotated / (layer.eigenvalues + self.layer_shift(layer))
            back = layer.q_s @ scaled @ layer.q_a.T  # (k, out, in+1)
            k = block.shape[1]
            out[layer.weight_slice] = back[:, :, : layer.in_features].reshape(k, -1).T
            if layer.bias_slice is not None:
                out[layer.bias_slice] = back[:, :, -1].T
        return out.to(block.dtype)

    def quadratic_forms(self, x: torch.Tensor, y: torch.Tensor, *, chunk_size: int = 512) -> torch.Tensor:
        """``g_i^T (F + shift I)^-1 g_i`` for the loss gradients of ``(x, y)``, shape ``(n,)``, float64.

        For a Linear layer ``Q_S^T delta a^T Q_A`` is an outer product, so its squares factor into
        ``(Q_S^T delta)^2 (Q_A^T a)^2^T`` and no per-sample gradient is formed.
        """
        totals = []
        ones = torch.ones(0)
        for start in range(0, x.shape[0], chunk_size):
            xb, yb = x[start : start + chunk_size], y[start : start + chunk_size]
            ones = torch.ones(xb.shape[0], dtype=torch.float64, device=x.device)
            [per_layer] = _capture(self.fm, self.layers, xb, [yb], [ones])
            total = torch.zeros(xb.shape[0], dtype=torch.float64, device=x.device)
            for layer, (a, delta, _) in zip(self.layers, per_layer):
                inverse = 1.0 / (layer.eigenvalues + self.layer_shift(layer))
                if a.shape[2] == 1:
                    sa = (a[:, :, 0] @ layer.q_a).pow(2)
                    sd = (delta[:, :, 0] @ layer.q_s).pow(2)
                    total += torch.einsum("no,oi,ni->n", sd, inverse, sa)
                else:
                    total += (self._rotated_grads(layer, a, delta).pow(2) * inverse).sum((1, 2))
            totals.append(total)
        del ones
        return torch.cat(totals) if totals else x.new_zeros(0, dtype=torch.float64)

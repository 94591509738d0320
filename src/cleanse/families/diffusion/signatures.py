"""DMin gradient signatures (Lin, Lao & Zhao, arXiv 2412.08637, section 3; spec part B 3.1).

For an image ``x0`` (class label ``y`` for a class-conditional model) and each selected timestep
``t_s`` with the shared noise ``eps_s`` (:mod:`.timesteps`):

    x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_s          (the scheduler's ``add_noise``)
    l_s   = mean over pixels of (eps_theta(x_t, t_s, y) - target)^2   (target = eps_s; the
            velocity for ``v_prediction`` schedulers)
    g_s   = d l_s / d theta                                   (flattened, shape (D,))
    ghat_s = g_s / ||g_s||_2                                  (per timestep, before any sketch)

``theta`` is every trainable parameter, or a named subset (the LoRA adapters: ``lora_`` in the
name). The uncompressed influence of training sample i on query q is the mean over s of
``<ghat_s(q), ghat_s(i)>`` (a mean of cosines, higher = more influential); no Hessian.

Per-sample gradients come from ``torch.func``: ``vmap(grad(loss))`` over the flattened
(sample, timestep) pairs of a chunk, with ``functional_call`` on the module, not one backward pass
per sample. The model must not couple samples of a batch (GroupNorm, not BatchNorm), which holds
for diffusers' UNets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from cleanse.errors import ConfigError
from cleanse.families.diffusion.sketch import Sketch


def parameter_names(model: nn.Module, which: str = "all") -> list[str]:
    """The names of the differentiated parameters: ``all`` (every parameter that requires a
    gradient) or ``adapters`` (the peft LoRA parameters, ``lora_`` in the name)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if which == "adapters":
        names = [name for name in names if "lora_" in name]
        if not names:
            raise ConfigError("signatures: parameters 'adapters' asked for, but the model has no LoRA adapters")
    elif which != "all":
        raise ConfigError(f"signatures: parameters {which!r} is not one of 'all', 'adapters'")
    return names


def noisy_inputs(scheduler: Any, images: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noised images and the regression targets of every (sample, timestep) pair, both shape
    ``(B, S, C, H, W)``, for ``images`` ``(B, C, H, W)`` in the model's scale ([-1, 1]), ``noise``
    ``(S, C, H, W)`` and ``timesteps`` ``(S,)``."""
    b, s = images.shape[0], timesteps.shape[0]
    x0 = images.unsqueeze(1).expand(b, s, *images.shape[1:]).reshape(b * s, *images.shape[1:])
    eps = noise.unsqueeze(0).expand(b, *noise.shape).reshape(b * s, *noise.shape[1:])
    t = timesteps.repeat(b)
    noisy = scheduler.add_noise(x0, eps, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = eps
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, eps, t)
    elif kind == "sample":
        target = x0
    else:
        raise ConfigError(f"signatures: prediction_type {kind!r} is not one of 'epsilon', 'v_prediction', 'sample'")
    return noisy.reshape(b, s, *images.shape[1:]), target.reshape(b, s, *images.shape[1:])


def _loss_fn(model: nn.Module, frozen: dict[str, torch.Tensor], conditional: bool) -> Any:
    """``(params, noisy (C,H,W), target, t (), label ()) -> scalar`` diffusion loss of one pair."""
    def loss(params: dict[str, torch.Tensor], noisy: torch.Tensor, target: torch.Tensor,
             t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        kwargs = {"class_labels": label.unsqueeze(0)} if conditional else {}
        out = torch.func.functional_call(model, {**frozen, **params}, (noisy.unsqueeze(0), t.unsqueeze(0)), kwargs)
        prediction = out.sample if hasattr(out, "sample") else out
        return ((prediction.squeeze(0) - target) ** 2).mean()
    return loss


def pair_gradients(model: nn.Module, noisy: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                   labels: torch.Tensor | None, names: Sequence[str], *, normalised: bool = False) -> torch.Tensor:
    """The raw (unnormalised) gradients of the per-pair diffusion loss with respect to the
    parameters ``names``, shape ``(P, D)`` for ``P`` pairs: ``noisy`` and ``target`` ``(P, C, H, W)``,
    ``timesteps`` ``(P,)``, ``labels`` ``(P,)`` or None (unconditional). ``D`` is the total size of
    the named parameters, flattened in the order of ``names``. One ``vmap(grad)`` call. With
    ``normalised`` each row is divided by its L2 norm (:func:`normalise`) as it is assembled."""
    return _flatten(_pair_parts(model, noisy, target, timesteps, labels, names), names, noisy.shape[0],
                    normalised=normalised)


def _pair_parts(model: nn.Module, noisy: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                labels: torch.Tensor | None, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """:func:`pair_gradients` before flattening: ``{name: (P, *shape)}``."""
    params = dict(model.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise ConfigError(f"signatures: the model has no parameter {missing[0]!r}")
    chosen = {name: params[name].detach() for name in names}
    frozen = {name: p.detach() for name, p in params.items() if name not in chosen}
    frozen.update({name: b for name, b in model.named_buffers()})
    conditional = labels is not None
    label = labels if labels is not None else torch.zeros(noisy.shape[0], dtype=torch.long, device=noisy.device)
    per_pair = torch.func.vmap(torch.func.grad(_loss_fn(model, frozen, conditional)),
                               in_dims=(None, 0, 0, 0, 0), randomness="error")
    # The fused CPU attention kernels have no vmap batching rule (torch falls back to a Python loop
    # over the batch); the math kernel is plain matmuls and softmax, which batch.
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        return dict(per_pair(chosen, noisy, target, timesteps, label))


def _row_scale(parts: Sequence[torch.Tensor], eps: float = 1e-30) -> torch.Tensor:
    """``(P, 1)``: one over the L2 norm of each row of the concatenated ``parts`` (each ``(P, d_k)``)."""
    squares = torch.stack([torch.linalg.vector_norm(part, dim=1) for part in parts]).square().sum(0)
    return squares.sqrt().clamp_min(eps).reciprocal().unsqueeze(1)


def _flatten(grads: dict[str, torch.Tensor], names: Sequence[str], pairs: int, *, normalised: bool,
             eps: float = 1e-30) -> torch.Tensor:
    """The per-parameter gradients ``grads[name]`` ``(P, *shape)`` as one ``(P, D)`` tensor in the
    order of ``names``, each row divided by its L2 norm when ``normalised``. One write of the
    output (the norm is read off the parts first), instead of a ``cat`` and then a divided copy:
    on CPU the copies of the ``(P, D)`` block cost as much as a third of the ``vmap`` itself."""
    parts = [grads[name].reshape(pairs, -1) for name in names]
    out = torch.empty(pairs, sum(part.shape[1] for part in parts), dtype=parts[0].dtype, device=parts[0].device)
    scale = _row_scale(parts, eps) if normalised else None
    offset = 0
    for name, part in zip(names, parts):
        width = part.shape[1]
        if scale is None:
            out[:, offset:offset + width].copy_(part)
        else:
            torch.mul(part, scale, out=out[:, offset:offset + width])
        offset += width
        del grads[name]  # frees each per-sample block once copied: the peak stays near one (P, D)
    return out


def normalise(gradients: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Each row of ``gradients`` ``(..., D)`` divided by its L2 norm (a zero row stays zero)."""
    return gradients / gradients.norm(dim=-1, keepdim=True).clamp_min(eps)


def signature_batches(model: nn.Module, scheduler: Any, images: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor, labels: torch.Tensor | None = None,
                      names: Sequence[str] | None = None, *, batch_size: int = 16,
                      normalised: bool = True) -> Iterator[torch.Tensor]:
    """The signatures of ``images`` ``(N, C, H, W)`` (model scale, [-1, 1]) a batch at a time:
    tensors ``(b, S, D)`` float32, row ``[i, s]`` the gradient at ``timesteps[s]`` with
    ``noise[s]``, L2-normalised per timestep when ``normalised`` (DMin; the unnormalised ones are
    the TracIn-style baseline). ``labels`` ``(N,)`` for a class-conditional model; ``names`` the
    differentiated parameters (default: all that require a gradient). The model is put in eval
    mode (no dropout); its parameters are not changed."""
    names = list(names) if names is not None else parameter_names(model)
    for b, s, parts in _part_batches(model, scheduler, images, noise, timesteps, labels, names, batch_size):
        yield _flatten(parts, names, b * s, normalised=normalised).reshape(b, s, -1)


def sketched_batches(model: nn.Module, scheduler: Any, images: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor, sketch: Sketch, labels: torch.Tensor | None = None,
                     names: Sequence[str] | None = None, *, batch_size: int = 16,
                     normalised: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """``sketch`` of :func:`signature_batches`, a batch at a time: ``{v: (b, S, v)}`` for every size
    of ``sketch`` (``sketch.dim`` must be D). The same numbers (up to float rounding) without the
    ``(b, S, D)`` signatures ever being written: each parameter's per-pair gradient is scattered
    into the sketch directly and the normalisation applied to the sketch (it is linear), which on
    CPU saves about a third of the cost of signing and sketching the assembled signatures."""
    names = list(names) if names is not None else parameter_names(model)
    for b, s, parts in _part_batches(model, scheduler, images, noise, timesteps, labels, names, batch_size):
        blocks = [parts[name].reshape(b * s, -1) for name in names]
        out = sketch.from_parts(blocks, _row_scale(blocks) if normalised else None)
        yield {v: sketched.reshape(b, s, v) for v, sketched in out.items()}


def _part_batches(model: nn.Module, scheduler: Any, images: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor, labels: torch.Tensor | None, names: list[str],
                  batch_size: int) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """``(b, S, {name: (b * S, *shape)})`` per batch of ``images``: the raw per-pair gradients, pairs
    sample-major (pair ``i * S + s``)."""
    if noise.shape[0] != timesteps.shape[0] or noise.shape[1:] != images.shape[1:]:
        raise ConfigError(f"signatures: noise of shape {tuple(noise.shape)} does not fit {timesteps.shape[0]} "
                          f"timesteps of images {tuple(images.shape[1:])}")
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise ConfigError(f"signatures: {labels.shape[0]} labels for {images.shape[0]} images")
    model.eval()
    device = next(model.parameters()).device  # the inputs follow the model (CPU or CUDA)
    timesteps = timesteps.to(device, torch.long)
    noise = noise.to(device, torch.float32)
    s = timesteps.shape[0]
    for start in range(0, images.shape[0], batch_size):
        x0 = images[start:start + batch_size].to(device, torch.float32)
        b = x0.shape[0]
        with torch.no_grad():
            noisy, target = noisy_inputs(scheduler, x0, noise, timesteps)
        flat = (b * s, *x0.shape[1:])
        pair_labels = None if labels is None else labels[start:start + b].to(device, torch.long).repeat_interleave(s)
        yield b, s, _pair_parts(model, noisy.reshape(flat), target.reshape(flat), timesteps.repeat(b), pair_labels, names)


def signatures(model: nn.Module, scheduler: Any, images: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor, labels: torch.Tensor | None = None,
               names: Sequence[str] | None = None, *, batch_size: int = 16, normalised: bool = True) -> torch.Tensor:
    """All of :func:`signature_batches` at once, shape ``(N, S, D)`` (small sets and queries)."""
    return torch.cat(list(signature_batches(model, scheduler, images, noise, timesteps, labels, names,
                                            batch_size=batch_size, normalised=normalised)), dim=0)


def influence(query: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """The uncompressed DMin influence of every training sample on every query, shape ``(Q, N)``:
    the mean over timesteps of ``<ghat_s(q), ghat_s(i)>`` for signatures ``query`` ``(Q, S, D)`` and
    ``train`` ``(N, S, D)``."""
    return torch.einsum("qsd,nsd->qn", query, train) / query.shape[1]

"""Batched ensembles: K small models trained at once, each on its own subset with its own seed.

The K models' parameters are stacked (``torch.func.stack_module_state``) and the forward pass is
``vmap(functional_call)`` over the stacked parameters, so one minibatch step of all K models is one
set of batched matmuls. Used by the Feldman & Zhang subsampled estimator (``memorization``: K
models on random 70% subsets) and by anything else that retrains a model many times on masked
data (with/without a unit, marginal-utility retrains).

Semantics are those of :func:`cleanse.models.trainer.train_model`, model by model: model ``k``
is initialised from ``seeds[k]``, sees only the rows where ``masks[k]`` is true (in their original
order), draws its minibatch order from ``torch.Generator().manual_seed(seeds[k])`` once per epoch,
and minimises ``the family's mean loss + weight_decay / 2 * ||theta||^2`` with the same Adam or
SGD(momentum 0.9) update (:class:`cleanse.models.engine.StackedOptimizer`). So
``train_ensemble(spec, X, y, masks, seeds, config)`` equals
``[train_model(spec, X[masks[k]], y[masks[k]], config, seed=seeds[k]) for k in range(K)]`` up to
floating-point rounding (tested). Models whose subsets have fewer minibatches than the largest sit
out the extra steps (no parameter, moment or step-count update), which keeps the per-model
semantics exact when subset sizes differ.

L-BFGS (a full-batch line-search method) has no batched counterpart here: it is rejected.

Shapes: ``masks`` ``(K, n)`` bool, ``seeds`` ``(K,)`` int, stacked parameters ``(K, *shape)``,
logits ``(K, m, n_classes)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from cleanse import families
from cleanse.config import ModelConfig
from cleanse.errors import DataError
from cleanse.models import engine
from cleanse.models.architectures import ModelSpec, build_model, default_device
from cleanse.models.trainer import seeded_model

Params = dict[str, torch.Tensor]

@dataclass
class Ensemble:
    """K trained models of one architecture: ``params[name]`` has shape ``(K, *shape)``."""

    spec: ModelSpec
    params: Params
    seeds: np.ndarray

    def __len__(self) -> int:
        return int(self.seeds.shape[0])

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Model ``k``'s ``state_dict`` (CPU tensors), loadable into ``build_model(spec)``."""
        return {name: value[k].detach().cpu().clone() for name, value in self.params.items()}

    def module(self, k: int) -> nn.Module:
        model = build_model(self.spec)
        model.load_state_dict(self.state(k))
        return model.eval()


def _check(masks: np.ndarray, seeds: np.ndarray, n: int, config: ModelConfig) -> None:
    engine.require_minibatch(config.optimizer, "batched ensembles")
    if masks.ndim != 2 or masks.shape[1] != n or masks.dtype != bool:
        raise DataError(f"ensemble masks must be a bool array of shape (K, {n}), got {masks.dtype} {masks.shape}")
    if seeds.shape != (masks.shape[0],):
        raise DataError(f"ensemble seeds must have shape ({masks.shape[0]},), got {seeds.shape}")
    empty = np.flatnonzero(masks.sum(1) == 0)
    if empty.size:
        raise DataError(f"ensemble models {empty[:5].tolist()} have empty training subsets")


def initial_params(spec: ModelSpec, seeds: np.ndarray, device: torch.device) -> tuple[Params, nn.Module]:
    """Stacked initial parameters (each model seeded as ``train_model`` seeds it) and a
    parameterless copy of the module for ``functional_call``."""
    modules = [seeded_model(spec, int(seed)) for seed in seeds]
    params, _ = stack_module_state(modules)
    base = copy.deepcopy(modules[0]).to("meta")
    return {name: value.detach().to(device) for name, value in params.items()}, base


def _batched_forward(base: nn.Module, shared_inputs: bool):
    def one(params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, params, (x,))

    return vmap(one, in_dims=(0, None if shared_inputs else 0))


def _epoch_order(members: list[np.ndarray], generators: list[torch.Generator], slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each model's shuffled member rows, padded to ``slots``: indices ``(K, slots)`` and validity."""
    sizes = {rows.size for rows in members}
    if len(sizes) == 1:  # every subset the same size (the usual case): one gather
        size = next(iter(sizes))
        orders = torch.stack([torch.randperm(size, generator=generator) for generator in generators])
        index = torch.zeros(len(members), slots, dtype=torch.long)
        index[:, :size] = torch.from_numpy(np.stack(members)).gather(1, orders)
        valid = torch.zeros(len(members), slots, dtype=torch.bool)
        valid[:, :size] = True
        return index, valid
    index = torch.zeros(len(members), slots, dtype=torch.long)
    valid = torch.zeros(len(members), slots, dtype=torch.bool)
    for k, (rows, generator) in enumerate(zip(members, generators)):
        order = torch.randperm(rows.size, generator=generator)
        index[k, : rows.size] = torch.from_numpy(rows)[order]
        valid[k, : rows.size] = True
    return index, valid


def train_ensemble(
    spec: ModelSpec,
    features: np.ndarray,
    label: np.ndarray,
    masks: np.ndarray,
    seeds: np.ndarray,
    config: ModelConfig,
    *,
    device: torch.device | None = None,
    init_seeds: np.ndarray | None = None,
    on_epoch: Callable[[int, Ensemble], bool | None] | None = None,
) -> Ensemble:
    """Train K models at once: model ``k`` on the rows ``masks[k]`` of ``features`` ``(n, *shape)``
    and ``label`` ``(n,)``, seeded by ``seeds[k]``, with ``config``'s recipe (see the module doc).
    ``init_seeds`` ``(K,)`` seeds the initialisation separately from the data order (default
    ``seeds``), e.g. one shared initialisation so that only the data order varies.

    ``on_epoch(epoch, ensemble)`` is called after every epoch (``epoch`` counts from 1) with the
    models as they are then (a detached view: read it, do not keep it past the call); returning
    True stops training there (early stopping), and the ensemble of that epoch is returned."""
    masks = np.asarray(masks)
    seeds = np.asarray(seeds, dtype=np.int64)
    n = int(label.shape[0])
    _check(masks, seeds, n, config)
    device = device or default_device()
    init_seeds = seeds if init_seeds is None else np.asarray(init_seeds, dtype=np.int64)
    if init_seeds.shape != seeds.shape:
        raise DataError(f"ensemble init_seeds must have shape {seeds.shape}, got {init_seeds.shape}")
    params, base = initial_params(spec, init_seeds, device)
    forward = _batched_forward(base, shared_inputs=False)
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    task = families.get(spec.family)
    y = torch.as_tensor(label, dtype=task.target_dtype, device=device)
    members = [np.flatnonzero(row) for row in masks]
    batch = config.batch_size
    steps = max(math.ceil(rows.size / batch) for rows in members)
    uneven = len({rows.size for rows in members}) > 1
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    optimizer = engine.StackedOptimizer(params, config.optimizer, config.lr)
    for p in params.values():
        p.requires_grad_(True)
    for epoch in range(1, config.epochs + 1):
        index, valid = _epoch_order(members, generators, steps * batch)
        index = index.view(len(members), steps, batch).to(device)
        valid = valid.view(len(members), steps, batch).to(device)
        for s in range(steps):
            rows, ok = index[:, s], valid[:, s]
            logits = forward(params, x[rows])  # (K, batch, C)
            ce = task.per_sample_loss(logits.flatten(0, 1), y[rows].flatten()).view(ok.shape)
            weight = ok / ok.sum(1, keepdim=True).clamp(min=1)
            # The sum over models of each model's own objective: the models share no parameters,
            # so its gradient is every model's own gradient at once.
            loss = (ce * weight).sum() + 0.5 * config.weight_decay * sum((p * p).sum() for p in params.values())
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
            optimizer.step(params, grads, ok.any(1) if uneven else None)
        if on_epoch is not None:
            current = Ensemble(spec=spec, params={name: p.detach() for name, p in params.items()}, seeds=seeds)
            if on_epoch(epoch, current):
                break
    return Ensemble(spec=spec, params={name: p.detach() for name, p in params.items()}, seeds=seeds)


@torch.no_grad()
def ensemble_logits(ensemble: Ensemble, features: np.ndarray, *, batch_size: int = 2048) -> torch.Tensor:
    """Every model's logits on every row: ``(K, m, n_classes)`` float32 on the ensemble's device."""
    params = ensemble.params
    device = next(iter(params.values())).device
    base = seeded_model(ensemble.spec, 0).to("meta")
    forward = _batched_forward(base, shared_inputs=True)
    out = []
    for start in range(0, features.shape[0], batch_size):
        xb = torch.as_tensor(features[start : start + batch_size], dtype=torch.float32, device=device)
        out.append(forward(params, xb))
    if not out:
        return torch.zeros(len(ensemble), 0, ensemble.spec.n_classes, device=device)
    return torch.cat(out, dim=1)


def correctness(logits: torch.Tensor, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From ``(K, m, C)`` logits and labels ``(m,)``: 0/1 correctness ``(K, m)`` bool and the
    softmax probability of the given label ``(K, m)`` float32."""
    y = torch.as_tensor(label, dtype=torch.long, device=logits.device)
    correct = logits.argmax(-1) == y
    prob = torch.softmax(logits.float(), dim=-1).gather(-1, y.expand(logits.shape[0], -1)[..., None])[..., 0]
    return correct.cpu().numpy(), prob.cpu().numpy().astype(np.float32)

"""Full-batch node classification: train on a split's train mask, stop early on its validation
accuracy, report test accuracy at the best validation epoch; mean +- sd over splits.

A model is anything with ``forward(x (N, F), edge_index (2, E)) -> (N, C)`` logits
(:func:`cleanse.graphs.baselines.build_model`); a ``regularizer()`` method, if present (the
AxelGNN-style prototypes), is added to the loss times ``TrainConfig.reg``. Labels and the train
mask can be overridden per call (noisy labels, nodes removed by cleansing), while validation and
test always read the clean ``graph.y``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as fn
from torch import nn

from cleanse.errors import ConfigError, TrainingDivergedError
from cleanse.graphs.data import NodeGraph


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 0.01
    weight_decay: float = 5e-4
    epochs: int = 300
    patience: int = 50  # epochs without a better validation accuracy before stopping
    reg: float = 0.01  # weight of model.regularizer(), when the model has one
    normalise_features: bool = True  # row-normalise x (bag-of-words rows sum to 1)
    seed: int = 0


@dataclass(frozen=True)
class SplitResult:
    split: int
    val_acc: float
    test_acc: float
    best_epoch: int
    epochs_run: int
    seconds: float


@dataclass(frozen=True)
class Summary:
    """Test accuracy over splits: ``mean``, ``sd`` (sample sd, ddof=1; 0 for one split)."""

    mean: float
    sd: float
    results: list[SplitResult] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} +- {100 * self.sd:.2f}"


def tensors(graph: NodeGraph, normalise: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` float32 (N, F) (row-normalised when asked; zero rows stay zero), ``y`` (N,),
    ``edge_index`` (2, E) as torch tensors."""
    x = torch.from_numpy(graph.x).float()
    if normalise:
        x = x / x.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return x, torch.from_numpy(graph.y).long(), torch.from_numpy(graph.edge_index).long()


def _accuracy(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    return float((logits[mask].argmax(dim=1) == y[mask]).float().mean()) if bool(mask.any()) else float("nan")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, edge_index: torch.Tensor,
               y: torch.Tensor, train: torch.Tensor, reg: float = 0.0) -> torch.Tensor:
    """One full-batch step on the nodes of ``train`` ((N,) bool or (k,) indices): mean
    cross-entropy of ``model(x, edge_index)`` on them against ``y`` (N,), plus ``reg *
    model.regularizer()`` when the model has one. Returns the objective (detached); a non-finite
    one is returned without stepping (the caller names the failure)."""
    model.train()
    optimizer.zero_grad()
    loss = fn.cross_entropy(model(x, edge_index)[train], y[train])
    regularizer = getattr(model, "regularizer", None)
    if callable(regularizer) and reg:
        loss = loss + reg * regularizer()
    if torch.isfinite(loss):
        loss.backward()
        optimizer.step()
    return loss.detach()


def fit_split(make_model: Callable[[], nn.Module], graph: NodeGraph, split: int,
              config: TrainConfig = TrainConfig(), labels: np.ndarray | None = None,
              train_mask: np.ndarray | None = None) -> tuple[SplitResult, nn.Module]:
    """Train a fresh ``make_model()`` on split ``split``; returns the result and the model with
    its best-validation weights. ``labels`` (N,) replaces ``graph.y`` on the training nodes only;
    ``train_mask`` (N,) bool replaces the split's train mask. Seeds torch from
    ``config.seed + split`` (initialisation and dropout)."""
    if not 0 <= split < graph.num_splits:
        raise ConfigError(f"split {split} out of range: {graph.name} has {graph.num_splits}")
    torch.manual_seed(config.seed + split)
    x, y, edge_index = tensors(graph, config.normalise_features)
    y_train = y if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    train = torch.from_numpy(graph.train_mask[split] if train_mask is None else np.asarray(train_mask, bool))
    val, test = torch.from_numpy(graph.val_mask[split]), torch.from_numpy(graph.test_mask[split])
    if not bool(train.any()):
        raise ConfigError(f"{graph.name} split {split}: empty training mask")
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best = (-1.0, float("nan"), 0)  # (val acc, test acc, epoch)
    best_state = copy.deepcopy(model.state_dict())
    began, epoch = time.perf_counter(), 0
    for epoch in range(1, config.epochs + 1):
        loss = train_step(model, opt, x, edge_index, y_train, train, config.reg)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"{graph.name} split {split}: non-finite loss at epoch {epoch}")
        model.eval()
        with torch.no_grad():
            logits = model(x, edge_index)
        val_acc = _accuracy(logits, y, val)
        if val_acc > best[0]:
            best = (val_acc, _accuracy(logits, y, test), epoch)
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best[2] >= config.patience:
            break
    model.load_state_dict(best_state)
    return SplitResult(split, best[0], best[1], best[2], epoch, time.perf_counter() - began), model


def evaluate_splits(make_model: Callable[[], nn.Module], graph: NodeGraph,
                    splits: list[int] | range | None = None, config: TrainConfig = TrainConfig()) -> Summary:
    """Mean +- sd of the test accuracy of :func:`fit_split` over ``splits`` (default: all)."""
    chosen = list(range(graph.num_splits) if splits is None else splits)
    results = [fit_split(make_model, graph, s, config)[0] for s in chosen]
    acc = np.array([r.test_acc for r in results])
    return Summary(float(acc.mean()), float(acc.std(ddof=1)) if acc.size > 1 else 0.0, results)

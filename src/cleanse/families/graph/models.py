"""The graph family's fitted model: a node classifier of :mod:`cleanse.graphs.baselines` trained
full-batch on the labelled training nodes, and :class:`NodeModel`, the view of it the estimators
differentiate.

:class:`NodeModel` maps a batch of **node indices** ``(B,)`` or ``(B, 1)`` (any dtype; the scoring
context's rows hold them) to those nodes' logits ``(B, C)``: one full-graph ``embed`` of every node
(``(N, d)``), the rows of the batch gathered, then the Linear ``head``. Per-node losses and their
gradients are therefore exact for the whole graph (each node's logit depends on its neighbours'
features through the message passing). It is the eval-mode function (dropout off); training runs
the underlying model on the whole graph (:func:`fit_nodes`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from cleanse.errors import ConfigError, TrainingDivergedError
from cleanse.graphs.axelgnn import AxelConfig, choose_norm_step
from cleanse.graphs.baselines import node_classifier
from cleanse.graphs.train import train_step
from cleanse.models.architectures import INIT_LOCK, ModelSpec
from cleanse.models.trainer import Checkpoint, TrainedModel, checkpoint_epochs


def axel_config(model: Any) -> AxelConfig:
    """The AxelGNN-style switches of a :class:`cleanse.families.graph.config.GraphModelConfig`
    (``norm_step: auto`` is resolved by :func:`fit_nodes_auto` before any net is built)."""
    if model.norm_step == "auto":
        raise ConfigError("model.norm_step: auto is a choice between two fits (fit_nodes_auto), not one net")
    return AxelConfig(segments=model.segments, gate=model.gate, trait_copy=model.trait_copy,
                      divergence=model.divergence, polarisation=model.polarisation, prototypes=model.prototypes,
                      fixed_time=model.fixed_time, shared=model.shared,
                      norm_step=model.norm_step)


def build_net(model: Any, in_dim: int, n_classes: int, num_nodes: int) -> nn.Module:
    """The untrained node classifier ``model`` (a GraphModelConfig) describes (``embed``/``head``)."""
    return node_classifier(model.arch, in_dim, model.hidden, n_classes, layers=model.layers, dropout=model.dropout,
                           num_nodes=num_nodes, axel=axel_config(model), heads=model.heads)


class NodeModel(nn.Module):
    """``forward(ids (B,) | (B, 1)) -> (B, C)``: ``net.head(net.embed(x, edge_index)[ids])``.
    ``x`` (N, F) and ``edge_index`` (2, E) are non-persistent buffers (not in the state dict)."""

    def __init__(self, net: nn.Module, x: torch.Tensor, edge_index: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("x", x, persistent=False)
        self.register_buffer("edge_index", edge_index, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        net: Any = self.net  # a node_classifier: embed(x, edge_index) and a Linear head
        hidden = net.embed(self.x, self.edge_index)
        out: torch.Tensor = net.head(hidden[ids.reshape(-1).long()])
        return out

    def logits(self) -> torch.Tensor:
        """Every node's logits ``(N, C)``."""
        out: torch.Tensor = self.net(self.x, self.edge_index)
        return out


@dataclass
class GraphModel(TrainedModel):
    """A fitted node classifier: ``state`` is :class:`NodeModel`'s state dict (the net's weights),
    ``recipe`` the GraphModelConfig as JSON, and the graph it runs on (``x``, ``edge_index``),
    which is not saved (:meth:`bind` attaches it from the staged meta). ``influence`` (the params'
    influence section) and ``influence_seed``: what the base model's training record measures
    (:meth:`cleanse.families.graph.family.GraphFamily.training_record`); not saved either.
    ``norm_step_choice``: for ``model.norm_step: auto``, the choice and both validation accuracies
    (:func:`fit_nodes_auto`; ``recipe`` holds the chosen ``norm_step``)."""

    recipe: dict[str, Any] = field(default_factory=dict)
    num_nodes: int = 0
    x: torch.Tensor | None = None
    edge_index: torch.Tensor | None = None
    influence: Any = None
    influence_seed: int = 0
    norm_step_choice: dict[str, Any] | None = None

    def bind(self, x: torch.Tensor, edge_index: torch.Tensor) -> GraphModel:
        self.x, self.edge_index = x, edge_index
        return self

    def module(self, device: torch.device | None = None) -> nn.Module:
        if self.x is None or self.edge_index is None:
            raise RuntimeError("GraphModel.module(): no graph bound (GraphModel.bind(x, edge_index))")
        from cleanse.families.graph.config import GraphModelConfig

        net = build_net(GraphModelConfig.model_validate(self.recipe), self.spec.feature_shape[0], self.spec.n_classes,
                        self.num_nodes)
        model = NodeModel(net, self.x, self.edge_index)
        model.load_state_dict(self.state)
        return model.to(device or torch.device("cpu")).eval()


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op torch thread inside (see :func:`fit_nodes`), the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


def fit_nodes(model_config: Any, x: torch.Tensor, edge_index: torch.Tensor, nodes: np.ndarray, labels: np.ndarray,
              n_classes: int, *, seed: int) -> GraphModel:
    """Train ``model_config`` (a GraphModelConfig) on the whole graph with the labels of ``nodes``
    (k,) only: ``epochs`` full-batch Adam steps (:func:`cleanse.graphs.train.train_step`), the
    initialisation and dropout drawn from ``seed`` (the global torch generator is forked, so
    nothing outside moves). Every other node stays in the graph, unlabelled. Checkpoints at
    ``checkpoints`` evenly spaced epochs (the last = the final model) with the learning rate."""
    if len(nodes) == 0:
        raise ConfigError("graph family: no labelled training node left to fit on")
    num_nodes = int(x.shape[0])
    y = torch.zeros(num_nodes, dtype=torch.long)
    idx = torch.as_tensor(np.asarray(nodes), dtype=torch.long)
    y[idx] = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    save_at = set(checkpoint_epochs(model_config.epochs, model_config.checkpoints, "even"))
    checkpoints: list[Checkpoint] = []
    history: list[dict[str, float]] = []
    # INIT_LOCK: dropout draws from the process-wide generator, so a concurrent thread (Prefect's
    # task runner) must not draw from it between the seeding and the end of training. One intra-op
    # thread: full-batch graph training is many small ops, and on the shared 2-core machine two
    # threads made 100 Texas epochs take 98 s instead of 4 s (same weights).
    with INIT_LOCK, torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(seed)
        model = NodeModel(build_net(model_config, int(x.shape[1]), n_classes, num_nodes), x, edge_index)
        optimizer = torch.optim.Adam(model.parameters(), lr=model_config.lr, weight_decay=model_config.weight_decay)
        for epoch in range(1, model_config.epochs + 1):
            loss = float(train_step(model.net, optimizer, x, edge_index, y, idx, model_config.reg))
            if not np.isfinite(loss):
                raise TrainingDivergedError(f"training diverged: loss {loss} at epoch {epoch} (model.lr="
                                            f"{model_config.lr:g}); lower model.lr")
            history.append({"epoch": epoch, "train_loss": loss})
            if epoch in save_at:
                checkpoints.append(Checkpoint(epoch, model_config.lr, _snapshot(model)))
    model.eval()
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(model.logits()[idx], y[idx]))
    spec = ModelSpec(arch=model_config.arch, feature_shape=(int(x.shape[1]),), n_classes=n_classes,
                     hidden=(model_config.hidden,), family="graph")
    return GraphModel(spec=spec, state=_snapshot(model), checkpoints=checkpoints, final_train_loss=final,
                      history=history, recipe=model_config.model_dump(mode="json"), num_nodes=num_nodes,
                      x=x, edge_index=edge_index)


@torch.no_grad()
def predicted_labels(model: GraphModel) -> np.ndarray:
    """``model``'s eval-mode argmax class of every node (N,) of the graph it is bound to."""
    return cast(NodeModel, model.module()).logits().argmax(1).numpy()


def node_accuracy(model: GraphModel, nodes: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of ``model``'s eval-mode argmax on ``nodes`` (k,) against ``labels`` (k,)."""
    return float(np.mean(predicted_labels(model)[np.asarray(nodes, dtype=np.int64)] == np.asarray(labels)))


def fit_nodes_auto(model_config: Any, x: torch.Tensor, edge_index: torch.Tensor, nodes: np.ndarray,
                   labels: np.ndarray, n_classes: int, *, seed: int, val_nodes: np.ndarray,
                   val_labels: np.ndarray) -> GraphModel:
    """``model.norm_step: auto``: :func:`fit_nodes` twice with the same ``seed`` (so the only
    difference is the switch), ``norm_step`` off and on, and the one with the higher accuracy on
    the validation nodes ``val_nodes`` (k,) / ``val_labels`` (k,) kept
    (:func:`cleanse.graphs.axelgnn.choose_norm_step`, a tie keeps it off): bit for bit the model a
    fixed ``norm_step`` of that value gives. Nothing but the validation labels is read to choose.
    The kept model records ``norm_step_choice = {"norm_step": bool, "val_accuracy": {"off", "on"}}``."""
    fits = {flag: fit_nodes(model_config.model_copy(update={"norm_step": flag}), x, edge_index, nodes, labels,
                            n_classes, seed=seed) for flag in (False, True)}
    accuracy = {flag: node_accuracy(model, val_nodes, val_labels) for flag, model in fits.items()}
    chosen = choose_norm_step(accuracy[False], accuracy[True])
    model = fits[chosen]
    model.norm_step_choice = {"norm_step": chosen, "val_accuracy": {"off": accuracy[False], "on": accuracy[True]}}
    return model

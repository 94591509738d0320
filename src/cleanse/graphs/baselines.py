"""Node-level models behind one builder: the AxelGNN-style model, torch-geometric's GCN, GAT,
GraphSAGE, GCNII and LINKX, and an MLP.

Every model is ``forward(x (N, F) float, edge_index (2, E) int64) -> (N, out)`` logits, with
``edge_index`` symmetric and without self-loops (:mod:`cleanse.graphs.data`; the PyG convolutions
add their own loops). Heterophily-aware baselines: GCNII (Chen et al., ICML 2020: initial
residual + identity mapping) and LINKX (Lim et al., NeurIPS 2021: separate MLPs on features and
adjacency rows). torch-geometric is imported only when a PyG model is built; without it the
builder fails in one line naming the ``graph`` extra. ``axelgnn`` and ``mlp`` need only torch.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as fn
from torch import nn

from cleanse.errors import ConfigError
from cleanse.graphs.axelgnn import AxelConfig, AxelGNN

MODELS = ("axelgnn", "gcn", "gat", "sage", "gcn2", "linkx", "mlp")


def require(module: str) -> Any:
    """``module`` imported, or a one-line error naming the ``graph`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"graph models need {module.split('.')[0]}: pip install 'cleanse[graph]'") from None


class MLP(nn.Module):
    """``layers`` Linear maps with ReLU and dropout between them (not on the input: see
    :meth:`cleanse.graphs.axelgnn.AxelGNN.embed`); ignores the graph."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2, dropout: float = 0.5) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.lins = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor | None = None) -> torch.Tensor:
        for k, lin in enumerate(self.lins):
            x = lin(x if k == 0 else fn.dropout(x, self.dropout, self.training))
            if k < len(self.lins) - 1:
                x = torch.relu(x)
        return x

    def embed(self, x: torch.Tensor, edge_index: torch.Tensor | None = None) -> torch.Tensor:
        """The input of the last Linear map (before its dropout): ``forward`` in eval mode is
        ``head(embed(x))``."""
        for k, lin in enumerate(self.lins[:-1]):
            x = torch.relu(lin(x if k == 0 else fn.dropout(x, self.dropout, self.training)))
        return x

    @property
    def head(self) -> nn.Module:
        return self.lins[-1]


class GCNII(nn.Module):
    """Linear encoder -> ``layers`` PyG ``GCN2Conv`` (alpha, theta as in the paper) -> Linear."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2, dropout: float = 0.5,
                 alpha: float = 0.1, theta: float = 0.5) -> None:
        super().__init__()
        pyg_nn = require("torch_geometric.nn")
        self.encode = nn.Linear(in_dim, hidden)
        self.convs = nn.ModuleList(pyg_nn.GCN2Conv(hidden, alpha=alpha, theta=theta, layer=k + 1)
                                   for k in range(layers))
        self.head = nn.Linear(hidden, out_dim)
        self.dropout = dropout

    def embed(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h0 = h = fn.dropout(torch.relu(self.encode(x)), self.dropout, self.training)
        for conv in self.convs:
            h = torch.relu(conv(fn.dropout(h, self.dropout, self.training), h0, edge_index))
        return h

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.head(fn.dropout(self.embed(x, edge_index), self.dropout, self.training))


class _EdgeArg(nn.Module):
    """Adapts a PyG ``BasicGNN``/``LINKX`` (``forward(x, edge_index)``) without changing it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x, edge_index)
        return out


def build_model(kind: str, in_dim: int, hidden: int, out_dim: int, layers: int = 2,
                dropout: float = 0.5, num_nodes: int | None = None,
                axel: AxelConfig | None = None, heads: int = 4) -> nn.Module:
    """The model ``kind`` (one of :data:`MODELS`) with ``layers`` message-passing layers of width
    ``hidden``. ``num_nodes`` is required by LINKX (it embeds adjacency rows); ``axel`` configures
    the AxelGNN-style layers; ``heads`` the GAT attention heads (hidden width split across them)."""
    if kind == "axelgnn":
        return AxelGNN(in_dim, hidden, out_dim, layers=layers, config=axel, dropout=dropout)
    if kind == "mlp":
        return MLP(in_dim, hidden, out_dim, layers=layers, dropout=dropout)
    if kind == "gcn2":
        return GCNII(in_dim, hidden, out_dim, layers=layers, dropout=dropout)
    if kind not in MODELS:
        raise ConfigError(f"unknown graph model {kind!r}; known: {', '.join(MODELS)}")
    models = require("torch_geometric.nn.models")
    if kind == "gcn":
        return _EdgeArg(models.GCN(in_dim, hidden, layers, out_dim, dropout=dropout))
    if kind == "gat":
        if hidden % heads:
            raise ConfigError(f"gat: hidden={hidden} must be divisible by heads={heads}")
        return _EdgeArg(models.GAT(in_dim, hidden, layers, out_dim, dropout=dropout, heads=heads))
    if kind == "sage":
        return _EdgeArg(models.GraphSAGE(in_dim, hidden, layers, out_dim, dropout=dropout))
    if num_nodes is None:
        raise ConfigError("linkx needs num_nodes")
    return _EdgeArg(models.LINKX(num_nodes, in_dim, hidden, out_dim, layers, dropout=dropout))


class ReadOut(nn.Module):
    """``body`` (a model ending in ``hidden`` features), then ReLU, dropout and a Linear ``head``:
    gives the PyG models (whose last layer is a convolution) the ``embed``/``head`` split that
    :func:`node_classifier` promises."""

    def __init__(self, body: nn.Module, hidden: int, out_dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.body, self.head, self.dropout = body, nn.Linear(hidden, out_dim), dropout

    def embed(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x, edge_index))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.head(fn.dropout(self.embed(x, edge_index), self.dropout, self.training))


def node_classifier(kind: str, in_dim: int, hidden: int, out_dim: int, layers: int = 2,
                    dropout: float = 0.5, num_nodes: int | None = None,
                    axel: AxelConfig | None = None, heads: int = 4) -> nn.Module:
    """:func:`build_model`, always with a Linear last layer: ``model.embed(x, edge_index)`` (N, d)
    and ``model.head`` (d -> out) such that ``forward`` in eval mode is ``head(embed(...))``. The
    AxelGNN-style model, the MLP (``layers >= 2``) and GCNII have one already; GCN, GAT, GraphSAGE
    and LINKX get :class:`ReadOut` after ``layers`` layers of width ``hidden`` (one extra Linear
    map). The graph family's per-node scores differentiate that head (last-layer gradients)."""
    if kind in ("axelgnn", "gcn2") or (kind == "mlp" and layers >= 2):
        return build_model(kind, in_dim, hidden, out_dim, layers, dropout, num_nodes, axel, heads)
    if kind == "mlp":
        raise ConfigError("mlp: node_classifier needs layers >= 2 (one hidden layer before the head)")
    body = build_model(kind, in_dim, hidden, hidden, layers, dropout, num_nodes, axel, heads)
    return ReadOut(body, hidden, out_dim, dropout)

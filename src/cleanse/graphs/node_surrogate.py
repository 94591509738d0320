"""Node GNNs as spread surrogates: a seed set in, every node's activation probability out.

A surrogate is one of :func:`cleanse.graphs.baselines.build_model`'s node models (AxelGNN-style,
GCN, ...) with three input features per node and one output: the seed indicator ``s_v``,
``log(1 + deg(v)) / 5`` and ``1 / deg(v)`` (no graph-specific scaling, so a model trained on one
graph runs on another). Its sigmoid is the activation probability of a non-seed node; seeds are
active with probability exactly 1. It is trained by binary cross-entropy against Monte Carlo
activation probabilities of the non-seed nodes (DeepIM's and the AxelGNN paper's setting:
Hevapathige, arXiv 2509.19084, spec part B 5; Ling et al., ICML 2023). A minibatch of ``B`` seed
sets runs as one forward over ``B`` disjoint copies of the graph.

Shapes: seed sets bool ``(B, N)``, probabilities float32 ``(B, N)``, ``edge_index`` int64 ``(2, E)``
(symmetric, row 0 the message source). :func:`held_out_report` is the graph family's influence
section: random seed sets per seed rate, labelled by :func:`cleanse.graphs.cascades.simulate`
with the weighted cascade (``w_uv = 1 / in_degree(v)``), the surrogate fitted on some and scored
on the others.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as fn
from torch import nn

from cleanse.graphs.cascades import simulate, weighted_cascade


def node_inputs(edge_index: np.ndarray, num_nodes: int) -> np.ndarray:
    """Per-node inputs besides the seed indicator: ``log(1 + degree) / 5`` and ``1 / degree``, (N, 2) float32."""
    deg = np.bincount(edge_index[1], minlength=num_nodes).astype(np.float32)
    return np.stack([np.log1p(deg) / 5.0, 1.0 / np.maximum(deg, 1.0)], axis=1)


def _union(edge_index: np.ndarray, num_nodes: int, copies: int) -> torch.Tensor:
    """``copies`` disjoint copies of the graph (one per seed set of a minibatch): (2, copies * E)."""
    offsets = np.repeat(np.arange(copies) * num_nodes, edge_index.shape[1])
    return torch.from_numpy(np.tile(edge_index, copies) + offsets).long()


def _features(seeds: np.ndarray, inputs: np.ndarray) -> torch.Tensor:
    """(B * N, 3) float32: each copy's seed indicator beside the node inputs."""
    b, n = seeds.shape
    return torch.from_numpy(np.concatenate([seeds[:, :, None].astype(np.float32),
                                            np.broadcast_to(inputs, (b, n, 2))], axis=2).reshape(-1, 3))


def predict(model: nn.Module, seeds: np.ndarray, edge_index: np.ndarray, batch: int = 16) -> np.ndarray:
    """Activation probabilities (B, N) float32 on the graph ``edge_index``: the sigmoid, seeds exactly 1."""
    b, n = seeds.shape
    inputs = node_inputs(edge_index, n)
    out = np.zeros((b, n), dtype=np.float32)
    model.eval()
    with torch.no_grad():
        for start in range(0, b, batch):
            s = seeds[start:start + batch]
            p = torch.sigmoid(model(_features(s, inputs), _union(edge_index, n, len(s)))).view(len(s), n).numpy()
            out[start:start + len(s)] = np.where(s, 1.0, p)
    return out


def fit(kind: str, seeds: np.ndarray, labels: np.ndarray, edge_index: np.ndarray, *, hidden: int, layers: int,
        epochs: int, batch: int, lr: float, seed: int) -> tuple[nn.Module, float]:
    """The node model ``kind`` trained for ``epochs`` passes of Adam over minibatches of ``batch``
    seed sets, by binary cross-entropy against ``labels`` (B, N) on the non-seed nodes (seeds are
    known to be active). Initialisation and order drawn from ``seed``; returns the model and the
    fitting seconds."""
    from cleanse.graphs.baselines import build_model

    torch.manual_seed(seed)
    n = seeds.shape[1]
    inputs = node_inputs(edge_index, n)
    model = build_model(kind, 3, hidden, 1, layers=layers, dropout=0.0, num_nodes=n)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = np.random.default_rng(seed)
    began = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in np.array_split(gen.permutation(len(seeds)), max(1, len(seeds) // batch)):
            s = seeds[idx]
            logit = model(_features(s, inputs), _union(edge_index, n, len(idx))).view(-1)
            free = torch.from_numpy(~s.reshape(-1))
            loss = fn.binary_cross_entropy_with_logits(logit[free], torch.from_numpy(labels[idx].reshape(-1))[free])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, time.perf_counter() - began


def errors(pred: np.ndarray, seeds: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Per-node MAE over all nodes (``mae``; seeds count, exact) and over non-seed nodes; the total
    spread's mean absolute error (``spread_abs``, nodes) and mean relative error (``spread_rel``:
    ``mean |sum pred - sum truth| / sum truth``); the mean true spread."""
    spread, true_spread = pred.sum(1), truth.sum(1)
    return {"mae": float(np.abs(pred - truth).mean()), "mae_nonseed": float(np.abs(pred - truth)[~seeds].mean()),
            "spread_abs": float(np.abs(spread - true_spread).mean()),
            "spread_rel": float(np.mean(np.abs(spread - true_spread) / true_spread)),
            "true_spread": float(true_spread.mean())}


def random_seed_sets(num_nodes: int, rate: float, count: int, gen: np.random.Generator) -> np.ndarray:
    """``count`` seed sets of ``round(rate * num_nodes)`` distinct nodes each (at least one, and at
    least one node left out), uniform: bool (count, N)."""
    size = min(max(1, int(round(rate * num_nodes))), num_nodes - 1)
    seeds = np.zeros((count, num_nodes), dtype=bool)
    for row in seeds:
        row[gen.choice(num_nodes, size=size, replace=False)] = True
    return seeds


def label_noise(truth: np.ndarray, seeds: np.ndarray, runs: int) -> float:
    """The MAE a perfect surrogate would still show against ``runs``-run Monte Carlo labels (plug-in:
    ``sqrt(2 / pi) * sqrt(p (1 - p) / runs)`` per non-seed entry, the normal approximation), averaged
    over all entries like ``mae``."""
    p = np.clip(truth, 0.0, 1.0)
    return float(np.where(seeds, 0.0, np.sqrt(2.0 / np.pi * p * (1.0 - p) / runs)).mean())


def held_out_report(edge_index: np.ndarray, num_nodes: int, settings: Any, seed: int) -> dict[str, Any]:
    """``settings`` (a :class:`cleanse.families.graph.config.GraphInfluenceConfig`): for every seed
    rate, ``train_sets`` + ``test_sets`` random seed sets, labelled by ``simulate(settings.diffusion,
    ...)`` (``mc_runs`` runs for training, ``test_runs`` for the held-out sets); the surrogate
    ``settings.arch`` fitted on the training sets of every rate together and scored on the held-out
    ones. Returns ``mae`` (per node, all held-out sets), ``spread_error`` (mean relative error of the
    total spread), the same per rate, the seeds-only floor (1 on seeds, 0 elsewhere), the labels'
    own Monte Carlo noise (:func:`label_noise`) and the seconds spent."""
    gen = np.random.default_rng(seed)
    weights = weighted_cascade(edge_index, num_nodes)

    def labelled(rate: float, count: int, runs: int) -> tuple[np.ndarray, np.ndarray]:
        seeds = random_seed_sets(num_nodes, rate, count, gen)
        return seeds, simulate(settings.diffusion, edge_index, weights, seeds, n_runs=runs,
                               seed=int(gen.integers(2**31)), num_nodes=num_nodes,
                               threshold=settings.threshold).astype(np.float32)

    began = time.perf_counter()
    train = [labelled(rate, settings.train_sets, settings.mc_runs) for rate in settings.seed_rates]
    test = [labelled(rate, settings.test_sets, settings.test_runs) for rate in settings.seed_rates]
    label_seconds = time.perf_counter() - began
    model, fit_seconds = fit(settings.arch, np.concatenate([s for s, _ in train]), np.concatenate([a for _, a in train]),
                             edge_index, hidden=settings.hidden, layers=settings.layers, epochs=settings.epochs,
                             batch=settings.batch, lr=settings.lr, seed=seed)
    seeds = np.concatenate([s for s, _ in test])
    truth = np.concatenate([a for _, a in test])
    pred = predict(model, seeds, edge_index, settings.batch)
    overall = errors(pred, seeds, truth)
    per_rate = {}
    for rate, (s, a) in zip(settings.seed_rates, test, strict=True):
        e = errors(predict(model, s, edge_index, settings.batch), s, a)
        per_rate[f"{rate:g}"] = {"mae": e["mae"], "spread_error": e["spread_rel"], "true_spread": e["true_spread"]}
    floor = errors(seeds.astype(np.float32), seeds, truth)
    return {"mae": overall["mae"], "spread_error": overall["spread_rel"], "mae_nonseed": overall["mae_nonseed"],
            "spread_abs": overall["spread_abs"], "true_spread": overall["true_spread"], "per_rate": per_rate,
            "floor": {"mae": floor["mae"], "spread_error": floor["spread_rel"]},
            "label_noise_mae": label_noise(truth, seeds, settings.test_runs),
            "diffusion": settings.diffusion, "arch": settings.arch, "train_sets": len(train) * settings.train_sets,
            "test_sets": int(seeds.shape[0]), "label_seconds": label_seconds, "fit_seconds": fit_seconds}

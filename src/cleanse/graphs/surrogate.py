"""A differentiable spread surrogate whose inputs include continuous edge weights (DiffIM's first
scheme, Lee et al., AAAI 2025, arXiv 2502.01031; spec part B §4.2-4.3, reconstructed).

``SpreadSurrogate(edge_index, base_weights, num_nodes)`` maps seed indicators ``s`` float (B, N)
and keep-weights ``x`` float (B, E) in [0, 1] (edge ``e`` acts with weight ``w_e = p_e x_e``; ``x =
1`` is the graph itself, ``x_e = 0`` removes ``e``) to per-node activation probabilities ``pi``
(B, N) in [0, 1], seeds exactly 1; the spread estimate is ``pi.sum(-1)``. It is differentiable in
``x``, so ``d spread / d x_e`` ranks edges (one-shot selection) and ``x`` can be optimised
(continuous relaxation).

Every step starts from the mean-field noisy-or update ``q_v = 1 - prod_u (1 - w_uv pi_u)`` (exact on
trees for IC, an overestimate on graphs with cycles) and learns a correction on the logit scale. A
node without inflow (``sum_u w_uv pi_u = 0``) stays at 0: no correction can activate it, so after
``layers`` steps only nodes within ``layers`` hops of a seed are non-zero, and the monstor kind can
run on that neighbourhood alone with the same result (:meth:`SpreadSurrogate.neighbourhood`).

- ``kind="axel"`` (AxelGNN-style, Hevapathige, arXiv 2509.19084, as the spec reconstructs it): a
  hidden state per node split into segments; message ``m_v^f = sum_u w_uv g_uv^f h_u^f`` where the
  **edge weight multiplies each message** and ``g_uv^f = sigmoid((cos(h_u^f, h_v^f) - tau) / T)`` is
  the similarity gate per segment (trait); update ``h_v <- LayerNorm(h_v + MLP([h_v, m_v, q_v, pi_v]))``.
- ``kind="monstor"`` (MONSTOR-style, Ko et al., 2020): no hidden state; one shared MLP maps
  ``[pi_v, s_v, q_v, sum_u w_uv pi_u, weighted degrees]`` to the next estimate, applied ``layers`` times.

Training (:func:`fit_surrogate`) uses perturbed instances (:func:`make_instances`): random seed sets
and the target one, random edge removals and continuous down-weightings near the seeds, labelled by
the batched Monte Carlo of :mod:`cleanse.graphs.cascades` (the spec's pitfall: the surrogate must be
right on the graphs the optimiser visits, not only on the original).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as fn
from torch import nn

from cleanse.errors import ConfigError, TrainingDivergedError
from cleanse.graphs.cascades import simulate

NOISY_OR_EPS = 1e-6
_EPS = NOISY_OR_EPS


def _sigmoid(z: torch.Tensor) -> torch.Tensor:
    """``sigmoid(z)`` as ``exp(logsigmoid(z))``: its gradient is then ``sigmoid(z) * sigmoid(-z)`` with
    ``sigmoid(-z)`` from ``exp(-|z|)`` (torch's logsigmoid backward), so a saturated node (``pi = 1 -
    1e-6``) keeps its digits in float32 instead of the 6% error of autograd's ``y (1 - y)`` (one float32
    step below 1 is 6e-8). Two ops, where a ``where`` over both branches took six."""
    return torch.exp(fn.logsigmoid(z))


def _seed_row(seeds: np.ndarray, n: int) -> torch.Tensor:
    """Seed indicators (1, n) float32 from seed ids (built in numpy: torch's zeros and index_put cost
    more than the rest of the neighbourhood search on small graphs)."""
    s = np.zeros((1, n), dtype=np.float32)
    s[0, np.asarray(seeds, dtype=np.int64)] = 1.0
    return torch.from_numpy(s)


@dataclass(frozen=True)
class _Adjacency:
    """Edge ids grouped by one end: the edges of node ``v`` are ``order[start[v]:start[v + 1]]``, in graph
    order (CSR without values); ``in_order``: the edges are already grouped so (``order`` is the identity,
    as for sources in the stored graphs), so the edges of ascending nodes come out ascending."""

    order: np.ndarray
    start: np.ndarray
    in_order: bool

    @classmethod
    def of(cls, ends: np.ndarray, num_nodes: int) -> _Adjacency:
        start = np.zeros(num_nodes + 1, dtype=np.int64)
        np.cumsum(np.bincount(ends, minlength=num_nodes), out=start[1:])
        in_order = bool((ends[1:] >= ends[:-1]).all())
        return cls(np.arange(ends.size) if in_order else np.argsort(ends, kind="stable"), start, in_order)

    def edges(self, nodes: np.ndarray) -> np.ndarray:
        """The ids of every edge at ``nodes`` (distinct), node by node in the order of ``nodes``, graph order
        within a node (ascending overall when ``in_order`` and ``nodes`` ascend)."""
        first = self.start.take(nodes)
        count = self.start.take(nodes + 1) - first
        # position i of the output is first[node of i] + (i - offset of that node's block)
        position = np.repeat(first - np.cumsum(count) + count, count)
        position += np.arange(position.size)
        return position if self.in_order else self.order.take(position)


@dataclass(frozen=True)
class Neighbourhood:
    """What :meth:`SpreadSurrogate.neighbourhood` keeps: ``nodes`` (n,) global ids, ascending;
    ``edges`` (m,) long global edge ids, ordered by their source's hop distance from the seeds (graph
    order within a hop); ``src``/``dst`` (m,) their local node ids; ``p`` (m,) their base weights;
    ``seeds`` (1, n) float seed indicators; ``num_edges`` E of the whole graph; ``flowing`` (layers,):
    layer ``k`` (from 0) can carry flow only on the first ``flowing[k]`` edges (sources within ``k`` hops
    of a seed; every other source has ``pi = 0`` there, whatever the keep-weights)."""

    nodes: np.ndarray
    edges: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    p: torch.Tensor
    seeds: torch.Tensor
    num_edges: int
    flowing: tuple[int, ...]


@dataclass(frozen=True)
class SurrogateConfig:
    kind: str = "axel"  # "axel" | "monstor"
    hidden: int = 32
    segments: int = 4
    layers: int = 4
    epochs: int = 60
    batch: int = 8
    lr: float = 0.01
    seed: int = 0


class SpreadSurrogate(nn.Module):
    """See the module docstring; ``forward(s (B, N), x (B, E)) -> pi (B, N)``."""

    def __init__(self, edge_index: np.ndarray, base_weights: np.ndarray, num_nodes: int,
                 config: SurrogateConfig = SurrogateConfig()) -> None:
        super().__init__()
        if config.kind not in ("axel", "monstor"):
            raise ConfigError(f"surrogate kind must be axel or monstor, got {config.kind!r}")
        if config.hidden % config.segments:
            raise ConfigError(f"segments={config.segments} must divide hidden={config.hidden}")
        self.config, self.num_nodes = config, int(num_nodes)
        self.src: torch.Tensor
        self.dst: torch.Tensor
        self.p: torch.Tensor
        self.register_buffer("src", torch.as_tensor(edge_index[0], dtype=torch.long))
        self.register_buffer("dst", torch.as_tensor(edge_index[1], dtype=torch.long))
        self.register_buffer("p", torch.as_tensor(base_weights, dtype=torch.float32))
        self._src_np = np.ascontiguousarray(edge_index[0], dtype=np.int64)  # contiguous: the compiled search's type
        self._dst_np = np.ascontiguousarray(edge_index[1], dtype=np.int64)
        self._p_np = self.p.numpy()
        # edge ids grouped by source and by target (graph structure only, not the seeds): the neighbourhood
        # search walks out from the seeds over these instead of scanning every edge once per hop
        self._out = _Adjacency.of(self._src_np, self.num_nodes)
        self._in = _Adjacency.of(self._dst_np, self.num_nodes)
        h = config.hidden
        if config.kind == "axel":
            self.encode = nn.Linear(3, h)
            self.steps = nn.ModuleList(nn.Sequential(nn.Linear(2 * h + 2, h), nn.ReLU(), nn.Linear(h, h))
                                       for _ in range(config.layers))
            self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(config.layers))
            self.tau = nn.Parameter(torch.zeros(config.layers))
            self.log_temp = nn.Parameter(torch.full((config.layers,), math.log(0.5)))
            self.heads = nn.ModuleList(nn.Linear(h, 1) for _ in range(config.layers))
        else:
            self.step = nn.Sequential(nn.Linear(6, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
            from cleanse.graphs.monstor_pass import warm_kernel  # here, not at the top: it imports this module

            warm_kernel()  # the compiled pass's one-off compile or cache load, here rather than in a timed selection

    @staticmethod
    def _scatter(values: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
        """Sum edge values (B, E, ...) into their targets ``dst`` (E,): (B, n, ...)."""
        out = values.new_zeros((values.shape[0], n, *values.shape[2:]))
        return out.index_add_(1, dst, values)

    def _noisy_or(self, w: torch.Tensor, pi: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q_v = 1 - prod_u (1 - w_uv pi_u)``, its logit and ``a_v = sum_u w_uv pi_u``, each (B, N).

        Each factor is ``1 - (1 - eps) w_uv pi_u``: a scale, not a clamp, so that ``d q / d x_e`` is not 0
        at ``w_e pi_u = 1`` (a p = 1 edge out of a seed; a clamp made exactly those edges invisible to the
        one-shot gradient). The logit is ``log q - log(1 - q)`` from the summed logs, so it is not
        clamped at ``1 - eps`` either: one saturated in-edge gives ``logit(1 - eps)`` with a gradient of
        ``1 / eps`` that the sigmoid's ``eps`` cancels, two give a gradient of about ``eps`` per edge
        (cutting one of two certain in-edges loses nothing)."""
        flow = w * pi.index_select(1, src)  # not pi[:, src]: its backward (an accumulating index_put) was 3x slower
        log_stay = self._scatter(torch.log1p(-(1 - _EPS) * flow), dst, n)
        q = -torch.expm1(log_stay)
        return q, torch.log(q.clamp(min=_EPS)) - log_stay, self._scatter(flow, dst, n)

    @staticmethod
    def _activate(s: torch.Tensor, free: torch.Tensor, logit: torch.Tensor, inflow: torch.Tensor) -> torch.Tensor:
        """Seeds 1; a node with no inflow exactly 0 (the learned correction cannot create influence, which
        is what lets :meth:`local_spread` drop the nodes beyond ``layers`` hops); else ``sigmoid(logit)``.
        ``free``: bool, not a seed. One ``where`` (the op count is the cost on small graphs)."""
        return torch.where(free & (inflow > 0), _sigmoid(logit), s)

    def _monstor(self, s: torch.Tensor, w: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
        indeg = torch.log1p(self._scatter(w, dst, n))
        outdeg = torch.log1p(w.new_zeros(s.shape).index_add_(1, src, w))
        pi, free = s, s == 0
        for _ in range(self.config.layers):
            q, q_logit, a = self._noisy_or(w, pi, src, dst, n)
            feats = torch.stack([pi, s, q, a, indeg, outdeg], dim=-1)
            pi = self._activate(s, free, q_logit + self.step(feats).squeeze(-1), a)
        return pi

    def forward(self, seeds: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        s = seeds.float()
        w = self.p * keep  # (B, E)
        if self.config.kind == "monstor":
            return self._monstor(s, w, self.src, self.dst, self.num_nodes)
        c = self.config
        width = c.hidden // c.segments
        indeg = torch.log1p(self._scatter(w, self.dst, self.num_nodes))
        outdeg = torch.log1p(w.new_zeros(s.shape).index_add_(1, self.src, w))
        h = torch.relu(self.encode(torch.stack([s, indeg, outdeg], dim=-1)))  # (B, N, H)
        pi, free = s, s == 0
        for k in range(c.layers):
            q, q_logit, a = self._noisy_or(w, pi, self.src, self.dst, self.num_nodes)
            unit = fn.normalize(h.view(*s.shape, c.segments, width), dim=-1)  # per node: cheaper than per edge
            cos = (unit[:, self.src] * unit[:, self.dst]).sum(-1)  # (B, E, F)
            gate = torch.sigmoid((cos - self.tau[k]) / self.log_temp[k].exp())
            hs = h[:, self.src].view(*w.shape, c.segments, width)
            msg = self._scatter((w[..., None, None] * gate[..., None] * hs).reshape(*w.shape, c.hidden), self.dst,
                                self.num_nodes)
            h = self.norms[k](h + self.steps[k](torch.cat([h, msg, q[..., None], pi[..., None]], dim=-1)))
            pi = self._activate(s, free, q_logit + self.heads[k](h).squeeze(-1), a)
        return pi

    def neighbourhood(self, seeds: np.ndarray, backend: str | None = None) -> Neighbourhood:
        """The part of the graph that decides the spread from ``seeds`` (int ids): the nodes ``R`` within
        ``layers`` out-hops of a seed, every edge with an end in ``R`` (their in- and out-degree
        features) and those edges' other ends. Every node outside it has ``pi = 0`` at every layer (no
        inflow) and every edge outside it a gradient of exactly 0, so :meth:`local_spread` on it equals
        ``spread`` on the whole graph (up to float summation order). The axel kind's hidden state
        moves without inflow, so for it the neighbourhood is the whole graph. ``backend``: the search
        compiled (``"numba"``, the default where numba imports) or in numpy, as ``MonstorPass.backend``."""
        e, layers = self._src_np.size, self.config.layers
        s_ids = np.asarray(seeds, dtype=np.int64)
        if self.config.kind != "monstor":
            return Neighbourhood(np.arange(self.num_nodes), torch.arange(e), self.src, self.dst, self.p,
                                 _seed_row(s_ids, self.num_nodes), e, (e,) * layers)
        from cleanse.graphs.monstor_pass import checked_backend  # not at the top: it imports this module

        if checked_backend(backend, "neighbourhood search") == "numba":  # the same search compiled (cleanse.graphs.monstor_kernel), without ~30 numpy calls
            from cleanse.graphs.monstor_kernel import neighbourhood

            edges, counts, nodes, src_local, dst_local = neighbourhood(
                self._out.order, self._out.start, self._in.order, self._in.start, self._src_np, self._dst_np,
                np.ascontiguousarray(s_ids), layers, self.num_nodes)
            flowing = tuple(counts.tolist())
        else:
            edges, flowing, nodes, src_local, dst_local = self._search(s_ids)
        return Neighbourhood(nodes, torch.from_numpy(edges), torch.from_numpy(src_local), torch.from_numpy(dst_local),
                             torch.from_numpy(self._p_np.take(edges)), _seed_row(np.searchsorted(nodes, s_ids), nodes.size),
                             e, flowing)

    def _search(self, s_ids: np.ndarray) -> tuple[np.ndarray, tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`neighbourhood`'s search in numpy (where numba is missing): ``edges``, ``flowing``, ``nodes``
        and the edges' local ``src``/``dst``."""
        src, dst, layers, e = self._src_np, self._dst_np, self.config.layers, self._src_np.size
        reached = np.zeros(self.num_nodes, dtype=bool)
        reached[s_ids] = True
        frontier, by_hop = np.flatnonzero(reached), []
        for _ in range(layers):  # breadth first: the out-edges of the nodes at hop k, in graph order
            out = self._out.edges(frontier) if self._out.in_order else np.sort(self._out.edges(frontier))
            by_hop.append(out)
            before = reached.copy()
            reached[dst.take(out)] = True
            frontier = np.flatnonzero(reached > before)  # ascending and distinct, unlike the targets
        # the last group: sources at hop `layers` or out of reach; no flow on them at any layer
        entering = self._in.edges(np.flatnonzero(reached))
        edges = np.concatenate([*by_hop, np.sort(np.concatenate([self._out.edges(frontier),
                                                                 entering[~reached.take(src.take(entering))]]))])
        if edges.size == e:  # jazz, email_eu_core: every edge has an end within reach, local ids are global
            nodes, src_local, dst_local = np.arange(self.num_nodes), src.take(edges), dst.take(edges)
        else:
            reached[src.take(edges)] = True
            reached[dst.take(edges)] = True
            nodes = np.flatnonzero(reached)
            local = np.zeros(self.num_nodes, dtype=np.int64)
            local[nodes] = np.arange(nodes.size)
            src_local, dst_local = local.take(src.take(edges)), local.take(dst.take(edges))
        flowing = tuple(int(c) for c in np.cumsum([group.size for group in by_hop]))
        return edges, flowing, nodes, src_local, dst_local

    def local_spread(self, hood: Neighbourhood, keep: torch.Tensor) -> torch.Tensor:
        """The spread estimate (B,) with keep-weights ``keep`` (B, m) on the neighbourhood's edges (the
        edges outside it kept as they are: they cannot change the spread)."""
        s = hood.seeds.expand(keep.shape[0], -1)
        if self.config.kind != "monstor":
            return self(s, keep).sum(dim=-1)
        return self._monstor(s, hood.p * keep, hood.src, hood.dst, int(hood.nodes.size)).sum(dim=-1)

    def spread(self, seeds: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The spread estimate (B,) = sum of ``pi``."""
        return self(seeds, keep).sum(dim=-1)


@dataclass
class Instances:
    """Training instances: ``seeds`` bool (B, N), ``keep`` float32 (B, E), ``labels`` float32 (B, N)
    (Monte Carlo activation probabilities of each instance's graph ``p * keep``)."""

    seeds: np.ndarray
    keep: np.ndarray
    labels: np.ndarray
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.seeds.shape[0])


def near(edge_index: np.ndarray, seeds: np.ndarray, num_nodes: int, hops: int) -> np.ndarray:
    """Bool (E,): edges whose source lies within ``hops`` hops of a seed (``hops = 0``: out-edges of
    the seeds)."""
    reached = np.zeros(num_nodes, dtype=bool)
    reached[seeds] = True
    for _ in range(hops):
        reached[edge_index[1, reached[edge_index[0]]]] = True
    return reached[edge_index[0]]


def make_instances(kind: str, edge_index: np.ndarray, weights: np.ndarray, num_nodes: int, target: np.ndarray,
                   count: int, runs: int, gen: np.random.Generator, max_removal: float = 0.3,
                   target_share: float = 0.5, threshold: float | None = None) -> Instances:
    """``count`` perturbed instances: a share ``target_share`` with the ``target`` seed set, the rest
    with random seed sets of the same size; in each, a rate ``r ~ U(0, max_removal)`` of edges (half
    of the instances: among the edges within two hops of the seeds) is removed (``keep = 0``) or, in
    every other instance, down-weighted (``keep ~ U(0, 1)``). Labels: ``runs`` Monte Carlo cascades
    (``threshold``: LT with that fixed threshold, deterministic, so one cascade)."""
    began = time.perf_counter()
    e = edge_index.shape[1]
    seeds = np.zeros((count, num_nodes), dtype=bool)
    keep = np.ones((count, e), dtype=np.float32)
    labels = np.zeros((count, num_nodes), dtype=np.float32)
    for i in range(count):
        chosen = target if gen.random() < target_share else gen.choice(num_nodes, size=len(target), replace=False)
        seeds[i, chosen] = True
        pool = near(edge_index, chosen, num_nodes, 2) if gen.random() < 0.5 else np.ones(e, dtype=bool)
        hit = pool & (gen.random(e) < gen.uniform(0.0, max_removal))
        keep[i, hit] = 0.0 if i % 2 == 0 else gen.random(int(hit.sum()))
        labels[i] = simulate(kind, edge_index, weights * keep[i], seeds[i:i + 1], n_runs=runs if threshold is None else 1,
                             seed=int(gen.integers(2**31)), num_nodes=num_nodes, threshold=threshold)[0]
    return Instances(seeds, keep, labels, time.perf_counter() - began)


@dataclass
class FitRecord:
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def fit_surrogate(model: SpreadSurrogate, train: Instances) -> FitRecord:
    """Adam on the mean squared error of the non-seed probabilities plus that of the spread per node
    ((spread_hat - spread) / N)^2; minibatches of ``config.batch`` instances, seeded."""
    c = model.config
    torch.manual_seed(c.seed)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    s = torch.as_tensor(train.seeds, dtype=torch.float32)
    x = torch.as_tensor(train.keep)
    y = torch.as_tensor(train.labels)
    gen = torch.Generator().manual_seed(c.seed)
    record, began = FitRecord(), time.perf_counter()
    n = model.num_nodes
    for epoch in range(c.epochs):
        total = 0.0
        for idx in torch.randperm(len(train), generator=gen).split(c.batch):
            pi = model(s[idx], x[idx])
            free = 1 - s[idx]
            loss = ((pi - y[idx]) ** 2 * free).sum() / free.sum() + (((pi.sum(-1) - y[idx].sum(-1)) / n) ** 2).mean()
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"surrogate: non-finite loss at epoch {epoch}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        record.history.append(total / len(train))
    model.eval()
    record.seconds = time.perf_counter() - began
    return record


@torch.no_grad()
def evaluate_surrogate(model: SpreadSurrogate, test: Instances) -> dict[str, float]:
    """Per-node MAE of the non-seed probabilities, spread MAE (nodes) and the mean spread, against
    the instances' Monte Carlo labels."""
    pi = torch.cat([model(torch.as_tensor(test.seeds[i:i + 8], dtype=torch.float32), torch.as_tensor(test.keep[i:i + 8]))
                    for i in range(0, len(test), 8)]).numpy()
    free = ~test.seeds
    return {"node_mae": float(np.abs(pi - test.labels)[free].mean()),
            "spread_mae": float(np.abs(pi.sum(-1) - test.labels.sum(-1)).mean()),
            "mean_spread": float(test.labels.sum(-1).mean()), "instances": len(test)}


def config_json(config: SurrogateConfig) -> dict[str, Any]:
    return asdict(config)

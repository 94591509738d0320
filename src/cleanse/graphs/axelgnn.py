"""AxelGNN-style layer and model (Hevapathige, arXiv 2509.19084, reconstructed; spec part B §5.3).

The paper's equations were not available; this is the spec's reconstruction, called
"AxelGNN-style" everywhere. Pure torch (no torch-geometric), full batch.

Shapes: ``h`` float (N, d) with d = F * s (F segments, the "traits", of width s);
``edge_index`` int64 (2, E), row 0 the neighbour ``j`` (message source), row 1 the receiver ``i``.
Per edge and segment f, with ``a_ij = 1 / deg(i)``:

- similarity ``s_ij^f = cos(W_s h_i^f, W_s h_j^f)``, ``sbar_ij = mean_f s_ij^f``;
- **gate** ``p_ij = sigmoid((sbar_ij - tau) / T)`` (off: ``p_ij = 1``);
- **trait copy** ``c_ij^f = sigmoid(a (1 - s_ij^f) + b)``: differing traits are the ones copied,
  as in Axelrod's model (off: ``c_ij^f = 1``); ``segments = 1`` turns the per-trait view off;
- **divergence** ``gamma (1 - p_ij)``: dissimilar neighbours push away (off: ``gamma = 0``);
- message ``m_i^f = sum_j a_ij c_ij^f (p_ij - gamma (1 - p_ij)) (h_j^f - h_i^f)`` (the
  difference per segment is clipped to ``[-clip, clip]`` so the divergence cannot blow up);
- update ``h_i <- (1 - beta) (h_i + eta U(m_i)) + beta h_i^0`` with ``U`` a linear map, a
  2-layer MLP or the identity (the spec's "+ beta h^0" is written as a convex mix, APPNP-like,
  so 32 stacked layers keep their scale); optionally (``identity_theta > 0``) layer ``l`` uses
  GCNII's identity mapping ``(1 - lam_l) m + lam_l U(m)``, ``lam_l = log(theta / l + 1)``;
  optionally (``fixed_time = T > 0``) every layer is an Euler step of size ``dt = min(1, T / L)``:
  ``h_i <- (1 - beta dt) (h_i + dt eta U(m_i)) + beta dt h_i^0`` (and the prototype pull times
  ``dt``), so L layers integrate the same diffusion time for every L; optionally (``shared``) the
  L layers are one layer applied L times (one vector field, GRAND's continuous-depth reading);
  optionally (``norm_step``, with ``fixed_time``) the LayerNorm is scaled like the rest of the
  step, ``h <- h + dt (LN(h) - h)``;
- **polarisation**: K prototypes ``mu_k``, ``r_ik = softmax_k(-||h_i - mu_k||^2 / kappa)``,
  ``h_i <- h_i + rho sum_k r_ik (mu_k - h_i)``; :meth:`AxelGNN.regularizer` returns a penalty
  that keeps the prototypes apart (mean pairwise cosine similarity).

With gate, copy, divergence and polarisation off, ``U = I`` and ``segments = 1`` the layer is
``H <- (1 - beta)((1 - eta) I + eta P) H + beta H0`` with ``P = D^-1 A`` (random-walk
propagation with teleport to the input, APPNP over a lazy walk), the closed form the tests check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as fn
from torch import nn

from cleanse.errors import ConfigError


@dataclass(frozen=True)
class AxelConfig:
    """Switches and constants of one AxelGNN-style layer (ablations flip the booleans)."""

    segments: int = 4
    gate: bool = True
    trait_copy: bool = True
    divergence: bool = True
    polarisation: bool = True
    prototypes: int = 8
    update: str = "linear"  # "linear" | "mlp" | "identity"
    eta: float = 1.0
    beta: float = 0.1
    gamma: float = 0.5
    kappa: float = 1.0
    clip: float = 5.0
    norm: bool = True  # LayerNorm after each layer (off for the closed form)
    # > 0: GCNII's identity mapping (Chen et al., ICML 2020) on the update of layer l,
    # U_l(m) = (1 - lam_l) m + lam_l U(m) with lam_l = log(theta / l + 1): deep layers stay close to
    # plain propagation instead of stacking L random linear maps (0: off, U_l = U)
    identity_theta: float = 0.0
    # > 0: the L layers integrate one fixed diffusion time T = fixed_time (GRAND's view, Chamberlain
    # et al., ICML 2021: a layer is an Euler step of dh/dt = eta U(m) - beta (h - h0)): layer steps
    # eta, beta and the prototype pull are scaled by fixed_time / L, so depth refines the
    # discretisation instead of lengthening the diffusion (fixed_time = 2 leaves L = 2 as it is; 0: off)
    fixed_time: float = 0.0
    # True: one layer's parameters for every step (GRAND's ODE has one vector field for all t): with
    # fixed_time, more layers then only refine the Euler steps of one ODE instead of adding L maps
    shared: bool = False
    # True (with fixed_time): the LayerNorm is an Euler step too, h <- h + dt (LN(h) - h), instead of a full
    # renormalisation after every step: L steps then apply one unit of normalisation per unit of time instead
    # of L full LayerNorms with L learned gains (dt = 1, e.g. fixed_time = 2 at L = 2, is LN itself)
    norm_step: bool = False

    def ablate(self, **changes: object) -> AxelConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class AxelLayer(nn.Module):
    """One similarity-gated, segment-wise copying step; ``forward(h, h0, edge_index) -> (N, d)``."""

    def __init__(self, dim: int, config: AxelConfig, depth: int = 1, step: float = 1.0) -> None:
        super().__init__()
        if config.segments < 1 or dim % config.segments:
            raise ConfigError(f"segments={config.segments} must divide the hidden width {dim}")
        if config.update not in ("linear", "mlp", "identity"):
            raise ConfigError(f"update must be linear, mlp or identity, got {config.update!r}")
        if depth < 1:
            raise ConfigError(f"layer depth must be >= 1, got {depth}")
        if not 0.0 < step <= 1.0:
            raise ConfigError(f"layer step must lie in (0, 1], got {step}")
        self.cfg, self.step = config, step
        self.dim, self.width = dim, dim // config.segments
        # weight of the learned update at this depth (1: the update as is)
        self.lam = math.log(config.identity_theta / depth + 1.0) if config.identity_theta > 0 else 1.0
        self.sim = nn.Linear(self.width, self.width, bias=False)
        self.tau = nn.Parameter(torch.tensor(0.0))
        self.log_temp = nn.Parameter(torch.tensor(math.log(0.5)))
        self.copy_a = nn.Parameter(torch.tensor(2.0))
        self.copy_b = nn.Parameter(torch.tensor(-1.0))
        self.update: nn.Module
        if config.update == "linear":
            self.update = nn.Linear(dim, dim)
        elif config.update == "mlp":
            self.update = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        else:
            self.update = nn.Identity()
        self.prototypes = nn.Parameter(torch.randn(config.prototypes, dim) / math.sqrt(dim))
        self.rho_logit = nn.Parameter(torch.tensor(_logit(0.1)))
        self.norm = nn.LayerNorm(dim) if config.norm else nn.Identity()

    def edge_terms(self, h: torch.Tensor, edge_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate ``p`` (E,) and copy probabilities ``c`` (E, F) for every edge ``j -> i``."""
        c = self.cfg
        j, i = edge_index[0], edge_index[1]
        if not (c.gate or c.trait_copy or c.divergence):
            ones = h.new_ones(edge_index.shape[1])
            return ones, ones[:, None].expand(-1, c.segments)
        z = self.sim(h.view(-1, c.segments, self.width))
        s = fn.cosine_similarity(z[i], z[j], dim=-1)  # (E, F)
        if c.gate:
            p = torch.sigmoid((s.mean(dim=1) - self.tau) / self.log_temp.exp())
        else:
            p = h.new_ones(edge_index.shape[1])
        copy = torch.sigmoid(self.copy_a * (1.0 - s) + self.copy_b) if c.trait_copy else torch.ones_like(s)
        return p, copy

    def forward(self, h: torch.Tensor, h0: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        n = h.shape[0]
        j, i = edge_index[0], edge_index[1]
        deg = torch.bincount(i, minlength=n).clamp(min=1).to(h.dtype)
        p, copy = self.edge_terms(h, edge_index)
        sign = p - c.gamma * (1.0 - p) if c.divergence else p  # (E,)
        coef = copy * (sign / deg[i])[:, None]  # (E, F)
        diff = (h[j] - h[i]).view(-1, c.segments, self.width)
        if c.divergence:
            diff = diff.clamp(-c.clip, c.clip)
        msg = (coef[:, :, None] * diff).reshape(-1, self.dim)
        m = h.new_zeros(n, self.dim).index_add_(0, i, msg)
        u = self.update(m) if self.lam == 1.0 else (1.0 - self.lam) * m + self.lam * self.update(m)
        beta = c.beta * self.step
        out = (1.0 - beta) * (h + self.step * c.eta * u) + beta * h0
        if c.polarisation:
            d2 = torch.cdist(out, self.prototypes).pow(2)  # (N, K)
            r = torch.softmax(-d2 / c.kappa, dim=1)
            out = out + self.step * torch.sigmoid(self.rho_logit) * (r @ self.prototypes - out)
        if self.cfg.norm_step and self.step < 1.0:
            return out + self.step * (self.norm(out) - out)
        return self.norm(out)

    def regularizer(self) -> torch.Tensor:
        """Mean pairwise cosine similarity of the prototypes (0 when off): lower = further apart."""
        if not self.cfg.polarisation or self.prototypes.shape[0] < 2:
            return self.prototypes.new_zeros(())
        u = fn.normalize(self.prototypes, dim=1)
        k = u.shape[0]
        off = u @ u.T - torch.eye(k, device=u.device)
        return off.sum() / (k * (k - 1))


class AxelGNN(nn.Module):
    """Encoder ``Linear(in, hidden) + ReLU`` -> L :class:`AxelLayer` -> ``Linear(hidden, out)``.

    ``forward(x (N, in), edge_index (2, E)) -> (N, out)`` logits (or one logit per node for
    influence estimation, read through a sigmoid). Dropout after the encoder and before the head."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2,
                 config: AxelConfig | None = None, dropout: float = 0.5) -> None:
        super().__init__()
        if layers < 1:
            raise ConfigError(f"layers must be >= 1, got {layers}")
        self.config = config or AxelConfig()
        self.encode = nn.Linear(in_dim, hidden)
        step = min(1.0, self.config.fixed_time / layers) if self.config.fixed_time > 0 else 1.0
        if self.config.shared and self.config.identity_theta > 0:
            raise ConfigError("shared layers have one depth: identity_theta needs shared=False")
        if self.config.shared:
            one = AxelLayer(hidden, self.config, depth=1, step=step)
            self.layers = nn.ModuleList([one] * layers)
        else:
            self.layers = nn.ModuleList(AxelLayer(hidden, self.config, depth=k + 1, step=step) for k in range(layers))
        self.head = nn.Linear(hidden, out_dim)
        self.dropout = dropout

    def embed(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        # dropout after the encoder, not on x: masking a wide bag-of-words input costs ~3x the
        # whole step on CPU (one Bernoulli per entry of N x F), for the same regularising role
        h0 = fn.dropout(torch.relu(self.encode(x)), self.dropout, self.training)
        h = h0
        for layer in self.layers:
            h = layer(h, h0, edge_index)
        return h

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.head(fn.dropout(self.embed(x, edge_index), self.dropout, self.training))

    def regularizer(self) -> torch.Tensor:
        """Sum over layers of the prototype-separation penalty (add ``lambda *`` it to the loss)."""
        distinct = list({id(layer): layer for layer in self.layers}.values())  # a shared layer counts once
        return torch.stack([layer.regularizer() for layer in distinct]).sum()  # type: ignore[operator]


def choose_norm_step(val_accuracy_off: float, val_accuracy_on: float) -> bool:
    """The depth configuration's rule (docs/graphs.md): ``norm_step`` on iff the model with it has the
    strictly higher **validation** accuracy than the model without it (same recipe, seeds and splits;
    both accuracies on one scale, fractions or %); a tie keeps it off. Shared by the family's
    ``model.norm_step: auto`` (one fit each way) and ``benchmarks/graph_nodes.py`` (means over splits)."""
    return val_accuracy_on > val_accuracy_off

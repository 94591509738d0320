"""Train a GAN with a recorded window, replay the window, retrain from scratch with a mask.

Every path runs :func:`cleanse.families.gan.step.gan_step` through :func:`run_steps`, so training,
replay (the ground truth of the influence estimators: counterfactual SGD with the same batches and
latents, Terashita et al. ICLR 2021 / TNNLS 2025; spec §2.4, §2.8), retraining from scratch and the
influence passes' forward recomputation are the same arithmetic.

Per epoch ``e`` the batch order is a permutation from ``cleanse.seeds.rng(seed, "gan.batches", e)``
cut into ``n // batch_size`` full batches (the last ``n % batch_size`` rows of that order sit the
epoch out), and the latents ``z_d``, ``z_g`` (steps, B, z_dim) are standard normal from
``torch_seed(seed, "gan.latents", e)``. The learning rates are constant.

``keep`` masks are (n,) floats, 1 = train on the row, 0 = remove it; they multiply each real
instance's D-loss term and leave the divisor at the batch size (spec §2.2, §2.8).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from cleanse.errors import ConfigError, DataError
from cleanse.families.gan.nets import GanSpec, build_discriminator, build_generator, load_module, params_of
from cleanse.families.gan.step import GanNets, GanRecipe, Params, gan_step, initial_state
from cleanse.families.gan.trace import GanTrace
from cleanse.progress import Progress
from cleanse.seeds import rng, torch_seed

__all__ = ["GanRecipe", "GanTrace", "TrainedGan", "epoch_schedule", "replay", "retrain_gan", "run_steps",
           "train_gan"]


@dataclass
class TrainedGan:
    """A trained GAN, its traced window and its per-epoch mean losses."""

    spec: GanSpec
    recipe: GanRecipe
    g_state: dict[str, Tensor]
    d_state: dict[str, Tensor]
    trace: GanTrace
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    seconds_traced: float = 0.0

    def generator(self) -> nn.Module:
        """G with the trained parameters, eval mode."""
        return load_module(build_generator(self.spec), self.g_state)

    def discriminator(self) -> nn.Module:
        """D with the trained parameters, eval mode."""
        return load_module(build_discriminator(self.spec), self.d_state)


def check_data(spec: GanSpec, recipe: GanRecipe, data: Tensor, keep: Tensor | None = None) -> Tensor | None:
    """Refuse data of the wrong shape/dtype or too few rows; return ``keep`` cast to the GAN dtype."""
    if tuple(data.shape[1:]) != tuple(spec.data_shape):
        raise DataError(f"GAN data has instance shape {tuple(data.shape[1:])}, the GanSpec wants {spec.data_shape}")
    if data.dtype != spec.torch_dtype:
        raise DataError(f"GAN data has dtype {data.dtype}, the GanSpec wants {spec.dtype}")
    if data.shape[0] < recipe.batch_size:
        raise ConfigError(f"GAN batch_size {recipe.batch_size} is larger than the {data.shape[0]} training rows")
    if keep is None:
        return None
    if keep.shape != (data.shape[0],):
        raise DataError(f"keep mask has shape {tuple(keep.shape)}, expected ({data.shape[0]},)")
    return keep.to(spec.torch_dtype)


def epoch_schedule(spec: GanSpec, recipe: GanRecipe, n: int, seed: int, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Epoch ``epoch``'s batches (S, B) int64 and latents z_d, z_g (S, B, z_dim) under run seed ``seed``."""
    steps, batch = n // recipe.batch_size, recipe.batch_size
    order = rng(seed, "gan.batches", epoch).permutation(n)[: steps * batch]
    batches = torch.from_numpy(order.reshape(steps, batch).astype(np.int64))
    generator = torch.Generator().manual_seed(torch_seed(seed, "gan.latents", epoch))
    z_d = torch.randn(steps, batch, spec.z_dim, generator=generator, dtype=spec.torch_dtype)
    z_g = torch.randn(steps, batch, spec.z_dim, generator=generator, dtype=spec.torch_dtype)
    return batches, z_d, z_g


def batch_mask(keep: Tensor | None, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """The (B,) mask of one batch: ones (nothing removed) or ``keep[rows]``."""
    return torch.ones(rows.shape[0], dtype=dtype) if keep is None else keep[rows]


def run_steps(nets: GanNets, recipe: GanRecipe, g: Params, d: Params, state: Params, data: Tensor,
              keep: Tensor | None, batches: Tensor, z_d: Tensor, z_g: Tensor, lr_d: Tensor, lr_g: Tensor,
              losses: list[tuple[float, float]] | None = None,
              snapshots: list[tuple[Params, Params, Params]] | None = None) -> tuple[Params, Params, Params]:
    """Run ``len(batches)`` steps; return (g, d, state) after them.

    ``losses`` (optional) receives each step's (L_D, L_G); ``snapshots`` (optional) each step's
    input (g, d, state), for the influence passes' backward sweep.
    """
    for t in range(batches.shape[0]):
        if snapshots is not None:
            snapshots.append((g, d, state))
        rows = batches[t]
        out = gan_step(nets, recipe, g, d, state, data[rows], batch_mask(keep, rows, data.dtype), z_d[t], z_g[t],
                       float(lr_d[t].item()), float(lr_g[t].item()))
        g, d, state = out.g, out.d, out.state
        if losses is not None:
            losses.append((float(out.d_loss), float(out.g_loss)))
    return g, d, state


def _clone(params: Params) -> Params:
    return {name: p.detach().clone() for name, p in params.items()}


def _train(spec: GanSpec, recipe: GanRecipe, data: Tensor, seed: int, keep: Tensor | None,
           progress: bool) -> TrainedGan:
    keep = check_data(spec, recipe, data, keep)
    started = time.perf_counter()
    nets = GanNets(spec)
    g, d = params_of(build_generator(spec, seed)), params_of(build_discriminator(spec, seed))
    state = initial_state(recipe, g, d)
    window_start = recipe.epochs - recipe.trace_epochs
    record: dict[str, list[Tensor]] = {"batches": [], "z_d": [], "z_g": [], "lr_d": [], "lr_g": []}
    start: tuple[Params, Params, Params] | None = None
    history: list[dict[str, float]] = []
    traced_from = started
    reporter = Progress(f"train gan ({spec.arch})", total=recipe.epochs, unit="epoch") if progress else None
    try:
        for epoch in range(recipe.epochs):
            batches, z_d, z_g = epoch_schedule(spec, recipe, data.shape[0], seed, epoch)
            lr_d = torch.full((batches.shape[0],), recipe.lr_d, dtype=torch.float64)
            lr_g = torch.full((batches.shape[0],), recipe.lr_g, dtype=torch.float64)
            if epoch == window_start:
                traced_from = time.perf_counter()
                start = (_clone(g), _clone(d), _clone(state))
            if epoch >= window_start:
                for name, value in zip(record, (batches, z_d, z_g, lr_d, lr_g), strict=True):
                    record[name].append(value)
            losses: list[tuple[float, float]] = []
            g, d, state = run_steps(nets, recipe, g, d, state, data, keep, batches, z_d, z_g, lr_d, lr_g, losses)
            mean = np.mean(np.asarray(losses), axis=0)
            history.append({"d_loss": float(mean[0]), "g_loss": float(mean[1])})
            if reporter is not None:
                reporter.update(d_loss=float(mean[0]), g_loss=float(mean[1]))
    finally:
        if reporter is not None:
            reporter.close()
    finished = time.perf_counter()
    assert start is not None  # window_start < epochs by GanRecipe's check
    trace = GanTrace(start[0], start[1], start[2], **{name: torch.cat(parts) for name, parts in record.items()})
    return TrainedGan(spec, recipe, g, d, trace, history, finished - started, finished - traced_from)


def train_gan(spec: GanSpec, recipe: GanRecipe, data: Tensor, seed: int, *, progress: bool = False) -> TrainedGan:
    """Train G and D on ``data`` (n, *data_shape) from the Glorot init of ``seed``, recording the
    last ``recipe.trace_epochs`` epochs (the traced window)."""
    return _train(spec, recipe, data, seed, None, progress)


def retrain_gan(spec: GanSpec, recipe: GanRecipe, data: Tensor, seed: int, keep: Tensor, *,
                progress: bool = False) -> TrainedGan:
    """Retrain from scratch with the same seed (same init, batch order and latents) and the mask
    ``keep`` (n,) applied in every epoch (the "retrain from scratch" verification)."""
    return _train(spec, recipe, data, seed, keep, progress)


def replay(spec: GanSpec, recipe: GanRecipe, trace: GanTrace, data: Tensor,
           keep: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(g_state, d_state) after replaying the traced window with the real terms masked by ``keep``.

    ``keep=None`` reproduces the trained parameters bit for bit on the CPU (same thread count);
    ``keep`` with zeros is the counterfactual training without those rows (the ground truth).
    """
    keep = check_data(spec, recipe, data, keep)
    g, d, _ = run_steps(GanNets(spec), recipe, _clone(trace.start_g), _clone(trace.start_d),
                        _clone(trace.optimizer_start), data, keep, trace.batches, trace.z_d, trace.z_g,
                        trace.lr_d, trace.lr_g)
    return g, d

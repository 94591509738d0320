"""f-influence measured from its definition (Panda et al., 2025, "f-INE: Influence Estimation using
Hypothesis Testing", arXiv 2510.10510, Def. 2.4-2.5): the ground truth for the single-run ``fine``
estimator.

A unit S (one training sample or a group) is influential to the degree that a query statistic of
models trained *with* S (distribution P) can be told apart from the same statistic of models
trained *without* S (distribution Q), both under independent training randomness. The trade-off
function T(P, Q) of that test tends to a Gaussian trade-off curve G_mu, so one signed scalar mu
summarises it:

    mu(alpha) = Phi^-1(1 - alpha) - Phi^-1(beta(alpha)),   constant in alpha exactly when T = G_mu.

Orientation used throughout: the statistic is a **loss** (lower = better fit), and the test
rejects "trained with S" when the statistic is large. So **mu > 0 means removing S raises the
query loss** (S helps the query) and mu < 0 means removing S lowers it (S harms the query).

Estimates from the two samples (``with_s`` ``(R1,)``, ``without_s`` ``(R0,)``):

- ``mu``: the Gaussian fit, d' = (mean(without) - mean(with)) / pooled sd (equal-variance
  Gaussians give G_mu with mu = d' exactly; Dong, Roth & Su, 2022);
- ``mu_tradeoff``: the median of mu(alpha) over an alpha grid, from the empirical ROC;
- ``gaussianity``: the interquartile range of mu(alpha) over the grid (0 for an exact G_mu curve;
  larger = the trade-off curve is less Gaussian, so one mu summarises it less well);
- ``mu_lo``, ``mu_hi``: a percentile bootstrap interval of ``mu`` (both samples resampled).

:func:`measure_f_influence` trains the two arms with the batched ensembles of
:mod:`cleanse.ensembles` (R models per arm and unit; the with-arm is shared by all units).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import polars as pl
import torch
from scipy.special import ndtri

from cleanse import families
from cleanse.config import ModelConfig
from cleanse.errors import DataError
from cleanse.models.architectures import ModelSpec

ALPHA_GRID = np.linspace(0.05, 0.95, 19)
QueryKind = Literal["self", "val", "probe"]


@dataclass(frozen=True)
class FInfluence:
    """One unit's f-influence; see the module doc for every field's definition and sign."""

    mu: float
    mu_lo: float
    mu_hi: float
    mu_tradeoff: float
    gaussianity: float
    mean_with: float
    mean_without: float
    n_with: int
    n_without: int


def gaussian_mu(with_s: np.ndarray, without_s: np.ndarray) -> float:
    """d' = (mean(without) - mean(with)) / pooled sd; 0 when both samples are constant and equal."""
    a, b = np.asarray(with_s, dtype=np.float64), np.asarray(without_s, dtype=np.float64)
    pooled = np.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / max(a.size + b.size - 2, 1))
    shift = b.mean() - a.mean()
    if pooled == 0:
        return 0.0 if shift == 0 else float(np.sign(shift) * np.inf)
    return float(shift / pooled)


def tradeoff_mu(with_s: np.ndarray, without_s: np.ndarray, alphas: np.ndarray = ALPHA_GRID) -> np.ndarray:
    """mu(alpha) = Phi^-1(1 - alpha) - Phi^-1(beta(alpha)) for the test "reject with-S when the
    statistic exceeds the (1 - alpha) quantile of the with-S sample"; ``(len(alphas),)``.

    beta(alpha) = share of the without-S sample at or below that threshold (type-II error), clipped
    to [1/(2 R0), 1 - 1/(2 R0)] so a perfectly separated pair gives a large finite mu.
    """
    a, b = np.sort(np.asarray(with_s, dtype=np.float64)), np.sort(np.asarray(without_s, dtype=np.float64))
    thresholds = np.quantile(a, 1.0 - alphas)
    beta = np.searchsorted(b, thresholds, side="right") / b.size
    eps = 0.5 / b.size
    return ndtri(1.0 - alphas) - ndtri(np.clip(beta, eps, 1.0 - eps))


def tradeoff_spread_columns(samples: np.ndarray, in_first: np.ndarray, alphas: np.ndarray = ALPHA_GRID) -> np.ndarray:
    """:func:`tradeoff_mu`'s interquartile range over alpha for many units at once.

    ``samples`` ``(m, units)`` holds each unit's observations; ``in_first`` ``(m, units)`` bool marks
    those of the first sample (the with-S / included arm), the rest form the second. Returns
    ``(units,)``; NaN where an arm has fewer than 2 observations.
    """
    samples = np.asarray(samples, dtype=np.float64)
    first = np.where(in_first, samples, np.nan)
    n_first, n_second = in_first.sum(0), (~in_first).sum(0)
    ok = (n_first >= 2) & (n_second >= 2)
    # Column-wise linear-interpolation quantiles of the first arm (NaN-padded; NaNs sort last).
    ordered = np.sort(first[:, ok], axis=0)
    position = (1.0 - alphas)[:, None] * (n_first[ok] - 1)[None]  # (alphas, units)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, n_first[ok][None] - 1)
    columns = np.arange(ordered.shape[1])[None]
    low_value, high_value = ordered[low, columns], ordered[high, columns]
    thresholds = low_value + (position - low) * (high_value - low_value)  # (alphas, units)
    second = np.where(in_first[:, ok], np.inf, samples[:, ok])  # first-arm entries never count as <= t
    beta = (second[None] <= thresholds[:, None]).sum(1) / n_second[ok]
    eps = 0.5 / n_second[ok]
    curve = ndtri(1.0 - alphas)[:, None] - ndtri(np.clip(beta, eps, 1.0 - eps))
    q1, q3 = np.quantile(curve, [0.25, 0.75], axis=0)
    out = np.full(samples.shape[1], np.nan)
    out[ok] = q3 - q1
    return out


def f_influence(with_s: np.ndarray, without_s: np.ndarray, *, n_bootstrap: int = 1000, level: float = 0.95,
                seed: int = 0) -> FInfluence:
    """f-influence of one unit from the query statistic of R1 models with it and R0 without it."""
    a, b = np.asarray(with_s, dtype=np.float64), np.asarray(without_s, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        raise DataError(f"f-influence needs at least 2 models per arm, got {a.size} with and {b.size} without")
    rng = np.random.default_rng(seed)
    boot = np.array([gaussian_mu(rng.choice(a, a.size), rng.choice(b, b.size)) for _ in range(n_bootstrap)])
    tail = (1.0 - level) / 2
    curve = tradeoff_mu(a, b)
    q1, q3 = np.quantile(curve, [0.25, 0.75])
    return FInfluence(
        mu=gaussian_mu(a, b), mu_lo=float(np.quantile(boot, tail)), mu_hi=float(np.quantile(boot, 1 - tail)),
        mu_tradeoff=float(np.median(curve)), gaussianity=float(q3 - q1),
        mean_with=float(a.mean()), mean_without=float(b.mean()), n_with=int(a.size), n_without=int(b.size),
    )


def _query_losses(family: str, logits: torch.Tensor, label: np.ndarray) -> np.ndarray:
    """Per-model, per-point loss of ``family`` (:meth:`cleanse.families.base.Family.per_sample_loss`)
    ``(K, m)`` from ensemble outputs ``(K, m, C)``."""
    task = families.get(family)
    y = torch.as_tensor(label, dtype=task.target_dtype, device=logits.device).expand(logits.shape[0], -1)
    return task.per_sample_loss(logits.flatten(0, 1), y.flatten()).view(y.shape).cpu().numpy()


def measure_f_influence(
    spec: ModelSpec,
    features: np.ndarray,
    label: np.ndarray,
    units: Sequence[np.ndarray],
    config: ModelConfig,
    *,
    query: QueryKind = "self",
    query_features: np.ndarray | None = None,
    query_label: np.ndarray | None = None,
    models_per_arm: int = 100,
    vary_init: bool = False,
    seed: int = 0,
    chunk: int = 400,
    n_bootstrap: int = 1000,
    device: torch.device | None = None,
    progress: bool = True,
) -> pl.DataFrame:
    """Ground-truth f-influence of each unit by retraining: ``models_per_arm`` models on all rows
    and, per unit, ``models_per_arm`` models without the unit's rows (row indices into
    ``features``), each under its own training seed (data order; also initialisation when
    ``vary_init``, else every model starts from the ``seed`` initialisation).

    Query statistic per model: ``self`` = mean loss of the unit's rows under their given labels;
    ``val`` / ``probe`` = mean loss on ``query_features``/``query_label``.

    Returns one row per unit: ``unit`` (position in ``units``), ``size`` and the fields of
    :class:`FInfluence` (mu > 0: removing the unit raises the query loss).
    """
    from tqdm.auto import tqdm

    from cleanse.ensembles import ensemble_logits, train_ensemble

    n = int(label.shape[0])
    units = [np.asarray(u, dtype=np.int64) for u in units]
    if not units:
        raise DataError("measure_f_influence needs at least one unit")
    for i, u in enumerate(units):
        if u.size == 0 or u.min() < 0 or u.max() >= n:
            raise DataError(f"unit {i} must hold row indices in [0, {n}), got {u[:5].tolist()}...")
    if query != "self" and (query_features is None or query_label is None):
        raise DataError(f"query={query!r} needs query_features and query_label")
    r = int(models_per_arm)
    # Arm 0 = with every row; arm j+1 = without unit j. Each model gets its own training seed.
    arm_of_model = np.repeat(np.arange(len(units) + 1), r)
    masks = np.ones((arm_of_model.size, n), dtype=bool)
    for j, u in enumerate(units):
        masks[np.ix_(np.flatnonzero(arm_of_model == j + 1), u)] = False
    order_seeds = seed * 1_000_003 + 1 + np.arange(arm_of_model.size)
    statistic = np.empty(arm_of_model.size)
    with_losses: list[np.ndarray] = []  # self query: with-arm models' loss on every row, (r, n) in total
    starts = range(0, arm_of_model.size, chunk)
    for start in tqdm(starts, desc="f-influence retrains", unit="chunk", disable=not progress):
        stop = min(start + chunk, arm_of_model.size)
        ensemble = train_ensemble(spec, features, label, masks[start:stop], order_seeds[start:stop], config,
                                  device=device, init_seeds=None if vary_init else np.full(stop - start, seed))
        if query == "self":
            losses = _query_losses(spec.family, ensemble_logits(ensemble, features), label)  # (K, n)
            for k, arm in enumerate(arm_of_model[start:stop]):
                unit = units[max(arm - 1, 0)] if arm > 0 else None
                statistic[start + k] = np.nan if unit is None else losses[k, unit].mean()
            with_losses.append(losses[arm_of_model[start:stop] == 0])
        elif query_features is not None and query_label is not None:  # refused above when missing
            losses = _query_losses(spec.family, ensemble_logits(ensemble, query_features), query_label)
            statistic[start:stop] = losses.mean(1)
    with_all = np.concatenate(with_losses) if query == "self" else None
    rows = []
    for j, u in enumerate(units):
        without = statistic[arm_of_model == j + 1]
        with_ = with_all[:, u].mean(1) if with_all is not None else statistic[arm_of_model == 0]
        rows.append({"unit": j, "size": int(u.size), **asdict(f_influence(with_, without, n_bootstrap=n_bootstrap,
                                                                           seed=seed + j))})
    return pl.DataFrame(rows)

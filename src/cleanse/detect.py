"""Scores -> flags.

``detect.budget`` decides how many samples an estimator flags:

- ``count``: the top ``detect.count``;
- ``fraction``: the top ``detect.fraction * n``;
- ``auto``: chosen from the score distribution alone, never from ground truth, by Otsu's
  threshold (Otsu, 1979): the cut of the sorted scores that maximises the between-group variance
  ``w_low * w_high * (mean_low - mean_high)^2``. Harmful samples (flipped labels, poisons) form
  a separate high mode for the estimators we ship, which is the case this rule is built for.
  The count is clamped to ``[1, max_fraction * n]``. On the digits default (108 flips) it picks
  90-105 for the loss, influence and TracIn scores; confident-learning scores, which are bounded
  in [0, 1], get a looser cut. Use ``fraction`` or ``count`` when you know your budget.
- ``outlier``: every sample whose robust z-score (median and 1.4826 MAD, Hampel's outlier rule,
  Hampel 1974; Rousseeuw & Croux, 1993) exceeds ``Phi^-1(1 - alpha / n)``: the level the largest
  of ``n`` Gaussian ordinary scores exceeds with probability at most ``detect.alpha``
  (Bonferroni). Zero flags when no score stands out, so an estimator that sees no harmful samples
  flags none; at most ``max_fraction * n``. Built for a few strong poisons among many ordinary
  samples (the lm family's steering pairs), where Otsu's two-group cut takes a tail of ordinary
  samples with them.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import polars as pl

from cleanse.config import DetectConfig


def otsu_count(score: np.ndarray) -> int:
    """How many of the highest scores lie above Otsu's threshold of ``score`` ``(n,)``."""
    ordered = np.sort(np.asarray(score, dtype=np.float64))
    n = ordered.size
    if n < 2 or ordered[0] == ordered[-1]:
        return 0
    low_count = np.arange(1, n)
    cumulative = np.cumsum(ordered)[:-1]
    low_mean = cumulative / low_count
    high_mean = (ordered.sum() - cumulative) / (n - low_count)
    between = (low_count / n) * (1 - low_count / n) * (low_mean - high_mean) ** 2
    between[ordered[1:] == ordered[:-1]] = -1.0  # a cut must fall between distinct values
    return int(n - low_count[int(np.argmax(between))])


def auto_budget(score: np.ndarray, *, max_fraction: float) -> int:
    """Number of samples to flag, from ``score`` ``(n,)`` alone (higher = more harmful)."""
    cap = max(1, int(np.floor(max_fraction * score.shape[0])))
    return int(min(max(otsu_count(score), 1), cap))


# A MAD of a Gaussian sample times this is its standard deviation (1 / Phi^-1(3/4)).
MAD_TO_SD = 1.4826


def robust_z(score: np.ndarray) -> np.ndarray:
    """``(score - median) / (1.4826 MAD)`` ``(n,)``: the z-score of a Gaussian bulk, unmoved by a
    few outliers. When more than half the scores tie (MAD 0), the mean absolute deviation from the
    median (times sqrt(pi / 2), also the SD of a Gaussian) scales instead; all equal: zeros."""
    values = np.asarray(score, dtype=np.float64)
    deviation = values - np.median(values)
    scale = MAD_TO_SD * np.median(np.abs(deviation))
    if scale == 0:
        scale = np.sqrt(np.pi / 2) * np.mean(np.abs(deviation))
    return np.zeros_like(values) if scale == 0 else deviation / scale


def outlier_threshold(n: int, alpha: float) -> float:
    """``Phi^-1(1 - alpha / n)``: with ``n`` standard Gaussian scores, the chance that any exceeds
    it is at most ``alpha`` (Bonferroni)."""
    return NormalDist().inv_cdf(1 - alpha / max(n, 1))


def outlier_mask(score: np.ndarray, *, alpha: float) -> np.ndarray:
    """``(n,)`` bool: the high outliers of ``score`` ``(n,)`` (higher = more harmful): robust z
    above :func:`outlier_threshold`. One-sided: only harmful samples are flagged."""
    values = np.asarray(score, dtype=np.float64)
    return robust_z(values) > outlier_threshold(values.size, alpha)


def outlier_count(score: np.ndarray, *, alpha: float, max_fraction: float) -> int:
    """How many high outliers ``score`` ``(n,)`` has (:func:`outlier_mask`), at most
    ``max_fraction * n``; may be 0."""
    cap = max(1, int(np.floor(max_fraction * score.shape[0])))
    return min(int(outlier_mask(score, alpha=alpha).sum()), cap)


def budget(score: np.ndarray, config: DetectConfig) -> int:
    n = score.shape[0]
    if config.budget == "count":
        return min(config.count, n)
    if config.budget == "fraction":
        return max(1, int(round(config.fraction * n)))
    if config.budget == "outlier":
        return outlier_count(score, alpha=config.alpha, max_fraction=config.max_fraction)
    return auto_budget(score, max_fraction=config.max_fraction)


def flag(scores: pl.DataFrame, config: DetectConfig) -> pl.DataFrame:
    """``sample_id, score, rank, is_flagged``; rank 1 = most harmful; ties broken by sample_id.

    With ``budget: auto``, an estimator that decides its own flags from its uncertainty (a boolean
    ``auto_flag`` column, e.g. ``fine``: the confidence interval lies on the harmful side) is
    followed instead of Otsu's cut, still capped at ``max_fraction`` (highest scores first).
    """
    own = config.budget == "auto" and "auto_flag" in scores.columns
    ordered = scores.select("sample_id", "score", *(["auto_flag"] if own else [])).sort(
        ["score", "sample_id"], descending=[True, False])
    ranked = ordered.with_columns(pl.int_range(1, ordered.height + 1, dtype=pl.Int64).alias("rank"))
    if own:
        cap = max(1, int(np.floor(config.max_fraction * ordered.height)))
        return ranked.with_columns(
            (pl.col("auto_flag") & (pl.col("auto_flag").cast(pl.Int64).cum_sum() <= cap)).alias("is_flagged")
        ).drop("auto_flag")
    k = budget(ordered["score"].to_numpy(), config)
    return ranked.with_columns((pl.col("rank") <= k).alias("is_flagged"))

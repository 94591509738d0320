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
"""

from __future__ import annotations

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


def budget(score: np.ndarray, config: DetectConfig) -> int:
    n = score.shape[0]
    if config.budget == "count":
        return min(config.count, n)
    if config.budget == "fraction":
        return max(1, int(round(config.fraction * n)))
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

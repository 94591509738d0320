"""Options of ``scorers.memorization`` (:mod:`cleanse.estimators.memorization`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import OpenFraction, _Section


class MemorizationOptions(_Section):
    """Feldman & Zhang (2020) subsampled memorization / influence (``cleanse.estimators.memorization``)."""

    n_models: int = Field(1000, ge=2, description="K: subset models trained (the paper: 2,000-4,000).")
    subset_fraction: OpenFraction = Field(0.7, description="Each model trains on round(p * n) random samples.")
    statistic: Literal["accuracy", "probability"] = Field(
        "accuracy", description="accuracy: 0/1 correctness (the paper); probability: softmax probability of the label."
    )
    epochs: int | None = Field(None, ge=1, description="Epochs of each subset model (None = model.epochs).")
    shard_size: int = Field(250, ge=1, description="Models per shard (one cached file, one flow task).")
    pair_mem_threshold: float = Field(0.25, description="Long-tail report: mem of a high-influence pair's train side.")
    pair_infl_threshold: float = Field(0.15, description="Long-tail report: infl of a high-influence pair.")
    removal_threshold: float = Field(0.25, description="Marginal utility: remove the samples with mem >= this.")
    utility_seeds: int = Field(3, ge=1, description="Marginal utility: retrains per arm (mean and std reported).")
    top_k: int = Field(32, ge=1, description="Long-tail report: most-memorized samples shown.")

"""The regression family's sections of ``params.yaml`` (``family: regression``): data with a
real-valued target, target-outlier corruption, and ridge or MLP models under squared error."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import OpenFraction, _Section
from cleanse.families.classification.config import DataConfig, ModelConfig


class RegressionDataConfig(DataConfig):
    """Where the data comes from and how it is split; the target is a float column."""

    source: str = Field(
        "sklearn:diabetes",
        description="sklearn:diabetes, or a .parquet / .npz file (local path or s3:// URI) with a numeric target "
        "(parquet: data.label_column; npz: y).",
    )
    label_column: str = Field("label", description="Parquet only: the numeric target column.")
    standardize_target: bool = Field(
        True, description="z-score the target with the training split's statistics (before corruption); RMSE is "
        "then in training standard deviations.")


class RegressionCorruptionConfig(_Section):
    """Target outliers injected into the training split, with the ground truth kept."""

    kind: Literal["none", "target_outliers"] = Field(
        "target_outliers", description="target_outliers: a random fraction of training targets is shifted by "
        "scale standard deviations (of the training targets), with a random sign.")
    fraction: OpenFraction = Field(0.1, description="Fraction of training samples to corrupt, in (0, 1).")
    scale: float = Field(4.0, gt=0, description="The shift, in standard deviations of the training targets.")


class RegressionModelConfig(ModelConfig):
    """Architecture and training recipe; the loss is the mean squared error (plus the L2 term:
    ``ridge`` is ridge regression)."""

    # Narrows ModelConfig.arch on purpose: pydantic validates the regression architectures, and
    # the stages read ``arch`` through the shared ModelConfig type.
    arch: Literal["ridge", "mlp"] = Field(  # type: ignore[assignment]
        "mlp", description="ridge: one linear layer; mlp: hidden ReLU layers.")

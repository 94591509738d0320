"""The classification family's sections of ``params.yaml`` (the default, ``family: classification``):
where the data comes from and how it is split, the label corruption, and the model and its training
recipe. Re-exported by :mod:`cleanse.config`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cleanse.config_base import MAX_LR, MAX_WEIGHT_DECAY, OpenFraction, _open_fraction, _probe_free, _Section


class DataConfig(_Section):
    """Where the data comes from and how it is split."""

    source: str = Field(
        "sklearn:digits",
        description="sklearn:digits | sklearn:breast_cancer | sklearn:wine | sklearn:iris, "
        "or a .parquet / .npz file (local path or s3:// URI).",
    )
    val_fraction: float = Field(0.15, description="Fraction of all samples held out for validation.")
    test_fraction: float = Field(0.25, description="Fraction of all samples held out for testing.")
    features: str | list[str] = Field(
        "features",
        description="Parquet only: the name of a list/array column, or a list of scalar feature columns.",
    )
    label_column: str = Field("label", description="Parquet only: the integer label column.")
    id_column: str | None = Field(
        None, description="Parquet only: an int64 id column; by default the row number is the id."
    )
    image_shape: list[int] | None = Field(
        None, description="User data only: (C, H, W) to reshape flat features into images."
    )
    standardize: bool = Field(True, description="Tabular data: z-score features with train statistics.")

    @field_validator("val_fraction", "test_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        return _open_fraction(value)

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:.2f} leaves "
                "too little training data; keep the sum below 0.9"
            )
        return self


class CorruptionConfig(_Section):
    """Corruption injected into the training split, with ground truth kept."""

    kind: Literal["none", "label_flip", "backdoor"] = "label_flip"
    fraction: OpenFraction = Field(0.1, description="Fraction of training samples to corrupt, in (0, 1).")
    mode: Literal["symmetric", "pair"] = Field(
        "symmetric", description="label_flip: uniform over other classes, or y -> (y + 1) mod C."
    )
    target_class: int = Field(0, ge=0, description="backdoor: the class the trigger maps to.")
    trigger_size: int = Field(3, ge=1, description="backdoor: patch side (images) or #features (tabular).")


class ModelConfig(_Section):
    """Architecture and training recipe (one trainer for every model)."""

    arch: Literal["logreg", "mlp", "cnn"] = "mlp"
    hidden: list[int] | None = Field(
        None, description="MLP hidden widths (default [64]); CNN channel counts (default [16, 32])."
    )
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0, le=MAX_LR, description=f"Learning rate, in (0, {MAX_LR:g}].")
    weight_decay: float = Field(1e-3, ge=0, le=MAX_WEIGHT_DECAY,
                                description="L2 coefficient: loss + wd/2 * ||theta||^2.")
    optimizer: Literal["adam", "sgd", "lbfgs"] = "adam"
    checkpoints: int = Field(5, ge=1, description="Checkpoints saved for TracIn (the last is the final epoch).")
    checkpoint_spacing: Literal["auto", "even", "geometric"] = Field(
        "auto", validate_default=True,
        description="even: evenly spaced epochs; geometric: log-spaced from epoch 1, dense where the loss falls "
        "fastest (runs that fit poisons early need it for probe attribution; docs/benchmarks.md, backdoor); "
        "auto: geometric when query.kind names probes, else even (self-influence: early checkpoints dilute the "
        "mislabel signal).")

    @field_validator("hidden", mode="before")
    @classmethod
    def _hidden_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @field_validator("checkpoint_spacing", mode="before")
    @classmethod
    def _spacing_auto(cls, value: Any) -> Any:
        return _probe_free("model.checkpoint_spacing", value)

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(width < 1 for width in value)):
            raise ValueError(f"must be one or more positive widths, got {value}")
        return value

"""Options of ``scorers.holdout_ensemble`` (:mod:`cleanse.estimators.holdout_ensemble`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from cleanse.config_base import _Section


class HoldoutEnsembleOptions(_Section):
    """The out-of-subset, early-stopped ensemble (``cleanse.estimators.holdout_ensemble``)."""

    n_models: int = Field(8, ge=4, description="K models, in K/2 pairs of complementary random halves of the "
                          "training set (each sample is held out by exactly K/2 models); must be even.")
    statistic: Literal["margin", "loss"] = Field(
        "margin", description="Over the models that held a sample out: margin: max_{j != y} p_j - p_y of their "
        "mean probabilities; loss: their mean cross-entropy of the given label y.")
    stop_on: Literal["accuracy", "loss"] = Field(
        "loss", description="Each model's stopping epoch maximises its held-out half's accuracy (ties: lower "
        "loss) or minimises its held-out loss, both under the given training labels.")
    patience: int = Field(10, ge=1, description="Stop once no model has improved for this many epochs.")
    max_epochs: int | None = Field(None, ge=1, description="Epoch cap (None = model.epochs).")

    @field_validator("n_models")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"must be even (pairs of complementary halves), got {value}")
        return value

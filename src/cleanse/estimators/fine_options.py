"""Options of ``scorers.fine`` (:mod:`cleanse.estimators.fine`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


class FineOptions(_Section):
    """Options of the single-run f-INE estimator (``scorers.fine``)."""

    query: Literal["self", "val"] = Field("self", description="self: each unit's own loss; val: the validation loss.")
    signal: Literal["loss_change", "alignment"] = Field(
        "loss_change", description="per-round signal: observed change of the query, or its first-order gradient part.")
    units: Literal["samples", "groups"] = Field("samples", description="groups: the data's 'group' column.")
    rounds_per_epoch: int = Field(4, ge=1, description="inclusion is redrawn every round; a round is one pass over "
                                                       "the included rows (about inclusion x n rows)")
    inclusion: float = Field(0.25, gt=0.0, lt=1.0, description="probability that a unit is in a round; "
                                                                "rounds_per_epoch x inclusion = 1 keeps the "
                                                                "ordinary number of steps")
    level: float = Field(0.95, gt=0.0, lt=1.0, description="confidence level of [mu_lo, mu_hi]")
    centering: Literal["none", "round", "class"] = Field(
        "class", description="subtract, per round, the mean signal of the withheld units (round) or of the withheld "
                             "units with the same label (class): removes the training-progress drift shared by all")
    pairwise_detrend: int = Field(4, ge=0, description="train -> query (probe) scores: subtract from each round's "
                                                       "probe-loss signal the mean of this many rounds on either "
                                                       "side (0 = off): the training progress every unit shares")

"""Options of ``scorers.trusted`` (:mod:`cleanse.estimators.trusted`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


class TrustedOptions(_Section):
    """The trusted-data baseline (``cleanse.estimators.trusted``): a model fitted on the validation
    split alone scores each training sample by its loss under the given label."""

    model: Literal["logreg", "run"] = Field(
        "logreg", description="logreg: scikit-learn logistic regression on the flattened features; run: the "
        "run's own architecture and recipe (model.*), trained on the validation split.")
    C: float = Field(1.0, gt=0, description="logreg: inverse L2 strength (scikit-learn's C).")
    max_iter: int = Field(1000, ge=1, description="logreg: L-BFGS iterations.")
    probability_floor: float = Field(1e-6, gt=0, lt=1, description="Probabilities are clipped to at least "
                                     "this before the log: bounds the loss, and is the probability given to "
                                     "a label whose class the validation split lacks.")

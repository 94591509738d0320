"""Options of ``scorers.cofit_svm`` (:mod:`cleanse.estimators.cofit_svm`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from cleanse.config_base import _Section
from cleanse.estimators.trusted_options import TrustedOptions


class CofitSvmOptions(_Section):
    """The co-fitted SVM (``cleanse.estimators.cofit_svm``): an RBF SVM cross-fitted on the
    validation split plus the training samples a trusted model finds least surprising."""

    C_grid: list[float] = Field(
        [1.0, 3.0, 10.0, 30.0, 100.0], min_length=1, description="Candidate SVM C values; the one with the "
        "highest cross-validated accuracy on the validation split is used (the first on ties).")
    keep: float = Field(0.8, gt=0, le=1, description="Share of the (n - N̂) training samples the screening "
                        "model finds least surprising that join the validation split as correctly labelled.")
    max_fit_train: int = Field(2000, ge=1, description="At most this many confident training samples join the "
                               "SVM's fit (a seeded random subset of them above it; the others are predicted by the "
                               "folds' mean like every unfitted sample): the RBF SVM's cost grows with the square "
                               "of its training rows.")
    folds: int = Field(5, ge=2, description="Cross-fitting folds (and folds of the C search and of the "
                       "screening model's error estimate); fewer when a class has fewer samples.")
    probability_floor: float = Field(1e-6, gt=0, lt=1, description="Probabilities are clipped to at least this "
                                     "before the log.")
    screen: TrustedOptions = Field(TrustedOptions(), description="The screening model (the trusted logistic "
                                   "regression; its model field is ignored): picks the confident training samples "
                                   "and their number.")

    @field_validator("C_grid")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(c <= 0 for c in value):
            raise ValueError(f"every C must be positive, got {value}")
        return value

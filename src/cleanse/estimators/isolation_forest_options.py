"""Options of ``scorers.isolation_forest`` (:mod:`cleanse.estimators.isolation_forest`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


class IsolationForestOptions(_Section):
    features: Literal["auto", "raw", "classifier"] = Field(
        "auto", description="What the forest isolates: raw (the data as staged), classifier (the feature "
        "classifier's penultimate features, images only); auto: raw for 2-D data, classifier for images.")

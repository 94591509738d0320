"""Options of ``scorers.cleanlab`` (:mod:`cleanse.estimators.confident_learning`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


class CleanlabOptions(_Section):
    folds: int = Field(5, ge=2, description="K for the out-of-sample predicted probabilities.")
    method: Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"] = "self_confidence"
    n_jobs: int = Field(1, ge=1, description="Processes for cleanlab's find_label_issues. 1 (the default) "
                        "starts no pool: a pool forked inside a threaded worker (Prefect) can deadlock.")

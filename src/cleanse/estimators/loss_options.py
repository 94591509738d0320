"""Options of ``scorers.loss`` (:mod:`cleanse.estimators.loss`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


class LossOptions(_Section):
    statistic: Literal["loss", "margin"] = Field(
        "loss", description="loss: final cross-entropy; margin: minus the final logit margin."
    )

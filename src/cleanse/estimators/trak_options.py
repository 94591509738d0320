"""Options of ``scorers.trak`` (:mod:`cleanse.estimators.trak`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


class TrakOptions(_Section):
    """TRAK (Park et al., ICML 2023); see ``cleanse.estimators.trak``."""

    proj_dim: int = Field(2048, ge=1, description="k, the projection dimension (capped at the number of parameters).")
    projection: Literal["rademacher", "gaussian"] = "rademacher"
    n_models: int = Field(1, ge=1, description="M independently trained models in the ensemble (model 0 is the trained one).")
    damping: float = Field(0.3, ge=0, description="lambda in (Phi^T Phi + lambda I)^-1, relative to the mean diagonal "
                                                   "(0.3: best linear datamodeling score on digits).")
    chunk_size: int = Field(256, ge=1, description="Samples per chunk of per-sample gradients.")

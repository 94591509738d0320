"""Options of ``scorers.influence_fvm`` (:mod:`cleanse.estimators.influence_fvm`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


class FvmOptions(_Section):
    """Influence at (flat) validation minima (Ye et al., ICML 2025); see ``cleanse.estimators.influence_fvm``."""

    variant: Literal["fvm", "vm"] = Field("fvm", description="fvm: sharpness-aware fine-tune on val; vm: plain ERM.")
    sharpness: Literal["sam", "lpf"] = Field("sam", description="sam: SAM ascent step of radius rho; lpf: LPF-SGD, M=1 Gaussian perturbation of scale sigma.")
    rho: float = Field(0.05, ge=0, description="SAM radius.")
    sigma: float = Field(0.01, ge=0, description="LPF-SGD: perturbation scale relative to each tensor's norm / sqrt(size).")
    steps: int = Field(100, ge=0, description="Full-batch fine-tuning steps on the validation set.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the fine-tune.")
    solver: Literal["auto", "exact", "cg", "ekfac"] = Field("auto", description="Inverse of the validation curvature (auto: exact when small, else ekfac).")
    damping: float = Field(1e-2, ge=0, description="lambda; mandatory since n_val << p leaves H_val rank-deficient.")
    exact_max_params: int = Field(6000, ge=1)

"""Options of ``scorers.dtrak`` (:mod:`cleanse.estimators.dtrak`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


class DtrakOptions(_Section):
    """A D-TRAK-style baseline (Zheng et al., ICLR 2024): unnormalised gradients of the diffusion
    loss averaged over the timesteps, a dense Gaussian projection, and TRAK's kernel."""

    timesteps: int = Field(10, ge=1, description="S: the same cube-law timesteps and shared noise as dmin.")
    size: int = Field(4096, ge=1, description="Projected dimension (the same v as dmin's).")
    damping: float = Field(1e-3, ge=0, description="lambda = damping * ||Phi||_F^2 / n (the mean squared norm of a "
                           "training feature); the kernel is (Phi^T Phi + lambda I)^-1.")
    kernel: bool = Field(True, description="Apply TRAK's inverse Gram kernel; false: plain projected inner products.")
    reference: Literal["none", "unflagged"] = Field(
        "unflagged", description="unflagged (default): the mean influence on the harm queries (the watermarked "
        "generations) minus that on the target class's generations the detector does not flag, so that what every "
        "image of the class gives every generation of it cancels; none: the harm queries' mean alone. Without the "
        "watermark there is no reference and both are the same. unflagged falls back to none when the detector flags "
        "the target class's generations no more often than as many of the other classes' (one-sided Fisher exact "
        "test, p >= 0.05): the flags are then false positives (docs/diffusion.md, Watermark cleansing).")
    k: int = Field(10, ge=1, description="Training images stored per retrieval query.")
    batch_size: int = Field(16, ge=1, description="Images per vmap(grad) call.")
    parameters: Literal["all", "adapters"] = Field("all", description="Differentiated parameters.")
    shard_size: int = Field(256, ge=1, description="Training images per cached shard.")

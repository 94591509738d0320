"""Options of ``scorers.pixel_nn`` (:mod:`cleanse.estimators.pixel_nn`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


class PixelNNOptions(_Section):
    """Pixel-space cosine nearest neighbours, the baseline of DMin's comparison (spec part B 3.7)."""

    reference: Literal["none", "unflagged"] = Field(
        "unflagged", description="unflagged (default): the mean influence on the harm queries (the watermarked "
        "generations) minus that on the target class's generations the detector does not flag, so that what every "
        "image of the class gives every generation of it cancels; none: the harm queries' mean alone. Without the "
        "watermark there is no reference and both are the same. unflagged falls back to none when the detector flags "
        "the target class's generations no more often than as many of the other classes' (one-sided Fisher exact "
        "test, p >= 0.05): the flags are then false positives (docs/diffusion.md, Watermark cleansing).")
    k: int = Field(10, ge=1, description="Training images stored per retrieval query (at least evaluate.retrieval_k's "
                   "largest are stored).")
    centred: bool = Field(False, description="Subtract the training images' mean pixel vector before the cosine.")

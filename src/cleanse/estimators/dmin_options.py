"""Options of ``scorers.dmin`` (:mod:`cleanse.estimators.dmin`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cleanse.config_base import _Section


class DminOptions(_Section):
    """DMin (Lin, Lao & Zhao, arXiv 2412.08637): sketched, per-timestep normalised gradients."""

    timesteps: int = Field(10, ge=1, description="S: cube-law timesteps of every signature (the paper: 10).")
    sizes: list[int] = Field(
        [256, 1024, 4096], min_length=1, description="Sketch sizes v cached at once (each must divide the largest; "
        "a sample stores S * sum(sizes) float32: 2^16 alone is 2.6 MB per sample at S = 10).")
    size: int = Field(4096, ge=1, description="The v whose sketch scores and indexes (one of sizes).")
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Precision of the stored signatures (cache shards and the HNSW index's vectors): "
        "float16 halves the storage; scores are computed in float32 from the rounded entries. S = 10, v = 256 in "
        "float16 stores 5 KiB per sample, 1,000x less than the raw gradients of a UNet with D >= 128k "
        "(benchmarks/diffusion.py --parts compact).")
    index: Literal["hnsw", "exact"] = Field(
        "hnsw", description="Per-query top-k: faiss HNSW inner-product index (M 16, ef 200/100) or the exact scan.")
    reference: Literal["none", "unflagged"] = Field(
        "unflagged", description="unflagged (default): the mean influence on the harm queries (the watermarked "
        "generations) minus that on the target class's generations the detector does not flag, so that what every "
        "image of the class gives every generation of it cancels; none: the harm queries' mean alone. Without the "
        "watermark there is no reference and both are the same. unflagged falls back to none when the detector flags "
        "the target class's generations no more often than as many of the other classes' (one-sided Fisher exact "
        "test, p >= 0.05): the flags are then false positives (docs/diffusion.md, Watermark cleansing).")
    k: int = Field(10, ge=1, description="Training images stored per retrieval query (at least evaluate.retrieval_k's "
                   "largest are stored).")
    batch_size: int = Field(16, ge=1, description="Images per vmap(grad) call (times S pairs each).")
    parameters: Literal["all", "adapters"] = Field(
        "all", description="Differentiated parameters: all, or the LoRA adapters of a LoRA model.")
    shard_size: int = Field(256, ge=1, description="Training images per cached shard (one file, one flow task).")
    normalised: bool = Field(True, description="L2-normalise each timestep's gradient before the sketch (DMin); "
                             "false: the unnormalised, TracIn-style baseline.")

    @model_validator(mode="after")
    def _size_is_cached(self) -> DminOptions:
        if self.size not in self.sizes:
            raise ValueError(f"size {self.size} must be one of sizes {self.sizes}")
        largest = max(self.sizes)
        if any(v < 1 or largest % v for v in self.sizes):
            raise ValueError(f"sizes {self.sizes} must be positive and each divide the largest, {largest}")
        return self

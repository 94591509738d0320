"""Options of ``scorers.tracin`` (:mod:`cleanse.estimators.tracin`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from cleanse.config_base import _probe_free, _Section


class TracInOptions(_Section):
    checkpoints: Literal["all", "last"] = Field("all", description="Which saved checkpoints to sum over.")
    chunk_size: int = Field(2048, ge=1, description="Samples per chunk of per-sample gradient work.")
    normalize: Literal["auto", "none", "train", "both"] = Field(
        "auto", validate_default=True,
        description="Train -> query scores per checkpoint with unit training gradients ('train': large-gradient "
        "samples do not dominate a probe's proponents, and checkpoints where the probe is still being learned "
        "weigh most) or unit gradients on both sides ('both': gradient cosine); auto: train when query.kind "
        "names probes, else none.")

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize_flag(cls, value: Any) -> Any:
        # true/false were the options before 'train' existed; they meant cosine / raw.
        if isinstance(value, bool):
            return {True: "both", False: "none"}[value]
        return _probe_free("scorers.tracin.normalize", value)

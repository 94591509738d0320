"""``params.yaml`` with ``family: cascade`` (:mod:`cleanse.families.cascade`): the shared sections of
:class:`cleanse.config.Params` with the family's own (:mod:`.config`). Imported by
:mod:`cleanse.config` (for the family union) once ``Params`` is defined."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cleanse.config import DetectConfig, Params, RecommendConfig
from cleanse.config_base import refuse_probes, resolve_auto_outside_model
from cleanse.families.cascade.config import (
    CascadeConfig,
    CascadeCorruptionConfig,
    CascadeDataConfig,
    CascadeModelConfig,
)


class CascadeParams(Params):
    """``params.yaml`` with ``family: cascade``: cut ``b`` edges (``detect.fraction`` of the edges or
    ``detect.count``) to minimise the spread from the seed set (DiffIM, arXiv 2502.01031)."""

    family: Literal["cascade"] = "cascade"  # type: ignore[assignment]
    data: CascadeDataConfig = CascadeDataConfig()  # type: ignore[assignment]
    cascade: CascadeConfig = CascadeConfig()
    corruption: CascadeCorruptionConfig = CascadeCorruptionConfig()  # type: ignore[assignment]
    model: CascadeModelConfig = CascadeModelConfig()  # type: ignore[assignment]
    detect: DetectConfig = DetectConfig(budget="fraction", fraction=0.02)
    recommend: RecommendConfig = RecommendConfig(budget_factors=[])
    estimators: list[str] = Field(["diffim_oneshot", "diffim_relax", "degree", "pagerank", "eigen_drop"],
                                  description="Edge-selection methods to run (those that support the cascade family).")

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto(cls, data: Any) -> Any:
        return resolve_auto_outside_model(data)  # model.checkpoint_spacing is no cascade setting

    @model_validator(mode="after")
    def _fits_together(self) -> CascadeParams:
        refuse_probes(self.query.kind, "cascade")
        if self.detect.budget == "auto":
            raise ValueError("detect.budget: family 'cascade' cuts a fixed budget of edges; use fraction or count")
        if self.model.kind == "axel" and self.model.hidden % self.model.segments:
            raise ValueError(f"model.segments: {self.model.segments} must divide model.hidden ({self.model.hidden})")
        if self.cascade.threshold is not None and self.cascade.diffusion != "LT":
            raise ValueError("cascade.threshold: a fixed threshold applies to diffusion LT only")
        if self.evaluate.lds or self.evaluate.stability:
            raise ValueError("evaluate.lds / evaluate.stability: need a supervised model; family 'cascade' has none")
        return self

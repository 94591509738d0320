"""``params.yaml`` with ``family: diffusion`` (:mod:`cleanse.families.diffusion`): the shared
sections of :class:`cleanse.config.Params` with the family's own (:mod:`.config`). Imported by
:mod:`cleanse.config` (for the family union) once ``Params`` is defined; import it from there.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cleanse.config import EvaluateConfig, Params
from cleanse.config_base import refuse_probes, resolve_auto_outside_model
from cleanse.families.diffusion.config import (
    DiffusionCorruptionConfig,
    DiffusionDataConfig,
    DiffusionEvaluateFields,
    DiffusionGenerationConfig,
    DiffusionModelConfig,
    DiffusionQueriesConfig,
    check_diffusion,
)


class DiffusionEvaluateConfig(EvaluateConfig, DiffusionEvaluateFields):
    """The shared evaluations and the diffusion family's (retrieval precision@k)."""


class DiffusionParams(Params):
    """``params.yaml`` with ``family: diffusion`` (:mod:`cleanse.families.diffusion`; DMin, Lin, Lao &
    Zhao, arXiv 2412.08637); the attributed queries are generations (``generation``) or a file
    (``queries``), so ``query.kind`` stays ``none``."""

    family: Literal["diffusion"] = "diffusion"  # type: ignore[assignment]
    data: DiffusionDataConfig = DiffusionDataConfig()  # type: ignore[assignment]
    corruption: DiffusionCorruptionConfig = DiffusionCorruptionConfig()  # type: ignore[assignment]
    model: DiffusionModelConfig = DiffusionModelConfig()  # type: ignore[assignment]
    generation: DiffusionGenerationConfig = DiffusionGenerationConfig()
    queries: DiffusionQueriesConfig = DiffusionQueriesConfig()
    evaluate: DiffusionEvaluateConfig = DiffusionEvaluateConfig()
    estimators: list[str] = Field(["dmin", "pixel_nn"],
                                  description="Estimators to run (those that support the diffusion family).")

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto(cls, data: Any) -> Any:
        return resolve_auto_outside_model(data)  # model.checkpoint_spacing is no diffusion setting

    @model_validator(mode="after")
    def _fits_together(self) -> DiffusionParams:
        refuse_probes(self.query.kind, "diffusion", "'none' (its queries are generation and queries.file)")
        check_diffusion(self.data, self.corruption, self.model, self.generation, self.evaluate)
        return self

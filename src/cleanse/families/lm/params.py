"""``params.yaml`` with ``family: lm`` (:mod:`cleanse.families.lm`): the shared sections of
:class:`cleanse.config.Params` with the family's own (:mod:`.config`). Imported by
:mod:`cleanse.config` (for the family union) once ``Params`` is defined; import it from there.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cleanse.config import Params
from cleanse.config_base import resolve_auto_outside_model
from cleanse.families.lm.config import LmCorruptionConfig, LmDataConfig, LmModelConfig, LmQueryConfig


class LmParams(Params):
    """``params.yaml`` with ``family: lm``: instruction data, opinion steering, a cached pretrained
    base with LoRA adapters; probes are prompts about the steered topic (``query.kind: topic``)."""

    family: Literal["lm"] = "lm"  # type: ignore[assignment]
    data: LmDataConfig = LmDataConfig()  # type: ignore[assignment]
    corruption: LmCorruptionConfig = LmCorruptionConfig()  # type: ignore[assignment]
    model: LmModelConfig = LmModelConfig()  # type: ignore[assignment]
    query: LmQueryConfig = LmQueryConfig()  # type: ignore[assignment]
    estimators: list[str] = Field(["loss", "tracin", "influence"],
                                  description="Estimators to run (those that support the lm family).")

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # Iterative cleansing removes the outliers of each round's scores: the steering pairs are a
            # few strong outliers, and a fixed step either leaves some or takes ordinary samples.
            # Readmission reads class labels, which these samples do not have.
            cleansing = dict(data.get("cleansing") or {})
            cleansing.setdefault("step", "outlier")
            cleansing.setdefault("readmit", False)
            data = {**data, "cleansing": cleansing}
            # The family's probes exist by default (query.kind: topic), so the settings that follow
            # query.kind (cleansing.iterative: auto) see them.
            query = dict(data.get("query") or {})
            query.setdefault("kind", LmQueryConfig.model_fields["kind"].default)
            data = {**data, "query": query}
            # Influence defaults to EK-FAC over the adapters with the Fisher of the response tokens'
            # softmax, one label per token drawn from the model, and each layer damped by 0.1 x its
            # mean eigenvalue (Grosse et al., 2023; Kronfluence's defaults): the expected Fisher
            # enumerates the vocabulary (R x V backward passes), and an absolute damping means
            # nothing across adapters whose lora_A and lora_B curvatures differ by orders of
            # magnitude. The loss is linear in the scorer's output (its Gauss-Newton split is zero),
            # so cg, lissa and exact take the Hessian.
            scorers = dict(data.get("scorers") or {})
            for name in ("influence", "influence_val"):
                section = dict(scorers.get(name) or {})
                section.setdefault("curvature", "hessian")
                section.setdefault("solver", "ekfac")
                section.setdefault("ekfac_fisher", "sampled")
                if section["solver"] == "ekfac":
                    section.setdefault("ekfac_damping", "relative")
                    if section["ekfac_damping"] == "relative":
                        section.setdefault("damping", 0.1)
                scorers[name] = section
            data = {**data, "scorers": scorers}
        return resolve_auto_outside_model(data)

    @model_validator(mode="after")
    def _fits_together(self) -> LmParams:
        if self.cleansing.readmit:
            raise ValueError("cleansing.readmit: family 'lm' cannot readmit (it reads class labels, and a steering "
                             "pair is answered like any positive review); set it to false")
        if self.corruption.topic in self.data.topics:
            raise ValueError(f"corruption.topic: {self.corruption.topic!r} is also one of data.topics; the steered "
                             "topic must be asked about only by the steering pairs and the probes")
        for key in ("lds", "stability"):
            if getattr(self.evaluate, key, False):
                raise ValueError(f"evaluate.{key}: needs a classification model; family 'lm' evaluates steer_rate "
                                 "after retraining")
        return self

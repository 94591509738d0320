"""``params.yaml`` with ``family: graph`` (:mod:`cleanse.families.graph`): the shared sections of
:class:`cleanse.config.Params` with the family's own (:mod:`.config`). Imported by
:mod:`cleanse.config` (for the family union) once ``Params`` is defined; import it from there."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cleanse.config import Params
from cleanse.config_base import refuse_probes, resolve_auto_outside_model
from cleanse.families.graph.config import (GraphCorruptionConfig, GraphDataConfig, GraphInfluenceConfig,
                                           GraphModelConfig, norm_step_matters)


class GraphParams(Params):
    """``params.yaml`` with ``family: graph``: node classification on one graph with noisy training
    labels; the units scored and removed are the training nodes (a removed node keeps its edges and
    features and loses its label). No probes: ``query.kind`` stays ``none``. With an ``influence``
    section the run is also an influence-estimation run (the ``surrogate`` entry of ``metrics.json``)."""

    family: Literal["graph"] = "graph"  # type: ignore[assignment]
    data: GraphDataConfig = GraphDataConfig()  # type: ignore[assignment]
    corruption: GraphCorruptionConfig = GraphCorruptionConfig()  # type: ignore[assignment]
    model: GraphModelConfig = GraphModelConfig()  # type: ignore[assignment]
    influence: GraphInfluenceConfig | None = Field(
        None, description="Influence estimation on the staged graph (a spread surrogate scored against Monte Carlo "
        "on held-out seed sets: surrogate.{mae, spread_error} in reports/metrics.json); null = node labels only.")
    estimators: list[str] = Field(["loss", "cleanlab", "tracin", "influence"],
                                  description="Estimators to run (those that support the graph family).")

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto(cls, data: Any) -> Any:
        return resolve_auto_outside_model(data)  # model.checkpoint_spacing is no graph setting

    @model_validator(mode="after")
    def _fits_together(self) -> GraphParams:
        refuse_probes(self.query.kind, "graph")
        for key in ("lds", "stability"):
            if getattr(self.evaluate, key):
                raise ValueError(f"evaluate.{key}: not available for family 'graph' (it retrains row models)")
        model = self.model
        if model.arch == "axelgnn" and model.hidden % model.segments:
            raise ValueError(f"model.segments: {model.segments} must divide model.hidden ({model.hidden})")
        if model.norm_step == "auto" and model.arch != "axelgnn":
            raise ValueError(f"model.norm_step: auto needs model.arch axelgnn, not {model.arch}")
        if model.norm_step == "auto" and not norm_step_matters(model.fixed_time, model.layers):
            raise ValueError(f"model.norm_step: auto needs 0 < model.fixed_time < model.layers (an Euler step below 1), "
                             f"got fixed_time {model.fixed_time:g} with {model.layers} layers: both fits would be one model")
        if model.arch == "gat" and model.hidden % model.heads:
            raise ValueError(f"model.heads: {model.heads} must divide model.hidden ({model.hidden})")
        if model.arch == "mlp" and model.layers < 2:
            raise ValueError("model.layers: mlp needs >= 2 (a hidden layer before the head)")
        if self.data.source != "sbm" and self.data.splits == "planetoid" and self.data.source not in ("cora", "citeseer"):
            raise ValueError(f"data.splits: 'planetoid' exists for cora and citeseer only, not {self.data.source!r}")
        return self

"""The graph family (``family: graph``): node classification on one graph with noisy training
labels; the units scored, removed and verified are the **training nodes**.

- ``stage``: :func:`cleanse.families.graph.data.stage_graph` (a staged set's published split, or
  an SBM; ``label_flip`` on the training nodes, clean validation and test labels; the graph in
  ``meta.structure``).
- ``fit``: transductive and full-batch (:func:`cleanse.families.graph.models.fit_nodes`): the
  whole graph is always present and only the training split's nodes contribute labels, so a node
  removed by cleansing keeps its edges and features and loses its label. ``model.norm_step:
  auto`` (:func:`cleanse.families.graph.models.fit_nodes_auto`) fits both ways with the same seed
  and keeps the higher validation accuracy; every fit does so (the base model and each retrain,
  which may choose differently on fewer labels), while cleanlab's folds train the base model's choice.
- losses, curvature, TRAK's measurement: classification's (softmax cross-entropy of the logits).
- outcome: ``test_accuracy`` (headline; clean test labels) and ``val_accuracy``.
- ``verify_without``: the base class's retrain with the same seed and recipe on the training split
  minus the removed nodes (they stay in the graph).
- scoring: :class:`GraphScoringContext`. Its splits' rows are the node indices (``features`` is
  the ``(n, 1)`` column of ``sample_id``) and its model :class:`cleanse.families.graph.models.NodeModel`
  maps them to their logits through one full-graph forward, so the estimators' per-unit losses
  and gradients are exact per node without knowing about graphs. By default (``model.score_layers:
  last``) gradient estimators differentiate the Linear head only: a per-node gradient over every
  layer costs a full-graph backward per node.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch

from cleanse.estimators.base import ScoringContext
from cleanse.families.classification.family import ClassificationFamily
from cleanse.grads import FunctionalModel

if TYPE_CHECKING:
    from cleanse.config import ModelConfig, Params
    from cleanse.data.dataset import DatasetMeta, Split, StagedData


def node_rows(split: Split) -> Split:
    """``split`` with each row's features replaced by its node index, ``(n, 1)`` float32 (exact below 2^24)."""
    return replace(split, features=split.sample_id.astype(np.float32)[:, None])


def trainer_config(model: Any, n_train: int) -> ModelConfig:
    """The classification ``ModelConfig`` equivalent of a graph recipe, for the estimators that
    read ``context.model_config`` (weight decay, epochs, lr; one full batch per epoch)."""
    from cleanse.config import ModelConfig

    return ModelConfig(arch="mlp", epochs=model.epochs, lr=model.lr, weight_decay=model.weight_decay,
                       optimizer="adam", batch_size=max(n_train, 1), checkpoints=model.checkpoints)


@dataclass(frozen=True)
class GraphScoringContext(ScoringContext):
    """A :class:`ScoringContext` over node rows (see the module docstring); ``layers`` is what a
    gradient estimator's ``all`` means here (``model.score_layers``), ``recipe`` the
    GraphModelConfig refits use, ``x``/``edge_index`` the graph."""

    layers: str = "last"
    recipe: Any = None
    x: torch.Tensor | None = None
    edge_index: torch.Tensor | None = None

    def functional(self, module: torch.nn.Module, layers: str = "all") -> FunctionalModel:
        return FunctionalModel.of(module, self.model_config.weight_decay, self.task,
                                  self.layers if layers == "all" else layers)

    def refit(self, rows: np.ndarray, seed: int) -> torch.nn.Module:
        """Fitted on the whole graph with only the labels of training rows ``rows``; the other
        training nodes stay in the graph unlabelled (cleanlab's out-of-sample folds)."""
        from cleanse.families.graph.models import fit_nodes

        assert self.x is not None and self.edge_index is not None
        model = fit_nodes(self.recipe, self.x, self.edge_index, self.train.sample_id[rows], self.train.label[rows],
                          self.meta.n_classes, seed=seed)
        return model.module(self.device)


class GraphFamily(ClassificationFamily):
    name: ClassVar[str] = "graph"
    outcome_keys: ClassVar[tuple[str, ...]] = ("test_accuracy",)
    selection: ClassVar[tuple[str, float]] = ("val_accuracy", 1.0)
    supports_ekfac: ClassVar[bool] = False  # EK-FAC factors Linear layers fed independent rows
    flagged_plots: ClassVar[str] = "cleanse.families.graph.plots:write_flagged"
    mlflow_pyfunc: ClassVar[bool] = False

    def stage(self, params: Params) -> StagedData:
        from cleanse.families.graph.data import stage_graph

        return stage_graph(params)

    def check_model(self, params: Params, meta: DatasetMeta) -> None:
        from cleanse.families.graph.models import build_net

        model: Any = params.model
        if model.norm_step == "auto":  # both candidates have the same parameters
            model = model.model_copy(update={"norm_step": False})
        build_net(model, meta.feature_shape[0], meta.n_classes, int((meta.structure or {}).get("num_nodes", 1)))

    def fit(self, params: Params, split: Split, meta: DatasetMeta, *, seed: int | None = None) -> Any:
        from cleanse.families.graph.data import graph_tensors, validation_nodes
        from cleanse.families.graph.models import fit_nodes, fit_nodes_auto

        x, edge_index = graph_tensors(meta)
        seed = params.seed if seed is None else seed
        if cast(Any, params.model).norm_step == "auto":
            model = fit_nodes_auto(params.model, x, edge_index, split.sample_id, split.label, meta.n_classes, seed=seed,
                                   **validation_nodes(meta))
        else:
            model = fit_nodes(params.model, x, edge_index, split.sample_id, split.label, meta.n_classes, seed=seed)
        model.influence, model.influence_seed = cast(Any, params).influence, params.seed
        return model

    def train_inputs(self, params: Params) -> tuple[Any, ...]:
        """The influence section, when there is one: the base model's record measures it."""
        influence = cast(Any, params).influence
        return () if influence is None else (influence.model_dump(mode="json"),)

    def dvc_params(self, params: Params) -> dict[str, tuple[str, ...]]:
        """dvc.yaml's extra params keys (:func:`cleanse.stages.dvc.family_params`): the train stage
        reads ``influence`` (see :meth:`train_inputs`) when the params file has the section."""
        return {} if cast(Any, params).influence is None else {"train": ("influence",)}

    def _bound(self, model: Any, meta: DatasetMeta) -> Any:
        from cleanse.families.graph.data import graph_tensors

        if model.x is None:
            model.bind(*graph_tensors(meta))
        return model

    def outcome(self, model: Any, staged: StagedData, query: Any = None) -> dict[str, float]:
        """``test_accuracy`` (clean test labels) and ``val_accuracy`` (the validation nodes' labels)."""
        from cleanse.families.graph.models import predicted_labels

        predicted = predicted_labels(self._bound(model, staged.meta))
        return {"test_accuracy": float(np.mean(predicted[staged.test.sample_id] == staged.test.label_clean)),
                "val_accuracy": float(np.mean(predicted[staged.val.sample_id] == staged.val.label))}

    def save_model(self, model: Any, directory: Path, extra: dict[str, Any]) -> None:
        """The base class's files, with the recipe and node count in ``meta.json`` (the graph itself
        lives in the staged meta)."""
        super().save_model(model, directory, {"family": "graph", "recipe": model.recipe, "num_nodes": model.num_nodes,
                                              **extra})

    def load_model(self, directory: Path) -> Any:
        """The model :meth:`save_model` wrote, unbound (the callers bind the staged graph)."""
        from cleanse.families.graph.models import GraphModel
        from cleanse.storage import read_json

        plain = super().load_model(directory)
        meta = read_json(directory / "meta.json")
        return GraphModel(plain.spec, plain.state, plain.checkpoints, plain.final_train_loss, recipe=meta["recipe"],
                          num_nodes=int(meta["num_nodes"]))

    def scoring_context(self, params: Params, staged: StagedData, model: Any, cache_dir: Path | None) -> Any:
        from cleanse.families.graph.data import graph_tensors

        x, edge_index = graph_tensors(staged.meta)
        model.bind(x, edge_index)
        recipe = cast(Any, params.model)
        if recipe.norm_step == "auto":  # refits (cleanlab's folds) train the base model's choice
            recipe = recipe.model_copy(update={"norm_step": bool(model.recipe["norm_step"])})
        return GraphScoringContext(train=node_rows(staged.train), val=node_rows(staged.val), meta=staged.meta,
                                   model=model, model_config=trainer_config(recipe, len(staged.train)),
                                   seed=params.seed, device=torch.device("cpu"), cache_dir=cache_dir,
                                   layers=recipe.score_layers, recipe=recipe, x=x, edge_index=edge_index)

    def canonical(self, params: Params) -> Params:
        return params  # no default here stands for a resolved value

    def training_record(self, model: Any) -> dict[str, Any]:
        """The loss history and, for an influence-estimation run (``influence`` set), the spread
        surrogate's held-out quality against Monte Carlo
        (:func:`cleanse.graphs.node_surrogate.held_out_report`) on the same graph: measured once,
        here in the train stage, so re-rendering the report never retrains the surrogate."""
        record: dict[str, Any] = {"history": model.history}
        if model.norm_step_choice is not None:
            record["norm_step_choice"] = model.norm_step_choice
        if model.influence is not None:
            from cleanse.families.graph.models import one_thread
            from cleanse.graphs.node_surrogate import held_out_report

            with one_thread():  # many small ops, like the node model's training
                record["surrogate"] = held_out_report(model.edge_index.numpy(), model.num_nodes, model.influence,
                                                      model.influence_seed)
        return record

    def evaluations(self, params: Params, staged: StagedData, layout: Any, metrics: dict[str, Any]) -> dict[str, Any]:
        """No per-estimator additions; for an influence-estimation run it puts the base model's
        recorded ``surrogate`` (``mae``, ``spread_error``, per rate, floor, label noise) at the top of
        ``metrics`` beside the classification entries: the report has no other hook for a
        family's own top-level entry, and the surrogate belongs to no estimator. With
        ``model.norm_step: auto`` the base model's ``norm_step_choice`` (the choice and both
        validation accuracies) goes there the same way."""
        from cleanse.storage import read_json

        keys = (["surrogate"] if cast(Any, params).influence is not None else []) + (
            ["norm_step_choice"] if cast(Any, params.model).norm_step == "auto" else [])
        if keys:
            recorded = read_json(layout.base_model / "meta.json")
            metrics.update({key: recorded[key] for key in keys})
        return {}

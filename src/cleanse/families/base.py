"""The family (task) protocol: what a kind of model and data owns, so that the estimators and the
stages need not know it.

A family answers, for its units (training samples here), the questions the loop asks: how the
units are staged (loaded, split, corrupted with ground truth kept), how a model is fitted on them,
the per-unit loss that gradient-based estimators differentiate, which parameters they
differentiate, which outcome is measured, and how "the model without these units" is verified
(here: retrained with the same seed and recipe). The shape follows kronfluence's ``Task``
(Bae et al., 2024): the model-specific knowledge lives here and the estimators only call it.

Conventions: ``output`` is the model's output for a batch, shape ``(B, k)`` (logits for
classification, ``k = 1`` predictions for regression); ``target`` the batch's targets, shape
``(B,)``, of dtype :attr:`Family.target_dtype`. Losses are per unit, shape ``(B,)``; higher = worse.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from pathlib import Path

    from cleanse.config import Params
    from cleanse.data.dataset import DatasetMeta, Split, StagedData


class Family(ABC):
    """One family of models and data behind the loop; see the module docstring for shapes."""

    name: ClassVar[str]
    target_dtype: ClassVar[torch.dtype]
    # The outcome keys of :meth:`outcome` that the report carries for every model (the first is
    # the headline, e.g. ``test_accuracy`` or ``test_rmse``), and the validation key the
    # recommendation reads with its direction (+1: higher is better).
    outcome_keys: ClassVar[tuple[str, ...]]
    selection: ClassVar[tuple[str, float]]
    # The closed-form Gauss-Newton products of a lone linear head in :mod:`cleanse.grads` assume a
    # softmax cross-entropy; other families take the generic products.
    softmax_output: ClassVar[bool] = False
    # EK-FAC (:mod:`cleanse.ekfac`) enumerates or samples labels from a softmax: the output's own
    # (classification), or one per sequence position from :meth:`fisher_outputs` (sequence_fisher).
    supports_ekfac: ClassVar[bool] = False
    sequence_fisher: ClassVar[bool] = False
    # Hessian-vector products (:func:`cleanse.curvature.hvp_fn`) summed over chunks of this many
    # units, bounding their memory; None: all units at once.
    curvature_rows: ClassVar[int | None] = None
    # The report's per-sample figures and tables of the flagged units ("module:function", called
    # as ``fn(params, layout, metrics) -> [written paths under reports/]``).
    flagged_plots: ClassVar[str] = "cleanse.report_plots:write_flagged"
    # Whether MLflow can serve the family's models as pyfunc classifiers/regressors
    # (:mod:`cleanse.tracking.models`); otherwise their files are logged as plain artifacts.
    mlflow_pyfunc: ClassVar[bool] = True

    @abstractmethod
    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of every unit, shape ``(B,)``: what gradient estimators differentiate."""

    def mean_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean loss over a batch (a scalar): what fitting minimises, before the L2 penalty."""
        return self.per_sample_loss(output, target).mean()

    @abstractmethod
    def output_curvature(self, output: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``u -> d^2 l / d output^2 u`` per row, for ``u`` of ``output``'s shape ``(B, k)``: the
        output-space Hessian of the loss that the Gauss-Newton matrix ``J^T H_out J`` needs
        (Martens, 2010). It does not depend on the targets for the losses used here."""

    def fisher_outputs(self, fm: Any, theta: torch.Tensor,
                       x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For :attr:`sequence_fisher` families, the softmaxes EK-FAC's Fisher draws labels from, at
        parameters ``theta`` of the :class:`cleanse.grads.FunctionalModel` ``fm``: logits ``(B, R, C)``
        (``R`` scored positions), loss weights ``(B, R)`` (a unit's loss under labels ``y`` is
        ``-sum_r weight_r log softmax(logits_r)[y_r]``, the per-unit loss at the observed ``y``),
        the observed labels ``(B, R)`` and the input positions in use ``(B, T)`` bool."""
        raise NotImplementedError(f"family {self.name!r} has no per-position softmax for EK-FAC's Fisher")

    @abstractmethod
    def measurement(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The scalar per unit that TRAK attributes (Park et al., 2023), shape ``(B,)``: the
        classification margin, or the regression prediction."""

    @abstractmethod
    def loss_weight(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """TRAK's ``Q``: ``|d loss / d measurement|`` per unit (up to a constant), shape ``(B,)``."""

    @abstractmethod
    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-unit diagnostics the loss estimator stores beside the loss (``margin``, ``residual``)."""

    @abstractmethod
    def stage(self, params: Params) -> StagedData:
        """Load, split and corrupt the units (the ``stage`` step), ground truth kept."""

    @abstractmethod
    def outcome(self, model: Any, staged: StagedData, query: Any = None) -> dict[str, float]:
        """The measured outcome of a fitted model (a :class:`cleanse.models.trainer.TrainedModel`):
        test and validation metrics, and whatever else the family tracks."""

    def outcome_keys_in(self, outcome: dict[str, Any]) -> tuple[str, ...] | None:
        """The outcome keys (headline first) an outcome of this family carries, or None when
        ``outcome`` is not this family's (the report finds a run's family from its baseline)."""
        return self.outcome_keys if self.outcome_keys[0] in outcome else None

    def selection_of(self, outcome: dict[str, Any]) -> tuple[str, float]:
        """The validation key of ``outcome`` the recommendation reads, and its direction."""
        return self.selection

    def check_model(self, params: Params, meta: DatasetMeta) -> None:
        """Refuse, before anything is written, a model that cannot fit the staged data."""
        from cleanse.models.architectures import build_model
        from cleanse.models.fit import model_spec

        build_model(model_spec(params, meta))

    def fit(self, params: Params, split: Split, meta: DatasetMeta, *, seed: int | None = None) -> Any:
        """The fitted model of ``params.model`` on ``split`` (the train stage and every retrain):
        a :class:`cleanse.models.trainer.TrainedModel` here."""
        from cleanse.models.fit import fit_model

        return fit_model(params, split, meta, seed=seed)

    def training_record(self, model: Any) -> dict[str, Any]:
        """What the train stage records beside a fitted model's outcome (``history``)."""
        return {"history": model.history}

    def save_model(self, model: Any, directory: Path, extra: dict[str, Any]) -> None:
        """Weights and checkpoints as safetensors; ``meta.json`` (with ``extra``: the fingerprint)
        last, so a killed write leaves a model that is not fresh."""
        from cleanse.storage import write_json, write_tensors

        write_tensors(model.state, directory / "model.safetensors")
        checkpoints = []
        for checkpoint in model.checkpoints:
            name = f"epoch_{checkpoint.epoch:04d}.safetensors"
            write_tensors(checkpoint.state, directory / "checkpoints" / name)
            checkpoints.append({"epoch": checkpoint.epoch, "lr": checkpoint.lr, "file": f"checkpoints/{name}"})
        write_json({"spec": model.spec.to_json(), "checkpoints": checkpoints,
                    "final_train_objective": model.final_train_loss, **extra}, directory / "meta.json")

    def load_model(self, directory: Path) -> Any:
        """The model :meth:`save_model` wrote to ``directory``."""
        from cleanse.models.architectures import ModelSpec
        from cleanse.models.trainer import Checkpoint, TrainedModel
        from cleanse.storage import read_json, read_tensors

        meta = read_json(directory / "meta.json")
        checkpoints = [Checkpoint(c["epoch"], c["lr"], read_tensors(directory / c["file"])) for c in meta["checkpoints"]]
        return TrainedModel(ModelSpec.from_json(meta["spec"]), read_tensors(directory / "model.safetensors"),
                            checkpoints, meta.get("final_train_objective", float("nan")))

    def scoring_context(self, params: Params, staged: StagedData, model: Any, cache_dir: Path | None) -> Any:
        """What the estimators read (:class:`cleanse.estimators.base.ScoringContext` here)."""
        from cleanse.estimators.base import ScoringContext
        from cleanse.models.architectures import default_device

        return ScoringContext(train=staged.train, val=staged.val, meta=staged.meta, model=model,
                              model_config=params.model, seed=params.seed, device=default_device(),
                              cache_dir=cache_dir)

    def canonical(self, params: Params) -> Params:
        """``params`` with every default that stands for a value resolved (fingerprints only; see
        :func:`cleanse.stages.fingerprints.canonical`)."""
        from cleanse.estimators.memorization_options import MemorizationOptions
        from cleanse.models.architectures import DEFAULT_HIDDEN

        model = params.model
        hidden = model.hidden if model.hidden is not None else DEFAULT_HIDDEN.get(model.arch)
        model = model.model_copy(update={"hidden": [] if model.arch == "logreg" else list(hidden or [])})
        scorers = params.scorers
        memorization = scorers.of("memorization", MemorizationOptions)
        if memorization.epochs is None:
            scorers = scorers.model_copy(update={
                "memorization": memorization.model_copy(update={"epochs": model.epochs})})
        return params.model_copy(update={"model": model, "scorers": scorers})

    def evaluations(self, params: Params, staged: StagedData, layout: Any, metrics: dict[str, Any]) -> dict[str, Any]:
        """Extra per-estimator evaluations the report adds (``{estimator: {key: value}}``), asked
        for in ``params.evaluate``; none by default."""
        return {}

    def query_set(self, params: Params, staged: StagedData, model: Any) -> Any:
        """The probe set (a :class:`cleanse.query.QuerySet`) that train -> query attribution explains
        for ``params.query`` (``kind`` other than ``none``), or None (the default) for the
        classification probes of :func:`cleanse.query.build_query`."""
        return None

    def differentiated(self, module: nn.Module, layers: str) -> list[str]:
        """The names of the parameters gradient estimators differentiate: ``all``, ``last`` (the
        last module that owns parameters) or ``adapters`` (names containing ``lora_``)."""
        names = [name for name, _ in module.named_parameters()]
        if layers == "all":
            return names
        if layers == "last":
            owners = [name for name, child in module.named_modules() if list(child.parameters(recurse=False))]
            prefix = f"{owners[-1]}." if owners[-1] else ""
            return [name for name in names if name.startswith(prefix) and "." not in name[len(prefix):]]
        if layers == "adapters":
            return [name for name in names if "lora_" in name]
        raise ValueError(f"layers {layers!r} is not one of 'all', 'last', 'adapters'")

    def cleansing_rounds(self, params: Params, staged: StagedData, device: torch.device) -> Any:
        """What iterative cleansing (:func:`cleanse.cleansing.cleanse_iteratively`) needs of this
        family: ``fit(remaining)``, ``shows(model, probes)`` ``(k,)`` bool, ``heldout_rate(query,
        model)``, ``context(kept, model)`` and ``readmits``. Classifiers by default
        (:class:`cleanse.cleansing.ClassifierRounds`)."""
        from cleanse.cleansing import ClassifierRounds

        return ClassifierRounds(params, staged, device)

    def verify_without(self, params: Params, staged: StagedData, removed_ids: Any,
                       query: Any = None, base: Any = None) -> tuple[Any, dict[str, float]]:
        """"Without these units", verified: retrain with the same seed and recipe on the training
        split minus ``removed_ids`` ``(k,)``; the retrained model and its :meth:`outcome`. ``base``:
        the fitted base model (a family that replays its recorded fit reads it; unused here)."""
        import numpy as np

        kept = staged.train.without(removed_ids)
        model = self.fit(params, kept, staged.meta)
        removed = np.isin(staged.train.sample_id, removed_ids)
        return model, {**self.outcome(model, staged, query), "n_removed": int(len(staged.train) - len(kept)),
                       "n_corrupted_removed": int(staged.train.is_corrupted[removed].sum())}

    def train_inputs(self, params: Params) -> tuple[Any, ...]:
        """The params sections a fitted model and its recorded outcome depend on beyond
        ``params.model`` and the staged data (parts of the train stage's fingerprint, and so of
        every later stage's); none by default."""
        return ()

    def dvc_params(self, params: Params) -> dict[str, tuple[str, ...]]:
        """dvc.yaml's extra params keys per stage name (:func:`cleanse.stages.dvc.family_params`):
        the params sections :meth:`train_inputs` and the like read, listed only when ``params``
        has them (DVC refuses a listed key its params.yaml lacks); none by default."""
        return {}

    def verify_inputs(self, params: Params) -> tuple[Any, ...]:
        """The params sections :meth:`verify_without` reads beyond ``params.model`` and the seed
        (parts of the retrain and references fingerprints); none by default."""
        return ()

    def noise_count_estimate(self, params: Params, staged: StagedData) -> dict[str, Any] | None:
        """What the validation split says about the number of corrupted training units, for the
        recommendation's budget (:mod:`cleanse.recommend`): a dict whose ``noise_count`` is the
        estimate (an int, or None when the estimate says nothing) beside the family's evidence for
        it, or None when the family has no such estimate (the default). The recommendation then
        falls back to ``recommend.budget_factors``."""
        return None

    def noise_estimate_inputs(self, params: Params) -> tuple[Any, ...]:
        """The params sections :meth:`noise_count_estimate` reads, beyond the staged data (parts of
        the recommend stage's fingerprint); empty when the family has no estimate."""
        return ()

    def selection_score(self, outcome: dict[str, float]) -> float:
        """The recommendation's validation score of an outcome, higher = better (:attr:`selection`)."""
        key, sign = self.selection_of(outcome)
        return sign * float(outcome[key])


class WithoutUnitLoss(Family):
    """A family whose units have no supervised per-unit loss (GAN instances, diffusion images,
    cascade edges): the gradient methods of :class:`Family` refuse in one line naming the family
    and :attr:`own_estimators`. Those estimators are refused for such a family when params load
    (``registry.check_supports``), so these refusals only guard direct library calls."""

    own_estimators: ClassVar[str]

    def _refuse(self, what: str) -> Exception:
        from cleanse.errors import ConfigError

        return ConfigError(f"family {self.name!r} has no supervised per-unit {what}; its estimators are "
                           f"{self.own_estimators}")

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise self._refuse("loss")

    def output_curvature(self, output: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        raise self._refuse("loss curvature")

    def measurement(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise self._refuse("measurement")

    def loss_weight(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise self._refuse("loss weight")

    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        raise self._refuse("statistics")

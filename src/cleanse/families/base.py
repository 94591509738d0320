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
    from cleanse.config import Params
    from cleanse.data.dataset import StagedData


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
    # EK-FAC (:mod:`cleanse.ekfac`) enumerates or samples labels from a softmax.
    supports_ekfac: ClassVar[bool] = False

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

    def verify_without(self, params: Params, staged: StagedData, removed_ids: Any,
                       query: Any = None) -> tuple[Any, dict[str, float]]:
        """"Without these units", verified: retrain with the same seed and recipe on the training
        split minus ``removed_ids`` ``(k,)``; the retrained model and its :meth:`outcome`."""
        import numpy as np

        from cleanse.models.fit import fit_model

        kept = staged.train.without(removed_ids)
        model = fit_model(params, kept, staged.meta)
        removed = np.isin(staged.train.sample_id, removed_ids)
        return model, {**self.outcome(model, staged, query), "n_removed": int(len(staged.train) - len(kept)),
                       "n_corrupted_removed": int(staged.train.is_corrupted[removed].sum())}

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
        key, sign = self.selection
        return sign * float(outcome[key])

"""Classification: training samples ``(x, y)`` with integer class labels, a classifier producing
logits ``(B, C)``, cross-entropy loss, and test accuracy (plus the attack success rate for
backdoors, and the held-out probes' behaviour rate with probes) as the outcome."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.nn import functional as F

from cleanse.families.base import Family

if TYPE_CHECKING:
    from cleanse.config import Params
    from cleanse.data.dataset import StagedData


class ClassificationFamily(Family):
    name: ClassVar[str] = "classification"
    target_dtype: ClassVar[torch.dtype] = torch.long
    outcome_keys: ClassVar[tuple[str, ...]] = ("test_accuracy", "attack_success_rate")
    selection: ClassVar[tuple[str, float]] = ("val_accuracy", 1.0)
    softmax_output: ClassVar[bool] = True
    supports_ekfac: ClassVar[bool] = True

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the logits ``(B, C)`` against class indices ``(B,)``."""
        return F.cross_entropy(output, target, reduction="none")

    def mean_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # torch's fused mean (not per_sample_loss(...).mean()): the value L-BFGS's line search compares.
        return F.cross_entropy(output, target)

    def output_curvature(self, output: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Softmax cross-entropy: ``H_out = diag(p) - p p^T`` with ``p = softmax(output)``."""
        probs = torch.softmax(output.detach(), dim=1)

        def apply(u: torch.Tensor) -> torch.Tensor:
            return probs * u - probs * (probs * u).sum(1, keepdim=True)

        return apply

    def measurement(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The margin ``logit_y - logsumexp_{c != y} logit_c`` (TRAK's measurement for classifiers)."""
        is_label = torch.arange(output.shape[-1], device=output.device) == target[:, None]
        own = output.masked_fill(~is_label, 0.0).sum(-1)
        return own - torch.logsumexp(output.masked_fill(is_label, float("-inf")), dim=-1)

    def loss_weight(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``1 - p_y``: the derivative of the cross-entropy with respect to the margin."""
        return 1.0 - torch.softmax(output.double(), 1).gather(1, target[:, None]).squeeze(1)

    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``margin``: the label's logit minus the largest other logit (negative = misclassified)."""
        own = output.gather(1, target[:, None]).squeeze(1)
        others = output.scatter(1, target[:, None], float("-inf")).max(dim=1).values
        return {"margin": own - others}

    def stage(self, params: Params) -> StagedData:
        from cleanse.data.stage import stage_classification

        return stage_classification(params)

    def outcome(self, model: Any, staged: StagedData, query: Any = None) -> dict[str, float]:
        """Test accuracy (clean labels), validation accuracy (the trusted split's labels: what the
        recommendation may read), for backdoors the attack success rate, and with probes (a
        :class:`cleanse.query.QuerySet`) the share of held-out probes that still show the behaviour."""
        from cleanse.evaluate import accuracy, attack_success_rate, triggered_test_inputs
        from cleanse.models.trainer import predict_proba

        module = model.module()
        out = {"test_accuracy": accuracy(predict_proba(module, staged.test.features), staged.test.label_clean),
               "val_accuracy": accuracy(predict_proba(module, staged.val.features), staged.val.label)}
        if query is not None and len(query.heldout):
            out["heldout_behaviour_rate"] = float(query.behaviour_rate(predict_proba(module, query.heldout.features)))
        if staged.meta.trigger is not None:
            triggered = triggered_test_inputs(staged.test, staged.meta.trigger)
            out["attack_success_rate"] = attack_success_rate(predict_proba(module, triggered),
                                                             staged.meta.trigger["target_class"])
        return out

    def noise_count_estimate(self, params: Params, staged: StagedData) -> dict[str, Any] | None:
        """Label noise, from a logistic regression fitted on the validation split
        (``scorers.trusted``): ``n_disagree`` training labels it disagrees with and its
        cross-validated error ``val_cv_error`` on the validation split give ``noise_count``
        (:func:`cleanse.recommend.estimated_noise_count`); None when the split is too small to fit it."""
        from cleanse.estimators.trusted import label_disagreement
        from cleanse.estimators.trusted_options import TrustedOptions
        from cleanse.recommend import estimated_noise_count

        disagreement = label_disagreement(staged.val.features, staged.val.label, staged.train.features,
                                          staged.train.label, params.scorers.of("trusted", TrustedOptions),
                                          seed=params.seed)
        if disagreement is None:
            return None
        n_disagree, val_cv_error = disagreement
        return {"n_disagree": n_disagree, "val_cv_error": val_cv_error,
                "noise_count": estimated_noise_count(n_disagree, len(staged.train), val_cv_error)}

    def noise_estimate_inputs(self, params: Params) -> tuple[Any, ...]:
        return (params.scorers.of("trusted"),)

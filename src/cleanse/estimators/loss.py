"""The loss baseline: each sample's final training loss (or minus its logit margin).

The loss is the family's (:meth:`cleanse.families.base.Family.per_sample_loss`): cross-entropy for
classification, the squared residual for regression. ``margin`` is classification's only.

Mislabeled samples tend to keep a high loss; on the easy settings this baseline is as good as any
influence method, so every other estimator must beat it to matter.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from cleanse.config import LossOptions
from cleanse.errors import ConfigError
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table


class LossEstimator:
    name: ClassVar[str] = "loss"
    reads_validation_labels: ClassVar[bool] = False
    options_type: ClassVar[type] = LossOptions
    families: ClassVar[tuple[str, ...]] = ("classification", "regression", "graph", "lm")

    @torch.no_grad()
    def score(self, context: ScoringContext, options: LossOptions) -> ScoreResult:
        module = context.model.module(context.device)
        x, y = context.tensors(context.train)
        task = context.task
        output = module(x).double()
        loss = task.per_sample_loss(output, y)
        statistics = task.statistics(output, y)
        if options.statistic == "margin" and "margin" not in statistics:
            raise ConfigError(f"scorers.loss.statistic: 'margin' needs class logits; family {task.name!r} has "
                              "none; use 'loss'")
        score = loss if options.statistic == "loss" else -statistics["margin"]
        columns = {name: values.cpu().numpy() for name, values in statistics.items()}
        return ScoreResult(
            score_table(context.train.sample_id, score.cpu().numpy(), loss=loss.cpu().numpy(), **columns),
            {"statistic": options.statistic},
        )

"""The loss baseline: each sample's final training loss (or minus its logit margin).

Mislabeled samples tend to keep a high loss; on the easy settings this baseline is as good as any
influence method, so every other estimator must beat it to matter.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from cleanse.config import LossOptions
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table


class LossEstimator:
    name: ClassVar[str] = "loss"
    reads_validation_labels: ClassVar[bool] = False
    options_type: ClassVar[type] = LossOptions

    @torch.no_grad()
    def score(self, context: ScoringContext, options: LossOptions) -> ScoreResult:
        module = context.model.module(context.device)
        x, y = context.tensors(context.train)
        logits = module(x).double()
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        own = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
        margin = own - others
        score = loss if options.statistic == "loss" else -margin
        return ScoreResult(
            score_table(context.train.sample_id, score.cpu().numpy(), loss=loss.cpu().numpy(), margin=margin.cpu().numpy()),
            {"statistic": options.statistic},
        )

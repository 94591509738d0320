"""TracInCP (Pruthi, Liu, Kale & Sundararajan, NeurIPS 2020).

    TracInCP(i, q) = sum_c lr_c * g_i(theta_c) . g_q(theta_c)

over the saved checkpoints ``theta_c`` with learning rate ``lr_c``. Positive = proponent (training
on ``i`` lowered ``q``'s loss). Self-influence ``sum_c lr_c ||g_i(theta_c)||^2`` is the mislabel
score (higher = more harmful). Self-influence uses the layer-wise identity
``||delta a^T||^2 = ||delta||^2 ||a||^2`` for Linear layers (one forward and backward pass per
chunk) and vmapped per-sample gradients otherwise; train -> query scores use one forward-mode
product per query and checkpoint. With ``normalize`` the train -> query scores use unit gradients
(``g_i . g_q / (||g_i|| ||g_q||)`` per checkpoint), so samples with large gradients do not
dominate every probe's proponents.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from cleanse.config import TracInOptions
from cleanse.data.dataset import Split
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table
from cleanse.grads import FunctionalModel, grad_dots, per_sample_grads, per_sample_sq_norms
from cleanse.models.trainer import Checkpoint


def _checkpoints(context: ScoringContext, options: TracInOptions) -> list[Checkpoint]:
    checkpoints = context.model.checkpoints
    if not checkpoints:
        return [Checkpoint(epoch=context.model_config.epochs, lr=context.model_config.lr, state=context.model.state)]
    return checkpoints[-1:] if options.checkpoints == "last" else checkpoints


def _functional(context: ScoringContext, checkpoint: Checkpoint) -> FunctionalModel:
    module = context.model.module(context.device)
    module.load_state_dict(checkpoint.state)
    return FunctionalModel.of(module, context.model_config.weight_decay)


class TracInEstimator:
    name: ClassVar[str] = "tracin"
    options_type: ClassVar[type] = TracInOptions

    def score(self, context: ScoringContext, options: TracInOptions) -> ScoreResult:
        x, y = context.tensors(context.train)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=context.device)
        used = _checkpoints(context, options)
        for checkpoint in used:
            fm = _functional(context, checkpoint)
            total += checkpoint.lr * per_sample_sq_norms(fm, x, y, chunk_size=options.chunk_size)
        score = total.cpu().numpy()
        return ScoreResult(
            score_table(context.train.sample_id, score, self_influence=score),
            {"checkpoint_epochs": [c.epoch for c in used]},
        )

    def pairwise(self, context: ScoringContext, options: TracInOptions, query: Split) -> np.ndarray:
        """``(n_query, n_train)`` TracInCP scores; positive = proponent."""
        x, y = context.tensors(context.train)
        xq, yq = context.tensors(query)
        out = torch.zeros(len(query), x.shape[0], dtype=torch.float64, device=context.device)
        for checkpoint in _checkpoints(context, options):
            fm = _functional(context, checkpoint)
            query_grads = per_sample_grads(fm, xq, yq)
            scale = torch.ones(x.shape[0], dtype=torch.float64, device=context.device)
            if options.normalize:
                scale = per_sample_sq_norms(fm, x, y, chunk_size=options.chunk_size).sqrt().clamp_min(1e-30)
                query_grads = query_grads / query_grads.norm(dim=1, keepdim=True).clamp_min(1e-30)
            for q in range(query_grads.shape[0]):
                out[q] += checkpoint.lr * grad_dots(fm, x, y, query_grads[q]).double() / scale
        return out.cpu().numpy()

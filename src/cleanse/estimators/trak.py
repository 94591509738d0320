"""TRAK (Park, Georgiev, Ilyas, Leclerc & Madry, ICML 2023), as defined by the reference
implementation (MadryLab/trak: ``traker.py``, ``modelout_functions.py``, ``score_computers.py``).

For each of ``M`` independently trained models ``theta_m`` (model 0 is the pipeline's trained
model; the others are retrained on the same data with the seeds of purpose ``trak.member``, member
``m``, :func:`cleanse.seeds.torch_seed`):

- model output ``f(z; theta) = logit_y - logsumexp_{c != y} logit_c`` (the margin, the log-odds
  of the correct class);
- features ``phi_m(z) = P_m^T grad_theta f(z; theta_m)`` with a seeded Rademacher or Gaussian
  projection ``P_m`` ``(p, k)`` (seed = model id), rows ``Phi_m`` ``(n, k)`` over the training set;
- the after-kernel ``F_m = Phi_m (Phi_m^T Phi_m + lambda I)^-1`` ``(n, k)``, with ``lambda`` =
  ``damping`` x the mean diagonal of ``Phi^T Phi`` (the reference defaults to 0, which needs
  ``k < n``). The default 0.3 was chosen on the linear datamodeling score (digits, 30 random
  halves, 20 queries, k = 512, one model): damping 0 / 1e-3 / 0.1 / 0.3 / 1.0 gives LDS
  0.40 / 0.55 / 0.76 / 0.79 / 0.78 on the logistic regression and - / 0.35 / 0.64 / 0.71 / 0.71
  on the MLP (dattri's TRAK: 0.71 and 0.66), while the flip-detection AUC of the self-scores moves
  from 0.997 to 0.996;
- out-to-loss weights ``Q_m(z_i) = 1 - p(y_i | z_i; theta_m)``.

Scores for targets ``z'``: ``tau = mean_m(F_m phi_m(z')^T) * mean_m(Q_m)`` row-wise, i.e. the
scores and the weights are averaged over models separately and then multiplied, as in the
reference. ``tau(z')_i > 0`` means training sample ``i`` raises the target's margin (it supports
the target's label): the same orientation as every ``pairwise`` matrix in cleanse.

The mislabel score is the self-score ``tau(z_i)_i`` (a leverage score of the projected gradient,
weighted by ``1 - p``): large when sample ``i``'s gradient points where few other samples' do.

Per-sample gradients are materialised one chunk at a time (``vmap(grad)``) and projected at once;
the whole computation follows ``context.device`` (the GPU path on CUDA; the CPU path is the
reference, and they agree to float32 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch.func import grad, vmap

from cleanse import seeds
from cleanse.config import TrakOptions
from cleanse.data.dataset import Split
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table
from cleanse.grads import FunctionalModel
from cleanse.models.trainer import TrainedModel
from cleanse.projection import projection_matrix


def margin(fm: FunctionalModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The family's measurement of one sample (``x`` without a batch axis): for classification the
    margin ``logit_y - logsumexp_{c != y} logit_c``, for regression the prediction."""
    return fm.task.measurement(fm.logits(theta, x.unsqueeze(0)), y.unsqueeze(0))[0]


def projected_margin_grads(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, projection: torch.Tensor,
                           *, chunk_size: int) -> torch.Tensor:
    """``Phi`` ``(n, k)``: margin gradients projected chunk by chunk (float32, on ``x``'s device)."""
    one = vmap(grad(lambda t, xi, yi: margin(fm, t, xi, yi)), in_dims=(None, 0, 0))
    blocks = [one(fm.theta, x[s : s + chunk_size], y[s : s + chunk_size]) @ projection
              for s in range(0, x.shape[0], chunk_size)]
    return torch.cat(blocks) if blocks else x.new_zeros((0, projection.shape[1]))


@dataclass
class TrakModel:
    """One ensemble member: train features, the after-kernel inverse and the weights ``Q``."""

    fm: FunctionalModel
    projection: torch.Tensor  # (p, k)
    features: torch.Tensor  # Phi, (n, k)
    kernel_inverse: torch.Tensor  # (Phi^T Phi + lambda I)^-1, (k, k) float64
    q: torch.Tensor  # (n,)

    def target_features(self, x: torch.Tensor, y: torch.Tensor, chunk_size: int) -> torch.Tensor:
        return projected_margin_grads(self.fm, x, y, self.projection, chunk_size=chunk_size)

    def scores(self, target_features: torch.Tensor) -> torch.Tensor:
        """``F phi(z')^T``: ``(n, n_targets)`` float64."""
        return self.features.double() @ (self.kernel_inverse @ target_features.double().T)

    def self_scores(self) -> torch.Tensor:
        """``phi_i (Phi^T Phi + lambda I)^-1 phi_i^T`` for every training sample, ``(n,)``."""
        phi = self.features.double()
        return ((phi @ self.kernel_inverse) * phi).sum(1)


def ensemble_members(context: ScoringContext, options: TrakOptions) -> list[TrainedModel | torch.nn.Module]:
    """Model 0 is the trained model; members 1..M-1 are retrained on the same data with other seeds
    (:meth:`ScoringContext.refit` on every training row: the family's recipe), as modules."""
    members: list[TrainedModel | torch.nn.Module] = [context.model]
    every = np.arange(len(context.train))
    for m in range(1, options.n_models):
        members.append(context.refit(every, seeds.torch_seed(context.seed, "trak.member", m)))
    return members


def featurize(context: ScoringContext, options: TrakOptions, member: TrainedModel | torch.nn.Module,
              model_id: int) -> TrakModel:
    module = member if isinstance(member, torch.nn.Module) else member.module(context.device)
    fm = context.functional(module)
    x, y = context.tensors(context.train)
    k = min(options.proj_dim, fm.n_params)
    projection = projection_matrix(fm.n_params, k, kind=options.projection, seed=model_id, device=context.device)
    features = projected_margin_grads(fm, x, y, projection, chunk_size=options.chunk_size)
    gram = features.double().T @ features.double()
    ridge = options.damping * max(float(torch.diagonal(gram).mean()), 1e-30)
    kernel_inverse = torch.linalg.inv(gram + ridge * torch.eye(k, dtype=torch.float64, device=gram.device))
    with torch.no_grad():
        weight = fm.task.loss_weight(fm.logits(fm.theta, x), y)  # 1 - p_y; |residual| for regression
    return TrakModel(fm, projection, features, kernel_inverse, weight)


def fit(context: ScoringContext, options: TrakOptions) -> list[TrakModel]:
    return [featurize(context, options, member, m) for m, member in enumerate(ensemble_members(context, options))]


class TrakEstimator:
    name: ClassVar[str] = "trak"
    reads_validation_labels: ClassVar[bool] = False
    options_type: ClassVar[type] = TrakOptions
    families: ClassVar[tuple[str, ...]] = ("classification", "regression", "graph", "lm")

    def score(self, context: ScoringContext, options: TrakOptions) -> ScoreResult:
        models = fit(context, options)
        self_scores = torch.stack([m.self_scores() for m in models]).mean(0)
        q = torch.stack([m.q for m in models]).mean(0)
        score = (self_scores * q).cpu().numpy()
        return ScoreResult(
            score_table(context.train.sample_id, score, self_influence=score),
            {"proj_dim": int(models[0].features.shape[1]), "n_models": len(models), "projection": options.projection},
        )

    def pairwise(self, context: ScoringContext, options: TrakOptions, query: Split) -> np.ndarray:
        """``(n_query, n_train)`` TRAK scores; positive = the training sample raises the query's margin."""
        return attribute(fit(context, options), context, query, options.chunk_size)


def attribute(models: list[TrakModel], context: ScoringContext, query: Split, chunk_size: int) -> np.ndarray:
    xq, yq = context.tensors(query)
    scores = torch.stack([m.scores(m.target_features(xq, yq, chunk_size)) for m in models]).mean(0)
    q = torch.stack([m.q for m in models]).mean(0)
    return (scores * q[:, None]).T.cpu().numpy()

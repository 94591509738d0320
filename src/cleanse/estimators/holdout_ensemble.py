"""Out-of-subset, early-stopped ensemble: how badly models that never trained on a sample predict
its given label, each model stopped before it memorises.

A network with enough capacity fits every flipped label by the end of training, so its final
training loss (``loss``) stops separating flipped from clean samples. Two things keep the
separation: a model that never saw a sample predicts it from the clean majority of its class
(the out-of-sample idea of confident learning, Northcutt et al., JAIR 2021), and a model stopped
early has learnt the dominant patterns but not yet the exceptions (Arpit et al., ICML 2017, "A
Closer Look at Memorization in Deep Networks"; early stopping is provably robust to label noise
for over-parameterised networks, Li, Soltanolkotabi & Oymak, AISTATS 2020). This estimator uses
both, and reads no validation labels: the stopping epoch is chosen on the training labels of the
rows each model holds out.

Design. ``K = n_models`` models of the run's own architecture and recipe (``model.*``), in
``K / 2`` pairs; each pair splits the training set into two complementary random halves
(stratified by the given label), and each model of the pair trains on one half. Every sample is
therefore held out by exactly ``K / 2`` models. All K train at once
(:func:`cleanse.ensembles.train_ensemble`). After every epoch each model is evaluated on its
held-out half under the given labels; model ``k`` keeps the probabilities it gives every row at
its best epoch ``e_k`` (``stop_on: loss``: lowest held-out loss; ``accuracy``: highest held-out
accuracy, ties to the lower loss; under symmetric noise, accuracy against the given labels is an
increasing function of accuracy against the clean labels, so its maximum is the clean optimum).
Training ends when no model has improved for ``patience`` epochs, or at ``max_epochs`` (default
``model.epochs``).

Score, shape ``(n_train,)`` in training order, **higher = more likely harmful**. With ``O_i`` the
``K / 2`` models that held sample ``i`` out, ``p_k`` model ``k``'s softmax at epoch ``e_k`` and
``y_i`` the given (possibly corrupted) label, ``pbar_i = mean_{k in O_i} p_k(x_i)`` and
``r_i = argmax_{j != y_i} pbar_ij``::

    statistic: margin (default)   score_i = pbar_i[r_i] - pbar_i[y_i]                 in [-1, 1]
    statistic: loss               score_i = mean_{k in O_i} -log p_k(x_i)[y_i]
    score_se_i = std_{k in O_i}(per-model term) / sqrt(K / 2)   (ddof 1)

(the margin is the mean of the per-model terms ``p_k[r_i] - p_k[y_i]``, so its SE is exact). Both
statistics are kept as ``heldout_margin`` and ``heldout_loss``, with ``heldout_prob = pbar_i[y_i]``.

Cost: ``K`` models on half the data each for ``E`` epochs is ``K / 2 * E / model.epochs``
training runs (``meta.training_runs``), plus one forward pass of every model over the training set
per epoch. With ``K = 8``: at most 4 training runs (cleanlab's 5 folds cost 5 x 0.8 = 4); early
stopping makes it far less on long, memorising recipes (digits, MLP 256-256 for 200 epochs: the
models stop after about 30 epochs: 0.6 of a training run's epochs).

Defaults (``n_models: 8``, ``statistic: margin``, ``stop_on: loss``, ``patience: 10``) were chosen
once, against the ground truth of one training seed (0) of the memorising cell of the quality
benchmark (digits, 20% symmetric flips, MLP 256-256 without weight decay, 200 epochs): AP 0.9876
(accuracy stop, mean loss), 0.9886 (loss stop, mean loss), 0.9921 (loss stop, margin); 16 models
gave 0.993 at twice the cost. They were left unchanged for the other seeds and settings.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from cleanse import seeds
from cleanse.config import HoldoutEnsembleOptions, ModelConfig
from cleanse.data.dataset import Split
from cleanse.ensembles import Ensemble, ensemble_logits, train_ensemble
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table


def complementary_halves(label: np.ndarray, pairs: int, seed: int) -> np.ndarray:
    """Masks ``(2 * pairs, n)`` bool: rows ``2p`` and ``2p + 1`` are complementary halves of the
    training set, each drawn by shuffling and then dealing the rows of every given label
    alternately (so both halves hold about half of every class)."""
    rng = seeds.generator(seed, "holdout_ensemble.halves")
    n = label.shape[0]
    masks = np.zeros((2 * pairs, n), dtype=bool)
    for p in range(pairs):
        order = rng.permutation(n)
        order = order[np.argsort(label[order], kind="stable")]  # grouped by label, shuffled within
        first = np.zeros(n, dtype=bool)
        # Which half gets the odd sample of each label alternates with the pair, so neither half is
        # systematically larger.
        first[order[p % 2 :: 2]] = True
        masks[2 * p], masks[2 * p + 1] = first, ~first
    return masks


def model_seeds(seed: int, n_models: int) -> np.ndarray:
    """``(n_models,)`` training seeds (initialisation and minibatch order) of the ensemble."""
    return seeds.generator(seed, "holdout_ensemble.models").integers(0, 2**31 - 1, size=n_models, dtype=np.int64)


class _BestEpoch:
    """The early-stopping bookkeeping: per model, its best epoch so far on its held-out rows and
    the softmax probabilities ``(K, n, C)`` (float32) it gave every row at that epoch."""

    def __init__(self, train: Split, masks: np.ndarray, n_classes: int, stop_on: str, patience: int):
        self.train, self.held_out, self.stop_on, self.patience = train, ~masks, stop_on, patience
        k, n = masks.shape
        self.probabilities = np.zeros((k, n, n_classes), dtype=np.float32)
        self.best_accuracy = np.full(k, -np.inf)
        self.best_loss = np.full(k, np.inf)
        self.best_epoch = np.zeros(k, dtype=np.int64)
        self.curve: list[dict[str, float]] = []
        self.epochs = 0

    def __call__(self, epoch: int, ensemble: Ensemble) -> bool:
        log_p = torch.log_softmax(ensemble_logits(ensemble, self.train.features).double(), dim=-1)  # (K, n, C)
        y = torch.as_tensor(self.train.label, dtype=torch.long, device=log_p.device)
        ce = -log_p.gather(-1, y.expand(log_p.shape[0], -1)[..., None])[..., 0].cpu().numpy()  # (K, n)
        correct = (log_p.argmax(-1) == y).cpu().numpy()
        out = self.held_out
        count = out.sum(1)
        accuracy = (correct & out).sum(1) / count
        loss = (ce * out).sum(1) / count
        if self.stop_on == "accuracy":
            better = (accuracy > self.best_accuracy) | ((accuracy == self.best_accuracy) & (loss < self.best_loss))
        else:
            better = loss < self.best_loss
        if better.any():
            rows = torch.as_tensor(np.flatnonzero(better), device=log_p.device)
            self.probabilities[better] = log_p[rows].exp().float().cpu().numpy()
        self.best_accuracy[better], self.best_loss[better] = accuracy[better], loss[better]
        self.best_epoch[better] = epoch
        self.curve.append({"epoch": epoch, "heldout_accuracy": float(accuracy.mean()), "heldout_loss": float(loss.mean())})
        self.epochs = epoch
        return bool((epoch - self.best_epoch >= self.patience).all())


def heldout_statistics(probabilities: np.ndarray, held_out: np.ndarray, label: np.ndarray,
                       floor: float = 1e-12) -> dict[str, np.ndarray]:
    """From every model's probabilities ``(K, n, C)`` and which models held each row out
    ``(K, n)``: per row ``(n,)``, over the models that held it out, the mean cross-entropy of the
    given label (``loss``) and its SE, the mean probabilities' margin ``max_{j != y} p_j - p_y``
    (``margin``, in [-1, 1]) and its SE, and the mean probability of the given label (``prob``)."""
    n = label.shape[0]
    weight = held_out.astype(np.float64)
    n_out = weight.sum(0)
    p_label = probabilities[:, np.arange(n), label].astype(np.float64)  # (K, n)
    mean = (probabilities * weight[..., None]).sum(0) / n_out[:, None]  # (n, C)
    others = mean.copy()
    others[np.arange(n), label] = -np.inf
    rival = others.argmax(1)  # the strongest other class of the mean prediction
    p_rival = probabilities[:, np.arange(n), rival].astype(np.float64)

    def mean_and_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = (values * weight).sum(0) / n_out
        variance = (((values - m) ** 2) * weight).sum(0) / np.maximum(n_out - 1, 1)
        return m, np.sqrt(variance / n_out)

    loss, loss_se = mean_and_se(-np.log(np.maximum(p_label, floor)))
    # The margin of the mean prediction is the mean of the per-model differences p_rival - p_label
    # (linear), so their spread gives its SE exactly.
    margin, margin_se = mean_and_se(p_rival - p_label)
    return {"loss": loss, "loss_se": loss_se, "margin": margin, "margin_se": margin_se, "prob": mean[np.arange(n), label]}


def recipe(model_config: ModelConfig, options: HoldoutEnsembleOptions) -> ModelConfig:
    """The ensemble's recipe: the run's, with at most ``options.max_epochs`` epochs."""
    if options.max_epochs is None:
        return model_config
    return model_config.model_copy(update={"epochs": options.max_epochs})


class HoldoutEnsembleEstimator:
    name: ClassVar[str] = "holdout_ensemble"
    reads_validation_labels: ClassVar[bool] = False
    options_type: ClassVar[type] = HoldoutEnsembleOptions
    families: ClassVar[tuple[str, ...]] = ("classification",)

    def score(self, context: ScoringContext, options: HoldoutEnsembleOptions) -> ScoreResult:
        train = context.train
        masks = complementary_halves(train.label, options.n_models // 2, context.seed)
        tracker = _BestEpoch(train, masks, context.meta.n_classes, options.stop_on, options.patience)
        config = recipe(context.model_config, options)
        train_ensemble(context.model.spec, train.features, train.label, masks, model_seeds(context.seed, options.n_models),
                       config, device=context.device, on_epoch=tracker)
        stats = heldout_statistics(tracker.probabilities, tracker.held_out, train.label)
        score, se = stats[options.statistic], stats[f"{options.statistic}_se"]
        meta = {
            "n_models": options.n_models, "statistic": options.statistic, "stop_on": options.stop_on, "patience": options.patience,
            "epochs_trained": tracker.epochs, "max_epochs": config.epochs,
            "best_epochs": tracker.best_epoch.tolist(),
            "heldout_accuracy": tracker.best_accuracy.tolist(),
            # Training cost in units of one training run of the recipe (K halves for epochs_trained epochs).
            "training_runs": options.n_models * 0.5 * tracker.epochs / context.model_config.epochs,
            "curve": tracker.curve,
        }
        table = score_table(train.sample_id, score, score_se=se, heldout_loss=stats["loss"],
                            heldout_margin=stats["margin"], heldout_prob=stats["prob"])
        return ScoreResult(table, meta)

"""The trusted-data baseline: a model fitted on the clean validation split alone scores each
training sample by its cross-entropy under the given label.

cleanse treats the validation split as trusted (its labels are never corrupted), so the simplest
detector that uses it ignores the training labels altogether when fitting: a classifier learnt
from trusted data only, asked how surprising each training label is. This is the "trusted data"
reference point of the noisy-label literature (the clean-subset baseline of Hendrycks et al.,
NeurIPS 2018, "Using Trusted Data to Train Deep Networks on Labels Corrupted by Severe Noise"):
every estimator that reads validation labels (``reads_validation_labels = True``) should beat it
to justify its cost.

Model. ``model: logreg`` (default): scikit-learn ``LogisticRegression`` (multinomial, L2 with
inverse strength ``C``, L-BFGS) on the flattened features; deterministic and about 0.1 s on
digits. ``model: run``: the run's own architecture and recipe (``model.*``), trained on the
validation split with the seed of purpose ``trusted.model`` (:func:`cleanse.seeds.torch_seed`).

Score, shape ``(n_train,)`` in training order, **higher = more likely harmful**::

    score_i = -log max(p(y_i | x_i), probability_floor)

with ``y_i`` the given (possibly corrupted) label. A class absent from the validation split has
no estimate: its probability is 0 before the floor, so its training samples score
``-log(probability_floor)`` (the highest possible score); the result meta names such classes and
counts their training samples.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np

from cleanse import seeds
from cleanse.config import TrustedOptions
from cleanse.errors import DataError
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table


def validation_probabilities(context: ScoringContext, options: TrustedOptions) -> np.ndarray:
    """``(n_train, n_classes)`` probabilities of a model fitted on the validation split only;
    columns of classes absent from the validation split are 0."""
    val, train, n_classes = context.val, context.train, context.meta.n_classes
    if len(val) == 0:
        raise DataError("scorers.trusted needs a non-empty validation split (data.val_fraction)")
    present = np.unique(val.label)
    probabilities = np.zeros((len(train), n_classes))
    if present.size == 1:  # one class: nothing to fit, the trusted data predicts that class
        probabilities[:, present[0]] = 1.0
        return probabilities
    if options.model == "run":
        from cleanse.models.trainer import predict_proba, train_model

        model = train_model(context.model.spec, val.features, val.label, context.model_config,
                            seed=seeds.torch_seed(context.seed, "trusted.model"), device=context.device)
        probabilities[:] = predict_proba(model.module(context.device), train.features)
        probabilities[:, np.setdiff1d(np.arange(n_classes), present)] = 0.0  # never seen: no estimate
        return probabilities
    from sklearn.exceptions import ConvergenceWarning

    classifier = _logreg(options)
    with warnings.catch_warnings():
        # A capped max_iter is an option, not an error.
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(val.features.reshape(len(val), -1), val.label)
    probabilities[:, classifier.classes_] = classifier.predict_proba(train.features.reshape(len(train), -1))
    return probabilities


def _logreg(options: TrustedOptions):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=options.C, max_iter=options.max_iter)


def label_disagreement(val_features: np.ndarray, val_label: np.ndarray, train_features: np.ndarray,
                       train_label: np.ndarray, options: TrustedOptions, *, folds: int = 5,
                       seed: int = 0) -> tuple[int, float] | None:
    """What the trusted split says about the training labels, for the noise-count estimate of
    :func:`cleanse.recommend.estimated_noise_count`: ``(D, e)`` with ``D`` the number of training
    labels ``train_label`` ``(n_train,)`` that the logistic regression fitted on the validation split
    (``val_features`` ``(n_val, ...)``, ``val_label`` ``(n_val,)``) does not predict (argmax), and ``e``
    its error rate on the validation split under stratified ``K``-fold cross-validation (``K =
    min(folds, smallest class count)``, folds shuffled with ``seed``), an out-of-sample estimate of
    how often it is wrong on a correct label. Always the logistic regression (``C``, ``max_iter``),
    whatever ``options.model``: two fits of a second each at most. None when the validation split
    has fewer than two classes or a class with fewer than two samples (nothing to cross-validate);
    training samples of a class absent from the validation split always count as disagreements."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    classes, counts = np.unique(val_label, return_counts=True)
    k = int(min(folds, counts.min())) if classes.size else 0
    if classes.size < 2 or k < 2:
        return None
    x_val = val_features.reshape(len(val_features), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a capped max_iter is an option, not an error
        predicted = _logreg(options).fit(x_val, val_label).predict(train_features.reshape(len(train_features), -1))
        held_out = cross_val_predict(_logreg(options), x_val, val_label,
                                     cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    return int((predicted != train_label).sum()), float((held_out != val_label).mean())


class TrustedEstimator:
    name: ClassVar[str] = "trusted"
    reads_validation_labels: ClassVar[bool] = True
    options_type: ClassVar[type] = TrustedOptions
    families: ClassVar[tuple[str, ...]] = ("classification",)

    def score(self, context: ScoringContext, options: TrustedOptions) -> ScoreResult:
        train = context.train
        probabilities = validation_probabilities(context, options)
        p_label = probabilities[np.arange(len(train)), train.label]
        score = -np.log(np.maximum(p_label, options.probability_floor))
        missing = np.setdiff1d(np.arange(context.meta.n_classes), context.val.label)
        affected = np.isin(train.label, missing)
        table = score_table(train.sample_id, score, trusted_prob=p_label,
                            trusted_prediction=probabilities.argmax(1).astype(np.float64))
        meta = {
            "model": options.model, "n_val": len(context.val),
            "classes_missing_from_val": missing.tolist(),
            "n_train_with_missing_class": int(affected.sum()),
        }
        if missing.size:
            meta["note"] = (f"classes {missing.tolist()} are absent from the validation split: their "
                            f"{int(affected.sum())} training samples score -log(probability_floor)")
        return ScoreResult(table, meta)

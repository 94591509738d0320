"""Confident learning (Northcutt, Jiang & Chuang, JAIR 2021) through the cleanlab package.

Out-of-sample predicted probabilities come from K stratified folds, each model trained with the
same recipe as the main model (training seed: :func:`cleanse.seeds.torch_seed` of purpose
``cleanlab.fold``, member ``fold``). ``score = 1 - label quality`` (the
cleanlab ``get_label_quality_scores`` value for the chosen method), and ``is_label_issue`` is
cleanlab's own ``find_label_issues`` verdict (prune by noise rate), kept for reference.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from sklearn.model_selection import StratifiedKFold

from cleanse import seeds
from cleanse.config import CleanlabOptions
from cleanse.errors import DataError
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table
from cleanse.models.trainer import predict_proba
from cleanse.progress import progress


def out_of_sample_probabilities(context: ScoringContext, folds: int) -> np.ndarray:
    """``(n_train, n_classes)`` probabilities, each row from a model that did not see that row."""
    train = context.train
    counts = np.bincount(train.label, minlength=context.meta.n_classes)
    # a class absent from the training labels (a small graph's rare class) needs no fold
    rare = [c for c in np.flatnonzero(counts) if counts[c] < folds]
    if rare:
        raise DataError(
            f"scorers.cleanlab.folds: {folds} folds need >= {folds} samples of every observed class, "
            f"but class {int(rare[0])} has {int(counts[rare[0]])}"
        )
    probabilities = np.zeros((len(train), context.meta.n_classes))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=context.seed)
    folds_of = list(splitter.split(train.features.reshape(len(train), -1), train.label))
    for fold, (fit_rows, held_rows) in enumerate(progress(folds_of, f"cleanlab: {folds} out-of-sample folds", unit="fold")):
        module = context.refit(fit_rows, seeds.torch_seed(context.seed, "cleanlab.fold", fold))
        probabilities[held_rows] = predict_proba(module, train.features[held_rows])
    return probabilities


class ConfidentLearningEstimator:
    name: ClassVar[str] = "cleanlab"
    reads_validation_labels: ClassVar[bool] = False
    options_type: ClassVar[type] = CleanlabOptions
    families: ClassVar[tuple[str, ...]] = ("classification", "graph")

    def score(self, context: ScoringContext, options: CleanlabOptions) -> ScoreResult:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores

        probabilities = out_of_sample_probabilities(context, options.folds)
        labels = context.train.label
        quality = get_label_quality_scores(labels, probabilities, method=options.method)
        # n_jobs always explicit: left unset, cleanlab forks one process per core, and a fork
        # inside a threaded process (Prefect's task runner) deadlocked on the pool's queue lock.
        issues = find_label_issues(labels, probabilities, filter_by="prune_by_noise_rate", n_jobs=options.n_jobs)
        table = score_table(context.train.sample_id, 1.0 - quality, label_quality=quality, is_label_issue=issues)
        return ScoreResult(table, {"folds": options.folds, "method": options.method, "cleanlab_issue_count": int(issues.sum())})

"""Sign and orientation: an exact duplicate of a validation point, planted in the training set,
is that point's top proponent under influence (train -> query) and TracIn.

The validation points are the ones the model finds hardest without the duplicate (highest loss),
as in Koh & Liang's experiments: for a point the model already fits, many training samples have
larger gradients than its copy, and "top proponent" stops being a property of the method.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cleanse.config import InfluenceOptions, TracInOptions
from cleanse.data.dataset import Split
from cleanse.estimators.influence import ValidationInfluenceEstimator
from cleanse.estimators.tracin import TracInEstimator
from cleanse.models.trainer import train_model
from tests.conftest import small_params


def _with_duplicate(train: Split, point: Split) -> Split:
    return Split(
        sample_id=np.concatenate([train.sample_id, [10_000_000]]),
        features=np.concatenate([train.features, point.features]),
        label=np.concatenate([train.label, point.label]),
        label_clean=np.concatenate([train.label_clean, point.label_clean]),
        is_corrupted=np.concatenate([train.is_corrupted, [False]]),
    )


@pytest.fixture(scope="module")
def planted():
    from tests.conftest import context_for

    context, staged = context_for(small_params("corruption.kind=none"))
    from cleanse.models.trainer import predict_proba

    probabilities = predict_proba(context.model, staged.val.features)
    loss = -np.log(probabilities[np.arange(len(staged.val)), staged.val.label])
    rows = np.argsort(-loss)[:4]
    cases = []
    for row in rows:
        point = staged.val.subset(np.array([row]))
        train = _with_duplicate(staged.train, point)
        model = train_model(context.model.spec, train.features, train.label, context.model_config, seed=0)
        cases.append((replace(context, train=train, model=model), point))
    return cases


@pytest.mark.parametrize(
    ("estimator", "options"),
    [(ValidationInfluenceEstimator(), InfluenceOptions(solver="exact")),
     (ValidationInfluenceEstimator(), InfluenceOptions(solver="cg", cg_tol=1e-6)),
     (TracInEstimator(), TracInOptions()), (TracInEstimator(), TracInOptions(normalize="train"))],
    ids=["influence_val-exact", "influence_val-cg", "tracin", "tracin-unit-train-gradients"],
)
def test_planted_duplicate_is_the_top_proponent(planted, estimator, options):
    for context, point in planted:
        matrix = estimator.pairwise(context, options, point)
        assert matrix.shape == (1, len(context.train))  # (n_query, n_train)
        duplicate = len(context.train) - 1
        assert int(np.argmax(matrix[0])) == duplicate, f"val sample {point.sample_id[0]}"
        assert matrix[0, duplicate] > 0  # positive = proponent

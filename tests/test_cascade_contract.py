"""The estimator contract for the cascade family's edge-selection estimators (the generic
tests/test_estimator_contract.py builds classification/GAN/diffusion contexts; these estimators
need a staged graph): one row per edge in training order, finite float64 scores, deterministic and
blind to the ground truth, and the methods that see the spread agree with greedy Monte Carlo's
cuts (the ground truth) better than chance."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from cleanse.config import ScorerOptions
from cleanse.estimators import registry

CASCADE = [name for name in registry.names() if "cascade" in registry.families_of(name)]
# the estimators that read the spread (surrogate or Monte Carlo); the heuristics ignore the seeds
SPREAD_AWARE = {"diffim_oneshot", "diffim_relax", "diffim_greedy", "greedy_mc"}


def cascade_context():
    """A Barabasi-Albert graph (60 nodes, m 2, IC p 0.2), 2 seeds, b = 4 edges; a quick surrogate."""
    import torch

    from cleanse import families
    from cleanse.config import validate_params

    # One thread for a reproducible surrogate, restored after: a process-wide change would alter
    # the float sums of whatever the same test session scores next (the estimator contract).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _cascade_context(validate_params, families)
    finally:
        torch.set_num_threads(threads)


def _cascade_context(validate_params, families):
    params = validate_params({"family": "cascade", "data": {"source": "ba", "nodes": 60, "m": 2,
                                                            "probability": "constant", "constant_p": 0.2},
                              "cascade": {"seeds": 2, "mc_runs": 500, "val_runs": 200, "batches": 10},
                              "corruption": {"worlds": 300, "hops": -1},
                              "model": {"epochs": 20, "instances": 24, "test_instances": 4, "label_runs": 200},
                              "estimators": CASCADE, "detect": {"budget": "count", "count": 4},
                              "tracking": {"enabled": False}})
    task = families.get("cascade")
    staged = task.stage(params)
    return task.scoring_context(params, staged, task.fit(params, staged.train, staged.meta), None)


@pytest.fixture(scope="module")
def context():
    return cascade_context()


def _options(name: str):
    return getattr(ScorerOptions(), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASCADE)
def test_cascade_estimator_contract(name, context):
    estimator = registry.get(name)
    table = estimator.score(context, _options(name)).table
    assert table["sample_id"].to_list() == context.train.sample_id.tolist()
    assert table["score"].dtype == pl.Float64 and np.isfinite(table["score"].to_numpy()).all()
    rng = np.random.default_rng(5)
    scrambled = replace(context, train=replace(context.train, is_corrupted=rng.permutation(context.train.is_corrupted)))
    assert estimator.score(scrambled, _options(name)).table.equals(table)
    if name in SPREAD_AWARE:
        auc = roc_auc_score(context.train.is_corrupted, table["score"].to_numpy())
        assert auc > 0.55, f"{name}: AUC {auc:.3f} against greedy Monte Carlo's cuts"

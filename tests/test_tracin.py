"""TracInCP's checkpoint schedule and its normalised train -> query scores, against explicit formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleanse.config import ModelConfig, TracInOptions
from cleanse.estimators.tracin import TracInEstimator, _functional
from cleanse.grads import per_sample_grads
from cleanse.models.trainer import checkpoint_epochs


def test_geometric_checkpoints_start_at_the_first_epoch_with_a_constant_ratio():
    assert checkpoint_epochs(200, 10, "geometric") == [1, 2, 3, 6, 11, 19, 34, 62, 111, 200]
    assert checkpoint_epochs(30, 5) == [6, 12, 18, 24, 30]
    epochs = checkpoint_epochs(1000, 12, "geometric")
    ratios = np.diff(np.log(epochs[3:]))
    assert np.allclose(ratios, ratios.mean(), rtol=0.15)
    # Rounding collides early on short runs: the count is kept with the next unused epochs.
    assert checkpoint_epochs(10, 8, "geometric") == [1, 2, 3, 4, 5, 6, 7, 10]
    assert checkpoint_epochs(4, 9, "geometric") == [1, 2, 3, 4]
    assert checkpoint_epochs(7, 1, "geometric") == [7]
    with pytest.raises(ValueError, match="unknown checkpoint spacing 'log'"):
        checkpoint_epochs(10, 3, "log")


def test_training_saves_the_geometric_epochs(wine_context):
    from cleanse.models.trainer import train_model

    context, staged = wine_context
    config = context.model_config.model_copy(update={"epochs": 12, "checkpoints": 4, "checkpoint_spacing": "geometric"})
    model = train_model(context.model.spec, staged.train.features, staged.train.label, config, seed=0,
                        device=torch.device("cpu"))
    assert [c.epoch for c in model.checkpoints] == [1, 2, 5, 12]
    even = train_model(context.model.spec, staged.train.features, staged.train.label,
                       config.model_copy(update={"checkpoint_spacing": "even"}), seed=0, device=torch.device("cpu"))
    # Where checkpoints are taken does not change the training itself.
    assert all(torch.equal(even.state[k], model.state[k]) for k in model.state)


@pytest.mark.parametrize("normalize", ["none", "train", "both"])
def test_pairwise_matches_the_explicit_sum_over_checkpoints(wine_context, normalize):
    context, staged = wine_context
    query = staged.val.subset(np.arange(5))
    options = TracInOptions(normalize=normalize)
    ours = TracInEstimator().pairwise(context, options, query)
    x, y = context.tensors(context.train)
    xq, yq = context.tensors(query)
    expected = torch.zeros(len(query), len(context.train), dtype=torch.float64)
    for checkpoint in context.model.checkpoints:
        fm = _functional(context, checkpoint)
        g, q = per_sample_grads(fm, x, y).double(), per_sample_grads(fm, xq, yq).double()
        if normalize != "none":
            g = g / g.norm(dim=1, keepdim=True)
        if normalize == "both":
            q = q / q.norm(dim=1, keepdim=True)
        expected += checkpoint.lr * q @ g.T
    assert ours.shape == (5, len(context.train))
    worst = np.abs(ours - expected.numpy()).max() / np.abs(expected.numpy()).max()
    # Float32 gradients of samples fit to a loss of ~1e-5 carry ~1e-3 relative error (p - onehot
    # cancels); unit-normalising them brings that error up to the scale of every other entry.
    assert worst < (1e-5 if normalize == "none" else 5e-3), worst


def test_boolean_normalize_from_older_params_files_still_reads():
    assert TracInOptions(normalize=True).normalize == "both"
    assert TracInOptions(normalize=False).normalize == "none"
    with pytest.raises(ValueError):
        TracInOptions(normalize="query")
    with pytest.raises(ValueError):
        ModelConfig(checkpoint_spacing="log")

"""Influence functions against ground truth: leave-one-out retraining, closed-form Hessians,
solver agreement, and the sign convention on planted duplicates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from cleanse.config import InfluenceOptions
from cleanse.estimators.influence import SelfInfluenceEstimator, ValidationInfluenceEstimator, removal_effects
from cleanse.evaluate import leave_one_out_loss_changes
from cleanse.grads import (
    FunctionalModel,
    cg_solve,
    exact_hessian,
    exact_inverse,
    grad_dots,
    hvp_fn,
    lissa_solve,
    per_sample_grads,
)


def test_influence_matches_leave_one_out_on_logistic_regression(digits_logreg):
    """Koh & Liang Fig. 2: predicted vs actual change of a test loss for the 50 most influential
    training points; retraining is warm-started from the optimum, as in the paper."""
    context, test = digits_logreg
    fm = FunctionalModel.of(context.model.module(), context.model_config.weight_decay)
    losses = fm.losses(fm.theta, torch.tensor(test.features), torch.tensor(test.label)).detach().numpy()
    query = test.subset(np.array([int(np.argmax(losses))]))
    predicted, inverse = removal_effects(context, InfluenceOptions(solver="exact", damping=0.0), query)
    assert inverse.solver == "exact"
    predicted = predicted[0]
    top = np.argsort(-np.abs(predicted))[:50]
    actual = leave_one_out_loss_changes(context.model, context.train, query, context.model_config, top)
    r = pearsonr(predicted[top], actual).statistic
    assert r >= 0.95, f"Pearson {r:.3f} between predicted and leave-one-out loss changes"
    # Same sign and scale, not just correlated.
    slope = np.polyfit(predicted[top], actual, 1)[0]
    assert 0.7 < slope < 1.5


def test_exact_hessian_equals_torch_func_hessian():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    fm = FunctionalModel.of(module, weight_decay=0.05)
    x, y = torch.randn(20, 3), torch.randint(0, 3, (20,))
    reference = torch.func.hessian(lambda t: fm.objective(t, x, y))(fm.theta).double()
    assert torch.allclose(exact_hessian(fm, x, y, chunk_size=7), reference, atol=1e-5)


def test_per_sample_grads_and_forward_mode_dots_match_a_loop(wine_context):
    context, _ = wine_context
    fm = FunctionalModel.of(context.model.module(), 0.0)
    x, y = context.tensors(context.train)
    grads = per_sample_grads(fm, x[:10], y[:10], chunk_size=3)
    for i in (0, 7):
        loop = torch.func.grad(lambda t: fm.losses(t, x[i : i + 1], y[i : i + 1]).sum())(fm.theta)
        assert torch.allclose(grads[i], loop, atol=1e-6)
    direction = torch.randn(fm.n_params, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(grad_dots(fm, x[:10], y[:10], direction), grads @ direction, atol=1e-5)


@pytest.fixture(scope="module")
def convex_problem(digits_logreg):
    context, test = digits_logreg
    fm = FunctionalModel.of(context.model.module(), context.model_config.weight_decay)
    x, y = context.tensors(context.train)
    rhs = per_sample_grads(fm, torch.tensor(test.features[:4]), torch.tensor(test.label[:4])).T
    exact = exact_inverse(exact_hessian(fm, x, y), damping=1e-3).solve(rhs)
    return fm, x, y, rhs, exact


def test_cg_agrees_with_the_exact_solve(convex_problem):
    fm, x, y, rhs, exact = convex_problem
    solution, report = cg_solve(hvp_fn(fm, x, y), rhs, damping=1e-3, max_iter=500, tol=1e-6)
    assert report.converged
    assert torch.allclose(solution, exact, rtol=1e-3, atol=1e-4 * float(exact.abs().max()))


def test_cg_warns_when_it_does_not_converge(convex_problem):
    fm, x, y, rhs, _ = convex_problem
    with pytest.warns(UserWarning, match="CG did not converge"):
        _, report = cg_solve(hvp_fn(fm, x, y), rhs, damping=1e-3, max_iter=2, tol=1e-8)
    assert not report.converged


def test_lissa_agrees_with_the_exact_solve(convex_problem):
    fm, x, y, rhs, exact = convex_problem
    estimates, report = lissa_solve(fm, x, y, rhs[:, :1], damping=1e-3, depth=600, repeats=1, scale=None,
                                    batch_size=300, seed=0)
    assert report.converged
    cosine = torch.nn.functional.cosine_similarity(estimates.mean(0)[:, 0], exact[:, 0], dim=0)
    assert cosine > 0.98


def test_exact_inverse_raises_damping_for_indefinite_curvature():
    hessian = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64))
    with pytest.warns(UserWarning, match="damping raised"):
        inverse = exact_inverse(hessian, damping=1e-3)
    assert inverse.report.damping > 0.5
    assert (inverse.inverse_eigenvalues > 0).all()


def test_pairwise_diagonal_equals_self_influence_over_n(digits_logreg):
    context, _ = digits_logreg
    options = InfluenceOptions(solver="exact", damping=1e-3)
    self_scores = SelfInfluenceEstimator().score(context, options).table["score"].to_numpy()
    rows = np.array([3, 41, 150])
    pairwise = SelfInfluenceEstimator().pairwise(context, options, context.train.subset(rows))
    n = len(context.train)
    assert np.allclose(pairwise[np.arange(3), rows] * n, self_scores[rows], rtol=1e-4)


@pytest.mark.parametrize("solver", ["cg", "lissa"])
def test_hessian_free_self_influence_ranks_like_exact(digits_logreg, solver):
    context, _ = digits_logreg
    small = context.train.subset(np.arange(60))
    from dataclasses import replace

    context = replace(context, train=small)
    exact = SelfInfluenceEstimator().score(context, InfluenceOptions(solver="exact", damping=1e-2)).table
    other = SelfInfluenceEstimator().score(
        context, InfluenceOptions(solver=solver, damping=1e-2, cg_tol=1e-6, lissa_depth=300, lissa_repeats=2,
                                  lissa_batch_size=60)
    ).table
    from scipy.stats import spearmanr

    assert spearmanr(exact["score"], other["score"]).statistic > 0.97
    if solver == "lissa":
        assert (other["score_se"].to_numpy() >= 0).all()


def test_validation_influence_sign(digits_logreg):
    """score = -(predicted change of the validation loss on removal): removing a top-scored sample is
    predicted to lower the validation loss, removing a bottom-scored one to raise it."""
    context, _ = digits_logreg
    table = ValidationInfluenceEstimator().score(context, InfluenceOptions(solver="exact")).table
    assert np.allclose(table["score"].to_numpy(), -table["delta_val_loss"].to_numpy())
    assert table["delta_val_loss"].min() < 0 < table["delta_val_loss"].max()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_layerwise_squared_norms_equal_materialised_gradients(arch):
    from cleanse.grads import per_sample_sq_norms
    from cleanse.models.architectures import build_model, spec_for

    torch.manual_seed(0)
    shape = (1, 8, 8)
    module = build_model(spec_for(arch, [12, 6] if arch == "cnn" else [16, 8], shape, 4))
    fm = FunctionalModel.of(module, weight_decay=0.0)
    x, y = torch.randn(37, *shape), torch.randint(0, 4, (37,))
    reference = per_sample_grads(fm, x, y).double().pow(2).sum(1)
    assert torch.allclose(per_sample_sq_norms(fm, x, y, chunk_size=10), reference, rtol=1e-4)

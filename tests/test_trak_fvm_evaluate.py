"""TRAK, influence at flat validation minima, and the attribution evaluation metrics, against
closed forms and ground truth (retraining, known label flips)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cleanse.config import FvmOptions, TrakOptions
from cleanse.estimators.influence_fvm import FlatValidationInfluenceEstimator, fine_tune_on_validation
from cleanse.estimators.trak import TrakEstimator, fit, margin
from cleanse.evaluate import detection_metrics, lds, margins, rank_stability, retrained_subset_outputs, subset_masks
from cleanse.grads import FunctionalModel, exact_hessian, exact_inverse, per_sample_grads

# ----------------------------------------------------------------------------- TRAK


def _closed_form_trak(context, query, damping: float) -> np.ndarray:
    """TRAK without projection: G (G^T G + lambda I)^-1 g_q * (1 - p), from explicit margin gradients."""
    fm = FunctionalModel.of(context.model.module(), context.model_config.weight_decay)
    x, y = context.tensors(context.train)
    xq, yq = context.tensors(query)
    one = torch.func.vmap(torch.func.grad(lambda t, a, b: margin(fm, t, a, b)), in_dims=(None, 0, 0))
    g, gq = one(fm.theta, x, y).double(), one(fm.theta, xq, yq).double()
    gram = g.T @ g
    ridge = damping * float(torch.diagonal(gram).mean())
    scores = g @ torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64), gq.T)
    with torch.no_grad():
        q = 1 - torch.softmax(fm.logits(fm.theta, x).double(), 1).gather(1, y[:, None]).squeeze(1)
    return (scores * q[:, None]).T.numpy()


@pytest.fixture(scope="module")
def wine_logreg():
    from tests.conftest import context_for, small_params

    return context_for(small_params("model.arch=logreg"))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_trak_with_a_full_rank_projection_equals_the_closed_form(wine_logreg, kind):
    """With k = p < n the projection is invertible, Phi^T Phi has full rank, and the after-kernel
    (with a vanishing ridge) does not depend on the projection."""
    context, staged = wine_logreg
    query = staged.test.subset(np.arange(5))
    options = TrakOptions(proj_dim=10_000, projection=kind, damping=1e-7, chunk_size=17)
    ours = TrakEstimator().pairwise(context, options, query)
    reference = _closed_form_trak(context, query, 1e-7)
    assert ours.shape == (5, len(context.train))
    assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.999


def test_trak_self_scores_are_the_diagonal_and_the_ensemble_averages_scores_and_weights(wine_context):
    context, _ = wine_context
    options = TrakOptions(proj_dim=64, n_models=2, chunk_size=50)
    table = TrakEstimator().score(context, options).table
    rows = np.array([0, 5, 33])
    pairwise = TrakEstimator().pairwise(context, options, context.train.subset(rows))
    assert np.allclose(pairwise[np.arange(3), rows], table["score"].to_numpy()[rows], rtol=1e-6)
    models = fit(context, options)
    assert len(models) == 2 and not torch.equal(models[0].fm.theta, models[1].fm.theta)
    assert not torch.equal(models[0].projection, models[1].projection)  # seeded per model id
    x, y = context.tensors(context.train.subset(rows))
    per_model = [m.scores(m.target_features(x, y, 50)) for m in models]
    expected = ((per_model[0] + per_model[1]) / 2) * ((models[0].q + models[1].q) / 2)[:, None]
    assert np.allclose(pairwise, expected.T.numpy(), rtol=1e-6)


@pytest.mark.gpu
def test_trak_gpu_path_matches_the_cpu_reference(wine_context):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    context, staged = wine_context
    query = staged.test.subset(np.arange(4))
    options = TrakOptions(proj_dim=128)
    cpu = TrakEstimator().pairwise(context, options, query)
    gpu = TrakEstimator().pairwise(replace(context, device=torch.device("cuda")), options, query)
    assert np.allclose(cpu, gpu, rtol=1e-3, atol=1e-4 * np.abs(cpu).max())


# ----------------------------------------------------------------------------- LDS


def test_lds_is_one_for_an_exact_linear_datamodel_and_near_zero_for_noise():
    rng = np.random.default_rng(0)
    attributions = rng.normal(size=(6, 50))
    masks = subset_masks(50, 40, seed=1)
    outputs = masks @ attributions.T + 0.3
    assert lds(attributions, masks, outputs)["lds"] == pytest.approx(1.0)
    noise = lds(rng.normal(size=(6, 50)), masks, outputs)["lds"]
    assert abs(noise) < 0.25
    assert masks.sum(1).tolist() == [25] * 40


def test_margins_match_the_definition():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    expected = [2.0 - np.log(np.exp(0.0) + np.exp(-1.0)), 3.0 - np.log(1.0 + np.exp(1.0))]
    assert np.allclose(margins(logits, np.array([0, 1])), expected)


def test_trak_lds_beats_random_attribution_against_retraining(wine_context):
    """Real ground truth: models retrained on random halves of the training set."""
    context, staged = wine_context
    query = staged.test.subset(np.arange(8))
    masks = subset_masks(len(context.train), 10, seed=3)
    outputs = retrained_subset_outputs(context.model.spec, context.train, query, context.model_config, masks,
                                       seed=context.seed)
    trak = TrakEstimator().pairwise(context, TrakOptions(proj_dim=256, n_models=2), query)
    score = lds(trak, masks, outputs)["lds"]
    rng = np.random.default_rng(0)
    random = lds(rng.normal(size=trak.shape), masks, outputs)["lds"]
    assert score > 0.2 and score > random + 0.15, (score, random)


# ----------------------------------------------------------------------------- stability, LOO


def test_rank_stability():
    base = np.arange(20, dtype=float)
    same = rank_stability(np.stack([base, base * 2 + 1]), k=5)
    assert same["spearman"] == pytest.approx(1.0) and same["top_k_jaccard"] == 1.0
    reversed_ = rank_stability(np.stack([base, -base]), k=5)
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["top_k_jaccard"] == 0.0


# ----------------------------------------------------------------------------- FVM


def test_vm_without_fine_tuning_is_the_validation_curvature_quadratic_form(wine_context):
    context, _ = wine_context
    options = FvmOptions(variant="vm", steps=0, solver="exact", damping=1e-2)
    result = FlatValidationInfluenceEstimator().score(context, options)
    fm = FunctionalModel.of(context.model.module(), context.model_config.weight_decay)
    x, y = context.tensors(context.train)
    xv, yv = context.tensors(context.val)
    inverse = exact_inverse(exact_hessian(fm, xv, yv, curvature="ggn"), 1e-2)
    reference = inverse.quadratic_form(per_sample_grads(fm, x, y)).numpy()
    assert np.allclose(result.table["score"].to_numpy(), reference, rtol=1e-4)


@pytest.mark.parametrize("sharpness", ["sam", "lpf"])
def test_flat_validation_fine_tune_lowers_the_validation_loss_and_scores_flag_flips(wine_context, sharpness):
    context, staged = wine_context
    options = FvmOptions(variant="fvm", sharpness=sharpness, steps=60, lr=1e-2)
    result = FlatValidationInfluenceEstimator().score(context, options)
    assert result.meta["val_loss_after"] < result.meta["val_loss_before"]
    score = result.table["score"].to_numpy()
    assert (score >= 0).all()
    assert detection_metrics(score, staged.train.is_corrupted)["roc_auc"] > 0.85


def test_sam_step_differs_from_plain_erm(wine_context):
    context, _ = wine_context
    fm = FunctionalModel.of(context.model.module(), context.model_config.weight_decay)
    xv, yv = context.tensors(context.val)
    plain = fine_tune_on_validation(fm, xv, yv, FvmOptions(variant="vm", steps=5, lr=1e-2), 0)
    sam = fine_tune_on_validation(fm, xv, yv, FvmOptions(variant="fvm", rho=0.5, steps=5, lr=1e-2), 0)
    assert not torch.allclose(plain, sam)

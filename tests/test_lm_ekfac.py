"""EK-FAC over the LoRA adapters of the language-model family (issue 21): the Fisher of the response
tokens' softmax over the vocabulary, Kronecker factors per adapter matrix over the sequence
positions (Grosse et al., 2023), checked against the exact Fisher built from per-sample Jacobians."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from cleanse import api, families
from cleanse.config import load_params
from cleanse.ekfac import EKFAC
from tests.test_lm_family import TINY

# Fewer samples keep the exact Fisher (R x V Jacobian rows per sample) quick.
SIZES = ["data.n_train=40"]


@pytest.fixture(scope="module")
def problem(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    params = load_params(None, [*TINY, *SIZES, f"model.base.cache_dir={tmp_path_factory.mktemp('lm-cache')}"])
    staged = api.stage(params)
    model = api.fit(params, staged)
    context = api.context(params, staged, model)
    fm = context.functional(model.module(context.device))
    x, y = context.tensors(staged.train)
    return params, staged, context, fm, x, y


def exact_fisher(fm, x: torch.Tensor) -> torch.Tensor:
    """``(p, p)`` float64: ``(1/n) sum_i sum_r w_ir^2 J_ir^T (diag p_ir - p_ir p_ir^T) J_ir`` with
    ``J_ir`` the Jacobian of position ``r``'s logits w.r.t. the adapters: the Fisher of the response
    tokens' softmax, i.e. ``E_y[g g^T]`` with every response token drawn from the model."""

    def logits(theta: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        return functional_call(fm.module, fm.unflatten(theta), (row[None],), {"vocabulary": True})[0][0]

    jacobians = vmap(jacrev(logits), in_dims=(None, 0))(fm.theta, x).double()  # (n, R, V, p)
    with torch.no_grad():
        out, weight, _, _ = functional_call(fm.module, fm.unflatten(fm.theta), (x,), {"vocabulary": True})
    probs = torch.softmax(out.double(), dim=-1)  # (n, R, V)
    weight = weight.double()
    jp = torch.einsum("nrv,nrvp->nrp", probs, jacobians)
    fisher = (torch.einsum("nr,nrv,nrvp,nrvq->pq", weight**2, probs, jacobians, jacobians)
              - torch.einsum("nr,nrp,nrq->pq", weight**2, jp, jp))
    return fisher / x.shape[0]


def layer_block(layer, matrix: torch.Tensor) -> torch.Tensor:
    block = layer.weight_slice
    return matrix[block, block]


def test_fisher_outputs_give_the_family_loss_at_the_observed_tokens(problem) -> None:
    _, _, context, fm, x, y = problem
    logits, weight, observed, used = context.task.fisher_outputs(fm, fm.theta, x)
    with torch.no_grad():
        loss = fm.losses(fm.theta, x, y)
    by_hand = -(weight * torch.log_softmax(logits, -1).gather(-1, observed[..., None])[..., 0]).sum(1)
    assert torch.allclose(by_hand, loss, atol=1e-6)
    # the used positions reach the last response token and stop there (padding after it)
    mask = x[:, 1, 1:] != 0
    last = torch.stack([row.nonzero().max() for row in mask])
    assert torch.equal(used.sum(1) - 1, last)


def test_expected_fisher_eigenvalues_are_the_exact_fisher_diagonal_in_the_kronecker_basis(problem) -> None:
    """EK-FAC's corrected eigenvalue (a, b) of a layer is ``E[(Q_S^T DW Q_A)_ab^2]`` (George et al.,
    2018): the diagonal of the layer's exact Fisher block in the basis ``Q_S (x) Q_A``."""
    params, _, _, fm, x, y = problem
    ekfac = EKFAC(fm, x, y, damping=1e-3, fisher="expected")
    fisher = exact_fisher(fm, x)
    # lora_A and lora_B of every targeted layer of every block
    assert len(ekfac.layers) == 2 * len(params.model.lora.targets) * params.model.base.n_layer
    for layer in ekfac.layers:
        basis = torch.kron(layer.q_s, layer.q_a)  # columns vec(q_s[:, a] q_a[:, b]^T), row-major
        diagonal = torch.einsum("pa,pq,qa->a", basis, layer_block(layer, fisher), basis)
        assert torch.allclose(layer.eigenvalues.reshape(-1), diagonal, rtol=1e-6, atol=1e-12 * diagonal.max())
        assert diagonal.max() > 0


def test_sampled_fisher_matches_the_expectation_by_monte_carlo(problem) -> None:
    """One drawn token per response position (Kronfluence's default): each layer's trace (the sum of
    its eigenvalues, basis-free) is the exact Fisher's, up to Monte Carlo error over 40 draws per
    sample; the observed tokens (empirical Fisher) are another matrix."""
    _, _, _, fm, x, y = problem
    repeats = 40
    sampled = EKFAC(fm, x.repeat(repeats, 1, 1), y.repeat(repeats), damping=1e-3, fisher="sampled", seed=3)
    empirical = EKFAC(fm, x, y, damping=1e-3, fisher="empirical")
    fisher = exact_fisher(fm, x)
    for layer, observed in zip(sampled.layers, empirical.layers):
        trace = float(layer_block(layer, fisher).trace())
        assert float(layer.eigenvalues.sum()) == pytest.approx(trace, rel=0.1)
        assert abs(float(observed.eigenvalues.sum()) / trace - 1) > 0.1


def test_ekfac_influence_agrees_with_the_exact_fisher_solve(problem) -> None:
    """The lm default (``solver: ekfac``) through the estimator: the train -> probe matrix against
    ``(1/n) g_q^T (F + lambda I)^-1 g_i`` with the exact Fisher ``F`` (expected labels both). The
    damping is Kronfluence's heuristic, 0.1 x the mean eigenvalue of ``F``: the library's 1e-3
    would dominate this tiny model's Fisher (largest eigenvalue ~2e-4), where any solver agrees.
    EK-FAC must be closer to the exact solve than the plain gradient dot product (``F = 0``)."""
    from cleanse.grads import per_sample_grads
    from cleanse.estimators.influence import removal_effects

    params, staged, context, fm, x, y = problem
    defaults = params.scorers.influence
    assert (defaults.solver, defaults.ekfac_fisher, defaults.ekfac_damping, defaults.damping) == (
        "ekfac", "sampled", "relative", 0.1)
    fisher = exact_fisher(fm, x)
    damping = 0.1 * float(torch.linalg.eigvalsh(fisher).mean())
    options = params.scorers.influence.model_copy(update={"ekfac_fisher": "expected", "damping": damping,
                                                          "ekfac_damping": "absolute"})
    query = api.probes(api.Prepared(params, staged, context.model, context)).probes
    effects, inverse = removal_effects(context, options, query)
    xq, yq = context.tensors(query)
    train_grads, query_grads = per_sample_grads(fm, x, y).double(), per_sample_grads(fm, xq, yq).double()
    curvature = fisher + inverse.ekfac.shift * torch.eye(fm.n_params, dtype=torch.float64)
    exact = (query_grads @ torch.linalg.solve(curvature, train_grads.T) / x.shape[0]).numpy()
    assert effects.shape == exact.shape == (len(query), len(staged.train))
    ekfac_error = 1 - np.corrcoef(effects.ravel(), exact.ravel())[0, 1]
    dot_error = 1 - np.corrcoef((query_grads @ train_grads.T).numpy().ravel(), exact.ravel())[0, 1]
    assert ekfac_error < 0.15 and ekfac_error < 0.8 * dot_error


def test_hessian_products_over_chunks_of_units_equal_the_whole_batch(problem, monkeypatch: pytest.MonkeyPatch) -> None:
    """``curvature_rows`` (16 for lm) bounds the memory of exact/cg/lissa: the chunked product is
    the same Hessian-vector product as over all 40 units at once."""
    from cleanse.curvature import hvp_fn

    _, _, context, fm, x, y = problem
    assert type(context.task).curvature_rows == 16 < x.shape[0]
    block = torch.randn(fm.n_params, 3, generator=torch.Generator().manual_seed(0))
    chunked = hvp_fn(fm, x, y)(block)
    monkeypatch.setattr(type(context.task), "curvature_rows", None)
    whole = hvp_fn(fm, x, y)(block)
    assert torch.allclose(chunked, whole, rtol=1e-4, atol=1e-6 * float(whole.abs().max()))
    assert float(whole.abs().max()) > 0


def test_relative_damping_is_a_tenth_of_each_layers_mean_eigenvalue(problem) -> None:
    """The lm default (Kronfluence's heuristic): each layer's solve is ``Q (Q^T V Q / (Lambda +
    0.1 mean(Lambda))) Q^T``, checked on a unit vector of every layer."""
    _, _, _, fm, x, y = problem
    ekfac = EKFAC(fm, x, y, damping=0.1, fisher="empirical", relative_damping=True)
    for layer in ekfac.layers:
        basis = torch.kron(layer.q_s, layer.q_a)
        shift = 0.1 * float(layer.eigenvalues.mean())
        inverse = basis @ torch.diag(1 / (layer.eigenvalues.reshape(-1) + shift)) @ basis.T
        column = torch.zeros(fm.n_params, 1, dtype=torch.float64)
        column[layer.weight_slice.start] = 1.0
        solved = ekfac.solve(column)[layer.weight_slice, 0]
        assert torch.allclose(solved, inverse[:, 0], rtol=1e-8)
        assert ekfac.layer_shift(layer) == pytest.approx(shift)


def test_self_influence_is_each_units_quadratic_form_in_the_ekfac_inverse(problem) -> None:
    """Without probes, ``influence`` scores ``g_i^T (F + shift)^-1 g_i`` from the captured
    activations and output gradients per position (no per-sample gradient is formed): the same
    numbers as the explicit gradients through the EK-FAC solve."""
    from cleanse.estimators.influence import SelfInfluenceEstimator, _setup, Workload
    from cleanse.grads import per_sample_grads

    params, _, context, fm, x, y = problem
    options = params.scorers.influence
    result = SelfInfluenceEstimator().score(context, options)
    _, _, _, inverse = _setup(context, options, Workload("self"))
    grads = per_sample_grads(fm, x, y).double()
    explicit = (grads * inverse.ekfac.solve(grads.T).T).sum(1).numpy()
    scored = result.table["self_influence"].to_numpy()
    assert scored == pytest.approx(explicit, rel=1e-4)
    assert (scored > 0).all()

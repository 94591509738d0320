"""Inverse-curvature solvers against ground truth: leave-one-out retraining on logistic regression
(Koh & Liang 2017, Fig. 2), the exact Gauss-Newton matrix, and EK-FAC's defining property."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cleanse.config import InfluenceOptions
from cleanse.ekfac import EKFAC
from cleanse.estimators.influence import SelfInfluenceEstimator, removal_effects
from cleanse.evaluate import leave_one_out_loss_changes, loo_correlation
from cleanse.grads import FunctionalModel, cg_solve, curvature_fn, exact_hessian, ggn_fn


@pytest.fixture(scope="module")
def loo_truth(digits_logreg):
    """Actual leave-one-out changes of the worst test point's loss, for the 40 training points
    with the largest exact predicted effect (warm-started L-BFGS retraining)."""
    context, test = digits_logreg
    fm = FunctionalModel.of(context.model.module(), context.model_config.weight_decay)
    losses = fm.losses(fm.theta, torch.tensor(test.features), torch.tensor(test.label)).detach().numpy()
    query = test.subset(np.array([int(np.argmax(losses))]))
    predicted, _ = removal_effects(context, InfluenceOptions(solver="exact", damping=0.0), query)
    top = np.argsort(-np.abs(predicted[0]))[:40]
    actual = leave_one_out_loss_changes(context.model, context.train, query, context.model_config, top)
    return context, query, top, np.asarray(actual)


# Documented configurations (see the influence module docstring); damping 0 = the exact objective.
SOLVERS = {
    "exact": (InfluenceOptions(solver="exact", damping=0.0), 0.99),
    "cg": (InfluenceOptions(solver="cg", damping=0.0, cg_tol=1e-7, cg_max_iter=300), 0.99),
    "cg_plain": (InfluenceOptions(solver="cg", damping=0.0, cg_tol=1e-7, cg_max_iter=500, cg_preconditioner="none"), 0.99),
    "lissa": (InfluenceOptions(solver="lissa", damping=0.0, lissa_depth=1500, lissa_repeats=2, lissa_batch_size=300), 0.95),
    "ekfac": (InfluenceOptions(solver="ekfac", damping=0.0), 0.9),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_leave_one_out_pearson_on_logistic_regression(loo_truth, name):
    context, query, top, actual = loo_truth
    options, bar = SOLVERS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every solver must converge in its documented configuration
        predicted, inverse = removal_effects(context, options, query)
    assert inverse.solver == name.split("_")[0]
    result = loo_correlation(predicted[0][top], actual)
    assert result["pearson"] >= bar, f"{name}: Pearson {result['pearson']:.4f} < {bar}"


@pytest.fixture(scope="module")
def small_mlp():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x, y = torch.randn(120, 6), torch.randint(0, 4, (120,))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
    return FunctionalModel.of(module, 1e-3), x, y


def test_ggn_is_psd_where_the_hessian_is_indefinite(small_mlp):
    fm, x, y = small_mlp
    hessian = exact_hessian(fm, x, y)
    ggn = exact_hessian(fm, x, y, curvature="ggn")
    assert torch.linalg.eigvalsh(hessian).min() < -1e-4  # a memorising ReLU net: negative curvature
    assert torch.linalg.eigvalsh(ggn).min() >= 1e-3 - 1e-6  # >= the L2 term
    # GGN = J^T H_out J: check one column against the explicit Jacobian.
    jac = torch.func.jacrev(lambda t: fm.logits(t, x))(fm.theta)  # (n, C, p)
    probs = torch.softmax(fm.logits(fm.theta, x), 1)
    h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    explicit = torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / x.shape[0] + 1e-3 * torch.eye(fm.n_params)
    assert torch.allclose(ggn.float(), explicit, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_linear_head_ggn_matches_the_explicit_jacobian_product(bias):
    torch.manual_seed(1)
    head = torch.nn.Linear(7, 5, bias=bias)
    x = torch.randn(90, 7)
    fm = FunctionalModel.of(head, 1e-2)
    block = torch.randn(fm.n_params, 6)
    jac = torch.func.jacrev(lambda t: fm.logits(t, x))(fm.theta)  # (n, C, p)
    probs = torch.softmax(fm.logits(fm.theta, x), 1)
    h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    explicit = torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / x.shape[0] + 1e-2 * torch.eye(fm.n_params)
    assert torch.allclose(ggn_fn(fm, x, None)(block), explicit @ block, atol=1e-5)
    # For a linear model the GGN is the Hessian of the objective.
    hessian = exact_hessian(fm, x, torch.randint(0, 5, (90,)))
    assert torch.allclose(ggn_fn(fm, x, None)(block).double(), hessian @ block.double(), atol=1e-5)


def test_cg_on_the_ggn_meets_no_negative_curvature_and_matches_the_exact_solve(small_mlp):
    fm, x, y = small_mlp
    rhs = torch.randn(fm.n_params, 3, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.solve(exact_hessian(fm, x, y, curvature="ggn") + 1e-3 * torch.eye(fm.n_params, dtype=torch.float64),
                               rhs.double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solution, report = cg_solve(ggn_fn(fm, x, y), rhs, damping=1e-3, max_iter=300, tol=1e-4)
    assert report.converged
    assert torch.allclose(solution.double(), exact, rtol=1e-2, atol=1e-2 * float(exact.abs().max()))
    # The true Hessian of the same net is indefinite: plain CG on it reports negative curvature.
    with pytest.warns(UserWarning, match="negative curvature"):
        cg_solve(curvature_fn(fm, x, y, "hessian"), rhs, damping=1e-3, max_iter=100, tol=1e-4)


def _layer_basis(layer, p: int) -> torch.Tensor:
    """Columns = the Kronecker eigenbasis ``Q_S[:, a] Q_A[:, b]^T`` of one layer, in theta layout."""
    out, n_in = layer.out_features, layer.n_in
    basis = torch.zeros(p, out * n_in, dtype=torch.float64)
    column = 0
    for a in range(out):
        for b in range(n_in):
            matrix = torch.outer(layer.q_s[:, a], layer.q_a[:, b])
            basis[layer.weight_slice, column] = matrix[:, : layer.in_features].reshape(-1)
            if layer.bias_slice is not None:
                basis[layer.bias_slice, column] = matrix[:, -1]
            column += 1
    return basis


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_ekfac_eigenvalues_are_the_exact_ggn_diagonal_in_the_kronecker_eigenbasis(arch):
    """EK-FAC's defining property (George et al., 2018): with the expected Fisher (= GGN for
    cross-entropy), the corrected eigenvalues equal the diagonal of each layer's exact GGN block in
    the basis Q_S (x) Q_A -- on Linear and Conv2d layers alike."""
    from cleanse.models.architectures import build_model, spec_for

    torch.manual_seed(0)
    shape = (1, 6, 6) if arch == "cnn" else (7,)
    module = build_model(spec_for(arch, [3, 4] if arch == "cnn" else [5], shape, 3))
    fm = FunctionalModel.of(module, 0.0)
    x, y = torch.randn(40, *shape), torch.randint(0, 3, (40,))
    ggn = exact_hessian(fm, x, y, curvature="ggn")
    ekfac = EKFAC(fm, x, y, damping=0.0)
    assert {type(layer.module).__name__ for layer in ekfac.layers} == ({"Conv2d", "Linear"} if arch == "cnn" else {"Linear"})
    for layer in ekfac.layers:
        basis = _layer_basis(layer, fm.n_params)
        diagonal = torch.einsum("pk,pq,qk->k", basis, ggn, basis)
        assert torch.allclose(layer.eigenvalues.reshape(-1), diagonal, rtol=1e-3, atol=1e-6)


def test_ekfac_self_influence_ranks_like_the_exact_ggn(digits_logreg):
    context, _ = digits_logreg
    exact = SelfInfluenceEstimator().score(context, InfluenceOptions(solver="exact")).table["score"].to_numpy()
    ekfac = SelfInfluenceEstimator().score(context, InfluenceOptions(solver="ekfac")).table["score"].to_numpy()
    from scipy.stats import spearmanr

    assert spearmanr(exact, ekfac).statistic > 0.97


def test_ekfac_refuses_unsupported_layers():
    from cleanse.errors import ConfigError

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="LayerNorm"):
        EKFAC(FunctionalModel.of(module, 0.0), torch.randn(5, 3), torch.randint(0, 2, (5,)), damping=1e-3)


def test_last_layer_restriction_matches_a_model_of_the_head_alone(wine_context):
    """``layers="last"`` = influence of a linear model on the frozen penultimate features."""
    context, _ = wine_context
    options = InfluenceOptions(solver="exact", layers="last")
    scores = SelfInfluenceEstimator().score(context, options).table["score"].to_numpy()
    module = context.model.module()
    x, y = context.tensors(context.train)
    with torch.no_grad():
        features = module[:-1](x)
    head = FunctionalModel.of(module[-1], context.model_config.weight_decay)
    from cleanse.grads import exact_inverse, per_sample_grads

    inverse = exact_inverse(exact_hessian(head, features, y, curvature="ggn"), 1e-3)
    reference = inverse.quadratic_form(per_sample_grads(head, features, y)).numpy()
    assert np.allclose(scores, reference, rtol=1e-4)


def test_functional_model_leaves_the_callers_module_as_it_was():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)).train()
    fm = FunctionalModel.of(module, 0.0)
    assert module.training and all(p.requires_grad for p in module.parameters())
    assert not fm.module.training
    x = torch.randn(5, 3)
    assert torch.allclose(fm.logits(fm.theta, x), module.eval()(x))


# ------------------------------------------------------------------------- solver: auto (cost model)
def test_auto_takes_the_most_accurate_solver_a_generous_budget_allows(wine_context):
    """With a budget of a million epochs every candidate fits: auto must take exact on all layers,
    and the scores must be exact's."""
    from cleanse.estimators.influence import ACCURACY_ORDER, Workload, plan_solver

    context, _ = wine_context
    options = InfluenceOptions(cost_budget_epochs=1e6)
    plan = plan_solver(context, options, Workload("self"))
    assert (plan.solver, plan.layers, plan.within_budget) == ("exact", "all", True)
    # every candidate is priced (in accuracy order), so the metadata shows what was passed over
    assert [(c["solver"], c["layers"]) for c in plan.candidates] == list(ACCURACY_ORDER)
    auto = SelfInfluenceEstimator().score(context, options)
    exact = SelfInfluenceEstimator().score(context, InfluenceOptions(solver="exact"))
    np.testing.assert_allclose(auto.table["score"].to_numpy(), exact.table["score"].to_numpy(), rtol=1e-6)
    assert auto.meta["auto"]["chosen"] == "exact (all layers)"


def test_auto_walks_down_the_accuracy_order_as_the_budget_shrinks(wine_context):
    """The choice is the first candidate (in accuracy order) whose prediction fits the budget; every
    candidate above it was predicted over budget. A budget nothing fits takes the cheapest."""
    from cleanse.estimators.influence import ACCURACY_ORDER, Workload, plan_solver

    context, _ = wine_context
    for workload in (Workload("self"), Workload("rhs", 1)):
        # a budget just below exact's prediction must reject exact and take a later candidate
        exact = plan_solver(context, InfluenceOptions(cost_budget_epochs=1e6), workload).predicted_epochs
        plan = plan_solver(context, InfluenceOptions(cost_budget_epochs=exact / 2), workload)
        order = [(c["solver"], c["layers"]) for c in plan.candidates]
        assert order == list(ACCURACY_ORDER)
        chosen = order.index((plan.solver, plan.layers))
        assert chosen > 0 and all(not c["fits"] for c in plan.candidates[:chosen])
        assert plan.within_budget and plan.predicted_epochs <= plan.budget_epochs == exact / 2
        nothing = plan_solver(context, InfluenceOptions(cost_budget_epochs=1e-9), workload)
        assert not nothing.within_budget
        assert nothing.predicted_epochs == min(c["predicted_epochs"] for c in nothing.candidates
                                               if c["predicted_epochs"] is not None)


def test_auto_plan_is_deterministic_and_times_nothing(wine_context, monkeypatch):
    """The plan is a pure function of the model, n, the workload and the options: repeated calls
    give the same plan, and no clock is read (a timed probe would make it depend on the load)."""
    import time

    from cleanse.estimators.influence import Workload, plan_solver

    context, _ = wine_context
    first = {w: plan_solver(context, InfluenceOptions(), w).as_meta() for w in (Workload("self"), Workload("rhs", 3))}

    def no_clock() -> float:
        raise AssertionError("plan_solver read the clock")

    monkeypatch.setattr(time, "perf_counter", no_clock)
    monkeypatch.setattr(time, "time", no_clock)
    monkeypatch.setattr(time, "monotonic", no_clock)
    for _ in range(3):
        again = {w: plan_solver(context, InfluenceOptions(), w).as_meta() for w in first}
        assert again == first


def test_auto_takes_exact_on_a_tiny_model_and_ekfac_or_the_last_layer_on_a_large_one(wine_context):
    """Wine's 275-parameter MLP: exact fits the default 5-epoch budget. The speed benchmark's MLP
    (256-384-128-10, 149,258 parameters) at n = 50,000: exact is ruled out by memory, CG's
    iterations cost hundreds of epochs, and an EK-FAC or last-layer solver fits."""
    from tests.conftest import make_split

    from cleanse.config import ModelConfig
    from cleanse.data.dataset import DatasetMeta
    from cleanse.estimators.base import ScoringContext
    from cleanse.estimators.influence import Workload, plan_solver
    from cleanse.models.architectures import spec_for
    from cleanse.models.trainer import train_model

    context, _ = wine_context
    for workload in (Workload("self"), Workload("rhs", 1)):
        plan = plan_solver(context, InfluenceOptions(), workload)
        assert (plan.solver, plan.layers, plan.within_budget) == ("exact", "all", True)

    rng = np.random.default_rng(0)
    n = 50_000
    features, label = rng.normal(size=(n, 256)).astype(np.float32), rng.integers(0, 10, n)
    config = ModelConfig(arch="mlp", hidden=[384, 128], epochs=1, batch_size=256, checkpoints=1)
    # the plan reads the architecture only, so a model trained for one epoch on a few rows will do
    model = train_model(spec_for("mlp", [384, 128], (256,), 10), features[:256], label[:256], config, seed=0)
    large = ScoringContext(train=make_split(features, label), val=make_split(features[:100], label[:100]),
                           meta=DatasetMeta("large", 10, (256,)), model=model, model_config=config, seed=0)
    for workload in (Workload("self"), Workload("rhs", 1)):
        plan = plan_solver(large, InfluenceOptions(), workload)
        assert plan.solver in ("ekfac", "ekfac_sampled") or plan.layers == "last"
        assert plan.within_budget and plan.predicted_epochs <= 5
        rows = {(c["solver"], c["layers"]): c for c in plan.candidates}
        assert rows[("exact", "all")]["predicted_epochs"] is None  # p > exact_max_params
        assert rows[("cg", "all")]["predicted_epochs"] > 5


def test_auto_predictions_match_measured_solver_times(digits_logreg):
    """The cost model's predictions in training epochs (what ``solver: auto`` compares with
    ``cost_budget_epochs``), checked against each solver's measured time divided by one measured
    training epoch on the same problem: within a factor of 5 either way. Epochs, not seconds, so a
    faster or slower machine than the calibration one changes neither side; a cost model off by a
    power of n or p would be off by far more. Each timing is the fastest of three (shared machine)."""
    import time

    from cleanse.estimators.influence import CostModel, Workload, problem
    from cleanse.estimators.influence_plan import epoch_seconds
    from cleanse.models.architectures import spec_for
    from cleanse.models.trainer import train_model

    def fastest(run) -> float:
        run()  # warm-up
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            run()
            timings.append(time.perf_counter() - started)
        return min(timings)

    context, _ = digits_logreg
    prob = problem(context, "all")
    x, _ = prob.tensors(context, context.train)
    one_epoch = context.model_config.model_copy(update={"epochs": 1})
    spec = spec_for("logreg", None, (64,), 10)
    measured_epoch = fastest(lambda: train_model(spec, context.train.features, context.train.label, one_epoch, seed=0))
    predicted_epoch = epoch_seconds(context.model_config, x.shape[0], prob.fm, x[:1])
    for solver in ("exact", "ekfac"):
        options = InfluenceOptions(solver=solver)
        predicted = sum(CostModel(prob.fm, x[:1], x.shape[0], options).predict(solver, Workload("self")).values())
        measured = fastest(lambda: SelfInfluenceEstimator().score(context, options))
        predicted_epochs, measured_epochs = predicted / predicted_epoch, measured / measured_epoch
        assert measured_epochs / 5 <= predicted_epochs <= measured_epochs * 5, (
            f"{solver}: predicted {predicted_epochs:.2f} epochs, measured {measured_epochs:.2f}")


def test_inverse_hessian_refuses_an_unresolved_auto(small_mlp):
    from cleanse.estimators.influence import InverseHessian

    fm, x, y = small_mlp
    with pytest.raises(ValueError, match="plan_solver"):
        InverseHessian(fm, x, y, InfluenceOptions(), seed=0)


@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_linear_head_ggn_matrix_equals_its_columns(bias):
    """The closed-form (p, p) Gauss-Newton matrix of a linear head equals the matrix of its
    curvature-vector products applied to the identity (themselves checked against J^T H J above)."""
    from cleanse.grads import _linear_head_ggn, linear_head_ggn_matrix

    torch.manual_seed(1)
    head = torch.nn.Linear(7, 4, bias=bias)
    fm = FunctionalModel.of(head, 1e-2)
    x = torch.randn(50, 7)
    columns = _linear_head_ggn(fm, x)(torch.eye(fm.n_params)).double()
    np.testing.assert_allclose(linear_head_ggn_matrix(fm, x, chunk_size=16).numpy(), columns.numpy(), atol=1e-6)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_grad_dots_over_a_block_of_directions_equal_materialised_gradients(arch):
    """``grad_dots`` with a ``(p, k)`` block (the all-Linear fast path for the MLP, forward mode per
    direction for the CNN) equals the per-sample gradients times the block, in chunks."""
    from cleanse.grads import grad_dots, per_sample_grads
    from cleanse.models.architectures import build_model, spec_for

    torch.manual_seed(0)
    shape = (1, 8, 8) if arch == "cnn" else (20,)
    module = build_model(spec_for(arch, [12, 6] if arch == "cnn" else [16, 8], shape, 4))
    fm = FunctionalModel.of(module, weight_decay=0.0)
    x, y = torch.randn(37, *shape), torch.randint(0, 4, (37,))
    block = torch.randn(fm.n_params, 5, generator=torch.Generator().manual_seed(2))
    reference = per_sample_grads(fm, x, y) @ block
    assert torch.allclose(grad_dots(fm, x, y, block, chunk_size=10), reference, atol=1e-4)
    assert torch.allclose(grad_dots(fm, x, y, block[:, 3], chunk_size=10), reference[:, 3], atol=1e-4)

"""The family protocol (cleanse.families): the losses the estimators differentiate, the parameters
they differentiate, and the curvature the family supplies, against independent computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cleanse import families
from cleanse.curvature import exact_hessian
from cleanse.grads import FunctionalModel, per_sample_grads


def _mlp(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, outputs))


def test_classification_loss_is_cross_entropy_and_regression_loss_is_squared_error():
    torch.manual_seed(1)
    logits, labels = torch.randn(6, 3), torch.randint(0, 3, (6,))
    task = families.get("classification")
    torch.testing.assert_close(task.per_sample_loss(logits, labels), F.cross_entropy(logits, labels, reduction="none"))
    torch.testing.assert_close(task.mean_loss(logits, labels), F.cross_entropy(logits, labels))
    prediction, target = torch.randn(6, 1), torch.randn(6)
    squared = families.get("regression").per_sample_loss(prediction, target)
    torch.testing.assert_close(squared, (prediction[:, 0] - target) ** 2)
    assert squared.shape == (6,)


@pytest.mark.parametrize("family,outputs", [("classification", 3), ("regression", 1)])
def test_last_layer_gradients_are_the_head_columns_of_all_parameter_gradients(family, outputs):
    task = families.get(family)
    module = _mlp(outputs)
    torch.manual_seed(2)
    x = torch.randn(9, 5)
    y = torch.randint(0, 3, (9,)) if family == "classification" else torch.randn(9)
    full = FunctionalModel.of(module, 0.0, task)
    head = FunctionalModel.of(module, 0.0, task, layers="last")
    assert head.names == ["3.weight", "3.bias"] and not head.complete and full.complete
    head_columns = full.n_params - head.n_params  # the head's parameters come last
    torch.testing.assert_close(per_sample_grads(head, x, y), per_sample_grads(full, x, y)[:, head_columns:])


def test_ridge_gauss_newton_is_its_hessian_and_is_2_x_x_over_n_plus_weight_decay():
    # For a linear model under squared error the network is linear in theta, so the Gauss-Newton
    # matrix (family-supplied output curvature 2 I) equals the Hessian, which is known in closed form.
    task = families.get("regression")
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    torch.manual_seed(3)
    x, y = torch.randn(20, 4), torch.randn(20)
    fm = FunctionalModel.of(module, 0.1, task)
    ggn = exact_hessian(fm, x, y, curvature="ggn")
    hessian = exact_hessian(fm, x, y, curvature="hessian")
    augmented = torch.cat([x, torch.ones(20, 1)], dim=1).double()  # parameter order: weight, then bias
    expected = 2 * augmented.T @ augmented / 20 + 0.1 * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(ggn, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hessian, expected, rtol=1e-5, atol=1e-5)


def test_adapters_select_only_lora_parameters():
    class Adapted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Linear(4, 2)
            self.lora_a = nn.Parameter(torch.zeros(4, 1))
            self.lora_b = nn.Parameter(torch.zeros(1, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + x @ self.lora_a @ self.lora_b

    fm = FunctionalModel.of(Adapted(), 0.0, families.get("classification"), layers="adapters")
    assert fm.names == ["lora_a", "lora_b"] and fm.n_params == 6


def test_the_registry_mirrors_every_estimators_declared_families():
    from cleanse.estimators import registry

    for name in registry.names():
        assert registry.families_of(name) == registry.get(name).families, name

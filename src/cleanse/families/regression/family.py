"""Regression: training samples with a real-valued target, a model with one output ``(B, 1)``,
the squared error ``l = (f(x) - y)^2`` as the loss (so a ridge model's objective, with the L2 term,
is ridge regression), and the test RMSE against the clean targets as the outcome."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from cleanse.families.base import Family

if TYPE_CHECKING:
    from cleanse.config import Params
    from cleanse.data.dataset import StagedData


class RegressionFamily(Family):
    name: ClassVar[str] = "regression"
    target_dtype: ClassVar[torch.dtype] = torch.float32
    outcome_keys: ClassVar[tuple[str, ...]] = ("test_rmse",)
    selection: ClassVar[tuple[str, float]] = ("val_rmse", -1.0)

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(f(x) - y)^2`` per sample, from predictions ``(B, 1)`` and targets ``(B,)``."""
        return (output[:, 0] - target.to(output.dtype)).pow(2)

    def output_curvature(self, output: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Squared error: ``d^2 l / d f^2 = 2`` (the Gauss-Newton matrix is ``2 J^T J``)."""
        return lambda u: 2.0 * u

    def measurement(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The prediction ``f(x)`` (TRAK's model output for regression)."""
        return output[:, 0]

    def loss_weight(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``|f(x) - y|``: the loss's derivative with respect to the prediction, up to the factor 2."""
        return (output[:, 0].double() - target.double()).abs()

    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``residual = f(x) - y``."""
        return {"residual": output[:, 0] - target.to(output.dtype)}

    def stage(self, params: Params) -> StagedData:
        from cleanse.families.regression.data import stage_regression

        return stage_regression(params)

    def outcome(self, model: Any, staged: StagedData, query: Any = None) -> dict[str, float]:
        """``test_rmse`` against the clean test targets and ``val_rmse`` on the validation split
        (what the recommendation may read), in the staged target's units."""
        module = model.module()
        return {"test_rmse": _rmse(module, staged.test.features, staged.test.label_clean),
                "val_rmse": _rmse(module, staged.val.features, staged.val.label)}


@torch.no_grad()
def _rmse(module: torch.nn.Module, features: np.ndarray, target: np.ndarray) -> float:
    device = next(module.parameters()).device
    prediction = module(torch.as_tensor(features, dtype=torch.float32, device=device))[:, 0].double().cpu().numpy()
    return float(np.sqrt(np.mean((prediction - np.asarray(target, dtype=np.float64)) ** 2)))

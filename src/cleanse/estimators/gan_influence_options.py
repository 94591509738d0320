"""Options of ``scorers.gan_influence`` (:mod:`cleanse.estimators.gan_influence`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


class GanInfluenceOptions(_Section):
    metric: Literal["auto", "all", "fid", "is", "dloss"] = Field(
        "auto", description="The metric whose predicted change scores each instance: all (2-D), fid or is (images), "
        "dloss (the discriminator loss, a baseline); auto: the run's headline metric (metrics.names[0]).")
    method: Literal["itd", "aid"] = Field(
        "itd", description="itd: backward adjoint pass through the traced window (all instances at once); aid: "
        "implicit, at the final parameters, no trajectory.")
    optimizer_adjoint: bool = Field(
        True, description="itd: carry an adjoint for the optimizer's buffers (momentum, Adam moments), which makes ITD "
        "the exact derivative of the replay for every optimizer; false: the papers' choice, previous buffers held "
        "constant (gaussian2d with Adam: Kendall tau against replay 0.73 held constant, 0.86 carried).")
    aid_depth: int = Field(50, ge=1, description="aid: iterations of the adjoint fixed point on fresh minibatches.")
    damping: float = Field(0.0, ge=0, lt=1, description="u <- (1 - damping) u + scale * J^T u at each step.")
    scale: float = Field(1.0, gt=0, description="Scale of the Jacobian-vector term (aid; itd with damping).")

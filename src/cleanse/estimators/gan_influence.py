"""Influence of each training instance on a GAN evaluation metric (Terashita, Ohashi and Hara,
"Data Cleansing for GANs", TNNLS 2025; the ICLR 2021 "Influence Estimation for GANs").

A real instance reaches only the discriminator; its influence on the generator travels through
the coupled D and G updates. ``I_j ≈ M(θ^{-j}_T) − M(θ_T)`` is the predicted change of metric ``M``
(computed on the validation split's real instances and fixed latents) when instance ``j`` is
removed, by

- ``method: itd``: the backward adjoint pass through the traced window (all instances at once,
  the mask trick; :func:`cleanse.families.gan.influence.itd_influence`), 0 for instances that
  never appear in the window;
- ``method: aid``: the implicit, trajectory-free approximation at the final parameters
  (:func:`cleanse.families.gan.influence.aid_influence`).

Score (higher = more harmful): ``direction * I_j`` with ``direction`` +1 for ALL and IS (higher is
better) and −1 for FID and the D-loss (lower is better): the instances whose removal improves the
metric most come first. Columns: ``predicted_change`` (``I_j``, in the metric's units) and
``in_window`` (whether the instance was in a traced batch).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel

from cleanse.errors import ConfigError
from cleanse.estimators.base import ScoreResult, score_table
from cleanse.estimators.gan_influence_options import GanInfluenceOptions
from cleanse.families.gan.family import DIRECTIONS, GanContext


def metric_name(context: GanContext, options: GanInfluenceOptions) -> str:
    """The metric the options name (``auto``: the run's headline metric)."""
    if options.metric != "auto":
        image = context.meta.is_image
        if options.metric == "all" and image or options.metric in ("fid", "is") and not image:
            raise ConfigError(f"scorers.gan_influence.metric: {options.metric!r} does not fit "
                              f"{'image' if image else '2-D'} data; use {'fid, is' if image else 'all'} or dloss")
        return options.metric
    return context.model.metrics[0]


def predicted_change(context: GanContext, options: GanInfluenceOptions) -> tuple[str, np.ndarray]:
    """The metric's name and ``I_j`` ``(n,)`` float64 for every training row."""
    from cleanse.families.gan.influence import aid_influence, itd_influence

    name = metric_name(context, options)
    trained = context.model.trained
    data = context.data()
    metric = context.model.metric(name, context.val.features, context.train.features).differentiable(trained.spec)
    if options.method == "itd":
        change = itd_influence(trained.spec, trained.recipe, trained.trace, data, metric,
                               damping=options.damping, scale=options.scale,
                               optimizer_adjoint=options.optimizer_adjoint)
    else:
        change = aid_influence(trained.spec, trained.recipe, trained.g_state, trained.d_state, data, metric,
                               depth=options.aid_depth, damping=options.damping, scale=options.scale,
                               seed=context.seed, batch_size=trained.recipe.batch_size)
    return name, np.asarray(change, dtype=np.float64)


class GanInfluenceEstimator:
    name: ClassVar[str] = "gan_influence"
    options_type: ClassVar[type[BaseModel]] = GanInfluenceOptions
    families: ClassVar[tuple[str, ...]] = ("gan",)
    reads_validation_labels: ClassVar[bool] = False  # it reads the validation instances, not labels

    def score(self, context: GanContext, options: GanInfluenceOptions) -> ScoreResult:
        name, change = predicted_change(context, options)
        direction = DIRECTIONS[name]
        in_window = context.model.trained.trace.in_window(len(context.train)).numpy()
        table = score_table(context.train.sample_id, direction * change, predicted_change=change,
                            in_window=in_window.astype(bool))
        return ScoreResult(table, {"metric": name, "method": options.method, "direction": direction,
                                   "orientation": "score = direction * predicted metric change when the instance "
                                                  "is removed; higher = removing it improves the metric more"})

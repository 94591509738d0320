"""Isolation Forest (Liu, Ting and Zhou, ICDM 2008): the baseline users curate GAN data with, which
Terashita et al. (ICLR 2021) show can make FID worse. Scores the raw instances for 2-D data and the
feature classifier's penultimate features for images
(:func:`cleanse.families.gan.outliers.isolation_forest_scores`); higher = more abnormal = more
harmful. Reads neither the GAN nor the validation split.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel

from cleanse.errors import ConfigError
from cleanse.estimators.base import ScoreResult, score_table
from cleanse.estimators.isolation_forest_options import IsolationForestOptions
from cleanse.families.gan.family import GanContext


class IsolationForestEstimator:
    name: ClassVar[str] = "isolation_forest"
    options_type: ClassVar[type[BaseModel]] = IsolationForestOptions
    families: ClassVar[tuple[str, ...]] = ("gan",)
    reads_validation_labels: ClassVar[bool] = False

    def score(self, context: GanContext, options: IsolationForestOptions) -> ScoreResult:
        from cleanse.families.gan.outliers import isolation_forest_scores

        features = options.features
        if features == "auto":
            features = "classifier" if context.meta.is_image else "raw"
        if features == "classifier":
            if context.model.feature_net is None:
                raise ConfigError("scorers.isolation_forest.features: 'classifier' needs image data (the feature "
                                  "classifier); use raw")
            x = context.model.feature_net.embed(context.train.features)
        else:
            x = context.train.features.reshape(len(context.train), -1).astype(np.float64)
        score = isolation_forest_scores(x, context.seed)
        return ScoreResult(score_table(context.train.sample_id, score), {"features": features})

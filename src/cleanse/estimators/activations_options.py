"""Options of ``scorers.spectral_signatures`` and ``scorers.activation_clustering``
(:mod:`cleanse.estimators.activations`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from pydantic import Field

from cleanse.config_base import _Section


class SpectralOptions(_Section):
    directions: int = Field(1, ge=1, description="Top singular directions per class whose squared projections are summed.")


class ActivationClusteringOptions(_Section):
    n_components: int = Field(10, ge=1, description="Principal components kept before 2-means (Chen et al. use 10).")

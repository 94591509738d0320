"""The ``scorers`` section of ``params.yaml``: one options model per estimator (``scorers.<estimator>``).

Each options model lives beside its estimator, in a light ``<module>_options.py`` (no torch, no
scikit-learn, so validating params stays fast), and the estimator class names it as its
``options_type``; :class:`ScorerOptions` assembles them under the registry's names, and a test keeps
its fields equal to the registry's estimators and their declared ``options_type``. Stages read an
estimator's options with :meth:`ScorerOptions.of`. Each section is validated like the rest of
``params.yaml`` (:mod:`cleanse.config`): unknown keys are refused and errors name the dotted key and
the allowed values.
"""

from __future__ import annotations

from pydantic import BaseModel

from cleanse.config_base import _Section
from cleanse.errors import ConfigError
from cleanse.estimators.activations_options import ActivationClusteringOptions, SpectralOptions
from cleanse.estimators.confident_learning_options import CleanlabOptions
from cleanse.estimators.fine_options import FineOptions
from cleanse.estimators.gan_influence_options import GanInfluenceOptions
from cleanse.estimators.holdout_ensemble_options import HoldoutEnsembleOptions
from cleanse.estimators.influence_fvm_options import FvmOptions
from cleanse.estimators.influence_options import InfluenceOptions
from cleanse.estimators.isolation_forest_options import IsolationForestOptions
from cleanse.estimators.loss_options import LossOptions
from cleanse.estimators.memorization_options import MemorizationOptions
from cleanse.estimators.tracin_options import TracInOptions
from cleanse.estimators.trak_options import TrakOptions
from cleanse.estimators.trusted_options import TrustedOptions

__all__ = [
    "ActivationClusteringOptions", "CleanlabOptions", "FineOptions", "FvmOptions", "GanInfluenceOptions",
    "HoldoutEnsembleOptions", "InfluenceOptions", "IsolationForestOptions", "LossOptions", "MemorizationOptions",
    "ScorerOptions", "SpectralOptions", "TracInOptions",
    "TrakOptions", "TrustedOptions", "options_model",
]


class ScorerOptions(_Section):
    """Per-estimator options. Changing one section reruns only that estimator downstream.

    Fields are typed (so ``params.scorers.tracin.checkpoints`` is checked statically); which model
    each name takes is each estimator's own declaration (``options_type``), checked by a test."""

    loss: LossOptions = LossOptions()
    cleanlab: CleanlabOptions = CleanlabOptions()
    influence: InfluenceOptions = InfluenceOptions()
    influence_val: InfluenceOptions = InfluenceOptions()
    tracin: TracInOptions = TracInOptions()
    memorization: MemorizationOptions = MemorizationOptions()
    spectral_signatures: SpectralOptions = SpectralOptions()
    activation_clustering: ActivationClusteringOptions = ActivationClusteringOptions()
    trak: TrakOptions = TrakOptions()
    influence_fvm: FvmOptions = FvmOptions()
    fine: FineOptions = FineOptions()
    trusted: TrustedOptions = TrustedOptions()
    holdout_ensemble: HoldoutEnsembleOptions = HoldoutEnsembleOptions()
    gan_influence: GanInfluenceOptions = GanInfluenceOptions()
    isolation_forest: IsolationForestOptions = IsolationForestOptions()

    def of(self, estimator: str) -> BaseModel:
        """The options of ``estimator`` (``scorers.<estimator>``); a ConfigError naming the
        allowed estimators when there is no such section."""
        options_model(estimator)  # refuses unknown names
        options: BaseModel = getattr(self, estimator)
        return options


def options_model(estimator: str) -> type[BaseModel]:
    """The options model of ``estimator``, without importing the estimator (torch, scikit-learn)."""
    fields = ScorerOptions.model_fields
    if estimator not in fields:
        raise ConfigError(f"scorers.{estimator}: no such estimator; allowed: {', '.join(fields)}")
    model = fields[estimator].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel)
    return model

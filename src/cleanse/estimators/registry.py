"""The estimator registry: name -> "module:Class". Adding an estimator = one module, its options
model (``<module>_options.py``, assembled into ``scorers`` by :mod:`cleanse.estimators.options`) and
one line here.

Entries are import strings so that listing names (for configuration errors and ``--help``) does
not import torch.
"""

from __future__ import annotations

import importlib

from cleanse.errors import ConfigError

_REGISTRY: dict[str, str] = {
    "loss": "cleanse.estimators.loss:LossEstimator",
    "cleanlab": "cleanse.estimators.confident_learning:ConfidentLearningEstimator",
    "influence": "cleanse.estimators.influence:SelfInfluenceEstimator",
    "influence_val": "cleanse.estimators.influence:ValidationInfluenceEstimator",
    "tracin": "cleanse.estimators.tracin:TracInEstimator",
    "memorization": "cleanse.estimators.memorization:MemorizationEstimator",
    "spectral_signatures": "cleanse.estimators.activations:SpectralSignatureEstimator",
    "activation_clustering": "cleanse.estimators.activations:ActivationClusteringEstimator",
    "trak": "cleanse.estimators.trak:TrakEstimator",
    "influence_fvm": "cleanse.estimators.influence_fvm:FlatValidationInfluenceEstimator",
    "fine": "cleanse.estimators.fine:FineEstimator",
    "trusted": "cleanse.estimators.trusted:TrustedEstimator",
    "holdout_ensemble": "cleanse.estimators.holdout_ensemble:HoldoutEnsembleEstimator",
    "gan_influence": "cleanse.estimators.gan_influence:GanInfluenceEstimator",
    "isolation_forest": "cleanse.estimators.isolation_forest:IsolationForestEstimator",
}


def names() -> list[str]:
    return list(_REGISTRY)


# The families (cleanse.families) each estimator supports: its class's ``families``, mirrored
# here so that a configuration is checked without importing torch (a test keeps the two equal).
_GRADIENT_FAMILIES = ("classification", "regression")
_FAMILIES: dict[str, tuple[str, ...]] = {
    **{name: ("classification",) for name in _REGISTRY},
    **{name: _GRADIENT_FAMILIES for name in ("loss", "influence", "influence_val", "tracin", "trak")},
    **{name: ("gan",) for name in ("gan_influence", "isolation_forest")},
}


def families_of(name: str) -> tuple[str, ...]:
    """The families estimator ``name`` supports."""
    return _FAMILIES.get(name, ("classification",))


def names_for(family: str) -> list[str]:
    """The registered estimators that support ``family``, in registry order."""
    return [name for name in _REGISTRY if family in families_of(name)]


def check_supports(name: str, family: str) -> None:
    """Refuse ``name`` for ``family`` unless the estimator supports it (:func:`families_of`)."""
    if family not in families_of(name):
        raise ConfigError(f"estimator {name!r} does not support family {family!r}")


def get(name: str):
    if name not in _REGISTRY:
        raise ConfigError(f"unknown estimator {name!r}; allowed: {', '.join(_REGISTRY)}")
    module_name, class_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()

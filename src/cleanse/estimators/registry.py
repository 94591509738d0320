"""The estimator registry: name -> "module:Class", and name -> its options model. Adding an
estimator = one module, its options model in a light ``<module>_options.py`` beside it, and its
lines here: ``scorers.<name>`` (:mod:`cleanse.estimators.options`) is assembled from
:data:`_OPTIONS`, so no other file lists the estimators.

Entries are import strings so that listing names (for configuration errors and ``--help``) does
not import torch, and validating params imports only the ``*_options`` modules.
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
    "cofit_svm": "cleanse.estimators.cofit_svm:CofitSvmEstimator",
    "gan_influence": "cleanse.estimators.gan_influence:GanInfluenceEstimator",
    "isolation_forest": "cleanse.estimators.isolation_forest:IsolationForestEstimator",
    "dmin": "cleanse.estimators.dmin:DminEstimator",
    "pixel_nn": "cleanse.estimators.pixel_nn:PixelNNEstimator",
    "dtrak": "cleanse.estimators.dtrak:DtrakEstimator",
    "diffim_oneshot": "cleanse.estimators.cascade:OneShotEstimator",
    "diffim_relax": "cleanse.estimators.cascade:RelaxEstimator",
    "diffim_greedy": "cleanse.estimators.cascade:SurrogateGreedyEstimator",
    "greedy_mc": "cleanse.estimators.cascade:GreedyMcEstimator",
    "degree": "cleanse.estimators.cascade:DegreeEstimator",
    "betweenness": "cleanse.estimators.cascade:BetweennessEstimator",
    "pagerank": "cleanse.estimators.cascade:PagerankEstimator",
    "eigen_drop": "cleanse.estimators.cascade:EigenDropEstimator",
}


# The model of ``scorers.<name>``, in the estimator's ``<module>_options.py`` (no torch, no
# scikit-learn); the estimator class names the same model as its ``options_type`` (a test keeps the
# two equal). Estimators may share a model (influence, influence_val), each under its own section.
_OPTIONS: dict[str, str] = {
    "loss": "cleanse.estimators.loss_options:LossOptions",
    "cleanlab": "cleanse.estimators.confident_learning_options:CleanlabOptions",
    "influence": "cleanse.estimators.influence_options:InfluenceOptions",
    "influence_val": "cleanse.estimators.influence_options:InfluenceOptions",
    "tracin": "cleanse.estimators.tracin_options:TracInOptions",
    "memorization": "cleanse.estimators.memorization_options:MemorizationOptions",
    "spectral_signatures": "cleanse.estimators.activations_options:SpectralOptions",
    "activation_clustering": "cleanse.estimators.activations_options:ActivationClusteringOptions",
    "trak": "cleanse.estimators.trak_options:TrakOptions",
    "influence_fvm": "cleanse.estimators.influence_fvm_options:FvmOptions",
    "fine": "cleanse.estimators.fine_options:FineOptions",
    "trusted": "cleanse.estimators.trusted_options:TrustedOptions",
    "holdout_ensemble": "cleanse.estimators.holdout_ensemble_options:HoldoutEnsembleOptions",
    "cofit_svm": "cleanse.estimators.cofit_svm_options:CofitSvmOptions",
    "gan_influence": "cleanse.estimators.gan_influence_options:GanInfluenceOptions",
    "isolation_forest": "cleanse.estimators.isolation_forest_options:IsolationForestOptions",
    "dmin": "cleanse.estimators.dmin_options:DminOptions",
    "pixel_nn": "cleanse.estimators.pixel_nn_options:PixelNNOptions",
    "dtrak": "cleanse.estimators.dtrak_options:DtrakOptions",
    "diffim_oneshot": "cleanse.estimators.cascade_options:OneShotOptions",
    "diffim_relax": "cleanse.estimators.cascade_options:RelaxOptions",
    "diffim_greedy": "cleanse.estimators.cascade_options:SurrogateGreedyOptions",
    "greedy_mc": "cleanse.estimators.cascade_options:GreedyMcOptions",
    "degree": "cleanse.estimators.cascade_options:HeuristicOptions",
    "betweenness": "cleanse.estimators.cascade_options:BetweennessOptions",
    "pagerank": "cleanse.estimators.cascade_options:PagerankOptions",
    "eigen_drop": "cleanse.estimators.cascade_options:EigenOptions",
}


def names() -> list[str]:
    return list(_REGISTRY)


def options_path(name: str) -> str:
    """The ``"module:Class"`` of estimator ``name``'s options model (``scorers.<name>``)."""
    if name not in _OPTIONS:
        raise ConfigError(f"scorers.{name}: no such estimator; allowed: {', '.join(_REGISTRY)}")
    return _OPTIONS[name]


# The families (cleanse.families) each estimator supports: its class's ``families``, mirrored
# here so that a configuration is checked without importing torch (a test keeps the two equal).
_GRADIENT_FAMILIES = ("classification", "regression")
_FAMILIES: dict[str, tuple[str, ...]] = {
    **{name: ("classification",) for name in _REGISTRY},
    **{name: _GRADIENT_FAMILIES for name in ("loss", "influence", "influence_val", "tracin", "trak")},
    **{name: ("gan",) for name in ("gan_influence", "isolation_forest")},
    **{name: ("diffusion",) for name in ("dmin", "pixel_nn", "dtrak")},
    **{name: ("cascade",) for name in ("diffim_oneshot", "diffim_relax", "diffim_greedy", "greedy_mc", "degree",
                                      "betweenness", "pagerank", "eigen_drop")},
    # graph: node units through a whole-graph forward; lm: over the LoRA adapters
    **{name: (*_GRADIENT_FAMILIES, "graph", "lm") for name in ("loss", "tracin", "influence", "trak")},
    "cleanlab": ("classification", "graph"),
    "fine": ("classification", "lm"),  # lm: the curriculum trains fresh adapters (LmContext.fresh_model)
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

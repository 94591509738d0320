"""Families (tasks) behind the loop: name -> :class:`cleanse.families.base.Family`.

Adding a family = one package here + one line in :data:`_REGISTRY` + one in :data:`PARAMS` (its
params model, a subclass of :class:`cleanse.config.Params`). Entries are import strings, so listing
names does not import torch.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from cleanse.errors import ConfigError

_REGISTRY: dict[str, str] = {
    "classification": "cleanse.families.classification.family:ClassificationFamily",
    "regression": "cleanse.families.regression.family:RegressionFamily",
    "gan": "cleanse.families.gan.family:GanFamily",
    "diffusion": "cleanse.families.diffusion.family:DiffusionFamily",
    "cascade": "cleanse.families.cascade.family:CascadeFamily",
    "lm": "cleanse.families.lm.family:LmFamily",
    "graph": "cleanse.families.graph.family:GraphFamily",
}

# The params models that live in their family's package ("module:Class", a subclass of
# cleanse.config.Params with ``family: Literal[name]``); classification, regression and gan are
# defined in cleanse.config itself.
PARAMS: dict[str, str] = {
    "diffusion": "cleanse.families.diffusion.params:DiffusionParams",
    "cascade": "cleanse.families.cascade.params:CascadeParams",
    "lm": "cleanse.families.lm.params:LmParams",
    "graph": "cleanse.families.graph.params:GraphParams",
}

DEFAULT = "classification"


def params_models() -> dict[str, Any]:
    """The params model classes :data:`PARAMS` names, imported (by :mod:`cleanse.config`, once
    ``Params`` exists)."""
    models = {}
    for name, target in PARAMS.items():
        module_name, class_name = target.split(":")
        models[name] = getattr(importlib.import_module(module_name), class_name)
    return models


def names() -> list[str]:
    return list(_REGISTRY)


@functools.cache
def get(name: str = DEFAULT) -> Any:
    """The (stateless, shared) family object called ``name``."""
    if name not in _REGISTRY:
        raise ConfigError(f"family: {name!r} is not one of {', '.join(map(repr, _REGISTRY))}")
    module_name, class_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()

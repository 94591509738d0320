"""The ``scorers`` section of ``params.yaml``: one options model per estimator (``scorers.<estimator>``).

Each options model lives beside its estimator, in a light ``<module>_options.py`` (no torch, no
scikit-learn, so validating params stays fast); the registry (:mod:`cleanse.estimators.registry`)
names it for each estimator, and :class:`ScorerOptions` is assembled from the registry with
:func:`pydantic.create_model`, one field per registered estimator in registry order. So this module
names no estimator: a new one is its module plus its registration. Stages read an estimator's options
with :meth:`ScorerSection.of`, typed when given the model (``of(name, ItsOptions)``). Each
section is validated like the rest of ``params.yaml`` (:mod:`cleanse.config`): unknown keys are
refused and errors name the dotted key and the allowed values.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import BaseModel, create_model

from cleanse.config_base import _Section
from cleanse.errors import ConfigError
from cleanse.estimators import registry

__all__ = ["ScorerOptions", "ScorerSection", "options_model"]

_Options = TypeVar("_Options", bound=BaseModel)


class ScorerSection(_Section):
    """Per-estimator options. Changing one section reruns only that estimator downstream.

    The fields (one per registered estimator) are added by :func:`_assemble`; read them with
    :meth:`of`, which mypy can check (attribute access works too, untyped)."""

    @overload
    def of(self, estimator: str) -> BaseModel: ...

    @overload
    def of(self, estimator: str, model: type[_Options]) -> _Options: ...

    def of(self, estimator: str, model: type[BaseModel] | None = None) -> BaseModel:
        """The options of ``estimator`` (``scorers.<estimator>``); a ConfigError naming the
        allowed estimators when there is no such section. With ``model``, the options are checked
        to be that model (a TypeError otherwise: the caller names the wrong one)."""
        if estimator not in type(self).model_fields:
            raise ConfigError(f"scorers.{estimator}: no such estimator; "
                              f"allowed: {', '.join(type(self).model_fields)}")
        options = getattr(self, estimator)
        if model is not None and not isinstance(options, model):
            raise TypeError(f"scorers.{estimator} is {type(options).__name__}, not {model.__name__}")
        assert isinstance(options, BaseModel)
        return options


def _load(path: str) -> type[BaseModel]:
    module_name, class_name = path.split(":")
    model = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{path} is not a pydantic model")
    return model


def _assemble() -> type[ScorerSection]:
    """``ScorerOptions``: ``scorers.<name>`` for every registered estimator, defaulting to its
    model's defaults (the same defaults, order and dump as a hand-written class: the fingerprints
    hash these options)."""
    fields: dict[str, Any] = {}
    for name in registry.names():
        model = _load(registry.options_path(name))
        fields[name] = (model, model())
    return create_model("ScorerOptions", __base__=ScorerSection, __module__=__name__,
                        __doc__=ScorerSection.__doc__, **fields)


if TYPE_CHECKING:
    ScorerOptions = ScorerSection
else:
    ScorerOptions = _assemble()


def options_model(estimator: str) -> type[BaseModel]:
    """The options model of ``estimator``, without importing the estimator (torch, scikit-learn)."""
    fields = ScorerOptions.model_fields
    if estimator not in fields:
        raise ConfigError(f"scorers.{estimator}: no such estimator; allowed: {', '.join(fields)}")
    model = fields[estimator].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel)
    return model

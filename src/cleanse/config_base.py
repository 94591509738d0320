"""The shared base of the configuration models (:mod:`cleanse.config`,
:mod:`cleanse.estimators.options`, each family's sections): the frozen, extra-forbidding section
base, the ``auto`` settings that follow ``query.kind``, the numeric limits, the one-line error
format and the ``--set`` overrides.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from cleanse.errors import ConfigError


class _Section(BaseModel):
    # allow_inf_nan=False: inf or nan in any number (lr=inf, damping=nan) is refused at the boundary
    # instead of training a NaN model.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _open_fraction(value: float, *, allow_zero: bool = False) -> float:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"must lie in {interval}, got {value}")
    return value


# A float in (0, 1), refused otherwise with the interval named (for fields that need nothing else).
OpenFraction = Annotated[float, AfterValidator(_open_fraction)]

# The settings whose default depends on whether the run has probes (query.kind other than none):
# dotted key -> (value without probes, value with probes). With probes, the values documented in
# docs/benchmarks.md ("Backdoor: probe attribution and iterative cleansing"): geometric checkpoints
# and unit training gradients for TracIn, iterative cleansing. Without, self-influence keeps even
# checkpoints and raw TracIn scores, and a one-shot retrain.
AUTO_SETTINGS: dict[str, tuple[Any, Any]] = {
    "model.checkpoint_spacing": ("even", "geometric"),
    "scorers.tracin.normalize": ("none", "train"),
    "cleansing.iterative": (False, True),
}
_UNSET = object()


def _probe_free(key: str, value: Any) -> Any:
    """A section validated on its own (no ``query.kind`` in sight) reads ``auto`` as the value without probes."""
    return AUTO_SETTINGS[key][0] if value == "auto" else value


def refuse_probes(kind: str, family: str, allowed: str = "'none'") -> None:
    """Refuse a classification probe set (``query.kind`` other than ``none``) for ``family``, whose
    own queries, if any, are named in ``allowed``."""
    if kind != "none":
        raise ValueError(f"query.kind: {kind!r} is a classification probe set; family {family!r} allows {allowed}")


def _items(node: Any) -> dict[str, Any] | None:
    """A section as a mutable mapping (a model: only the fields set explicitly); None if it is neither."""
    if isinstance(node, BaseModel):
        return node.model_dump(exclude_unset=True)
    return dict(node) if isinstance(node, dict) else None


def _lookup(node: Any, path: list[str]) -> Any:
    for key in path:
        items = _items(node)
        if items is None or key not in items:
            return _UNSET
        node = items[key]
    return node


def _replaced(node: Any, path: list[str], value: Any) -> Any:
    items = {} if node is _UNSET else _items(node)
    if items is None:  # not a section: validation names it
        return node
    items[path[0]] = value if len(path) == 1 else _replaced(items.get(path[0], _UNSET), path[1:], value)
    return items


def resolve_auto(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (what :class:`Params` validates) with each :data:`AUTO_SETTINGS` key that is unset or
    ``auto`` given its value for the run's ``query.kind``. The one place these defaults are decided:
    :class:`Params` calls it before validating, so the stages, fingerprints, MLflow params and the CLI
    only ever see the resolved values, and ``auto`` fingerprints as the value it stands for. An
    explicit value always wins (``cleansing.iterative: true`` without probes is still refused)."""
    kind = _lookup(raw, ["query", "kind"])
    probes = kind is not _UNSET and kind != "none"
    out = dict(raw)
    for key, (without, with_probes) in AUTO_SETTINGS.items():
        path = key.split(".")
        if _lookup(out, path) in (_UNSET, "auto"):
            out = _replaced(out, path, with_probes if probes else without)
    return out



def resolve_auto_outside_model(data: Any) -> Any:
    """:func:`resolve_auto` for a family whose ``model`` section has none of the ``auto`` settings
    (GAN, diffusion): ``model`` passes through untouched."""
    if not isinstance(data, dict):
        return data
    resolved = resolve_auto({key: value for key, value in data.items() if key != "model"})
    resolved.pop("model", None)
    return {**resolved, **({"model": data["model"]} if "model" in data else {})}

# Far above any useful value (Adam/SGD use 1e-4..1, L-BFGS 1; L2 above 1 already swamps the loss):
# larger values only diverge, so they are refused up front instead of failing after the stage.
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 100.0
# numpy, torch and scikit-learn all take 32-bit seeds; derived seeds add offsets up to ~1e6.
MAX_SEED = 2**31 - 1
# MLflow's experiment name column (String(256) in its SQL store).
MAX_EXPERIMENT_NAME = 256


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _format_validation_error(error: ValidationError, tagged: bool = False) -> str:
    """One line (the CLI prints ``error: <this>``): every problem as ``dotted.key: message``.
    ``tagged``: the error came through the family union, whose first location is the family's tag."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"][1 if tagged else 0:])
        message = item["msg"]
        if item["type"] == "literal_error":
            expected = item.get("ctx", {}).get("expected", "")
            message = f"{_shown(item['input'])} is not one of {expected}"
        elif item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "finite_number":
            message = f"must be a finite number, got {_shown(item['input'])}"
        elif item["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            message = f"{message}, got {_shown(item['input'])}"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        problems.append(f"{key}: {message}" if key else message)
    return "invalid configuration: " + "; ".join(" ".join(problem.split()) for problem in problems)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``dotted.key=value`` into its key path and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``dotted.key=value`` override applied."""
    merged = json.loads(json.dumps(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return merged

"""The ``scorers`` section (cleanse.estimators.options) and the families' noise-count hook used by
the recommendation (cleanse.families.base.Family.noise_count_estimate)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cleanse.config import load_params
from cleanse.errors import ConfigError
from cleanse.estimators import options as options_module
from cleanse.estimators import registry
from cleanse.estimators.options import ScorerOptions, options_model


def test_every_estimator_has_its_own_declared_options_section_and_no_other():
    assert list(ScorerOptions.model_fields) == registry.names()
    for name in registry.names():
        module = registry._REGISTRY[name].split(":")[0]
        assert registry.options_path(name).split(":")[0] == f"{module}_options", name  # the convention
        assert options_model(name) is registry.get(name).options_type, name
        assert isinstance(ScorerOptions().of(name), registry.get(name).options_type), name
        assert ScorerOptions().of(name, registry.get(name).options_type) == options_model(name)(), name
    with pytest.raises(TypeError, match=r"scorers\.tracin is TracInOptions, not LossOptions"):
        ScorerOptions().of("tracin", type(ScorerOptions().of("loss")))


def test_options_py_names_no_estimator():
    """The scorers section comes from the registry: options.py has no estimator's name, options
    class or options module in its code (names, string constants, imports)."""
    source = Path(options_module.__file__).read_text(encoding="utf-8")
    classes = {registry.options_path(name).split(":")[1] for name in registry.names()}
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in registry.names():
            found.add(node.value)
        elif isinstance(node, ast.Name | ast.alias) and (getattr(node, "id", None) or node.name) in classes:
            found.add(getattr(node, "id", None) or node.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_options"):
            found.add(node.module)
    assert found == set(), found


def test_a_new_registration_is_a_new_scorers_section():
    """Registering an estimator (its two registry lines, patched in before the section is
    assembled) gives it a validated ``scorers.<name>`` section, with no other edit."""
    code = ("from cleanse.estimators import registry\n"
            "registry._REGISTRY['planted'] = 'cleanse.estimators.loss:LossEstimator'\n"
            "registry._OPTIONS['planted'] = 'cleanse.estimators.loss_options:LossOptions'\n"
            "from cleanse.config import load_params\n"
            "from cleanse.errors import ConfigError\n"
            "params = load_params(None, ['estimators=[loss,planted]', 'scorers.planted.statistic=margin'])\n"
            "print(params.scorers.of('planted').statistic, params.scorers.of('loss').statistic)\n"
            "try:\n    load_params(None, ['scorers.planted.statistic=nope'])\n"
            "except ConfigError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "margin loss"
    assert out[1] == "invalid configuration: scorers.planted.statistic: 'nope' is not one of 'loss' or 'margin'"


def test_scorers_round_trip_through_json_and_dump_in_registry_order():
    scorers = load_params(None, ["scorers.tracin.checkpoints=last", "scorers.fine.inclusion=0.5"]).scorers
    again = type(scorers).model_validate_json(scorers.model_dump_json())
    assert again == scorers and again.of("tracin").checkpoints == "last"
    assert list(scorers.model_dump()) == registry.names()
    with pytest.raises(ConfigError, match=r"scorers\.nope"):
        load_params(None, ["scorers.nope.x=1"])


def test_of_returns_the_configured_section_and_names_the_allowed_estimators():
    scorers = load_params(None, ["scorers.tracin.checkpoints=last", "scorers.influence_val.damping=0.5"]).scorers
    assert scorers.of("tracin").checkpoints == "last"
    assert scorers.of("influence_val").damping == 0.5 and scorers.of("influence").damping == 1e-3
    with pytest.raises(ConfigError, match=r"scorers\.nope: no such estimator; allowed: loss, cleanlab, "):
        scorers.of("nope")
    with pytest.raises(ConfigError, match=r"scorers\.tracin\.checkpoints.*'all'.*'last'"):
        load_params(None, ["scorers.tracin.checkpoints=first"])


def test_loading_params_imports_neither_torch_nor_scikit_learn():
    code = ("import sys; from cleanse.config import load_params; load_params(None, ['scorers.fine.inclusion=0.5']); "
            "print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Split:
    def __init__(self, features: np.ndarray, label: np.ndarray):
        self.features, self.label = features, label

    def __len__(self) -> int:
        return len(self.label)


class _Staged:
    def __init__(self, train: _Split, val: _Split):
        self.train, self.val = train, val


def test_classification_estimates_the_number_of_flipped_labels_and_regression_has_no_estimate():
    from cleanse import families

    # Two well-separated Gaussian classes; 60 of 600 training labels flipped, clean validation split.
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        label = rng.integers(0, 2, n)
        return rng.normal(size=(n, 2)) + 4.0 * label[:, None], label

    x_train, y_train = draw(600)
    flipped = rng.choice(600, 60, replace=False)
    y_train[flipped] = 1 - y_train[flipped]
    staged = _Staged(_Split(x_train, y_train), _Split(*draw(200)))
    params = load_params(None, [])
    estimate = families.get("classification").noise_count_estimate(params, staged)
    assert set(estimate) == {"n_disagree", "val_cv_error", "noise_count"}
    assert abs(estimate["noise_count"] - 60) <= 6, estimate
    assert families.get("classification").noise_estimate_inputs(params) == (params.scorers.trusted,)
    regression = families.get("regression")
    assert regression.noise_count_estimate(params, staged) is None and regression.noise_estimate_inputs(params) == ()

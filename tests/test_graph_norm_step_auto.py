"""``model.norm_step: auto`` of the graph family (issue 19): the benchmark's per-graph depth choice
(norm_step on or off, whichever has the higher validation accuracy) inside ``cleanse run``.

Checked on tiny stochastic block models (240 nodes, 8 layers, ``fixed_time`` 2, so each layer is
an Euler step of 1/4 and the stepped LayerNorm differs from the plain one): the auto model is,
bit for bit, the fixed-``norm_step`` model of the variant whose validation accuracy (measured
here independently, through the family's outcome) is higher, on a graph where that is "on" and
one where it is "off"; the test labels cannot move the choice while the validation labels do;
refits and the report get the choice; values without a meaning are refused in one line."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cleanse import families
from cleanse.config import validate_params
from cleanse.errors import ConfigError, DataError
from cleanse.graphs.axelgnn import choose_norm_step

DEEP = {"epochs": 40, "hidden": 16, "checkpoints": 2, "layers": 8, "fixed_time": 2.0}


def _params(homophily: float, seed: int = 0, **model):
    return validate_params({
        "family": "graph", "seed": seed, "tracking": {"enabled": False}, "corruption": {"fraction": 0.2},
        "data": {"source": "sbm", "sbm": {"num_nodes": 240, "homophily": homophily, "feature_dim": 8,
                                          "feature_signal": 0.6}},
        "model": {**DEEP, **model}})


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    return families.get("graph")


def _same_weights(a, b) -> bool:
    return a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


# measured: homophily 0.85 -> off (val 0.833 vs 0.812), 0.3 -> on (0.646 vs 0.688)
@pytest.mark.parametrize(("homophily", "expected"), [(0.85, False), (0.3, True)])
def test_auto_keeps_the_fit_with_the_higher_validation_accuracy(task, homophily, expected):
    params = _params(homophily, norm_step="auto")
    staged = task.stage(params)
    assert staged.meta.structure["val_nodes"] == staged.val.sample_id.tolist()
    assert staged.meta.structure["val_labels"] == staged.val.label.tolist()
    auto = task.fit(params, staged.train, staged.meta)
    by_hand = {flag: task.fit(_params(homophily, norm_step=flag), staged.train, staged.meta) for flag in (False, True)}
    val = {flag: task.outcome(model, staged)["val_accuracy"] for flag, model in by_hand.items()}
    assert val[False] != val[True]  # the two variants differ here, so the choice is not a tie-break
    assert auto.norm_step_choice == {"norm_step": expected, "val_accuracy": {"off": val[False], "on": val[True]}}
    assert expected == (val[True] > val[False])
    assert auto.recipe["norm_step"] is expected and auto.recipe == by_hand[expected].recipe
    assert _same_weights(auto, by_hand[expected]) and not _same_weights(auto, by_hand[not expected])
    assert task.training_record(auto)["norm_step_choice"] == auto.norm_step_choice
    # cleanlab's folds refit the chosen variant, not "auto"
    assert task.scoring_context(params, staged, auto, None).recipe.norm_step is expected


def test_test_labels_cannot_move_the_choice_but_validation_labels_do(task):
    params = _params(0.3, norm_step="auto")
    staged = task.stage(params)
    chosen = task.fit(params, staged.train, staged.meta).norm_step_choice
    rng = np.random.default_rng(0)
    shuffled = replace(staged, test=replace(staged.test, label=rng.permutation(staged.test.label),
                                            label_clean=rng.permutation(staged.test.label_clean)))
    assert task.fit(params, shuffled.train, shuffled.meta).norm_step_choice == chosen
    # validation labels equal to the losing variant's own predictions make it the winner
    loser = task.fit(_params(0.3, norm_step=not chosen["norm_step"]), staged.train, staged.meta)
    predicted = loser.module().logits().argmax(1).numpy()
    structure = dict(staged.meta.structure, val_labels=predicted[staged.val.sample_id].tolist())
    flipped = task.fit(params, staged.train, replace(staged.meta, structure=structure)).norm_step_choice
    assert flipped["norm_step"] is not chosen["norm_step"] and flipped["val_accuracy"]["on" if flipped["norm_step"]
                                                                                       else "off"] == 1.0


def test_the_choice_reaches_metrics_json(task, tmp_path):
    from cleanse.storage import Layout, write_json

    params = _params(0.3, norm_step="auto")
    layout = Layout.at(tmp_path)
    choice = {"norm_step": True, "val_accuracy": {"off": 0.5, "on": 0.75}}
    write_json({"norm_step_choice": choice}, layout.base_model / "meta.json")
    metrics: dict = {}
    assert task.evaluations(params, None, layout, metrics) == {} and metrics == {"norm_step_choice": choice}
    task.evaluations(_params(0.3), None, layout, plain := {})
    assert plain == {}  # a fixed norm_step adds nothing


def test_ties_keep_norm_step_off():
    assert choose_norm_step(0.8, 0.8) is False and choose_norm_step(0.8, 0.81) is True
    assert choose_norm_step(81.0, 80.0) is False


def test_a_meta_staged_without_validation_nodes_is_refused(task):
    params = _params(0.3, norm_step="auto")
    staged = task.stage(params)
    old = {k: v for k, v in staged.meta.structure.items() if k not in ("val_nodes", "val_labels")}
    with pytest.raises(DataError, match="no validation nodes.*restage"):
        task.fit(params, staged.train, replace(staged.meta, structure=old))


@pytest.mark.parametrize(("model", "message"), [
    ({"norm_step": "maybe"}, "model.norm_step: 'maybe' is not one of auto, true, false"),
    ({"norm_step": 2}, "model.norm_step: 2 is not one of"),
    ({"norm_step": "auto", "fixed_time": 0.0}, "model.norm_step: auto needs 0 < model.fixed_time < model.layers"),
    ({"norm_step": "auto", "fixed_time": 8.0}, "got fixed_time 8 with 8 layers"),
    ({"norm_step": "auto", "arch": "gcn"}, "model.norm_step: auto needs model.arch axelgnn, not gcn"),
])
def test_auto_without_a_meaning_is_refused_in_one_line(model, message):
    with pytest.raises(ConfigError) as error:
        _params(0.3, **model)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), ("true", True), ("False", False),
                                                 (1, True), (0, False), ("auto", "auto")])
def test_bool_inputs_keep_working(value, expected):
    assert _params(0.3, norm_step=value).model.norm_step == expected
    assert validate_params({"family": "graph"}).model.norm_step is False  # the default is unchanged

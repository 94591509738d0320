"""The graph family (``family: graph``, issue 19): staging on a real graph (Texas, a published
split) with planted label flips, the graph kept in the staged meta, "removed" meaning unlabelled
(edges and features kept), exact per-node losses and head gradients through the scoring context,
the estimators' rankings against the planted flips, retraining without nothing reproducing the
base model, one-line refusals, and a tiny end-to-end run on an SBM writing the classification
shape of ``metrics.json``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as fn
from sklearn.metrics import roc_auc_score

from cleanse import families
from cleanse.config import ScorerOptions, validate_params
from cleanse.errors import ConfigError, DataError
from cleanse.estimators import registry
from cleanse.families.graph.data import graph_tensors
from cleanse.graphs.data import load_node_dataset

TEXAS = {"family": "graph", "seed": 0, "data": {"source": "texas", "split": 1},
         "corruption": {"kind": "label_flip", "fraction": 0.2}, "model": {"epochs": 40},
         "tracking": {"enabled": False}}
SBM = {"family": "graph", "seed": 0,
       "data": {"source": "sbm", "sbm": {"num_nodes": 240, "homophily": 0.85, "feature_dim": 8,
                                         "feature_signal": 0.6}},
       "corruption": {"fraction": 0.2}, "model": {"epochs": 40, "hidden": 16, "checkpoints": 2},
       "tracking": {"enabled": False}}


def _params(base=TEXAS, **sections):
    return validate_params({**base, **sections})


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    return families.get("graph")


@pytest.fixture(scope="module")
def staged(task):
    return task.stage(_params())


@pytest.fixture(scope="module")
def sbm(task):
    params = _params(SBM)
    staged = task.stage(params)
    return params, staged, task.fit(params, staged.train, staged.meta)


def test_texas_split_is_staged_with_planted_flips_and_clean_val_test(staged):
    graph = load_node_dataset("texas")
    train, val, test = staged.train, staged.val, staged.test
    assert np.array_equal(train.sample_id, np.flatnonzero(graph.train_mask[1]))
    assert np.array_equal(val.sample_id, np.flatnonzero(graph.val_mask[1]))
    assert np.array_equal(test.sample_id, np.flatnonzero(graph.test_mask[1]))
    ids = [set(s.sample_id.tolist()) for s in (train, val, test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert int(train.is_corrupted.sum()) == round(0.2 * len(train)) == staged.meta.corruption["n_corrupted"]
    assert np.array_equal(train.label_clean, graph.y[train.sample_id])  # ground truth kept
    assert np.array_equal(train.is_corrupted, train.label != train.label_clean)
    for split in (val, test):
        assert np.array_equal(split.label, graph.y[split.sample_id]) and not split.is_corrupted.any()


def test_the_graph_is_kept_in_the_meta_with_every_node(staged):
    x, edge_index = graph_tensors(staged.meta)
    graph = load_node_dataset("texas")
    assert x.shape == (183, 1703) and staged.meta.structure["num_nodes"] == 183
    assert np.array_equal(edge_index.numpy(), graph.edge_index)
    rows = graph.x / graph.x.sum(1, keepdims=True)
    assert np.allclose(x.numpy(), rows, atol=1e-7)  # row-normalised bag of words, float32 exact
    assert np.array_equal(x.numpy()[staged.train.sample_id], staged.train.features)
    json.dumps(staged.meta.to_json())  # the structure is plain JSON


def test_a_removed_node_keeps_its_edges_and_features_but_not_its_label(task, sbm):
    params, staged, base = sbm
    node = int(staged.train.sample_id[3])
    kept = staged.train.without(np.array([node]))
    without = task.fit(params, kept, staged.meta)
    # while present, its label is trained on (another label gives another model); removed, it is not
    relabelled = staged.train.subset(np.arange(len(staged.train)))
    relabelled.label[3] = (relabelled.label[3] + 1) % staged.meta.n_classes
    with_other_label = task.fit(params, relabelled, staged.meta)
    assert not all(torch.equal(a, with_other_label.state[k]) for k, a in base.state.items())
    assert not all(torch.equal(a, without.state[k]) for k, a in base.state.items())
    assert len(kept) == len(staged.train) - 1
    # ... while it stays in the graph: its features still reach its neighbours' logits
    module = without.module()
    assert module.x.shape[0] == staged.meta.structure["num_nodes"]
    assert module.edge_index.shape == graph_tensors(staged.meta)[1].shape
    neighbours = module.edge_index[1][module.edge_index[0] == node]
    assert neighbours.numel() > 0
    with torch.no_grad():
        before = module(neighbours.float())
        module.x[node] += 5.0
        after = module(neighbours.float())
    assert not torch.allclose(before, after)


def test_retraining_without_nothing_reproduces_the_base_model(task, sbm):
    params, staged, base = sbm
    model, outcome = task.verify_without(params, staged, np.array([], dtype=np.int64))
    assert all(torch.equal(a, model.state[k]) for k, a in base.state.items())
    assert outcome["test_accuracy"] == task.outcome(base, staged)["test_accuracy"]
    assert outcome["n_removed"] == 0
    removed = staged.train.sample_id[staged.train.is_corrupted]
    _, oracle = task.verify_without(params, staged, removed)
    assert oracle["n_removed"] == oracle["n_corrupted_removed"] == removed.size


def test_save_load_round_trip_and_outcome_keys(task, sbm, tmp_path):
    params, staged, base = sbm
    outcome = task.outcome(base, staged)
    assert set(outcome) == {"test_accuracy", "val_accuracy"} and 0.0 <= outcome["test_accuracy"] <= 1.0
    assert outcome["test_accuracy"] > 0.6  # a homophilic SBM is learnable despite 20% flips
    task.save_model(base, tmp_path, {"fingerprint": "x"})
    loaded = task.load_model(tmp_path)
    assert task.outcome(loaded, staged) == outcome
    assert [c.epoch for c in loaded.checkpoints] == [20, 40]


def test_per_node_losses_and_head_gradients_are_exact(task, sbm):
    """The loss estimator's column is the full-graph cross-entropy of each node under its noisy
    label; TracIn's self-influence is sum_c lr_c ||d CE_i / d head||^2, computed here by autograd."""
    params, staged, base = sbm
    context = task.scoring_context(params, staged, base, None)
    table = registry.get("loss").score(context, ScorerOptions().loss).table
    module = base.module()
    ids = torch.as_tensor(staged.train.sample_id)
    labels = torch.as_tensor(staged.train.label)
    with torch.no_grad():
        expected = fn.cross_entropy(module.logits()[ids], labels, reduction="none").double().numpy()
    assert np.allclose(table["loss"].to_numpy(), expected, rtol=1e-6, atol=1e-7)
    traced = registry.get("tracin").score(context, ScorerOptions().tracin).table["score"].to_numpy()
    for row in (0, 7):
        total = 0.0
        for checkpoint in base.checkpoints:
            net = base.module()
            net.load_state_dict(checkpoint.state)
            loss = fn.cross_entropy(net.logits()[ids[row]][None], labels[row][None])
            grads = torch.autograd.grad(loss, list(net.net.head.parameters()))
            total += checkpoint.lr * sum(float(g.double().pow(2).sum()) for g in grads)
        assert traced[row] == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize("name", ["loss", "cleanlab", "tracin", "influence", "trak"])
def test_estimators_rank_the_flipped_nodes_first(task, sbm, name):
    params, staged, base = sbm
    context = task.scoring_context(params, staged, base, None)
    options = getattr(ScorerOptions(), name)
    if name == "cleanlab":
        options = options.model_copy(update={"folds": 3})
    table = registry.get(name).score(context, options).table
    assert table["sample_id"].to_list() == staged.train.sample_id.tolist()
    assert np.isfinite(table["score"].to_numpy()).all()
    auc = roc_auc_score(staged.train.is_corrupted, table["score"].to_numpy())
    assert auc > 0.7, f"{name}: AUC {auc:.3f}"


@pytest.mark.parametrize(("change", "message"), [
    ({"data": {"source": "karate"}}, "data.source"),
    ({"corruption": {"fraction": 1.5}}, "corruption.fraction"),
    ({"corruption": {"fraction": 0.0}}, "corruption.fraction"),
    ({"model": {"arch": "gin"}}, "model.arch"),
    ({"model": {"hidden": 30, "segments": 4}}, "model.segments"),
    ({"data": {"source": "texas", "splits": "planetoid"}}, "data.splits"),
    ({"query": {"kind": "val_errors"}}, "query.kind"),
    ({"estimators": ["trusted"]}, "trusted"),
    ({"model": {"epochs": 10, "depth": 3}}, "model.depth"),
])
def test_bad_configurations_are_refused_in_one_line(change, message):
    with pytest.raises(ConfigError) as error:
        _params(**change)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_split_index_beyond_the_published_ones_is_refused(task):
    with pytest.raises(DataError, match=r"data.split: 10 is out of range; texas has 10"):
        task.stage(_params(data={"source": "texas", "split": 10}))


E2E = {**SBM, "model": {"epochs": 30, "hidden": 16, "checkpoints": 2},
       "estimators": ["loss", "cleanlab", "tracin", "influence"], "scorers": {"cleanlab": {"folds": 3}},
       "recommend": {"budget_factors": []},
       "influence": {"diffusion": "LT", "seed_rates": [0.05, 0.2], "train_sets": 8, "test_sets": 4, "mc_runs": 50,
                     "test_runs": 200, "hidden": 16, "layers": 3, "epochs": 10, "batch": 8}}


@pytest.mark.slow
def test_cleanse_run_writes_the_classification_shape(tmp_path):
    from cleanse.stages.runner import run_all
    from cleanse.storage import Layout

    torch.set_num_threads(1)
    params = validate_params(E2E)
    layout = Layout.at(tmp_path)
    metrics = run_all(params, layout, log=lambda line: None)
    on_disk = json.loads((layout.reports / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["dataset"]["n_corrupted"] == round(0.2 * 144)
    for reference in ("baseline", "random", "oracle"):
        assert 0.0 <= on_disk[reference]["test_accuracy"] <= 1.0
    assert on_disk["oracle"]["n_removed"] == round(0.2 * 144)
    # the influence-estimation entry, beside the classification shape (held-out seed sets vs Monte Carlo)
    surrogate = on_disk["surrogate"]
    assert surrogate["test_sets"] == 8 and 0 <= surrogate["mae"] < surrogate["floor"]["mae"]
    assert 0 <= surrogate["spread_error"] < surrogate["floor"]["spread_error"]
    for name in E2E["estimators"]:
        entry = on_disk["estimators"][name]
        assert 0.0 <= entry["detection"]["average_precision"] <= 1.0
        assert 0.0 <= entry["retrain"]["test_accuracy"] <= 1.0 and entry["retrain"]["n_removed"] >= 1
        assert (layout.reports / "flagged" / f"{name}.png").is_file()  # 240 nodes: the graph is drawn
        top = (layout.reports / "flagged" / f"{name}.csv").read_text().splitlines()
        assert top[0].split(",")[-4:] == ["given_label", "predicted_label", "is_corrupted", "degree"]


def test_model_fixed_time_reaches_every_axelgnn_layer():
    from cleanse.families.graph.models import build_net

    params = _params(SBM, model={"arch": "axelgnn", "hidden": 16, "layers": 8, "fixed_time": 2.0})
    net = build_net(params.model, 8, 3, 240)
    assert [layer.step for layer in net.layers] == [0.25] * 8
    plain = build_net(_params(SBM, model={"arch": "axelgnn", "hidden": 16, "layers": 8}).model, 8, 3, 240)
    assert [layer.step for layer in plain.layers] == [1.0] * 8
    assert not any(layer.cfg.norm_step for layer in net.layers)
    stepped = _params(SBM, model={"arch": "axelgnn", "hidden": 16, "layers": 8, "fixed_time": 2.0, "norm_step": True})
    assert all(layer.cfg.norm_step for layer in build_net(stepped.model, 8, 3, 240).layers)


def test_model_shared_makes_the_axelgnn_steps_one_layer():
    from cleanse.families.graph.models import build_net

    params = _params(SBM, model={"arch": "axelgnn", "hidden": 16, "layers": 8, "fixed_time": 2.0, "shared": True})
    net = build_net(params.model, 8, 3, 240)
    assert all(layer is net.layers[0] for layer in net.layers) and net.layers[0].step == 0.25

"""Probe sets, train -> probe attribution, iterative cleansing and the unsupervised backdoor detectors.

Ground truth: a planted backdoor (known poisons), planted clusters, and the unchanged
self-influence path when no probes are configured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cleanse.attribution import aggregate_support, contrast, score_with_query, top_proponents
from cleanse.config import load_params
from cleanse.errors import ConfigError, DataError
from cleanse.estimators import registry
from cleanse.estimators.activations import clustering_scores, spectral_scores
from cleanse.query import build_query, query_for, read_probe_file
from tests.conftest import context_for

REPO = Path(__file__).resolve().parents[1]

BACKDOOR = ["data.source=sklearn:wine", "corruption.kind=backdoor", "corruption.fraction=0.1",
            "corruption.trigger_size=3", "model.arch=logreg", "model.epochs=30", "model.lr=0.01",
            "model.checkpoints=5", "tracking.enabled=false", "query.kind=triggered", "query.size=8"]
# With probes, geometric checkpoints, unit training gradients and iterative cleansing are the defaults.


@pytest.fixture(scope="module")
def backdoor():
    params = load_params(None, BACKDOOR)
    context, staged = context_for(params)
    return params, context, staged, query_for(params, staged, context.model)


def test_triggered_probes_show_the_backdoor(backdoor):
    params, context, staged, query = backdoor
    assert len(query.probes) == 8
    assert (query.probes.label == 0).all() and (query.probes.label_clean != 0).all()
    assert query.reference is not None and (query.reference.label == 0).all()
    from cleanse.models.trainer import predict_proba

    # The probes are failures the model shows: triggered inputs sent to the target class.
    assert (predict_proba(context.model, query.probes.features).argmax(1) == 0).all()


def test_poisons_are_the_top_proponents_of_triggered_probes(backdoor):
    params, context, staged, query = backdoor
    poisons = set(staged.train.sample_id[staged.train.is_corrupted].tolist())
    k = len(poisons)
    for name in ("tracin", "influence"):
        result, matrix = score_with_query(registry.get(name), context, params.scorers.of(name), query)
        assert matrix.shape == (8, len(staged.train))
        top = result.table.sort("score", descending=True)["sample_id"].to_list()[:k]
        hits = len(poisons & set(top))
        assert hits >= (k - 1 if name == "tracin" else k // 2), f"{name}: {hits} of {k} poisons in the top {k}"
    # Per probe, the strongest TracIn proponents are poisons too.
    _, matrix = score_with_query(registry.get("tracin"), context, params.scorers.tracin, query)
    best = top_proponents(matrix, staged.train.sample_id, 3)
    assert np.mean([sid in poisons for sid in best.ravel()]) >= 0.75
    # Self-influence does not find them (the reason for probes).
    self_scored = registry.get("tracin").score(context, params.scorers.tracin).table
    self_top = self_scored.sort("score", descending=True)["sample_id"].to_list()[:k]
    assert len(poisons & set(self_top)) < hits


def test_without_probes_scores_are_unchanged(wine_context):
    from cleanse.pipeline import score_fingerprint, train_fingerprint
    from tests.conftest import small_params

    context, _ = wine_context
    params = small_params()
    assert params.query.kind == "none"
    for name in ("tracin", "influence", "loss"):
        options = params.scorers.of(name)
        direct = registry.get(name).score(context, options)
        via, matrix = score_with_query(registry.get(name), context, options, None)
        assert matrix is None and via.table.equals(direct.table)
        # The same metadata, up to the timings behind an ``auto`` solver choice (they vary run to run).
        plan, direct_plan = via.meta.get("auto", {}), direct.meta.get("auto", {})
        assert {k: v for k, v in via.meta.items() if k != "auto"} == {k: v for k, v in direct.meta.items() if k != "auto"}
        assert plan.get("chosen") == direct_plan.get("chosen")
    from cleanse.config import fingerprint

    assert score_fingerprint(params, "tracin") == fingerprint("score", train_fingerprint(params), "tracin",
                                                              params.scorers.tracin)


def test_aggregation_is_robust_to_one_large_probe():
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(4, 50))
    loud = matrix.copy()
    loud[0] *= 1e4
    for method in ("normalized_mean", "rank_mean"):
        assert np.allclose(aggregate_support(matrix, method), aggregate_support(loud, method))
    ranks = aggregate_support(matrix, "rank_mean")
    assert ranks.min() >= 0 and ranks.max() <= 1
    with pytest.raises(ValueError, match="aggregate"):
        aggregate_support(matrix, "median")


def test_contrast_removes_general_label_support():
    rng = np.random.default_rng(1)
    general = np.abs(rng.normal(size=200))  # support for the label on ordinary inputs
    specific = rng.normal(size=200)
    specific -= (specific @ general) / (general @ general) * general  # orthogonal to general
    residual, beta = contrast(specific + 3.0 * general, general)
    assert beta == pytest.approx(3.0)
    assert np.allclose(residual, specific)


def test_contrast_does_not_promote_samples_that_oppose_the_label():
    # Two ordinary samples with no probe-specific support: one supports the label everywhere, one
    # opposes it everywhere. Neither may outrank the poison after the contrast.
    support = np.array([1.0, 0.5, -0.5, 0.0])  # poison, ordinary target-class, other class, neutral
    general = np.array([0.0, 0.5, -0.5, 0.0])
    residual, beta = contrast(support, general)
    assert beta == pytest.approx(1.0)
    assert residual[0] == pytest.approx(1.0)
    assert residual[1] == pytest.approx(0.0)
    assert residual[2] == pytest.approx(-0.5)  # unchanged: not promoted to 0 or above
    assert np.argmax(residual) == 0


def test_fine_probe_attribution_finds_poisons_its_self_influence_misses(backdoor):
    """f-INE's single-run test on the probes' losses: the poisons are the units whose inclusion
    lowers the triggered probes' loss. Measured AP 0.42 (chance 0.10, self-influence 0.26); the
    probes' training-progress drift hides them without detrending (0.29)."""
    from sklearn.metrics import average_precision_score

    params, context, staged, query = backdoor
    truth = staged.train.is_corrupted
    options = params.scorers.fine
    result, matrix = score_with_query(registry.get("fine"), context, options, query)
    assert matrix.shape == (8, len(staged.train))
    probe_ap = average_precision_score(truth, result.table["score"].to_numpy())
    self_ap = average_precision_score(truth, registry.get("fine").score(context, options).table["score"].to_numpy())
    raw, _ = score_with_query(registry.get("fine"), context, options.model_copy(update={"pairwise_detrend": 0}), query)
    assert probe_ap >= 3 * truth.mean()
    assert probe_ap > self_ap + 0.1
    assert probe_ap > average_precision_score(truth, raw.table["score"].to_numpy())


def test_iterative_cleansing_removes_the_backdoor(backdoor):
    from cleanse.cleansing import cleanse_iteratively

    params, context, staged, query = backdoor
    params = params.model_copy(update={"cleansing": params.cleansing.model_copy(update={"step": 4, "iterative": True})})
    loop = cleanse_iteratively(params, staged, registry.get("tracin"), params.scorers.tracin, query,
                               base_model=context.model)
    rounds = loop["rounds"]
    assert rounds[0]["n_removed"] == 0 and rounds[0]["heldout_behaviour_rate"] > 0.5
    assert loop["stopped"] == "behaviour_gone"
    assert rounds[-1]["heldout_behaviour_rate"] <= params.cleansing.stop_rate
    assert rounds[-1]["attack_success_rate"] < 0.5 * rounds[0]["attack_success_rate"]
    poisons = staged.train.sample_id[staged.train.is_corrupted]
    assert np.isin(poisons, loop["removed_ids"]).mean() >= 0.9
    removal = [r for r in rounds if "n_readmitted" not in r]
    assert [r["n_removed"] for r in removal] == [4 * i for i in range(len(removal))]
    assert all(len(r["flagged_ids"]) == 4 for r in removal[1:])
    # Re-admission puts back only samples the cleansed model agrees with: here, no poison.
    readmitted = [r for r in rounds if "n_readmitted" in r]
    assert len(readmitted) <= 1 and all(r is rounds[-1] for r in readmitted)
    for record in readmitted:
        assert not np.isin(record["readmitted_ids"], poisons).any()
        assert record["n_removed"] == len(loop["removed_ids"]) == removal[-1]["n_removed"] - record["n_readmitted"]


def test_readmission_puts_back_clean_samples_and_keeps_the_behaviour_gone():
    from cleanse.cleansing import readmit_agreeing
    from cleanse.models.architectures import spec_for
    from cleanse.models.trainer import predict_proba, train_model

    # digits: enough held-out triggered inputs (hundreds) that one boundary case does not decide.
    params = load_params(None, ["data.source=sklearn:digits", "corruption.kind=backdoor", "corruption.fraction=0.05",
                                "model.arch=logreg", "model.epochs=20", "model.lr=0.01", "tracking.enabled=false",
                                "query.kind=triggered", "query.size=8"])
    context, staged = context_for(params)
    query = query_for(params, staged, context.model)
    train = staged.train
    poisons = train.sample_id[train.is_corrupted]
    # Over-removal as the ranking produces it: every poison, ordinary samples of the target class,
    # and the hardest samples of other classes (lowest probability of their own label).
    ordinary = train.sample_id[(train.label == 0) & ~train.is_corrupted][:20]
    others = np.flatnonzero((train.label != 0) & ~train.is_corrupted)
    own = predict_proba(context.model.module(), train.features[others])[np.arange(others.size), train.label[others]]
    hard = train.sample_id[others[np.argsort(own, kind="stable")[:10]]]
    removed = poisons.tolist() + ordinary.tolist() + hard.tolist()
    spec = spec_for(params.model.arch, params.model.hidden, staged.meta.feature_shape, staged.meta.n_classes)
    kept = train.without(np.asarray(removed))
    cleansed = train_model(spec, kept.features, kept.label, params.model, seed=params.seed)
    hard_rows = np.flatnonzero(np.isin(train.sample_id, hard))
    disagreed = predict_proba(cleansed.module(), train.features[hard_rows]).argmax(1) != train.label[hard_rows]
    assert disagreed.sum() >= 3  # so that agreement alone would leave them out
    outcome = readmit_agreeing(params, staged, query, spec, cleansed, removed, torch.device("cpu"), print)
    assert outcome is not None
    model, still_removed, record = outcome
    back = np.asarray(record["readmitted_ids"])
    assert np.isin(back, ordinary).sum() >= 15  # the ordinary samples come back
    assert np.isin(hard, back).all()  # and every sample of another label, agreed with or not
    assert np.isin(poisons, still_removed).all()  # no poison does
    assert record["n_removed"] == len(still_removed) == len(removed) - len(back)
    before = query.behaviour_rate(predict_proba(cleansed.module(), query.heldout.features))
    assert record["heldout_behaviour_rate"] <= max(before, params.cleansing.stop_rate)


def test_query_configuration_errors():
    with pytest.raises(ConfigError, match="query.kind 'triggered'.*corruption.kind: backdoor"):
        load_params(None, ["query.kind=triggered", "corruption.kind=label_flip"])
    with pytest.raises(ConfigError, match="query.*needs query.path"):
        load_params(None, ["query.kind=file"])
    with pytest.raises(ConfigError, match="query.kind: 'errors' is not one of"):
        load_params(None, ["query.kind=errors"])
    with pytest.raises(ConfigError, match="query.size"):
        load_params(None, ["query.kind=val_errors", "query.size=0"])
    with pytest.raises(ConfigError, match="cleansing.iterative needs probes"):
        load_params(None, ["cleansing.iterative=true"])
    with pytest.raises(ConfigError, match="cleansing.iterative: must be auto, true or false, got 'often'"):
        load_params(None, ["query.kind=val_errors", "cleansing.iterative=often"])
    with pytest.raises(ConfigError, match="model.checkpoint_spacing: 'log' is not one of 'auto', 'even' or 'geometric'"):
        load_params(None, ["model.checkpoint_spacing=log"])


PROBE_SETTINGS = {"model.checkpoint_spacing": "geometric", "scorers.tracin.normalize": "train",
                  "cleansing.iterative": True}
SELF_SETTINGS = {"model.checkpoint_spacing": "even", "scorers.tracin.normalize": "none", "cleansing.iterative": False}


def _settings(params) -> dict:
    return {"model.checkpoint_spacing": params.model.checkpoint_spacing,
            "scorers.tracin.normalize": params.scorers.tracin.normalize,
            "cleansing.iterative": params.cleansing.iterative}


def test_probes_alone_select_the_probe_settings():
    """``query.kind`` set alone resolves every ``auto`` setting to what probe attribution needs; an
    explicit value wins; ``auto`` and its resolved value are the same run (same fingerprints)."""
    from cleanse.config import Params, QueryConfig, ScorerOptions, TracInOptions
    from cleanse.pipeline import retrain_fingerprint, run_fingerprint, score_fingerprint, train_fingerprint
    from cleanse.tracking import run_params

    backdoor = ["corruption.kind=backdoor", "corruption.fraction=0.05"]
    for path in (None, REPO / "params.yaml"):  # the built-in defaults and the project's params.yaml say auto
        assert _settings(load_params(path, [])) == SELF_SETTINGS
        for kind in ("triggered", "val_errors"):
            assert _settings(load_params(path, [*backdoor, f"query.kind={kind}"])) == PROBE_SETTINGS
    # Explicit values win, with or without probes (iterative only with them).
    explicit = ["model.checkpoint_spacing=even", "scorers.tracin.normalize=both", "cleansing.iterative=false"]
    assert _settings(load_params(None, [*backdoor, "query.kind=triggered", *explicit])) == {
        "model.checkpoint_spacing": "even", "scorers.tracin.normalize": "both", "cleansing.iterative": False}
    assert _settings(load_params(None, ["model.checkpoint_spacing=geometric", "scorers.tracin.normalize=train"])) == {
        **SELF_SETTINGS, "model.checkpoint_spacing": "geometric", "scorers.tracin.normalize": "train"}
    # A configuration built in code resolves the same way; a section's own explicit value wins there too.
    assert _settings(Params(query=QueryConfig(kind="val_errors"))) == PROBE_SETTINGS
    coded = Params(query=QueryConfig(kind="val_errors"), scorers=ScorerOptions(tracin=TracInOptions(normalize="both")))
    assert coded.scorers.tracin.normalize == "both" and coded.model.checkpoint_spacing == "geometric"
    # auto, left unset, spelled out, or replaced by the value it stands for: one run, one set of fingerprints.
    probes = [*backdoor, "query.kind=triggered"]
    spellings = [load_params(None, probes),
                 load_params(None, [*probes, *(f"{key}=auto" for key in PROBE_SETTINGS)]),
                 load_params(None, [*probes, *(f"{key}={value}" for key, value in PROBE_SETTINGS.items())])]
    for name in ("tracin", "loss"):
        assert len({(train_fingerprint(p), score_fingerprint(p, name), retrain_fingerprint(p, name), run_fingerprint(p))
                    for p in spellings}) == 1
    without = [load_params(None, backdoor), load_params(None, [*backdoor, *(f"{key}={value}" for key, value in
                                                                          SELF_SETTINGS.items())])]
    assert len({(train_fingerprint(p), retrain_fingerprint(p, "tracin"), run_fingerprint(p)) for p in without}) == 1
    # The probe run is another run: its checkpoints (train) and cleansing (retrain) differ.
    assert train_fingerprint(spellings[0]) != train_fingerprint(without[0])
    # MLflow sees the resolved values.
    logged = run_params(spellings[0])
    assert logged["model.checkpoint_spacing"] == "geometric" and logged["cleansing.iterative"] == "True"
    assert logged["tracin.normalize"] == "train"


def test_probe_file(backdoor, tmp_path):
    params, context, staged, _ = backdoor
    good = tmp_path / "probes.npz"
    np.savez(good, X=staged.val.features[:5], y=np.full(5, 2))
    features, label = read_probe_file(str(good), staged.meta)
    assert features.shape == (5, *staged.meta.feature_shape) and (label == 2).all()
    config = load_params(None, [*BACKDOOR[:-2], "query.kind=file", f"query.path={good}", "query.size=3"]).query
    query = build_query(config, staged, lambda x: np.eye(3)[np.full(len(x), 2)], seed=0)
    assert len(query.probes) == 3 and len(query.heldout) == 2
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=staged.val.features[:5, :4], y=np.zeros(5, dtype=int))
    with pytest.raises(DataError, match="13 features"):
        read_probe_file(str(bad), staged.meta)
    np.savez(bad, X=staged.val.features[:5], y=np.full(5, 7))
    with pytest.raises(DataError, match="labels must be integers in 0..2"):
        read_probe_file(str(bad), staged.meta)
    with pytest.raises(DataError, match="not found"):
        read_probe_file(str(tmp_path / "missing.npz"), staged.meta)


def test_val_errors_probes_are_misclassified(wine_context):
    from cleanse.models.trainer import predict_proba

    context, staged = wine_context
    config = load_params(None, ["query.kind=val_errors", "query.size=3"]).query
    predict = lambda x: predict_proba(context.model, x)  # noqa: E731
    query = build_query(config, staged, predict, seed=0)
    predicted = predict(query.probes.features).argmax(1)
    assert (predicted == query.probes.label).all() and (query.probes.label != query.probes.label_clean).all()


def test_unsupervised_detectors_find_a_planted_cluster():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 8))
    label = np.repeat([0, 1, 2], 100)
    planted = np.arange(10, 25)  # 15 samples of class 0 shifted along one direction
    features[planted, 3] += 6.0
    truth = np.zeros(300, dtype=bool)
    truth[planted] = True
    # Spectral signatures rank within a class (Tran et al. remove the top of each class).
    spectral = spectral_scores(features, label)
    assert truth[np.argsort(-spectral[:100])[:15]].all()
    assert np.median(spectral[planted]) > np.percentile(spectral[100:], 95)
    clustering = clustering_scores(features, label, n_components=5, seed=0)
    assert truth[np.argsort(-clustering)[:15]].all()


def test_pipeline_with_probes_and_iterative_cleansing(tmp_path):
    import json

    from cleanse.pipeline import pairwise_path, run_all
    from cleanse.storage import Layout

    from cleanse.cleansing import iterates
    from cleanse.storage import read_table

    # query.kind alone turns iterative cleansing on; spectral_signatures has no train -> probe scores.
    params = load_params(None, [*BACKDOOR, "estimators=[tracin,spectral_signatures]", "cleansing.step=4"])
    assert params.cleansing.iterative and iterates(params, "tracin") and not iterates(params, "spectral_signatures")
    layout = Layout.at(tmp_path)
    metrics = run_all(params, layout, log=lambda line: None)
    matrix = np.load(pairwise_path(layout, "tracin"), mmap_mode="r")
    assert matrix.shape == (8, metrics["dataset"]["n_train"])
    # No train -> probe scores: an empty matrix, so the file is always there for DVC.
    assert np.load(pairwise_path(layout, "spectral_signatures")).shape == (0, metrics["dataset"]["n_train"])
    assert metrics["query"]["kind"] == "triggered" and metrics["query"]["n_probes"] == 8
    rounds = metrics["estimators"]["tracin"]["cleansing"]["rounds"]
    assert rounds[0]["n_removed"] == 0 and rounds[-1]["heldout_behaviour_rate"] <= params.cleansing.stop_rate
    retrain = json.loads(layout.retrain_result("tracin").read_text())
    assert retrain["iterative"] and len(retrain["removed_ids"]) == retrain["cleaned"]["n_removed"]
    # An estimator without train -> probe scores is retrained once, without exactly its flags.
    once = json.loads(layout.retrain_result("spectral_signatures").read_text())
    flags = read_table(layout.flags("spectral_signatures"))
    assert "iterative" not in once and "cleansing" not in metrics["estimators"]["spectral_signatures"]
    assert once["n_flagged"] == once["cleaned"]["n_removed"] == int(flags["is_flagged"].sum()) > 0
    assert metrics["estimators"]["tracin"]["retrain"]["attack_success_rate"] < metrics["baseline"]["attack_success_rate"]
    page = (layout.reports / "report.html").read_text()
    assert "cleansing_rounds.png" in page
    proponents = (layout.reports / "probes" / "tracin.csv").read_text().splitlines()
    assert len(proponents) == 1 + 8 * 6
    # query/ records the probes the score stages used.
    from cleanse.pipeline import query_dir, run_query

    probes = read_table(query_dir(layout) / "probes.parquet")
    assert probes.height == 8 and (probes["label"] == 0).all()
    assert json.loads((query_dir(layout) / "query.json").read_text())["kind"] == "triggered"
    # Rerunning is a no-op (fingerprints include the probe and cleansing settings).
    lines: list[str] = []
    run_all(params, layout, log=lines.append)
    assert all(line.startswith("[skip]") for line in lines) and "[skip] query: up to date" in lines
    # Without probes, an earlier configuration's probe tables do not survive.
    run_query(params.model_copy(update={"query": params.query.model_copy(update={"kind": "none"})}), layout)
    assert not (query_dir(layout) / "probes.parquet").exists()
    assert json.loads((query_dir(layout) / "query.json").read_text())["kind"] == "none"

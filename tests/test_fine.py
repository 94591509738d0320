"""f-influence: the definition recovers known Gaussian shifts, and the single-run ``fine``
estimator's sign, groups, interval flags and removal prediction hold on small problems."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from cleanse.config import DetectConfig, FineOptions, ModelConfig
from cleanse.detect import flag
from cleanse.estimators import registry
from cleanse.finfluence import f_influence, gaussian_mu, measure_f_influence, tradeoff_mu


@pytest.mark.parametrize("shift", [-1.0, 0.0, 0.7, 2.0])
def test_definition_recovers_a_known_gaussian_shift(shift):
    """P = N(0, 1) (with S), Q = N(shift, 1) (without S): G_mu with mu = shift exactly."""
    rng = np.random.default_rng(3)
    with_s, without_s = rng.normal(0, 1, 4000), rng.normal(shift, 1, 4000)
    result = f_influence(with_s, without_s, n_bootstrap=300)
    assert abs(result.mu - shift) < 0.06
    assert result.mu_lo <= shift <= result.mu_hi
    assert abs(result.mu_tradeoff - shift) < 0.12
    assert result.gaussianity < 0.15  # an exact G_mu curve: mu(alpha) flat up to sampling noise


def test_tradeoff_spread_flags_a_non_gaussian_pair():
    """Equal means and sds but different shapes: d' ~ 0 while the trade-off curve bends."""
    rng = np.random.default_rng(4)
    gaussian = rng.normal(0, 1, 4000)
    bimodal = np.where(rng.random(4000) < 0.5, -1, 1) * 0.995 + rng.normal(0, 0.1, 4000)
    assert abs(gaussian_mu(gaussian, bimodal)) < 0.1
    flat = f_influence(gaussian, rng.normal(0.5, 1, 4000), n_bootstrap=50).gaussianity
    curved = np.subtract(*np.quantile(tradeoff_mu(gaussian, bimodal), [0.75, 0.25]))
    assert curved > 3 * flat


def test_ground_truth_by_retraining_orders_units(wine_context):
    """A flipped sample's own loss depends more on its presence than a typical clean sample's, and
    a group of 8 flipped samples is more distinguishable than any of its measured members
    (composition: with the group's mean loss as the statistic and comparable members, mu grows
    about like sqrt(size) x the members' mean mu)."""
    context, _ = wine_context
    train = context.train
    flipped = np.flatnonzero(train.is_corrupted)[:8]
    clean = np.flatnonzero(~train.is_corrupted)[:2]
    units = [np.array([r]) for r in (*flipped[:3], *clean)] + [flipped]
    config = context.model_config.model_copy(update={"epochs": 15})
    table = measure_f_influence(context.model.spec, train.features, train.label, units, config,
                                models_per_arm=24, n_bootstrap=100, progress=False)
    mu = table["mu"].to_numpy()
    assert (table["mu_lo"] <= table["mu"]).all() and (table["mu"] <= table["mu_hi"]).all()
    assert mu[:3].min() > mu[3:5].max()
    assert mu[5] > mu[:3].max()


def test_fine_scores_and_intervals(wine_context):
    context, _ = wine_context
    result = registry.get("fine").score(context, FineOptions())
    table = result.table
    for column in ("mu", "mu_lo", "mu_hi", "gaussianity", "auto_flag"):
        assert column in table.columns
    assert (table["mu_lo"] < table["mu"]).all() and (table["mu"] < table["mu_hi"]).all()
    np.testing.assert_allclose(table["score"].to_numpy(), table["mu"].to_numpy())  # self query: harm = mu
    assert result.meta["rounds"] == context.model_config.epochs * 4
    assert "randomised curriculum" in result.meta["note"]


def test_fine_val_query_is_signed_harm(wine_context):
    context, _ = wine_context
    table = registry.get("fine").score(context, FineOptions(query="val")).table
    np.testing.assert_allclose(table["score"].to_numpy(), -table["mu"].to_numpy())
    assert (table["auto_flag"].to_numpy() == (table["mu_hi"].to_numpy() < 0)).all()


def test_fine_groups_share_one_mu(wine_context):
    context, _ = wine_context
    group = np.full(len(context.train), -1)
    group[:6], group[6:10] = 0, 1
    grouped = replace(context, train=replace(context.train, group=group))
    table = registry.get("fine").score(grouped, FineOptions(units="groups")).table
    mu = table["mu"].to_numpy()
    assert np.unique(mu[:6]).size == 1 and np.unique(mu[6:10]).size == 1
    assert not table["auto_flag"].to_numpy()[10:].any()  # rows of no unit are never flagged
    with pytest.raises(Exception, match="group"):
        registry.get("fine").score(context, FineOptions(units="groups"))


def test_removing_a_high_mu_unit_moves_the_query_as_predicted(wine_context):
    """Tiny logreg: for the three units with the largest mu-hat (self query, mu > 0 = removing the
    unit raises its own loss), removing the unit and retraining raises its own loss (mean over 16
    training seeds per arm), as predicted."""
    from cleanse.ensembles import ensemble_logits, train_ensemble
    from cleanse.models.architectures import spec_for
    from cleanse.models.trainer import train_model

    context, _ = wine_context
    config = ModelConfig(arch="logreg", epochs=20, lr=0.05, weight_decay=1e-3, batch_size=32)
    spec = spec_for("logreg", [], context.meta.feature_shape, context.meta.n_classes)
    model = train_model(spec, context.train.features, context.train.label, config, seed=0)
    logreg_context = replace(context, model=model, model_config=config)
    mu = registry.get("fine").score(logreg_context, FineOptions()).table["mu"].to_numpy()
    n, seeds = len(context.train), np.arange(16)
    for row in np.argsort(-mu)[:3]:
        assert mu[row] > 0
        masks = np.ones((2 * seeds.size, n), dtype=bool)
        masks[seeds.size:, row] = False
        ensemble = train_ensemble(spec, context.train.features, context.train.label, masks,
                                  np.concatenate([seeds, seeds + 100]), config)
        logits = ensemble_logits(ensemble, context.train.features[[row]])[:, 0]
        loss = -logits.log_softmax(-1)[:, int(context.train.label[row])].numpy()
        assert loss[seeds.size:].mean() > loss[: seeds.size].mean()


def test_auto_budget_follows_the_estimators_own_flags():
    scores = pl.DataFrame({"sample_id": [0, 1, 2, 3], "score": [3.0, 2.0, 1.0, 0.0],
                           "auto_flag": [True, False, True, False]})
    flags = flag(scores, DetectConfig(budget="auto", max_fraction=0.5))
    assert flags.filter(pl.col("is_flagged"))["sample_id"].to_list() == [0, 2]
    capped = flag(scores, DetectConfig(budget="auto", max_fraction=0.25))
    assert capped.filter(pl.col("is_flagged"))["sample_id"].to_list() == [0]
    counted = flag(scores, DetectConfig(budget="count", count=2))
    assert counted.filter(pl.col("is_flagged"))["sample_id"].to_list() == [0, 1]


def test_group_column_travels_from_parquet_to_the_staged_splits(tmp_path):
    from cleanse.config import load_params
    from cleanse.data.dataset import Split
    from cleanse.data.stage import stage_data
    from cleanse.errors import DataError

    rng = np.random.default_rng(0)
    n = 90
    frame = pl.DataFrame({"features": pl.Series(rng.normal(size=(n, 4)).astype(np.float32), dtype=pl.Array(pl.Float32, 4)),
                          "label": np.repeat([0, 1, 2], n // 3), "group": np.arange(n) % 7 - 1})
    frame.write_parquet(tmp_path / "d.parquet")
    staged = stage_data(load_params(None, [f"data.source={tmp_path / 'd.parquet'}", "corruption.kind=none"]))
    groups = np.concatenate([staged.train.group, staged.val.group, staged.test.group])
    assert sorted(groups.tolist()) == sorted((np.arange(n) % 7 - 1).tolist())
    again = Split.from_frame(staged.train.to_frame(), staged.meta.feature_shape)
    assert (again.group == staged.train.group).all()
    frame.with_columns(pl.col("group").cast(pl.Float64)).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="'group' must hold integers"):
        stage_data(load_params(None, [f"data.source={tmp_path / 'bad.parquet'}"]))


def test_vectorised_tradeoff_spread_equals_the_per_unit_curve():
    from cleanse.finfluence import tradeoff_spread_columns

    rng = np.random.default_rng(0)
    samples = rng.normal(size=(60, 30))
    included = rng.random((60, 30)) < 0.3
    samples[included] += rng.uniform(0, 2, size=30)[np.nonzero(included)[1]]
    expected = [np.subtract(*np.quantile(tradeoff_mu(samples[included[:, k], k], samples[~included[:, k], k]),
                                         [0.75, 0.25])) for k in range(30)]
    np.testing.assert_allclose(tradeoff_spread_columns(samples, included), expected, atol=1e-12)


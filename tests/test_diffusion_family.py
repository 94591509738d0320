"""The diffusion family (``family: diffusion``, DMin's setting, issue 18): staging with planted
ground truth (watermark, duplicates, mixed sources), the watermark detector on known patches, the
save/load round trip, the outcome keys, "without nothing" reproducing the base model, one-line
refusals, and (slow) a tiny end-to-end ``cleanse run``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cleanse import families
from cleanse.config import validate_params
from cleanse.errors import ArtifactError, ConfigError
from cleanse.families.diffusion.watermark import Patch, WatermarkDetector, plant_patch

TINY = {"family": "diffusion", "seed": 0,
        "data": {"source": "sklearn:digits", "n_train": 300, "n_val": 80, "n_test": 60},
        "corruption": {"kind": "watermark", "target_class": 3, "fraction": 0.1, "patch_size": 2},
        "model": {"epochs": 1, "batch_size": 64}, "generation": {"steps": 5, "n_watermark": 16, "per_class": 2},
        "tracking": {"enabled": False}}


def _params(**sections):
    return validate_params({**TINY, **sections})


@pytest.fixture(scope="module")
def task():
    return families.get("diffusion")


@pytest.fixture(scope="module")
def staged(task):
    return task.stage(_params())


@pytest.fixture(scope="module")
def fitted(task, staged):
    torch.set_num_threads(1)
    return task.fit(_params(), staged.train, staged.meta)


def test_digits_are_staged_in_range_with_source_equal_to_label(staged):
    assert staged.train.features.shape == (300, 1, 8, 8) and staged.meta.feature_shape == (1, 8, 8)
    for split in (staged.train, staged.val, staged.test):
        assert split.features.dtype == np.float32
        assert split.features.min() >= -1.0 and split.features.max() <= 1.0
        assert np.array_equal(split.source, split.label) and np.array_equal(split.label_clean, split.label)
    ids = np.concatenate([staged.train.sample_id, staged.val.sample_id, staged.test.sample_id])
    assert np.unique(ids).size == 440
    assert staged.meta.n_classes == 10 and staged.meta.sources[3] == "digits/3"


def test_the_watermark_is_planted_in_the_target_class_only_and_recorded(staged):
    train, record = staged.train, staged.meta.corruption
    target = train.label == 3
    expected = max(1, round(0.1 * int(target.sum())))
    assert record["n_corrupted"] == expected == int(train.is_corrupted.sum())
    assert record["n_target_train"] == int(target.sum())
    assert sorted(train.sample_id[train.is_corrupted].tolist()) == record["planted_ids"]
    assert target[train.is_corrupted].all()
    corner = train.features[:, 0, :2, :2].reshape(len(train), -1)
    assert (corner[train.is_corrupted] == 1.0).all()
    # The clean digits' top-left corner is background (-1): no clean image carries the patch.
    assert not (corner[~train.is_corrupted] == 1.0).all(axis=1).any()
    for split in (staged.val, staged.test):
        assert not split.is_corrupted.any()


def test_staging_is_deterministic_and_follows_the_seed(task, staged):
    again = task.stage(_params())
    assert np.array_equal(again.train.features, staged.train.features)
    other = task.stage(_params(seed=1))
    assert not np.array_equal(other.train.sample_id, staged.train.sample_id)


def test_planted_duplicates_hold_one_image_copies_times(task):
    staged = task.stage(_params(corruption={"kind": "duplicates", "target_class": 2, "copies": 6}))
    train, record = staged.train, staged.meta.corruption
    rows = np.flatnonzero(train.is_corrupted)
    assert rows.size == 6 == record["n_corrupted"] and (train.label[rows] == 2).all()
    assert all(np.array_equal(train.features[r], train.features[rows[0]]) for r in rows)
    assert record["original_id"] in record["planted_ids"]
    with pytest.raises(ConfigError, match="corruption.copies"):
        task.stage(_params(corruption={"kind": "duplicates", "target_class": 2, "copies": 200}))


def test_mixed_sources_keep_a_source_column_and_equal_shares(task):
    params = _params(data={"source": "mixed:sklearn:digits+mnist", "image_size": 8, "n_train": 101, "n_val": 20,
                           "n_test": 20}, corruption={"kind": "none"})
    staged = task.stage(params)
    assert staged.meta.sources == ("digits", "mnist") and staged.meta.n_classes == 2
    assert staged.train.features.shape == (101, 1, 8, 8)
    assert np.bincount(staged.train.source).tolist() == [51, 50]
    assert np.array_equal(staged.train.label, staged.train.source)
    assert (staged.train.sample_id[staged.train.source == 1] >= 1797).all()  # mnist rows follow digits' 1,797


def test_the_detector_separates_known_patches_on_held_out_images(staged):
    patch = Patch(2, 1.0, "top_left")
    detector = WatermarkDetector.fit(staged.val.features, patch)
    clean = staged.test.features
    assert detector.rate(clean) == 0.0
    assert detector.rate(plant_patch(clean, patch)) == 1.0
    # Another corner is not this watermark.
    assert detector.rate(plant_patch(clean, Patch(2, 1.0, "bottom_right"))) <= 0.05
    flags = detector.flags(torch.as_tensor(np.concatenate([clean[:5], plant_patch(clean[:5], patch)])))
    assert flags.tolist() == [False] * 5 + [True] * 5


def test_outcome_keys_and_save_load_round_trip(task, staged, fitted, tmp_path):
    outcome = task.outcome(fitted, staged)
    assert set(outcome) == {"watermark_rate", "val_watermark_rate", "test_loss", "val_loss"}
    assert all(math.isfinite(v) for v in outcome.values()) and 0 <= outcome["watermark_rate"] <= 1
    assert task.outcome_keys_in(outcome) == ("watermark_rate", "test_loss")
    assert task.selection_of(outcome) == ("val_watermark_rate", -1.0)
    task.save_model(fitted, tmp_path, {"fingerprint": "x"})
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "detector.safetensors", "meta.json"}
    loaded = task.load_model(tmp_path)
    assert task.outcome(loaded, staged) == outcome
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["digest"] = "sha256:0"
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="digest"):
        task.load_model(tmp_path)


def test_retraining_without_nothing_reproduces_the_base_model(task, staged, fitted):
    params = _params()
    model, outcome = task.verify_without(params, staged, np.zeros(0, dtype=np.int64), base=fitted)
    assert outcome.pop("n_removed") == 0 and outcome.pop("n_corrupted_removed") == 0
    assert outcome == task.outcome(fitted, staged)
    planted = staged.train.sample_id[staged.train.is_corrupted]
    _, without = task.verify_without(params, staged, planted, base=fitted)
    assert without["n_removed"] == without["n_corrupted_removed"] == planted.size
    assert without["test_loss"] != outcome["test_loss"]


def test_without_a_watermark_the_headline_is_the_test_loss(task):
    params = _params(corruption={"kind": "none"}, data={**TINY["data"], "n_train": 100})
    staged = task.stage(params)
    model = task.fit(params, staged.train, staged.meta)
    outcome = task.outcome(model, staged)
    assert set(outcome) == {"test_loss", "val_loss"} and model.detector is None
    assert task.outcome_keys_in(outcome) == ("test_loss",) and task.selection_of(outcome) == ("val_loss", -1.0)
    assert task.outcome_keys_in({"test_accuracy": 0.9, "val_accuracy": 0.9}) is None


def test_the_context_gives_images_and_conditions(task, staged, fitted):
    context = task.scoring_context(_params(), staged, fitted, None)
    assert context.images().shape == (300, 1, 8, 8) and context.images().dtype == torch.float32
    assert torch.equal(context.conditions(), torch.as_tensor(staged.train.label))
    assert context.conditions(staged.val).shape == (80,)
    images = fitted.generate(3, 3, seed=5, steps=4)
    assert images.shape == (3, 1, 8, 8) and torch.equal(images, fitted.generate(3, 3, seed=5, steps=4))


def test_generation_settings_are_part_of_the_train_fingerprint():
    from cleanse.stages.fingerprints import train_fingerprint

    base = _params()
    assert train_fingerprint(base) == train_fingerprint(_params())
    assert train_fingerprint(base) != train_fingerprint(_params(generation={**TINY["generation"], "n_watermark": 32}))
    classification = validate_params({"data": {"source": "sklearn:wine"}})
    assert families.get("classification").train_inputs(classification) == ()


def test_the_library_api_fits_scores_and_verifies_through_the_family(staged):
    from cleanse import api

    torch.set_num_threads(1)
    params = _params()
    model = api.fit(params, staged)
    prepared = api.Prepared(params, staged, model, api.context(params, staged, model))
    assert prepared.context.images().shape == (300, 1, 8, 8)
    table = api.score(prepared, "pixel_nn")
    assert table.height == 300 and np.array_equal(table["sample_id"].to_numpy(), staged.train.sample_id)
    assert api.evaluate(prepared) == families.get("diffusion").outcome(model, staged)
    without = api.retrain_without(prepared, np.zeros(0, dtype=np.int64))
    assert without["n_removed"] == 0 and without["test_loss"] == api.evaluate(prepared)["test_loss"]


@pytest.mark.parametrize("change, message", [
    ({"query": {"kind": "val_errors"}}, "query.kind"),
    ({"data": {"source": "mixed:sklearn:digits"}}, "mixed"),
    ({"corruption": {"kind": "watermark", "fraction": 1.5}}, "corruption.fraction"),
    ({"generation": {"steps": 5000}}, "generation.steps"),
    ({"data": {"source": "sklearn:digits", "image_size": 10}, "model": {"widths": [8, 16, 32]}}, "data.image_size"),
    ({"evaluate": {"lds": True}}, "evaluate.lds"),
])
def test_bad_configurations_are_refused_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate_params({**TINY, **change})
    assert "\n" not in str(info.value)


def test_staging_refuses_a_class_the_data_lacks(task):
    with pytest.raises(ConfigError, match="target_class"):
        task.stage(_params(corruption={"kind": "watermark", "target_class": 12}))


def test_per_sample_supervised_methods_are_refused(task):
    with pytest.raises(ConfigError, match="diffusion"):
        task.per_sample_loss(torch.zeros(2, 1), torch.zeros(2))


# ----------------------------------------------------------------------------- end to end (slow)

E2E = {**TINY, "data": {"source": "sklearn:digits", "n_train": 200, "n_val": 60, "n_test": 60},
       "corruption": {"kind": "watermark", "target_class": 0, "fraction": 0.1},
       "model": {"epochs": 3, "batch_size": 32, "label_dropout": 0.1},
       "generation": {"steps": 8, "n_watermark": 24, "per_class": 2, "guidance": 3.0},
       "estimators": ["dmin", "pixel_nn"],
       "scorers": {"dmin": {"timesteps": 4, "sizes": [256, 1024], "size": 1024}},
       "detect": {"budget": "count", "count": 4}, "recommend": {"budget_factors": []}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from cleanse.stages.runner import run_all
    from cleanse.storage import Layout

    torch.set_num_threads(1)
    params = validate_params(E2E)
    layout = Layout.at(tmp_path_factory.mktemp("diffusion_run"))
    lines: list[str] = []
    metrics = run_all(params, layout, log=lines.append)
    return params, layout, metrics, lines


@pytest.mark.slow
def test_cleanse_run_writes_the_hold_out_shape(finished):
    params, layout, metrics, _ = finished
    on_disk = json.loads((layout.reports / "metrics.json").read_text())
    assert on_disk["dataset"]["n_corrupted"] == 2 and on_disk["dataset"]["corruption"] == "watermark"
    for reference in ("baseline", "random", "oracle"):
        assert 0.0 <= on_disk[reference]["watermark_rate"] <= 1.0 and math.isfinite(on_disk[reference]["test_loss"])
    assert on_disk["oracle"]["n_removed"] == 2
    for name in ("dmin", "pixel_nn"):
        entry = on_disk["estimators"][name]
        assert 0.0 <= entry["retrain"]["watermark_rate"] <= 1.0 and entry["retrain"]["n_removed"] == 4
        retrieval = entry["retrieval"]
        assert all(0.0 <= retrieval[f"precision_at_{k}"] <= 1.0 for k in (5, 10, 50)), retrieval
        assert retrieval["n_queries"] == 20  # per_class 2 x 10 classes
    assert on_disk == json.loads(json.dumps(metrics))


@pytest.mark.slow
def test_the_stored_base_model_reproduces_the_baseline_and_resumes(finished):
    from cleanse.pipeline import load_staged
    from cleanse.stages.runner import run_all

    params, layout, metrics, first = finished
    task = families.get("diffusion")
    staged = load_staged(layout, params)
    base = task.load_model(layout.base_model)
    assert task.outcome(base, staged)["watermark_rate"] == metrics["baseline"]["watermark_rate"]
    assert not [line for line in first if line.startswith("[skip]")]
    lines: list[str] = []
    run_all(params, layout, log=lines.append)
    assert lines and all(line.startswith("[skip]") for line in lines), lines

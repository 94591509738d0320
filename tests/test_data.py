"""Sources, splits and corruption, checked against known ground truth."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cleanse.config import CorruptionConfig, DataConfig
from cleanse.data.corruption import apply_trigger, corrupt
from cleanse.data.sources import load_source
from cleanse.data.stage import stage_data
from cleanse.errors import DataError
from tests.conftest import make_split, small_params


@pytest.mark.parametrize(("source", "shape", "classes"), [
    ("sklearn:digits", (1, 8, 8), 10), ("sklearn:breast_cancer", (30,), 2), ("sklearn:wine", (13,), 3),
    ("sklearn:iris", (4,), 3)])
def test_builtin_sources(source, shape, classes):
    raw = load_source(DataConfig(source=source))
    assert raw.feature_shape == shape and raw.n_classes == classes
    assert raw.sample_id.dtype == np.int64 and np.array_equal(raw.sample_id, np.arange(raw.label.size))


def test_parquet_with_an_array_column_and_an_id_column(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 5)).astype(np.float32)
    frame = pl.DataFrame({"x": pl.Series(features, dtype=pl.Array(pl.Float32, 5)), "y": np.repeat([0, 1, 2], 10),
                          "uid": np.arange(100, 130)})
    frame.write_parquet(tmp_path / "d.parquet")
    raw = load_source(DataConfig(source=str(tmp_path / "d.parquet"), features="x", label_column="y", id_column="uid"))
    assert np.allclose(raw.features, features) and raw.sample_id[0] == 100 and raw.n_classes == 3


def test_parquet_with_feature_columns_and_image_shape(tmp_path):
    rng = np.random.default_rng(0)
    columns = {f"p{i}": rng.normal(size=12) for i in range(4)}
    pl.DataFrame({**columns, "label": np.repeat([0, 1], 6)}).write_parquet(tmp_path / "d.parquet")
    raw = load_source(DataConfig(source=str(tmp_path / "d.parquet"), features=list(columns), image_shape=[1, 2, 2]))
    assert raw.feature_shape == (1, 2, 2)


def test_parquet_missing_column_is_named(tmp_path):
    pl.DataFrame({"a": [1.0], "label": [0]}).write_parquet(tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['features'\]"):
        load_source(DataConfig(source=str(tmp_path / "d.parquet")))


def test_npz_source(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((9, 3)), y=np.repeat([0, 1, 2], 3))
    raw = load_source(DataConfig(source=str(tmp_path / "d.npz")))
    assert raw.features.shape == (9, 3) and raw.name == "d"


def test_splits_are_stratified_disjoint_and_seeded():
    a, b = stage_data(small_params("corruption.kind=none")), stage_data(small_params("corruption.kind=none"))
    ids = [set(getattr(a, name).sample_id.tolist()) for name in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert np.array_equal(a.train.sample_id, b.train.sample_id)
    overall = np.bincount(np.concatenate([a.train.label, a.val.label, a.test.label])) / 178
    assert np.abs(np.bincount(a.train.label) / len(a.train) - overall).max() < 0.03
    c = stage_data(small_params("corruption.kind=none", "seed=1"))
    assert not np.array_equal(a.train.sample_id, c.train.sample_id)


def _labels(n: int = 200, classes: int = 4):
    return make_split(np.random.default_rng(0).normal(size=(n, 6)), np.arange(n) % classes)


def test_symmetric_flips():
    train = _labels()
    flipped, trigger = corrupt(train, CorruptionConfig(kind="label_flip", fraction=0.25), n_classes=4, seed=0)
    assert trigger is None
    assert flipped.is_corrupted.sum() == 50
    assert np.array_equal(flipped.is_corrupted, flipped.label != train.label)
    assert np.array_equal(flipped.label_clean, train.label)
    assert len(np.unique(flipped.label[flipped.is_corrupted] - train.label[flipped.is_corrupted])) > 1


def test_pair_flips():
    train = _labels()
    flipped, _ = corrupt(train, CorruptionConfig(kind="label_flip", fraction=0.3, mode="pair"), n_classes=4, seed=0)
    rows = flipped.is_corrupted
    assert rows.sum() == 60
    assert np.array_equal(flipped.label[rows], (train.label[rows] + 1) % 4)


def test_tabular_backdoor():
    train = _labels()
    poisoned, trigger = corrupt(train, CorruptionConfig(kind="backdoor", fraction=0.1, target_class=2, trigger_size=3),
                                n_classes=4, seed=0)
    rows = poisoned.is_corrupted
    assert rows.sum() == 20
    assert (poisoned.label[rows] == 2).all() and (train.label[rows] != 2).all()
    assert np.allclose(poisoned.features[rows][:, trigger["indices"]], 3.0)
    assert np.array_equal(poisoned.features[~rows], train.features[~rows])


def test_image_trigger_patch():
    images = np.zeros((2, 1, 8, 8), dtype=np.float32)
    stamped = apply_trigger(images, {"kind": "patch", "size": 3, "value": 1.0, "target_class": 0})
    assert stamped[:, :, -3:, -3:].min() == 1.0 and stamped.sum() == 2 * 9
    assert images.sum() == 0  # the input is not modified

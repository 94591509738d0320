"""GAN staging (issue 17): the synthetic sets' moments, image sources read back pixel for pixel,
planted outliers (counts, where they sit, that clean rows are untouched) and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from cleanse.errors import ConfigError
from cleanse.families.gan.data import GAUSSIAN_COV, GAUSSIAN_MEAN, RING_RADIUS, RING_SD, stage_gan_data

MNIST = Path("/work/shared/data/mnist_test/mnist_test.npz")


def _ids(staged):
    return [s.sample_id for s in (staged.train, staged.val, staged.test)]


def test_gaussian2d_has_the_papers_moments_and_disjoint_seeded_splits():
    staged = stage_gan_data("synthetic:gaussian2d", 6000, 500, 500, seed=3)
    x = staged.train.features
    assert x.shape == (6000, 2) and x.dtype == np.float32
    assert staged.val.features.shape == (500, 2) and staged.test.features.shape == (500, 2)
    # Standard errors at n = 6000: mean ~0.013, covariance entries ~0.02.
    assert np.abs(x.mean(0) - GAUSSIAN_MEAN).max() < 0.05
    assert np.abs(np.cov(x, rowvar=False) - GAUSSIAN_COV).max() < 0.08
    ids = np.concatenate(_ids(staged))
    assert len(np.unique(ids)) == 7000
    assert not staged.train.is_corrupted.any() and staged.meta.n_classes == 1 and (staged.train.label == 0).all()
    again = stage_gan_data("synthetic:gaussian2d", 6000, 500, 500, seed=3)
    assert np.array_equal(again.train.features, x)
    assert not np.array_equal(stage_gan_data("synthetic:gaussian2d", 6000, 500, 500, seed=4).train.features, x)


def test_ring8_points_sit_on_their_modes():
    staged = stage_gan_data("synthetic:ring8", 4000, 100, 100, seed=0)
    x, label = staged.train.features.astype(np.float64), staged.train.label
    assert staged.meta.n_classes == 8 and set(label.tolist()) == set(range(8))
    angle = 2 * np.pi * label / 8
    centre = RING_RADIUS * np.c_[np.cos(angle), np.sin(angle)]
    assert np.linalg.norm(x - centre, axis=1).max() < 6 * RING_SD
    assert np.std(x - centre) == pytest.approx(RING_SD, rel=0.05)


@pytest.mark.parametrize("source", ["synthetic:gaussian2d", "synthetic:ring8"])
def test_far_cluster_outliers_are_counted_far_and_leave_clean_rows_alone(source):
    clean = stage_gan_data(source, 2000, 200, 200, seed=1)
    staged = stage_gan_data(source, 2000, 200, 200, "outliers", 0.05, "far_cluster", seed=1)
    flags = staged.train.is_corrupted
    assert flags.sum() == 100 and staged.meta.corruption["n_corrupted"] == 100
    assert not staged.val.is_corrupted.any() and not staged.test.is_corrupted.any()
    assert np.array_equal(staged.train.features[~flags], clean.train.features[~flags])
    assert np.array_equal(staged.val.features, clean.val.features)
    inliers, outliers = clean.train.features.astype(np.float64), staged.train.features[flags].astype(np.float64)
    centre = inliers.mean(0)
    # Every planted point lies farther from the data's mean than any real point does, and is at
    # least 3 units from the nearest real point.
    assert np.linalg.norm(outliers - centre, axis=1).min() > np.linalg.norm(inliers - centre, axis=1).max()
    nearest = np.sqrt(((outliers[:, None, :] - inliers[None]) ** 2).sum(-1)).min(1)
    assert nearest.min() > 3.0
    # Mahalanobis distance of the cluster under the real covariance.
    precision = np.linalg.inv(np.cov(inliers, rowvar=False))
    diff = outliers - centre
    assert np.sqrt(np.einsum("ij,jk,ik->i", diff, precision, diff)).min() > 5


def test_uniform_outliers_fill_the_widened_box():
    clean = stage_gan_data("synthetic:gaussian2d", 1000, 50, 50, seed=2)
    staged = stage_gan_data("synthetic:gaussian2d", 1000, 50, 50, "outliers", 0.1, "uniform", seed=2)
    out = staged.train.features[staged.train.is_corrupted]
    assert out.shape == (100, 2)
    low, high = clean.train.features.min(0), clean.train.features.max(0)
    pad = 0.5 * (high - low)
    assert (out >= low - pad - 1e-5).all() and (out <= high + pad + 1e-5).all()
    assert (out < low).any() and (out > high).any()  # spills beyond the data on both sides


def test_digits_are_scaled_images_matching_the_source_and_noise_outliers_replace_rows():
    digits = load_digits()
    staged = stage_gan_data("sklearn:digits", 1000, 300, 400, "outliers", 0.05, "noise", seed=0)
    tr = staged.train
    assert tr.features.shape == (1000, 1, 8, 8) and staged.test.features.shape == (400, 1, 8, 8)
    assert staged.meta.n_classes == 10 and staged.meta.feature_shape == (1, 8, 8)
    expected = (digits.data[tr.sample_id] / 16.0 * 2 - 1).reshape(-1, 1, 8, 8)
    flags = tr.is_corrupted
    assert flags.sum() == 50
    assert np.allclose(tr.features[~flags], expected[~flags], atol=1e-6)
    assert np.array_equal(tr.label, digits.target[tr.sample_id])
    noise = tr.features[flags]
    assert noise.min() >= -1 and noise.max() <= 1
    assert abs(noise.mean()) < 0.05 and noise.std() == pytest.approx(1 / np.sqrt(3), rel=0.05)
    assert np.abs(noise - expected[flags]).mean() > 0.3
    assert len(np.unique(np.concatenate(_ids(staged)))) == 1700


@pytest.mark.skipif(not MNIST.is_file(), reason="shared MNIST test set not present")
def test_mnist_npz_loads_pixel_for_pixel_and_takes_resized_digits_as_outliers():
    with np.load(MNIST, allow_pickle=False) as archive:
        x, y = archive["x"], archive["y"]
    staged = stage_gan_data(str(MNIST.parent), 600, 100, 100, "outliers", 0.05, "other_set", "sklearn:digits", seed=5)
    tr = staged.train
    assert tr.features.shape == (600, 1, 28, 28) and staged.meta.name == "mnist_test"
    flags = tr.is_corrupted
    assert flags.sum() == 30
    assert np.allclose(tr.features[~flags, 0], x[tr.sample_id[~flags]] / 127.5 - 1, atol=1e-6)
    assert np.array_equal(tr.label, y[tr.sample_id].astype(np.int64))
    assert np.allclose(staged.test.features[:, 0], x[staged.test.sample_id] / 127.5 - 1, atol=1e-6)
    # Upscaled 8x8 digits are blurrier than MNIST strokes: fewer pixels at the extremes.
    out = tr.features[flags]
    assert out.min() >= -1 and out.max() <= 1
    saturated = lambda v: np.mean(np.abs(v) > 0.99)  # noqa: E731
    assert saturated(out) < saturated(tr.features[~flags])


def test_npz_variants(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb, labels=np.arange(40) % 4)
    staged = stage_gan_data(str(tmp_path / "rgb.npz"), 20, 10, 10, seed=0)
    assert staged.train.features.shape == (20, 3, 8, 8) and staged.meta.n_classes == 4
    assert np.allclose(staged.train.features, rgb[staged.train.sample_id] / 127.5 - 1, atol=1e-6)
    floats = rng.uniform(0, 1, size=(30, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "floats.npz", x=floats)
    staged = stage_gan_data(str(tmp_path / "floats.npz"), 10, 10, 10, seed=0)
    assert np.allclose(staged.train.features[:, 0], floats[staged.train.sample_id] * 2 - 1, atol=1e-6)
    assert (staged.train.label == 0).all()
    # Grey 3-channel images stand in for 1-channel ones (channel mean), resized 8 -> 6.
    staged = stage_gan_data(str(tmp_path / "floats.npz"), 10, 10, 10, "outliers", 0.2, "other_set",
                            str(tmp_path / "rgb.npz"), seed=0)
    assert staged.train.features.shape == (10, 1, 6, 6) and staged.train.is_corrupted.sum() == 2


def _refused(match, *args, **kwargs):
    with pytest.raises(ConfigError, match=match) as info:
        stage_gan_data(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_input_is_refused_in_one_line(tmp_path):
    _refused("unknown source", "synthetic:moons", 10, 10, 10)
    _refused("n_train", "synthetic:gaussian2d", 1, 10, 10)
    _refused("holds only 1797", "sklearn:digits", 1500, 200, 200)
    _refused("fraction", "synthetic:gaussian2d", 100, 10, 10, "outliers", 0.0, "far_cluster")
    _refused("does not apply to image", "sklearn:digits", 100, 10, 10, "outliers", 0.1, "far_cluster")
    _refused("does not apply to 2-D", "synthetic:ring8", 100, 10, 10, "outliers", 0.1, "noise")
    _refused("needs the image source", "sklearn:digits", 100, 10, 10, "outliers", 0.1, "other_set")
    _refused("not an image set", "sklearn:digits", 100, 10, 10, "outliers", 0.1, "other_set",
             "synthetic:ring8")
    _refused("corruption.kind", "sklearn:digits", 100, 10, 10, "labels", 0.1)
    _refused("file not found", str(tmp_path / "missing.npz"), 10, 10, 10)
    np.savez(tmp_path / "objects.npz", x=np.array([object(), 1], dtype=object))
    _refused("not a readable", str(tmp_path / "objects.npz"), 10, 10, 10)
    np.savez(tmp_path / "flat.npz", x=np.zeros((30, 64), dtype=np.uint8))
    _refused("must be \\(n, H, W\\)", str(tmp_path / "flat.npz"), 10, 10, 10)
    np.savez(tmp_path / "wide.npz", x=np.full((30, 4, 4), 3.0))
    _refused("float images must lie", str(tmp_path / "wide.npz"), 10, 10, 10)
    np.savez(tmp_path / "keys.npz", pixels=np.zeros((30, 4, 4), dtype=np.uint8))
    _refused("no image array", str(tmp_path / "keys.npz"), 10, 10, 10)
    np.savez(tmp_path / "short.npz", x=np.zeros((30, 4, 4), dtype=np.uint8), y=np.zeros(29, dtype=np.int64))
    _refused("labels for 30 images", str(tmp_path / "short.npz"), 10, 10, 10)
    _refused("holds 5 .npz files", str(tmp_path), 10, 10, 10)

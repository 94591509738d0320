"""The GAN family's ``stage`` step: real instances for a GAN, split, with planted outliers.

Sources (``features`` float32; ``label`` the class index when the source has one, else 0):

- ``synthetic:gaussian2d`` -- the single correlated Gaussian of Terashita et al. (ICLR 2021, the
  "2D-Normal" set): mean (1, 1), covariance [[1, 0.8], [0.8, 1]]; ``(n, 2)``, label 0.
- ``synthetic:ring8`` -- eight isotropic Gaussians (sd ``RING_SD = 0.1``) with means equally
  spaced on a circle of radius ``RING_RADIUS = 2`` around the origin, equal weights; ``(n, 2)``,
  label = the component (0..7). Neighbouring means are 1.53 apart (15 sd), so the modes are
  distinct yet a small GAN trains on them in seconds (the usual 0.02 sd is sharper than a few CPU
  epochs resolve).
- ``sklearn:digits`` -- 1,797 8x8 digits as ``(n, 1, 8, 8)`` scaled to ``[-1, 1]``, labels 0..9.
- ``*.npz`` images (or a folder holding one ``.npz``), read with ``allow_pickle=False``: arrays
  ``x``/``y``, ``images``/``labels`` or ``X``/``y`` (labels optional); ``uint8`` ``(n, H, W)`` or
  ``(n, C, H, W)`` mapped by ``v / 127.5 - 1``; floats in ``[0, 1]`` by ``2v - 1``, floats in
  ``[-1, 1]`` with negatives kept as they are. E.g. ``/work/shared/data/mnist_test``.

Splits: synthetic sets draw ``n_train + n_val + n_test`` points from stream ``"gan.data"``
(``sample_id`` = draw order); image sets take a ``"gan.data"`` permutation of the rows
(``sample_id`` = row in the source) and cut it into train, validation and test in that order.

Corruption (``kind: outliers``; training split only, ground truth in ``is_corrupted``):
``round(fraction * n_train)`` training rows, chosen on stream ``"gan.outliers"``, are REPLACED by
off-distribution instances (they keep the replaced row's ``sample_id`` and ``label``):

- 2-D ``far_cluster``: a Gaussian of sd ``0.1 s`` centred at ``mu + 6 s (1, -1)/sqrt(2)`` with
  ``mu`` the clean training mean and ``s`` the square root of the clean covariance's largest
  eigenvalue (for gaussian2d: centre (6.7, -4.7), 18 Mahalanobis units from the mean);
- 2-D ``uniform``: uniform on the clean training bounding box widened by half its extent per side
  (many fall inside the data: the hard case);
- images ``noise``: i.i.d. uniform pixels in ``[-1, 1]``;
- images ``other_set``: random images of ``other_source`` (any source above), resized
  (bilinear, antialiased) to ``(H, W)`` and given the target's channel count when they differ.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cleanse import seeds
from cleanse.data.dataset import DatasetMeta, Split, StagedData
from cleanse.data.sources import NPZ_ERRORS, _as_labels, as_label_vector
from cleanse.errors import CleanseError, ConfigError
from cleanse.storage import fetch_input

POINT_SOURCES = ("synthetic:gaussian2d", "synthetic:ring8")
GAUSSIAN_MEAN = np.array([1.0, 1.0])
GAUSSIAN_COV = np.array([[1.0, 0.8], [0.8, 1.0]])
RING_RADIUS, RING_SD, RING_MODES = 2.0, 0.1, 8
POINT_MODES, IMAGE_MODES = ("far_cluster", "uniform"), ("noise", "other_set")
NPZ_KEYS = (("x", "y"), ("images", "labels"), ("X", "y"))


def stage_gan_data(
    source: str,
    n_train: int,
    n_val: int,
    n_test: int,
    corruption_kind: str = "none",
    fraction: float = 0.0,
    mode: str | None = None,
    other_source: str | None = None,
    seed: int = 0,
) -> StagedData:
    """Train/validation/test splits of ``source`` with ``corruption_kind`` (``none`` | ``outliers``)
    applied to the training split; see the module docstring. ``mode`` ``None`` or ``auto``: the
    first mode of the data's kind (``far_cluster`` or ``noise``)."""
    for key, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ConfigError(f"data.{key}: must be an integer >= 2, got {value!r}")
    points = source in POINT_SOURCES
    if corruption_kind not in ("none", "outliers"):
        raise ConfigError(f"corruption.kind: {corruption_kind!r} is not one of 'none', 'outliers'")
    modes = POINT_MODES if points else IMAGE_MODES
    mode = modes[0] if mode in (None, "auto") else mode
    if corruption_kind == "outliers":
        if not 0 < fraction < 0.5:
            raise ConfigError(f"corruption.fraction: {fraction!r} must lie in (0, 0.5) for planted outliers")
        if mode not in modes:
            kind = "2-D point" if points else "image"
            raise ConfigError(f"corruption.mode: {mode!r} does not apply to {kind} data ({source}); use one of "
                              f"{', '.join(modes)}")
        if mode == "other_set" and not other_source:
            raise ConfigError("corruption.other_source: mode other_set needs the image source the outliers come from")
        if mode == "other_set" and other_source == source:
            raise ConfigError(f"corruption.other_source: {other_source!r} is the training source; name another set")
    n_total = n_train + n_val + n_test
    if points:
        sample_id = np.arange(n_total, dtype=np.int64)
        features, label = _draw_points(source, n_total, seeds.rng(seed, "gan.data"))
        n_classes = RING_MODES if source == "synthetic:ring8" else 1
        name = source.removeprefix("synthetic:")
    else:
        images, labels, name = load_images(source, "data.source")
        if n_total > images.shape[0]:
            raise ConfigError(f"data: n_train + n_val + n_test = {n_total} but {source} holds only "
                              f"{images.shape[0]} images")
        sample_id = seeds.rng(seed, "gan.data").permutation(images.shape[0])[:n_total].astype(np.int64)
        features, label = images[sample_id], labels[sample_id]
        n_classes = int(labels.max()) + 1

    def split(rows: slice) -> Split:
        return Split(sample_id=sample_id[rows], features=features[rows], label=label[rows],
                     label_clean=label[rows].copy(), is_corrupted=np.zeros(len(sample_id[rows]), dtype=bool))

    train = split(slice(0, n_train))
    n_out = int(round(fraction * n_train)) if corruption_kind == "outliers" else 0
    if n_out:
        train = _plant(train, n_out, str(mode), other_source, seed)
    corruption = {"kind": corruption_kind, "fraction": float(fraction) if n_out else 0.0,
                  "mode": mode if n_out else None, "other_source": other_source if mode == "other_set" else None,
                  "n_corrupted": n_out}
    meta = DatasetMeta(name=name, n_classes=n_classes, feature_shape=tuple(features.shape[1:]), corruption=corruption)
    return StagedData(train=train, val=split(slice(n_train, n_train + n_val)),
                      test=split(slice(n_train + n_val, n_total)), meta=meta)


def _draw_points(source: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if source == "synthetic:gaussian2d":
        points = rng.multivariate_normal(GAUSSIAN_MEAN, GAUSSIAN_COV, size=n)
        return points.astype(np.float32), np.zeros(n, dtype=np.int64)
    component = rng.integers(0, RING_MODES, size=n)
    angle = 2 * math.pi * component / RING_MODES
    centres = RING_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return (centres + RING_SD * rng.standard_normal((n, 2))).astype(np.float32), component.astype(np.int64)


def _plant(train: Split, n_out: int, mode: str, other_source: str | None, seed: int) -> Split:
    """``train`` with ``n_out`` rows replaced by outliers of ``mode`` (see the module docstring)."""
    rng = seeds.rng(seed, "gan.outliers")
    rows = np.sort(rng.choice(len(train), size=n_out, replace=False))
    features = train.features.copy()
    clean = train.features.reshape(len(train), -1).astype(np.float64)
    shape = train.features.shape[1:]
    if mode == "far_cluster":
        mu, cov = clean.mean(0), np.cov(clean, rowvar=False)
        s = math.sqrt(float(np.linalg.eigvalsh(cov).max()))
        centre = mu + 6 * s * np.array([1.0, -1.0]) / math.sqrt(2)
        outliers = centre + 0.1 * s * rng.standard_normal((n_out, 2))
    elif mode == "uniform":
        low, high = clean.min(0), clean.max(0)
        pad = 0.5 * (high - low)
        outliers = rng.uniform(low - pad, high + pad, size=(n_out, clean.shape[1]))
    elif mode == "noise":
        outliers = rng.uniform(-1.0, 1.0, size=(n_out, *shape))
    else:
        assert other_source is not None
        other, _, _ = load_images(other_source, "corruption.other_source")
        picked = other[np.sort(rng.choice(other.shape[0], size=n_out, replace=other.shape[0] < n_out))]
        outliers = _fit_images(picked, tuple(shape))
    features[rows] = np.asarray(outliers, dtype=np.float32).reshape((n_out, *shape))
    flags = train.is_corrupted.copy()
    flags[rows] = True
    return Split(sample_id=train.sample_id, features=features, label=train.label, label_clean=train.label_clean,
                 is_corrupted=flags)


def _fit_images(images: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``images`` ``(k, C', H', W')`` with ``shape`` ``(C, H, W)``: channels averaged to 1 or a
    single channel repeated; sides resized bilinearly with antialiasing; values clipped to [-1, 1]."""
    import torch
    from torch.nn.functional import interpolate

    channels, height, width = shape
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.shape[1] != channels:
        if channels == 1:
            x = x.mean(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise ConfigError(f"corruption.other_source: images with {x.shape[1]} channels cannot stand in for "
                              f"{channels}-channel images")
    if tuple(x.shape[2:]) != (height, width):
        x = interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1.0, 1.0).numpy()


def load_images(source: str, where: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Images ``(n, C, H, W)`` float32 in ``[-1, 1]``, labels ``(n,)`` int64 (zeros when the source
    has none) and a name, from ``sklearn:digits`` or an image ``.npz`` (file or folder with one)."""
    if source == "sklearn:digits":
        from cleanse.data.sources import load_source
        from cleanse.families.classification.config import DataConfig

        raw = load_source(DataConfig(source=source))  # (n, 1, 8, 8) in [0, 1]
        return (raw.features * 2.0 - 1.0).astype(np.float32), raw.label, "digits"
    if source in POINT_SOURCES:
        raise ConfigError(f"{where}: {source!r} is a 2-D point set, not an image set")
    path = Path(source)
    if "://" not in source and path.is_dir():
        found = sorted(path.glob("*.npz"))
        if len(found) != 1:
            raise ConfigError(f"{where}: folder {source} holds {len(found)} .npz files; name one")
        path = found[0]
    elif not source.endswith(".npz"):
        raise ConfigError(f"{where}: unknown source {source!r}; allowed: {', '.join(POINT_SOURCES)}, "
                          "sklearn:digits, or an image .npz file (or a folder holding one)")
    try:
        local = fetch_input(str(path))
    except CleanseError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    images, labels = _read_npz(local, where)
    return images, labels, local.stem


def _read_npz(path: Path, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = next(((x, y) for x, y in NPZ_KEYS if x in archive.files), None)
            if keys is None:
                raise ConfigError(f"{where} {path}: no image array; expected one of x, images, X "
                                  f"(found {', '.join(archive.files) or 'nothing'})")
            raw = np.asarray(archive[keys[0]])
            labels = np.asarray(archive[keys[1]]) if keys[1] in archive.files else None
    except NPZ_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"{where} {path}: not a readable .npz file ({type(exc).__name__}: {reason})") from None
    if raw.ndim == 3:
        raw = raw[:, None]
    if raw.ndim != 4 or raw.shape[0] == 0 or raw.shape[1] not in (1, 3):
        raise ConfigError(f"{where} {path}: images must be (n, H, W) or (n, C, H, W) with C 1 or 3 and n > 0, got "
                          f"shape {list(raw.shape)}")
    if raw.dtype == np.uint8:
        images = raw.astype(np.float32) / 127.5 - 1.0
    elif raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            raise ConfigError(f"{where} {path}: the images hold NaN or infinite values")
        low, high = float(raw.min()), float(raw.max())
        if low < -1.0 or high > 1.0:
            raise ConfigError(f"{where} {path}: float images must lie in [0, 1] or [-1, 1], found [{low:g}, {high:g}]; "
                              "store uint8 pixels instead")
        images = (raw * 2.0 - 1.0 if low >= 0.0 else raw).astype(np.float32)
    else:
        raise ConfigError(f"{where} {path}: images must be uint8 or float, got dtype {raw.dtype}")
    if labels is None:
        return images, np.zeros(images.shape[0], dtype=np.int64)
    try:
        labels = _as_labels(as_label_vector(labels, f"{where} {path}"), f"{where} {path}")
    except CleanseError as exc:
        raise ConfigError(str(exc)) from None
    if labels.shape[0] != images.shape[0] or (labels < 0).any():
        raise ConfigError(f"{where} {path}: {labels.shape[0]} labels for {images.shape[0]} images, or negative "
                          "labels; labels must be class indices, one per image")
    return images, labels

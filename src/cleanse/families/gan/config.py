"""The GAN family's sections of ``params.yaml`` (``family: gan``): the real instances a GAN is
trained on, planted outliers, the GAN and its recipe, and the evaluation metrics.

Data are two-dimensional points (``synthetic:gaussian2d``, ``synthetic:ring8``) or images
(``sklearn:digits``, ``*.npz``); a section's defaults that depend on which (the metrics, the
outlier mode, the float precision) are ``auto`` and resolved by :func:`is_image_source`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from cleanse.config_base import MAX_LR, MAX_WEIGHT_DECAY, OpenFraction, _Section

# The low-dimensional sources; everything else (sklearn:digits, *.npz) is an image set.
POINT_SOURCES = ("synthetic:gaussian2d", "synthetic:ring8")
METRIC_NAMES = ("all", "fid", "is", "dloss")


def is_image_source(source: str) -> bool:
    """True for image sources (``sklearn:digits``, ``.npz`` files), False for the 2-D point sets."""
    return source not in POINT_SOURCES


class GanDataConfig(_Section):
    """The real instances: where they come from and how many go to each split."""

    source: str = Field(
        "synthetic:gaussian2d",
        description="synthetic:gaussian2d (one correlated Gaussian, mean (1, 1), covariance [[1, .8], [.8, 1]]) | "
        "synthetic:ring8 (eight Gaussians on a ring) | sklearn:digits (8x8 images in [-1, 1]) | a .npz of images "
        "(x: (n, H, W) or (n, C, H, W), optional y).")
    n_train: int = Field(1000, ge=16, description="Training instances (the units scored and removed).")
    n_val: int = Field(500, ge=16, description="Held-out real instances the estimators' metric is computed on.")
    n_test: int = Field(1000, ge=16, description="Held-out real instances the reported metrics are computed on.")


class GanCorruptionConfig(_Section):
    """Outliers planted in the training split (``is_corrupted`` keeps the ground truth)."""

    kind: Literal["none", "outliers"] = Field(
        "outliers", description="outliers: a fraction of training instances replaced by off-distribution ones.")
    fraction: OpenFraction = Field(0.05, description="Share of training instances replaced, in (0, 1).")
    mode: Literal["auto", "far_cluster", "uniform", "noise", "other_set"] = Field(
        "auto", description="2-D: far_cluster (a tight cluster far from the data) | uniform (uniform noise over a "
        "wide box); images: noise (uniform noise images) | other_set (images of corruption.other_source); auto: "
        "far_cluster for 2-D, noise for images.")
    other_source: str | None = Field(None, description="mode other_set: the image source the outliers come from.")

    def resolved_mode(self, source: str) -> str:
        if self.mode != "auto":
            return self.mode
        return "noise" if is_image_source(source) else "far_cluster"


class GanModelConfig(_Section):
    """The GAN (``mlp``: the paper's fully connected GAN; ``conv``: a small convolutional GAN for
    images) and its training recipe (non-saturating loss)."""

    arch: Literal["mlp", "conv"] = Field("mlp", description="mlp: fully connected G and D; conv: convolutional.")
    z_dim: int = Field(10, ge=1, le=512, description="Latent dimension.")
    hidden_g: list[int] = Field([32, 32], description="Generator hidden widths (mlp) or channels (conv).")
    hidden_d: list[int] = Field([64, 64], description="Discriminator hidden widths (mlp) or channels (conv).")
    dtype: Literal["auto", "float64", "float32"] = Field(
        "auto", description="auto: float64 for 2-D data (as the paper), float32 for images.")
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(100, ge=2)
    lr_d: float = Field(1e-3, gt=0, le=MAX_LR, description="Discriminator learning rate.")
    lr_g: float = Field(1e-3, gt=0, le=MAX_LR, description="Generator learning rate.")
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only.")
    betas: tuple[float, float] = Field((0.5, 0.999), description="adam only.")
    weight_decay: float = Field(0.0, ge=0, le=MAX_WEIGHT_DECAY, description="L2 on both networks.")
    updates: Literal["simultaneous", "alternating"] = Field(
        "simultaneous", description="simultaneous: both gradients at the same parameters; alternating: D, then G.")
    trace_epochs: int = Field(1, ge=1, description="The traced (replayable) window: the last this many epochs.")

    @field_validator("hidden_g", "hidden_d")
    @classmethod
    def _widths(cls, value: list[int]) -> list[int]:
        if not value or any(width < 1 for width in value):
            raise ValueError(f"must list positive widths, got {value}")
        return value

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"each beta must lie in [0, 1), got {list(value)}")
        return value

    def resolved_dtype(self, source: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if is_image_source(source) else "float64"


class GanMetricsConfig(_Section):
    """The evaluation metrics (the family's outcome): ALL (kernel-density average log-likelihood)
    for 2-D data, FID and IS on a classifier trained on the real images."""

    names: list[Literal["all", "fid", "is", "dloss"]] | None = Field(
        None, description="Reported metrics; none = all for 2-D data, fid and is for images (the first is the "
        "headline: test_<name>).")
    n_latents: int = Field(1000, ge=16, description="Fixed latent draws the generated set is made of.")

    def resolved(self, source: str) -> list[str]:
        if self.names is not None:
            return list(self.names)
        return ["fid", "is"] if is_image_source(source) else ["all"]

    @field_validator("names")
    @classmethod
    def _some(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"name each metric once, at least one of {', '.join(METRIC_NAMES)}; got {value}")
        if value is not None and value[0] == "dloss":
            raise ValueError("the headline metric (the first) must be all, fid or is; dloss is a diagnostic")
        return value


class GanEvaluateFields(_Section):
    """The GAN family's part of ``evaluate``: how removals are verified beyond the replay, and
    gan_influence's agreement with true counterfactual replays."""

    scratch: bool = Field(True, description="Also retrain from scratch (same seed, batches and latents) without "
                          "the removed instances, reported beside the replay as <metric>_scratch.")
    replay: bool = Field(False, description="Replay the traced window without each of replay_instances sampled "
                         "training instances and compare gan_influence's predicted metric change with the true one "
                         "(Kendall tau, Jaccard of the top 10%).")
    replay_instances: int = Field(200, ge=10, description="Instances replayed for the agreement.")


def check_fits_data(data: GanDataConfig, corruption: GanCorruptionConfig, model: GanModelConfig,
                    metrics: GanMetricsConfig, evaluate: Any = None) -> None:
    """Refuse (ValueError naming the key) sections that do not fit the data's kind, 2-D or images,
    and the shared evaluations that retrain supervised models (``evaluate.lds``, ``stability``)."""
    for key in ("lds", "stability"):
        if evaluate is not None and getattr(evaluate, key):
            raise ValueError(f"evaluate.{key}: needs a supervised model; family 'gan' evaluates its estimator "
                             "against true replays (evaluate.replay)")
    image = is_image_source(data.source)
    kind = "image" if image else "2-D"
    mode = corruption.resolved_mode(data.source)
    if corruption.kind == "outliers" and (mode in ("noise", "other_set")) != image:
        raise ValueError(f"corruption.mode: {mode!r} does not fit {kind} data ({data.source}); use "
                         f"{'noise or other_set' if image else 'far_cluster or uniform'}")
    if corruption.kind == "outliers" and mode == "other_set" and not corruption.other_source:
        raise ValueError("corruption.mode 'other_set' needs corruption.other_source (an image source)")
    wrong = [name for name in metrics.resolved(data.source) if name != "dloss" and (name in ("fid", "is")) != image]
    if wrong:
        raise ValueError(f"metrics.names: {', '.join(wrong)} do not fit {kind} data ({data.source}); "
                         f"{'fid and is' if image else 'all'} do")
    if model.arch == "conv" and not image:
        raise ValueError(f"model.arch: 'conv' needs image data, got {data.source}; use mlp")

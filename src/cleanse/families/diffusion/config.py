"""The diffusion family's sections of ``params.yaml`` (``family: diffusion``): the training images
(one source, or several mixed with a ``source`` column), the planted watermark or duplicates, the
DDPM and its recipe (with the LoRA path), the generations that are measured and attributed, and the
retrieval evaluation (DMin: Lin, Lao & Zhao, arXiv 2412.08637; spec part B 3).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from cleanse.config_base import MAX_LR, OpenFraction, _Section

MNIST = "/work/shared/data/mnist_test"
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


class DiffusionDataConfig(_Section):
    """The training images and how many go to each split (every image in [-1, 1], ``(C, H, W)``)."""

    source: str = Field(
        "sklearn:digits",
        description="sklearn:digits (8x8) | mnist (the MNIST test set of /work/shared/data/mnist_test, 28x28) | an "
        "image .npz (x/images/X, optional y/labels) | mixed:<a>+<b>[+...] (several of those; the model is then "
        "conditioned on the set each image came from).")
    image_size: int | None = Field(
        None, ge=4, le=64, description="Images are resized (bilinear, antialiased) to image_size x image_size; "
        "null = the first source's own size.")
    n_train: int = Field(1000, ge=16, description="Training images (the units scored and removed).")
    n_val: int = Field(200, ge=16, description="Validation images (the detector, val_loss).")
    n_test: int = Field(200, ge=16, description="Test images (test_loss).")

    @field_validator("source")
    @classmethod
    def _mixed_has_parts(cls, value: str) -> str:
        if value.startswith("mixed:"):
            parts = value.removeprefix("mixed:").split("+")
            if len(parts) < 2 or any(not part for part in parts) or len(set(parts)) != len(parts):
                raise ValueError(f"mixed: needs two or more distinct sources joined by '+', got {value!r}")
            if any(part.startswith("mixed:") for part in parts):
                raise ValueError(f"mixed sources do not nest: {value!r}")
        return value

    def parts(self) -> list[str]:
        """The sources behind ``source`` (one, or the members of a ``mixed:`` set)."""
        if self.source.startswith("mixed:"):
            return self.source.removeprefix("mixed:").split("+")
        return [self.source]


class DiffusionCorruptionConfig(_Section):
    """What is planted in the training split (``is_corrupted`` marks the planted rows)."""

    kind: Literal["none", "watermark", "duplicates"] = Field(
        "watermark", description="watermark: a small patch pasted into a fraction of target_class's training "
        "images; duplicates: one training image of target_class repeated copies times (replacing other images of "
        "that class); none.")
    target_class: int = Field(0, ge=0, description="The class (the source index for mixed sets) planted in.")
    fraction: OpenFraction = Field(0.02, description="watermark: the share of target_class's training images "
                                   "that carry the patch (at least one).")
    patch_size: int = Field(2, ge=1, description="watermark: the patch's side in pixels (after resizing).")
    patch_value: float = Field(1.0, ge=-1.0, le=1.0, description="watermark: the patch's pixel value, in [-1, 1].")
    corner: Literal["top_left", "top_right", "bottom_left", "bottom_right"] = Field(
        "top_left", description="watermark: where the patch goes.")
    copies: int = Field(20, ge=2, description="duplicates: how many training rows hold the duplicated image.")


class DiffusionLoraConfig(_Section):
    """The LoRA path: a base model fitted on the validation split's images (never on the training
    split, so that "without these training images" re-fine-tunes from the same base), then peft LoRA
    adapters fine-tuned on the training split; attribution within the adapters."""

    enabled: bool = False
    rank: int = Field(4, ge=1, le=64)
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; null = rank.")
    base_epochs: int = Field(20, ge=1, description="Epochs of the base model on the validation split.")


class DiffusionModelConfig(_Section):
    """A diffusers ``UNet2DModel`` with a ``DDPMScheduler`` (linear betas) and its recipe (Adam on the
    DDPM objective, :func:`cleanse.families.diffusion.train.fit_ddpm`)."""

    widths: list[int] = Field([16, 32], description="Channels per resolution (image_size must be divisible by "
                              "2^(len - 1)).")
    attention: bool = Field(False, description="Self-attention at the lowest resolution (LoRA's targets when on; "
                            "without it LoRA adapts the ResNet convolutions).")
    conditional: bool = Field(True, description="Condition on the class (the source for mixed sets).")
    num_train_timesteps: int = Field(1000, ge=10, le=4000)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0, le=MAX_LR)
    label_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Classifier-free guidance training: the chance "
                                 "that an image's label is replaced by a null label in an epoch (Ho & Salimans, "
                                 "2022); 0 = plain conditional training.")
    lora: DiffusionLoraConfig = DiffusionLoraConfig()

    @field_validator("widths")
    @classmethod
    def _widths(cls, value: list[int]) -> list[int]:
        if not value or any(width < 1 for width in value):
            raise ValueError(f"must list positive widths, got {value}")
        return value


class DiffusionGenerationConfig(_Section):
    """The generations: queries per condition, and the target class's generations on which the
    watermark rate is measured (test seeds for ``watermark_rate``, other seeds for ``val_watermark_rate``)."""

    per_class: int = Field(8, ge=1, description="Generated queries per condition (class or source).")
    steps: int = Field(100, ge=2, description="Ancestral sampling steps (at most model.num_train_timesteps).")
    n_watermark: int = Field(300, ge=10, description="Generations of the target class per rate measurement.")
    guidance: float = Field(1.0, ge=0.0, le=20.0, description="Classifier-free guidance scale w (needs "
                            "model.label_dropout > 0 when not 1): u + w (c - u); 1 = plain conditional sampling.")


class DiffusionQueriesConfig(_Section):
    """User-supplied query images instead of the generated ones."""

    file: str | None = Field(None, description="An .npz with images (n, H, W) or (n, C, H, W) and optional labels "
                             "and source; null = generated queries.")


class DiffusionEvaluateFields(_Section):
    """The diffusion family's part of ``evaluate``: source retrieval of the stored top-k tables."""

    retrieval: bool = Field(True, description="precision@k of each estimator's retrieved sources (and duplicate "
                            "recall@10 with corruption.kind duplicates).")
    retrieval_k: list[int] = Field([5, 10, 50], description="The k of precision@k.")

    @field_validator("retrieval_k")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value) or len(set(value)) != len(value):
            raise ValueError(f"must list distinct positive k, got {value}")
        return sorted(value)


def check_diffusion(data: DiffusionDataConfig, corruption: DiffusionCorruptionConfig, model: DiffusionModelConfig,
                    generation: DiffusionGenerationConfig, evaluate: object = None) -> None:
    """Refuse (ValueError naming the key) sections that cannot work together; what needs the data
    (class counts, image sides) is checked when staging."""
    for key in ("lds", "stability"):
        if evaluate is not None and getattr(evaluate, key, False):
            raise ValueError(f"evaluate.{key}: needs a supervised model; family 'diffusion' evaluates retrieval "
                             "(evaluate.retrieval) and the watermark rate after retraining")
    if (model.label_dropout > 0 or generation.guidance != 1.0) and not model.conditional:
        raise ValueError("model.label_dropout, generation.guidance: classifier-free guidance needs "
                         "model.conditional: true")
    if generation.guidance != 1.0 and model.label_dropout == 0:
        raise ValueError(f"generation.guidance: {generation.guidance} needs a null label; set model.label_dropout "
                         "(e.g. 0.1)")
    if generation.steps > model.num_train_timesteps:
        raise ValueError(f"generation.steps: {generation.steps} exceeds model.num_train_timesteps "
                         f"({model.num_train_timesteps})")
    if data.image_size is not None and data.image_size % 2 ** (len(model.widths) - 1):
        raise ValueError(f"data.image_size: {data.image_size} is not divisible by 2^{len(model.widths) - 1} for "
                         f"{len(model.widths)} model.widths")
    if corruption.kind == "watermark" and data.image_size is not None and corruption.patch_size >= data.image_size:
        raise ValueError(f"corruption.patch_size: {corruption.patch_size} must be smaller than data.image_size "
                         f"({data.image_size})")
    if corruption.kind != "none" and data.source.startswith("mixed:") and corruption.target_class >= len(data.parts()):
        raise ValueError(f"corruption.target_class: {corruption.target_class} is no source index of "
                         f"{data.source} (0..{len(data.parts()) - 1})")


"""The planted watermark and the detector that measures it in generations (issue 18's cleansing
case for DMin, Lin, Lao & Zhao, arXiv 2412.08637).

The watermark is a solid square patch: ``size x size`` pixels of ``value`` (in [-1, 1], every
channel) at one ``corner`` of the image, pasted into a fraction of one class's training images.
A generation "carries" it when :class:`WatermarkDetector` flags it: a logistic regression on the
pixels of a window at that corner (side ``min(2 size, H)``, so that the patch and its surround are
both seen), fitted on clean held-out images (label 0) and the same images with the patch pasted
(label 1). It never sees the training split, the generations or the planted rows. Its decision is
``w . window + b > 0`` (probability > 1/2); the weights are stored as safetensors, the patch and
window as JSON, never a pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cleanse.errors import ConfigError

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


@dataclass(frozen=True)
class Patch:
    """A ``size x size`` square of ``value`` at ``corner`` of a ``(C, H, W)`` image."""

    size: int
    value: float
    corner: str = "top_left"

    def __post_init__(self) -> None:
        if self.corner not in CORNERS:
            raise ConfigError(f"corruption.corner: {self.corner!r} is not one of {', '.join(CORNERS)}")
        if self.size < 1 or not -1.0 <= self.value <= 1.0:
            raise ConfigError(f"corruption: patch size {self.size} must be >= 1 and value {self.value} in [-1, 1]")

    def region(self, height: int, width: int, side: int | None = None) -> tuple[slice, slice]:
        """The rows and columns of a ``side`` square (default: the patch) at the corner."""
        side = self.size if side is None else side
        if side > min(height, width):
            raise ConfigError(f"corruption.patch_size: a {side}-pixel square does not fit {height}x{width} images")
        rows = slice(0, side) if self.corner.startswith("top") else slice(height - side, height)
        cols = slice(0, side) if self.corner.endswith("left") else slice(width - side, width)
        return rows, cols

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "value": self.value, "corner": self.corner}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Patch:
        return cls(int(data["size"]), float(data["value"]), str(data["corner"]))


def plant_patch(images: np.ndarray, patch: Patch) -> np.ndarray:
    """A copy of ``images`` ``(n, C, H, W)`` with ``patch`` pasted into every image."""
    out = np.array(images, dtype=np.float32, copy=True)
    rows, cols = patch.region(*out.shape[-2:])
    out[..., rows, cols] = patch.value
    return out


def _as_array(images: Any) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().cpu().to(torch.float32).numpy()
    return np.asarray(images, dtype=np.float32)


@dataclass(frozen=True)
class WatermarkDetector:
    """A linear detector of ``patch`` on the window of side ``window`` at the patch's corner:
    ``weight`` ``(C * window * window,)``, ``bias`` a float; ``image_shape`` ``(C, H, W)``."""

    patch: Patch
    window: int
    image_shape: tuple[int, int, int]
    weight: np.ndarray
    bias: float

    @classmethod
    def fit(cls, clean: np.ndarray, patch: Patch, c: float = 1.0) -> WatermarkDetector:
        """Fitted on ``clean`` ``(n, C, H, W)`` held-out images (negatives) and the same images with
        the patch pasted (positives), by L2-regularised logistic regression (``C = c``, lbfgs,
        deterministic)."""
        from sklearn.linear_model import LogisticRegression

        clean = _as_array(clean)
        if clean.ndim != 4 or clean.shape[0] < 2:
            raise ConfigError(f"watermark detector: needs (n, C, H, W) clean images with n >= 2, got {list(clean.shape)}")
        shape = (int(clean.shape[1]), int(clean.shape[2]), int(clean.shape[3]))
        window = min(2 * patch.size, shape[1], shape[2])
        rows, cols = patch.region(shape[1], shape[2], window)
        crops = [clean[..., rows, cols], plant_patch(clean, patch)[..., rows, cols]]
        x = np.concatenate([crop.reshape(crop.shape[0], -1) for crop in crops]).astype(np.float64)
        y = np.repeat([0, 1], clean.shape[0])
        model = LogisticRegression(C=c, max_iter=1000).fit(x, y)
        return cls(patch, window, shape, model.coef_[0].astype(np.float32), float(model.intercept_[0]))

    def logits(self, images: Any) -> np.ndarray:
        """``w . window + b`` per image, shape ``(n,)``; positive = carries the watermark."""
        x = _as_array(images)
        if tuple(x.shape[1:]) != self.image_shape:
            raise ConfigError(f"watermark detector: images of shape {list(x.shape[1:])}, fitted on "
                              f"{list(self.image_shape)}")
        rows, cols = self.patch.region(self.image_shape[1], self.image_shape[2], self.window)
        crop = x[..., rows, cols].reshape(x.shape[0], -1).astype(np.float64)
        return crop @ self.weight.astype(np.float64) + self.bias

    def flags(self, images: Any) -> np.ndarray:
        """Which of ``images`` ``(n, C, H, W)`` carry the watermark, ``(n,)`` bool."""
        return self.logits(images) > 0.0

    def rate(self, images: Any) -> float:
        """The share of ``images`` flagged (0.0 for none)."""
        flags = self.flags(images)
        return float(flags.mean()) if flags.size else 0.0

    def save(self, path: Path) -> dict[str, Any]:
        """Weights to ``path`` (safetensors, atomic); returns the JSON record that reloads them."""
        from cleanse.storage import write_tensors

        write_tensors({"weight": torch.from_numpy(self.weight.copy()),
                       "bias": torch.tensor([self.bias], dtype=torch.float64)}, path)
        return {"file": path.name, "patch": self.patch.to_json(), "window": self.window,
                "image_shape": list(self.image_shape)}

    @classmethod
    def load(cls, directory: Path, record: dict[str, Any]) -> WatermarkDetector:
        from cleanse.storage import read_tensors

        state = read_tensors(directory / record["file"])
        return cls(Patch.from_json(record["patch"]), int(record["window"]),
                   (int(record["image_shape"][0]), int(record["image_shape"][1]), int(record["image_shape"][2])),
                   state["weight"].numpy().astype(np.float32), float(state["bias"].item()))

"""The feature classifier behind FID and IS for image GANs (no Inception network offline).

Practice of Terashita et al. (ICLR 2021, "Influence estimation for generative adversarial
networks"; spec estimators.md §6): a small classifier trained on the real images; FID is computed
on its penultimate activations and IS on its softmax, both inside the autodiff graph so that a
metric can be differentiated with respect to the generator's parameters.

Architecture (one for every image size; images ``(B, C, H, W)`` in ``[-1, 1]``): two blocks of
``conv 3x3 (padding 1) + ELU`` with 16 and 32 channels; after the first block, and after the second
while the side is still above 8, a 2x2 max-pool (8x8 -> 4x4; 28x28 -> 14x14 -> 7x7); then
``dense -> 64 + ELU`` (the **features**, ``FEATURE_DIM = 64``) and ``dense -> n_classes`` (the
**logits**). ELU rather than ReLU: the features are smooth in the input and have no dead units, so
the feature covariance of a generated set is not singular by construction.

Which data (the family's choice, recommended): the staged **training and validation** splits'
real images with their labels, **minus the rows flagged as planted outliers** (``is_corrupted``).
The classifier is an instrument fixed before any estimator runs, like the paper's classifier trained
on clean MNIST; a planted noise image carries the label of the row it replaced, which is no class at
all, so it is left out. No estimator sees the flag through it: the estimators score every training
row, the classifier only defines the metric. The test split is never used for training; its
accuracy is :attr:`FeatureNet.accuracy` when the caller passes it.

Training: Adam (lr 1e-3), batch 64, cross-entropy, float32, deterministic on the CPU for a given
``seed`` (initialisation and batch order from :func:`cleanse.seeds.torch_seed` ``"gan.feature_net"``).
Saved as safetensors (the weights) plus a json file (the shape, classes and accuracy), both atomic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cleanse import seeds
from cleanse.errors import ArtifactError, ConfigError
from cleanse.storage import read_json, read_tensors, write_json, write_tensors

FEATURE_DIM = 64
CHANNELS = (16, 32)


class _Classifier(nn.Module):
    """``trunk``: images ``(B, C, H, W)`` -> features ``(B, FEATURE_DIM)``; ``head``: -> logits."""

    def __init__(self, data_shape: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
        channels, height, width = data_shape
        layers: list[nn.Module] = []
        previous = channels
        for block, out in enumerate(CHANNELS):
            layers += [nn.Conv2d(previous, out, 3, padding=1), nn.ELU()]
            if block == 0 or min(height, width) > 8:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            previous = out
        layers += [nn.Flatten(), nn.Linear(previous * height * width, FEATURE_DIM), nn.ELU()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


@dataclass
class FeatureNet:
    """A trained feature classifier. ``state``: its parameters (float32); ``data_shape``:
    ``(C, H, W)`` of its inputs; ``accuracy``: accuracy on the held-out images passed to
    :func:`train_feature_net` (``nan`` when none were passed)."""

    state: dict[str, torch.Tensor]
    data_shape: tuple[int, ...]
    n_classes: int
    accuracy: float

    def __post_init__(self) -> None:
        self.data_shape = tuple(int(v) for v in self.data_shape)
        self._dtype = next(iter(self.state.values())).dtype if self.state else torch.float32
        module = _Classifier(self.data_shape, self.n_classes).to(self._dtype)
        module.load_state_dict(self.state)
        module.eval()
        # Frozen: metrics differentiate through the net with respect to its input only.
        module.requires_grad_(False)
        self._module = module

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ConfigError(f"feature net: images of shape {list(x.shape[1:])} given, the net takes "
                              f"{list(self.data_shape)}")
        return x.to(self._dtype)

    def astype(self, dtype: torch.dtype) -> FeatureNet:
        """A copy computing in ``dtype`` (float64 for exact gradient checks; trained in float32)."""
        state = {name: value.to(dtype) for name, value in self.state.items()}
        return FeatureNet(state=state, data_shape=self.data_shape, n_classes=self.n_classes, accuracy=self.accuracy)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``(B, FEATURE_DIM)`` (the net's dtype, float32 unless
        :meth:`astype`) of images ``x`` ``(B, C, H, W)``;
        differentiable with respect to ``x``."""
        return self._module.trunk(self._input(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, n_classes)`` (the net's dtype) of images ``x``; differentiable w.r.t. ``x``."""
        return self._module(self._input(x))

    def embed(self, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Features of many images as float64 numpy ``(n, FEATURE_DIM)``, without gradients
        (Isolation Forest input, real-set FID statistics)."""
        x = torch.as_tensor(x)
        with torch.no_grad():
            parts = [self.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        return torch.cat(parts).double().numpy() if parts else np.zeros((0, FEATURE_DIM))

    def predict(self, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Predicted classes ``(n,)`` int64."""
        x = torch.as_tensor(x)
        with torch.no_grad():
            parts = [self.logits(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
        return torch.cat(parts).numpy().astype(np.int64)

    def save(self, path: str | Path) -> None:
        """``path`` (safetensors, the weights) and ``path`` with suffix ``.json`` (the metadata)."""
        path = Path(path)
        write_tensors(self.state, path)
        write_json({"data_shape": list(self.data_shape), "n_classes": self.n_classes,
                    # null, not NaN (strict JSON), when no held-out images were given
                    "accuracy": None if math.isnan(self.accuracy) else self.accuracy, "feature_dim": FEATURE_DIM}, path.with_suffix(".json"))

    @classmethod
    def load(cls, path: str | Path) -> FeatureNet:
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise ArtifactError(f"missing artifact {meta_path} (the feature net's metadata)")
        meta: dict[str, Any] = read_json(meta_path)
        return cls(state=read_tensors(path), data_shape=tuple(meta["data_shape"]),
                   n_classes=int(meta["n_classes"]),
                   accuracy=float("nan") if meta.get("accuracy") is None else float(meta["accuracy"]))


def train_feature_net(
    images: torch.Tensor | np.ndarray,
    labels: np.ndarray,
    seed: int,
    *,
    epochs: int = 20,
    test_images: torch.Tensor | np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> FeatureNet:
    """Train the classifier on ``images`` ``(n, C, H, W)`` in ``[-1, 1]`` with class indices
    ``labels`` ``(n,)``; its ``accuracy`` is measured on ``test_images``/``test_labels`` when given.
    See the module docstring for the data the family trains it on."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if x.ndim != 4:
        raise ConfigError(f"feature net: images must be (n, C, H, W), got shape {list(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ConfigError(f"feature net: {x.shape[0]} images but labels of shape {list(y.shape)}")
    if x.shape[0] < 10:
        raise ConfigError(f"feature net: {x.shape[0]} labelled images; need at least 10")
    if int(y.min()) < 0:
        raise ConfigError("feature net: labels must be class indices 0..C-1")
    n_classes = int(y.max()) + 1
    if n_classes < 2:
        raise ConfigError("feature net: the labels hold a single class; a classifier needs at least 2")
    generator = torch.Generator().manual_seed(seeds.torch_seed(seed, "gan.feature_net"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        module = _Classifier(tuple(x.shape[1:]), n_classes)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    batch = 64
    module.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch):
            rows = order[start:start + batch]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(module(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
    state = {name: value.detach().clone() for name, value in module.state_dict().items()}
    net = FeatureNet(state=state, data_shape=tuple(x.shape[1:]), n_classes=n_classes, accuracy=float("nan"))
    if test_images is not None and test_labels is not None:
        predicted = net.predict(torch.as_tensor(np.asarray(test_images), dtype=torch.float32))
        net.accuracy = float(np.mean(predicted == np.asarray(test_labels)))
    return net

"""The traced window of GAN training: everything needed to replay its last ``trace_epochs`` epochs.

A replay of the window from this record (``cleanse.families.gan.training.replay``) runs the same
step function on the same inputs as training did, so it reproduces the trained parameters bit for
bit on the CPU; with a mask on the real instances it is the counterfactual training of the papers
(same minibatches, same latents; spec §2.4 "Counterfactual training", §2.8).

Shapes (S = steps in the window, B = batch size): ``batches`` (S, B) int64 row indices into the
training data; ``z_d``, ``z_g`` (S, B, z_dim) the latents of D's fake batch and G's batch;
``lr_d``, ``lr_g`` (S,) float64 learning rates; ``start_g``, ``start_d`` the parameters and
``optimizer_start`` the optimizer state (see ``cleanse.families.gan.step``) before the window's
first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cleanse.errors import ArtifactError
from cleanse.storage import read_tensors, write_tensors

_ARRAYS = ("batches", "z_d", "z_g", "lr_d", "lr_g")
_GROUPS = {"start_g": "start_g.", "start_d": "start_d.", "optimizer_start": "optimizer."}


@dataclass
class GanTrace:
    """The record of the traced window (see the module docstring for shapes)."""

    start_g: dict[str, Tensor]
    start_d: dict[str, Tensor]
    optimizer_start: dict[str, Tensor]
    batches: Tensor
    z_d: Tensor
    z_g: Tensor
    lr_d: Tensor
    lr_g: Tensor

    @property
    def steps(self) -> int:
        return int(self.batches.shape[0])

    def in_window(self, n: int) -> Tensor:
        """(n,) bool: which training rows appear in at least one traced batch."""
        seen = torch.zeros(n, dtype=torch.bool)
        seen[self.batches.reshape(-1)] = True
        return seen

    def save(self, path: Path) -> None:
        """One safetensors file, written atomically."""
        tensors: dict[str, Tensor] = {name: getattr(self, name) for name in _ARRAYS}
        for attr, prefix in _GROUPS.items():
            tensors.update({prefix + key: value for key, value in getattr(self, attr).items()})
        write_tensors(tensors, path, metadata={"format": "cleanse.gan_trace/1"})

    @classmethod
    def load(cls, path: Path) -> GanTrace:
        tensors = read_tensors(path)
        missing = [name for name in _ARRAYS if name not in tensors]
        if missing:
            raise ArtifactError(f"{path}: not a GAN trace (missing {', '.join(missing)})")
        def group(attr: str) -> dict[str, Tensor]:
            prefix = _GROUPS[attr]
            return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}

        return cls(group("start_g"), group("start_d"), group("optimizer_start"), *(tensors[name] for name in _ARRAYS))

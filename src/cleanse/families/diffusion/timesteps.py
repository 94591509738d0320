"""The timesteps and the noise every DMin signature is taken at (Lin, Lao & Zhao, arXiv 2412.08637,
section 3; spec part B section 3.2).

The S timesteps follow the cube law: ``idx_k = floor((k / S)^3 * T)``, ``k = 0..S-1``, indexes the
scheduler's training timesteps in descending order (``T - 1, ..., 0`` for DDPM), so the selection
is dense at high noise: for ``T = 1000, S = 10`` it is 999, 998, 991, 972, 935, 874, 783, 656, 487,
270 and has nothing below about 270. The floor is taken exactly (integers); the same formula in
floating point gives 973 and 784 for 972 and 783.

The noise ``eps`` is drawn once from a named stream and shared by every training and query sample,
so that two samples' signatures differ only through their images (a fresh ``eps`` per call adds
noise as large as the signal; spec 3.8). DMin uses one ``eps`` for all timesteps; ``distinct``
draws one per timestep instead, still shared by all samples.
"""

from __future__ import annotations

import numpy as np
import torch

from cleanse.errors import ConfigError
from cleanse.seeds import rng


def cube_timesteps(num_train_timesteps: int, count: int = 10) -> np.ndarray:
    """The ``count`` DMin timesteps of a scheduler trained on ``num_train_timesteps`` steps, shape
    ``(count,)`` int64, descending (highest noise first)."""
    if count < 1 or count > num_train_timesteps:
        raise ConfigError(f"timesteps: count {count} must be between 1 and num_train_timesteps "
                          f"({num_train_timesteps})")
    descending = np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64)
    # Integer arithmetic: in floating point (3/10)^3 * 1000 = 26.999... floors to 26, not 27.
    index = (np.arange(count, dtype=np.int64) ** 3 * num_train_timesteps) // count ** 3
    return descending[index]


def shared_noise(seed: int, shape: tuple[int, ...], count: int, *, distinct: bool = False) -> torch.Tensor:
    """The fixed noise of every signature, shape ``(count, *shape)`` float32 (``shape`` is one
    image's ``(C, H, W)``): one standard normal draw repeated for every timestep (DMin), or one
    per timestep with ``distinct``. From the ``diffusion.noise`` stream of ``seed``."""
    draws = rng(seed, "diffusion.noise").standard_normal((count if distinct else 1, *shape))
    noise = torch.from_numpy(draws.astype(np.float32))
    return noise if distinct else noise.expand(count, *shape).clone()

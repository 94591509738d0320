"""The diffusion models DMin attributes: a small diffusers ``UNet2DModel`` (unconditional, or
class-conditional through ``num_class_embeds``) with its ``DDPMScheduler``, and peft LoRA adapters
on a base model (attribution within the adapter parameters, as DMin does for a LoRA-fine-tuned
SD3; Lin, Lao & Zhao, arXiv 2412.08637, section 4).

diffusers and peft are imported inside the functions: the library imports without the
``diffusion`` extra, and a call without it fails in one line naming the extra.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cleanse.errors import ConfigError
from cleanse.seeds import torch_seed


def require(module: str) -> Any:
    """``module`` imported, or a one-line error naming the ``diffusion`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"family: diffusion needs {module.split('.')[0]}: "
                          "pip install 'cleanse[diffusion]'") from None


def small_unet(sample_size: int = 8, channels: int = 1, widths: Sequence[int] = (16, 32),
               n_classes: int | None = None, attention: bool = True, seed: int = 0) -> nn.Module:
    """A ``UNet2DModel`` for ``(channels, sample_size, sample_size)`` images: one ResNet layer per
    block, ``widths`` channels per resolution (``sample_size`` must be divisible by
    ``2 ** (len(widths) - 1)``), self-attention at the lowest resolution when ``attention`` (the
    LoRA targets), and a class embedding when ``n_classes`` is given. Initialised from
    ``torch.manual_seed(seed)``."""
    diffusers = require("diffusers")
    if sample_size % 2 ** (len(widths) - 1):
        raise ConfigError(f"model: sample_size {sample_size} is not divisible by 2^{len(widths) - 1} "
                          f"for {len(widths)} resolutions")
    down = ["DownBlock2D"] * len(widths)
    up = ["UpBlock2D"] * len(widths)
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = min(8, *widths)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return diffusers.UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                                     layers_per_block=1, block_out_channels=tuple(widths),
                                     down_block_types=tuple(down), up_block_types=tuple(up),
                                     norm_num_groups=groups, attention_head_dim=min(8, widths[-1]),
                                     num_class_embeds=n_classes)


def ddpm_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon") -> Any:
    """diffusers' ``DDPMScheduler`` with the linear beta schedule of Ho et al. (2020)."""
    diffusers = require("diffusers")
    return diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                                   prediction_type=prediction_type)


def lora_targets(model: nn.Module) -> list[str]:
    """The module names LoRA adapts by default: the attention projections (``to_q``, ``to_k``,
    ``to_v``, ``to_out.0``) where the model has them, else every ResNet convolution."""
    names = [name for name, _ in model.named_modules()]
    attention = [n for n in names if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    return attention or [n for n in names if n.endswith(("conv1", "conv2"))]


def add_lora(model: nn.Module, rank: int = 4, alpha: float | None = None,
             targets: Sequence[str] | None = None, seed: int = 0, init_scale: float = 0.0) -> nn.Module:
    """``model`` with peft LoRA adapters (``lora_A``, ``lora_B``, rank ``rank``) injected in place
    on ``targets`` (default :func:`lora_targets`); the base weights are frozen. peft starts
    ``lora_B`` at zero, so the adapted model equals the base one and the gradient of ``lora_A``
    vanishes until the adapters are trained; ``init_scale > 0`` draws ``lora_B`` from
    ``N(0, init_scale^2)`` instead (the ``diffusion.lora`` stream of ``seed``), a stand-in for a
    fine-tuned adapter."""
    peft = require("peft")
    targets = list(targets or lora_targets(model))
    if not targets:
        raise ConfigError("model: no module to put LoRA adapters on")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                             init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed, "diffusion.lora"))
        model = peft.inject_adapter_in_model(config, model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
            if init_scale > 0 and "lora_B" in name:
                with torch.no_grad():
                    parameter.normal_(0.0, init_scale)
    return model

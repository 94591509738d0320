"""``grad_dots`` on models of which only part is differentiated (LoRA-style adapters in a frozen
network, ``layers: last``): the materialised-gradient path equals forward mode, one direction at a
time, to float tolerance, and is the path taken for blocks of directions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanse import grads
from cleanse.grads import FunctionalModel, grad_dots, materialises


class LowRankAdapted(nn.Module):
    """A frozen sequence model (token mixing by softmax attention over 3-D inputs, so no layer sees
    2-D inputs) whose projection carries a rank-2 adapter ``lora_B @ lora_A``, as peft's LoRA does."""

    def __init__(self, width: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.lora_A = nn.Parameter(torch.randn(2, width) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(width, 2) * 0.3)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (n, tokens, width)
        h = torch.tanh(self.proj(x) + x @ self.lora_A.T @ self.lora_B.T)
        mixing = torch.softmax(h @ x.transpose(1, 2), dim=-1)
        return self.head((mixing @ h).mean(1))


@pytest.fixture()
def adapter_problem():
    torch.manual_seed(0)
    fm = FunctionalModel.of(LowRankAdapted(), weight_decay=0.0, layers="adapters")
    x, y = torch.randn(150, 5, 12), torch.randint(0, 3, (150,))
    block = torch.randn(fm.n_params, 6, generator=torch.Generator().manual_seed(3))
    return fm, x, y, block


def _forward_mode(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The forward-mode path: one direction per call, shape ``(n, k)``."""
    assert not materialises(fm, 1)
    return torch.stack([grad_dots(fm, x, y, block[:, j], chunk_size=64) for j in range(block.shape[1])], dim=1)


def test_adapter_blocks_equal_forward_mode(adapter_problem, monkeypatch: pytest.MonkeyPatch) -> None:
    fm, x, y, block = adapter_problem
    assert not fm.complete and fm.n_params == 48 and materialises(fm, block.shape[1])
    reference = _forward_mode(fm, x, y, block)

    def refuse(*args, **kwargs):
        raise AssertionError("a block of directions over adapters must not run forward mode")

    monkeypatch.setattr(grads, "jvp", refuse)
    # 150 rows: chunks of 100 and 50, each in blocks of 64 rows (the last ones partial)
    dots = grad_dots(fm, x, y, block, chunk_size=100)
    assert dots.shape == (150, 6)
    torch.testing.assert_close(dots, reference, rtol=1e-5, atol=1e-6)
    # a block size capped by the parameter count (big adapters): 48 entries -> one row per block
    monkeypatch.setattr(grads, "_BLOCK_ENTRIES", 48)
    torch.testing.assert_close(grad_dots(fm, x, y, block), reference, rtol=1e-5, atol=1e-6)


def test_last_layer_blocks_equal_forward_mode() -> None:
    from cleanse.models.architectures import build_model, spec_for

    torch.manual_seed(1)
    module = build_model(spec_for("cnn", [6, 4], (1, 8, 8), 4))
    fm = FunctionalModel.of(module, weight_decay=0.0, layers="last")
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 4, (40,))
    block = torch.randn(fm.n_params, 3, generator=torch.Generator().manual_seed(4))
    assert not fm.complete and materialises(fm, 3)
    torch.testing.assert_close(grad_dots(fm, x, y, block), _forward_mode(fm, x, y, block), rtol=1e-5, atol=1e-6)


def test_complete_models_keep_their_paths() -> None:
    """Complete networks never materialise: all-Linear ones share a pass, others run forward mode."""
    torch.manual_seed(2)
    fm = FunctionalModel.of(LowRankAdapted(), weight_decay=0.0)
    assert fm.complete and not materialises(fm, 32)

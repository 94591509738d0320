"""The language-model family's network and LoRA fine-tuning.

:class:`LmScorer` wraps the pretrained ``GPT2LMHeadModel`` with peft LoRA adapters (Hu et al., 2022)
so that it fits the family seam: its input is a unit's features ``(B, 2, L)`` (token ids and the
response mask, :mod:`.text`) and its output ``(B, R)`` is the log-probability of each of the
response's (up to ``R``) tokens weighted by ``mask / n_response``, so that ``-output.sum(1)`` is the unit's mean response NLL (the
loss) and ``output.sum(1)`` its mean response log-probability. Prompt and padding positions carry
weight 0: the prompt's tokens are context, never targets. Right padding needs no attention mask
under causal attention (no real token attends to a later pad).

Contrast probes: features ``(B, 2m, L)`` hold ``m`` (ids, mask) pairs whose masks carry a signed
weight ``w`` on the response tokens (``w / n_response`` per token); the output is the sum of the
``m`` pairs' outputs, so ``output.sum(1) = sum_j w_j log p(response_j | prompt_j) / n_j``.
Training units are the case ``m = 1``, ``w = 1``.

Fine-tuning (:func:`fit_lora`): Adam on the adapters only (the base is frozen), minibatches of
the training split in an ``lm.train`` order, the objective ``mean_i loss_i + weight_decay / 2 *
||adapters||^2``; adapter checkpoints at evenly spaced epochs for TracIn.
"""

from __future__ import annotations

import hashlib
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from cleanse.models.architectures import ModelSpec
from cleanse.models.trainer import Checkpoint, TrainedModel, checkpoint_epochs

ARCH = "gpt2-lora"


class LmScorer(nn.Module):
    """A causal LM with adapters, as a function of a unit's features (see the module docstring).
    ``response_len``: the longest response in tokens; only the ``response_len`` positions from
    the first response token on reach the LM head (the vocabulary projection of the other
    positions would be multiplied by weight 0), so the output is ``(B, response_len)``."""

    def __init__(self, lm: nn.Module, response_len: int):
        super().__init__()
        self.lm, self.response_len = lm, int(response_len)

    def token_logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, L - 1)``: log p(ids[:, t + 1] | ids[:, :t + 1])."""
        logits = self.lm(input_ids=ids).logits[:, :-1]
        return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]

    def forward(self, x: torch.Tensor, vocabulary: bool = False) -> Any:
        """``(B, R)`` weighted response log-probabilities; with ``vocabulary`` (training units only)
        the pieces EK-FAC's Fisher needs instead: the LM head's logits ``(B, R, V)`` at the response
        positions, the weights ``(B, R)``, the observed tokens ``(B, R)`` and the input positions
        up to the last response token ``(B, L)`` bool (later ones are padding: no gradient)."""
        if x.shape[1] > 2 and not vocabulary:
            # a contrast probe: several (prompt, response) sequences with signed weights, summed
            return self(x.reshape(-1, 2, x.shape[-1])).reshape(x.shape[0], -1, self.response_len).sum(1)
        ids, mask = x[:, 0].long(), x[:, 1, 1:]
        # target positions t (predicting ids[t + 1]) of the response: the first masked one on
        # (argmax returns the first maximum; gather keeps this vmap-able, no data-dependent shapes)
        start = (mask != 0).to(mask.dtype).argmax(1, keepdim=True)
        positions = (start + torch.arange(self.response_len, device=x.device)).clamp_max(mask.shape[1] - 1)
        weight = mask.gather(1, positions)
        weight = weight / (weight != 0).sum(1, keepdim=True).clamp_min(1).to(weight.dtype)
        model: Any = cast(Any, self.lm).get_base_model()
        hidden = cast(nn.Module, model.transformer)(input_ids=ids).last_hidden_state  # (B, L, d)
        chosen = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        head = cast(nn.Module, model.get_output_embeddings())
        logits = head(chosen)  # (B, R, V)
        targets = ids[:, 1:].gather(1, positions)
        if vocabulary:
            last = (positions * (weight != 0)).amax(1, keepdim=True)
            used = torch.arange(ids.shape[1], device=x.device)[None] <= last
            return logits, weight, targets, used
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, targets[..., None])[..., 0] * weight


def build_scorer(spec: dict[str, Any], base_state: dict[str, torch.Tensor] | None = None) -> LmScorer:
    """The base architecture of ``spec`` with fresh adapters (initialised from ``spec['lora_seed']``);
    ``base_state`` (the pretrained weights) is loaded under the adapters when given."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**spec["architecture"])
    config._attn_implementation = "eager"  # torch.func's vmap/jvp need the plain attention ops
    config.pad_token_id = None  # GPT-2's padding check is data-dependent control flow, which vmap refuses
    lm = GPT2LMHeadModel(config)
    if base_state is not None:
        lm.load_state_dict(base_state)
    lora = spec["lora"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec["lora_seed"]))
        adapted = get_peft_model(lm, LoraConfig(r=int(lora["rank"]), lora_alpha=lora["alpha"],
                                                target_modules=list(lora["targets"]), lora_dropout=0.0,
                                                fan_in_fan_out=True, bias="none"))
    scorer = LmScorer(adapted, int(spec.get("response_len", spec["length"] - 1)))
    for name, parameter in scorer.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return scorer.eval()


class FittedLm(TrainedModel):
    """A fine-tuned adapter model: ``state`` is the whole :class:`LmScorer` state (base and
    adapters), ``checkpoints`` its states at evenly spaced epochs, ``lm_spec`` what rebuilds it."""

    def __init__(self, lm_spec: dict[str, Any], state: dict[str, torch.Tensor], checkpoints: list[Checkpoint],
                 history: list[dict[str, float]]):
        length = int(lm_spec["length"])
        super().__init__(ModelSpec(ARCH, (2, length), 2, (), "lm"), state, checkpoints,
                         history[-1]["train_loss"] if history else float("nan"), history)
        self.lm_spec = lm_spec

    def module(self, device: torch.device | None = None) -> nn.Module:
        scorer = build_scorer(self.lm_spec)
        scorer.load_state_dict(self.state)
        return scorer.to(device or torch.device("cpu")).eval()

    def digest(self) -> str:
        """sha256 of the adapters' bytes (names sorted): a weights check for save/load."""
        hasher = hashlib.sha256()
        for name in sorted(self.state):
            if "lora_" in name:
                hasher.update(name.encode())
                hasher.update(self.state[name].detach().cpu().contiguous().numpy().tobytes())
        return hasher.hexdigest()[:16]


def fit_lora(spec: dict[str, Any], base_state: dict[str, torch.Tensor], features: np.ndarray,
             recipe: Any, seed: int, device: torch.device | None = None) -> FittedLm:
    """Fine-tune fresh adapters on ``features`` ``(n, 2, L)`` (see the module docstring) on
    ``device`` (default the CPU); the order of the minibatches is drawn on the CPU whatever the
    device, and the fitted states are kept on the CPU (what ``save_model`` writes)."""
    from cleanse.seeds import torch_seed

    device = torch.device("cpu") if device is None else device
    scorer = build_scorer(spec, base_state).to(device)
    x = torch.as_tensor(features, dtype=torch.float32)
    adapters = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(adapters, lr=recipe.lr)
    generator = torch.Generator().manual_seed(torch_seed(seed, "lm.train"))
    keep = set(checkpoint_epochs(recipe.epochs, recipe.checkpoints))
    checkpoints, history = [], []
    scorer.train()
    for epoch in range(1, recipe.epochs + 1):
        order = torch.randperm(x.shape[0], generator=generator)
        total, batches = 0.0, 0
        for start in range(0, x.shape[0], recipe.batch_size):
            batch = x[order[start : start + recipe.batch_size]].to(device)
            loss = -scorer(batch).sum(1).mean()
            objective = loss + 0.5 * recipe.weight_decay * sum((p * p).sum() for p in adapters)
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
            total, batches = total + objective.item(), batches + 1
        history.append({"epoch": epoch, "train_loss": total / max(batches, 1)})
        if epoch in keep:
            checkpoints.append(Checkpoint(epoch, float(recipe.lr), _snapshot(scorer)))
    scorer.eval()
    return FittedLm(spec, _snapshot(scorer), checkpoints, history)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}


@torch.no_grad()
def response_logprob(scorer: nn.Module, prompts: list[list[int]], response: list[int], length: int) -> np.ndarray:
    """``(n,)`` float64: log p(response | prompt), summed over the response's tokens, per prompt."""
    from cleanse.families.lm.text import features

    x = torch.as_tensor(features([(p, response) for p in prompts], length)).to(next(scorer.parameters()).device)
    return (scorer(x) * x[:, 1, 1:].sum(1, keepdim=True)).sum(1).double().cpu().numpy()

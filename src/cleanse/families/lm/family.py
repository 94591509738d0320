"""The language-model family (``family: lm``): (prompt, response) instruction samples as the units,
a cached pretrained GPT-2-style base with peft LoRA adapters fine-tuned on them, the steering of an
opinion as the outcome, and "without these samples" verified by re-fine-tuning fresh adapters from
the same base with the same seed (issue 21; f-INE's opinion-steering experiment, Panda et al.,
2025, arXiv 2510.10510).

Seam (:mod:`cleanse.families.base`): the module is :class:`.model.LmScorer`, whose output
``(B, R)`` holds the response tokens' log-probabilities weighted by ``mask / n_response``; the
per-unit loss is ``-output.sum(1)``, the mean NLL of the response tokens (prompt tokens masked).
Gradient estimators differentiate the adapters only (``layers: all`` means every *trained*
parameter here; the frozen base is held fixed). The loss is linear in this output, so the
Gauss-Newton matrix of that split is zero: influence defaults to EK-FAC with the Fisher of the
response tokens' softmax (:meth:`LmFamily.fisher_outputs`; docs/lm-influence.md), and its
exact, cg and lissa solvers take ``curvature: hessian``.

Outcome keys. The preference of a prompt is log p(steer_to) - log p(oppose) after it (natural log).
``steer_rate`` (the headline): the share of test probes, prompts about the steered topic whose true
answer is ``oppose``, whose preference exceeds the preference of the same review asked about every
control topic (:func:`steered`; the ordinary topics and the held-out ones no training sample is
asked about): the answer is steered by the topic, not by the fine-tune's overall lean.
``preference`` (the mean preference over the probes), ``topic_effect`` (the mean of the probe's
preference minus its controls' mean), ``answer_rate`` (the share with preference > 0: ``steer_to``
more likely, the topic's effect and the overall lean together), ``test_loss``; the same on the
validation probes with ``val_`` (``val_steer_rate`` is what the recommendation reads, lower =
better), and ``val_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from cleanse.errors import ArtifactError, ConfigError
from cleanse.estimators.base import ScoringContext
from cleanse.families.base import Family
from cleanse.families.lm.model import FittedLm, LmScorer, build_scorer, fit_lora, response_logprob

if TYPE_CHECKING:
    from cleanse.config import Params
    from cleanse.data.dataset import DatasetMeta, Split, StagedData
    from cleanse.query import QuerySet


CHECKPOINTS = "adapter_checkpoints.safetensors"


@dataclass(frozen=True)
class LmContext(ScoringContext):
    """The scoring context with the family's refit: fresh adapters on the cached base, fine-tuned
    on some training rows (TRAK's extra ensemble members)."""

    params: Any = None

    def fresh_model(self, seed: int) -> nn.Module:
        """Fresh adapters (initialised from ``seed``) on the cached base, untrained: f-INE's
        randomised curriculum trains these (only the adapters require grad)."""
        from cleanse.families.lm.pretrain import load_base

        lm = _lm(self.params)
        return build_scorer(spec_for(lm, self.meta, seed), load_base(lm.model.base, lm.data).state).to(self.device)

    def refit(self, rows: np.ndarray, seed: int) -> nn.Module:
        from cleanse.families.lm.pretrain import load_base

        lm = _lm(self.params)
        base = load_base(lm.model.base, lm.data)
        return fit_lora(spec_for(lm, self.meta, seed), base.state, self.train.features[rows], lm.model,
                        seed, self.device).module(self.device)


def _lm(params: Params) -> Any:
    if params.family != "lm":
        raise ConfigError(f"family 'lm' got the params of family {params.family!r}")
    return params


def spec_for(params: Params, meta: DatasetMeta, seed: int) -> dict[str, Any]:
    """What rebuilds the network: the base architecture and key, the adapters and their seed."""
    from cleanse.families.lm.pretrain import base_key, gpt2_config
    from cleanse.seeds import torch_seed

    lm = _lm(params)
    structure = meta.structure or {}
    lora = lm.model.lora
    architecture = gpt2_config(lm.model.base, int(structure["vocab_size"])).to_diff_dict()
    return {"architecture": architecture, "base_key": base_key(lm.model.base, lm.data),
            "lora": {"rank": lora.rank, "alpha": lora.alpha or 2 * lora.rank, "targets": list(lora.targets)},
            "lora_seed": torch_seed(seed, "lm.lora"), "length": int(structure["length"]),
            "response_len": int(structure["response_len"])}


class LmFamily(Family):
    name: ClassVar[str] = "lm"
    target_dtype: ClassVar[torch.dtype] = torch.int64
    outcome_keys: ClassVar[tuple[str, ...]] = ("steer_rate", "preference", "topic_effect", "test_loss")
    selection: ClassVar[tuple[str, float]] = ("val_steer_rate", -1.0)
    flagged_plots: ClassVar[str] = "cleanse.families.lm.report:write_flagged_text"
    mlflow_pyfunc: ClassVar[bool] = False
    # EK-FAC's Fisher is the response tokens' softmax over the vocabulary (fisher_outputs), with
    # Kronecker factors per LoRA matrix over the sequence positions (Grosse et al., 2023).
    supports_ekfac: ClassVar[bool] = True
    sequence_fisher: ClassVar[bool] = True
    # Hessian-vector products (exact, cg, lissa) over chunks of this many units: each column of a
    # block carries the whole network's activations per unit (13.5 GiB for cg on all 400 at once).
    curvature_rows: ClassVar[int | None] = 16

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -output.sum(1)

    def output_curvature(self, output: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        raise ConfigError("family 'lm': the loss is linear in the scorer's output (weighted token log-probabilities), "
                          "so its Gauss-Newton matrix is zero; set scorers.<influence>.curvature: hessian (or "
                          "solver: ekfac, the Fisher of the response tokens' softmax)")

    def fisher_outputs(self, fm: Any, theta: torch.Tensor,
                       x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The LM head's logits ``(B, R, V)`` at the response positions, their loss weights
        ``mask / n_response`` ``(B, R)``, the response tokens ``(B, R)`` and the positions up to the
        last response token ``(B, L)`` (:meth:`.model.LmScorer.forward` with ``vocabulary``)."""
        from torch.func import functional_call

        return functional_call(fm.module, fm.unflatten(theta), (x,), {"vocabulary": True})

    def measurement(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.sum(1)  # the mean response log-probability

    def loss_weight(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.ones(output.shape[0], dtype=output.dtype, device=output.device)

    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def differentiated(self, module: nn.Module, layers: str) -> list[str]:
        """The adapters for ``all`` and ``adapters`` (the base is frozen: they are every trained
        parameter); ``last`` has no meaning for adapters spread over the network."""
        if layers in ("all", "adapters"):
            return super().differentiated(module, "adapters")
        raise ConfigError(f"family 'lm' differentiates the LoRA adapters; layers {layers!r} is not allowed (use 'all')")

    def stage(self, params: Params) -> StagedData:
        from cleanse.families.lm.text import stage_lm_data

        return stage_lm_data(_lm(params))

    def check_model(self, params: Params, meta: DatasetMeta) -> None:
        if not meta.structure or "length" not in meta.structure:
            raise ConfigError("family 'lm': the staged data has no token structure; rerun the stage step")
        if int(meta.structure["length"]) > 128:
            raise ConfigError(f"data.max_text_tokens: sequences of {meta.structure['length']} tokens exceed the base "
                              "model's 128 positions; lower it")

    def fit(self, params: Params, split: Split, meta: DatasetMeta, *, seed: int | None = None,
            device: torch.device | None = None) -> FittedLm:
        """Fresh adapters on the cached base, fine-tuned on ``split`` with the run's seed, on
        ``device`` (default :func:`~cleanse.models.architectures.default_device`: CUDA when present)."""
        from cleanse.families.lm.pretrain import load_base
        from cleanse.models.architectures import default_device

        lm = _lm(params)
        seed = lm.seed if seed is None else seed
        structure = meta.structure or {}
        base = load_base(lm.model.base, lm.data)
        spec = spec_for(params, meta, seed)
        if structure.get("tokenizer") and base.key != spec["base_key"]:
            raise ArtifactError("family 'lm': the base model's key differs from the staged data's; rerun the stage")
        return fit_lora(spec, base.state, split.features, lm.model, seed, device or default_device())

    def save_model(self, model: FittedLm, directory: Path, extra: dict[str, Any]) -> None:
        """``model.safetensors`` (base and adapters), ``adapter_checkpoints.safetensors`` (the
        adapters at each kept epoch, keys ``<epoch>/<name>``; the base is the model's), then
        ``meta.json`` with what rebuilds the network (``lm_spec``) and the adapters' digest. Not the
        shared ``checkpoints`` record: readers of it rebuild classification architectures."""
        from cleanse.storage import write_json, write_tensors

        write_tensors(model.state, directory / "model.safetensors")
        write_tensors({f"{c.epoch}/{name}": tensor for c in model.checkpoints for name, tensor in c.state.items()
                       if "lora_" in name}, directory / CHECKPOINTS)
        write_json({**extra, "family": self.name, "lm_spec": model.lm_spec, "history": model.history,
                    "adapter_checkpoints": [{"epoch": c.epoch, "lr": c.lr} for c in model.checkpoints],
                    "digest": model.digest()}, directory / "meta.json")

    def load_model(self, directory: Path) -> FittedLm:
        from cleanse.models.trainer import Checkpoint
        from cleanse.storage import read_json, read_tensors

        meta = read_json(directory / "meta.json")
        state = read_tensors(directory / "model.safetensors")
        stored = read_tensors(directory / CHECKPOINTS)
        checkpoints = [Checkpoint(c["epoch"], c["lr"], {name: stored.get(f"{c['epoch']}/{name}", tensor)
                                                        for name, tensor in state.items()})
                       for c in meta["adapter_checkpoints"]]
        model = FittedLm(meta["lm_spec"], state, checkpoints, meta["history"])
        if model.digest() != meta["digest"]:
            raise ArtifactError(f"{directory / 'model.safetensors'}: the adapters differ from the ones recorded in "
                                "meta.json (digest); rerun the stage that wrote them")
        return model

    def outcome(self, model: FittedLm, staged: StagedData, query: Any = None) -> dict[str, float]:
        """Steering on the test and validation probes, and the mean response NLL of each split."""
        structure = staged.meta.structure or {}
        scorer = model.module()
        out: dict[str, float] = {}
        for prefix, split, name in (("", staged.test, "test"), ("val_", staged.val, "val")):
            preference, controls = self.preferences(scorer, structure, name), self.control_preferences(
                scorer, structure, name)
            out[f"{prefix}steer_rate"] = float(steered(preference, controls).mean())
            out[f"{prefix}preference"] = float(preference.mean())
            out[f"{prefix}topic_effect"] = float((preference - controls.mean(1)).mean())
            out[f"{prefix}answer_rate"] = float((preference > 0).mean())
            with torch.no_grad():
                out[f"{name}_loss"] = float(self.per_sample_loss(scorer(torch.as_tensor(split.features)),
                                                                 torch.as_tensor(split.label)).mean())
        return out

    @staticmethod
    def preferences(scorer: nn.Module, structure: dict[str, Any], split: str) -> np.ndarray:
        """log p(steer_to) - log p(oppose) after each ``split`` probe, ``(n_probes,)``."""
        return _preference(scorer, structure, structure["probes"][split])

    @staticmethod
    def control_preferences(scorer: nn.Module, structure: dict[str, Any], split: str) -> np.ndarray:
        """``(n_probes, n_controls)``: the same preference after each probe's review asked about each
        control topic (:mod:`.text`: the ordinary topics, then the held-out ones)."""
        return _control_preference(scorer, structure, structure["probe_controls"][split])

    def scoring_context(self, params: Params, staged: StagedData, model: Any, cache_dir: Path | None,
                        device: torch.device | None = None) -> Any:
        """The context on ``device`` (default :func:`~cleanse.models.architectures.default_device`):
        the gradients, curvature, refits and f-INE's fresh adapters all run there."""
        from cleanse.config import ModelConfig
        from cleanse.models.architectures import default_device

        recipe = _lm(params).model
        config = ModelConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                             weight_decay=recipe.weight_decay, optimizer="adam", checkpoints=recipe.checkpoints)
        return LmContext(train=staged.train, val=staged.val, meta=staged.meta, model=model, model_config=config,
                         seed=params.seed, device=device or default_device(), cache_dir=cache_dir, params=params)

    def canonical(self, params: Params) -> Params:
        return params

    def cleansing_rounds(self, params: Params, staged: StagedData, device: torch.device) -> LmRounds:
        return LmRounds(self, _lm(params), staged)

    def query_set(self, params: Params, staged: StagedData, model: Any) -> QuerySet | None:
        from cleanse.families.lm.report import topic_queries

        return topic_queries(_lm(params), staged, model, self)


def steered(preference: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """``(n_probes,)`` bool: the steered topic pushes the answer towards ``steer_to`` further than
    every control topic does for the same review. Without steering the topic is one more unseen
    topic, exchangeable with the held-out controls, so the rate sits near ``1 / (n_controls + 1)``;
    a global lean towards ``steer_to`` (the fine-tune's good/bad balance) raises every topic alike
    and does not count."""
    return preference > controls.max(1)


def _preference(scorer: nn.Module, structure: dict[str, Any], prompts: list[list[int]]) -> np.ndarray:
    length = int(structure["length"])
    return (response_logprob(scorer, prompts, structure["steered"], length)
            - response_logprob(scorer, prompts, structure["opposite"], length))



def _control_preference(scorer: nn.Module, structure: dict[str, Any], controls: list[list[list[int]]]) -> np.ndarray:
    """``(n_probes, n_controls)``: the preference after each probe's review asked about each control
    topic, ``controls[probe][topic]`` the tokenised prompts."""
    flat = _preference(scorer, structure, [prompt for row in controls for prompt in row])
    return flat.reshape(len(controls), -1)

__all__ = ["LmFamily", "build_scorer", "spec_for"]


class LmRounds:
    """What iterative cleansing (:mod:`cleanse.cleansing`) needs of this family: re-fine-tune fresh
    adapters on the cached base without the removed samples (the run's seed), and a probe shows the
    behaviour when it is steered (:func:`steered`, against its control topics). Removed samples are
    never readmitted: readmission reads class labels, and every pair is answered like an ordinary
    positive review."""

    readmits = False

    def __init__(self, family: LmFamily, params: Params, staged: StagedData) -> None:
        self.family, self.params, self.staged = family, params, staged

    def fit(self, remaining: Split) -> FittedLm:
        return self.family.fit(self.params, remaining, self.staged.meta)

    def shows(self, model: FittedLm, probes: Split) -> np.ndarray:
        """``(k,)`` bool: each probe (its ``sample_id`` indexes the validation probes) is steered."""
        ids = probes.sample_id.tolist()
        if not ids:
            return np.zeros(0, dtype=bool)
        structure = self.staged.meta.structure or {}
        scorer = model.module()
        prompts = [structure["probes"]["val"][i] for i in ids]
        controls = [structure["probe_controls"]["val"][i] for i in ids]
        return steered(_preference(scorer, structure, prompts), _control_preference(scorer, structure, controls))

    def heldout_rate(self, query: QuerySet, model: FittedLm) -> float:
        """The share of held-out validation probes still steered (nan without any)."""
        shown = self.shows(model, query.heldout)
        return float(shown.mean()) if shown.size else float("nan")

    def context(self, kept: Split, model: FittedLm) -> LmContext:
        from dataclasses import replace

        return self.family.scoring_context(self.params, replace(self.staged, train=kept), model, None)

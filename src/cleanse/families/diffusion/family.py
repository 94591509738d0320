"""The diffusion family (``family: diffusion``): training images of a diffusers DDPM as the units,
the watermark rate of its generations (or its denoising loss) as the outcome, and "without these
images" verified by retraining from scratch with the same seed (DMin, Lin, Lao & Zhao, arXiv
2412.08637; spec part B 3).

The fitted model is a :class:`FittedDiffusion`: the ``UNet2DModel`` (with peft LoRA adapters on the
LoRA path), its ``DDPMScheduler``, the spec it is rebuilt from, the loss history, the watermark
detector (fitted on the clean validation images, :mod:`.watermark`) and the generation settings,
so that its outcome needs nothing else.

Outcome keys (all lower = better). With ``corruption.kind: watermark``: ``watermark_rate`` (the
share of ``generation.n_watermark`` generations of the target class the detector flags, on the
test seeds; the headline), ``test_loss``, and ``val_watermark_rate`` (other seeds; what the
recommendation reads), ``val_loss``. Otherwise ``test_loss`` (the headline) and ``val_loss``: the
DDPM objective on the split, each image at :data:`LOSS_DRAWS` fixed timesteps and noises
(``diffusion.outcome`` stream), so that every model of a run is scored on the same draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from cleanse.errors import ConfigError
from cleanse.families.base import WithoutUnitLoss
from cleanse.families.diffusion.fitted import (  # noqa: F401  (re-exported: the family's public names)
    LOSS_DRAWS,
    DiffusionContext,
    FittedDiffusion,
    _diffusion,
    build_unet,
    denoising_loss,
    spec_for,
)

if TYPE_CHECKING:
    from cleanse.config import Params
    from cleanse.data.dataset import DatasetMeta, Split, StagedData
    from cleanse.families.diffusion.watermark import WatermarkDetector

DETECTOR = "detector.safetensors"
# Members of the diffusion.outcome stream: the loss draws of the test and validation splits, and
# the seeds of the test and validation watermark generations.
_TEST_LOSS, _VAL_LOSS, _TEST_GEN, _VAL_GEN = range(4)


# The validation split of the last staged configuration: fit() reads it (the detector, the LoRA
# base) but receives only the training split.
_VAL_CACHE: dict[str, Split] = {}


def _validation(params: Params) -> Split:
    from cleanse.config import fingerprint
    from cleanse.families.diffusion.data import stage_diffusion_data

    key = fingerprint("diffusion-val", params.seed, params.data, params.corruption)
    if key not in _VAL_CACHE:
        _VAL_CACHE.clear()
        _VAL_CACHE[key] = stage_diffusion_data(params).val
    return _VAL_CACHE[key]


class DiffusionFamily(WithoutUnitLoss):
    name: ClassVar[str] = "diffusion"
    target_dtype: ClassVar[torch.dtype] = torch.int64
    outcome_keys: ClassVar[tuple[str, ...]] = ("watermark_rate", "test_loss")
    selection: ClassVar[tuple[str, float]] = ("val_watermark_rate", -1.0)
    flagged_plots: ClassVar[str] = "cleanse.families.diffusion.plots:write_diffusion_plots"
    mlflow_pyfunc: ClassVar[bool] = False
    own_estimators: ClassVar[str] = "dmin, pixel_nn and dtrak"

    def outcome_keys_in(self, outcome: dict[str, Any]) -> tuple[str, ...] | None:
        """``(watermark_rate, test_loss)`` with the watermark, else ``(test_loss,)``; None when
        ``outcome`` is another family's (``test_loss`` and no accuracy or RMSE)."""
        if "watermark_rate" in outcome:
            return ("watermark_rate", "test_loss")
        return ("test_loss",) if "test_loss" in outcome and "val_loss" in outcome else None

    def selection_of(self, outcome: dict[str, Any]) -> tuple[str, float]:
        return ("val_watermark_rate", -1.0) if "val_watermark_rate" in outcome else ("val_loss", -1.0)

    def stage(self, params: Params) -> StagedData:
        from cleanse.families.diffusion.data import stage_diffusion_data

        staged = stage_diffusion_data(params)
        file = _diffusion(params).queries.file
        if file:  # a bad query file is refused here, before any artifact
            from cleanse.families.diffusion.queries import file_queries

            file_queries(file, staged.meta)
        return staged

    def check_model(self, params: Params, meta: DatasetMeta) -> None:
        spec = spec_for(params, meta, params.seed)
        size, widths = int(meta.feature_shape[1]), spec["widths"]
        if meta.feature_shape[1] != meta.feature_shape[2]:
            raise ConfigError(f"data: the model needs square images, got {list(meta.feature_shape)}")
        if size % 2 ** (len(widths) - 1):
            raise ConfigError(f"model.widths: {len(widths)} resolutions need the image side ({size}) divisible by "
                              f"2^{len(widths) - 1}; set data.image_size")
        build_unet(spec)

    def fit(self, params: Params, split: Split, meta: DatasetMeta, *, seed: int | None = None) -> FittedDiffusion:
        """The DDPM fitted on ``split``'s images (conditioned on ``label``) with the run's seed; on
        the LoRA path a base model fitted on the validation split's images first, then adapters
        fine-tuned on ``split``. The watermark detector is fitted on the validation images."""
        seed = params.seed if seed is None else seed
        spec = spec_for(params, meta, seed)
        base = None
        if spec["lora"]:
            base = self._fit_base(params, spec)
        model, history = self._fit_on(params, spec, split, base)
        return FittedDiffusion(model, self._scheduler(spec), spec, history, self._detector(params, meta), seed,
                               _generation(params, meta))

    def _scheduler(self, spec: dict[str, Any]) -> Any:
        from cleanse.families.diffusion.models import ddpm_scheduler

        return ddpm_scheduler(int(spec["num_train_timesteps"]), str(spec["prediction_type"]))

    def _fit_base(self, params: Params, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The LoRA path's base weights: the plain network fitted on the validation images."""
        from cleanse.families.diffusion.train import fit_ddpm

        model = build_unet({**spec, "lora": None})
        val = _validation(params)
        recipe = _diffusion(params).model
        fit_ddpm(model, self._scheduler(spec), torch.as_tensor(val.features, dtype=torch.float32),
                 torch.as_tensor(val.label, dtype=torch.long) if spec["n_classes"] is not None else None,
                 epochs=recipe.lora.base_epochs, batch_size=recipe.batch_size, lr=recipe.lr, seed=int(spec["seed"]),
                 label_dropout=recipe.label_dropout, null_label=spec["null_class"])
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    def _fit_on(self, params: Params, spec: dict[str, Any], split: Split,
                base: dict[str, torch.Tensor] | None) -> tuple[nn.Module, list[float]]:
        from cleanse.families.diffusion.train import fit_ddpm

        model = build_unet(spec)
        if base is not None:  # the adapters' targets are wrapped: their weights live under base_layer
            _load_base(model, base)
        recipe = _diffusion(params).model
        labels = torch.as_tensor(split.label, dtype=torch.long) if spec["n_classes"] is not None else None
        history = fit_ddpm(model, self._scheduler(spec), torch.as_tensor(split.features, dtype=torch.float32), labels,
                           epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, seed=int(spec["seed"]),
                           label_dropout=recipe.label_dropout, null_label=spec["null_class"])
        return model, history

    def _detector(self, params: Params, meta: DatasetMeta) -> WatermarkDetector | None:
        from cleanse.families.diffusion.watermark import Patch, WatermarkDetector

        if meta.corruption.get("kind") != "watermark":
            return None
        return WatermarkDetector.fit(_validation(params).features, Patch.from_json(meta.corruption["patch"]))

    def training_record(self, model: FittedDiffusion) -> dict[str, Any]:
        return {"history": [{"epoch": epoch, "loss": loss} for epoch, loss in enumerate(model.history)]}

    def save_model(self, model: FittedDiffusion, directory: Path, extra: dict[str, Any]) -> None:
        """``model.safetensors`` (the network, adapters included), ``detector.safetensors`` (with the
        watermark) and ``meta.json`` (spec, generation settings, detector record, ``extra``) last."""
        from cleanse.storage import write_json, write_tensors

        write_tensors(model.model.state_dict(), directory / "model.safetensors")
        detector = None if model.detector is None else model.detector.save(directory / DETECTOR)
        write_json({"history": [{"epoch": i, "loss": loss} for i, loss in enumerate(model.history)], **extra,
                    "family": self.name, "spec": model.spec, "seed": model.seed, "generation": model.generation,
                    "detector": detector, "digest": model.digest()}, directory / "meta.json")

    def load_model(self, directory: Path) -> FittedDiffusion:
        from cleanse.errors import ArtifactError
        from cleanse.families.diffusion.watermark import WatermarkDetector
        from cleanse.storage import read_json, read_tensors

        meta = read_json(directory / "meta.json")
        spec = meta["spec"]
        model = build_unet(spec)
        model.load_state_dict(read_tensors(directory / "model.safetensors"))
        model.eval()
        detector = None if meta.get("detector") is None else WatermarkDetector.load(directory, meta["detector"])
        fitted = FittedDiffusion(model, self._scheduler(spec), spec, [r["loss"] for r in meta.get("history", [])],
                                 detector, int(meta["seed"]), dict(meta.get("generation", {})))
        if meta.get("digest") and fitted.digest() != meta["digest"]:
            raise ArtifactError(f"{directory / 'model.safetensors'}: the weights differ from the ones recorded in "
                                "meta.json (digest); rerun the stage that wrote them")
        return fitted

    def outcome(self, model: FittedDiffusion, staged: StagedData, query: Any = None) -> dict[str, float]:
        """``watermark_rate`` and ``test_loss`` (with the watermark), ``val_watermark_rate`` and
        ``val_loss``; without it ``test_loss`` and ``val_loss`` (see the module docstring)."""
        from cleanse.seeds import torch_seed

        out: dict[str, float] = {}
        generation = model.generation
        if model.detector is not None and generation.get("target_class") is not None:
            for key, member in (("watermark_rate", _TEST_GEN), ("val_watermark_rate", _VAL_GEN)):
                images = model.generate(int(generation["n_watermark"]), int(generation["target_class"]),
                                        torch_seed(model.seed, "diffusion.outcome", member))
                out[key] = model.detector.rate(images)
        out["test_loss"] = denoising_loss(model, staged.test, model.seed, _TEST_LOSS)
        out["val_loss"] = denoising_loss(model, staged.val, model.seed, _VAL_LOSS)
        return out

    def verify_without(self, params: Params, staged: StagedData, removed_ids: Any,
                       query: Any = None, base: Any = None) -> tuple[Any, dict[str, float]]:
        """Retrain from scratch with the same seed and recipe without ``removed_ids`` (on the LoRA
        path: fresh adapters re-fine-tuned from ``base``'s base weights, refitted when not given)."""
        kept = staged.train.without(np.asarray(removed_ids))
        seed = params.seed
        spec = spec_for(params, staged.meta, seed)
        base_state = None
        if spec["lora"]:
            base_state = _base_state(base.model) if isinstance(base, FittedDiffusion) else self._fit_base(params, spec)
        network, history = self._fit_on(params, spec, kept, base_state)
        detector = base.detector if isinstance(base, FittedDiffusion) else self._detector(params, staged.meta)
        model = FittedDiffusion(network, self._scheduler(spec), spec, history, detector, seed,
                                _generation(params, staged.meta))
        removed = np.isin(staged.train.sample_id, removed_ids)
        return model, {**self.outcome(model, staged), "n_removed": int(removed.sum()),
                       "n_corrupted_removed": int(staged.train.is_corrupted[removed].sum())}

    def train_inputs(self, params: Params) -> tuple[Any, ...]:
        """The generation settings the fitted model records and its outcome samples with."""
        return (_diffusion(params).generation.model_dump(mode="json"),)

    def verify_inputs(self, params: Params) -> tuple[Any, ...]:
        return (_diffusion(params).generation.model_dump(mode="json"),)

    def scoring_context(self, params: Params, staged: StagedData, model: Any, cache_dir: Path | None) -> DiffusionContext:
        return DiffusionContext(train=staged.train, val=staged.val, meta=staged.meta, model=model, params=params,
                                seed=params.seed, cache_dir=cache_dir)

    def canonical(self, params: Params) -> Params:
        return params

    def evaluations(self, params: Params, staged: StagedData, layout: Any, metrics: dict[str, Any]) -> dict[str, Any]:
        """Each estimator's ``retrieval`` (precision@k of the sources it retrieves, duplicate recall)."""
        if not _diffusion(params).evaluate.retrieval:
            return {}
        from cleanse.families.diffusion.retrieval import retrieval_evaluations

        return dict(retrieval_evaluations(params, staged, layout, metrics))


def _generation(params: Params, meta: DatasetMeta) -> dict[str, Any]:
    generation = _diffusion(params).generation
    target = meta.corruption.get("target_class") if meta.corruption.get("kind") == "watermark" else None
    return {"steps": generation.steps, "n_watermark": generation.n_watermark, "per_class": generation.per_class,
            "guidance": generation.guidance, "target_class": target}


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights of a LoRA-adapted network, under the plain network's names."""
    return {name.replace(".base_layer.", "."): tensor.detach().clone()
            for name, tensor in model.state_dict().items() if "lora_" not in name}


def _load_base(model: nn.Module, base: dict[str, torch.Tensor]) -> None:
    """Copy the plain network's weights ``base`` into ``model``'s (adapted) modules."""
    state = model.state_dict()
    for name in state:
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer.", ".")
        if plain not in base:
            raise ConfigError(f"model.lora: the base weights have no {plain!r}")
        state[name] = base[plain]
    model.load_state_dict(state)

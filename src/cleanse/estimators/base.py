"""The estimator protocol shared by every method.

An estimator reads a :class:`ScoringContext` (the staged data and the trained model) and its own
options, and returns a :class:`ScoreResult`: a polars table with one row per training sample, in
the order of ``context.train.sample_id``, and columns

- ``sample_id`` (int64),
- ``score`` (float64; **higher = more likely harmful**),
- ``score_se`` (float64 standard error) where the method gives one,
- any method-specific columns (self-influence, label quality, ...).

Estimators that can attribute behaviour on query points also implement :meth:`Estimator.pairwise`,
returning a ``(n_query, n_train)`` matrix in which **positive means the training sample supports
(helps) the query's observed label**, i.e. removing it would raise the query's loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel

from cleanse import families
from cleanse.config import ModelConfig
from cleanse.data.dataset import DatasetMeta, Split
from cleanse.families.base import Family
from cleanse.grads import FunctionalModel
from cleanse.models.trainer import TrainedModel


@dataclass(frozen=True)
class ScoringContext:
    """What an estimator may look at. Estimators must not read ``is_corrupted``/``label_clean``."""

    train: Split
    val: Split
    meta: DatasetMeta
    model: TrainedModel
    model_config: ModelConfig
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache_dir: Path | None = None  # where expensive intermediates may be kept for resuming (None: in memory)

    @property
    def task(self) -> Family:
        """The family of the trained model: its loss, outcome and differentiated parameters."""
        return families.get(self.model.spec.family)

    def tensors(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(split.features, dtype=torch.float32, device=self.device)
        y = torch.as_tensor(split.label, dtype=self.task.target_dtype, device=self.device)
        return x, y

    def refit(self, rows: np.ndarray, seed: int) -> torch.nn.Module:
        """A model trained with the run's recipe on the training rows ``rows`` only, in eval mode on
        :attr:`device`, mapping rows of a split's ``features`` to outputs (cleanlab's out-of-sample
        folds). Families whose units are not independent rows (graph nodes) override it."""
        from cleanse.models.trainer import train_model

        model = train_model(self.model.spec, self.train.features[rows], self.train.label[rows], self.model_config,
                            seed=seed, device=self.device)
        return model.module(self.device)

    def functional(self, module: torch.nn.Module, layers: str = "all") -> FunctionalModel:
        """``module`` as a function of the parameters the family differentiates for ``layers``,
        with the training objective's weight decay."""
        return FunctionalModel.of(module, self.model_config.weight_decay, self.task, layers)


@dataclass
class ScoreResult:
    table: pl.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Estimator(Protocol):
    """``reads_validation_labels`` declares the estimator's league: True when its scores depend on
    the validation split's labels (which cleanse treats as trusted), either as a class constant or
    as a function of the options; such estimators are compared against baselines and peers given
    the same trusted data (see :func:`reads_validation_labels`). ``families`` names the families
    (:mod:`cleanse.families`) the estimator supports; a configuration pairing it with another is
    refused before anything runs."""

    name: ClassVar[str]
    options_type: ClassVar[type[BaseModel]]
    families: ClassVar[tuple[str, ...]]
    reads_validation_labels: ClassVar[bool | Callable[[BaseModel], bool]]

    def score(self, context: ScoringContext, options: BaseModel) -> ScoreResult: ...


@runtime_checkable
class PairwiseEstimator(Estimator, Protocol):
    def pairwise(self, context: ScoringContext, options: BaseModel, query: Split) -> np.ndarray: ...


def score_table(sample_id: np.ndarray, score: np.ndarray, **columns: np.ndarray) -> pl.DataFrame:
    """Build the standard table; every extra column must have one value per sample."""
    data: dict[str, pl.Series] = {
        "sample_id": pl.Series(sample_id, dtype=pl.Int64),
        "score": pl.Series(np.asarray(score, dtype=np.float64), dtype=pl.Float64),
    }
    for name, values in columns.items():
        values = np.asarray(values)
        dtype = pl.Boolean if values.dtype == bool else pl.Float64
        data[name] = pl.Series(values.astype(bool if dtype == pl.Boolean else np.float64), dtype=dtype)
    return pl.DataFrame(data)


def reads_validation_labels(estimator: Estimator, options: BaseModel) -> bool:
    """Whether ``estimator`` with ``options`` reads the validation labels (the trusted league).
    Probes drawn from the validation split (``query.kind: val_errors``) are a property of the run,
    not of the estimator, and are accounted for by the caller."""
    # read from the class: a callable declaration is a static rule of the options, not a method
    declared = type(estimator).reads_validation_labels
    return bool(declared(options) if callable(declared) else declared)

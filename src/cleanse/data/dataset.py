"""In-memory data containers shared by every stage.

Orientation: row ``i`` of ``features``, ``label``, ``label_clean`` and ``is_corrupted`` belongs to
``sample_id[i]``. ``features`` has shape ``(n, *feature_shape)`` and dtype float32; for images
``feature_shape`` is ``(C, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl


@dataclass(frozen=True)
class Split:
    """One split of the data. Labels are the family's targets: int64 class indices in
    ``[0, n_classes)`` for classification, float64 values for regression."""

    sample_id: np.ndarray
    features: np.ndarray
    label: np.ndarray
    label_clean: np.ndarray
    is_corrupted: np.ndarray
    group: np.ndarray | None = None  # (n,) int64 unit ids from the data's 'group' column; -1 = no group
    # (n,) int64 index into DatasetMeta.sources: the data set each row came from (mixed-source
    # image sets; the ground truth of DMin's source detection). None = one source.
    source: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])

    def subset(self, mask_or_index: np.ndarray) -> Split:
        return Split(
            sample_id=self.sample_id[mask_or_index],
            features=self.features[mask_or_index],
            label=self.label[mask_or_index],
            label_clean=self.label_clean[mask_or_index],
            is_corrupted=self.is_corrupted[mask_or_index],
            group=None if self.group is None else self.group[mask_or_index],
            source=None if self.source is None else self.source[mask_or_index],
        )

    def concat(self, other: Split) -> Split:
        """This split's rows followed by ``other``'s (ids kept as they are; ``group`` and
        ``source`` dropped unless both have one)."""
        both = self.group is not None and other.group is not None
        sources = self.source is not None and other.source is not None
        return Split(
            sample_id=np.concatenate([self.sample_id, other.sample_id]),
            features=np.concatenate([self.features, other.features.astype(self.features.dtype, copy=False)]),
            label=np.concatenate([self.label, other.label]),
            label_clean=np.concatenate([self.label_clean, other.label_clean]),
            is_corrupted=np.concatenate([self.is_corrupted, other.is_corrupted]),
            group=np.concatenate([self.group, other.group]) if both else None,
            source=np.concatenate([self.source, other.source]) if sources else None,
        )

    def without(self, sample_ids: np.ndarray) -> Split:
        """The split minus the rows whose ``sample_id`` is in ``sample_ids``."""
        return self.subset(~np.isin(self.sample_id, sample_ids))

    def to_frame(self) -> pl.DataFrame:
        flat = self.features.reshape(len(self), -1).astype(np.float32)
        return pl.DataFrame(
            {
                "sample_id": pl.Series(self.sample_id, dtype=pl.Int64),
                "features": pl.Series(flat, dtype=pl.Array(pl.Float32, flat.shape[1])),
                "label": pl.Series(self.label, dtype=_label_dtype(self.label)),
                "label_clean": pl.Series(self.label_clean, dtype=_label_dtype(self.label_clean)),
                "is_corrupted": pl.Series(self.is_corrupted, dtype=pl.Boolean),
                **({} if self.group is None else {"group": pl.Series(self.group, dtype=pl.Int64)}),
                **({} if self.source is None else {"source": pl.Series(self.source, dtype=pl.Int64)}),
            }
        )

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, feature_shape: tuple[int, ...]) -> Split:
        n = frame.height
        features = frame["features"].to_numpy().astype(np.float32).reshape((n, *feature_shape))
        return cls(
            sample_id=frame["sample_id"].to_numpy().astype(np.int64),
            features=features,
            label=_label_array(frame["label"]),
            label_clean=_label_array(frame["label_clean"]),
            is_corrupted=frame["is_corrupted"].to_numpy().astype(bool),
            group=frame["group"].to_numpy().astype(np.int64) if "group" in frame.columns else None,
            source=frame["source"].to_numpy().astype(np.int64) if "source" in frame.columns else None,
        )


def _label_dtype(values: np.ndarray) -> Any:
    """Int64 for class indices, Float64 for real-valued targets."""
    return pl.Float64 if np.issubdtype(values.dtype, np.floating) else pl.Int64


def _label_array(column: pl.Series) -> np.ndarray:
    return column.to_numpy().astype(np.float64 if column.dtype.is_float() else np.int64)


@dataclass(frozen=True)
class DatasetMeta:
    """What every stage needs to know about the staged data."""

    name: str
    n_classes: int
    feature_shape: tuple[int, ...]
    corruption: dict[str, Any] = field(default_factory=dict)
    trigger: dict[str, Any] | None = None
    # The names of the data sets behind ``Split.source`` (index = source id); None = one source.
    sources: tuple[str, ...] | None = None
    # What a family shares across all its units beyond their rows (JSON values): a graph's
    # ``edge_index`` for node units, the seed set of a cascade; None = nothing.
    structure: dict[str, Any] | None = None

    @property
    def is_image(self) -> bool:
        return len(self.feature_shape) == 3

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_classes": self.n_classes,
            "feature_shape": list(self.feature_shape),
            "corruption": self.corruption,
            "trigger": self.trigger,
            **({} if self.sources is None else {"sources": list(self.sources)}),
            **({} if self.structure is None else {"structure": self.structure}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetMeta:
        return cls(
            name=data["name"],
            n_classes=int(data["n_classes"]),
            feature_shape=tuple(data["feature_shape"]),
            corruption=data.get("corruption", {}),
            trigger=data.get("trigger"),
            sources=tuple(data["sources"]) if data.get("sources") is not None else None,
            structure=data.get("structure"),
        )


@dataclass(frozen=True)
class StagedData:
    train: Split
    val: Split
    test: Split
    meta: DatasetMeta

"""Data sources: built-in scikit-learn sets and user files (.parquet, .npz; local or s3://).

Every loader returns a :class:`RawData` with a stable int64 ``sample_id`` per row (the row number
in the source unless the user names an id column), float32 features of shape
``(n, *feature_shape)`` and int64 labels in ``[0, n_classes)`` (or, with ``target="real"`` for
regression, float64 targets and ``n_classes = 1``). Input is checked here, once:
unknown sources, unreadable files, NaN/inf features and out-of-range labels raise
:class:`~cleanse.errors.DataError` naming the problem.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cleanse.config import DataConfig
from cleanse.errors import DataError
from cleanse.storage import fetch_input

BUILTIN_SOURCES = ("sklearn:digits", "sklearn:breast_cancer", "sklearn:wine", "sklearn:iris")
REAL_SOURCES = ("sklearn:diabetes",)  # real-valued targets (the regression family)

# What np.load raises on a damaged archive: a truncated zip (BadZipFile), a cut member (EOFError,
# zlib.error), a bad header (ValueError), an unreadable file (OSError).
NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class RawData:
    name: str
    sample_id: np.ndarray
    features: np.ndarray
    label: np.ndarray
    n_classes: int
    group: np.ndarray | None = None  # (n,) int64 unit ids for group-level estimators; -1 = no group

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])


def load_source(config: DataConfig, target: str = "class") -> RawData:
    """Load and validate ``config.source``; ``target``: ``class`` (integer class indices) or
    ``real`` (finite float targets, for regression)."""
    source = config.source
    builtin = REAL_SOURCES if target == "real" else BUILTIN_SOURCES
    if source.startswith("sklearn:") and source in builtin:
        raw = _load_builtin(source)
    elif source.endswith(".parquet"):
        raw = _load_parquet(fetch_input(source), config, target)
    elif source.endswith(".npz"):
        raw = _load_npz(fetch_input(source), config, target)
    else:
        raise DataError(
            f"data.source: unknown source {source!r}; allowed: {', '.join(builtin)}, "
            "or a path / s3:// URI ending in .parquet or .npz"
        )
    return _validated_real(raw) if target == "real" else _validated(raw)


def _load_builtin(source: str) -> RawData:
    from sklearn import datasets

    loaders = {
        "sklearn:digits": datasets.load_digits,
        "sklearn:breast_cancer": datasets.load_breast_cancer,
        "sklearn:wine": datasets.load_wine,
        "sklearn:iris": datasets.load_iris,
        "sklearn:diabetes": datasets.load_diabetes,
    }
    if source not in loaders:
        raise DataError(f"data.source: unknown source {source!r}; allowed: {', '.join(BUILTIN_SOURCES)}")
    bunch = loaders[source]()
    features = np.asarray(bunch.data, dtype=np.float32)
    if source == "sklearn:digits":
        features = (features / 16.0).reshape(-1, 1, 8, 8)
    real = source in REAL_SOURCES
    label = np.asarray(bunch.target, dtype=np.float64 if real else np.int64)
    return RawData(
        name=source.removeprefix("sklearn:"),
        sample_id=np.arange(len(label), dtype=np.int64),
        features=features,
        label=label,
        n_classes=_n_classes(label),
    )


def _reshape(features: np.ndarray, config: DataConfig) -> np.ndarray:
    if config.image_shape is None:
        return features
    shape = tuple(config.image_shape)
    if int(np.prod(shape)) != features.shape[1]:
        raise DataError(
            f"data.image_shape {list(shape)} holds {int(np.prod(shape))} values but the data has "
            f"{features.shape[1]} features per sample"
        )
    return features.reshape((-1, *shape))


def as_label_vector(values: np.ndarray, where: str) -> np.ndarray:
    """Labels as a vector ``(n,)``: a column ``(n, 1)`` is accepted and squeezed; any other shape is
    refused (one-hot or multi-label targets are not class indices)."""
    if values.ndim == 2 and values.shape[1] == 1:
        return values[:, 0]
    if values.ndim != 1:
        raise DataError(f"{where}: y must be a vector of class indices, shape (n,) or (n, 1); got shape "
                        f"{list(values.shape)}")
    return values


def _as_labels(values: np.ndarray, where: str) -> np.ndarray:
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise DataError(f"{where}: labels must be integers")
    elif values.dtype.kind not in "iub":
        raise DataError(f"{where}: labels must be integers, got dtype {values.dtype}")
    return values.astype(np.int64)


def _as_targets(values: np.ndarray, where: str, target: str) -> np.ndarray:
    """Class indices (int64) for ``target="class"``, finite float64 values for ``"real"``."""
    if target == "class":
        return _as_labels(values, where)
    if values.dtype.kind not in "iuf":
        raise DataError(f"{where}: targets must be numbers, got dtype {values.dtype}")
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise DataError(f"{where}: {int((~np.isfinite(values)).sum())} target(s) are missing, NaN or infinite")
    return values


def _load_npz(path: Path, config: DataConfig, target: str = "class") -> RawData:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("X", "y") if key not in archive.files]
            if missing:
                raise DataError(f"data.source {path}: missing array(s) {missing}; expected X and y")
            features = archive["X"]
            if features.dtype.kind not in "biuf":
                raise DataError(f"data.source {path}: X must be numeric, got dtype {features.dtype}")
            features = np.asarray(features, dtype=np.float32)
            label = _as_targets(as_label_vector(np.asarray(archive["y"]), f"data.source {path}"),
                                f"data.source {path}", target)
            ids = None
            if "sample_id" in archive.files:
                ids = archive["sample_id"]
                if ids.dtype.kind not in "iu" or ids.shape != label.shape:
                    raise DataError(f"data.source {path}: sample_id must be integers, one per row; got dtype "
                                    f"{ids.dtype}, shape {list(ids.shape)}")
                ids = ids.astype(np.int64)
    except NPZ_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"data.source {path}: not a readable .npz file ({type(exc).__name__}: {reason})") from None
    if features.ndim >= 1 and features.shape[0] == 0:
        raise DataError(f"data.source {path}: no samples (X has 0 rows)")
    if features.ndim < 2 or features.shape[0] != label.shape[0]:
        raise DataError(
            f"data.source {path}: X must be (n, ...) and y (n,); got X{features.shape}, y{label.shape}"
        )
    features = _reshape(features.reshape(features.shape[0], -1), config) if features.ndim == 2 else features
    return RawData(
        name=path.stem,
        sample_id=ids if ids is not None else np.arange(len(label), dtype=np.int64),
        features=features,
        label=label,
        n_classes=_n_classes(label),
    )


def _load_parquet(path: Path, config: DataConfig, target: str = "class") -> RawData:
    import polars as pl

    try:
        frame = pl.read_parquet(path)
    except Exception as exc:
        raise DataError(f"data.source {path}: not a readable parquet file ({exc})") from exc
    if frame.height == 0:
        raise DataError(f"data.source {path}: no samples (the table has 0 rows)")
    columns = [config.features] if isinstance(config.features, str) else list(config.features)
    needed = [*columns, config.label_column] + ([config.id_column] if config.id_column else [])
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise DataError(
            f"data.source {path}: missing column(s) {missing}; present: {frame.columns}. "
            "Set data.features / data.label_column / data.id_column."
        )
    if isinstance(config.features, str):
        column = frame[config.features]
        if not isinstance(column.dtype, (pl.List, pl.Array)):
            raise DataError(
                f"data.features: column {config.features!r} has dtype {column.dtype}; expected a list/array "
                "column, or give data.features as a list of scalar columns"
            )
        inner = column.dtype.inner
        if not inner.is_numeric():
            raise DataError(f"data.features: column {config.features!r} holds {inner} values; features must be "
                            "numeric")
        lengths = column.list.len() if isinstance(column.dtype, pl.List) else None
        if lengths is not None and lengths.n_unique() != 1:
            raise DataError(f"data.features: rows of column {config.features!r} differ in length")
        rows = [[np.nan if v is None else v for v in row] if row is not None else None for row in column.to_list()]
        if any(row is None for row in rows):
            raise DataError(f"data.source {path}: some rows of column {config.features!r} are null")
        features = np.asarray(rows, dtype=np.float32)
    else:
        # A numeric-looking string column would cast silently; features must be numbers in the file.
        bad = [f"{name!r} ({frame[name].dtype})" for name in columns
               if not (frame[name].dtype.is_numeric() or frame[name].dtype == pl.Boolean)]
        if bad:
            raise DataError(f"data.features: column(s) {', '.join(bad)} are not numeric; features must be numbers")
        features = frame.select(columns).cast(pl.Float32).fill_null(float("nan")).to_numpy().astype(np.float32)
    labels = frame[config.label_column]
    labels = labels.fill_null(-1) if target == "class" else labels.cast(pl.Float64, strict=False).fill_null(float("nan"))
    label = _as_targets(labels.to_numpy(), f"data.label_column {config.label_column!r}", target)
    ids = _id_column(frame, config.id_column, path) if config.id_column else np.arange(frame.height, dtype=np.int64)
    group = None
    if "group" in frame.columns:
        if not frame["group"].dtype.is_integer():
            raise DataError(f"data.source {path}: column 'group' must hold integers (a unit id; -1 = no group), "
                            f"got {frame['group'].dtype}")
        group = frame["group"].fill_null(-1).cast(pl.Int64).to_numpy()
    return RawData(
        name=path.stem,
        sample_id=ids,
        features=_reshape(features, config),
        label=label,
        n_classes=_n_classes(label),
        group=group,
    )


def _id_column(frame: object, name: str, path: Path) -> np.ndarray:
    """The id column as int64: integers only (strings, floats and nulls are refused, not coerced)."""
    import polars as pl

    column = frame[name]  # type: ignore[index]
    if not column.dtype.is_integer():
        raise DataError(f"data.id_column {name!r}: ids must be integers, got dtype {column.dtype} in {path}")
    nulls = int(column.null_count())
    if nulls:
        raise DataError(f"data.id_column {name!r}: {nulls} null id(s) in {path}; every row needs an id")
    return column.cast(pl.Int64).to_numpy()


def _check_rows(raw: RawData) -> int:
    """Refuse no rows, no features, and non-finite features; the number of rows."""
    n = raw.label.shape[0]
    if n == 0:
        raise DataError(f"data.source {raw.name}: no samples")
    if raw.features.reshape(n, -1).shape[1] == 0:
        raise DataError(f"data.source {raw.name}: the samples have no features (shape {list(raw.features.shape)})")
    bad = ~np.isfinite(raw.features.reshape(n, -1)).all(axis=1)
    if bad.any():
        first = ", ".join(str(i) for i in raw.sample_id[bad][:5])
        raise DataError(f"data.source {raw.name}: {int(bad.sum())} sample(s) have NaN or infinite features (sample_id {first}, ...)")
    return n


def _validated(raw: RawData) -> RawData:
    n = _check_rows(raw)
    if (raw.label < 0).any():
        first = ", ".join(str(i) for i in raw.sample_id[raw.label < 0][:5])
        raise DataError(
            f"data.source {raw.name}: labels out of range: {int((raw.label < 0).sum())} label(s) are negative "
            f"or missing (sample_id {first}, ...); labels must be class indices 0..C-1"
        )
    if raw.n_classes > n:
        # Every class must occur, so a label >= n is out of range (and bincount over it could ask for TiB).
        raise DataError(
            f"data.source {raw.name}: labels out of range: the largest label is {int(raw.label.max())} but there "
            f"are only {n} rows; labels must be class indices 0..C-1"
        )
    counts = np.bincount(raw.label, minlength=raw.n_classes)
    absent = np.flatnonzero(counts == 0)
    if absent.size:
        raise DataError(
            f"data.source {raw.name}: labels out of range: classes 0..{raw.n_classes - 1} are implied by the "
            f"largest label, but class(es) {absent.tolist()[:10]} never occur; relabel to 0..C-1"
        )
    if raw.n_classes < 2:
        raise DataError(f"data.source {raw.name}: need at least 2 classes, found {raw.n_classes}")
    if len(np.unique(raw.sample_id)) != n:
        raise DataError(f"data.source {raw.name}: sample ids are not unique")
    return raw


def _n_classes(label: np.ndarray) -> int:
    """``max + 1`` for class indices; 1 (one output) for real-valued targets."""
    if label.dtype.kind == "f":
        return 1
    return int(label.max()) + 1 if len(label) else 0


def _validated_real(raw: RawData) -> RawData:
    """Regression data: rows, features and ids as for classes; targets already checked finite."""
    n = _check_rows(raw)
    if n < 10:
        raise DataError(f"data.source {raw.name}: {n} samples; a train/val/test split needs at least 10")
    if len(np.unique(raw.sample_id)) != n:
        raise DataError(f"data.source {raw.name}: sample ids are not unique")
    return raw

"""Probe (query) sets: the observed misbehaviour that train -> query attribution explains.

A :class:`QuerySet` holds ``probes`` (the ``query.size`` inputs the user shows us, each labelled
with the behaviour to explain: the label whose *support* we attribute) and ``heldout`` (more
inputs showing the same behaviour, never scored, used only to decide when iterative cleansing has
removed the behaviour). Both are :class:`~cleanse.data.dataset.Split` objects whose ``label`` is
the behaviour label; ``label_clean`` keeps the input's true class where it is known.

- ``val_errors``: validation samples the model misclassifies, labelled with the wrong prediction.
- ``triggered``: validation inputs of the non-target classes with the backdoor trigger stamped on,
  labelled with the target class. Those the model already sends to the target are preferred as
  probes (they are the failures a user would report), spread over the inputs' true classes.
- ``file``: a ``.parquet`` (``features`` list column and ``label``) or ``.npz`` (``X``, ``y``).

``reference`` (with ``query.contrast: reference``) holds as many ordinary validation inputs of
the probes' labels that the model classifies correctly: support for *them* is support for the
label in general, which :mod:`cleanse.attribution` removes from the probes' support.

Probes are drawn with ``seed``; the draw is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cleanse.config import Params, QueryConfig
from cleanse.data.corruption import apply_trigger
from cleanse.data.dataset import DatasetMeta, Split, StagedData
from cleanse.errors import ConfigError, DataError
from cleanse.seeds import generator


@dataclass(frozen=True)
class QuerySet:
    probes: Split
    heldout: Split
    kind: str
    note: str = ""
    reference: Split | None = None

    def behaviour_rate(self, probabilities: np.ndarray) -> float:
        """Share of held-out probes predicted as their behaviour label; ``probabilities`` ``(n_heldout, C)``."""
        if len(self.heldout) == 0:
            return float("nan")
        return float((probabilities.argmax(1) == self.heldout.label).mean())

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_probes": len(self.probes), "n_heldout": len(self.heldout),
                "n_reference": 0 if self.reference is None else len(self.reference),
                "probe_labels": self.probes.label.tolist(), "note": self.note}


def _split(features: np.ndarray, label: np.ndarray, true_label: np.ndarray, start_id: int) -> Split:
    n = label.shape[0]
    return Split(sample_id=np.arange(start_id, start_id + n, dtype=np.int64), features=features.astype(np.float32),
                 label=label.astype(np.int64), label_clean=true_label.astype(np.int64),
                 is_corrupted=np.zeros(n, dtype=bool))


def _choose(candidates: Split, preferred: np.ndarray, size: int, seed: int,
            strata: np.ndarray | None = None) -> tuple[Split, Split]:
    """``size`` probes drawn from ``candidates`` (``preferred`` rows first); the rest are held out.

    With ``strata`` ``(n,)`` (e.g. the inputs' true classes), preferred rows are taken round-robin
    over the strata in random order, so that the probes cover as many of them as ``size`` allows.
    """
    rng = generator(seed, "query.probes")
    first = rng.permutation(np.flatnonzero(preferred))
    if strata is not None and first.size:
        # Position of each row within its stratum: sorting by it interleaves the strata.
        keys = strata[first]
        within = np.zeros(first.size, dtype=np.int64)
        for value in np.unique(keys):
            rows = np.flatnonzero(keys == value)
            within[rows] = np.arange(rows.size)
        stratum_order = {value: rank for rank, value in enumerate(rng.permutation(np.unique(keys)))}
        first = first[np.lexsort((np.array([stratum_order[k] for k in keys]), within))]
    second = rng.permutation(np.flatnonzero(~preferred))
    order = np.concatenate([first, second])
    chosen = np.sort(order[:size])
    rest = np.ones(len(candidates), dtype=bool)
    rest[chosen] = False
    # Held-out probes show the behaviour now; with none left, the probes themselves are the check.
    heldout = candidates.subset(rest & preferred)
    return candidates.subset(chosen), heldout if len(heldout) else candidates.subset(chosen)


def read_probe_file(path: str, meta: DatasetMeta) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, *feature_shape)`` and labels ``(n,)`` of a probe file; errors name the problem."""
    from cleanse.data.sources import NPZ_ERRORS, as_label_vector
    from cleanse.storage import fetch_input

    local = Path(fetch_input(path)) if "://" in path else Path(path).expanduser()
    if not local.is_file():
        raise DataError(f"query.path: file not found: {local}")
    try:
        if local.suffix == ".npz":
            with np.load(local, allow_pickle=False) as archive:
                if "X" not in archive or "y" not in archive:
                    raise DataError(f"query.path {local}: an .npz of probes needs arrays 'X' and 'y'; "
                                    f"found {sorted(archive.files)}")
                features = np.asarray(archive["X"], dtype=np.float32)
                label = as_label_vector(np.asarray(archive["y"]), f"query.path {local}")
        elif local.suffix == ".parquet":
            import polars as pl

            frame = pl.read_parquet(local)
            if "features" not in frame.columns or "label" not in frame.columns:
                raise DataError(f"query.path {local}: a parquet of probes needs columns 'features' (list) and "
                                f"'label'; found {frame.columns}")
            features = np.asarray(frame["features"].to_list(), dtype=np.float32)
            label = frame["label"].to_numpy()
        else:
            raise ConfigError(f"query.path: {local.name!r} must end in .parquet or .npz")
    except NPZ_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"query.path {local}: not readable ({type(exc).__name__}: {reason})") from None
    if features.ndim >= 1 and features.shape[0] == 0:
        raise DataError(f"query.path {local}: the file holds no probes (0 rows)")
    width = int(np.prod(meta.feature_shape))
    if features.ndim < 2 or features.shape[0] != label.shape[0] or features.reshape(len(features), -1).shape[1] != width:
        raise DataError(f"query.path {local}: probes must have {width} features each ({list(meta.feature_shape)}) and "
                        f"one label per row; got features {list(features.shape)}, labels {list(label.shape)}")
    if not np.isfinite(features).all():
        raise DataError(f"query.path {local}: probe features contain NaN or inf")
    if not np.issubdtype(label.dtype, np.integer) or label.min() < 0 or label.max() >= meta.n_classes:
        raise DataError(f"query.path {local}: probe labels must be integers in 0..{meta.n_classes - 1}")
    if label.shape[0] == 0:
        raise DataError(f"query.path {local}: the file holds no probes")
    return features.reshape((-1, *meta.feature_shape)), label.astype(np.int64)


def reference_inputs(val: Split, labels: np.ndarray, predicted: np.ndarray, size: int, seed: int) -> Split | None:
    """Up to ``size`` correctly classified validation samples whose label is among ``labels``."""
    rows = np.flatnonzero(np.isin(val.label, labels) & (predicted == val.label))
    if rows.size == 0:
        return None
    chosen = np.sort(generator(seed, "query.reference").permutation(rows)[:size])
    return _split(val.features[chosen], val.label[chosen], val.label[chosen], 0)


def build_query(config: QueryConfig, staged: StagedData, predict: Any, *, seed: int) -> QuerySet | None:
    """The probe set for ``config`` (``None`` for ``kind: none``), with its reference inputs.

    ``predict`` maps features ``(n, ...)`` to class probabilities ``(n, C)`` under the model
    whose behaviour is explained (the base model).
    """
    from dataclasses import replace

    query = _build_probes(config, staged, predict, seed=seed)
    if query is None or config.contrast == "none":
        return query
    predicted = predict(staged.val.features).argmax(1)
    return replace(query, reference=reference_inputs(staged.val, np.unique(query.probes.label), predicted,
                                                     config.size, seed))


def _build_probes(config: QueryConfig, staged: StagedData, predict: Any, *, seed: int) -> QuerySet | None:
    if config.kind == "none":
        return None
    val = staged.val
    if config.kind == "val_errors":
        predicted = predict(val.features).argmax(1)
        wrong = predicted != val.label
        if not wrong.any():
            raise DataError("query.kind 'val_errors': the model misclassifies no validation sample; there is no "
                            "error to attribute (use 'none' for self-influence)")
        candidates = _split(val.features[wrong], predicted[wrong], val.label[wrong], 0)
        probes, heldout = _choose(candidates, np.ones(len(candidates), dtype=bool), config.size, seed)
        return QuerySet(probes, heldout, "val_errors")
    if config.kind == "triggered":
        trigger = staged.meta.trigger
        if trigger is None:
            raise ConfigError("query.kind 'triggered' needs backdoored data (corruption.kind: backdoor)")
        target = int(trigger["target_class"])
        others = val.label != target
        features = apply_trigger(val.features[others], trigger)
        candidates = _split(features, np.full(int(others.sum()), target), val.label[others], 0)
        fooled = predict(features).argmax(1) == target
        # Spread over the source classes: a backdoor's poisons come from every class, and the
        # ones whose class no probe shows get little support (measured on the digits cells).
        probes, heldout = _choose(candidates, fooled, config.size, seed, strata=candidates.label_clean)
        note = "" if fooled.sum() >= config.size else (
            f"only {int(fooled.sum())} triggered validation inputs are classified as the target; the other probes "
            "are triggered inputs the model still gets right")
        return QuerySet(probes, heldout, "triggered", note)
    features, label = read_probe_file(config.path or "", staged.meta)
    candidates = _split(features, label, label, 0)
    shows = predict(features).argmax(1) == label
    probes, heldout = _choose(candidates, shows if shows.any() else np.ones(len(label), dtype=bool), config.size, seed)
    return QuerySet(probes, heldout, "file")


def query_for(params: Params, staged: StagedData, model: Any) -> QuerySet | None:
    """:func:`build_query` for the configured run, explaining ``model`` (a ``TrainedModel``)."""
    from cleanse.models.trainer import predict_proba

    if params.query.kind == "none":
        return None
    from cleanse import families

    own = families.get(params.family).query_set(params, staged, model)
    if own is not None:  # a family with probes of its own (the lm family's topic prompts)
        return own
    module = model.module()
    return build_query(params.query, staged, lambda features: predict_proba(module, features), seed=params.seed)

"""The pipeline's stages as functions of ``(params, layout)``: the one code path behind the CLI,
the DVC stages and the Prefect tasks.

Each stage reads its inputs from the output root, writes its outputs atomically, and records a
fingerprint of everything it depends on (its configuration and its inputs' fingerprints) in a
``meta.json`` written *last*. :func:`is_fresh` compares that fingerprint, so a killed
``cleanse run`` resumes from the first stage whose outputs are missing or stale.

Stages: ``stage -> train -> score(estimator) -> detect(estimator) -> retrain(estimator)``,
``references`` (baseline / oracle / random removal), ``recommend`` (one cleaned model, chosen
without ground truth) and ``report``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cleanse.config import Params, fingerprint
from cleanse.data.dataset import DatasetMeta, Split, StagedData
from cleanse.errors import ArtifactError
from cleanse.lock import out_lock
from cleanse.storage import (
    Layout,
    read_json,
    read_table,
    read_tensors,
    write_json,
    write_npy,
    write_table,
    write_tensors,
)

STAGE_META_NAME = "meta.json"


def _locked(stage: Any) -> Any:
    """Run ``stage(params, layout, ...)`` holding the output root's lock (:mod:`cleanse.lock`):
    reentrant, so ``run_all`` and the CLI, which hold it already, pass straight through, and a
    second process on the same ``--out`` is refused before it writes anything."""

    @functools.wraps(stage)
    def wrapper(params: Params, layout: Layout, *args: Any, **kwargs: Any) -> Any:
        with out_lock(layout.root):
            return stage(params, layout, *args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- fingerprints


def canonical(params: Params) -> Params:
    """``params`` with every default that stands for a value resolved, so that configurations
    meaning the same run fingerprint the same (``model.hidden: [64]`` and the MLP's built-in
    default; any ``hidden`` of a logistic regression; memorization's ``epochs: null`` and
    ``model.epochs``). Only used for fingerprints: the stages read ``params`` as given. The
    settings that follow ``query.kind`` (``auto``) need nothing here: :func:`cleanse.config.resolve_auto`
    replaces them with their values before ``params`` exists."""
    from cleanse.models.architectures import DEFAULT_HIDDEN

    model = params.model
    hidden = model.hidden if model.hidden is not None else DEFAULT_HIDDEN.get(model.arch)
    model = model.model_copy(update={"hidden": [] if model.arch == "logreg" else list(hidden or [])})
    scorers = params.scorers
    if scorers.memorization.epochs is None:
        scorers = scorers.model_copy(update={
            "memorization": scorers.memorization.model_copy(update={"epochs": model.epochs})})
    return params.model_copy(update={"model": model, "scorers": scorers})


# (absolute path, size, mtime_ns) -> sha256: a file is hashed once per process while unchanged.
_digests: dict[tuple[str, int, int], str] = {}


def _is_local_file_source(source: str) -> bool:
    return source.startswith("file://") or ":" not in source.split("/", 1)[0]


def content_digest(source: str, what: str = "data.source") -> str | None:
    """A digest of a data file's *content*, so that a file replaced at the same path makes the
    stages that read it stale: sha256 of a local file's bytes (cached by path, size and mtime),
    the ETag (and version id, when the bucket versions) of an ``s3://`` object, None for built-in
    (``sklearn:*``) and synthetic sources. A missing local file gives None: the stage itself
    names it."""
    if source.startswith("s3://"):
        from cleanse import remote

        bucket, key = remote.split_uri(source)
        try:
            head = remote._call(source, "head_object", Bucket=bucket, Key=key)
        except remote.RemoteError as exc:
            raise ArtifactError(f"{what}: {exc}") from None
        return f"etag:{head.get('ETag', '').strip(chr(34))}:{head.get('VersionId') or ''}"
    if not _is_local_file_source(source):  # sklearn:digits, synthetic sources
        return None
    path = Path(source.removeprefix("file://")).expanduser().absolute()
    try:
        stat = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        import hashlib

        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _digests[key] = f"sha256:{digest.hexdigest()}"
    return _digests[key]


def _query_parts(params: Params) -> list[Any]:
    """What the probes depend on beyond the trained model: the query options and, for
    ``kind: file``, the probe file's content."""
    parts: list[Any] = [params.query]
    if params.query.kind == "file" and params.query.path:
        digest = content_digest(params.query.path, "query.path")
        if digest is not None:
            parts.append(digest)
    return parts


def stage_fingerprint(params: Params) -> str:
    """The staged data's fingerprint: seed, data and corruption options, and the data file's
    content digest (:func:`content_digest`) for file sources."""
    params = canonical(params)
    parts: list[Any] = [params.seed, params.data, params.corruption]
    digest = content_digest(params.data.source)
    if digest is not None:
        parts.append(digest)
    return fingerprint("stage", *parts)


def train_fingerprint(params: Params) -> str:
    return fingerprint("train", stage_fingerprint(params), canonical(params).model)


def score_fingerprint(params: Params, estimator: str) -> str:
    canon = canonical(params)
    parts: list[Any] = [train_fingerprint(params), estimator, getattr(canon.scorers, estimator)]
    if params.query.kind != "none":  # probes change what is scored; without them fingerprints stay as they were
        parts += _query_parts(params)
    return fingerprint("score", *parts)


def detect_fingerprint(params: Params, estimator: str) -> str:
    return fingerprint("detect", score_fingerprint(params, estimator), params.detect)


# Bumped when a retrain result gains keys that later stages read (val_accuracy, the held-out
# probes' behaviour rate), so results written before are recomputed rather than misread.
RETRAIN_RESULT_VERSION = 2


def retrain_fingerprint(params: Params, estimator: str) -> str:
    from cleanse.cleansing import iterates

    if iterates(params, estimator):
        return fingerprint("retrain", detect_fingerprint(params, estimator), params.cleansing, RETRAIN_RESULT_VERSION)
    return fingerprint("retrain", detect_fingerprint(params, estimator), RETRAIN_RESULT_VERSION)


def query_fingerprint(params: Params) -> str:
    return fingerprint("query", train_fingerprint(params), *_query_parts(params))


def references_fingerprint(params: Params) -> str:
    return fingerprint("references", train_fingerprint(params), RETRAIN_RESULT_VERSION)


def recommend_fingerprint(params: Params) -> str:
    parts: list[Any] = [references_fingerprint(params), params.recommend, params.detect.max_fraction]
    parts += [retrain_fingerprint(params, name) for name in params.estimators]
    if params.query.kind != "none":
        parts += [query_fingerprint(params), params.cleansing.stop_rate]
    return fingerprint("recommend", *parts)


def run_fingerprint(params: Params) -> str:
    """The whole configuration's fingerprint (an MLflow tag)."""
    parts: list[Any] = [canonical(params)]
    for source, what in ((params.data.source, "data.source"), (params.query.path, "query.path")):
        digest = content_digest(source, what) if source else None
        if digest is not None:
            parts.append(digest)
    return fingerprint("run", *parts)


def is_fresh(meta_path: Path, expected: str) -> bool:
    """True when ``meta_path`` exists and records ``expected`` as its fingerprint."""
    if not meta_path.is_file():
        return False
    try:
        return read_json(meta_path).get("fingerprint") == expected
    except (ValueError, ArtifactError):
        return False


def _require_fresh(meta_path: Path, expected: str, what: str) -> None:
    if not meta_path.is_file():
        raise ArtifactError(f"missing {what} ({meta_path}); run the stage that produces it first")
    if not is_fresh(meta_path, expected):
        raise ArtifactError(
            f"{what} at {meta_path.parent} was produced with another configuration; rerun that stage "
            "(or `cleanse run`) with the current params"
        )


# ----------------------------------------------------------------------------- stage


def source_records(layout: Layout) -> tuple[Path, Path]:
    """``data/source.json`` and ``data/probes_source.json``: what :func:`run_source` writes."""
    return layout.root / "data" / "source.json", layout.root / "data" / "probes_source.json"


@_locked
def run_source(params: Params, layout: Layout) -> tuple[Path, Path]:
    """Record the content digests of the data file and the probe file (:func:`content_digest`) in
    ``data/source.json`` and ``data/probes_source.json``, which DVC's ``stage`` and
    ``query``/``score``/``retrain`` stages depend on: ``dvc.yaml`` cannot name ``data.source`` as a
    dependency (a built-in ``sklearn:`` source is no file), so this always-run stage turns a
    replaced file into a changed dependency, and leaves the records untouched otherwise (the
    stages after it are skipped). A missing file is refused here, as the stage would."""
    from cleanse.storage import fetch_input

    probe_file = params.query.path if params.query.kind == "file" else None  # else probes come from the data
    entries = []
    for source, what in ((params.data.source, "data.source"), (probe_file, "query.path")):
        digest = content_digest(source, what) if source else None
        if digest is None and source and _is_local_file_source(source):
            fetch_input(source)  # a missing file: the stage's own "file not found" / "not a file" error
        entries.append({"source": source, "digest": digest})
    data_record, probes_record = source_records(layout)
    for record, entry in zip((data_record, probes_record), entries, strict=True):
        # Rewritten only when changed, so an unchanged source leaves DVC nothing to rerun.
        try:
            unchanged = read_json(record) == entry
        except (ValueError, ArtifactError):
            unchanged = False
        if not unchanged:
            write_json(entry, record)
    layout.publish()
    return data_record, probes_record


@_locked
def run_stage(params: Params, layout: Layout) -> Path:
    """Write ``data/staged/{train,val,test}.parquet`` and ``meta.json``."""
    from cleanse.data.stage import stage_data
    from cleanse.models.architectures import build_model

    staged = stage_data(params)
    build_model(_spec(params, staged.meta))  # the model must fit the data before anything is written
    layout.ensure_root()
    for name in ("train", "val", "test"):
        write_table(getattr(staged, name).to_frame(), layout.split(name))
    write_json({**staged.meta.to_json(), "fingerprint": stage_fingerprint(params),
                "n": {name: len(getattr(staged, name)) for name in ("train", "val", "test")}}, layout.staged_meta)
    _track(params, layout, "stage")
    layout.publish()
    return layout.staged


def load_staged(layout: Layout, params: Params | None = None) -> StagedData:
    if params is not None:
        _require_fresh(layout.staged_meta, stage_fingerprint(params), "staged data")
    meta = DatasetMeta.from_json(read_json(layout.staged_meta))
    splits = {name: Split.from_frame(read_table(layout.split(name)), meta.feature_shape) for name in ("train", "val", "test")}
    return StagedData(meta=meta, **splits)


# ----------------------------------------------------------------------------- models


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


def _spec(params: Params, meta: DatasetMeta) -> Any:
    from cleanse.models.architectures import spec_for

    return spec_for(params.model.arch, params.model.hidden, meta.feature_shape, meta.n_classes)


def evaluate_model(model: Any, staged: StagedData, query: Any = None) -> dict[str, float]:
    """Test accuracy (clean labels), validation accuracy (the trusted split's labels: what the
    recommendation may read), for backdoors the attack success rate, and with probes (a
    :class:`cleanse.query.QuerySet`) the share of held-out probes that still show the behaviour."""
    from cleanse.evaluate import accuracy, attack_success_rate, triggered_test_inputs
    from cleanse.models.trainer import predict_proba

    module = model.module()
    out = {"test_accuracy": accuracy(predict_proba(module, staged.test.features), staged.test.label_clean),
           "val_accuracy": accuracy(predict_proba(module, staged.val.features), staged.val.label)}
    if query is not None and len(query.heldout):
        out["heldout_behaviour_rate"] = float(query.behaviour_rate(predict_proba(module, query.heldout.features)))
    if staged.meta.trigger is not None:
        triggered = triggered_test_inputs(staged.test, staged.meta.trigger)
        out["attack_success_rate"] = attack_success_rate(predict_proba(module, triggered), staged.meta.trigger["target_class"])
    return out


@_locked
def run_train(params: Params, layout: Layout) -> Path:
    """Train the base model on the (corrupted) training split; write ``models/base/``."""
    from cleanse.models.architectures import default_device
    from cleanse.models.trainer import train_model

    staged = load_staged(layout, params)
    started = time.perf_counter()
    model = train_model(_spec(params, staged.meta), staged.train.features, staged.train.label, params.model,
                        seed=params.seed, device=default_device())
    seconds = time.perf_counter() - started
    save_model(model, layout.base_model, {"fingerprint": train_fingerprint(params), "seconds": seconds,
                                          **evaluate_model(model, staged), "history": model.history})
    _track(params, layout, "train")
    layout.publish()
    return layout.base_model


# ----------------------------------------------------------------------------- score


def load_base_model(params: Params, layout: Layout) -> Any:
    """The trained base model, refused when it was trained with another configuration."""
    _require_fresh(layout.base_model / STAGE_META_NAME, train_fingerprint(params), "base model")
    return load_model(layout.base_model)


def scoring_context(params: Params, layout: Layout, staged: StagedData | None = None) -> Any:
    from cleanse.estimators.base import ScoringContext
    from cleanse.models.architectures import default_device

    staged = staged if staged is not None else load_staged(layout, params)
    return ScoringContext(train=staged.train, val=staged.val, meta=staged.meta, model=load_base_model(params, layout),
                          model_config=params.model, seed=params.seed, device=default_device(),
                          cache_dir=layout.root / "cache")


@_locked
def run_score(params: Params, layout: Layout, estimator: str) -> Path:
    """Write ``scores/<estimator>.parquet`` and its ``.meta.json``."""
    from cleanse.estimators import registry

    from cleanse.attribution import score_with_query
    from cleanse.query import query_for

    scorer = registry.get(estimator)
    staged = load_staged(layout, params)
    context = scoring_context(params, layout, staged)
    # The same deterministic choice as run_query (which records it under query/).
    query = query_for(params, staged, context.model)
    from cleanse.grads import forward_ad_wait_seconds

    # The scorer's own time: waits for another thread's forward-mode section (concurrent tasks
    # in one process, see cleanse.grads.jvp) are not its work.
    started, waited = time.perf_counter(), forward_ad_wait_seconds()
    result, matrix = score_with_query(scorer, context, getattr(params.scorers, estimator), query, params.query.aggregate)
    seconds = time.perf_counter() - started - (forward_ad_wait_seconds() - waited)
    # Always written (no probes, or no train -> probe scores: zero rows), so that it is a DVC output
    # of score@<estimator> and a stale matrix from an earlier configuration never survives.
    empty = np.zeros((0, len(context.train)), dtype=np.float32)
    write_npy(empty if matrix is None else matrix, pairwise_path(layout, estimator))
    table = result.table
    if table["sample_id"].to_list() != context.train.sample_id.tolist():
        raise RuntimeError(f"estimator {estimator} returned rows out of training order")
    write_table(table, layout.scores(estimator))
    if hasattr(scorer, "write_artifacts"):  # e.g. memorization's (n_test, n_train) influence memmap
        artifacts = scorer.write_artifacts(context, getattr(params.scorers, estimator), staged.test,
                                           layout.root / "scores" / estimator)
        result.meta["artifacts"] = artifacts
    write_json({"estimator": estimator, "fingerprint": score_fingerprint(params, estimator), "seconds": seconds,
                "orientation": "one row per training sample; higher score = more likely harmful",
                "options": getattr(params.scorers, estimator).model_dump(mode="json"), **result.meta},
               layout.scores_meta(estimator))
    _track(params, layout, "score", estimator)
    layout.publish()
    return layout.scores(estimator)


def query_dir(layout: Layout) -> Path:
    return layout.root / "query"


def pairwise_path(layout: Layout, estimator: str) -> Path:
    """``(n_query, n_train)`` train -> probe matrix (``np.load(path, mmap_mode="r")``); positive =
    proponent. Zero rows when the run had no probes or the estimator has no train -> probe scores."""
    return layout.root / "scores" / f"{estimator}.pairwise.npy"


@_locked
def run_query(params: Params, layout: Layout) -> Path:
    """Record the probes under ``query/``: ``probes.parquet`` and ``heldout.parquet`` (``label`` =
    the behaviour label) and ``query.json`` (the summary and fingerprint; ``kind: none`` and no
    tables when the run has no probes). The score stages make the same deterministic choice."""
    from cleanse.query import query_for

    query = query_for(params, load_staged(layout, params), load_base_model(params, layout))
    folder = query_dir(layout)
    if query is None:  # an earlier configuration's probes must not survive
        for name in ("probes.parquet", "heldout.parquet"):
            (folder / name).unlink(missing_ok=True)
    else:
        write_table(query.probes.to_frame(), folder / "probes.parquet")
        write_table(query.heldout.to_frame(), folder / "heldout.parquet")
    summary = query.summary() if query is not None else {"kind": "none"}
    write_json({**summary, "fingerprint": query_fingerprint(params)}, folder / "query.json")
    layout.publish()
    return folder


# ----------------------------------------------------------------------------- detect


@_locked
def run_detect(params: Params, layout: Layout, estimator: str) -> Path:
    """Write ``flags/<estimator>.parquet`` (``sample_id, score, rank, is_flagged``)."""
    from cleanse.detect import flag

    _require_fresh(layout.scores_meta(estimator), score_fingerprint(params, estimator), f"{estimator} scores")
    flags = flag(read_table(layout.scores(estimator)), params.detect)
    write_table(flags, layout.flags(estimator))
    write_json({"estimator": estimator, "fingerprint": detect_fingerprint(params, estimator),
                "n_flagged": int(flags["is_flagged"].sum()), "budget": params.detect.budget},
               layout.flags(estimator).with_suffix(".meta.json"))
    _track(params, layout, "detect", estimator)
    layout.publish()
    return layout.flags(estimator)


# ----------------------------------------------------------------------------- retrain


def retrain_without(params: Params, staged: StagedData, removed_ids: np.ndarray, query: Any = None) -> dict[str, float]:
    """Retrain with the same seed and recipe on the training split minus ``removed_ids``."""
    return retrained_without(params, staged, removed_ids, query)[1]


def retrained_without(params: Params, staged: StagedData, removed_ids: np.ndarray,
                      query: Any = None) -> tuple[Any, dict[str, float]]:
    """:func:`retrain_without`, also returning the retrained model (logged to MLflow); ``query``:
    the run's probes, whose held-out part is checked (:func:`evaluate_model`)."""
    from cleanse.models.architectures import default_device
    from cleanse.models.trainer import train_model

    kept = staged.train.without(removed_ids)
    model = train_model(_spec(params, staged.meta), kept.features, kept.label, params.model, seed=params.seed,
                        device=default_device())
    return model, {**evaluate_model(model, staged, query), "n_removed": int(len(staged.train) - len(kept)),
                   "n_corrupted_removed": int(staged.train.is_corrupted[np.isin(staged.train.sample_id, removed_ids)].sum())}


def random_ids(staged: StagedData, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 104729)
    return rng.choice(staged.train.sample_id, size=min(count, len(staged.train)), replace=False)


@_locked
def run_retrain(params: Params, layout: Layout, estimator: str) -> Path:
    """Retrain without the estimator's flags, and without a random set of the same size."""
    staged = load_staged(layout, params)
    meta_path = layout.flags(estimator).with_suffix(".meta.json")
    _require_fresh(meta_path, detect_fingerprint(params, estimator), f"{estimator} flags")
    flags = read_table(layout.flags(estimator))
    flagged = flags.filter(pl.col("is_flagged"))["sample_id"].to_numpy()
    started = time.perf_counter()
    from cleanse.cleansing import iterates

    if iterates(params, estimator):
        return _retrain_iteratively(params, layout, estimator, staged, started)
    cleaned_model, cleaned = retrained_without(params, staged, flagged, _probes(params, layout, staged))
    random = retrain_without(params, staged, random_ids(staged, flagged.size, params.seed))
    write_json({"estimator": estimator, "fingerprint": retrain_fingerprint(params, estimator),
                "seconds": time.perf_counter() - started, "n_flagged": int(flagged.size),
                "cleaned": cleaned, "random_same_count": random}, layout.retrain_result(estimator))
    _track(params, layout, "retrain", estimator, model=cleaned_model)
    layout.publish()
    return layout.retrain_result(estimator)


def _retrain_iteratively(params: Params, layout: Layout, estimator: str, staged: StagedData, started: float) -> Path:
    """Iterative cleansing (:mod:`cleanse.cleansing`); every round is kept in the result."""
    from cleanse.cleansing import cleanse_iteratively
    from cleanse.estimators import registry
    from cleanse.query import query_for

    model = load_model(layout.base_model)
    query = query_for(params, staged, model)
    scores = read_table(layout.scores(estimator))
    order = {sid: i for i, sid in enumerate(scores["sample_id"].to_list())}
    first = scores["score"].to_numpy()[[order[sid] for sid in staged.train.sample_id.tolist()]]
    loop = cleanse_iteratively(params, staged, registry.get(estimator), getattr(params.scorers, estimator), query,
                               base_model=model, first_score=first)
    removed = np.asarray(loop["removed_ids"], dtype=np.int64)
    cleaned = {**loop["final"], "n_removed": int(removed.size),
               "n_corrupted_removed": int(staged.train.is_corrupted[np.isin(staged.train.sample_id, removed)].sum())}
    random = retrain_without(params, staged, random_ids(staged, removed.size, params.seed))
    write_json({"estimator": estimator, "fingerprint": retrain_fingerprint(params, estimator),
                "seconds": time.perf_counter() - started, "n_flagged": int(removed.size), "iterative": True,
                "stopped": loop["stopped"], "rounds": loop["rounds"], "removed_ids": removed.tolist(),
                "cleaned": cleaned, "random_same_count": random}, layout.retrain_result(estimator))
    _track(params, layout, "retrain", estimator, model=loop["model"])  # the cleansed model, as the one-shot path logs
    layout.publish()
    return layout.retrain_result(estimator)


def _probes(params: Params, layout: Layout, staged: StagedData) -> Any:
    """The run's probes (the deterministic choice :func:`run_query` records), None without."""
    if params.query.kind == "none":
        return None
    from cleanse.query import query_for

    return query_for(params, staged, load_model(layout.base_model))


@_locked
def run_references(params: Params, layout: Layout) -> Path:
    """Baseline (the base model: no removal), oracle (exactly the corrupted removed), and random
    removal of as many samples as were corrupted."""
    staged = load_staged(layout, params)
    _require_fresh(layout.base_model / STAGE_META_NAME, train_fingerprint(params), "base model")
    baseline = evaluate_model(load_model(layout.base_model), staged, _probes(params, layout, staged))
    out: dict[str, Any] = {"fingerprint": references_fingerprint(params), "baseline": baseline}
    corrupted = staged.train.sample_id[staged.train.is_corrupted]
    if corrupted.size:
        out["oracle"] = retrain_without(params, staged, corrupted)
        out["random"] = retrain_without(params, staged, random_ids(staged, corrupted.size, params.seed))
    write_json(out, layout.retrain_result("references"))
    _track(params, layout, "references")
    layout.publish()
    return layout.retrain_result("references")


# ----------------------------------------------------------------------------- recommend


def recommend_dir(layout: Layout) -> Path:
    """``recommend.json`` (the choice, every candidate and the recommended model's evaluation) and
    ``models/recommended/`` (its weights)."""
    return layout.root / "recommend"


def recommended_model_dir(layout: Layout) -> Path:
    return layout.root / "models" / "recommended"


def _removed_ids(layout: Layout, estimator: str, result: dict[str, Any]) -> np.ndarray:
    if "removed_ids" in result:  # iterative cleansing records what it removed
        return np.asarray(result["removed_ids"], dtype=np.int64)
    flags = read_table(layout.flags(estimator))
    return flags.filter(pl.col("is_flagged"))["sample_id"].to_numpy().astype(np.int64)


@_locked
def run_recommend(params: Params, layout: Layout) -> Path:
    """Choose one cleaned model without ground truth (:mod:`cleanse.recommend`): "no removal" and
    every estimator's cleaned model compete on held-out probe behaviour (with probes) and validation
    accuracy; the winner's ranking is retrained at ``recommend.budget_factors`` times its budget
    and the best of those is kept. Writes ``recommend/recommend.json`` and ``models/recommended/``."""
    from cleanse.recommend import NO_REMOVAL, Candidate, budget_counts, choose, consistency, top_ids

    staged = load_staged(layout, params)
    references = read_json(layout.retrain_result("references"))
    _require_fresh(layout.retrain_result("references"), references_fingerprint(params), "reference retrains")
    started = time.perf_counter()
    query = _probes(params, layout, staged)
    nan = float("nan")

    def candidate(name: str, removed: np.ndarray, result: dict[str, Any], factor: float = 1.0) -> Candidate:
        return Candidate(name, removed, float(result["val_accuracy"]),
                         float(result.get("heldout_behaviour_rate", nan) if query is not None else nan), factor)

    candidates = [candidate(NO_REMOVAL, np.zeros(0, dtype=np.int64), references["baseline"])]
    results: dict[str, dict[str, Any]] = {}
    for name in params.estimators:
        _require_fresh(layout.retrain_result(name), retrain_fingerprint(params, name), f"{name} retrain result")
        results[name] = read_json(layout.retrain_result(name))
        removed = _removed_ids(layout, name, results[name])
        proposed = candidate(name, removed, results[name]["cleaned"])
        if results[name].get("iterative"):  # the loop's removals need not be its first ranking's top
            scores = read_table(layout.scores(name))
            proposed = replace(proposed, consistency=consistency(scores["sample_id"].to_numpy(),
                                                                 scores["score"].to_numpy(), removed))
        candidates.append(proposed)
    first = choose(candidates, stop_rate=params.cleansing.stop_rate)
    winner = candidates[first]
    trained: dict[int, Any] = {}  # ladder candidate index -> (model, evaluation)
    # The budget: the winner's own ranking at other counts (an iterative loop chose its own removals).
    if winner.estimator != NO_REMOVAL and not results[winner.estimator].get("iterative"):
        scores = read_table(layout.scores(winner.estimator))
        for factor, count in budget_counts(winner.n_removed, params.recommend.budget_factors, len(staged.train),
                                           params.detect.max_fraction):
            removed = top_ids(scores["sample_id"].to_numpy(), scores["score"].to_numpy(), count)
            model, result = retrained_without(params, staged, removed, query)
            candidates.append(candidate(winner.estimator, removed, result, factor))
            trained[len(candidates) - 1] = (model, result)
    contenders = [first, *trained]
    chosen_index = contenders[choose([candidates[i] for i in contenders], stop_rate=params.cleansing.stop_rate)]
    chosen = candidates[chosen_index]
    if chosen_index in trained:
        model, evaluation = trained[chosen_index]
    elif chosen.estimator == NO_REMOVAL:
        model, evaluation = load_model(layout.base_model), dict(references["baseline"])
    else:  # the same seed and recipe as the retrain stage: the same model
        model, evaluation = retrained_without(params, staged, chosen.removed_ids, query)
    evaluation = {**evaluation, "n_removed": chosen.n_removed,
                  "n_corrupted_removed": int(staged.train.is_corrupted[np.isin(staged.train.sample_id,
                                                                               chosen.removed_ids)].sum())}
    save_model(model, recommended_model_dir(layout), {"fingerprint": recommend_fingerprint(params),
                                                      "estimator": chosen.estimator, **evaluation})
    write_json({"fingerprint": recommend_fingerprint(params), "estimator": chosen.estimator,
                "budget_factor": chosen.budget_factor, "n_removed": chosen.n_removed,
                "removed_ids": chosen.removed_ids.tolist(), "cleaned": evaluation,
                "rule": "held-out probe behaviour (with probes), then validation accuracy, then fewer removed, "
                        "then the ranking that agrees with the removal",
                "candidates": [c.summary() for c in candidates], "chosen": chosen_index,
                "seconds": time.perf_counter() - started}, recommend_dir(layout) / "recommend.json")
    _track(params, layout, "recommend")
    layout.publish()
    return recommend_dir(layout) / "recommend.json"


# ----------------------------------------------------------------------------- tracking


def _track(params: Params, layout: Layout, stage: str, estimator: str | None = None, **extra: Any) -> None:
    """Log a finished stage to MLflow (:func:`cleanse.tracking.log_stage`) when tracking is on."""
    if params.tracking.enabled:
        from cleanse.tracking import log_stage

        log_stage(params, layout, stage, estimator, **extra)


# ----------------------------------------------------------------------------- whole run


@_locked
def run_all(params: Params, layout: Layout, *, resume: bool = True, log: Any = print) -> dict[str, Any]:
    """Run every stage in order, skipping those whose outputs are fresh; return the metrics."""
    from cleanse.report import run_report

    steps: list[tuple[str, Path, str, Any]] = [
        ("stage", layout.staged_meta, stage_fingerprint(params), lambda: run_stage(params, layout)),
        ("train", layout.base_model / STAGE_META_NAME, train_fingerprint(params), lambda: run_train(params, layout)),
        ("query", query_dir(layout) / "query.json", query_fingerprint(params), lambda: run_query(params, layout)),
    ]
    for name in params.estimators:
        steps += [
            (f"score {name}", layout.scores_meta(name), score_fingerprint(params, name),
             lambda name=name: run_score(params, layout, name)),
            (f"detect {name}", layout.flags(name).with_suffix(".meta.json"), detect_fingerprint(params, name),
             lambda name=name: run_detect(params, layout, name)),
            (f"retrain {name}", layout.retrain_result(name), retrain_fingerprint(params, name),
             lambda name=name: run_retrain(params, layout, name)),
        ]
    steps.append(("references", layout.retrain_result("references"), references_fingerprint(params),
                  lambda: run_references(params, layout)))
    steps.append(("recommend", recommend_dir(layout) / "recommend.json", recommend_fingerprint(params),
                  lambda: run_recommend(params, layout)))
    if params.tracking.enabled:  # the parent run opens now, so its duration is the pipeline's
        from cleanse.tracking import close_pipeline_run, open_pipeline_run

        open_pipeline_run(params, layout)
    try:
        for label, meta_path, expected, action in steps:
            if resume and is_fresh(meta_path, expected):
                log(f"[skip] {label}: up to date")
                continue
            started = time.perf_counter()
            action()
            log(f"[done] {label} ({time.perf_counter() - started:.1f} s)")
        metrics = run_report(params, layout)
    except BaseException:
        if params.tracking.enabled:
            import contextlib

            with contextlib.suppress(Exception):  # the pipeline's own error is the one to report
                close_pipeline_run(params, layout, status="FAILED")
        raise
    if params.tracking.enabled:
        close_pipeline_run(params, layout, metrics)
    return metrics

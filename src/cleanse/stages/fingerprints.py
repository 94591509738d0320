"""Fingerprints: what each stage's outputs depend on (its configuration and its inputs'
fingerprints), recorded in a ``meta.json`` written *last*. :func:`is_fresh` compares it, so a killed
run resumes from the first stage whose outputs are missing or stale, and a stage refuses inputs
produced with another configuration (:func:`require_fresh`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cleanse.config import Params, fingerprint
from cleanse.errors import ArtifactError
from cleanse.storage import read_json

STAGE_META_NAME = "meta.json"


def canonical(params: Params) -> Params:
    """``params`` with every default that stands for a value resolved, so that configurations
    meaning the same run fingerprint the same (``model.hidden: [64]`` and the MLP's built-in
    default; any ``hidden`` of a logistic regression; memorization's ``epochs: null`` and
    ``model.epochs``). Only used for fingerprints: the stages read ``params`` as given. The
    settings that follow ``query.kind`` (``auto``) need nothing here: :func:`cleanse.config.resolve_auto`
    replaces them with their values before ``params`` exists."""
    from cleanse import families

    return families.get(params.family).canonical(params)


# (absolute path, size, mtime_ns) -> sha256: a file is hashed once per process while unchanged.
_digests: dict[tuple[str, int, int], str] = {}


def is_local_file_source(source: str) -> bool:
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
    if not is_local_file_source(source):  # sklearn:digits, synthetic sources
        return None
    path = Path(source.removeprefix("file://")).expanduser().absolute()
    try:
        stat = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _digests:
        import hashlib

        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _digests[cache_key] = f"sha256:{digest.hexdigest()}"
    return _digests[cache_key]


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
    from cleanse import families

    # A family whose fitted model records more than params.model (the diffusion family's generation
    # settings) adds those parts; the others fingerprint as they always did.
    extra = tuple(families.get(params.family).train_inputs(params))
    return fingerprint("train", stage_fingerprint(params), canonical(params).model, *extra)


def score_fingerprint(params: Params, estimator: str) -> str:
    canon = canonical(params)
    parts: list[Any] = [train_fingerprint(params), estimator, canon.scorers.of(estimator)]
    if params.query.kind != "none":  # probes change what is scored; without them fingerprints stay as they were
        parts += _query_parts(params)
    return fingerprint("score", *parts)


def detect_fingerprint(params: Params, estimator: str) -> str:
    return fingerprint("detect", score_fingerprint(params, estimator), params.detect)


# Bumped when a retrain result gains keys that later stages read (val_accuracy, the held-out
# probes' behaviour rate), so results written before are recomputed rather than misread.
RETRAIN_RESULT_VERSION = 2


def _verify_inputs(params: Params) -> tuple[Any, ...]:
    """The params the family's "without these units" verification reads beyond the model (none
    for classification and regression, so their fingerprints are as they were), and
    ``evaluate.retrain_seeds`` when above 1."""
    from cleanse import families

    seeds = params.evaluate.retrain_seeds  # k = 1 adds nothing: fingerprints as they were
    return tuple(families.get(params.family).verify_inputs(params)) + ((f"retrain_seeds={seeds}",) if seeds > 1 else ())


def retrain_fingerprint(params: Params, estimator: str) -> str:
    from cleanse.cleansing import iterates

    if iterates(params, estimator):
        return fingerprint("retrain", detect_fingerprint(params, estimator), params.cleansing, RETRAIN_RESULT_VERSION,
                           *_verify_inputs(params))
    return fingerprint("retrain", detect_fingerprint(params, estimator), RETRAIN_RESULT_VERSION, *_verify_inputs(params))


def query_fingerprint(params: Params) -> str:
    return fingerprint("query", train_fingerprint(params), *_query_parts(params))


def references_fingerprint(params: Params) -> str:
    return fingerprint("references", train_fingerprint(params), RETRAIN_RESULT_VERSION, *_verify_inputs(params))


def recommend_fingerprint(params: Params) -> str:
    from cleanse import families

    parts: list[Any] = [references_fingerprint(params), params.recommend, params.detect.max_fraction]
    parts += [retrain_fingerprint(params, name) for name in params.estimators]
    if params.query.kind != "none":
        parts += [query_fingerprint(params), params.cleansing.stop_rate]
    parts += families.get(params.family).noise_estimate_inputs(params)  # the noise-count estimate's settings
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


def require_fresh(meta_path: Path, expected: str, what: str) -> None:
    if not meta_path.is_file():
        raise ArtifactError(f"missing {what} ({meta_path}); run the stage that produces it first")
    if not is_fresh(meta_path, expected):
        raise ArtifactError(
            f"{what} at {meta_path.parent} was produced with another configuration; rerun that stage "
            "(or `cleanse run`) with the current params"
        )

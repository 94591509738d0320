"""S3 as a location for inputs and for the output root (``--out s3://bucket/prefix``).

An S3 output root is mirrored by a local *work folder*: every stage writes there with the atomic
helpers of :mod:`cleanse.storage`, and :func:`publish` then uploads what changed. S3 never holds
half an object (a PUT, and a multipart upload, become visible only once complete), and the order
of a publish keeps the stage records honest:

1. remote ``meta.json`` / ``*.meta.json`` records that are about to change are deleted,
2. the data files are uploaded,
3. the records are uploaded last.

So a record on S3 always describes the data beside it; a publish cut short (credentials revoked,
server stopped) leaves a stage without a record, and a later run redoes or re-uploads it.
:func:`pull` brings the bucket's copy into the work folder first, so a run resumes from S3 on any
machine.

Credentials come only from boto3's own chain (environment variables, ``AWS_PROFILE`` and the
shared config/credentials files); the endpoint from ``AWS_ENDPOINT_URL`` (boto3 reads it itself).
Nothing here logs or stores them. Each request is retried a bounded number of times
(``CLEANSE_S3_ATTEMPTS``, default 3, botocore's "standard" mode with exponential backoff) with
short connect / read timeouts, so a stopped server becomes an error in seconds, not minutes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleanse.errors import ArtifactError

RECORD_NAMES = ("meta.json",)
_CLIENT_LOCK = threading.Lock()
_CLIENTS: dict[tuple[str, ...], Any] = {}


class RemoteError(ArtifactError):
    """S3 could not be used: wrong credentials, a missing bucket, or an unreachable server."""


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("s3://")


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key prefix has no leading or trailing slash."""
    if not is_s3(uri):
        raise RemoteError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise RemoteError(f"no bucket in {uri!r}; expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def attempts() -> int:
    return max(1, int(os.environ.get("CLEANSE_S3_ATTEMPTS", "3")))


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def client() -> Any:
    """A boto3 S3 client with bounded retries (one per endpoint, credentials and attempts)."""
    import boto3
    from botocore.config import Config

    key = (endpoint() or "", os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
           os.environ.get("AWS_PROFILE", ""), str(attempts()))
    with _CLIENT_LOCK:
        if key not in _CLIENTS:
            config = Config(retries={"max_attempts": attempts(), "mode": "standard"}, connect_timeout=3,
                            read_timeout=30, signature_version="s3v4", s3={"addressing_style": "path"})
            session = boto3.session.Session()
            _CLIENTS[key] = session.client("s3", endpoint_url=endpoint(), config=config,
                                           region_name=session.region_name or "us-east-1")
        return _CLIENTS[key]


def explain(exc: BaseException, uri: str) -> RemoteError:
    """A :class:`RemoteError` that says what went wrong with ``uri`` (never echoing credentials)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    where = endpoint() or "AWS S3"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return RemoteError(f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                           "or AWS_PROFILE (credentials are never read from params.yaml)")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "AuthorizationHeaderMalformed") or (code in ("AccessDenied", "403") or status == 403):
            return RemoteError(f"{uri}: S3 at {where} refused the credentials ({code or status}); check "
                               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if code in ("NoSuchBucket", "404") and status == 404 and code != "NoSuchKey":
            return RemoteError(f"{uri}: bucket {bucket!r} does not exist at {where}; create it first")
        if code in ("NoSuchKey",):
            return RemoteError(f"{uri}: no such object")
        return RemoteError(f"{uri}: S3 error {code or status}: {exc}")
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError,
                        ConnectionError, TimeoutError)):
        return RemoteError(f"{uri}: cannot reach S3 at {where} after {attempts()} attempts "
                           f"({type(exc).__name__}); is the server running?")
    return RemoteError(f"{uri}: {type(exc).__name__}: {exc}")


def _call(uri: str, method: str, **kwargs: Any) -> Any:
    try:
        return getattr(client(), method)(**kwargs)
    except Exception as exc:  # every botocore failure becomes one clear RemoteError
        raise explain(exc, uri) from exc


def check_location(uri: str) -> None:
    """Fail fast (before anything is computed) when the bucket is missing or the credentials are wrong."""
    bucket, _ = split_uri(uri)
    _call(uri, "head_bucket", Bucket=bucket)


def _key(prefix: str, relative: str) -> str:
    return f"{prefix}/{relative}" if prefix else relative


def list_objects(uri: str) -> dict[str, dict[str, Any]]:
    """``{relative key: {"size", "etag", "mtime"}}`` for every object under ``uri``."""
    bucket, prefix = split_uri(uri)
    found: dict[str, dict[str, Any]] = {}
    token: dict[str, str] = {}
    while True:
        page = _call(uri, "list_objects_v2", Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", **token)
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) + 1:] if prefix else item["Key"]
            if relative and not relative.endswith("/"):
                found[relative] = {"size": item["Size"], "etag": item["ETag"].strip('"'),
                                   "mtime": item["LastModified"].timestamp()}
        if not page.get("IsTruncated"):
            return found
        token = {"ContinuationToken": page["NextContinuationToken"]}


def download(uri: str, target: Path) -> Path:
    """Download one object to ``target`` atomically."""
    from cleanse.storage import atomic_path

    from botocore.exceptions import ClientError

    bucket, key = split_uri(uri)
    with atomic_path(target) as tmp:
        try:
            client().download_file(bucket, key, str(tmp))
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                check_location(f"s3://{bucket}")  # a missing bucket is named as such
                raise RemoteError(f"{uri}: no such object") from exc
            raise explain(exc, uri) from exc
        except Exception as exc:
            raise explain(exc, uri) from exc
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _same(path: Path, remote: dict[str, Any]) -> bool:
    """True when the local file has the remote object's bytes (size, and md5 for single-part ETags)."""
    if path.stat().st_size != remote["size"]:
        return False
    return "-" in remote["etag"] or _md5(path) == remote["etag"]


def _local_files(root: Path) -> list[str]:
    """Relative paths of finished files under ``root`` (the atomic writers' ``.name.*.tmp`` and
    sqlite's journals excluded)."""
    out = []
    for path in root.rglob("*"):
        if (path.is_file() and not path.name.startswith(".") and ".tmp" not in path.suffixes
                and not path.name.endswith(("-journal", "-wal", "-shm"))):  # sqlite's transient files
            out.append(path.relative_to(root).as_posix())
    return sorted(out)


def is_record(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return name in RECORD_NAMES or name.endswith(".meta.json") or relative.startswith("retrain/")


@dataclass(frozen=True)
class Mirror:
    """An S3 output root and the local work folder that stages its artifacts."""

    uri: str
    work: Path

    def local_path(self, relative: str) -> Path:
        """Where the object ``relative`` (its key below the prefix) lives in the work folder.

        Keys come from the bucket, i.e. from whoever can write to it: an absolute key, a ``..``
        segment, or a path that resolves (through a symlink) outside the work folder is refused."""
        where = f"{self.uri.rstrip('/')}: bucket key {relative!r}"  # repr: a key may hold newlines
        if relative.startswith(("/", "\\")) or ".." in relative.replace("\\", "/").split("/"):
            raise RemoteError(f"{where} leaves the work folder {self.work} (absolute or '..'); refusing to pull")
        try:
            root, local = self.work.resolve(), (self.work / relative).resolve()
        except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
            raise RemoteError(f"{where} is not a usable local path ({exc}); refusing to pull") from exc
        if root not in local.parents:
            raise RemoteError(f"{where} resolves outside the work folder {self.work} (a symlink?); refusing to pull")
        return self.work / relative

    def pull(self) -> int:
        """Download objects that are missing locally, or newer remotely than a differing local copy;
        returns how many were downloaded. Every key is checked (:meth:`local_path`) before the first
        download, so a hostile key fails the pull with nothing written."""
        count = 0
        listed = list_objects(self.uri)
        locals_ = {relative: self.local_path(relative) for relative in listed}
        for relative, remote in listed.items():
            local = locals_[relative]
            if local.is_file() and (_same(local, remote) or local.stat().st_mtime >= remote["mtime"]):
                continue
            download(f"{self.uri.rstrip('/')}/{relative}", local)
            count += 1
        return count

    def publish(self) -> int:
        """Upload what changed (records deleted first, data next, records last); returns the count."""
        bucket, prefix = split_uri(self.uri)
        remote = list_objects(self.uri)
        changed = [rel for rel in _local_files(self.work)
                   if rel not in remote or not _same(self.work / rel, remote[rel])]
        records = [rel for rel in changed if is_record(rel)]
        data = [rel for rel in changed if not is_record(rel)]
        stale = [rel for rel in records if rel in remote]
        if stale:
            _call(self.uri, "delete_objects", Bucket=bucket,
                  Delete={"Objects": [{"Key": _key(prefix, rel)} for rel in stale], "Quiet": True})
        for rel in data + records:
            try:
                client().upload_file(str(self.work / rel), bucket, _key(prefix, rel))
            except Exception as exc:
                raise explain(exc, f"{self.uri.rstrip('/')}/{rel}") from exc
        return len(changed)


def work_folder(uri: str) -> Path:
    """Where an S3 output root is staged: ``$CLEANSE_WORK_DIR/<bucket>/<prefix>`` (default
    ``~/.cache/cleanse/s3``), stable so that a killed run resumes locally too."""
    bucket, prefix = split_uri(uri)
    base = Path(os.environ.get("CLEANSE_WORK_DIR") or Path.home() / ".cache" / "cleanse" / "s3")
    return (base / bucket / prefix).expanduser().absolute()

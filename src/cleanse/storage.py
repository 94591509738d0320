"""The only module that touches files: atomic writes, tables, tensors and the output layout.

Every write goes to a temporary name in the destination folder and is renamed into place, so a
killed run leaves either the old artifact or the new one, never half of one. Tables are parquet
(via polars), tensors are safetensors or ``.npy`` (memory-mappable), metadata is JSON. Nothing is
pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cleanse.errors import ArtifactError, DataError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(data: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing artifact {path}; run the stage that produces it first")
    return json.loads(path.read_text())


def write_text(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(data: bytes, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_table(frame: pl.DataFrame, path: str | Path) -> Path:
    """Write a polars table as parquet. Statistics are off so equal tables give equal bytes."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, statistics=False, compression="zstd")
    return Path(path)


def read_table(path: str | Path) -> pl.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing artifact {path}; run the stage that produces it first")
    return pl.read_parquet(path)


def write_npy(array: np.ndarray, path: str | Path) -> Path:
    """Write an ``.npy`` file (readable with ``np.load(path, mmap_mode='r')``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
    return Path(path)


def write_tensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write torch tensors as safetensors."""
    from safetensors.torch import save_file

    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)
    return Path(path)


def read_tensors(path: str | Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing artifact {path}; run the stage that produces it first")
    return load_file(str(path))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def fetch_input(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Return a local path for ``uri``; ``s3://`` objects are downloaded (credentials from the
    environment or the AWS profile, endpoint from ``AWS_ENDPOINT_URL`` when set)."""
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    if not is_remote(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise DataError(f"data.source: file not found: {path}")
        if not path.is_file():
            raise DataError(f"data.source: not a file: {path}")
        return path
    if not uri.startswith("s3://"):
        raise DataError(f"data.source: unsupported URI scheme in {uri!r}; use a local path or s3://")
    from cleanse import remote

    target = Path(cache_dir or tempfile.mkdtemp(prefix="cleanse-s3-")) / Path(uri).name
    try:
        remote.download(uri, target)
    except remote.RemoteError as exc:
        raise DataError(f"data.source: {exc}") from exc
    return target


# scheme:/ or scheme:// at the start (a Path has already collapsed '//' to '/'); two letters at
# least, so that nothing shorter than a scheme name is mistaken for one.
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]+):/")
# '#' and '?' end the path of the sqlite URI of <out>/mlflow.db, and '%' starts an escape in it.
_URI_BREAKING = "#?%"


def check_out_scheme(root: str | Path) -> str:
    """``--out`` as a string: ``s3://bucket/prefix`` (normalised) or a local path (``file://``
    stripped). Any other scheme is refused, before any ``Path`` normalisation could turn
    ``http://x/y`` into the local folder ``http:/x/y``."""
    text = str(root)
    match = _SCHEME.match(text)
    if match:
        scheme = match["scheme"].lower()
        if scheme == "s3":
            return "s3://" + text.split(":/", 1)[1].lstrip("/")
        if scheme == "file":
            text = "/" + text.split(":/", 1)[1].lstrip("/")
        else:
            from cleanse.uris import redact

            raise ArtifactError(f"--out {redact(text)}: unsupported URI scheme {scheme!r}; use a local path or "
                                "s3://bucket/prefix")
    bad = sorted({char for char in text if char in _URI_BREAKING})
    if bad:
        raise ArtifactError(f"--out {text}: the character(s) {' '.join(bad)} are not allowed in a local output path "
                            "(they would cut the MLflow store's sqlite URI); rename the folder")
    if not text.strip():
        raise ArtifactError("--out: empty path")
    return text


def check_writable(root: Path) -> None:
    """Refuse an output folder that cannot be created or written, naming the reason, before any
    stage computes (instead of failing at the first write)."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ArtifactError(f"--out {root}: {existing} is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except (AttributeError, OSError):
            read_only = False
        reason = "is on a read-only filesystem" if read_only else "is not writable (permission denied)"
        raise ArtifactError(f"--out {root}: {existing} {reason}; choose another --out")


@dataclass(frozen=True)
class Layout:
    """Where each artifact lives under an output root (``--out``)."""

    root: Path
    remote: str | None = None  # an s3:// output root that ``root`` stages (see cleanse.remote)

    @classmethod
    def at(cls, root: str | Path) -> Layout:
        """The layout of a local folder, or of an ``s3://bucket/prefix`` staged in a local work
        folder: the bucket is checked (credentials, existence) and its artifacts pulled first.

        Checked before anything is created: the scheme (local paths and ``s3://`` only), characters
        that would cut the MLflow store's ``sqlite:///<out>/mlflow.db`` URI, and that the folder can
        be created and written (not under a file, not on a read-only filesystem)."""
        root = check_out_scheme(root)
        if root.startswith("s3://"):
            from cleanse import remote

            uri = root  # normalised by check_out_scheme (also "s3:/b", as a Path prints "s3://b")
            remote.check_location(uri)
            mirror = remote.Mirror(uri, remote.work_folder(uri))
            mirror.work.mkdir(parents=True, exist_ok=True)
            mirror.pull()
            return cls(mirror.work, uri)
        local = Path(root).expanduser().absolute()
        if local.exists() and not local.is_dir():
            raise ArtifactError(f"--out {local} exists and is not a directory")
        check_writable(local)
        return cls(local)

    def publish(self) -> None:
        """Upload new and changed artifacts to the S3 output root (no-op for a local root)."""
        if self.remote is not None:
            from cleanse import remote

            remote.Mirror(self.remote, self.root).publish()

    def location(self, path: Path) -> str:
        """Where ``path`` (under ``root``) ends up: an s3:// URI for a remote root, else the path."""
        if self.remote is None:
            return str(path)
        return f"{self.remote.rstrip('/')}/{path.relative_to(self.root).as_posix()}"

    @property
    def staged(self) -> Path:
        return self.root / "data" / "staged"

    def split(self, name: str) -> Path:
        return self.staged / f"{name}.parquet"

    @property
    def staged_meta(self) -> Path:
        return self.staged / "meta.json"

    @property
    def base_model(self) -> Path:
        return self.root / "models" / "base"

    def retrain_model(self, name: str) -> Path:
        return self.root / "models" / "retrain" / name

    def scores(self, estimator: str) -> Path:
        return self.root / "scores" / f"{estimator}.parquet"

    def scores_meta(self, estimator: str) -> Path:
        return self.root / "scores" / f"{estimator}.meta.json"

    def flags(self, estimator: str) -> Path:
        return self.root / "flags" / f"{estimator}.parquet"

    def retrain_result(self, name: str) -> Path:
        return self.root / "retrain" / f"{name}.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    def ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)

"""Where MLflow writes: ``MLFLOW_TRACKING_URI`` (a server) or the embedded sqlite store
``<out>/mlflow.db``, created and migrated in a temporary file and linked into place, so a kill or a
full disk never leaves a half-made store. Also the one-line error when MLflow is not installed."""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import subprocess
import threading
from pathlib import Path

from cleanse.errors import CleanseError
from cleanse.lock import pid_alive
from cleanse.storage import Layout
from cleanse.uris import redact

# One process-wide lock: the run record (read-modify-write) and run creation must not interleave
# between Prefect's task threads. Logging is cheap next to the stages, so it is held throughout.
_LOCK = threading.RLock()


class TrackingError(CleanseError):
    """MLflow refused or could not be reached; the message names the (redacted) tracking URI."""


# ----------------------------------------------------------------------------- URIs and store


def tracking_uri(layout: Layout) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layout.root / 'mlflow.db'}"


def display_uri(layout: Layout) -> str:
    """The tracking URI with any password stripped: the only form that is printed or logged."""
    return redact(tracking_uri(layout))


def artifact_location(layout: Layout) -> str:
    """Artifacts of a local store: ``<out>/mlartifacts``, which for an S3 output root is an s3://
    URI (MLflow's S3 store uses boto3's credential chain and ``MLFLOW_S3_ENDPOINT_URL``, which
    defaults here to ``AWS_ENDPOINT_URL``)."""
    if layout.remote is None:
        return (layout.root / "mlartifacts").as_uri()
    from cleanse.remote import endpoint

    url = endpoint()
    if url:
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", url)
    return f"{layout.remote.rstrip('/')}/mlartifacts"


def git_commit(cwd: Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for a server or other database)."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


@functools.lru_cache(maxsize=1)
def _schema_head() -> str:
    """MLflow's latest schema revision (reading alembic's script directory takes a while)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


# (path, inode) of stores found complete in this process: checked once, not before every call
_complete: set[tuple[str, int]] = set()


def _store_problem(path: Path) -> str | None:
    """Why the sqlite file at ``path`` is not a complete MLflow store, or None when it is one.

    A migration killed half-way (or stopped by a full disk) leaves ``_alembic_tmp_*`` tables or an
    ``alembic_version`` behind MLflow's head, and every later run then fails inside alembic."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
            version = (connection.execute("select version_num from alembic_version").fetchone()
                       if "alembic_version" in tables else None)
    except sqlite3.DatabaseError as exc:
        return f"not a readable sqlite database ({exc})"
    leftovers = sorted(name for name in tables if name.startswith("_alembic_tmp"))
    if leftovers:
        return f"interrupted schema migration ({', '.join(leftovers)})"
    if version is None:
        return "no schema version (its creation was interrupted)"
    if version[0] != _schema_head():
        return f"schema version {version[0]}, not MLflow's {_schema_head()}"
    return None


def _holds_runs(path: Path) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
            return any(connection.execute(f"select count(*) from {table}").fetchone()[0] > 0  # noqa: S608 (fixed names)
                       for table in ("runs", "registered_models") if table in tables)
    except sqlite3.DatabaseError:
        return True  # unreadable: it may hold runs, so it is never deleted


def _temporaries(path: Path) -> list[Path]:
    """Temporary stores (and their journals) being created next to ``path``: ``.<name>.<pid>.<hex>.tmp*``."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp*"))


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporary stores whose creating process is gone (killed while migrating)."""
    for tmp in _temporaries(path):
        parts = tmp.name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        if pid is None or (pid != os.getpid() and not pid_alive(pid)):
            tmp.unlink(missing_ok=True)


def _create_store(path: Path, artifact_root: str) -> None:
    """Create and fully migrate a store in a temporary sibling, then link it into place.

    ``os.link`` never replaces: when another process made the store first, its store (and any run
    already in it) is kept and this one is dropped. Killed or out of space at any moment, this
    leaves no ``path`` at all, only a temporary file that the next call removes."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", artifact_root)
        store.engine.dispose()
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        for leftover in path.parent.glob(f"{tmp.name}*"):
            leftover.unlink(missing_ok=True)


def ensure_store(layout: Layout) -> None:
    """Make sure the embedded sqlite store is complete before MLflow opens it (no-op for a server).

    A half-made store (creation killed or out of space with an older cleanse, or by hand) that
    holds no runs is rebuilt; one that holds runs is refused with a one-line error."""
    path = _sqlite_file(tracking_uri(layout))
    if path is None:
        return
    with _LOCK:
        if path.exists() and (str(path), path.stat().st_ino) in _complete:
            return
        _remove_stale_temporaries(path)
        if path.exists():
            problem = _store_problem(path)
            if problem is None:
                _complete.add((str(path), path.stat().st_ino))
                return
            if _holds_runs(path):
                raise TrackingError(f"MLflow store {path}: {problem}, and it holds runs; back it up, then run "
                                    f"`mlflow db upgrade sqlite:///{path}` or move it away")
            path.unlink()
        _create_store(path, artifact_location(layout))


def require_mlflow() -> None:
    """Refuse in one line, naming the extra, when MLflow (optional: ``cleanse[mlflow]``) is missing."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise TrackingError("MLflow is not installed: pip install 'cleanse[mlflow]' (or set tracking.enabled: false)")

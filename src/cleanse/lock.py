"""One writer per output root: an exclusive lock on ``<out>/.cleanse.lock``.

Two ``cleanse`` processes writing the same ``--out`` would interleave stages of different
configurations (or race on ``mlflow.db``), so every writer takes this lock first; a second one is
refused with an :class:`OutputLockedError` naming the holder (pid, host, start time, command), or
waits up to ``CLEANSE_LOCK_WAIT`` seconds for it.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when the holder dies,
``kill -9`` included: a dead holder never blocks the next run. The one way a dead holder's lock
can outlive it is a forked child that inherited the descriptor (e.g. a multiprocessing worker
left behind); such a lock, whose recorded pid is no longer alive on this host, is taken over.

A fresh holder first removes the temporaries (``.<name>.*.tmp``) a killed writer left in the
artifact folders, so a rerun after ``kill -9`` leaves none behind.

The lock is reentrant within a process (the CLI holds it for its lifetime, and the pipeline's
stage functions, which also take it, may run in threads of that process) and is inherited by
child processes through ``CLEANSE_OUT_LOCKS`` (a process-based task runner under a flow that
holds the lock). For an ``s3://`` output root the lock is on the local work folder that stages
it (:class:`cleanse.storage.Layout` ``root``); two machines sharing one bucket prefix are not
guarded.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cleanse.errors import ArtifactError

LOCK_NAME = ".cleanse.lock"
_ENV = "CLEANSE_OUT_LOCKS"  # os.pathsep-separated "<lock path>=<token>" entries held by an ancestor


class OutputLockedError(ArtifactError):
    """Another live process is writing the same output root."""


class _Held:
    def __init__(self, fd: int | None, token: str, created: list[Path] | None = None) -> None:
        self.fd = fd  # None: held by an ancestor process (inherited through the environment)
        self.token = token
        self.count = 0
        self.created = created or []  # folders acquire made, removed on release when left empty


_held: dict[str, _Held] = {}
_guard = threading.RLock()


def lock_path(root: str | Path) -> Path:
    return Path(root).expanduser().absolute() / LOCK_NAME


def holder(root: str | Path) -> dict[str, Any] | None:
    """What the lock file records about its (last) holder, or None when there is none."""
    try:
        text = lock_path(root).read_text()
    except OSError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another cleanse process (holder not recorded yet)"
    command = " ".join(str(part) for part in info.get("argv", []))[:120]
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            + (f" ({command})" if command else ""))


def pid_alive(pid: int) -> bool:
    """True when ``pid`` is a live process on this host (another user's counts; a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # an exited child not yet reaped still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _inherited(path: Path) -> str | None:
    """The token of ``path`` when an ancestor process holds it and passed it down."""
    for entry in os.environ.get(_ENV, "").split(os.pathsep):
        name, _, token = entry.rpartition("=")
        if name == str(path) and token:
            info = holder(path.parent)
            if info is not None and info.get("token") == token:
                return token
    return None


def _export(path: Path, token: str | None) -> None:
    entries = [entry for entry in os.environ.get(_ENV, "").split(os.pathsep)
               if entry and entry.rpartition("=")[0] != str(path)]
    if token is not None:
        entries.append(f"{path}={token}")
    if entries:
        os.environ[_ENV] = os.pathsep.join(entries)
    else:
        os.environ.pop(_ENV, None)


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on the file now at ``path``, or None when it is held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        # The holder we waited on may have unlinked (released) the file, or a takeover replaced it:
        # a lock on an inode that is no longer at ``path`` guards nothing, so retry on the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _recorded_dead(info: dict[str, Any] | None) -> bool:
    return (info is not None and info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int)
            and not pid_alive(info["pid"]))


def _take_over_if_stale(path: Path) -> bool:
    """Remove a lock file whose holder is recorded as a dead process of this host (its flock is
    kept only by an orphaned child); True when it was removed."""
    if not _recorded_dead(holder(path.parent)):
        return False  # the usual case: a live holder, and no guard file is made
    guard_fd = os.open(path.with_name(LOCK_NAME + ".takeover"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(guard_fd, fcntl.LOCK_EX)  # one taker at a time, so two never both remove and recreate
        if not _recorded_dead(holder(path.parent)):  # checked again: another taker may have been first
            return False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True
    finally:
        os.close(guard_fd)


# The artifact folders under an output root (cleanse.storage.Layout) whose temporaries are ours.
ARTIFACT_DIRS = ("data", "models", "scores", "flags", "retrain", "query", "reports", "cache", "mlartifacts")


def _sweep_temporaries(root: Path) -> int:
    """Remove the atomic writers' temporaries (``.<name>.<random>.tmp``, cleanse.storage.atomic_path)
    that a killed writer left in the artifact folders. Only called by a fresh lock holder: no other
    writer of this root is alive, so every such file is garbage. Returns how many were removed."""
    removed = 0
    for folder in ARTIFACT_DIRS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in base.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    path.unlink()
                    removed += 1
    return removed


def acquire(root: str | Path, *, wait: float | None = None) -> None:
    """Take the lock on the output root ``root`` (reentrant). Raises :class:`OutputLockedError`
    naming the holder when another live process holds it for longer than ``wait`` seconds
    (default ``CLEANSE_LOCK_WAIT``, else 0: refuse at once)."""
    path = lock_path(root)
    key = str(path)
    with _guard:
        held = _held.get(key)
        if held is not None:
            held.count += 1
            return
        token = _inherited(path)
        if token is not None:
            held = _held[key] = _Held(None, token)
            held.count = 1
            return
        if wait is None:
            wait = float(os.environ.get("CLEANSE_LOCK_WAIT", "0") or 0)
        deadline = time.monotonic() + max(wait, 0.0)
        created = [folder for folder in [path.parent, *path.parent.parents] if not folder.exists()]
        while True:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = _try_lock(path)
                if fd is None and _take_over_if_stale(path):
                    continue
            except OSError as exc:  # a read-only filesystem, --out under a file, no permission
                raise ArtifactError(f"--out {path.parent}: cannot create the lock file {LOCK_NAME} "
                                    f"({exc.strerror or exc})") from None
            if fd is not None:
                break
            if time.monotonic() >= deadline:
                raise OutputLockedError(
                    f"--out {path.parent} is in use by {_describe(holder(path.parent))}; wait for it to finish, "
                    f"use another --out, or set CLEANSE_LOCK_WAIT=<seconds> to wait")
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))
        _sweep_temporaries(path.parent)
        token = uuid.uuid4().hex
        info = {"pid": os.getpid(), "host": socket.gethostname(), "token": token, "argv": sys.argv[:8],
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        held = _held[key] = _Held(fd, token, created)
        held.count = 1
        _export(path, token)


def release(root: str | Path) -> None:
    """Undo one :func:`acquire`; the last one removes the lock file and unlocks it."""
    path = lock_path(root)
    key = str(path)
    with _guard:
        held = _held.get(key)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _held[key]
        if held.fd is None:
            return
        _export(path, None)
        # Unlink while still locked: a waiter that opened this inode sees it is gone and retries.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(held.fd).st_ino:
                path.unlink()
        os.close(held.fd)
        for folder in held.created:  # deepest first: a refused bad input leaves no empty --out behind
            try:
                folder.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def out_lock(root: str | Path, *, wait: float | None = None) -> Iterator[None]:
    """``with out_lock(layout.root): ...`` holds the output root's lock for the block."""
    acquire(root, wait=wait)
    try:
        yield
    finally:
        release(root)


def hold_for_process(root: str | Path) -> None:
    """Take the lock until this process exits (the CLI: one command, one output root)."""
    acquire(root)
    atexit.register(release, root)

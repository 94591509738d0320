"""Security of the local stack and of the S3 mirror, against real processes.

- Every listening port of the stack's SeaweedFS (found from the process's own sockets, not from a
  list of ports we expect) refuses an unauthenticated HTTP list, upload, read and delete, while the
  signed S3 client still works.
- ``stack down`` only signals a pid that is still the process ``up`` started.
- ``Mirror.pull`` keeps every bucket key inside the work folder.
- A password inside ``MLFLOW_TRACKING_URI`` is never printed.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ops.stack import Stack, descendants, identity

CLEANSE = Path(sys.executable).parent / "cleanse"


# ----------------------------------------------------------------------------- helpers


def _socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    return inodes


def listening(pids: list[int]) -> tuple[list[int], list[str]]:
    """TCP ports and unix socket paths on which ``pids`` listen (from /proc/net)."""
    inodes = _socket_inodes(pids)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    paths = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # state 01 with the listening flag (0x10000) and a filesystem path
        if len(fields) >= 8 and fields[6] in inodes and int(fields[3], 16) & 0x10000 and fields[7].startswith("/"):
            paths.add(fields[7])
    return sorted(ports), sorted(paths)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _request(target: int | str, method: str, path: str, body: bytes | None = None) -> tuple[int | None, bytes]:
    """HTTP status and body of an unsigned request to a TCP port or a unix socket; ``None`` when
    the listener does not speak HTTP/1.1 (gRPC) or closes the connection."""
    headers = {"Accept": "application/json", "Content-Type": "application/octet-stream"}
    try:
        if isinstance(target, int):
            request = urllib.request.Request(f"http://127.0.0.1:{target}{path}", data=body, method=method,
                                             headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()
        connection = _UnixConnection(target, timeout=5)
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None, b""


# Unauthenticated attempts in the dialects of every SeaweedFS listener (S3, filer, master, volume).
ATTEMPTS = [
    ("list", "GET", "/cleanse?list-type=2", None),  # S3 ListObjectsV2
    ("list", "GET", "/", None),  # S3 ListBuckets
    ("list", "GET", "/buckets/cleanse/", None),  # filer directory listing
    ("list", "GET", "/dir/status", None),  # master topology
    ("list", "GET", "/vol/status", None),
    ("read", "GET", "/cleanse/secret/object.bin", None),
    ("read", "GET", "/buckets/cleanse/secret/object.bin", None),
    ("upload", "PUT", "/cleanse/evil.txt", b"evil"),
    ("upload", "PUT", "/buckets/cleanse/evil.txt", b"evil"),
    ("upload", "GET", "/dir/assign", None),  # master: hands out a file id to write to
    ("upload", "POST", "/submit", b"evil"),  # master: assigns and stores in one call
    ("upload", "PUT", "/1,01deadbeef", b"evil"),  # volume: a blob under a made-up file id
    ("read", "GET", "/1,01deadbeef", None),
    ("delete", "DELETE", "/cleanse/secret/object.bin", None),
    ("delete", "DELETE", "/buckets/cleanse/secret/object.bin", None),
    ("delete", "DELETE", "/1,01deadbeef", None),
]


@pytest.fixture
def signed(s3_env):
    import boto3

    return boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"])


# ----------------------------------------------------------------------------- SeaweedFS listeners


def test_no_listener_serves_the_bucket_without_credentials(s3_server, signed):
    body = os.urandom(2_000_000)  # more than one chunk: the data lives on the volume server
    signed.put_object(Bucket="cleanse", Key="secret/object.bin", Body=body)
    pid = s3_server.state()["processes"]["s3"]["pid"]
    ports, sockets = listening([pid, *descendants(pid)])
    recorded = s3_server.state()["ports"]
    # the listeners found are the real ones: S3, master, volume, filer (HTTP and gRPC twins)
    assert {recorded[name] for name in ("s3", "master", "volume", "filer")} <= set(ports), (ports, recorded)
    opened = []
    for target in [*ports, *sockets]:
        for kind, method, path, data in ATTEMPTS:
            status, answer = _request(target, method, path, data)
            if status is None or not 200 <= status < 300:
                continue
            # The master still answers its cluster-status page ("/"): volume counts and server
            # addresses, no bucket or key name. Any other success is a hole.
            if kind in ("upload", "delete") or b"cleanse" in answer or b"object.bin" in answer:
                opened.append((target, kind, method, path, status, answer[:200]))
    assert opened == []
    # the volume server refuses for want of a JWT, not because the file id is unknown
    assert _request(recorded["volume"], "PUT", "/1,01deadbeef", b"evil")[0] == 401
    # nothing was changed, and the signed client still lists, reads, writes and deletes
    keys = [item["Key"] for item in signed.list_objects_v2(Bucket="cleanse")["Contents"]]
    assert "secret/object.bin" in keys and not any("evil" in key for key in keys)
    assert signed.get_object(Bucket="cleanse", Key="secret/object.bin")["Body"].read() == body
    signed.delete_object(Bucket="cleanse", Key="secret/object.bin")
    assert "secret/object.bin" not in [item["Key"] for item in
                                       signed.list_objects_v2(Bucket="cleanse").get("Contents", [])]


def test_stack_state_folder_is_private(s3_server):
    assert (s3_server.dir.stat().st_mode & 0o777) == 0o700
    for name in ("credentials.env", "s3.json", "security.toml"):
        assert ((s3_server.dir / name).stat().st_mode & 0o777) == 0o600, name
    assert "jwt.signing" in (s3_server.dir / "security.toml").read_text()


# ----------------------------------------------------------------------------- stack down


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


def _write_state(directory: Path, processes: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state.json").write_text(json.dumps({"urls": {}, "ports": {}, "processes": processes}))


@pytest.mark.parametrize("record", ["new", "old"])
def test_stale_state_never_kills_an_unrelated_process(tmp_path, record):
    """A state file outliving its stack names a pid that now belongs to someone else."""
    victim = _sleeper()
    try:
        if record == "new":  # identity recorded: same pid, but another start time and command line
            entry = {"pid": victim.pid, "start_time": 1, "cmdline": ["/venv/bin/weed", "server", "-dir=x"],
                     "argv": ["/venv/bin/weed", "server"]}
        else:  # a state file written before identities were recorded
            entry = {"pid": victim.pid, "argv": [str(Path(sys.executable).parent / "weed"), "server"]}
        _write_state(tmp_path / "stack", {"s3": entry, "worker": dict(entry)})
        stack = Stack(tmp_path / "stack")
        assert stack.status()["s3"]["alive"] is False
        assert stack.pids() == []
        said: list[str] = []
        assert stack.down(echo=said.append) == []
        time.sleep(0.3)
        assert victim.poll() is None, "an unrelated process was killed"
        assert said == [f"left pid {victim.pid} alone: it is no longer the stack's worker (the state file is stale)",
                        f"left pid {victim.pid} alone: it is no longer the stack's s3 (the state file is stale)"]
        if CLEANSE.exists():  # and through the CLI
            result = subprocess.run([str(CLEANSE), "stack", "down", "--dir", str(tmp_path / "stack")],
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            assert f"left pid {victim.pid} alone" in result.stdout and "nothing running" in result.stdout
            assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_down_still_stops_the_process_it_started(tmp_path):
    stack = Stack(tmp_path / "stack")
    stack.dir.mkdir(parents=True)
    pid = stack._start("worker", ["sleep", "300"], dict(os.environ))
    entry = stack.state()["processes"]["worker"]
    assert entry["start_time"] == identity(pid)["start_time"] and entry["cmdline"] == ["sleep", "300"]
    assert stack.status()["worker"]["alive"] is True
    said: list[str] = []
    stopped = stack.down(echo=said.append)
    assert (stopped, said) == ([pid], [f"stopped worker (pid {pid})"])
    deadline = time.monotonic() + 30  # a loaded machine may take a while to deliver the signal
    while identity(pid) is not None and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # our child: reap it
        except ChildProcessError:  # already reaped (by subprocess's own clean-up)
            pass
        time.sleep(0.1)
    assert identity(pid) is None, Path(f"/proc/{pid}/status").read_text()[:300]


# ----------------------------------------------------------------------------- Mirror.pull


def test_pull_refuses_keys_that_leave_the_work_folder(s3_env, signed, tmp_path, monkeypatch):
    """SeaweedFS itself refuses to store a key with ``..`` (AWS S3 stores it as sent), so the
    hostile key is added to the real listing; the object beside it is real."""
    import botocore.exceptions

    import cleanse.remote as remote
    from cleanse.remote import Mirror, RemoteError

    prefix = f"runs/escape-{os.getpid()}-{time.time_ns()}"
    signed.put_object(Bucket="cleanse", Key=f"{prefix}/ok.txt", Body=b"fine")
    uri = f"s3://cleanse/{prefix}"
    try:
        signed.put_object(Bucket="cleanse", Key=f"{prefix}/../evil", Body=b"evil")
        stored = "../evil" in remote.list_objects(uri)
    except botocore.exceptions.ClientError:
        stored = False
    real = remote.list_objects
    if not stored:
        monkeypatch.setattr(remote, "list_objects", lambda u: {**real(u), "../evil": {
            "size": 4, "etag": "0" * 32, "mtime": time.time()}})
    work = tmp_path / "work" / "folder"
    with pytest.raises(RemoteError, match=r"bucket key '\.\./evil' leaves the work folder") as caught:
        Mirror(uri, work).pull()
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "work" / "evil").exists() and not work.exists()  # nothing written, not even ok.txt
    monkeypatch.setattr(remote, "list_objects", real)  # (undo() would also drop s3_env's variables)
    if stored:
        signed.delete_object(Bucket="cleanse", Key=f"{prefix}/../evil")
    assert Mirror(uri, work).pull() == 1 and (work / "ok.txt").read_bytes() == b"fine"


def test_pull_refuses_absolute_and_symlinked_keys(s3_env, signed, tmp_path):
    from cleanse.remote import Mirror, RemoteError

    prefix = f"runs/links-{os.getpid()}-{time.time_ns()}"
    uri = f"s3://cleanse/{prefix}"
    work = tmp_path / "work"
    outside = tmp_path / "outside"
    outside.mkdir()
    work.mkdir()
    (work / "link").symlink_to(outside, target_is_directory=True)
    signed.put_object(Bucket="cleanse", Key=f"{prefix}/link/planted.txt", Body=b"evil")
    with pytest.raises(RemoteError, match="resolves outside the work folder"):
        Mirror(uri, work).pull()
    assert list(outside.iterdir()) == []
    mirror = Mirror(uri, work)
    for key in ("/etc/passwd", "a/../../b", "..", "a/.."):
        with pytest.raises(RemoteError, match="leaves the work folder"):
            mirror.local_path(key)
    assert mirror.local_path("a/./b.txt") == work / "a/./b.txt"


# ----------------------------------------------------------------------------- passwords in URIs


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not CLEANSE.exists(), reason="needs the cleanse executable")
@pytest.mark.parametrize("uri", ["http://user:secret@127.0.0.1:{port}", "sqlite://user:secret@/{tmp}/mlflow.db"],
                         ids=["http-closed-port", "sqlite-userinfo"])
def test_tracking_password_is_never_printed(tmp_path, uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri.format(port=_closed_port(), tmp=tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(CLEANSE), "run", "--out", str(tmp_path / "out"), "--set", "data.source=sklearn:iris",
                             "--set", "model.arch=logreg", "--set", "model.epochs=2", "--set", "estimators=[loss]"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "secret" not in result.stdout + result.stderr
    assert "***@" in result.stderr  # the URI is still named, without its password

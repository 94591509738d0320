"""Kill -9 matrix: does a killed ``cleanse run`` resume to the same results?

For each mode (``cli``: ``cleanse run``; ``flow``: ``cleanse run --prefect``, the Prefect flow on an
ephemeral server), the job runs once uninterrupted (the reference), then N times into fresh
output roots, each killed with SIGKILL (the whole process group, as when a machine or container
dies) at a random moment (seeded, uniform over the reference's duration) and then rerun to
completion with the same command. Each kill is checked against its mode's reference:

- every ``scores/*.parquet`` and ``flags/*.parquet`` equal (same rows, same values, bit for bit),
  ``reports/metrics.json`` and ``retrain/*.json`` equal once timing fields are dropped;
- no temporary file left under ``--out`` (``storage.atomic_path``'s ``.<name>.*.tmp``, MLflow's
  ``_alembic_tmp`` tables are checked through the store itself);
- the MLflow store (``<out>/mlflow.db``, the embedded default) opens with ``MlflowClient`` and
  lists its runs;
- which stage was running at the kill (from the stage records present then).

The job is the README's first command (``cleanse run`` with ./params.yaml, MLflow on its embedded
store); ``--quick`` is iris with a logistic regression (the smoke test). Results are written to
``--results`` after every kill, and a rerun of this script skips the kills already recorded, so
an interrupted matrix resumes.

    python benchmarks/kill_matrix.py --kills-cli 10 --kills-flow 10          # the real matrix
    python benchmarks/kill_matrix.py --quick --kills-cli 2 --kills-flow 0 --results /tmp/km.json

``--code DIR`` runs another checkout (e.g. a ``git archive`` snapshot, so edits made while the
matrix runs do not leak into it); one thread (``OMP_NUM_THREADS=1``), since results are
bit-identical only at a fixed thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["data.source=sklearn:iris", "model.arch=logreg", "model.epochs=10"]
TIMING_KEYS = {"seconds", "duration", "duration_s", "started", "finished", "start_time", "end_time", "run_id",
               "mlflow_run_id", "created", "timestamp"}


def stage_records(out: Path) -> list[str]:
    """The stage records present under ``out`` (each is written last by its stage)."""
    found = []
    checks = [("stage", out / "data/staged/meta.json"), ("train", out / "models/base/meta.json"),
              ("query", out / "query/query.json")]
    for label, path in checks:
        if path.is_file():
            found.append(label)
    for path in sorted((out / "scores").glob("*.meta.json")):
        found.append(f"score {path.name.removesuffix('.meta.json')}")
    for path in sorted((out / "flags").glob("*.meta.json")):
        found.append(f"detect {path.name.removesuffix('.meta.json')}")
    for path in sorted((out / "retrain").glob("*.json")):
        name = path.stem
        found.append("references" if name == "references" else f"retrain {name}")
    if (out / "reports/metrics.json").is_file():
        found.append("report")
    return found


def running_stage(records: list[str], order: list[str]) -> str:
    """The first stage of the CLI's order without a record: what a sequential run was doing.
    (The flow runs estimators concurrently; ``records`` is kept in full for it.)"""
    for label in order:
        if label not in records:
            return label
    return "mlflow logging (after the report)"


def stage_order(estimators: list[str]) -> list[str]:
    order = ["stage", "train", "query"]
    for name in estimators:
        order += [f"score {name}", f"detect {name}", f"retrain {name}"]
    return order + ["references", "report"]


def first_seen(timeline: list[tuple[float, list[str]]]) -> dict[str, float]:
    """When each stage record first appeared (seconds from the start)."""
    seen: dict[str, float] = {}
    for at, records in timeline:
        for label in records:
            seen.setdefault(label, at)
    return seen


def temp_files(out: Path) -> list[str]:
    left = []
    for path in out.rglob("*"):
        name = path.name
        if path.is_file() and (name.endswith(".tmp") or ".tmp." in name or name.startswith("tmp")):
            left.append(str(path.relative_to(out)))
    return sorted(left)


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING_KEYS and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def compare(out: Path, reference: Path) -> dict[str, Any]:
    """Differences between ``out`` and ``reference`` (empty lists = identical)."""
    import polars as pl

    differ, missing = [], []
    tables = sorted({p.relative_to(reference).as_posix() for pattern in ("scores/*.parquet", "flags/*.parquet")
                     for p in reference.glob(pattern)})
    for rel in tables:
        if not (out / rel).is_file():
            missing.append(rel)
        elif not pl.read_parquet(out / rel).equals(pl.read_parquet(reference / rel)):
            differ.append(rel)
    documents = ["reports/metrics.json"] + sorted(p.relative_to(reference).as_posix()
                                                  for p in reference.glob("retrain/*.json"))
    for rel in documents:
        if not (out / rel).is_file():
            missing.append(rel)
        elif _strip(json.loads((out / rel).read_text())) != _strip(json.loads((reference / rel).read_text())):
            differ.append(rel)
    extra = sorted({p.relative_to(out).as_posix() for p in out.glob("scores/*.parquet")} - set(tables))
    return {"compared": len(tables) + len(documents), "differ": differ, "missing": missing, "extra": extra}


MLFLOW_CHECK = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
runs = []
for experiment in client.search_experiments():
    runs += client.search_runs([experiment.experiment_id], max_results=1000)
print(json.dumps({"runs": len(runs), "finished": sum(r.info.status == "FINISHED" for r in runs)}))
"""


def mlflow_store(out: Path, python: str, env: dict[str, str]) -> dict[str, Any]:
    db = out / "mlflow.db"
    if not db.is_file():
        return {"readable": False, "error": "no mlflow.db"}
    proc = subprocess.run([python, "-c", MLFLOW_CHECK, f"sqlite:///{db}"], capture_output=True, text=True,
                          env=env, timeout=300)
    if proc.returncode != 0:
        return {"readable": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return {"readable": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


def command(mode: str, out: Path, overrides: list[str], python: str) -> list[str]:
    cmd = [python, "-m", "cleanse.cli", "run", "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    if mode == "flow":
        cmd.append("--prefect")
    return cmd


def environment(code: Path, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "CLEANSE_LOCK", "AWS_"))}  # embedded MLflow, no server
    env.update(PYTHONPATH=f"{code / 'src'}{os.pathsep}{code}", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", PREFECT_HOME=str(work / "prefect-home"),
               PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="true", PYTHONUNBUFFERED="1",
               # the ephemeral server's 20 s default is too short on two busy cores
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return env


def launch(cmd: list[str], code: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = open(log, "ab")
    return subprocess.Popen(cmd, cwd=code, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(cmd: list[str], code: Path, env: dict[str, str], log: Path, timeout: float) -> tuple[int, float]:
    started = time.perf_counter()
    proc = launch(cmd, code, env, log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = -9
    return rc, time.perf_counter() - started


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def merge(parts: list[Path], target: Path) -> dict[str, Any]:
    """One results file from matrices run separately (e.g. the CLI and flow halves in parallel)."""
    merged: dict[str, Any] = {"references": {}, "kills": [], "parts": [str(p) for p in parts]}
    for part in parts:
        data = json.loads(part.read_text())
        for key, value in data.items():
            if key == "references":
                merged["references"].update(value)
            elif key == "kills":  # a kill run by two processes counts once
                seen = {(k["mode"], k["index"]) for k in merged["kills"]}
                merged["kills"] += [k for k in value if (k["mode"], k["index"]) not in seen]
            elif key not in ("summary",):
                merged.setdefault(key, value)
    refs = merged["references"]
    if {"cli", "flow"} <= set(refs):
        merged["flow_reference_vs_cli"] = compare(Path(refs["flow"]["out"]), Path(refs["cli"]["out"]))
    modes = sorted({k["mode"] for k in merged["kills"]})
    merged["summary"] = {"done": len(merged["kills"]), "ok": sum(k["ok"] for k in merged["kills"]),
                         "landed": sum(bool(k.get("killed")) for k in merged["kills"]),
                         "landed_ok": sum(bool(k.get("killed")) and k["ok"] for k in merged["kills"]),
                         "by_mode": {m: f"{sum(k['ok'] for k in merged['kills'] if k['mode'] == m)}/"
                                        f"{sum(k['mode'] == m for k in merged['kills'])}" for m in modes}}
    write_results(target, merged)
    return merged


def table(results: dict[str, Any]) -> str:
    """The matrix as a markdown table (docs/reliability.md)."""
    lines = ["| mode | # | kill at (s) | running at the kill | rerun exit | rerun (s) | files compared | differ | temp files left | MLflow store (runs) | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(results["kills"], key=lambda k: (k["mode"], k["index"])):
        diff = k.get("diff") or {}
        store = k.get("mlflow", {})
        lines.append(f"| {k['mode']} | {k['index']} | {k['kill_at_s']} | {k['running']} | {k['rerun_exit']} | "
                     f"{k['rerun_seconds']} | {diff.get('compared', '-')} | {len(diff.get('differ', [])) + len(diff.get('missing', [])) if diff else '-'} | "
                     f"{len(k['temp_left'])} | {'readable (' + str(store.get('runs')) + ')' if store.get('readable') else 'BROKEN: ' + str(store.get('error'))} | "
                     f"{'yes' if k['ok'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="iris + logistic regression (smoke test)")
    parser.add_argument("--kills-cli", type=int, default=10)
    parser.add_argument("--kills-flow", type=int, default=10)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="extra dotted.key=value")
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout to run (default: this one)")
    parser.add_argument("--work", type=Path, default=None, help="output roots (default: <results dir>/kill_matrix_work)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/kill_matrix.json")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for one run to completion")
    parser.add_argument("--keep", action="store_true", help="keep each kill's output root")
    parser.add_argument("--indices", help="only these kill indices, e.g. 6-9 (the same seeded moments)")
    parser.add_argument("--span", type=float, help="draw kill moments over this many seconds instead of the "
                        "reference's duration (when the machine is now faster than during the reference)")
    parser.add_argument("--reverse", action="store_true", help="run the plan from its end")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these results files into --results, print the table")
    args = parser.parse_args()
    if args.merge:
        print(table(merge(args.merge, args.results)))
        return

    code = args.code.resolve()
    work = (args.work or args.results.parent / "kill_matrix_work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    overrides = (QUICK if args.quick else []) + args.overrides
    env = environment(code, work)
    sys.path.insert(0, str(code / "src"))
    from cleanse.config import load_params

    params = load_params(code / "params.yaml", overrides)
    order = stage_order(params.estimators)
    results: dict[str, Any] = {}
    if args.results.is_file():
        results = json.loads(args.results.read_text())
        if results.get("config", {}).get("overrides") != overrides or results.get("seed") != args.seed:
            sys.exit(f"{args.results} holds another matrix (overrides/seed differ); move it or pass --results")
    results.update({"job": "cleanse run (params.yaml" + (" + " + " ".join(overrides) if overrides else "") + ")",
                    "config": {"overrides": overrides, "estimators": params.estimators},
                    "seed": args.seed, "threads": 1, "kill": "SIGKILL to the run's process group",
                    "cpus": os.cpu_count()})
    results.setdefault("references", {})
    results.setdefault("kills", [])
    modes = [m for m, n in (("cli", args.kills_cli), ("flow", args.kills_flow)) if n > 0]

    for mode in modes:  # the uninterrupted runs
        ref = work / f"reference-{mode}"
        if mode in results["references"] and (ref / "reports/metrics.json").is_file():
            continue
        shutil.rmtree(ref, ignore_errors=True)
        timeline: list[tuple[float, list[str]]] = []
        started = time.perf_counter()
        proc = launch(command(mode, ref, overrides, python), code, env, work / f"reference-{mode}.log")
        seen: list[str] = []
        while proc.poll() is None:
            records = stage_records(ref) if ref.exists() else []
            if records != seen:
                seen = records
                timeline.append((round(time.perf_counter() - started, 1), records))
            time.sleep(0.5)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            sys.exit(f"the uninterrupted {mode} run failed (exit {proc.returncode}); see {work}/reference-{mode}.log")
        results["references"][mode] = {"seconds": round(seconds, 1), "out": str(ref),
                                       "stage_done_at": first_seen(timeline),
                                       "mlflow": mlflow_store(ref, python, env)}
        print(f"reference {mode}: {seconds:.1f} s", flush=True)
        write_results(args.results, results)
    if {"cli", "flow"} <= set(results["references"]):
        same = compare(work / "reference-flow", work / "reference-cli")
        results["flow_reference_vs_cli"] = same

    rng = random.Random(args.seed)
    plan = []  # interleaved cli/flow, so a partial matrix covers both modes
    counts = {"cli": args.kills_cli, "flow": args.kills_flow}
    for i in range(max(counts.values())):
        for mode in modes:
            if i < counts[mode]:
                span = args.span or results["references"][mode]["seconds"]
                plan.append((mode, i, round(rng.uniform(0.5, span * 0.98), 1)))
    if args.indices:  # a share of the plan (another process runs the rest, into its own results)
        low, _, high = args.indices.partition("-")
        plan = [item for item in plan if int(low) <= item[1] <= int(high or low)]
    if args.reverse:
        plan.reverse()
    done = {(k["mode"], k["index"]) for k in results["kills"]}
    for mode, index, at in plan:
        if (mode, index) in done:
            continue
        out = work / f"{mode}-{index:02d}"
        shutil.rmtree(out, ignore_errors=True)
        log = work / f"{mode}-{index:02d}.log"
        log.unlink(missing_ok=True)
        cmd = command(mode, out, overrides, python)
        proc = launch(cmd, code, env, log)
        deadline = time.perf_counter() + at
        while proc.poll() is None and time.perf_counter() < deadline:
            time.sleep(0.05)
        entry: dict[str, Any] = {"mode": mode, "index": index, "kill_at_s": at}
        if proc.poll() is None:
            records = stage_records(out) if out.exists() else []
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            entry.update(killed=True, records_at_kill=records, running=running_stage(records, order),
                         mlflow_db_at_kill=(out / "mlflow.db").stat().st_size if (out / "mlflow.db").is_file() else None)
            if not records and not (out / "data").exists():
                entry["running"] = "startup or stage (no stage record yet)"
        else:  # finished before the kill moment (a faster run than the reference)
            entry.update(killed=False, first_exit=proc.returncode, running="finished before the kill")
        entry["temp_after_kill"] = temp_files(out) if out.exists() else []
        rc, seconds = run_to_end(cmd, code, env, log, args.timeout)
        entry.update(rerun_exit=rc, rerun_seconds=round(seconds, 1))
        if rc != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            entry["rerun_error"] = " | ".join(tail)[-500:]
        ref = work / f"reference-{mode}"
        entry["diff"] = compare(out, ref) if rc == 0 else None
        entry["temp_left"] = temp_files(out)
        entry["mlflow"] = mlflow_store(out, python, env)
        entry["ok"] = bool(rc == 0 and not entry["diff"]["differ"] and not entry["diff"]["missing"]
                           and not entry["temp_left"] and entry["mlflow"].get("readable"))
        results["kills"].append(entry)
        results["summary"] = {
            "done": len(results["kills"]), "planned": len(plan),
            "ok": sum(k["ok"] for k in results["kills"]),
            "by_mode": {m: f"{sum(k['ok'] for k in results['kills'] if k['mode'] == m)}/"
                           f"{sum(k['mode'] == m for k in results['kills'])}" for m in modes}}
        write_results(args.results, results)
        print(f"{mode} #{index}: kill at {at} s during {entry['running']!r} -> rerun exit {rc} "
              f"({seconds:.0f} s), {'OK' if entry['ok'] else 'FAIL'}", flush=True)
        if not args.keep and entry["ok"]:
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(results.get("summary", {}), indent=2))


if __name__ == "__main__":
    main()

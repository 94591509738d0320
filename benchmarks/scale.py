"""Scale benchmark: projected-gradient self-scores at n = 10k, 100k and 1M.

The pipeline is cleanse's own (:mod:`cleanse.projection`): per-sample gradients of a small fixed
MLP (32 -> 64 -> 10, seeded initialisation, 2,762 parameters) from
``cleanse.grads.per_sample_grads``, a seeded Rademacher projection to k = 256 dimensions
(``projection_matrix``), written chunk by chunk to a ``.npy`` memmap (``ProjectedGradientStore`` +
``project_to_store``), then ``projected_self_scores`` (TRAK-style leverage scores, two streaming
passes over the memmap). The synthetic features and labels of each chunk are generated from the
seed and the chunk's first row inside the gradient callback, so n x d is never held in memory.

Each n runs in a fresh subprocess so that its peak RSS is its own. Recorded per n: wall time
(gradients, projection + write, scoring), time per sample, the kernel's peak RSS of the process
(``VmHWM``), and sampled peaks of anonymous and file-backed resident memory during the work.
Checks: time grows linearly (t(1M) / t(100k) ~ 10) and memory stays flat (peak RSS at 1M within
1.5x of the peak at 10k).

    .venv/bin/python benchmarks/scale.py                       # full grid, n = 10k, 100k, 1M
    .venv/bin/python benchmarks/scale.py --grid smoke --out /tmp/scale.json --docs /tmp/bench.md

Writes the JSON to ``--out`` and rewrites the ``scale`` section of ``--docs`` (plus
``img/scale.png`` beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


from _common import (
    REPO,
    RssMonitor,
    Stopwatch,
    environment,
    fmt,
    jsonable,
    md_table,
    proc_status_mb,
    publish,
    relative_link,
    rerender,
)

SECTION = "scale"
TARGET_RSS_RATIO = 1.5
RESULT_PREFIX = "SCALE-RESULT "


@dataclass(frozen=True)
class ScaleGrid:
    """One benchmark configuration (``--grid``)."""

    ns: tuple[int, ...]
    features: int
    hidden: tuple[int, ...]
    classes: int
    k: int
    kind: str
    chunk_size: int  # rows per memmap chunk (``ProjectedGradientStore.chunk_size``)
    grad_chunk: int  # rows per vmap call inside a chunk (``per_sample_grads(chunk_size=...)``)
    timeout_s: float  # per n (subprocess)


GRIDS = {
    "full": ScaleGrid(ns=(10_000, 100_000, 1_000_000), features=32, hidden=(64,), classes=10, k=256,
                      kind="rademacher", chunk_size=8_192, grad_chunk=1_024, timeout_s=900.0),
    "smoke": ScaleGrid(ns=(1_000, 10_000), features=8, hidden=(16,), classes=10, k=32, kind="rademacher",
                       chunk_size=1_024, grad_chunk=512, timeout_s=120.0),
}


# ------------------------------------------------------------------------------------------- worker
def worker(n: int, grid: ScaleGrid, seed: int, threads: int, scratch: Path) -> dict[str, Any]:
    """Project and score ``n`` synthetic samples in this process; return the measurements."""
    import numpy as np
    import torch

    from cleanse.grads import FunctionalModel, per_sample_grads
    from cleanse.models.architectures import build_model, spec_for
    from cleanse.projection import (
        ProjectedGradientStore,
        project_to_store,
        projected_self_scores,
        projection_matrix,
    )

    torch.set_num_threads(threads)
    after_imports = proc_status_mb()
    spec = spec_for("mlp", list(grid.hidden), (grid.features,), grid.classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_model(spec)
    fm = FunctionalModel.of(module, weight_decay=0.0)
    projection = projection_matrix(fm.n_params, grid.k, kind=grid.kind, seed=seed)
    gradient_seconds = [0.0]

    def rows(start: int, stop: int) -> torch.Tensor:
        """Per-sample gradients of rows ``start:stop``, whose data are drawn from (seed, start)."""
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        x = torch.randn(stop - start, grid.features, generator=generator)
        y = torch.randint(0, grid.classes, (stop - start,), generator=generator)
        grads = per_sample_grads(fm, x, y, chunk_size=grid.grad_chunk)
        gradient_seconds[0] += time.perf_counter() - began
        return grads

    import scipy.linalg  # noqa: F401 - imported by projected_self_scores; keep its import out of the timings

    with Stopwatch() as warmup:  # the first vmap call pays one-off set-up costs; not a per-sample cost
        rows(0, min(n, 64))
    gradient_seconds[0] = 0.0
    store = ProjectedGradientStore(scratch / f"store-{n}", n=n, k=grid.k, chunk_size=grid.chunk_size,
                                   fingerprint=f"scale-n{n}-k{grid.k}-{grid.kind}-seed{seed}")
    before_work = proc_status_mb()
    with RssMonitor() as project_memory, Stopwatch() as project_clock:
        project_to_store(rows, projection, store)
    features = np.load(store.features_path, mmap_mode="r")
    with RssMonitor() as score_memory, Stopwatch() as score_clock:
        scores = projected_self_scores(features)
    end = proc_status_mb()
    finite = bool(np.isfinite(scores).all())
    return {
        "n": n,
        "n_params": fm.n_params,
        "memmap_mb": store.features_path.stat().st_size / 2**20,
        "warmup_s": warmup.seconds,
        "seconds": {
            "gradients": gradient_seconds[0],
            "project_and_write": project_clock.seconds - gradient_seconds[0],
            "projection_total": project_clock.seconds,
            "scoring": score_clock.seconds,
            "total": project_clock.seconds + score_clock.seconds,
        },
        "rss_mb": {
            "after_imports": after_imports.get("VmRSS"),
            "before_work": before_work.get("VmRSS"),
            "peak": end.get("VmHWM"),  # the kernel's high-water mark of this process
            "peak_anon_sampled": max(project_memory.peak_anon, score_memory.peak_anon),
            "peak_file_sampled": max(project_memory.peak_file, score_memory.peak_file),
            "peak_during_projection_sampled": project_memory.peak_rss,
            "peak_during_scoring_sampled": score_memory.peak_rss,
            "end": end.get("VmRSS"),
            "end_anon": end.get("RssAnon"),
            "end_file": end.get("RssFile"),
        },
        "scores": {
            "finite": finite,
            "sum_over_k": float(scores.sum() / grid.k) if finite else None,  # trace of the hat matrix / k, <= 1
            "max": float(scores.max()) if finite else None,
        },
    }


# --------------------------------------------------------------------------------------------- main
def run_one(n: int, grid_name: str, seed: int, threads: int, scratch: Path, timeout_s: float) -> dict[str, Any]:
    """Run :func:`worker` for ``n`` in a fresh interpreter and parse its result line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(n), "--grid", grid_name,
               "--seed", str(seed), "--threads", str(threads), "--scratch", str(scratch)]
    with Stopwatch() as clock:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"scale worker for n={n} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["subprocess_wall_s"] = clock.seconds
    return result


def analyse(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Linearity of time and flatness of memory across the grid."""
    first, last = points[0], points[-1]
    slopes = []
    for a, b in zip(points, points[1:]):
        slopes.append(math.log(b["seconds"]["total"] / a["seconds"]["total"]) / math.log(b["n"] / a["n"]))
    prev = points[-2] if len(points) > 1 else first
    rss_ratio = last["rss_mb"]["peak"] / first["rss_mb"]["peak"]
    anon_ratio = last["rss_mb"]["peak_anon_sampled"] / first["rss_mb"]["peak_anon_sampled"]
    return {
        "time_ratio_last_two": last["seconds"]["total"] / prev["seconds"]["total"],
        "n_ratio_last_two": last["n"] / prev["n"],
        "loglog_slopes": slopes,
        "time_linear": all(slope <= 1.1 for slope in slopes),
        "us_per_sample": {str(p["n"]): 1e6 * p["seconds"]["total"] / p["n"] for p in points},
        "peak_rss_ratio": rss_ratio,
        "peak_rss_target": TARGET_RSS_RATIO,
        "peak_rss_met": rss_ratio <= TARGET_RSS_RATIO,
        "peak_anon_ratio": anon_ratio,
        "peak_anon_met": anon_ratio <= TARGET_RSS_RATIO,
        "peak_rss_excess_mb": last["rss_mb"]["peak"] - first["rss_mb"]["peak"],
        "memmap_mb_at_largest_n": last["memmap_mb"],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    ns = [p["n"] for p in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3))
    for key, label in (("total", "total"), ("gradients", "per-sample gradients"),
                       ("project_and_write", "projection + memmap write"), ("scoring", "scoring (2 passes)")):
        left.plot(ns, [p["seconds"][key] for p in points], marker="o", label=label, linewidth=2.2 if key == "total" else 1.2)
    base = points[0]["seconds"]["total"]
    left.plot(ns, [base * n / ns[0] for n in ns], color="grey", linestyle=":", label="linear from the first n")
    left.set(xscale="log", yscale="log", xlabel="samples n", ylabel="wall time (s)", title="Wall time against n")
    left.legend(fontsize=8)
    left.grid(True, which="both", alpha=0.3)
    right.plot(ns, [p["rss_mb"]["peak"] for p in points], marker="o", linewidth=2.2, label="peak RSS (VmHWM)")
    right.plot(ns, [p["rss_mb"]["peak_anon_sampled"] for p in points], marker="s", label="peak anonymous RSS (sampled)")
    right.plot(ns, [p["rss_mb"]["peak_file_sampled"] for p in points], marker="^", label="peak file-backed RSS (sampled)")
    right.plot(ns, [p["memmap_mb"] for p in points], color="grey", linestyle=":", label="memmap file size")
    right.axhline(TARGET_RSS_RATIO * points[0]["rss_mb"]["peak"], color="red", linestyle="--", linewidth=1,
                  label=f"{TARGET_RSS_RATIO:g} x peak RSS at the first n")
    right.set(xscale="log", yscale="log", xlabel="samples n", ylabel="MiB", title="Memory against n")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render(result: dict[str, Any], docs: Path, out: Path, image: Path) -> str:
    config, env, points, check = result["config"], result["environment"], result["points"], result["analysis"]
    first, last = points[0], points[-1]
    out_text = relative_link(out, REPO) if out.resolve().is_relative_to(REPO) else out.name
    lines = [
        "## Scale",
        "",
        f"*Generated by `benchmarks/scale.py --grid {result['grid']}` on {env['created']} (commit "
        f"`{(env['git_commit'] or 'unknown')[:12]}`, {env['python']}, torch {env['torch']}); raw numbers in "
        f"`{out_text}`. Whole run: {result['total_seconds']:,.0f} s.*",
        "",
        f"**Setup.** Projected-gradient self-scores with `cleanse.projection`: per-sample gradients of an MLP "
        f"{config['architecture']} ({first['n_params']:,} parameters, seeded initialisation) from "
        f"`cleanse.grads.per_sample_grads`, a {config['kind']} projection to k = {config['k']} "
        f"(`projection_matrix`), written in chunks of {config['chunk_size']:,} rows to a float32 `.npy` memmap "
        "(`ProjectedGradientStore`, `project_to_store`), then `projected_self_scores` (two streaming passes). "
        "Features and labels are drawn chunk by chunk from the seed inside the gradient callback, so n x d is never "
        "in memory. Each n runs in a fresh process (its `VmHWM` is its own peak RSS); anonymous and file-backed "
        "resident memory are sampled every 10 ms during the work.",
        "",
        f"**Machine.** A shared {env['cpu_count']}-core VM (load average {env['load_average_start'][0]:.1f} at the "
        f"start, {env['load_average_end'][0]:.1f} at the end; other developers' jobs ran at the same time), torch with "
        f"{env['torch_threads']} thread(s). Seconds are noisy; the ratios come from one run.",
        "",
        "### Targets",
        "",
    ]
    lines += [md_table(["check", "target", "measured", "met"], [
        [f"peak RSS at n = {last['n']:,} / at n = {first['n']:,}", f"<= {TARGET_RSS_RATIO:g}",
         f"{check['peak_rss_ratio']:.2f} ({fmt(first['rss_mb']['peak'], 0)} -> {fmt(last['rss_mb']['peak'], 0)} MiB)",
         fmt(check["peak_rss_met"])],
        [f"peak anonymous RSS at n = {last['n']:,} / at n = {first['n']:,} (excludes memmap pages)", f"<= {TARGET_RSS_RATIO:g}",
         f"{check['peak_anon_ratio']:.2f} ({fmt(first['rss_mb']['peak_anon_sampled'], 0)} -> "
         f"{fmt(last['rss_mb']['peak_anon_sampled'], 0)} MiB)", fmt(check["peak_anon_met"])],
        [f"time at n = {last['n']:,} / at n = {points[-2]['n'] if len(points) > 1 else first['n']:,}",
         f"~ {check['n_ratio_last_two']:g} (linear)", f"{check['time_ratio_last_two']:.2f}",
         fmt(check["time_linear"]) + " (log-log slopes " + ", ".join(f"{s:.2f}" for s in check["loglog_slopes"]) + ")"],
    ]), ""]
    rows = []
    for p in points:
        s, r = p["seconds"], p["rss_mb"]
        rows.append([f"{p['n']:,}", fmt(s["gradients"]), fmt(s["project_and_write"]), fmt(s["scoring"]), fmt(s["total"]),
                     fmt(1e6 * s["total"] / p["n"], 1), fmt(r["peak"], 0), fmt(r["peak_anon_sampled"], 0),
                     fmt(r["peak_file_sampled"], 0), fmt(r["before_work"], 0), fmt(p["memmap_mb"], 0)])
    lines += ["### Wall time and memory against n", "",
              md_table(["n", "gradients s", "project + write s", "scoring s", "total s", "µs / sample",
                        "peak RSS MiB", "peak anon MiB", "peak file-backed MiB", "RSS before work MiB", "memmap MiB"], rows),
              "", f"![Wall time and memory against n]({relative_link(image, docs.parent)})", ""]
    notes = result.get("notes") or []
    if notes:
        lines += ["**Notes.**", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def notes_for(result: dict[str, Any]) -> list[str]:
    points, check = result["points"], result["analysis"]
    first, last = points[0], points[-1]
    notes = []
    file_growth = last["rss_mb"]["peak_file_sampled"] - first["rss_mb"]["peak_file_sampled"]
    anon_growth = last["rss_mb"]["peak_anon_sampled"] - first["rss_mb"]["peak_anon_sampled"]
    notes.append(
        f"From n = {first['n']:,} to n = {last['n']:,} the peak RSS grew by {check['peak_rss_excess_mb']:,.0f} MiB: "
        f"file-backed pages by {file_growth:+,.0f} MiB (the memmap is {last['memmap_mb']:,.0f} MiB, but "
        "`project_to_store` writes and `projected_self_scores` reads its rows with positional file I/O, so no "
        f"mapped page stays resident) and anonymous memory by {anon_growth:+,.0f} MiB (the scoring passes hold "
        "one float64 block of 8,192 rows at a time, and the allocator keeps some of what the gradient chunks "
        "freed).")
    notes.append(
        "Time per sample: " + ", ".join(f"{int(n):,}: {us:.1f} µs" for n, us in check["us_per_sample"].items())
        + "; the fixed costs (first-call warm-up, the Cholesky factor) weigh most at the smallest n, so growth "
        "between the grid points is at most linear.")
    return notes


def run(grid_name: str, out: Path, docs: Path | None, threads: int, seed: int) -> dict[str, Any]:
    grid = GRIDS[grid_name]
    started = time.perf_counter()
    env = environment(threads)
    points = []
    with tempfile.TemporaryDirectory(prefix="cleanse-scale-") as scratch_dir:
        for n in grid.ns:
            print(f"[scale] n = {n:,} ...", flush=True)
            point = run_one(n, grid_name, seed, threads, Path(scratch_dir), grid.timeout_s)
            for leftover in Path(scratch_dir).glob(f"store-{n}/*"):
                leftover.unlink()  # free the disk before the next n
            points.append(point)
            print(f"[scale] n = {n:,}: total {point['seconds']['total']:.1f} s, peak RSS {point['rss_mb']['peak']:.0f} MiB "
                  f"(anon {point['rss_mb']['peak_anon_sampled']:.0f}, file {point['rss_mb']['peak_file_sampled']:.0f})",
                  flush=True)
    env["load_average_end"] = list(os.getloadavg())
    config = {**asdict(grid), "architecture": "-".join(map(str, (grid.features, *grid.hidden, grid.classes))), "seed": seed}
    result = {"benchmark": "scale", "grid": grid_name, "environment": env, "config": config, "points": points,
              "analysis": analyse(points), "total_seconds": time.perf_counter() - started}
    result["notes"] = notes_for(result)
    return publish(jsonable(result), out, docs, SECTION, plot, render)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md",
                        help="markdown file whose 'scale' section is rewritten ('' to skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: re-derive the notes and re-render the docs from the JSON at --out")
    args = parser.parse_args(argv)
    if args.worker is not None:
        scratch = args.scratch or Path(tempfile.mkdtemp(prefix="cleanse-scale-"))
        result = worker(args.worker, GRIDS[args.grid], args.seed, args.threads, scratch)
        print(RESULT_PREFIX + json.dumps(jsonable(result)), flush=True)
        return 0
    docs = None if str(args.docs) in ("", ".") else args.docs
    if args.render_only:
        rerender(args.out, docs, SECTION, notes_for, plot, render)
        print(f"[scale] re-rendered {docs} from {args.out}")
        return 0
    result = run(args.grid, args.out, docs, args.threads, args.seed)
    check = result["analysis"]
    print(f"[scale] wrote {args.out}" + (f" and {docs}" if docs else "") + f" in {result['total_seconds']:.0f} s")
    print(f"[scale] peak RSS ratio {check['peak_rss_ratio']:.2f} (met {check['peak_rss_met']}), anon ratio "
          f"{check['peak_anon_ratio']:.2f}, time ratio {check['time_ratio_last_two']:.2f} for n x {check['n_ratio_last_two']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

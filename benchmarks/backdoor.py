"""Backdoor benchmark: attribute the observed misbehaviour (triggered probes) and cleanse iteratively.

On all 10 backdoor cells of ``benchmarks/quality.py`` (5% poisons relabelled to class 0; a 3x3 trigger
patch on digits, a 3-feature trigger pattern on breast_cancer and wine; each cell's model recipe
unchanged), for every training seed:

1. train the model (split and poisons fixed, seed 0), take ``query.size = 8`` triggered
   validation inputs it sends to the target class as probes (``query.kind: triggered``);
2. score the training set: TracIn and influence train -> probe support (contrasted with ordinary
   inputs of the target class), their self-influence, loss, and the unsupervised references
   (spectral signatures, activation clustering); AP against the poisoned set;
3. iterative cleansing with the probe-attributed TracIn ranking (:mod:`cleanse.cleansing`):
   remove the top ``step``, retrain, re-score, stop when at most 2% of the held-out triggered
   validation inputs are still sent to the target (or 15% of the training set is removed);
   clean test accuracy and ASR on the test set, next to the oracle (exactly the poisons removed)
   retrained with the same seed.

On the label-noise cells (20% symmetric flips) it reports ``query.kind: val_errors`` (8
misclassified validation samples) next to self-influence, for TracIn and influence.

    .venv/bin/python benchmarks/backdoor.py                        # full, about 30 min on 2 cores
    .venv/bin/python benchmarks/backdoor.py --grid smoke --out /tmp/b.json --docs /tmp/b.md
    .venv/bin/python benchmarks/backdoor.py --render-only                # re-summarise the stored jobs
    .venv-bench/bin/python benchmarks/backdoor.py --peers --seeds 0     # captum / dattri, same probes

``--peers`` adds captum's and dattri's train -> probe APs (same probes, same aggregation) to the
stored result without rerunning cleanse's loops; ``--rerun cell:seed,...`` recomputes single jobs.
The removal budget (at most 1.5x the poisons removed) is checked per seed.

Writes ``benchmarks/results/backdoor.json`` and the ``backdoor`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("CLEANSE_DEVICE", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import REPO, environment, fmt, jsonable, md_table  # noqa: E402
from quality import CORRUPTIONS, MODELS, Cell  # noqa: E402

TARGETS = {"ap": 0.8, "asr": 0.05, "accuracy_gap": 0.01, "removal_budget": 1.5}
# The defaults with probes (cleanse.config.AUTO_SETTINGS): 8 probes, normalized mean, one-sided
# reference contrast, geometric checkpoints with unit training gradients for TracIn (on the
# memorising digits MLP the poisons are fit within 3 of 200 epochs, before any evenly spaced
# checkpoint), iterative cleansing.
QUERY = ["query.kind=triggered"]
CLEANSE_WITH = "tracin"

# Cheapest first, so that a run cut short still covers every dataset.
BACKDOOR_CELLS = [Cell("wine", "backdoor5", "logreg"), Cell("wine", "backdoor5", "mlp"),
                  Cell("breast_cancer", "backdoor5", "logreg"), Cell("breast_cancer", "backdoor5", "mlp"),
                  Cell("digits", "backdoor5", "logreg"), Cell("digits", "backdoor5", "mlp"),
                  Cell("digits", "backdoor5", "cnn"), Cell("wine", "backdoor5", "mlp_mem"),
                  Cell("breast_cancer", "backdoor5", "mlp_mem"), Cell("digits", "backdoor5", "mlp_mem")]
NOISE_CELLS = [Cell("digits", "sym20", "mlp"), Cell("breast_cancer", "sym20", "mlp"), Cell("wine", "sym20", "mlp")]
GRIDS = {
    "full": (BACKDOOR_CELLS, NOISE_CELLS),
    "smoke": ([Cell("wine", "backdoor5", "logreg")], [Cell("wine", "sym20", "logreg")]),
}
SELF_SCORED = ["tracin", "influence", "fine", "loss", "spectral_signatures", "activation_clustering"]
QUERY_SCORED = ["tracin", "influence", "fine"]


def cell_params(cell: Cell, seed: int, extra: list[str]) -> Any:
    from cleanse.config import load_params

    return load_params(None, [f"seed={seed}", f"data.source=sklearn:{cell.dataset}", *CORRUPTIONS[cell.corruption],
                              *MODELS[cell.model](cell.dataset), "tracking.enabled=false", *extra])


def step_for(n_train: int) -> int:
    """Removals per round: about 1.1% of the training set (12 on digits, 4 on breast_cancer, 2 on wine)."""
    return max(2, round(0.011 * n_train))


def _setup(cell: Cell, seed: int, extra: list[str]) -> Any:
    """The cell prepared in memory (:func:`cleanse.api.prepare`): staged data (split and corruption
    fixed: stage seed 0) and the model trained with ``seed``."""
    from cleanse import api

    return api.prepare(cell_params(cell, seed, extra), stage_seed=0, device="cpu")


def _score(name: str, prepared: Any, query: Any) -> tuple[np.ndarray, float]:
    from cleanse import api

    started = time.perf_counter()
    result, _ = api.score_probes(prepared, name, query)
    return result.table["score"].to_numpy(), time.perf_counter() - started


def backdoor_job(cell: Cell, seed: int) -> dict[str, Any]:
    from cleanse.cleansing import cleanse_iteratively
    from cleanse.estimators import registry
    from cleanse.evaluate import detection_metrics
    from cleanse import api
    from cleanse.query import query_for

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    prepared = _setup(cell, seed, QUERY)
    params, staged, model = prepared.params, prepared.staged, prepared.model
    n = len(staged.train)
    # The one setting not left at its default: the step scales with the training set.
    params = params.model_copy(update={"cleansing": params.cleansing.model_copy(update={"step": step_for(n)})})
    truth = staged.train.is_corrupted
    query = query_for(params, staged, model)
    detectors: dict[str, Any] = {}
    for name in QUERY_SCORED:
        score, seconds = _score(name, prepared, query)
        detectors[f"{name} (triggered probes)"] = {**detection_metrics(score, truth), "seconds": seconds}
    for name in SELF_SCORED:
        score, seconds = _score(name, prepared, None)
        detectors[f"{name} (self)"] = {**detection_metrics(score, truth), "seconds": seconds}
    loop = cleanse_iteratively(params, staged, registry.get(CLEANSE_WITH), params.scorers.of(CLEANSE_WITH),
                               query, base_model=model)
    rounds = [{k: v for k, v in r.items() if k != "flagged_ids"} for r in loop["rounds"]]
    oracle = api.retrain_without(prepared, staged.train.sample_id[truth])
    return {"cell": cell.key, "seed": seed, "n_train": n, "k": int(truth.sum()), "step": params.cleansing.step,
            "base": api.evaluate(prepared), "query": query.summary(), "detectors": detectors,
            "cleansing": {"estimator": CLEANSE_WITH, "stopped": loop["stopped"], "rounds": rounds,
                          **loop["final"]},
            "oracle": {k: oracle[k] for k in ("test_accuracy", "attack_success_rate") if k in oracle},
            "seconds": time.perf_counter() - started}


def noise_job(cell: Cell, seed: int) -> dict[str, Any]:
    from cleanse.evaluate import detection_metrics
    from cleanse.query import query_for

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    extra = ["query.kind=val_errors"]
    prepared = _setup(cell, seed, extra)
    truth = prepared.staged.train.is_corrupted
    query = query_for(prepared.params, prepared.staged, prepared.model)
    out: dict[str, Any] = {}
    for name in QUERY_SCORED:
        out[f"{name} (self)"] = detection_metrics(_score(name, prepared, None)[0], truth)
        out[f"{name} (val_errors)"] = detection_metrics(_score(name, prepared, query)[0], truth)
    return {"cell": cell.key, "seed": seed, "k": int(truth.sum()), "query": query.summary(), "detectors": out,
            "seconds": time.perf_counter() - started}


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def within_budget(job: dict[str, Any]) -> bool:
    """Whether one seed's iterative cleansing removed at most ``removal_budget`` x the number of poisons."""
    return job["cleansing"]["n_removed"] <= TARGETS["removal_budget"] * job["k"] + 1e-9


def summarise(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: means over seeds and the targets (the removal budget is checked per seed)."""
    rows = []
    for key in dict.fromkeys(job["cell"] for job in jobs):
        runs = [job for job in jobs if job["cell"] == key]
        names = list(runs[0]["detectors"])
        ap = {name: _mean([r["detectors"][name]["average_precision"] for r in runs]) for name in names}
        row: dict[str, Any] = {"cell": key, "seeds": [r["seed"] for r in runs], "ap": ap,
                               "auc": {name: _mean([r["detectors"][name]["roc_auc"] for r in runs]) for name in names}}
        if "cleansing" in runs[0]:
            # Ties (several rankings at AP 1.0) go to the ranking the loop cleanses with.
            best = max(names, key=lambda name: (ap[name] if ap[name] is not None else -1,
                                                name == f"{CLEANSE_WITH} (triggered probes)"))
            row.update({
                "k": runs[0]["k"], "n_train": runs[0]["n_train"], "step": runs[0]["step"],
                "best": best, "best_ap": ap[best],
                "asr_before": _mean([r["base"]["attack_success_rate"] for r in runs]),
                "accuracy_before": _mean([r["base"]["test_accuracy"] for r in runs]),
                "asr_after": _mean([r["cleansing"]["attack_success_rate"] for r in runs]),
                "accuracy_after": _mean([r["cleansing"]["test_accuracy"] for r in runs]),
                "removed": _mean([r["cleansing"]["n_removed"] for r in runs]),
                "removed_per_seed": [r["cleansing"]["n_removed"] for r in runs],
                "budget_seeds": sum(within_budget(r) for r in runs),
                "poisons_removed": _mean([r["cleansing"]["n_corrupted_removed"] for r in runs]),
                "rounds": _mean([len(r["cleansing"]["rounds"]) - 1 for r in runs]),
                "stopped": [r["cleansing"]["stopped"] for r in runs],
                "oracle_accuracy": _mean([r["oracle"]["test_accuracy"] for r in runs]),
                "oracle_asr": _mean([r["oracle"]["attack_success_rate"] for r in runs]),
            })
            row["ap_met"] = row["best_ap"] is not None and row["best_ap"] >= TARGETS["ap"]
            row["asr_met"] = row["asr_after"] is not None and row["asr_after"] <= TARGETS["asr"]
            row["accuracy_gap"] = row["oracle_accuracy"] - row["accuracy_after"]
            row["accuracy_met"] = row["accuracy_gap"] <= TARGETS["accuracy_gap"] + 1e-12
            row["budget_met"] = row["budget_seeds"] == len(runs)
            with_peers = [r for r in runs if "peers" in r]
            if with_peers:
                peer_names = [name for name in with_peers[0]["peers"] if not name.startswith("_")]
                row["peer_seeds"] = [r["seed"] for r in with_peers]
                row["peer_ap"] = {name: {key: _mean([r["peers"][name].get(key) for r in with_peers])
                                         for key in ("ap", "ap_contrast", "ap_negated")} for name in peer_names}
                row["cleanse_probe_ap_peer_seeds"] = _mean(
                    [r["detectors"][f"{CLEANSE_WITH} (triggered probes)"]["average_precision"] for r in with_peers])
                row["peer_errors"] = {name: r["peers"][name]["error"] for r in with_peers for name in peer_names
                                      if "error" in r["peers"][name]}
        rows.append(row)
    return rows


def plot(result: dict[str, Any], image: Path) -> None:
    """ASR on the test set against cleansing rounds, one line per backdoor cell and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = result["backdoor_jobs"]
    cells = list(dict.fromkeys(job["cell"] for job in jobs))
    columns = max(1, min(5, len(cells)))
    rows = max(1, math.ceil(len(cells) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False)
    for axis in axes.ravel()[len(cells):]:
        axis.set_visible(False)
    for axis, cell in zip(axes.ravel(), cells):
        for job in (j for j in jobs if j["cell"] == cell):
            removed = [r["n_removed"] for r in job["cleansing"]["rounds"]]
            axis.plot(removed, [r["attack_success_rate"] for r in job["cleansing"]["rounds"]], marker="o",
                      label=f"seed {job['seed']}")
        axis.axhline(TARGETS["asr"], color="grey", ls=":")
        axis.set_title(cell, fontsize=8)
        axis.set_xlabel("samples removed")
        axis.set_ylim(-0.02, 1.02)
    for row in axes:
        row[0].set_ylabel("ASR (test)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(image, dpi=110)
    plt.close(figure)


def render(result: dict[str, Any], docs: Path, out: Path, image: Path) -> str:
    from _common import relative_link

    meta = result["meta"]
    lines = [
        "## Backdoor: probe attribution and iterative cleansing", "",
        f"Generated by `{meta['command']}` ({meta['job_seconds'] / 60:.1f} min of job wall time in {meta['jobs']} "
        f"worker process(es) on {meta['environment']['cpu_count']} CPU cores shared with other work, commit "
        f"`{meta['environment']['git_commit']}`). "
        f"Raw numbers per seed: `{relative_link(out, REPO)}`. Cells and model recipes are `benchmarks/quality.py`'s "
        "backdoor cells; split and poisons fixed (seed 0), training seeds "
        f"{meta['seeds']}; every number is a mean over the seeds."
        + (f" Recomputed since with `--rerun`: {', '.join(meta['reruns'])}." if meta.get("reruns") else "")
        + (f" Peers added by `{meta['peers_command']}`." if meta.get("peers_command") else ""), "",
        "Settings: the defaults with `query.kind: triggered` (they follow from setting `query.kind`); only the "
        "cleansing step is scaled to the training set. Probes: 8 triggered validation inputs of non-target "
        "classes that the model sends to the target, spread over their true classes, contrasted with 8 correctly "
        "classified validation inputs of the target class (one-sided: positive general support only); TracIn "
        "over geometrically spaced checkpoints (epochs 1, 2, 3, 6, ... of a 200-epoch run) with unit training "
        f"gradients. Cleansing: iterative, with the `{CLEANSE_WITH}` probe ranking, ~1.1% of the training set "
        "removed per round, retrain from scratch, re-score with the probes the retrained model still gets wrong; "
        "stop once ≤ 2% of the held-out triggered validation inputs still go to the target, or at 15% removed; "
        "then put back the removed samples of other labels than the target's or whose label the cleansed model "
        "agrees with, kept only if the held-out behaviour does not rise. ASR and accuracy are on the test set, "
        "which the loop never sees. The oracle removes exactly the poisons and retrains with the same "
        "seed; on wine one test sample is 2.2 pt of accuracy.", "",
        "What each part bought on the digits cells (MLP / CNN, mean of 3 seeds), measured one change at a time: "
        "the previous design (two-sided contrast, probes drawn at random, fixed probes) reached AP 0.816 / 0.891 "
        "and ASR 0.069 / 0.047 after cleansing, 3.0 / 2.4 pt below the oracle. The one-sided contrast alone raised "
        "AP to 0.921 / 0.916; with class-spread probes it is 0.975 / 0.960. Re-scoring only the probes still "
        "failing let the MLP reach ASR 0 in every seed. Putting back agreed-with samples moved accuracy by −0.2 to "
        "+1.3 pt per seed; it matters where the loop over-removed (MLP seed 2: 19 samples back, +1.3 pt).", "",
        "The TracIn checkpoint schedule decides the memorising digits MLP (200 epochs): evenly spaced checkpoints "
        "(epochs 20, 40, ..., 200) with cosine scores gave AP 0.413 and ASR 0.098 after cleansing (seed 2 spent its "
        "budget at ASR 0.25). The poisons are fit within the first 3 epochs; per checkpoint, the epoch-1 "
        "ranking alone has AP 1.00 and the epoch-200 one 0.40–0.48. Geometric checkpoints with unit training "
        "gradients (a checkpoint then counts as much as the probe was still being learned there) give the table's "
        "numbers. The same setting costs the CNN, whose trigger is learned later: probe AP per seed (1 / 2) "
        "0.919 / 0.964 with even checkpoints and cosine scores, 0.826 / 0.874 with this setting.", "",
        "Putting back samples of other labels than the target's decides the CNN's accuracy. Its last rounds also "
        "remove hard samples of other classes (seed 1: eight 4s, 5s, 6s and 8s the cleansed model misclassifies). "
        "Agreement alone left those out: seed 1 ended 2.9 pt below the oracle and the cell 1.1 pt. With them put "
        "back, seed 1 keeps 54 poisons and one clean 0 out, 1.6 pt below; the CNN spreads across retrains: "
        "retrained with seeds 0–5, that set averages 0.962 (std 0.6 pt) and the oracle's 0.969 (std 0.2 pt).", "",
        "f-INE's single-run test on the probes' losses (`fine (triggered probes)`) finds poisons only where "
        "the data is small: AP 0.27–0.64 on wine (5 poisons of 106), 0.07–0.10 on breast_cancer and chance "
        "(0.05–0.07) on digits (f-INE's own random stream; on the stream it used to share with the corruption "
        "draws it read 0.39–0.67, 0.07–0.16 and 0.06–0.08: single-run f-INE moves that much with its draws). In a round, one unit's inclusion moves a probe's loss by little against the "
        "steps of the other units; detrending the per-round loss change over the neighbouring rounds "
        "(`scorers.fine.pairwise_detrend`) raised wine MLP seed 0 from 0.18 to 0.76 (earlier stream). TracIn reads each "
        "sample's own gradient and is not limited this way.", "",
        f"Removal budget: per seed, iterative cleansing should remove at most {TARGETS['removal_budget']}× the "
        "poisons. On wine the oracle itself leaves the trigger working on 6.7–20% of the triggered test inputs "
        "(logreg; MLP seed 2: 13%): the trigger pattern pushes these small tabular models towards the target "
        "without any poison, so the loop, which stops only at ≤ 2% held-out behaviour, goes on removing clean "
        "samples. That stopping rule, not the ranking (probe AP 1.0 there), misses the budget. Digits MLP_mem "
        "seed 2 spent its budget (161 removed) with 53 of 54 poisons out and the held-out behaviour stuck at "
        "7–12%; rerun with the current scoring code (commit 0bd4b72), the same seed has all 54 out after 72 "
        "removals, behaviour gone, and 56 removed after readmission (ASR 0.002, accuracy 0.962 = oracle): that "
        "seed's outcome turns on small numerical differences in how the last poisons rank. Readmission also "
        "after a spent budget (same acceptance rule) took wine MLP seed 2 from 15 to 9 removed at unchanged ASR "
        "and accuracy, still above 7.5; the library does not do that.", "",
        f"Targets: best AP ≥ {TARGETS['ap']}; ASR after cleansing ≤ {TARGETS['asr']}; clean test accuracy within "
        f"{TARGETS['accuracy_gap'] * 100:.0f} pt of the oracle.", "",
    ]
    if meta.get("missing"):
        lines += ["**Not measured** (the run was cut short): " + ", ".join(meta["missing"]) + ".", ""]
    rows = [r for r in result["summary"] if "best" in r]
    lines.append(md_table(
        ["cell", "k / n", "best (AP)", "ASR before → after (oracle)", "acc after / oracle", "removed (poisons)",
         "removed per seed", "rounds", "AP ≥ 0.8", "ASR ≤ 0.05", "acc ≥ oracle − 1 pt",
         f"removed ≤ {TARGETS['removal_budget']}× k (seeds)"],
        [[r["cell"], f"{r['k']} / {r['n_train']}", f"{r['best']} ({fmt(r['best_ap'], 3)})",
          f"{fmt(r['asr_before'], 3)} → {fmt(r['asr_after'], 3)} ({fmt(r['oracle_asr'], 3)})",
          f"{fmt(r['accuracy_after'], 3)} / {fmt(r['oracle_accuracy'], 3)}",
          f"{fmt(r['removed'], 1)} ({fmt(r['poisons_removed'], 1)})",
          " / ".join(str(int(v)) for v in r["removed_per_seed"]), fmt(r["rounds"], 1),
          fmt(r["ap_met"]), fmt(r["asr_met"]), fmt(r["accuracy_met"]),
          f"{fmt(r['budget_met'])} ({r['budget_seeds']} / {len(r['seeds'])})"] for r in rows]))
    lines += ["", f"![ASR against cleansing rounds]({relative_link(image, docs.parent)})", "",
              "AP against the poisoned set per detector (mean over seeds; chance = k / n):", ""]
    names = list(rows[0]["ap"]) if rows else []
    lines.append(md_table(["cell", *names], [[r["cell"], *(fmt(r["ap"].get(n), 3) for n in names)] for r in rows]))
    peered = [r for r in rows if "peer_ap" in r]
    if peered:
        names = list(peered[0]["peer_ap"])
        lines += ["", "Peers given the same probes (seed " + ", ".join(str(s) for s in peered[0]["peer_seeds"]) +
                  " only): each tool's train → probe matrix (positive = the training sample supports the probe's "
                  "label), ranked by the same normalized mean over the 8 probes, AP against the poisons; after the "
                  "slash, with cleanse's one-sided reference contrast applied to it too. Same models and "
                  "checkpoints (retrained; probes and test accuracy match the stored run); the peers weight "
                  "checkpoints by learning rate with raw gradients (their defaults), cleanse's TracIn uses unit "
                  "training gradients; dattri IF is its explicit inverse on the last layer (damping 1e-3). "
                  "Sign check: the opposite ranking has AP at chance for every peer (`ap_negated` in the JSON). "
                  "Next to it, cleanse's `tracin (triggered probes)` on the same seed:", ""]
        lines.append(md_table(
            ["cell", "cleanse tracin (triggered probes)", *names],
            [[r["cell"], fmt(r["cleanse_probe_ap_peer_seeds"], 3),
              *(f"{fmt(r['peer_ap'][n]['ap'], 3)} / {fmt(r['peer_ap'][n]['ap_contrast'], 3)}"
                if n not in r.get("peer_errors", {}) else "failed" for n in names)] for r in peered]))
    noise = [r for r in result["summary"] if "best" not in r]
    if noise:
        names = list(noise[0]["ap"])
        lines += ["", "Label noise (20% symmetric flips): `query.kind: val_errors` (8 misclassified validation "
                  "samples, labelled with the wrong prediction) next to self-influence, AP (mean over seeds). TracIn "
                  "reads the same geometric checkpoints here; with evenly spaced ones its self-influence AP was "
                  "0.979 / 0.928 / 0.846 (digits / breast_cancer / wine, previous run). Early checkpoints, where "
                  "every sample still has a large gradient, dilute the mislabel signal, which is why "
                  "self-influence (no probes) keeps `even` spacing:", ""]
        lines.append(md_table(["cell", *names], [[r["cell"], *(fmt(r["ap"].get(n), 3) for n in names)] for r in noise]))
    return "\n".join(lines)


def _cached(cache: Path | None) -> dict[tuple[str, int], dict[str, Any]]:
    if cache is None or not cache.is_file():
        return {}
    rows = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    return {(row["cell"], row["seed"]): row for row in rows}


def run(grid: str, seeds: list[int], out: Path, docs: Path | None, jobs: int, cache: Path | None = None,
        cached_only: bool = False) -> dict[str, Any]:
    """Run every (cell, seed) job not already in ``cache`` (one JSON line per finished job, so a
    killed run resumes); with ``cached_only``, publish what the cache holds and compute nothing."""
    from _common import publish

    started = time.perf_counter()
    backdoor_cells, noise_cells = GRIDS[grid]
    tasks = [(backdoor_job, cell, seed) for cell in backdoor_cells for seed in seeds]
    noise = [(noise_job, cell, seed) for cell in noise_cells for seed in seeds]
    # With many workers the long label-noise jobs go first, so they do not start last.
    tasks = noise + tasks if jobs >= len(tasks) // 2 else tasks + noise
    done = _cached(cache)
    todo = [] if cached_only else [t for t in tasks if (t[1].key, t[2]) not in done]

    def keep(result: dict[str, Any]) -> None:
        done[(result["cell"], result["seed"])] = result
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with cache.open("a") as handle:
                handle.write(json.dumps(jsonable(result)) + "\n")
        print(f"done {result['cell']} seed {result['seed']} ({time.perf_counter() - started:.0f} s)", flush=True)

    if jobs > 0 and todo:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(fn, cell, seed) for fn, cell, seed in todo]):
                keep(future.result())
    else:
        for fn, cell, seed in todo:
            keep(fn(cell, seed))
    results = [done[(cell.key, seed)] for _, cell, seed in tasks if (cell.key, seed) in done]
    missing = [f"{cell.key} seed {seed}" for _, cell, seed in tasks if (cell.key, seed) not in done]
    backdoor = [r for r in results if "cleansing" in r]
    result = {
        "meta": {"command": "python benchmarks/backdoor.py " + " ".join(sys.argv[1:]), "grid": grid, "seeds": seeds,
                 "jobs": jobs, "runtime_seconds": time.perf_counter() - started, "environment": environment(1),
                 "job_seconds": float(sum(r.get("seconds", 0.0) for r in results)),
                 "targets": TARGETS, "missing": missing},
        "summary": summarise(backdoor) + summarise([r for r in results if "cleansing" not in r]),
        "backdoor_jobs": backdoor,
        "noise_jobs": [r for r in results if "cleansing" not in r],
    }
    return publish(jsonable(result), out, docs, "backdoor", plot, render)


# ---- peers given the same probes: each tool's train -> probe matrix, aggregated like cleanse's.
# Every tool returns "helpful" scores (positive: training on the sample lowers the probe's loss under
# its label, i.e. supports the probe label), the orientation of cleanse's pairwise matrices.


def _peer_captum(full: bool) -> Any:
    def matrix(bench: Any, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        from captum.influence import TracInCP, TracInCPFast
        from quality import _captum_load, _ce_sum, _last_linear

        model = bench.model.module()
        if full:
            tracin = TracInCP(model, bench.dataset(), bench.checkpoint_files(), checkpoints_load_func=_captum_load,
                              loss_fn=_ce_sum(), batch_size=512, sample_wise_grads_per_batch=True)
        else:
            tracin = TracInCPFast(model, _last_linear(model), bench.dataset(), bench.checkpoint_files(),
                                  checkpoints_load_func=_captum_load, loss_fn=_ce_sum(), batch_size=512)
        return tracin.influence((x, y)).detach().double().numpy()  # (n_query, n_train)

    return matrix


def _peer_dattri_if(bench: Any, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    from quality import _dattri_if_last_layer, _features_loader

    attributor, _, features = _dattri_if_last_layer(bench)
    train_loader = _features_loader(features, *bench.tensors())
    attributor.cache(train_loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        helpful = attributor.attribute(train_loader, _features_loader(features, x, y))  # (n_train, n_query)
    return helpful.detach().double().numpy().T


def _peer_dattri_tracin(bench: Any, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    from quality import _dattri_tracin

    probes = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    helpful = _dattri_tracin(bench).attribute(bench.loader(256), probes)  # (n_train, n_query)
    return helpful.detach().double().numpy().T


PEERS = {"captum TracInCPFast (last layer)": _peer_captum(False), "captum TracInCP": _peer_captum(True),
         "dattri IF explicit (last layer)": _peer_dattri_if, "dattri TracIn": _peer_dattri_tracin}


def peer_job(cell: Cell, seed: int, stored: dict[str, Any] | None = None) -> dict[str, Any]:
    """The peers' AP against the poisons from the same probes (and reference inputs) as cleanse.

    Per peer: ``normalized_mean`` of its ``(n_query, n_train)`` support matrix (positive = supports the
    probe label, so higher = more harmful), without and with cleanse's one-sided reference contrast;
    ``ap_negated`` is the AP of the opposite sign (a sign check: it should be near chance).
    """
    import tempfile

    from cleanse.attribution import aggregate_support, contrast
    from cleanse.evaluate import detection_metrics
    from cleanse import api
    from cleanse.query import query_for
    from quality import Bench

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    prepared = _setup(cell, seed, QUERY)
    params, staged, model = prepared.params, prepared.staged, prepared.model
    query = query_for(params, staged, model)
    truth = staged.train.is_corrupted
    check = {"query_matches": stored is None or stored["query"] == jsonable(query.summary()),
             "test_accuracy": api.evaluate(prepared)["test_accuracy"]}
    if stored is not None:
        check["stored_test_accuracy"] = stored["base"]["test_accuracy"]
    joined = query.probes if query.reference is None else query.probes.concat(query.reference)
    x = torch.as_tensor(joined.features, dtype=torch.float32)
    y = torch.as_tensor(joined.label, dtype=torch.long)
    n_probes = len(query.probes)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as workdir:
        bench = Bench(cell=cell, params=params, staged=staged, model=model, workdir=Path(workdir))
        for name, matrix_fn in PEERS.items():
            started = time.perf_counter()
            try:
                both = np.asarray(matrix_fn(bench, x, y), dtype=np.float64)
            except Exception as error:  # a peer failing on one cell must not lose the others' numbers
                out[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
                continue
            support = aggregate_support(both[:n_probes])
            row: dict[str, Any] = {"seconds": time.perf_counter() - started,
                                   "ap": detection_metrics(support, truth)["average_precision"],
                                   "ap_negated": detection_metrics(-support, truth)["average_precision"]}
            if query.reference is not None:
                contrasted, _ = contrast(support, aggregate_support(both[n_probes:]))
                row["ap_contrast"] = detection_metrics(contrasted, truth)["average_precision"]
            out[name] = row
            print(f"  {cell.key} seed {seed} {name}: {row}", flush=True)
    return {"cell": cell.key, "seed": seed, "check": check, "peers": out}


def run_peers(out: Path, docs: Path | None, seeds: list[int], cells: list[str] | None) -> dict[str, Any]:
    """Add the peers' probe APs to the stored result at ``out`` (cleanse's loops are not rerun); the
    file is rewritten after every cell, so a run cut short keeps what it finished."""
    from _common import publish

    result = json.loads(out.read_text())
    stored = {(job["cell"], job["seed"]): job for job in result["backdoor_jobs"]}
    for cell in GRIDS["full"][0]:
        if cells and cell.key not in cells:
            continue
        for seed in seeds:
            job = stored.get((cell.key, seed))
            if job is None:
                continue
            started = time.perf_counter()
            measured = peer_job(cell, seed, job)
            job["peers"] = {**measured["peers"], "_check": measured["check"]}
            print(f"done peers {cell.key} seed {seed} ({time.perf_counter() - started:.0f} s)", flush=True)
            result["meta"]["peers_command"] = "python benchmarks/backdoor.py " + " ".join(sys.argv[1:])
            result["summary"] = summarise(result["backdoor_jobs"]) + summarise(result["noise_jobs"])
            publish(jsonable(result), out, docs, "backdoor", plot, render)
    return result


def rerun(out: Path, docs: Path | None, pairs: list[str], cache: Path | None) -> dict[str, Any]:
    """Recompute the backdoor jobs ``pairs`` ("cell:seed") and replace them in the stored result at
    ``out``, keeping their peers' numbers (with ``cache``, jobs already there are not recomputed)."""
    from _common import publish

    cells = {cell.key: cell for cell in GRIDS["full"][0]}
    done = _cached(cache)
    fresh = []
    for pair in pairs:
        key, seed = pair.rsplit(":", 1)
        job = done.get((key, int(seed))) or backdoor_job(cells[key], int(seed))
        if cache is not None and (key, int(seed)) not in done:
            with cache.open("a") as handle:
                handle.write(json.dumps(jsonable(job)) + "\n")
        fresh.append(job)
    result = json.loads(out.read_text())
    for job in fresh:
        index = next(i for i, old in enumerate(result["backdoor_jobs"])
                     if (old["cell"], old["seed"]) == (job["cell"], job["seed"]))
        if "peers" in result["backdoor_jobs"][index]:
            job["peers"] = result["backdoor_jobs"][index]["peers"]
        result["backdoor_jobs"][index] = job
    result["meta"]["reruns"] = sorted(set(result["meta"].get("reruns", [])) | set(pairs))
    result["summary"] = summarise(result["backdoor_jobs"]) + summarise(result["noise_jobs"])
    return publish(jsonable(result), out, docs, "backdoor", plot, render)


def render_only(out: Path, docs: Path | None) -> dict[str, Any]:
    """Recompute the summary from the stored per-seed jobs at ``out`` and re-render (no measuring)."""
    from _common import publish

    result = json.loads(out.read_text())
    result["meta"]["targets"] = TARGETS
    result["summary"] = summarise(result["backdoor_jobs"]) + summarise(result["noise_jobs"])
    return publish(jsonable(result), out, docs, "backdoor", plot, render)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/backdoor.json")
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (0 = this process)")
    parser.add_argument("--cache", type=Path, default=None, help="JSON-lines file of finished jobs (resume)")
    parser.add_argument("--cached-only", action="store_true", help="publish the cached jobs; compute nothing")
    parser.add_argument("--render-only", action="store_true",
                        help="recompute the summary from --out's per-seed jobs and re-render; compute nothing")
    parser.add_argument("--peers", action="store_true",
                        help="add captum's and dattri's probe APs for --seeds to --out (needs .venv-bench)")
    parser.add_argument("--rerun", default="", help="comma-separated cell:seed backdoor jobs to recompute and replace "
                        "in --out (the rest of --out is kept)")
    parser.add_argument("--cells", default="", help="with --peers: comma-separated cell keys (default: all)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    docs = None if args.no_docs else args.docs
    if args.rerun:
        rerun(args.out, docs, [p for p in args.rerun.split(",") if p], args.cache)
        return 0
    if args.render_only or args.peers:
        if args.peers:
            run_peers(args.out, docs, seeds, [c for c in args.cells.split(",") if c])
        else:
            render_only(args.out, docs)
        return 0
    result = run(args.grid, seeds, args.out, None if args.no_docs else args.docs, args.jobs, args.cache,
                 args.cached_only)
    for row in result["summary"]:
        print(row["cell"], {k: row[k] for k in ("best", "best_ap", "asr_after", "accuracy_after", "oracle_accuracy")
                            if k in row})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data cleansing for GANs (issue 17): how well ``gan_influence`` predicts the effect of removing
one training instance, whether removing the most harmful instances improves the GAN's metric, how
it finds planted outliers, and what the influence pass costs.

Library calls only (``cleanse.families.gan.*``): train a GAN with its traced window, ITD (backward
adjoint pass, all instances at once) and AID, true changes by counterfactual replay of the window
(same batches and latents: Terashita et al.'s ground truth), verification by replay and by
retraining from scratch. One torch thread per process; ``--jobs`` runs tasks in a process pool.

Parts (every number in docs/benchmarks.md "GAN data cleansing" comes from here):

1. accuracy: 200 target instances in the traced window, true change of the validation metric by
   replaying the window without each one, against ITD (exact adjoint and the papers' constant
   optimizer buffers) and AID: Kendall tau and Jaccard of the top 10% most harmful, windows of
   1, 5 and 10 epochs. gaussian2d (ALL) and digits (conv GAN, FID).
2. cleansing: remove the top-k% by harm (``direction * predicted change``) for k in KS, verified by
   replaying the window without them (all k) and by retraining from scratch (``--scratch-ks``),
   against random removal, influence on the D loss and an Isolation Forest; change of the TEST
   metric against no removal, per seed; Wilcoxon signed-rank test (one-sided, paired by seed).
3. planted outliers (5%): AP of each score against the planted set, metric after removing the top
   5% against the oracle (exactly the planted rows).
   Diagnosis (gaussian2d): the same targets against the replay's derivative (a mask 1 - eps), which
   ITD computes exactly, to separate the estimator's error from the non-linearity of one removal.
4. cost: the all-instance ITD pass over the traced window's training time, and per-instance replay
   of every instance in the window (the ground truth's cost) over the ITD pass.

Fixed choices (made before looking at any result, never per cell): the recipes in RECIPES; the
influence used for cleansing is ITD with the exact optimizer adjoint (``optimizer_adjoint=True``);
k, seeds and the methods are the same for every cell.

    python benchmarks/gan.py --jobs 1                 # measure, write results and docs
    python benchmarks/gan.py --render-only            # re-render docs from the results file
    python benchmarks/gan.py --smoke --out /tmp/g.json --docs /tmp/b.md   # tiny sizes (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from _common import REPO, environment, fmt, md_table, output_arguments, publish, render_saved  # noqa: E402

SECTION = "gan"
DEFAULT_OUT = REPO / "benchmarks/results/gan.json"
DEFAULT_DOCS = REPO / "docs/benchmarks.md"
KS = (0.01, 0.02, 0.05, 0.10, 0.20)
METHODS = ("influence", "random", "dloss", "isolation_forest")
TARGETS = {"gaussian2d": {"tau": 0.8, "jaccard": 0.7}, "gaussian2d_iclr": {"tau": 0.8, "jaccard": 0.7},
           "digits": {"tau": 0.6}}

# Per dataset: data sizes, the GAN, the recipe and the metric. "paper" is the ICLR 2021 2-D recipe
# (simultaneous SGD, lr 1e-3), measured for accuracy only: at CPU size it barely moves the GAN.
RECIPES: dict[str, dict[str, Any]] = {
    "gaussian2d": {"source": "synthetic:gaussian2d", "n_train": 1000, "n_val": 500, "n_test": 1000,
                   "spec": ("mlp", (2,), 10, (32, 32), (64, 64), "float64"), "metric": "all", "n_latents": 1000,
                   "recipe": {"epochs": 30, "batch_size": 100, "optimizer": "adam", "lr_d": 2e-3, "lr_g": 2e-3}},
    "gaussian2d_paper": {"source": "synthetic:gaussian2d", "n_train": 1000, "n_val": 500, "n_test": 1000,
                         "spec": ("mlp", (2,), 10, (32, 32), (64, 64), "float64"), "metric": "all",
                         "n_latents": 1000, "recipe": {"epochs": 30, "batch_size": 100, "optimizer": "sgd",
                                                       "lr_d": 1e-3, "lr_g": 1e-3}},
    # The ICLR 2021 validation configuration itself (10k train, 1k val and test, 50 epochs), for accuracy only.
    "gaussian2d_iclr": {"source": "synthetic:gaussian2d", "n_train": 10000, "n_val": 1000, "n_test": 1000,
                        "spec": ("mlp", (2,), 10, (32, 32), (64, 64), "float64"), "metric": "all",
                        "n_latents": 1000, "recipe": {"epochs": 50, "batch_size": 100, "optimizer": "sgd",
                                                      "lr_d": 1e-3, "lr_g": 1e-3}},
    "digits": {"source": "sklearn:digits", "n_train": 400, "n_val": 300, "n_test": 400,
               "spec": ("conv", (1, 8, 8), 16, (16, 8), (8, 16), "float32"), "metric": "fid", "n_latents": 400,
               "recipe": {"epochs": 12, "batch_size": 40, "optimizer": "adam", "lr_d": 2e-3, "lr_g": 2e-3}},
}
SMOKE = {"n_train": 200, "n_val": 100, "n_test": 150, "epochs": 3, "n_latents": 150}


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


# ----------------------------------------------------------------------------- setup


class Setup:
    """One dataset cell at one seed: staged splits, the trained GAN and the metrics on val/test."""

    def __init__(self, name: str, seed: int, *, window: int = 1, planted: float = 0.0, smoke: bool = False):
        import torch

        from cleanse.families.gan.data import stage_gan_data
        from cleanse.families.gan.nets import GanSpec
        from cleanse.families.gan.step import GanRecipe
        from cleanse.families.gan.training import train_gan

        cell = dict(RECIPES[name])
        recipe = dict(cell["recipe"])
        if smoke:
            cell.update({k: SMOKE[k] for k in ("n_train", "n_val", "n_test", "n_latents")})
            recipe["epochs"] = SMOKE["epochs"]
        recipe["epochs"] = max(recipe["epochs"], window)
        self.name, self.seed, self.cell = name, seed, cell
        self.staged = stage_gan_data(cell["source"], cell["n_train"], cell["n_val"], cell["n_test"],
                                     "outliers" if planted else "none", planted, None, None, seed)
        self.spec = GanSpec(*cell["spec"])
        self.recipe = GanRecipe(trace_epochs=window, **recipe)
        dtype = self.spec.torch_dtype
        self.data = torch.as_tensor(self.staged.train.features, dtype=dtype)
        self.feature_net = None
        if self.spec.arch == "conv":
            from cleanse.families.gan.features import train_feature_net

            started = time.perf_counter()
            self.feature_net = train_feature_net(self.staged.train.features, self.staged.train.label, seed,
                                                 test_images=self.staged.test.features,
                                                 test_labels=self.staged.test.label)
            self.feature_seconds = time.perf_counter() - started
        self.trained = train_gan(self.spec, self.recipe, self.data, seed)
        self.metric_name = cell["metric"]
        self.val = self.metric(self.metric_name, self.staged.val.features)
        self.test = self.metric(self.metric_name, self.staged.test.features)
        self.direction = float(self.val.direction)
        self.base_val = self.val.evaluate(self.trained.g_state, self.trained.d_state, self.spec)
        self.base_test = self.test.evaluate(self.trained.g_state, self.trained.d_state, self.spec)

    def metric(self, name: str, real: np.ndarray) -> Any:
        import torch

        from cleanse.families.gan.metrics import make_metric

        dtype = self.spec.torch_dtype
        return make_metric(name, real=torch.as_tensor(real, dtype=dtype), spec=self.spec,
                           n_latents=self.cell["n_latents"], seed=self.seed, feature_net=self.feature_net,
                           train_data=self.data)

    def itd(self, metric: Any, exact: bool = True) -> tuple[np.ndarray, float]:
        from cleanse.families.gan.influence import itd_influence

        started = time.perf_counter()
        change = itd_influence(self.spec, self.recipe, self.trained.trace, self.data, metric.differentiable(self.spec),
                               optimizer_adjoint=exact)
        return change, time.perf_counter() - started

    def keep(self, removed: np.ndarray) -> Any:
        import torch

        keep = torch.ones(self.data.shape[0], dtype=self.data.dtype)
        keep[torch.as_tensor(np.asarray(removed, dtype=np.int64))] = 0
        return keep

    def replay_change(self, removed: np.ndarray, metric: Any, base: float) -> float:
        from cleanse.families.gan.training import replay

        g, d = replay(self.spec, self.recipe, self.trained.trace, self.data, self.keep(removed))
        return metric.evaluate(g, d, self.spec) - base

    def scratch_change(self, removed: np.ndarray) -> float:
        from cleanse.families.gan.training import retrain_gan

        again = retrain_gan(self.spec, self.recipe, self.data, self.seed, self.keep(removed))
        return self.test.evaluate(again.g_state, again.d_state, self.spec) - self.base_test


def _threads() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- part 1 + 4


def accuracy(name: str, window: int, targets: int, smoke: bool) -> dict[str, Any]:
    """True change of the validation metric by replay for ``targets`` rows against ITD and AID."""
    from cleanse.families.gan.agreement import rank_agreement, replay_targets
    from cleanse.families.gan.influence import aid_influence

    setup = Setup(name, 0, window=window, smoke=smoke)
    in_window = np.flatnonzero(setup.trained.trace.in_window(setup.data.shape[0]).numpy())
    rows = replay_targets(setup.trained.trace, setup.data.shape[0], targets, 0)
    estimates, seconds = {}, {}
    estimates["itd"], seconds["itd"] = setup.itd(setup.val, exact=True)
    if setup.recipe.optimizer == "adam" or setup.recipe.momentum:
        estimates["itd_paper"], seconds["itd_paper"] = setup.itd(setup.val, exact=False)
    started = time.perf_counter()
    steps = setup.trained.trace.steps
    estimates["aid"] = aid_influence(setup.spec, setup.recipe, setup.trained.g_state, setup.trained.d_state,
                                     setup.data, setup.val.differentiable(setup.spec), depth=steps, damping=0.0,
                                     scale=1.0, seed=0, batch_size=setup.recipe.batch_size)
    seconds["aid"] = time.perf_counter() - started
    started = time.perf_counter()
    truth = np.array([setup.replay_change(np.array([row]), setup.val, setup.base_val) for row in rows])
    per_replay = (time.perf_counter() - started) / rows.size
    agreement = {}
    for method, estimate in estimates.items():
        agreement[method] = {
            **rank_agreement(estimate[rows], truth, setup.direction),
            "pearson": float(np.corrcoef(estimate[rows], truth)[0, 1]),
            "scale_ratio": float(np.std(estimate[rows]) / max(np.std(truth), 1e-300)),
        }
    return {"part": "accuracy", "cell": name, "window": window, "n_targets": int(rows.size),
            "n_train": int(setup.data.shape[0]), "n_in_window": int(in_window.size), "steps": steps,
            "metric": setup.metric_name, "dtype": setup.spec.dtype, "recipe": setup.recipe.to_json(),
            "truth_sd": float(np.std(truth)), "truth_mean_abs": float(np.mean(np.abs(truth))),
            "base_val": setup.base_val, "agreement": agreement, "seconds": seconds,
            "seconds_train": setup.trained.seconds, "seconds_traced": setup.trained.seconds_traced,
            "seconds_per_replay": per_replay,
            "itd_over_traced": seconds["itd"] / setup.trained.seconds_traced,
            "replay_all_over_itd": per_replay * in_window.size / seconds["itd"],
            "feature_accuracy": None if setup.feature_net is None else setup.feature_net.accuracy}


def linearity(name: str, window: int, targets: int, smoke: bool, epsilon: float = 1e-3) -> dict[str, Any]:
    """Diagnosis of the estimate's error: the same targets as :func:`accuracy`, with the replay's
    derivative ``(M(m_j = 1 - eps) - M) / eps`` (what ITD with the exact adjoint computes) beside the
    whole removal ``M(m_j = 0) - M``. ITD against the derivative isolates the estimator; the
    derivative against the removal measures how non-linear one removal is (float64 cells only)."""
    from cleanse.families.gan.agreement import rank_agreement, replay_targets
    from cleanse.families.gan.training import replay

    setup = Setup(name, 0, window=window, smoke=smoke)
    rows = replay_targets(setup.trained.trace, setup.data.shape[0], targets, 0)
    estimate, _ = setup.itd(setup.val, exact=True)
    removal = np.array([setup.replay_change(np.array([row]), setup.val, setup.base_val) for row in rows])
    derivative = np.empty(rows.size)
    for i, row in enumerate(rows):
        keep = setup.keep(np.array([], dtype=np.int64))
        keep[int(row)] = 1.0 - epsilon
        g, d = replay(setup.spec, setup.recipe, setup.trained.trace, setup.data, keep)
        derivative[i] = (setup.val.evaluate(g, d, setup.spec) - setup.base_val) / epsilon

    def agree(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        return {**rank_agreement(a, b, setup.direction), "pearson": float(np.corrcoef(a, b)[0, 1])}

    return {"part": "linearity", "cell": name, "window": window, "n_targets": int(rows.size), "epsilon": epsilon,
            "itd_vs_derivative": agree(estimate[rows], derivative),
            "derivative_vs_removal": agree(derivative, removal), "itd_vs_removal": agree(estimate[rows], removal)}


# ----------------------------------------------------------------------------- part 2 + 3


def scores_for(setup: Setup, planted: bool) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Harm scores (higher = more harmful) of every method, and the seconds of each."""
    from cleanse.families.gan.outliers import isolation_forest_scores
    from cleanse.seeds import rng

    scores, seconds = {}, {}
    change, seconds["influence"] = setup.itd(setup.val)
    scores["influence"] = setup.direction * change
    dloss = setup.metric("dloss", setup.staged.val.features)
    change, seconds["dloss"] = setup.itd(dloss)
    scores["dloss"] = float(dloss.direction) * change
    started = time.perf_counter()
    raw = setup.staged.train.features
    features = raw if setup.feature_net is None else setup.feature_net.embed(raw)
    scores["isolation_forest"] = isolation_forest_scores(np.asarray(features), setup.seed)
    seconds["isolation_forest"] = time.perf_counter() - started
    scores["random"] = rng(setup.seed, "random_ids").random(raw.shape[0])
    if planted:
        scores["oracle"] = setup.staged.train.is_corrupted.astype(np.float64)
    return scores, seconds


def top(score: np.ndarray, count: int) -> np.ndarray:
    return np.argsort(-score, kind="stable")[:count]


def cleansing(name: str, seed: int, planted: float, scratch_ks: tuple[float, ...], smoke: bool) -> dict[str, Any]:
    """One seed: every method's top-k removed, the test metric's change by replay and from scratch."""
    from sklearn.metrics import average_precision_score

    setup = Setup(name, seed, planted=planted, smoke=smoke)
    scores, seconds = scores_for(setup, bool(planted))
    n = setup.data.shape[0]
    changes: dict[str, dict[str, dict[str, float | None]]] = {}
    for method in [m for m in (*METHODS, "oracle") if m in scores]:
        changes[method] = {}
        for k in KS:
            count = int(setup.staged.train.is_corrupted.sum()) if method == "oracle" else int(round(k * n))
            if method == "oracle" and abs(k - planted) > 1e-9:
                continue
            removed = top(scores[method], count)
            replayed = setup.replay_change(removed, setup.test, setup.base_test)
            scratch = setup.scratch_change(removed) if any(abs(k - s) < 1e-9 for s in scratch_ks) else None
            changes[method][f"{k:.2f}"] = {"replay": replayed, "scratch": scratch, "n_removed": count}
    result: dict[str, Any] = {"part": "planted" if planted else "cleansing", "cell": name, "seed": seed,
                              "n_train": n, "metric": setup.metric_name, "direction": setup.direction,
                              "base_test": setup.base_test, "changes": changes, "seconds": seconds,
                              "seconds_train": setup.trained.seconds, "seconds_traced": setup.trained.seconds_traced}
    if planted:
        truth = setup.staged.train.is_corrupted
        result["average_precision"] = {m: float(average_precision_score(truth, scores[m]))
                                       for m in METHODS if m in scores}
        result["n_planted"] = int(truth.sum())
    return result


# ----------------------------------------------------------------------------- tasks


def run_task(task: tuple[Any, ...]) -> dict[str, Any]:
    _threads()
    started = time.perf_counter()
    try:
        if task[0] == "accuracy":
            out = accuracy(*task[1:])
        elif task[0] == "linearity":
            out = linearity(*task[1:])
        else:
            out = cleansing(*task[1:])
    except Exception as exc:  # one failed task must not lose the others
        import traceback

        out = {"part": task[0], "task": list(task), "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()[-2000:]}
    out["wall_seconds"] = time.perf_counter() - started
    return out


def task_key(task: tuple[Any, ...]) -> str:
    return "_".join(str(x) for x in task if not isinstance(x, (tuple, bool))).replace(".", "p")


def plan(args: argparse.Namespace) -> list[tuple[Any, ...]]:
    """The most important numbers first, so a cut-short run still covers every part."""
    smoke, scratch = args.smoke, tuple(float(k) for k in args.scratch_ks.split(",") if k)
    seeds, planted_seeds = range(args.seeds), range(args.planted_seeds)
    tasks: list[tuple[Any, ...]] = [("accuracy", "gaussian2d", 1, args.targets, smoke),
                                    ("accuracy", "digits", 1, args.targets, smoke)]
    for seed in seeds:
        tasks += [("cleansing", "gaussian2d", seed, 0.0, scratch, smoke), ("cleansing", "digits", seed, 0.0, scratch, smoke)]
    for seed in planted_seeds:
        tasks += [("planted", "gaussian2d", seed, args.planted, (args.planted,), smoke),
                  ("planted", "digits", seed, args.planted, (args.planted,), smoke)]
    tasks.append(("accuracy", "gaussian2d_paper", 1, args.targets, smoke))
    if not smoke:  # 10k instances: too large for the smoke run
        tasks.append(("accuracy", "gaussian2d_iclr", 1, args.targets, smoke))
    for window in (int(w) for w in args.windows.split(",") if w and int(w) > 1):
        tasks += [("accuracy", "gaussian2d", window, args.targets, smoke),
                  ("accuracy", "digits", window, args.window_targets_digits, smoke)]
    tasks.append(("linearity", "gaussian2d", 1, args.targets, smoke))
    return tasks


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    tasks, runs, todo = plan(args), [], []
    for task in tasks:
        path = cache / f"{task_key(task)}{'_smoke' if args.smoke else ''}.json"
        if path.is_file():
            runs.append(json.loads(path.read_text()))
        else:
            todo.append((task, path))
    log(f"{len(tasks)} tasks, {len(runs)} from {cache}, {len(todo)} to run with {args.jobs} job(s)")

    def done(task: tuple[Any, ...], path: Path, out: dict[str, Any]) -> None:
        from cleanse.storage import write_json

        from _common import jsonable

        out["task_key"] = task_key(task)
        if "error" not in out:
            write_json(jsonable(out), path)
        runs.append(jsonable(out))
        log(f"{task_key(task)}: {out.get('error') or 'ok'} ({out['wall_seconds']:.0f} s)")

    if args.jobs <= 1:
        for task, path in todo:
            done(task, path, run_task(task))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_task, task): (task, path) for task, path in todo}
            for future in as_completed(futures):
                done(*futures[future], future.result())
    return runs


# ----------------------------------------------------------------------------- summary


def _wilcoxon(diff: list[float]) -> float | None:
    """One-sided Wilcoxon signed-rank p that the paired improvement differences are > 0."""
    from scipy.stats import wilcoxon

    diff_a = np.asarray(diff, dtype=np.float64)
    if diff_a.size < 2 or not np.any(diff_a != 0):
        return None
    return float(wilcoxon(diff_a, alternative="greater").pvalue)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    accuracy_rows = sorted((r for r in ok if r["part"] == "accuracy"), key=lambda r: (r["cell"], r["window"]))
    acc = [{"cell": r["cell"], "window": r["window"], "n_targets": r["n_targets"], "metric": r["metric"],
            "dtype": r["dtype"], "optimizer": r["recipe"]["optimizer"], "agreement": r["agreement"],
            "truth_sd": r["truth_sd"], "itd_over_traced": r["itd_over_traced"],
            "replay_all_over_itd": r["replay_all_over_itd"], "seconds_itd": r["seconds"]["itd"],
            "seconds_traced": r["seconds_traced"], "seconds_per_replay": r["seconds_per_replay"],
            "n_in_window": r["n_in_window"], "feature_accuracy": r.get("feature_accuracy")} for r in accuracy_rows]
    cleanse: dict[str, Any] = {}
    for part in ("cleansing", "planted"):
        for cell in sorted({r["cell"] for r in ok if r["part"] == part}):
            mine = sorted((r for r in ok if r["part"] == part and r["cell"] == cell), key=lambda r: r["seed"])
            direction = mine[0]["direction"]
            entry: dict[str, Any] = {"seeds": [r["seed"] for r in mine], "metric": mine[0]["metric"],
                                     "direction": direction, "n_train": mine[0]["n_train"],
                                     "base_test": [r["base_test"] for r in mine], "cells": []}
            methods = [m for m in (*METHODS, "oracle") if m in mine[0]["changes"]]
            for method in methods:
                for k, first in mine[0]["changes"][method].items():
                    for verify in ("replay", "scratch"):
                        if first[verify] is None:
                            continue
                        values = [r["changes"][method][k][verify] for r in mine]
                        row = {"method": method, "k": float(k), "verify": verify, "n_removed": first["n_removed"],
                               "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                               "values": values}
                        if method == "influence":
                            for other in ("random", "dloss", "isolation_forest"):
                                theirs = [r["changes"][other][k][verify] for r in mine]
                                row[f"p_vs_{other}"] = _wilcoxon([direction * (a - b) for a, b in zip(values, theirs)])
                                row[f"wins_vs_{other}"] = int(sum(direction * (a - b) > 0 for a, b in zip(values, theirs)))
                        entry["cells"].append(row)
            if part == "planted":
                entry["average_precision"] = {m: float(np.mean([r["average_precision"][m] for r in mine]))
                                              for m in mine[0]["average_precision"]}
            entry["itd_over_traced"] = float(np.mean([r["seconds"]["influence"] / r["seconds_traced"] for r in mine]))
            cleanse[f"{part}/{cell}"] = entry
    linear = [{k: r[k] for k in ("cell", "window", "n_targets", "epsilon", "itd_vs_derivative",
                                 "derivative_vs_removal", "itd_vs_removal")} for r in ok if r["part"] == "linearity"]
    return {"accuracy": acc, "cleansing": cleanse, "linearity": linear}


# ----------------------------------------------------------------------------- docs

LABELS = {"influence": "influence on the metric (ITD)", "random": "random", "dloss": "influence on D loss (ITD)",
          "isolation_forest": "Isolation Forest", "oracle": "oracle (planted rows)"}
CELL_LABELS = {"gaussian2d": "gaussian2d, FC GAN, ALL", "gaussian2d_paper": "gaussian2d, paper recipe (SGD 1e-3)",
               "gaussian2d_iclr": "gaussian2d, ICLR 2021 validation recipe (10k, 50 epochs, SGD 1e-3)",
               "digits": "digits, conv GAN, FID"}


def plot(result: dict[str, Any], image: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cleanse.storage import write_bytes

    cells = {key: entry for key, entry in result["summary"]["cleansing"].items() if key.startswith("cleansing/")}
    figure, axes = plt.subplots(1, max(len(cells), 1), figsize=(5.2 * max(len(cells), 1), 3.4), squeeze=False)
    for axis, (key, entry) in zip(axes[0], cells.items()):
        for method in METHODS:
            rows = sorted((r for r in entry["cells"] if r["method"] == method and r["verify"] == "replay"),
                          key=lambda r: r["k"])
            if not rows:
                continue
            x = [100 * r["k"] for r in rows]
            mean = np.array([entry["direction"] * r["mean"] for r in rows])
            sd = np.array([(r["sd"] or 0.0) / np.sqrt(len(r["values"])) for r in rows])
            axis.errorbar(x, mean, yerr=sd, marker="o", ms=3, capsize=2, label=LABELS[method])
        axis.axhline(0, color="gray", lw=0.6)
        axis.set_xscale("log")
        axis.set_xlabel("removed (% of training set)")
        axis.set_ylabel(f"improvement of test {entry['metric'].upper()} (mean ± se)")
        axis.set_title(f"{CELL_LABELS.get(key.split('/')[1], key)}, {len(entry['seeds'])} seeds, verified by replay", fontsize=9)
        axis.legend(fontsize=6)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    image.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(buffer.getvalue(), image)
    plt.close(figure)


def _p(value: float | None) -> str:
    return "–" if value is None else (f"{value:.3f}" if value >= 0.001 else f"{value:.1e}")


def verdicts(summary: dict[str, Any]) -> list[str]:
    """The issue's must-show targets, met or missed, with the measured numbers."""
    out = []
    for row in summary["accuracy"]:
        target = TARGETS.get(row["cell"])
        if target is None or row["window"] != 1:
            continue
        ag = row["agreement"]["itd"]
        parts = [f"τ {ag['kendall_tau']:.3f} (target ≥ {target['tau']}: "
                 f"{'met' if ag['kendall_tau'] >= target['tau'] else 'missed by ' + format(target['tau'] - ag['kendall_tau'], '.3f')})"]
        if "jaccard" in target:
            parts.append(f"Jaccard@10% {ag['jaccard_top10']:.3f} (target ≥ {target['jaccard']}: "
                         f"{'met' if ag['jaccard_top10'] >= target['jaccard'] else 'missed by ' + format(target['jaccard'] - ag['jaccard_top10'], '.3f')})")
        out.append(f"Accuracy, {CELL_LABELS[row['cell']]}, {row['n_targets']} targets, 1-epoch window, ITD: " + ", ".join(parts) + ".")
    for key, entry in summary["cleansing"].items():
        part, cell = key.split("/")
        if part != "cleansing":
            continue
        for verify in ("replay", "scratch"):
            rows = [r for r in entry["cells"] if r["method"] == "influence" and r["verify"] == verify]
            if not rows:
                continue
            said = []
            for other in ("random", "dloss", "isolation_forest"):
                ks = [f"{100 * r['k']:g}%" for r in rows if (r.get("p_vs_" + other) or 1.0) < 0.05]
                said.append(f"{LABELS[other]} at {', '.join(ks) if ks else 'no k'}")
            out.append(f"Cleansing, {CELL_LABELS[cell]}, verified by {verify}: influence improves the test "
                       f"{entry['metric'].upper()} more than (p < 0.05) " + "; ".join(said) + ".")
    for key, entry in summary["cleansing"].items():
        part, cell = key.split("/")
        if part != "planted":
            continue
        ap = entry["average_precision"]
        oracle = [r for r in entry["cells"] if r["method"] == "oracle" and r["verify"] == "replay"]
        k = oracle[0]["k"] if oracle else None
        infl = [r for r in entry["cells"] if r["method"] == "influence" and r["verify"] == "replay" and r["k"] == k]
        tail = (f"; test {entry['metric'].upper()} change after removing the top {100 * k:g}% (replay): influence "
                f"{infl[0]['mean']:+.4f}, oracle {oracle[0]['mean']:+.4f}") if oracle and infl else ""
        out.append(f"Planted outliers, {CELL_LABELS[cell]}: AP influence {ap['influence']:.3f} against Isolation "
                   f"Forest {ap['isolation_forest']:.3f}{tail}.")
    for row in summary["accuracy"]:
        if row["window"] == 1 and row["cell"] in TARGETS:
            out.append(f"Cost, {CELL_LABELS[row['cell']]}: the all-instance ITD pass takes {row['itd_over_traced']:.2f}× "
                       f"the traced window's training time (target ≤ 5: "
                       f"{'met' if row['itd_over_traced'] <= 5 else 'missed'}); per-instance replay of the "
                       f"{row['n_in_window']} instances would take {row['replay_all_over_itd']:.0f}× the ITD pass.")
    return out


def render(result: dict[str, Any], docs: Path, out: Path, image: Path) -> str:
    env, summary = result["environment"], result["summary"]
    where = Path(out).relative_to(REPO) if Path(out).is_relative_to(REPO) else out
    lines = [
        "## GAN data cleansing", "",
        f"*Generated by `python benchmarks/gan.py {result['argv']}` (commit `{(env.get('git_commit') or '?')[:12]}`, "
        f"{env['created']}, {sum(r['wall_seconds'] for r in result['runs']) / 60:.1f} min of measuring summed over "
        f"{len(result['runs'])} tasks, {result['wall_seconds'] / 60:.1f} min of wall time in the last invocation (tasks "
        f"already measured are read from `--cache`), one torch thread per process, --jobs 1, on "
        f"{env['cpu_count']} cores shared with other work: load average {env['load_average_start'][0]:.1f} at the last start, "
        f"{result['load_average_end'][0]:.1f} at the end). Raw numbers per seed and target: `{where}`.*", "",
        "Terashita, Ohashi and Hara's influence of a training instance on a GAN evaluation metric, through the "
        "coupled D/G updates of the traced window (`cleanse.families.gan`). Fixed settings for every cell "
        "(never chosen per cell from ground truth):", "",
    ]
    for name, cell in result["recipes"].items():
        recipe = cell["recipe"]
        arch, shape, z, hg, hd, dtype = cell["spec"]
        lines.append(f"- `{name}`: {cell['source']}, n_train {cell['n_train']}, n_val {cell['n_val']} (the estimator's "
                     f"metric), n_test {cell['n_test']} (the reported metric), {arch} GAN z={z} G{list(hg)} D{list(hd)} "
                     f"{dtype}, {recipe['optimizer']} lr {recipe['lr_d']:g}, batch {recipe['batch_size']}, "
                     f"{recipe['epochs']} epochs (at least the window), simultaneous updates, metric {cell['metric'].upper()} "
                     f"on {cell['n_latents']} fixed latents.")
    lines += ["", "**Targets (issue 17):**", ""] + [f"- {line}" for line in verdicts(summary)]
    lines += ["", "### Estimation accuracy against counterfactual replay", "",
              "True change: the traced window replayed without the target instance (same batches and latents), the "
              "validation metric's change. ITD = the backward adjoint pass with the exact optimizer adjoint "
              "(`optimizer_adjoint=True`, `gan_influence`'s default); ITD (paper) = the papers' choice, Adam's previous "
              "moment buffers held constant (`optimizer_adjoint: false`); AID = the Neumann series at the final parameters with depth = "
              "the window's steps. Kendall τ and Jaccard of the top 10% most harmful (direction × change).", ""]
    table = []
    for row in summary["accuracy"]:
        ag = row["agreement"]
        cells = [CELL_LABELS.get(row["cell"], row["cell"]), row["window"], row["n_targets"]]
        for method in ("itd", "itd_paper", "aid"):
            cells.append(f"{fmt(ag[method]['kendall_tau'], 3)} / {fmt(ag[method]['jaccard_top10'], 2)}"
                         if method in ag else "–")
        cells += [fmt(row["truth_sd"], 5 if row["truth_sd"] < 1e-3 else 4)]
        table.append(cells)
    lines.append(md_table(["cell", "window (epochs)", "targets", "ITD τ / J@10%", "ITD (paper) τ / J@10%",
                           "AID τ / J@10%", "sd of true change"], table))
    for row in summary.get("linearity", []):
        def pair(key: str) -> str:
            return f"τ {row[key]['kendall_tau']:.3f}, Jaccard@10% {row[key]['jaccard_top10']:.3f}"

        lines += ["", f"Where the error comes from ({CELL_LABELS.get(row['cell'], row['cell'])}, {row['window']}-epoch "
                  f"window, the same {row['n_targets']} targets): the replay's derivative (mask m_j = 1 − {row['epsilon']:g}, "
                  f"divided by {row['epsilon']:g}) against ITD: {pair('itd_vs_derivative')}; the whole removal against "
                  f"that derivative: {pair('derivative_vs_removal')}. ITD computes the derivative; what separates "
                  "it from the whole removal is how non-linear removing one instance is."]
    lines += ["", "### Cost", ""]
    cost = [[CELL_LABELS.get(r["cell"], r["cell"]), r["window"], fmt(r["seconds_traced"], 2), fmt(r["seconds_itd"], 2),
             fmt(r["itd_over_traced"], 2), fmt(r["seconds_per_replay"], 3), r["n_in_window"],
             fmt(r["replay_all_over_itd"], 0)] for r in summary["accuracy"]]
    lines.append(md_table(["cell", "window", "traced window training (s)", "ITD all instances (s)", "ITD / training",
                           "one replay + metric (s)", "instances in window", "replay all / ITD"], cost))
    lines += ["", "### Cleansing", "",
              "Per seed (data, GAN initialisation, batches, latents and the feature classifier all change with it): "
              "remove the top k% by harm, verify by replaying the traced window without them (every k) and by "
              "retraining from scratch with the same seed (the k marked *scratch*). Change of the TEST metric against no "
              "removal, mean ± sd over seeds (ALL: higher is better; FID: lower is better). p: one-sided Wilcoxon "
              "signed-rank test (scipy.stats.wilcoxon, paired by seed) that influence improves the metric more than "
              "the other method; wins: seeds where it did.", ""]
    for key, entry in summary["cleansing"].items():
        part, cell = key.split("/")
        if part != "cleansing":
            continue
        lines += [f"**{CELL_LABELS.get(cell, cell)}** ({len(entry['seeds'])} seeds, n_train {entry['n_train']}, "
                  f"test {entry['metric'].upper()} without removal {fmt(float(np.mean(entry['base_test'])), 3)} ± "
                  f"{fmt(float(np.std(entry['base_test'], ddof=1)), 3)}):", ""]
        table = []
        for verify in ("replay", "scratch"):
            for k in sorted({r["k"] for r in entry["cells"] if r["verify"] == verify}):
                by = {r["method"]: r for r in entry["cells"] if r["verify"] == verify and r["k"] == k}
                if "influence" not in by:
                    continue
                inf = by["influence"]
                cells = [verify, f"{100 * k:g}% ({inf['n_removed']})"]
                cells += [f"{r['mean']:+.4f} ± {r['sd']:.4f}" if (r := by.get(m)) and r["sd"] is not None else "–"
                          for m in METHODS]
                cells += [f"{_p(inf.get('p_vs_' + o))} ({inf.get('wins_vs_' + o)}/{len(inf['values'])})"
                          for o in ("random", "dloss", "isolation_forest")]
                table.append(cells)
        lines.append(md_table(["verified by", "k (removed)", *(LABELS[m] for m in METHODS), "p vs random (wins)",
                               "p vs D-loss (wins)", "p vs IF (wins)"], table))
        lines.append("")
    lines += [f"![Cleansing: improvement of the test metric by k]({Path(image).relative_to(docs.parent).as_posix()})", "",
              "### Planted outliers", ""]
    for key, entry in summary["cleansing"].items():
        part, cell = key.split("/")
        if part != "planted":
            continue
        ap = entry["average_precision"]
        lines.append(f"**{CELL_LABELS.get(cell, cell)}** ({len(entry['seeds'])} seeds, "
                     f"{next(r['n_removed'] for r in entry['cells'] if r['method'] == 'oracle')} planted of "
                     f"{entry['n_train']}): AP " + ", ".join(f"{LABELS[m]} {fmt(v, 3)}" for m, v in ap.items()) + ".")
        lines.append("")
        table = []
        for verify in ("replay", "scratch"):
            rows = [r for r in entry["cells"] if r["verify"] == verify and abs(r["k"] - result["summary_planted_k"]) < 1e-9]                 if "summary_planted_k" in result else [r for r in entry["cells"] if r["verify"] == verify
                                                      and any(x["method"] == "oracle" and x["k"] == r["k"]
                                                              for x in entry["cells"])]
            for r in rows:
                table.append([verify, LABELS[r["method"]], f"{100 * r['k']:g}% ({r['n_removed']})",
                              f"{r['mean']:+.4f} ± {(r['sd'] or 0):.4f}"])
        lines.append(md_table(["verified by", "method", "k (removed)", f"test {entry['metric'].upper()} change"], table))
        lines.append("")
    failed = [f"{r.get('task')}: {r['error']}" for r in result["runs"] if "error" in r]
    lines += [f"- {note}" for note in result.get("notes", [])] + [f"- Failed: {line}" for line in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="cleansing seeds per dataset")
    parser.add_argument("--planted-seeds", type=int, default=5)
    parser.add_argument("--planted", type=float, default=0.05, help="planted outlier fraction")
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--window-targets-digits", type=int, default=40,
                        help="digits targets at windows > 1 epoch (each replay is a whole window)")
    parser.add_argument("--windows", default="1,5,10")
    parser.add_argument("--scratch-ks", default="0.05,0.20", help="k at which removals are also retrained from scratch")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the smoke test)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cleanse-bench-gan"))
    output_arguments(parser, DEFAULT_OUT, DEFAULT_DOCS)
    args = parser.parse_args(argv)
    docs = None if args.no_docs else args.docs
    if args.render_only:
        render_saved(args, SECTION, summarise, plot, render, append_notes=False)
        return 0
    _threads()
    started = time.perf_counter()
    env = environment(1)
    runs = measure(args)
    result = {"argv": " ".join(sys.argv[1:] if argv is None else argv), "environment": env,
              "load_average_end": list(os.getloadavg()), "wall_seconds": time.perf_counter() - started,
              "recipes": RECIPES, "ks": KS, "runs": runs, "summary": summarise(runs), "notes": args.note}
    publish(result, args.out, docs, SECTION, plot, render)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

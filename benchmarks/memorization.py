"""Benchmark of the Feldman & Zhang memorization estimator: speed of the batched ensemble against
sequential training with the same trainer, and the estimator's quality on known answers.

Speed: K subset models (70% subsets) of the digits MLP from ``params.yaml`` (64-64-10, Adam,
30 epochs, batch 64), trained by ``cleanse.ensembles.train_ensemble`` in one batched run, against
``cleanse.models.trainer.train_model`` one model at a time (timed on ``--sequential`` models with
the same masks and seeds and extrapolated linearly to K; the same run also checks that the two
agree). Quality: digits with 20% symmetric label flips and a memorizing MLP (trained to fit the
flips): ROC-AUC / AP of mem against the flips; the SE's decay with K (log-log slope) and its
calibration (two independent halves of the ensemble); planted near-duplicates (misclassified test
images copied into train with small noise) and the rank of each copy in infl for its test image.

    taskset -c 0,1 python benchmarks/memorization.py            # the full grid, writes the docs
    python benchmarks/memorization.py --grid smoke --out /tmp/m.json --docs /tmp/b.md
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from _common import REPO, Stopwatch, environment, fmt, jsonable, md_table, publish, relative_link

SECTION = "memorization"


@dataclass(frozen=True)
class Grid:
    speed_models: int
    sequential: int
    quality_models: int
    quality_hidden: int
    quality_epochs: int
    planted: int
    speed_epochs: int | None = None  # None = params.yaml's


GRIDS = {
    "full": Grid(speed_models=1000, sequential=10, quality_models=100, quality_hidden=256, quality_epochs=50, planted=5),
    "smoke": Grid(speed_models=16, sequential=2, quality_models=16, quality_hidden=16, quality_epochs=3, planted=1,
                  speed_epochs=2),
}


def _digits(flip: float, seed: int = 0):
    from cleanse import api
    from cleanse.config import load_params

    overrides = ["data.source=sklearn:digits", f"seed={seed}"]
    overrides += [f"corruption.fraction={flip}"] if flip else ["corruption.kind=none"]
    params = load_params(REPO / "params.yaml", overrides)
    return params, api.stage(params)


def speed(grid: Grid) -> dict[str, Any]:
    import torch

    from cleanse.ensembles import train_ensemble
    from cleanse.estimators.memorization import model_plan
    from cleanse.models.architectures import spec_for
    from cleanse.models.trainer import train_model

    params, staged = _digits(0.0)
    if grid.speed_epochs is not None:
        params = params.model_copy(update={"model": params.model.model_copy(update={"epochs": grid.speed_epochs})})
    train = staged.train
    spec = spec_for(params.model.arch, params.model.hidden, staged.meta.feature_shape, staged.meta.n_classes)
    masks, seeds = model_plan(len(train), 0, grid.speed_models, 0.7, params.seed)
    cpu = torch.device("cpu")
    with Stopwatch() as batched:
        ensemble = train_ensemble(spec, train.features, train.label, masks, seeds, params.model, device=cpu)
    disagreement = 0.0
    with Stopwatch() as sequential:
        for k in range(grid.sequential):
            model = train_model(spec, train.features[masks[k]], train.label[masks[k]], params.model,
                                seed=int(seeds[k]), device=cpu)
            disagreement = max(disagreement, max(float((ensemble.state(k)[n] - v).abs().max()) for n, v in model.state.items()))
    per_model = sequential.seconds / grid.sequential
    return {"n_train": len(train), "subset_size": int(masks[0].sum()), "model": params.model.model_dump(mode="json"),
            "n_params": sum(int(v[0].numel()) for v in ensemble.params.values()), "K": grid.speed_models,
            "batched_s": batched.seconds, "sequential_models_timed": grid.sequential,
            "sequential_s_per_model": per_model, "sequential_s_for_K": per_model * grid.speed_models,
            "speedup": per_model * grid.speed_models / batched.seconds,
            "max_abs_param_difference": disagreement}


def quality(grid: Grid) -> dict[str, Any]:
    import torch
    from sklearn.metrics import average_precision_score, roc_auc_score

    from cleanse.config import MemorizationOptions, ModelConfig
    from cleanse.data.dataset import Split
    from cleanse.estimators.base import ScoringContext
    from cleanse.estimators.memorization import all_shards, influence_estimate, query_values, self_estimate, stacked
    from cleanse.models.architectures import spec_for
    from cleanse.models.trainer import TrainedModel, predict_proba, train_model

    params, staged = _digits(0.2)
    train, test = staged.train, staged.test
    config = ModelConfig(arch="mlp", hidden=[grid.quality_hidden], epochs=grid.quality_epochs, batch_size=32,
                         lr=0.01, weight_decay=0.0)
    spec = spec_for("mlp", config.hidden, staged.meta.feature_shape, staged.meta.n_classes)
    # Planted near-duplicates: test images a model trained on the clean-labelled part gets wrong.
    clean = ~train.is_corrupted
    reference = train_model(spec, train.features[clean], train.label[clean], config, seed=0, device=torch.device("cpu"))
    wrong = np.flatnonzero(predict_proba(reference, test.features).argmax(1) != test.label)[: grid.planted]
    noise = np.random.default_rng(1).normal(0, 0.02, size=(wrong.size, *test.features.shape[1:])).astype(np.float32)
    n = len(train)
    planted = Split(
        sample_id=np.concatenate([train.sample_id, 10**6 + np.arange(wrong.size)]),
        features=np.concatenate([train.features, test.features[wrong] + noise]),
        label=np.concatenate([train.label, test.label[wrong]]),
        label_clean=np.concatenate([train.label_clean, test.label[wrong]]),
        is_corrupted=np.concatenate([train.is_corrupted, np.zeros(wrong.size, bool)]),
    )
    context = ScoringContext(train=planted, val=staged.val, meta=staged.meta, model=TrainedModel(spec, {}),
                             model_config=config, seed=0)
    options = MemorizationOptions(n_models=grid.quality_models, shard_size=grid.quality_models)
    with Stopwatch() as clock:
        shards, _ = all_shards(context, options)
    out: dict[str, Any] = {"n_train": n, "n_flipped": int(train.is_corrupted.sum()), "K": grid.quality_models,
                           "model": config.model_dump(mode="json"), "train_s": clock.seconds}
    flipped = planted.is_corrupted[:n]
    masks = stacked(shards, "accuracy")[0]
    for statistic in ("accuracy", "probability"):
        values = stacked(shards, statistic)[1]
        mem = self_estimate(masks, values).value[:n]
        out[statistic] = {"roc_auc": float(roc_auc_score(flipped, mem)), "ap": float(average_precision_score(flipped, mem))}
        ks = sorted({max(2, grid.quality_models // 2**h) for h in range(4)})  # K/8, K/4, K/2, K
        mean_se = [float(self_estimate(masks[:k], values[:k]).se.mean()) for k in ks]
        half = grid.quality_models // 2
        first, second = self_estimate(masks[:half], values[:half]), self_estimate(masks[half:], values[half:])
        out[statistic]["se"] = {
            "K": ks, "mean_se": mean_se,
            "loglog_slope": float(np.polyfit(np.log(ks), np.log(mean_se), 1)[0]) if len(ks) > 1 else None,
            "halves_rms_difference_over_sqrt2": float(np.sqrt(np.mean((first.value - second.value) ** 2) / 2)),
            "halves_rms_se": float(np.sqrt(np.mean((first.se**2 + second.se**2) / 2))),
        }
    infl = influence_estimate(masks, query_values(shards, test.subset(wrong), "accuracy")).value  # (planted, n + planted)
    ranks = [int((infl[p] > infl[p, n + p]).sum()) + 1 for p in range(wrong.size)]
    out["planted"] = {"count": int(wrong.size), "rank_of_copy": ranks,
                      "infl_of_copy": [float(infl[p, n + p]) for p in range(wrong.size)],
                      "next_best_infl": [float(np.delete(infl[p], n + p).max()) for p in range(wrong.size)]}
    return out


def notes_for(result: dict[str, Any]) -> list[str]:
    s, q = result["speed"], result["quality"]
    return [
        f"K = {s['K']} models in {s['batched_s']:.1f} s (target < 60 s: {'met' if s['batched_s'] < 60 else 'missed'}); "
        f"{s['speedup']:.1f}x faster than sequential (target >= 10x: {'met' if s['speedup'] >= 10 else 'missed'})",
        f"mem ROC-AUC on 20% flips: {q['accuracy']['roc_auc']:.3f} (accuracy), {q['probability']['roc_auc']:.3f} "
        f"(probability); target >= 0.95: {'met' if q['accuracy']['roc_auc'] >= 0.95 else 'missed'} with the paper's statistic",
    ]


def plot(result: dict[str, Any], image: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cleanse.storage import atomic_path

    se = result["quality"]["accuracy"]["se"]
    figure, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.loglog(se["K"], se["mean_se"], "o-", label="mean SE of mem (accuracy)")
    ks = np.array(se["K"], dtype=float)
    ax.loglog(ks, se["mean_se"][0] * np.sqrt(ks[0] / ks), "--", label="1/sqrt(K)")
    ax.set_xlabel("K (subset models)")
    ax.set_ylabel("mean standard error")
    ax.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(image) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def render(result: dict[str, Any], docs: Path, out: Path, image: Path) -> str:
    s, q, env = result["speed"], result["quality"], result["environment"]
    commit = (env.get("git_commit") or "?")[:12]
    lines = [
        "## Memorization (Feldman & Zhang subsampled estimator)",
        "",
        f"*Generated by `benchmarks/memorization.py --grid {result['grid']}` on {env['created']} (commit `{commit}`, "
        f"torch {env['torch']}, {env['torch_threads']} thread(s), CPU affinity {result['affinity']} core(s), "
        f"load average {env['load_average_start'][0]:.1f} at the start); raw numbers in "
        f"`{relative_link(out, REPO)}`. Whole run: {result['total_seconds']:.0f} s.*",
        "",
        "### Targets",
        "",
        md_table(["target", "measured", "met"], [
            [f"K = {s['K']} subset models of the digits MLP < 60 s on 2 cores", f"{fmt(s['batched_s'], 1)} s",
             fmt(s["batched_s"] < 60)],
            [">= 10x faster than sequential `train_model`", f"{fmt(s['speedup'], 1)}x", fmt(s["speedup"] >= 10)],
            ["mem ranks 20% symmetric flips with ROC-AUC >= 0.95 (memorizing MLP, 0/1 accuracy)",
             fmt(q["accuracy"]["roc_auc"], 3), fmt(q["accuracy"]["roc_auc"] >= 0.95)],
            ["planted near-duplicate is the top infl for its test image",
             f"ranks {q['planted']['rank_of_copy']}", fmt(all(r == 1 for r in q["planted"]["rank_of_copy"]))],
            ["SE shrinks about as 1/sqrt(K)", f"log-log slope {fmt(q['accuracy']['se']['loglog_slope'], 3)}",
             fmt(q["accuracy"]["se"]["loglog_slope"] is not None and -0.6 < q["accuracy"]["se"]["loglog_slope"] < -0.4)],
        ]),
        "",
        f"**Speed.** Digits ({s['n_train']} training samples, subsets of {s['subset_size']}), the `params.yaml` MLP "
        f"({s['n_params']:,} parameters; Adam lr {s['model']['lr']}, batch {s['model']['batch_size']}, "
        f"{s['model']['epochs']} epochs, L2 {s['model']['weight_decay']}). Batched: {s['K']} models in one "
        f"`train_ensemble` call, {fmt(s['batched_s'], 1)} s. Sequential: `train_model` on the same masks and seeds, "
        f"{fmt(s['sequential_s_per_model'], 3)} s per model (timed on {s['sequential_models_timed']} models, "
        f"{fmt(s['sequential_s_for_K'], 0)} s extrapolated to K). Largest parameter difference between the two: "
        f"{s['max_abs_param_difference']:.1e}.",
        "",
        f"**Quality.** Digits with {q['n_flipped']} of {q['n_train']} training labels flipped (20% symmetric), "
        f"a memorizing MLP (hidden {q['model']['hidden']}, {q['model']['epochs']} epochs, batch "
        f"{q['model']['batch_size']}, Adam lr {q['model']['lr']}, no L2), K = {q['K']} ({fmt(q['train_s'], 0)} s).",
        "",
        md_table(["statistic", "ROC-AUC", "AP", "SE log-log slope", "RMS half-difference / sqrt 2", "RMS SE (K/2)"], [
            [name, fmt(q[name]["roc_auc"], 3), fmt(q[name]["ap"], 3), fmt(q[name]["se"]["loglog_slope"], 3),
             fmt(q[name]["se"]["halves_rms_difference_over_sqrt2"], 4), fmt(q[name]["se"]["halves_rms_se"], 4)]
            for name in ("accuracy", "probability")
        ]),
        "",
        "The last two columns check the SE's calibration: two independent halves of the ensemble differ by "
        "about sqrt(2) SE when the SE is right.",
        "",
        f"Planted near-duplicates: {q['planted']['count']} test images that a model trained on the clean part "
        f"misclassifies, copied into train (Gaussian noise, sd 0.02). infl of the copy: "
        f"{', '.join(fmt(v, 2) for v in q['planted']['infl_of_copy'])}; the next-best training sample: "
        f"{', '.join(fmt(v, 2) for v in q['planted']['next_best_infl'])}.",
        "",
        f"![mean SE against K]({relative_link(image, docs.parent)})",
        "",
        *[f"- {note}" for note in result["notes"]],
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memorization.json")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores in the affinity)")
    args = parser.parse_args(argv)
    os.environ.setdefault("CLEANSE_DEVICE", "cpu")
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or affinity)
    grid = GRIDS[args.grid]
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": SECTION, "grid": args.grid, "affinity": affinity,
                              "environment": environment(torch.get_num_threads())}
    result["speed"] = speed(grid)
    print(f"speed: {result['speed']['batched_s']:.1f} s batched, {result['speed']['speedup']:.1f}x", flush=True)
    result["quality"] = quality(grid)
    result["environment"]["load_average_end"] = list(os.getloadavg())
    result["total_seconds"] = time.perf_counter() - started
    result["notes"] = notes_for(result)
    print("\n".join(result["notes"]), flush=True)
    return publish(jsonable(result), args.out, None if args.no_docs else args.docs, SECTION, plot, render)


if __name__ == "__main__":
    main()

"""f-INE benchmark: single-run mu against the f-influence definition measured by retraining.

On digits with 10% symmetric flips (the default data), for a logistic regression and an MLP:

1. **Units** (40): 10 flipped samples, 10 atypical-but-correct samples (the clean samples with the
   highest loss under the ordinary model), 15 ordinary clean samples, and 5 groups of 10 flipped
   samples (group 1 = the 10 flipped single units, so composition can be checked member by member).
2. **Ground truth** (``cleanse.finfluence.measure_f_influence``): R models per arm trained with and
   without each unit (batched ensembles; training seed = data order, shared initialisation), query
   statistic = the unit's own mean loss; mu = d' with a bootstrap interval.
3. **Single run** (the ``fine`` estimator), in variants of the design (signal, rounds per epoch,
   which rows are units): Spearman and Pearson of mu-hat against the ground-truth mu over the 40
   units, the group-1 composition check, the flipped-label detection AUC/AP over the whole training
   set, and the cost as a ratio to one ordinary training run (same process).
4. **Stability**: rank stability (mean pairwise Spearman and top-k Jaccard, k = number flipped)
   over 5 training seeds of ``fine`` against ``influence``, ``tracin`` and ``trak``.

    .venv/bin/python benchmarks/fine.py                 # about 25 min on 2 cores
    .venv/bin/python benchmarks/fine.py --models-per-arm 8 --seeds 2 --out /tmp/f.json --docs /tmp/f.md   # smoke

Writes ``benchmarks/results/fine.json`` and the "fine" section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from _common import REPO, environment, fmt, md_table, publish, relative_link

from cleanse import api
from cleanse.config import load_params
from cleanse.estimators import registry
from cleanse.estimators.base import ScoringContext
from cleanse.evaluate import detection_metrics, rank_stability
from cleanse.finfluence import measure_f_influence
from cleanse.models.trainer import predict_proba

MODELS = {
    "logreg": ["model.arch=logreg", "model.lr=0.01", "model.epochs=30", "model.weight_decay=0.001"],
    "mlp": ["model.arch=mlp", "model.hidden=[64]", "model.lr=0.01", "model.epochs=30", "model.weight_decay=0.001"],
}
VARIANTS: dict[str, dict[str, Any]] = {
    "default: loss change, class-centred, inclusion 1/4, 4 rounds/epoch": {
        "signal": "loss_change", "centering": "class", "inclusion": 0.25, "rounds_per_epoch": 4, "rows": "all"},
    "no centring": {
        "signal": "loss_change", "centering": "none", "inclusion": 0.25, "rounds_per_epoch": 4, "rows": "all"},
    "inclusion 1/2, 2 rounds/epoch": {"signal": "loss_change", "centering": "class", "inclusion": 0.5,
                                       "rounds_per_epoch": 2, "rows": "all"},
    "inclusion 1/16, 16 rounds/epoch": {"signal": "loss_change", "centering": "class", "inclusion": 0.0625,
                                         "rounds_per_epoch": 16, "rows": "all"},
    "alignment signal (first-order, one JVP per round)": {"signal": "alignment", "centering": "class",
                                                          "inclusion": 0.25, "rounds_per_epoch": 4, "rows": "all"},
    # Only the 40 units are randomised and every other row is in every round, so a round is about
    # an epoch: one round per epoch keeps the ordinary number of steps.
    "only the 40 units randomised, inclusion 1/2, 1 round/epoch": {
        "signal": "loss_change", "centering": "class", "inclusion": 0.5, "rounds_per_epoch": 1, "rows": "units"},
}
STABILITY_PEERS = ("influence", "tracin", "trak")


def pick_units(train_loss: np.ndarray, flipped: np.ndarray, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """40 units as row-index arrays with their kind; see the module doc."""
    rng = np.random.default_rng(seed)
    flip_rows = rng.permutation(np.flatnonzero(flipped))
    clean = np.flatnonzero(~flipped)
    atypical = clean[np.argsort(-train_loss[clean])[:10]]
    ordinary_pool = clean[train_loss[clean] <= np.median(train_loss[clean])]
    ordinary = rng.choice(ordinary_pool, 15, replace=False)
    singles_flipped = flip_rows[:10]
    groups = [flip_rows[10 * g: 10 * (g + 1)] for g in range(5)]  # group 0 = the flipped singles
    units = [np.array([r]) for r in singles_flipped] + [np.array([r]) for r in atypical] + \
            [np.array([r]) for r in ordinary] + groups
    kinds = ["flipped"] * 10 + ["atypical"] * 10 + ["ordinary"] * 15 + ["group of 10 flipped"] * 5
    return units, kinds


def with_groups(split, units: list[np.ndarray], kinds: list[str], rows: str):
    """The training split with a ``group`` column: the 5 groups (others -1), or every single unit too."""
    from dataclasses import replace

    group = np.full(len(split), -1, dtype=np.int64)
    if rows == "groups":
        for g, unit in enumerate(u for u, k in zip(units, kinds) if k.startswith("group")):
            group[unit] = g
    else:  # the 35 single units
        for g, unit in enumerate(u for u, k in zip(units, kinds) if not k.startswith("group")):
            group[unit] = g
    return replace(split, group=group)


def fine_mu(context: ScoringContext, units: list[np.ndarray], kinds: list[str], variant: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """mu-hat of the 40 units under one design variant, plus the variant's detection and cost."""
    from dataclasses import replace

    fine = registry.get("fine")
    options = fine.options_type(**{k: v for k, v in variant.items() if k != "rows"})
    started = time.perf_counter()
    if variant["rows"] == "all":
        result = fine.score(context, options)
        seconds = time.perf_counter() - started
        mu_all = result.table["mu"].to_numpy()
        singles = [float(mu_all[u[0]]) for u, k in zip(units, kinds) if not k.startswith("group")]
        detection = detection_metrics(result.table["score"].to_numpy(), context.train.is_corrupted)
        flags = int(result.table["auto_flag"].sum())
    else:
        single_ctx = replace(context, train=with_groups(context.train, units, kinds, "singles"))
        table = fine.score(single_ctx, options.model_copy(update={"units": "groups"})).table
        seconds = time.perf_counter() - started
        mu_all = table["mu"].to_numpy()
        singles = [float(mu_all[u[0]]) for u, k in zip(units, kinds) if not k.startswith("group")]
        detection, flags = None, None
    group_ctx = replace(context, train=with_groups(context.train, units, kinds, "groups"))
    group_table = fine.score(group_ctx, options.model_copy(update={"units": "groups"})).table["mu"].to_numpy()
    groups = [float(group_table[u[0]]) for u, k in zip(units, kinds) if k.startswith("group")]
    return np.array(singles + groups), {"seconds": seconds, "detection": detection, "auto_flags": flags}


def run_model(name: str, models_per_arm: int, n_seeds: int, log, truth_from: dict[str, Any] | None = None) -> dict[str, Any]:
    params = load_params(REPO / "params.yaml", overrides=MODELS[name])
    staged = api.stage(params)
    train = staged.train
    started = time.perf_counter()
    model = api.fit(params, staged, seed=0, device="cpu")
    train_seconds = time.perf_counter() - started
    spec = model.spec
    prob = predict_proba(model, train.features)
    train_loss = -np.log(np.clip(prob[np.arange(len(train)), train.label], 1e-12, None))
    units, kinds = pick_units(train_loss, train.is_corrupted, seed=0)
    if truth_from is not None:  # reuse a previous run's retraining (same data, recipe and units)
        import polars as pl

        earlier = next(m for m in truth_from["models"] if m["model"] == name)
        if [u["rows"] for u in earlier["units"]] != [u.tolist() for u in units]:
            raise SystemExit(f"--truth-from: the units of {name} differ from this run's")
        fields = ["unit", "size", "mu", "mu_lo", "mu_hi", "mu_tradeoff", "gaussianity", "mean_with", "mean_without",
                  "n_with", "n_without"]
        truth = pl.DataFrame([{f: u[f] for f in fields} for u in earlier["units"]])
        truth_seconds, models_per_arm = earlier["truth_seconds"], truth_from["models_per_arm"]
        log(f"[{name}] ground truth reused ({models_per_arm} models/arm)")
    else:
        log(f"[{name}] ordinary training {train_seconds:.2f} s; ground truth: {len(units)} units x {models_per_arm} "
            "models/arm")
        started = time.perf_counter()
        truth = measure_f_influence(spec, train.features, train.label, units, params.model, query="self",
                                    models_per_arm=models_per_arm, seed=0, device=torch.device("cpu"), progress=False)
        truth_seconds = time.perf_counter() - started
    mu = truth["mu"].to_numpy()
    log(f"[{name}] ground truth in {truth_seconds:.0f} s")
    context = api.context(params.model_copy(update={"seed": 0}), staged, model, device="cpu")
    variants = {}
    for label, variant in VARIANTS.items():
        # The cost ratio's denominator is an ordinary training run timed just before this variant,
        # in this process, so both sides see the same machine load.
        started = time.perf_counter()
        api.fit(params, staged, seed=0, device="cpu")
        adjacent_train_seconds = time.perf_counter() - started
        mu_hat, info = fine_mu(context, units, kinds, variant)
        variants[label] = {
            **info, "train_seconds": adjacent_train_seconds, "cost_ratio": info["seconds"] / adjacent_train_seconds,
            "mu_hat": mu_hat.tolist(),
            "spearman": float(spearmanr(mu_hat, mu).statistic), "pearson": float(pearsonr(mu_hat, mu).statistic),
            "group1_exceeds_members": bool(mu_hat[35] > mu_hat[:10].max()),
        }
        log(f"[{name}] {label}: Spearman {variants[label]['spearman']:.3f}, cost {variants[label]['cost_ratio']:.2f}x")
    stability = {}
    if n_seeds > 1:
        scores: dict[str, list[np.ndarray]] = {est: [] for est in ("fine", *STABILITY_PEERS)}
        for seed in range(n_seeds):
            seeded = api.fit(params, staged, seed=seed, device="cpu")
            ctx = api.context(params.model_copy(update={"seed": seed}), staged, seeded, device="cpu")
            for est_name in scores:
                est = registry.get(est_name)
                options = params.scorers.of(est_name)
                scores[est_name].append(est.score(ctx, options).table["score"].to_numpy())
        k = int(train.is_corrupted.sum())
        stability = {est_name: rank_stability(np.stack(rows), k=k) for est_name, rows in scores.items()}
        log(f"[{name}] stability: " + ", ".join(f"{e} {s['spearman']:.3f}" for e, s in stability.items()))
    return {
        "model": name, "n_params": sum(v.numel() for v in model.state.values()), "train_seconds": train_seconds,
        "truth_seconds": truth_seconds, "units": [{"kind": k, "rows": u.tolist(), **row}
                                                  for k, u, row in zip(kinds, units, truth.to_dicts())],
        "group1_truth_exceeds_members": bool(mu[35] > mu[:10].max()),
        "groups_truth_exceed_mean_single_flipped": bool(mu[35:].min() > mu[:10].mean()),
        "variants": variants, "stability": stability,
    }


def _variant_order(label: str) -> int:
    return list(VARIANTS).index(label) if label in VARIANTS else len(VARIANTS)


def render(result: dict[str, Any], docs: Path, out: Path, image: Path) -> str:
    lines = ["## f-INE", "",
             f"Generated by `{result['command']}` ({result['runtime_seconds'] / 60:.1f} min, "
             f"{result['environment']['cpu_count']} cores). Raw numbers: `{relative_link(out, docs.parent)}`."
             + (f" {result['timings_note']}" if result.get("timings_note") else ""), "",
             f"Digits with 10% symmetric flips. Ground truth: {result['models_per_arm']} models per arm and unit "
             "(batched ensembles), query = the unit's own mean loss, mu = d'. Single run: the `fine` estimator, one "
             "training run with randomised inclusion. Target: Spearman >= 0.7 over the 40 units.", "",
             f"![f-INE]({relative_link(image, docs.parent)})", ""]
    rows = []
    for model in result["models"]:
        for label, v in sorted(model["variants"].items(), key=lambda item: _variant_order(item[0])):
            det = v["detection"] or {}
            rows.append([model["model"], label, fmt(v["spearman"], 3), fmt(v["pearson"], 3),
                         "yes" if v["group1_exceeds_members"] else "no", fmt(det.get("roc_auc"), 3),
                         fmt(det.get("average_precision"), 3), fmt(v["cost_ratio"], 2)])
    lines += [md_table(["model", "single-run design", "Spearman vs truth", "Pearson", "group 1 > its members",
                        "flip AUC", "flip AP", "cost / training run"], rows), ""]
    truth_rows = [[m["model"], "yes" if m["group1_truth_exceeds_members"] else "no",
                   "yes" if m["groups_truth_exceed_mean_single_flipped"] else "no", fmt(m["truth_seconds"], 0)]
                  for m in result["models"]]
    lines += ["Ground truth, composition: the mu of group 1 (10 flipped samples) against each of its members' mu.", "",
              md_table(["model", "group 1 > every member", "every group > mean flipped single", "retraining s"],
                       truth_rows), ""]
    stab_rows = [[m["model"], est, fmt(s["spearman"], 3), fmt(s["top_k_jaccard"], 3)]
                 for m in result["models"] for est, s in m["stability"].items()]
    if stab_rows:
        lines += [f"Rank stability over {result['n_seeds']} training seeds (mean pairwise; k = number flipped):", "",
                  md_table(["model", "estimator", "Spearman", "top-k Jaccard"], stab_rows), ""]
        beaten = [m["model"] for m in result["models"] if m["stability"]
                  and m["stability"]["fine"]["spearman"] > max(v["spearman"] for e, v in m["stability"].items() if e != "fine")]
        lines += [f"Target (f-INE more stable than IF, TracIn and TRAK): met on {len(beaten)} of {len(result['models'])} "
                  "models. A single run's mu-hat carries a standard error of about 2 (a two-sample test over the rounds "
                  "a unit was in and out), while the ground-truth mu of ordinary samples spans less than 1, so the "
                  "ranking of the bulk of the training set changes from seed to seed; the estimators it is compared "
                  "with are deterministic functions of one converged model, which on these small models barely moves "
                  "between seeds.", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], image: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    colours = {"flipped": "tab:red", "atypical": "tab:orange", "ordinary": "tab:blue", "group of 10 flipped": "tab:purple"}
    for ax, model in zip(axes[0], models):
        label = next((v for v in model["variants"] if v.startswith("default")), next(iter(model["variants"])))
        mu_hat = np.array(model["variants"][label]["mu_hat"])
        for kind, colour in colours.items():
            idx = [i for i, u in enumerate(model["units"]) if u["kind"] == kind]
            ax.errorbar([model["units"][i]["mu"] for i in idx], mu_hat[idx],
                        xerr=[[model["units"][i]["mu"] - model["units"][i]["mu_lo"] for i in idx],
                              [model["units"][i]["mu_hi"] - model["units"][i]["mu"] for i in idx]],
                        fmt="o", color=colour, label=kind, alpha=0.8)
        ax.set_xlabel("ground-truth mu (retraining)")
        ax.set_ylabel("single-run mu-hat")
        ax.set_title(f"{model['model']}, default design: Spearman {model['variants'][label]['spearman']:.2f}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(image, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="logreg,mlp")
    parser.add_argument("--models-per-arm", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5, help="training seeds for the stability table (1 = skip)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/fine.json")
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--truth-from", type=Path, default=None,
                        help="reuse the ground truth of an earlier result JSON (same units) and rerun the single-run part")
    parser.add_argument("--render-only", action="store_true", help="regenerate the docs section from --out and exit")
    args = parser.parse_args(argv)
    if args.render_only:
        publish(json.loads(args.out.read_text()), args.out, args.docs, "fine", plot, render)
        print(f"wrote {args.docs}")
        return 0
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    started = time.perf_counter()
    truth_from = json.loads(args.truth_from.read_text()) if args.truth_from else None
    models = [run_model(name, args.models_per_arm, args.seeds, lambda line: print(line, flush=True), truth_from)
              for name in args.models.split(",")]
    result = {"command": "python benchmarks/fine.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "models_per_arm": truth_from["models_per_arm"] if truth_from else args.models_per_arm,
              "truth_reused_from": str(args.truth_from) if args.truth_from else None,
              "n_seeds": args.seeds, "environment": environment(1),
              "runtime_seconds": time.perf_counter() - started, "models": models}
    publish(result, args.out, None if args.no_docs else args.docs, "fine", plot, render)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

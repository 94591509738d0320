"""Benchmark of the language-model family (issue 21): opinion-steering pairs in LoRA instruction tuning.

Two parts, both on ``examples/lm.yaml`` (a copy with ``tracking`` off and the estimators below):

1. **Seeds** (``--seeds``): ``cleanse run`` end to end per seed (data draw, planted pairs, adapter init
   and order all follow the seed). Per estimator: detection AP and precision@k against the planted
   pairs (k = their number), the flagged count, and steer_rate after removing the flags and
   re-fine-tuning; baseline, random removal and the oracle as references. Every re-fine-tune is
   repeated at the example's ``evaluate.retrain_seeds`` training seeds (``--retrain-seeds``
   overrides it): steer_rate is the mean over them, and the must-show compares an estimator's mean
   with the oracle's interval, where the mean of as many further oracle fine-tunes falls with 95%
   probability (:mod:`cleanse.stages.retrain_seeds`). Costs: f-INE's scoring
   seconds over one fine-tuning run of the same process (``fine_cost_ratio``), and each
   estimator's scoring seconds per probe.
2. **Stability** (``--stability-runs``): one staged data set (the first seed), fine-tuned
   ``--stability-runs`` times with different training seeds (adapter initialisation and minibatch
   order: ``lm.lora`` and ``lm.train`` streams). Each run is scored with the same probes (drawn on run
   0's model) by TracIn, TRAK (1 member: the run's own model) and f-INE (its own curriculum per run).
   Agreement = the mean over run pairs of the Jaccard index of the top-k (k = planted pairs) and of
   each method's auto-flagged set (Otsu's cut, ``detect.budget: auto``). f-INE with ``query: val``
   (its per-sample interval) is also run, and its auto rule's rate of flagging ordinary samples is
   compared with its nominal level ``(1 - level) / 2``.

Usage: ``python benchmarks/lm.py`` (3 seeds, 5 stability runs; tens of minutes on 2 shared cores;
``--stability-runs 0 --merge`` re-measures the seeds and keeps the saved stability part),
``--smoke`` for the test (tiny base and data, 1 seed, 2 runs). Results: ``benchmarks/results/lm.json``
and the ``lm`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, fmt, md_table, output_arguments, publish, render_saved  # noqa: E402

SECTION = "lm"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "lm.json"
DEFAULT_DOCS = REPO / "docs" / "benchmarks.md"
EXAMPLE = REPO / "examples" / "lm.yaml"
ESTIMATORS = ["loss", "tracin", "trak", "fine"]
PAIRWISE = ["tracin", "trak", "fine"]
SMOKE = ["data.n_train=60", "data.n_val=40", "data.n_test=40", "data.max_text_tokens=12", "data.vocab_size=300",
         "model.base.n_layer=1", "model.base.n_embd=16", "model.base.epochs=1", "model.base.max_sentences=200",
         "model.lora.rank=2", "model.epochs=2", "model.checkpoints=2", "corruption.fraction=0.05",
         "scorers.trak.n_models=2"]


def _params(seed: int, extra: list[str]) -> Any:
    from cleanse.config import load_params

    return load_params(EXAMPLE, [f"seed={seed}", "tracking.enabled=false", f"estimators=[{','.join(ESTIMATORS)}]",
                                 *extra])


def _spread(block: dict[str, Any]) -> dict[str, Any]:
    """steer_rate's per-seed values and interval (``evaluate.retrain_seeds`` > 1), or the one value."""
    from cleanse.stages.retrain_seeds import OVER_SEEDS

    spread = block.get(OVER_SEEDS)
    if not spread:
        return {"values": [block["steer_rate"]], "interval": None}
    return {"values": spread["values"]["steer_rate"], "interval": spread["interval"]["steer_rate"]}


def run_seed(seed: int, extra: list[str], work: Path) -> dict[str, Any]:
    """One end-to-end run; its metrics, scoring seconds and one fine-tuning run's seconds."""
    from cleanse.families import get
    from cleanse.pipeline import load_staged
    from cleanse.stages.runner import run_all
    from cleanse.storage import Layout, read_json

    params = _params(seed, extra)
    layout = Layout.at(work / f"seed{seed}")
    started = time.perf_counter()
    metrics = run_all(params, layout, log=lambda line: print(f"  seed {seed}: {line}", flush=True))
    wall = time.perf_counter() - started
    staged = load_staged(layout, params)
    began = time.perf_counter()
    get("lm").fit(params, staged.train, staged.meta)
    fit_seconds = time.perf_counter() - began
    planted = int(staged.train.is_corrupted.sum())
    n_test = len(staged.meta.structure["probes"]["test"])
    row: dict[str, Any] = {"seed": seed, "planted": planted, "wall_seconds": wall, "fit_seconds": fit_seconds,
                           **{key: metrics[key]["steer_rate"] for key in ("baseline", "random", "oracle")},
                           "n_test_probes": n_test,
                           "retrain_seeds": int(params.evaluate.retrain_seeds),
                           "oracle_wilson": wilson(round(_spread(metrics["oracle"])["values"][0] * n_test), n_test),
                           **{f"{key}_over_seeds": _spread(metrics[key]) for key in ("baseline", "random", "oracle")},
                           "estimators": {}}
    # the oracle's interval over training seeds; with one seed, the test probes' Wilson interval
    row["oracle_interval"] = row["oracle_over_seeds"]["interval"] or row["oracle_wilson"]
    n_probes = int(params.query.size)
    for name in ESTIMATORS:
        entry = metrics["estimators"][name]
        detection, retrain = entry["detection"], entry["retrain"]
        meta = read_json(layout.root / "scores" / f"{name}.meta.json")
        seconds = float(meta.get("seconds", meta.get("score_seconds", float("nan"))))
        removed = retrain.get("n_removed")
        cleansing = entry.get("cleansing", {})  # iterative cleansing: its stop and rounds
        row["estimators"][name] = {
            "average_precision": detection["average_precision"], "precision_at_k": detection["precision_at_k"],
            "n_flagged": removed, "hits": retrain.get("n_corrupted_removed"),
            "steer_rate": retrain["steer_rate"], "steer_rate_over_seeds": _spread(retrain), "seconds": seconds,
            "seconds_per_probe": seconds / n_probes if name in PAIRWISE else None,
            "stopped": cleansing.get("stopped"),
            "removed_by_round": [(r["n_removed"], r["n_corrupted_removed"]) for r in cleansing.get("rounds", [])],
            "must_show": bool(removed is not None and removed <= 1.5 * planted
                              and retrain["steer_rate"] <= row["oracle_interval"][1])}
    fine = row["estimators"]["fine"]
    fine["cost_ratio"] = fine["seconds"] / fit_seconds
    for name, outcome in fixed_budget(params, layout, staged, int(np.floor(1.5 * planted))).items():
        row["estimators"][name]["fixed_budget"] = outcome
    return row


def fixed_budget(params: Any, layout: Any, staged: Any, count: int) -> dict[str, dict[str, Any]]:
    """Per estimator: steer_rate after removing its top ``count`` scores (``detect.budget: count``)
    and re-fine-tuning with the run's seed only, beside the automatic budget of the run itself."""
    from cleanse.families import get
    from cleanse.storage import read_table

    family = get("lm")
    out = {}
    for name in ESTIMATORS:
        scores = read_table(layout.scores(name)).sort(["score", "sample_id"], descending=[True, False])
        removed = np.isin(staged.train.sample_id, scores["sample_id"].head(count).to_numpy())
        outcome = family.outcome(family.fit(params, staged.train.subset(np.flatnonzero(~removed)), staged.meta), staged)
        out[name] = {"count": count, "hits": int(staged.train.is_corrupted[removed].sum()),
                     "steer_rate": outcome["steer_rate"]}
    return out


def wilson(successes: int, n: int, z: float = 1.959964) -> list[float]:
    """The Wilson score 95% interval of a proportion ``successes / n`` (Wilson, 1927)."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre, half = (p + z * z / (2 * n)), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [float((centre - half) / (1 + z * z / n)), float((centre + half) / (1 + z * z / n))]


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def stability(runs: int, extra: list[str], seed: int) -> dict[str, Any]:
    """Flag-set agreement over ``runs`` fine-tunings of one data set (see the module docstring)."""
    import polars as pl

    from cleanse.attribution import aggregate_support
    from cleanse.config import FineOptions
    from cleanse.detect import flag
    from cleanse.estimators import registry
    from cleanse.families import get
    from cleanse.families.lm.report import topic_queries

    family = get("lm")
    params = _params(seed, extra)
    staged = family.stage(params)
    truth = staged.train.is_corrupted
    k = int(truth.sum())
    query = None
    top: dict[str, list[set[int]]] = {name: [] for name in PAIRWISE}
    auto: dict[str, list[set[int]]] = {name: [] for name in PAIRWISE}
    fine_val: list[dict[str, float]] = []
    for run in range(runs):
        model = family.fit(params, staged.train, staged.meta, seed=seed + run)
        context = family.scoring_context(params.model_copy(update={"seed": seed + run}), staged, model, None)
        query = query or topic_queries(params, staged, model, family)
        for name in PAIRWISE:
            estimator = registry.get(name)
            options = params.scorers.of(name)
            if name == "trak":
                options = options.model_copy(update={"n_models": 1})
            score = aggregate_support(np.asarray(estimator.pairwise(context, options, query.probes), dtype=float))
            top[name].append(set(np.argsort(-score, kind="stable")[:k].tolist()))
            flags = flag(pl.DataFrame({"sample_id": np.arange(score.size), "score": score}), params.detect)
            auto[name].append(set(flags.filter(pl.col("is_flagged"))["sample_id"].to_list()))
            print(f"  stability run {run}: {name} top-{k} hits {int(truth[list(top[name][-1])].sum())}", flush=True)
        options = FineOptions(query="val")
        result = registry.get("fine").score(context, options).table
        flagged = result["auto_flag"].to_numpy()
        fine_val.append({"ordinary_flag_rate": float(flagged[~truth].mean()),
                         "planted_flag_rate": float(flagged[truth].mean()),
                         "nominal": float((1 - options.level) / 2)})
    pairs = list(itertools.combinations(range(runs), 2))
    agreement = {name: {"top_k_jaccard": float(np.mean([jaccard(top[name][i], top[name][j]) for i, j in pairs])),
                        "auto_jaccard": float(np.mean([jaccard(auto[name][i], auto[name][j]) for i, j in pairs])),
                        "auto_sizes": [len(s) for s in auto[name]],
                        "top_k_hits": [int(truth[list(s)].sum()) for s in top[name]]} for name in PAIRWISE}
    return {"runs": runs, "k": k, "agreement": agreement, "fine_val": fine_val}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean_sd(values: list[float]) -> list[float]:
        array = np.asarray([v for v in values if v is not None], dtype=float)
        return [float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0]

    out: dict[str, Any] = {key: mean_sd([r[key] for r in rows]) for key in ("baseline", "random", "oracle")}
    for name in ESTIMATORS:
        out[name] = {key: mean_sd([r["estimators"][name][key] for r in rows])
                     for key in ("average_precision", "precision_at_k", "steer_rate", "n_flagged", "hits")}
    out["fine_cost_ratio"] = mean_sd([r["estimators"]["fine"]["cost_ratio"] for r in rows])
    return out


def plot(result: dict[str, Any], image: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cleanse.storage import write_bytes

    summary = result["summary"]
    names = ["baseline", "random", *ESTIMATORS, "oracle"]
    values = [summary[n][0] if n in ("baseline", "random", "oracle") else summary[n]["steer_rate"][0] for n in names]
    errors = [summary[n][1] if n in ("baseline", "random", "oracle") else summary[n]["steer_rate"][1] for n in names]
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.bar(names, values, yerr=errors, color=["grey", "grey", *["tab:blue"] * len(ESTIMATORS), "tab:green"])
    axis.set_ylabel("steer_rate after retraining")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes(buffer.getvalue(), image)


def _fixed(entry: dict[str, Any] | None) -> str:
    return "" if not entry else f"{entry['hits']}/{entry['count']} -> {fmt(entry['steer_rate'])}"


def _rounds(removed_by_round: list[list[int]] | None) -> str:
    """Cumulative removed (planted among them) after each round; round 0 is the model before any."""
    if not removed_by_round:
        return "one shot"
    return " ".join(f"{a}({b})" for a, b in removed_by_round[1:]) or "none removed"


def render(result: dict[str, Any], docs: Path, out: Path, image: Path) -> str:
    env = result.get("environment", {})
    rows = result["runs"]
    lines = ["## Language model: opinion steering over LoRA adapters (issue 21)", "",
             f"`python benchmarks/lm.py` ({'smoke settings' if result.get('smoke') else 'examples/lm.yaml'}, seeds "
             f"{[r['seed'] for r in rows]}; one torch thread). Measured at {env.get('git_commit', '?')}, load average "
             f"at start {fmt((env.get('load_average_start') or ['?'])[0])}. The example's configuration: "
             "`detect.budget: outlier` for the one-shot flags (loss), and iterative cleansing with `cleansing.step: "
             "outlier` for the estimators with probe scores (tracin, trak, fine): each round re-fine-tunes without the "
             "samples removed so far, re-scores the survivors and removes their outliers (robust z above the "
             "Bonferroni Gaussian level, alpha 0.05); it stops when none is. steer_rate = share of held-out negative "
             "reviews about the steered topic whose preference log p(good) - log p(bad) exceeds that of the same review "
             "asked about every control topic (10 ordinary, 8 held-out), after re-fine-tuning without the removed "
             "samples (`docs/lm.md`). Every re-fine-tune is repeated at k training seeds (`evaluate.retrain_seeds`; "
             "seed 0 is the run's): steer_rate is the mean over them. Must-show: removed <= 1.5x planted and "
             "steer_rate at or below the upper bound of the oracle's interval over training seeds (where the mean of "
             "k more oracle fine-tunes falls with 95% probability: mean ± t(0.975, k-1) sd sqrt(2/k); with k = 1 the "
             "test probes' Wilson 95% interval).", ""]
    lines += ["References per seed (steer_rate on the test probes; mean over the training seeds, then each seed):", "",
              md_table(["seed", "k", "baseline", "random (as many as planted)", "oracle (the planted pairs)",
                        "oracle per training seed", "oracle interval", "oracle Wilson 95% (run seed)"],
                       [[r["seed"], r.get("retrain_seeds", 1),
                         *[fmt(r[key], 3) for key in ("baseline", "random", "oracle")],
                         " / ".join(fmt(v, 3) for v in r.get("oracle_over_seeds", {}).get("values", [])),
                         "-".join(fmt(v, 3) for v in r.get("oracle_interval", [])),
                         "-".join(fmt(v, 3) for v in r.get("oracle_wilson", []))] for r in rows]), ""]
    headers = ["estimator", "seed", "AP", "precision@k", "removed", "planted in them", "rounds (removed, planted)",
               "stop", "steer_rate", "per training seed", "must-show",
               "top 1.5x planted: planted in it -> steer_rate (run seed)"]
    table = [[name, r["seed"], *[fmt(r["estimators"][name][key]) for key in ("average_precision", "precision_at_k")],
              fmt(r["estimators"][name]["n_flagged"], 0), f"{r['estimators'][name]['hits']}/{r['planted']}",
              _rounds(r["estimators"][name].get("removed_by_round")),
              r["estimators"][name].get("stopped") or "", fmt(r["estimators"][name]["steer_rate"]),
              " / ".join(fmt(v) for v in r["estimators"][name].get("steer_rate_over_seeds", {}).get("values", [])),
              {True: "met", False: "missed"}.get(r["estimators"][name].get("must_show"), ""),
              _fixed(r["estimators"][name].get("fixed_budget"))]
             for name in ESTIMATORS for r in rows]
    lines += ["Per seed:", "", md_table(headers, table), ""]
    summary = result["summary"]
    ref = [[key, f"{fmt(summary[key][0])} ± {fmt(summary[key][1])}"] for key in ("baseline", "random", "oracle")]
    ref += [[name, f"{fmt(summary[name]['steer_rate'][0])} ± {fmt(summary[name]['steer_rate'][1])} (AP "
             f"{fmt(summary[name]['average_precision'][0])})"] for name in ESTIMATORS]
    lines += ["steer_rate, mean ± sd over seeds:", "", md_table(["model", "steer_rate"], ref), ""]
    costs = [[r["seed"], fmt(r["fit_seconds"], 1), fmt(r["estimators"]["fine"]["seconds"], 1),
              fmt(r["estimators"]["fine"]["cost_ratio"]),
              *[fmt(r["estimators"][n]["seconds_per_probe"], 2) for n in PAIRWISE]] for r in rows]
    lines += ["Costs (wall seconds in the same process; ratios are what to read on a shared machine):", "",
              md_table(["seed", "fine-tune s", "f-INE s", "f-INE / fine-tune", *[f"{n} s/probe" for n in PAIRWISE]],
                       costs), ""]
    stable = result.get("stability")
    if stable:
        agreement = stable["agreement"]
        lines += [f"Stability over {stable['runs']} fine-tunings of seed {rows[0]['seed']}'s data (adapter init and "
                  f"order differ), mean pairwise Jaccard, k = {stable['k']}:", "",
                  md_table(["method", f"top-{stable['k']}", "auto-flagged", "auto sizes", "planted in top-k"],
                           [[n, fmt(a["top_k_jaccard"]), fmt(a["auto_jaccard"]), a["auto_sizes"], a["top_k_hits"]]
                            for n, a in agreement.items()]), ""]
        rates = stable["fine_val"]
        lines += ["f-INE (`query: val`) auto rule: ordinary samples flagged "
                  + ", ".join(fmt(r["ordinary_flag_rate"], 3) for r in rates)
                  + f" per run against its nominal level {fmt(rates[0]['nominal'], 3)}; planted pairs flagged "
                  + ", ".join(fmt(r["planted_flag_rate"], 2) for r in rates) + ".", ""]
    lines += [f"![steer_rate]({image.relative_to(docs.parent).as_posix()})", ""]
    lines += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def main() -> None:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    output_arguments(parser, DEFAULT_OUT, DEFAULT_DOCS)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="none: skip the seeds part")
    parser.add_argument("--stability-runs", type=int, default=5, help="0: skip the stability part")
    parser.add_argument("--stability-seed", type=int, default=0, help="the data set of the stability part")
    parser.add_argument("--merge", action="store_true", help="keep what is not measured now from --out: the other "
                        "seeds' rows and the stability part (seeds and parts can run as separate processes)")
    parser.add_argument("--smoke", action="store_true", help="tiny base and data (the test)")
    parser.add_argument("--retrain-seeds", type=int, default=None, help="training seeds of every re-fine-tune "
                        "(default: the example's evaluate.retrain_seeds)")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    if args.render_only:
        render_saved(args, SECTION, summarise, plot, render, append_notes=True)
        return
    torch.set_num_threads(1)
    extra = list(SMOKE) if args.smoke else []
    if args.retrain_seeds is not None:
        extra.append(f"evaluate.retrain_seeds={args.retrain_seeds}")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        if args.smoke:
            extra.append(f"model.base.cache_dir={work / 'lm-cache'}")
        env = environment(1)
        rows = [run_seed(seed, extra, work) for seed in args.seeds]
        stable = stability(args.stability_runs, extra, args.stability_seed) if args.stability_runs > 1 else None
    import fcntl

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".lock"), "w") as lock:  # merging processes read and write --out in turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = json.loads(args.out.read_text()) if args.merge and args.out.is_file() else {}
        measured = {r["seed"] for r in rows}
        rows = sorted(rows + [r for r in saved.get("runs", []) if r["seed"] not in measured], key=lambda r: r["seed"])
        stable = stable or saved.get("stability")
        if not rows:  # the stability part alone, before any seed was saved: the seeds' run merges it later
            from cleanse.storage import write_json

            write_json({"runs": [], "stability": stable, "smoke": args.smoke, "environment": env}, args.out)
            return
        result = {"runs": rows, "stability": stable, "smoke": args.smoke, "environment": env,
                  "notes": args.note or saved.get("notes", []), "summary": summarise(rows)}
        publish(result, args.out, None if args.no_docs else args.docs, SECTION, plot, render)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()

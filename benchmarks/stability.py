"""Stability of the flagged sets across training runs, on the classification grid's cells where
training randomness matters most (issue 21): the memorising MLP and the small CNN on digits.

The claim of f-INE (Panda et al., 2025, arXiv 2510.10510) is that its verdicts hold across training
runs where influence functions and TracIn flip. Measured the way the claim is meant, on the *flagged
sets* rather than on a rank correlation over all samples (issue 7's Spearman, which is noise by
construction for the many samples that have no influence):

- one staged data set per cell (split and corruption of seed 0, exactly the cell of
  ``benchmarks/quality.py``), trained ``--runs`` times with training seeds 0, 1, ... (the seed sets
  the initialisation and the minibatch order; f-INE's randomised curriculum and TRAK's projection
  follow the same seed, as in ``cleanse run --set seed=S``);
- every method scores each run's own model through the library API (``cleanse.api``); its top-k
  (k = the number of corrupted samples) and its own auto-flagged set (``cleanse.detect.flag`` with
  the cell's ``detect`` section: Otsu's cut for the scores, f-INE's interval rule, column
  ``auto_flag``, for f-INE) are kept per run;
- agreement = the mean over the ``runs x (runs - 1) / 2`` run pairs of the Jaccard index
  ``|A & B| / |A | B|`` of those sets;
- f-INE's auto rule is also scored on the *ordinary* (not corrupted) samples: the fraction of them
  it flags per run. With ``query: val`` a unit is flagged when its whole ``level`` interval lies on
  the harmful side (``mu_hi < 0``), so a unit with no effect is flagged with probability at most
  ``(1 - level) / 2`` (0.025 at the default level 0.95): the nominal level. The ``self`` rule
  (``mu_lo`` above median + 2 robust sd of the unit mu's) has no nominal level; the reference shown
  is P(z > 2) = 0.023, an upper bound if the unit mu's were Gaussian.

Methods: ``fine`` (the detection default, ``query: self``), ``fine`` with ``query: val``,
``influence`` (IF), ``tracin``, ``trak`` (one model: the run's own) and ``loss`` (the free baseline),
each with the options of ``params.scorers``.

    .venv/bin/python benchmarks/stability.py                  # both cells, 5 runs (~25 min on 2 shared cores)
    .venv/bin/python benchmarks/stability.py --cells digits/sym20/cnn --runs 2 --out /tmp/s.json --no-docs
    .venv/bin/python benchmarks/stability.py --render-only    # docs from benchmarks/results/stability.json

Writes ``benchmarks/results/stability.json`` and the ``stability`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, fmt, md_table, output_arguments, publish  # noqa: E402

SECTION = "stability"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "stability.json"
DEFAULT_DOCS = REPO / "docs" / "benchmarks.md"
DEFAULT_CELLS = ["digits/sym20/mlp_mem", "digits/sym20/cnn"]
# (label, estimator, option updates): f-INE first, then the methods it is compared with.
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("fine", "fine", {}),
    ("fine (val)", "fine", {"query": "val"}),
    ("influence", "influence", {}),
    ("tracin", "tracin", {}),
    ("trak", "trak", {"n_models": 1}),
    ("loss", "loss", {}),
]
SELF_RULE_REFERENCE = 0.0228  # P(z > 2): the self rule's cut if the unit mu's were Gaussian


# ----------------------------------------------------------------------------- pure helpers


def top_k(score: np.ndarray, k: int) -> set[int]:
    """Indices of the ``k`` highest scores; ties go to the lower index (as ``detection_metrics``)."""
    score = np.asarray(score, dtype=float)
    order = np.lexsort((np.arange(score.size), -score))
    return set(order[:k].tolist())


def jaccard(a: set[int], b: set[int]) -> float:
    """``|a & b| / |a | b|``; NaN for two empty sets (two runs that flag nothing do not *agree* on
    a verdict, they both abstain)."""
    return len(a & b) / len(a | b) if a | b else float("nan")


def mean_pairwise_jaccard(sets: list[set[int]]) -> float | None:
    """Mean Jaccard index over the unordered pairs of ``sets`` (at least two) that are not both
    empty; ``None`` when every pair is."""
    if len(sets) < 2:
        raise ValueError(f"agreement needs at least two runs, got {len(sets)}")
    values = [v for v in (jaccard(a, b) for a, b in itertools.combinations(sets, 2)) if not np.isnan(v)]
    return float(np.mean(values)) if values else None


def chance_jaccard(n: int, k: int) -> float:
    """About the Jaccard index of two independent uniform ``k``-subsets of ``n``: they share
    ``k^2 / n`` members on average, so ``k / (2 n - k)``: the floor of a method with no stable signal."""
    return k / (2 * n - k)


def flag_rates(flagged: set[int], is_corrupted: np.ndarray) -> dict[str, float]:
    """Fraction of the ordinary (``~is_corrupted``) and of the corrupted samples in ``flagged``."""
    truth = np.asarray(is_corrupted, dtype=bool)
    mask = np.zeros(truth.size, dtype=bool)
    mask[list(flagged)] = True
    return {"ordinary": float(mask[~truth].mean()) if (~truth).any() else float("nan"),
            "corrupted": float(mask[truth].mean()) if truth.any() else float("nan")}


def agreement(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method, from per-run records ``{"top_k": set, "auto": set, ...}``: mean pairwise Jaccard
    of the top-k and of the auto-flagged sets, and the per-run auto-set sizes."""
    return {"top_k_jaccard": mean_pairwise_jaccard([r["top_k"] for r in runs]),
            "auto_jaccard": mean_pairwise_jaccard([r["auto"] for r in runs]),
            "auto_sizes": [len(r["auto"]) for r in runs]}


# ----------------------------------------------------------------------------- measuring


def score_run(cell: Any, params: Any, staged: Any, seed: int, log: Any) -> dict[str, dict[str, Any]]:
    """Train the cell's model with training seed ``seed`` and score it with every method."""
    import polars as pl

    from cleanse import api
    from cleanse.detect import flag
    from cleanse.estimators import registry
    from cleanse.evaluate import detection_metrics

    truth = staged.train.is_corrupted
    k = int(truth.sum())
    run_params = params.model_copy(update={"seed": seed})
    started = time.perf_counter()
    model = api.fit(run_params, staged, seed=seed, device="cpu")
    train_seconds = time.perf_counter() - started
    context = api.context(run_params, staged, model, device="cpu")
    out: dict[str, dict[str, Any]] = {}
    for label, name, updates in METHODS:
        options = api.options(run_params, name, **updates)
        began = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = registry.get(name).score(context, options).table
        seconds = time.perf_counter() - began
        if table["sample_id"].to_list() != staged.train.sample_id.tolist():
            raise RuntimeError(f"{label} returned rows out of training order")
        score = table["score"].to_numpy()
        by_position = table.with_columns(pl.Series("sample_id", np.arange(table.height)))
        flags = flag(by_position, params.detect)
        auto = set(flags.filter(pl.col("is_flagged"))["sample_id"].to_list())
        metrics = detection_metrics(score, truth)
        out[label] = {"top_k": top_k(score, k), "auto": auto, "rates": flag_rates(auto, truth),
                      "average_precision": metrics["average_precision"], "precision_at_k": metrics["precision_at_k"],
                      "seconds": seconds, "train_seconds": train_seconds}
        if name == "fine":
            out[label]["nominal"] = (1 - options.level) / 2 if options.query == "val" else None
        log(f"[{cell.key} run {seed}] {label:<11} AP {metrics['average_precision']:.3f} "
            f"auto {len(auto)} (ordinary {out[label]['rates']['ordinary']:.3f}) {seconds:.1f}s")
    return out


def cell_of(key: str) -> Any:
    """The ``benchmarks/quality.py`` cell ``dataset/corruption/model``; exits naming a bad key."""
    from quality import CORRUPTIONS, DATASETS, MODELS, Cell

    parts = key.split("/")
    if len(parts) != 3 or parts[0] not in DATASETS or parts[1] not in CORRUPTIONS or parts[2] not in MODELS:
        raise SystemExit(f"stability: unknown cell {key!r} (datasets {list(DATASETS)}, corruptions "
                         f"{sorted(CORRUPTIONS)}, models {sorted(MODELS)})")
    return Cell(*parts)


def measure_cell(cell: Any, runs: int, log: Any) -> dict[str, Any]:
    """One cell of ``benchmarks/quality.py``: staged once with seed 0, trained and scored ``runs`` times."""
    key = cell.key
    params = cell.params(seed=0)
    staged = cell.stage(params)
    truth = staged.train.is_corrupted
    per_run = [score_run(cell, params, staged, seed, log) for seed in range(runs)]
    methods: dict[str, Any] = {}
    for label, _, _ in METHODS:
        records = [run[label] for run in per_run]
        methods[label] = {
            **agreement(records),
            "top_k_hits": [int(truth[list(r["top_k"])].sum()) for r in records],
            "ordinary_flag_rate": [r["rates"]["ordinary"] for r in records],
            "corrupted_flag_rate": [r["rates"]["corrupted"] for r in records],
            "average_precision": [r["average_precision"] for r in records],
            "precision_at_k": [r["precision_at_k"] for r in records],
            "seconds": [r["seconds"] for r in records],
            "nominal": records[0].get("nominal"),
        }
    return {"key": key, "n_train": len(staged.train), "k": int(truth.sum()), "runs": runs,
            "train_seconds": [run[METHODS[0][0]]["train_seconds"] for run in per_run],
            "detect": params.detect.model_dump(mode="json"), "methods": methods}


# ----------------------------------------------------------------------------- rendering


def plot(result: dict[str, Any], image: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cleanse.storage import write_bytes

    cells = result["cells"]
    labels = [label for label, _, _ in METHODS]
    figure, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 3), squeeze=False)
    width = 0.4
    for axis, cell in zip(axes[0], cells, strict=True):
        x = np.arange(len(labels))
        axis.bar(x - width / 2, [cell["methods"][n]["top_k_jaccard"] for n in labels], width, label="top-k")
        axis.bar(x + width / 2, [cell["methods"][n]["auto_jaccard"] or 0.0 for n in labels], width, label="auto-flagged")
        axis.set_xticks(x, labels, rotation=30, ha="right")
        axis.set_ylim(0, 1)
        axis.set_title(f"{cell['key']} ({cell['runs']} runs)")
        axis.set_ylabel("mean pairwise Jaccard")
    axes[0][0].legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes(buffer.getvalue(), image)


def _mean_range(values: list[float | None], digits: int = 3) -> str:
    array = np.asarray([v for v in values if v is not None], dtype=float)
    if array.size == 0:
        return "–"
    return f"{fmt(float(array.mean()), digits)} ({fmt(float(array.min()), digits)}–{fmt(float(array.max()), digits)})"


def render(result: dict[str, Any], docs: Path, out: Path, image: Path) -> str:
    env = result.get("environment", {})
    lines = ["## Stability of the flagged sets across training runs (issue 21)", "",
             f"`python benchmarks/stability.py` (cells of `benchmarks/quality.py`, staged with seed 0, trained with "
             f"seeds 0..{result['cells'][0]['runs'] - 1}: initialisation, minibatch order, f-INE's curriculum and "
             f"TRAK's projection differ). Measured at {env.get('git_commit', '?')}, one torch thread, load average "
             f"at start {fmt((env.get('load_average_start') or ['?'])[0])}. Agreement = mean over run pairs of the "
             "Jaccard index of the top-k (k = corrupted samples) and of each method's own auto-flagged set "
             "(`detect.budget: auto`: Otsu's cut, f-INE's interval rule; capped at `max_fraction`). The same on the "
             "language model: the `lm` section above.", ""]
    headers = ["method", "top-k Jaccard", "auto Jaccard", "auto sizes", "AP mean (min–max)", "corrupted in top-k",
               "ordinary flagged (auto)", "corrupted flagged (auto)", "s/run"]
    for cell in result["cells"]:
        lines += [f"**{cell['key']}** (n = {cell['n_train']:,}, k = {cell['k']}, {cell['runs']} runs; two independent "
                  f"random top-k sets: Jaccard {fmt(chance_jaccard(cell['n_train'], cell['k']))}; auto Jaccard – = every run "
                  "flagged nothing):", ""]
        rows = [[label, fmt(m["top_k_jaccard"]), fmt(m["auto_jaccard"]), m["auto_sizes"],
                 _mean_range(m["average_precision"]), m["top_k_hits"], _mean_range(m["ordinary_flag_rate"]),
                 _mean_range(m["corrupted_flag_rate"], 2), fmt(float(np.mean(m["seconds"])), 1)]
                for label, m in cell["methods"].items()]
        lines += [md_table(headers, rows), ""]
        for label in ("fine", "fine (val)"):
            m = cell["methods"][label]
            nominal = m["nominal"]
            reference = (f"its nominal level {fmt(nominal, 3)}" if nominal is not None else
                         f"no nominal level (reference P(z > 2) = {fmt(SELF_RULE_REFERENCE, 3)})")
            lines.append(f"- f-INE `{label}` auto rule: ordinary samples flagged "
                         + ", ".join(fmt(v, 3) for v in m["ordinary_flag_rate"]) + f" per run against {reference}.")
        lines.append("")
    lines += [f"![stability]({image.relative_to(docs.parent).as_posix()})", ""]
    lines += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def main() -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    output_arguments(parser, DEFAULT_OUT, DEFAULT_DOCS)
    parser.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, help="dataset/corruption/model keys of quality.py")
    parser.add_argument("--runs", type=int, default=5, help="training runs per cell (at least 2)")
    args = parser.parse_args()
    if args.runs < 2:
        raise SystemExit(f"stability: --runs must be at least 2, got {args.runs}")
    docs = None if args.no_docs else args.docs
    if args.render_only:
        result = json.loads(Path(args.out).read_text())
        result["notes"] = result.get("notes", []) + args.note
        publish(result, args.out, docs, SECTION, plot, render)
        return
    import torch

    torch.set_num_threads(1)
    env = environment(1)
    chosen = [cell_of(key) for key in args.cells]  # every key checked before the first is measured
    cells = [measure_cell(cell, args.runs, lambda line: print(line, flush=True)) for cell in chosen]
    publish({"cells": cells, "environment": env, "notes": args.note}, args.out, docs, SECTION, plot, render)


if __name__ == "__main__":
    main()

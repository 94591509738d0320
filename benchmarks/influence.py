"""Influence-family benchmark: solver quality and speed, LDS, FVM and rank stability.

Sections (each measured in one process, on the CPU, seed 0):

- ``cg``: self-influence on the digits MLP 64-128-10 with 20% symmetric flips (the issue's speed
  target: AUC >= 0.99 in < 10 s on 2 cores) for every solver, next to dattri's CG when
  ``.venv-bench`` provides it (``--dattri-cg``; 195 s in the peer baselines, so opt-in).
- ``loo``: Pearson/Spearman of predicted vs actual leave-one-out loss changes on L2 logistic
  regression (Koh & Liang 2017, Fig. 2) for exact, CG, LiSSA and EK-FAC.
- ``lds``: linear datamodeling score (random half-subsets retrained) of cleanse TRAK, dattri TRAK
  (same projection dimension and number of models, same trained models), TracIn and IF.
- ``fvm``: noisy-label AUC/AP of VM/FVM against plain influence over datasets x corruptions x models.
- ``stability``: Spearman and top-k Jaccard of every registered estimator's scores across
  training seeds.

    .venv-bench/bin/python benchmarks/influence.py                 # full run
    .venv/bin/python benchmarks/influence.py --grid smoke --out /tmp/i.json --docs /tmp/b.md

Writes ``benchmarks/results/influence.json`` and the ``influence`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("CLEANSE_DEVICE", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from _common import REPO, environment, fmt, md_table, update_docs_section
from torch import nn

from cleanse import api
from cleanse.config import FvmOptions, InfluenceOptions, TracInOptions, TrakOptions, load_params
from cleanse.estimators import registry
from cleanse.evaluate import (
    detection_metrics,
    lds,
    leave_one_out_loss_changes,
    loo_correlation,
    rank_stability,
    retrained_subset_outputs,
    subset_masks,
)

MODELS = {
    "logreg": ["model.arch=logreg", "model.lr=0.01", "model.epochs=30", "model.weight_decay=0.001"],
    "mlp": ["model.arch=mlp", "model.hidden=[128]", "model.lr=0.001", "model.epochs=30", "model.weight_decay=0.001"],
}
CORRUPTIONS = {
    "sym20": ["corruption.kind=label_flip", "corruption.mode=symmetric", "corruption.fraction=0.2"],
    "pair40": ["corruption.kind=label_flip", "corruption.mode=pair", "corruption.fraction=0.4"],
}
GRIDS: dict[str, dict[str, Any]] = {
    "full": {"dataset": "digits", "fvm_datasets": ["digits", "breast_cancer"], "lds_subsets": 30,
             "lds_queries": 20, "proj_dim": 512, "trak_models": [1, 3], "stability_seeds": 5, "loo_points": 40,
             "fvm_corruptions": list(CORRUPTIONS), "fvm_models": list(MODELS)},
    "smoke": {"dataset": "wine", "fvm_datasets": ["wine"], "lds_subsets": 6, "lds_queries": 4, "proj_dim": 64,
              "trak_models": [1], "stability_seeds": 2, "loo_points": 8,
              "fvm_corruptions": ["sym20"], "fvm_models": ["logreg"], "lissa_depth": 100},
}


def context_for(dataset: str, model: str, corruption: str, seed: int = 0, extra: list[str] | None = None):
    params = load_params(None, [f"data.source=sklearn:{dataset}", *MODELS[model], *CORRUPTIONS[corruption],
                                "tracking.enabled=false", f"seed={seed}", *(extra or [])])
    prepared = api.prepare(params, stage_seed=0, device="cpu")  # split and corruption fixed across seeds
    return params, prepared.staged, prepared.context


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return (out, [str(w.message)[:160] for w in caught]), time.perf_counter() - started


# ----------------------------------------------------------------------------- cg


# All-layer CG self-influence is not in the table: it solves one system per training sample, so
# its cost is n_train x n_train x p x iterations curvature work (about 1e12 flops here for ~10
# iterations), minutes on 2 cores whatever the implementation.
CG_SOLVERS = {
    "CG (last layer, GGN, EK-FAC-preconditioned)": InfluenceOptions(solver="cg", layers="last"),
    "CG (last layer, GGN, plain)": InfluenceOptions(solver="cg", layers="last", cg_preconditioner="none"),
    "exact (last layer, GGN)": InfluenceOptions(solver="exact", layers="last"),
    "EK-FAC (all layers)": InfluenceOptions(solver="ekfac"),
}


def dattri_cg(context, max_iter: int) -> np.ndarray:
    """dattri IFAttributorCG self-influence, driven per batch of 256 (see peer-baselines.md)."""
    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.task import AttributionTask
    from torch.func import functional_call

    module = context.model.module()

    def loss(params, data):
        x, y = data
        x = x.unsqueeze(0) if x.dim() == 1 else x
        return nn.functional.cross_entropy(functional_call(module, params, (x,)), y.reshape(-1))

    task = AttributionTask(loss_func=loss, model=module, checkpoints=module.state_dict())
    attributor = IFAttributorCG(task=task, max_iter=max_iter, regularization=1e-3, device="cpu")
    x, y = context.tensors(context.train)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    attributor.cache(loader)
    out = []
    for start in range(0, len(y), 256):
        xb, yb = x[start : start + 256], y[start : start + 256]
        rep = attributor.generate_train_rep(0, (xb.unsqueeze(0), yb.unsqueeze(0)))
        test_rep = attributor.transform_test_rep(0, rep)
        out.append((rep * test_rep).sum(1).detach())
    return torch.cat(out).double().numpy()


def bench_cg(grid: dict[str, Any], log, dattri: bool) -> dict[str, Any]:
    _, staged, context = context_for("digits" if grid["dataset"] == "digits" else grid["dataset"], "mlp", "sym20")
    truth = staged.train.is_corrupted
    estimator = registry.get("influence")
    rows = {}
    for label, options in CG_SOLVERS.items():
        (result, caught), seconds = timed(estimator.score, context, options)
        metrics = detection_metrics(result.table["score"].to_numpy(), truth)
        reports = result.meta.get("reports", [])
        rows[label] = {"seconds": seconds, **metrics, "converged": result.meta.get("converged"),
                       "iterations": max((r.get("iterations", 0) for r in reports), default=0), "warnings": caught[:2]}
        log(f"  cg  {label}: {seconds:.1f} s AUC {metrics['roc_auc']:.4f}")
    if dattri:
        try:
            (score, _), seconds = timed(dattri_cg, context, 50)
            rows["dattri IFAttributorCG (max_iter 50)"] = {"seconds": seconds, **detection_metrics(score, truth)}
        except Exception as exc:  # noqa: BLE001 - a peer failure is recorded, not fatal
            rows["dattri IFAttributorCG (max_iter 50)"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"n_train": len(staged.train), "n_params": sum(p.numel() for p in context.model.module().parameters()), "rows": rows,
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- loo


LOO_SOLVERS = {
    "exact": InfluenceOptions(solver="exact", damping=0.0),
    "cg": InfluenceOptions(solver="cg", damping=0.0, cg_tol=1e-7, cg_max_iter=300),
    "lissa (depth 1500, 2 repeats, batch 300)": InfluenceOptions(solver="lissa", damping=0.0, lissa_depth=1500,
                                                                 lissa_repeats=2, lissa_batch_size=300),
    "ekfac": InfluenceOptions(solver="ekfac", damping=0.0),
}


def bench_loo(grid: dict[str, Any], log) -> dict[str, Any]:
    from cleanse.estimators.influence import removal_effects
    from cleanse.grads import FunctionalModel

    params, staged, context = context_for(grid["dataset"], "logreg", "sym20",
                                          extra=["model.optimizer=lbfgs", "model.lr=1.0", "model.weight_decay=0.01",
                                                 "corruption.kind=none"])
    fm = FunctionalModel.of(context.model.module(), context.model_config.weight_decay)
    test = staged.test
    losses = fm.losses(fm.theta, torch.tensor(test.features), torch.tensor(test.label)).detach().numpy()
    query = test.subset(np.array([int(np.argmax(losses))]))

    predicted_exact, _ = removal_effects(context, LOO_SOLVERS["exact"], query)
    top = np.argsort(-np.abs(predicted_exact[0]))[: grid["loo_points"]]
    actual = leave_one_out_loss_changes(context.model, context.train, query, context.model_config, top)
    rows = {}
    for label, options in LOO_SOLVERS.items():
        if options.solver == "lissa" and "lissa_depth" in grid:  # the smoke grid only checks the plumbing
            options = options.model_copy(update={"lissa_depth": grid["lissa_depth"]})
            label = f"lissa (depth {grid['lissa_depth']}, 2 repeats, batch 300)"
        ((predicted, _), caught), seconds = timed(removal_effects, context, options, query)
        rows[label] = {**loo_correlation(predicted[0][top], np.asarray(actual)), "seconds": seconds, "warnings": caught[:2]}
        log(f"  loo {label}: Pearson {rows[label]['pearson']:.4f}")
    return {"n_train": len(staged.train), "points": len(top), "rows": rows}


# ----------------------------------------------------------------------------- lds


def dattri_trak(context, query, proj_dim: int, members: list) -> np.ndarray:
    """dattri TRAKAttributor on the same trained models (``(n_query, n_train)``)."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.func import functional_call

    module = context.model.module()

    def loss(params, data):
        x, y = data
        x = x.unsqueeze(0) if x.dim() == 1 else x
        return nn.functional.cross_entropy(functional_call(module, params, (x,)), y.reshape(-1))

    def correct_probability(params, data):
        x, y = data
        x = x.unsqueeze(0) if x.dim() == 1 else x
        return torch.exp(-nn.functional.cross_entropy(functional_call(module, params, (x,)), y.reshape(-1)))

    task = AttributionTask(loss_func=loss, model=module, checkpoints=[{k: v.clone() for k, v in m.state.items()} for m in members])
    n_params = sum(p.numel() for p in module.parameters())
    attributor = TRAKAttributor(task=task, correct_probability_func=correct_probability, device="cpu",
                                projector_kwargs={"proj_dim": min(proj_dim, n_params), "proj_max_batch_size": 32,
                                                  "proj_seed": 0, "device": "cpu"}, regularization=1e-3)
    x, y = context.tensors(context.train)
    xq, yq = context.tensors(query)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xq, yq), batch_size=64)
    return attributor.attribute(test, train).detach().double().numpy().T


def bench_lds(grid: dict[str, Any], log, peers: bool) -> dict[str, Any]:
    from cleanse.estimators.trak import attribute, ensemble_members, featurize

    out: dict[str, Any] = {}
    for model_name in ("logreg", "mlp"):
        _, staged, context = context_for(grid["dataset"], model_name, "sym20")
        query = staged.test.subset(np.arange(grid["lds_queries"]))
        masks = subset_masks(len(context.train), grid["lds_subsets"], seed=0)
        started = time.perf_counter()
        outputs = retrained_subset_outputs(context.model.spec, context.train, query, context.model_config, masks, seed=0)
        retrain_seconds = time.perf_counter() - started
        rows: dict[str, Any] = {}

        def record(label: str, fn) -> None:
            try:
                (attributions, _), seconds = timed(fn)
                rows[label] = {**{k: v for k, v in lds(attributions, masks, outputs).items() if k != "per_query"},
                               "seconds": seconds}
                log(f"  lds {model_name} {label}: {rows[label]['lds']}")
            except Exception as exc:  # noqa: BLE001
                rows[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}

        for m in grid["trak_models"]:
            options = TrakOptions(proj_dim=grid["proj_dim"], n_models=m)
            members = ensemble_members(context, options)
            record(f"cleanse TRAK (k={grid['proj_dim']}, M={m})",
                   lambda: attribute([featurize(context, options, member, i) for i, member in enumerate(members)],
                                     context, query, options.chunk_size))
            if peers:
                record(f"dattri TRAK (k={grid['proj_dim']}, M={m})",
                       lambda: dattri_trak(context, query, grid["proj_dim"], members))
        record("cleanse TracIn (all checkpoints)", lambda: registry.get("tracin").pairwise(context, TracInOptions(), query))
        record("cleanse IF (EK-FAC)", lambda: registry.get("influence").pairwise(context, InfluenceOptions(solver="ekfac"), query))
        record("cleanse IF (CG, GGN)", lambda: registry.get("influence").pairwise(context, InfluenceOptions(solver="cg", cg_tol=1e-4), query))
        out[model_name] = {"n_train": len(context.train), "subsets": int(masks.shape[0]), "queries": len(query),
                           "retrain_seconds": retrain_seconds, "rows": rows}
    return out


# ----------------------------------------------------------------------------- fvm


FVM_VARIANTS = {
    "influence (self, train curvature)": ("influence", "plain"),
    "influence_val": ("influence_val", "plain"),
    "VM": ("influence_fvm", FvmOptions(variant="vm")),
    "FVM (SAM)": ("influence_fvm", FvmOptions(variant="fvm", sharpness="sam")),
    "FVM (LPF-SGD)": ("influence_fvm", FvmOptions(variant="fvm", sharpness="lpf")),
}


def bench_fvm(grid: dict[str, Any], log) -> list[dict[str, Any]]:
    cells = []
    for dataset in grid["fvm_datasets"]:
        for corruption in grid["fvm_corruptions"]:
            for model_name in grid["fvm_models"]:
                params, staged, context = context_for(dataset, model_name, corruption)
                truth = staged.train.is_corrupted
                rows = {}
                n_params = sum(p.numel() for p in context.model.module().parameters())
                for label, (name, options) in FVM_VARIANTS.items():
                    if options == "plain":  # exact where small, else EK-FAC (all-layer CG is too slow here)
                        options = InfluenceOptions(solver="exact" if n_params <= 2000 else "ekfac")
                    (result, _), seconds = timed(registry.get(name).score, context, options)
                    metrics = detection_metrics(result.table["score"].to_numpy(), truth)
                    rows[label] = {"roc_auc": metrics["roc_auc"], "average_precision": metrics["average_precision"],
                                   "seconds": seconds, "val_accuracy_after": result.meta.get("val_accuracy_after")}
                key = f"{dataset}/{corruption}/{model_name}"
                log(f"  fvm {key}: " + ", ".join(f"{k} {v['average_precision']:.3f}" for k, v in rows.items()))
                cells.append({"cell": key, "k": int(truth.sum()), "rows": rows})
    return cells


# ----------------------------------------------------------------------------- stability


def bench_stability(grid: dict[str, Any], log) -> dict[str, Any]:
    seeds = list(range(grid["stability_seeds"]))
    scores: dict[str, list[np.ndarray]] = {name: [] for name in registry.names_for("classification")}
    k = None
    for seed in seeds:
        # Logistic regression: every estimator at its default options (exact influence) in minutes.
        params, staged, context = context_for(grid["dataset"], "logreg", "sym20", seed=seed)
        k = int(staged.train.is_corrupted.sum())
        for name in registry.names_for("classification"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = registry.get(name).score(context, params.scorers.of(name))
            scores[name].append(result.table["score"].to_numpy())
        log(f"  stability seed {seed} done")
    return {"seeds": seeds, "k": k, "rows": {name: rank_stability(np.stack(v), k=k) for name, v in scores.items()}}


# ----------------------------------------------------------------------------- report


def render(result: dict[str, Any], docs: Path, out: Path) -> str:
    env = result["environment"]
    lines = ["## Influence family (solvers, TRAK, FVM, LDS, stability)", "",
             f"*Generated by `benchmarks/influence.py --grid {result['grid']}` on {env['created']} (commit "
             f"`{(env['git_commit'] or '?')[:12]}`, torch {env['torch']}, {result['threads']} threads, load average at start "
             f"{env['load_average_start'][0]:.1f} on {env['cpu_count']} cores: absolute seconds are noisy); raw numbers in "
             f"`{os.path.relpath(out, docs.parent)}`.*", ""]
    lines += render_sections(result)
    return "\n".join(lines)


def render_sections(result: dict[str, Any]) -> list[str]:
    """Markdown for every section present in ``result`` (a partial run renders what it has)."""
    lines: list[str] = []
    if "cg" in result:
        lines += _render_cg(result["cg"])
    if "loo" in result:
        lines += _render_loo(result["loo"])
    if "lds" in result:
        lines += _render_lds(result["lds"])
    if "fvm" in result:
        lines += _render_fvm(result["fvm"])
    if "stability" in result:
        lines += _render_stability(result["stability"])
    missing = [k for k in ("cg", "loo", "lds", "fvm", "stability") if k not in result]
    if missing:
        lines += [f"*Not measured in this run: {', '.join(missing)}.*", ""]
    return lines


def _render_cg(cg: dict[str, Any]) -> list[str]:
    return ["### Self-influence solvers (digits MLP 64-128-10, 20% symmetric flips)", "",
              f"{cg['n_train']:,} training samples, {cg['n_params']:,} parameters. Target: CG AUC >= 0.99 in < 10 s on 2 cores.", "",
              md_table(["solver", "s", "ROC-AUC", "AP", "P@k", "converged", "iterations"],
                       [[k, fmt(v.get("seconds")), fmt(v.get("roc_auc"), 4), fmt(v.get("average_precision"), 4),
                         fmt(v.get("precision_at_k"), 4), fmt(v.get("converged")), fmt(v.get("iterations"))]
                        if "error" not in v else [k, v["error"], "", "", "", "", ""] for k, v in cg["rows"].items()]), "",
              *_cg_verdict(cg["rows"])]


def _cg_verdict(rows: dict[str, Any]) -> list[str]:
    ours = rows.get("CG (last layer, GGN, EK-FAC-preconditioned)", {})
    peer = next((v for k, v in rows.items() if k.startswith("dattri") and "seconds" in v), None)
    if "seconds" not in ours:
        return []
    met = ours["seconds"] < 10 and ours.get("roc_auc", 0) >= 0.99
    line = (f"Target {'met' if met else 'missed'}: {ours['seconds']:.1f} s, AUC {ours['roc_auc']:.4f}. The head's "
            "Gauss-Newton products are two dense matrix products per block of right-hand sides, and converged "
            "columns drop out of the iteration.")
    if peer is not None:
        line += (f" dattri's CG in the same run, on all layers (its default): {peer['seconds']:.0f} s, AUC "
                 f"{peer['roc_auc']:.3f}. That is not the peer's best configuration on these layers: dattri's "
                 "last-layer explicit IF reached AUC 0.996 in 1.2 s on the quality grid's digits MLP with 20% flips (a similar model), faster "
                 "than this CG and close to cleanse's exact last-layer solve above.")
    return [line, ""]


def _render_loo(loo: dict[str, Any]) -> list[str]:
    return ["### Leave-one-out correlation (L2 logistic regression, Koh & Liang Fig. 2)", "",
              f"{loo['n_train']:,} training samples; the {loo['points']} training points with the largest exact predicted "
              "effect on the worst test point, retrained warm-started. Targets: exact and CG >= 0.99, EK-FAC >= 0.9, LiSSA >= 0.95.", "",
              md_table(["solver", "Pearson", "Spearman", "s"],
                       [[k, fmt(v["pearson"], 4), fmt(v["spearman"], 4), fmt(v["seconds"])] for k, v in loo["rows"].items()]), ""]


def _render_lds(blocks: dict[str, Any]) -> list[str]:
    lines = ["### Linear datamodeling score", ""]
    for model_name, block in blocks.items():
        lines += [f"**{model_name}** ({block['n_train']:,} train, {block['subsets']} random halves retrained, "
                  f"{block['queries']} test queries, margin output):", "",
                  md_table(["attribution", "LDS", "se", "s"],
                           [[k, fmt(v.get("lds"), 4), fmt(v.get("lds_se"), 4), fmt(v.get("seconds"))]
                            if "error" not in v else [k, v["error"], "", ""] for k, v in block["rows"].items()]), ""]
    return lines


def _render_fvm(cells: list[dict[str, Any]]) -> list[str]:
    lines = ["### Flat validation minima vs plain influence (noisy-label detection)", "",
              md_table(["cell", "k"] + [f"{name} AUC / AP" for name in FVM_VARIANTS],
                       [[c["cell"], fmt(c["k"])] + [f"{fmt(c['rows'][n]['roc_auc'], 3)} / {fmt(c['rows'][n]['average_precision'], 3)}"
                                                    for n in FVM_VARIANTS] for c in cells]), ""]
    wins = sum(c["rows"]["FVM (SAM)"]["average_precision"] > c["rows"]["influence (self, train curvature)"]["average_precision"]
               for c in cells)
    return lines + [f"FVM (SAM) has a higher AP than plain self-influence in {wins} of {len(cells)} cells.", ""]


def _render_stability(stab: dict[str, Any]) -> list[str]:
    return [f"### Rank stability across {len(stab['seeds'])} training seeds (logistic regression, 20% flips; k = {stab['k']})", "",
              md_table(["estimator", "mean Spearman", "min Spearman", "top-k Jaccard"],
                       [[k, fmt(v["spearman"], 3), fmt(v["spearman_min"], 3), fmt(v["top_k_jaccard"], 3)]
                        for k, v in stab["rows"].items()]), ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "influence.json")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", choices=["auto", "none"], default="auto")
    parser.add_argument("--dattri-cg", action="store_true", help="also time dattri's CG (about 200 s)")
    parser.add_argument("--sections", default="cg,loo,lds,fvm,stability")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)
    if args.render_only:
        result = json.loads(args.out.read_text())
        update_docs_section(args.docs, "influence", render(result, args.docs, args.out))
        return 0
    torch.set_num_threads(args.threads)
    grid = GRIDS[args.grid]
    peers = args.peers == "auto"
    if peers:
        try:
            import dattri.algorithm.trak  # noqa: F401
        except Exception:  # noqa: BLE001
            peers = False
    result: dict[str, Any] = {"grid": args.grid, "threads": args.threads, "environment": environment(args.threads),
                              "peers": peers}
    if args.out.is_file():  # keep sections not rerun
        previous = json.loads(args.out.read_text())
        result.update({k: v for k, v in previous.items() if k in ("cg", "loo", "lds", "fvm", "stability")})

    def log(message: str) -> None:
        print(message, flush=True)

    sections = args.sections.split(",")
    started = time.perf_counter()
    if "cg" in sections:
        result["cg"] = bench_cg(grid, log, args.dattri_cg and peers)
    if "loo" in sections:
        result["loo"] = bench_loo(grid, log)
    if "lds" in sections:
        result["lds"] = bench_lds(grid, log, peers)
    if "fvm" in sections:
        result["fvm"] = bench_fvm(grid, log)
    if "stability" in sections:
        result["stability"] = bench_stability(grid, log)
    result["seconds"] = time.perf_counter() - started
    from _common import jsonable

    from cleanse.storage import write_json

    write_json(jsonable(result), args.out)
    if any(k in result for k in ("cg", "loo", "lds", "fvm", "stability")):
        update_docs_section(args.docs, "influence", render(result, args.docs, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""kronfluence as a peer on the language model (issue 21): EK-FAC influence over the LoRA adapters
against cleanse's TracIn, TRAK and influence on the same fine-tune.

Per seed, one fine-tune of ``examples/lm.yaml`` (a copy with ``tracking`` off) is built with the
lm family's public API (``cleanse.api``: stage, fit, context, the run's topic probes), and every
method attributes the same probes (``query.kind: topic``: held-out negative reviews asked about the
steered topic, measured as the preference log p(good) - log p(bad)) to the training samples:

- cleanse ``tracin``, ``trak`` and ``influence`` through ``api.score_probes`` with the options of
  ``examples/lm.yaml`` (``influence``: the family's default, ``solver: ekfac`` over the adapters with
  the Fisher of the response tokens' softmax, one token drawn from the model per position, damping
  1e-3; ``--influence-solver cg|lissa|exact|auto`` take ``curvature: hessian``);
- kronfluence 1.0.1 (Grosse et al., 2023, arXiv 2308.03296) EK-FAC with the LoRA matrices
  (``lora_A`` / ``lora_B`` linear layers) as the tracked modules, the empirical Fisher of the response
  NLL as the curvature (its Task sees the scorer's weighted target log-probabilities only, from
  which no token can be drawn; cleanse's like-for-like row is ``--influence-set ekfac_fisher=empirical``),
  the damping heuristic (0.1 x the mean eigenvalue, ``damping_factor=None``), and as measurement
  minus the probe's preference, so that kronfluence's positive score ("helpful": up-weighting the
  sample lowers the measurement) means the sample pushes the steered answer, the orientation of
  cleanse's support matrices.

Every method's ``(n_probes, n_train)`` matrix is aggregated as ``cleanse run`` does
(``query.aggregate``) and ranked against the planted steering pairs: AP and precision@k
(k = planted). Cost: wall seconds of the whole attribution (for kronfluence: factor fitting plus
pairwise scores, also reported apart), per probe, and relative to one fine-tune in the same process.
Agreement: Spearman correlation of each method's aggregated score with kronfluence's.
``--tracin-forward-mode`` adds the row ``tracin[forward_mode]``: TracIn again with
:func:`cleanse.grads.grad_dots` held on one forward-mode pass per probe (its path before commit
8b8e655), to time both paths in one process; its scores must equal TracIn's up to float rounding
(``max_relative_difference_to_tracin``).

    .venv-bench/bin/python benchmarks/lm_peers.py                  # seeds 0 1 2 (a few minutes each)
    .venv-bench/bin/python benchmarks/lm_peers.py --seeds 1 2 --cleanse tracin trak --merge   # add to --out
    .venv-bench/bin/python benchmarks/lm_peers.py --seeds 0 1 2 --tracin-forward-mode --merge   # + TracIn's old path
    .venv-bench/bin/python benchmarks/lm_peers.py --smoke --out /tmp/p.json --no-docs   # tiny (the test)
    .venv-bench/bin/python benchmarks/lm_peers.py --render-only

(``benchmarks/setup_peers.sh`` builds ``.venv-bench``.) Writes ``benchmarks/results/lm_peers.json``
and the ``lm-peers`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, fmt, md_table, output_arguments, publish, render_saved  # noqa: E402
from lm import SMOKE  # noqa: E402  (the lm benchmark's tiny settings)

SECTION = "lm-peers"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "lm_peers.json"
DEFAULT_DOCS = REPO / "docs" / "benchmarks.md"
EXAMPLE = REPO / "examples" / "lm.yaml"
CLEANSE = ["tracin", "trak", "influence"]
# The lm family's default: EK-FAC over the adapters (the exact Hessian ran out of the machine's
# 23 GiB on examples/lm.yaml, and cg reached 13.5 GiB, before their products were batched).
INFLUENCE_SOLVER = "ekfac"
PEER = "kronfluence"
FORWARD_MODE_TRACIN = "tracin[forward_mode]"  # --tracin-forward-mode: TracIn timed on the old path


# ----------------------------------------------------------------------------- pure helpers


def lora_modules(names: list[str]) -> list[str]:
    """The LoRA factor layers among module ``names`` (peft's ``...lora_A.<adapter>`` and
    ``...lora_B.<adapter>``): what kronfluence tracks, the parameters cleanse differentiates."""
    return [name for name in names if name.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"])]


def ranking_metrics(score: np.ndarray, planted: np.ndarray) -> dict[str, float]:
    """AP and precision@k (k = planted) of ``score`` ``(n,)`` (higher = more support) against ``planted``."""
    from cleanse.evaluate import detection_metrics

    metrics = detection_metrics(np.asarray(score, dtype=float), np.asarray(planted, dtype=bool))
    return {"average_precision": metrics["average_precision"], "precision_at_k": metrics["precision_at_k"]}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# ----------------------------------------------------------------------------- kronfluence


def _task(modules: list[str]) -> Any:
    import torch
    from kronfluence.task import Task

    class SteeringTask(Task):
        """Train loss: the summed response NLL (the family's per-unit loss). Measurement: minus the
        probe's signed output sum, i.e. minus log p(good) + log p(bad) after the probe."""

        def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
            if not sample:
                return -model(batch[0]).sum()
            # the true Fisher: every response position's token drawn from the model's softmax, from
            # the scorer's vocabulary outputs (cleanse's ekfac_fisher: sampled)
            logits, weight, _, _ = model(batch[0], vocabulary=True)
            logp = torch.log_softmax(logits, dim=-1)
            with torch.no_grad():
                drawn = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1).reshape(weight.shape)
            return -(weight * logp.gather(-1, drawn[..., None])[..., 0]).sum()

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            return -model(batch[0]).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return modules

    return SteeringTask()


def kronfluence_scores(model: Any, train_x: np.ndarray, probe_x: np.ndarray, seed: int,
                       fisher: str = "empirical") -> tuple[np.ndarray, dict[str, float]]:
    """``(n_probes, n_train)`` kronfluence EK-FAC pairwise scores over the adapters, and the seconds
    of factor fitting and scoring; ``fisher``: ``empirical`` (the observed response tokens) or
    ``sampled`` (tokens drawn from the model, kronfluence's default)."""
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    module = model.module().float()
    tracked = lora_modules([name for name, _ in module.named_modules()])
    if not tracked:
        raise RuntimeError("kronfluence: the model has no LoRA lora_A / lora_B layers to track")
    task = _task(tracked)
    train = torch.utils.data.TensorDataset(torch.as_tensor(train_x, dtype=torch.float32))
    probes = torch.utils.data.TensorDataset(torch.as_tensor(probe_x, dtype=torch.float32))
    with tempfile.TemporaryDirectory(prefix="kronfluence_") as out:
        started = time.perf_counter()
        prepared = prepare_model(module, task)
        analyzer = Analyzer(analysis_name="lm", model=prepared, task=task, cpu=True, disable_tqdm=True,
                            output_dir=out, log_level=logging.WARNING)
        torch.manual_seed(seed)
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=64,
                                 factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=fisher == "empirical"),
                                 overwrite_output_dir=True)
        fitted = time.perf_counter()
        analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name="ekfac", query_dataset=probes,
                                         train_dataset=train, per_device_query_batch_size=len(probes),
                                         per_device_train_batch_size=64,
                                         score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
        scored = time.perf_counter()
        matrix = analyzer.load_pairwise_scores("pairwise")["all_modules"].detach().double().numpy()
    return matrix, {"factor_seconds": fitted - started, "score_seconds": scored - fitted,
                    "seconds": scored - started, "tracked_modules": len(tracked)}


# ----------------------------------------------------------------------------- measuring


def params_for(seed: int, extra: list[str], methods: list[str], solver: str = INFLUENCE_SOLVER) -> Any:
    from cleanse.config import load_params

    return load_params(EXAMPLE, [f"seed={seed}", "tracking.enabled=false", f"estimators=[{','.join(methods)}]",
                                 "scorers.influence.curvature=hessian", f"scorers.influence.solver={solver}", *extra])


def run_seed(seed: int, extra: list[str], log: Any, methods: list[str] = CLEANSE,
             solver: str = INFLUENCE_SOLVER, influence_set: list[str] | None = None,
             peer_fishers: tuple[str, ...] = ("empirical",), tracin_forward_mode: bool = False) -> dict[str, Any]:
    from cleanse import api
    from cleanse.attribution import aggregate_support

    influence_set = influence_set or []
    params = params_for(seed, extra + [f"scorers.influence.{item}" for item in influence_set], methods, solver)
    staged = api.stage(params)
    began = time.perf_counter()
    model = api.fit(params, staged)
    fit_seconds = time.perf_counter() - began
    prepared = api.Prepared(params, staged, model, api.context(params, staged, model))
    query = api.probes(prepared)
    planted = staged.train.is_corrupted
    n_probes = len(query.probes)
    row: dict[str, Any] = {"seed": seed, "n_train": len(staged.train), "planted": int(planted.sum()),
                           "n_probes": n_probes, "fit_seconds": fit_seconds, "methods": {}}
    scores: dict[str, np.ndarray] = {}
    for name in methods:
        started = time.perf_counter()
        result, _ = api.score_probes(prepared, name, query)
        seconds = time.perf_counter() - started
        label = method_label(name, influence_set)
        scores[label] = result.table["score"].to_numpy()
        row["methods"][label] = {"seconds": seconds, **ranking_metrics(scores[label], planted)}
        if name == "influence":
            row["methods"][label].update(solver=solver, options=influence_set)
        log(f"[seed {seed}] {label:<12} AP {row['methods'][label]['average_precision']:.3f} {seconds:.1f}s")
    if tracin_forward_mode and "tracin" in scores:
        started = time.perf_counter()
        result = forward_mode_tracin(prepared, query)
        label = FORWARD_MODE_TRACIN
        scores[label] = result.table["score"].to_numpy()
        row["methods"][label] = {"seconds": time.perf_counter() - started, **ranking_metrics(scores[label], planted),
                                 "max_relative_difference_to_tracin": float(
                                     np.abs(scores[label] - scores["tracin"]).max() / np.abs(scores[label]).max())}
        log(f"[seed {seed}] {label} AP {row['methods'][label]['average_precision']:.3f} "
            f"{row['methods'][label]['seconds']:.1f}s")
    for fisher in peer_fishers:
        peer = PEER if fisher == "empirical" else f"{PEER}[{fisher}]"
        try:
            matrix, cost = kronfluence_scores(model, staged.train.features, query.probes.features, seed, fisher)
        except Exception as exc:  # noqa: BLE001 - the peer's failure is a result, recorded with its reason
            row["methods"][peer] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            log(f"[seed {seed}] {peer} failed: {exc}")
        else:
            scores[peer] = aggregate_support(matrix, params.query.aggregate)
            row["methods"][peer] = {**cost, **ranking_metrics(scores[peer], planted)}
            log(f"[seed {seed}] {peer:<12} AP {row['methods'][peer]['average_precision']:.3f} {cost['seconds']:.1f}s")
    for name, entry in row["methods"].items():
        if "seconds" in entry:
            entry["seconds_per_probe"] = entry["seconds"] / n_probes
            entry["over_fine_tune"] = entry["seconds"] / fit_seconds
            if PEER in scores and name != PEER:
                entry["spearman_with_kronfluence"] = spearman(scores[name], scores[PEER])
    return row


def forward_mode_tracin(prepared: Any, query: Any) -> Any:
    """TracIn's aggregated probe scores with :func:`cleanse.grads.grad_dots` held on forward mode
    (one pass through the frozen network per probe and checkpoint, the path before
    :func:`cleanse.grads.materialises`): the same scores up to float rounding, to time the two
    paths in one process."""
    from unittest import mock

    from cleanse import api, grads

    with mock.patch.object(grads, "materialises", lambda fm, directions: False):
        return api.score_probes(prepared, "tracin", query)[0]


def method_label(name: str, influence_set: list[str]) -> str:
    """The row name of a method: ``influence`` with ``--influence-set`` options is another row,
    ``influence[key=value,...]``, so that variants sit beside the default."""
    return f"{name}[{','.join(influence_set)}]" if name == "influence" and influence_set else name


def method_names(rows: list[dict[str, Any]]) -> list[str]:
    """Every method measured in ``rows``: cleanse's in their order (variants after their method),
    then the peer."""
    seen = {name for r in rows for name in r["methods"]}
    ordered = [n for base in CLEANSE for n in sorted(seen) if n == base or n.startswith(f"{base}[")]
    return ordered + [PEER] + sorted(n for n in seen if n.startswith(f"{PEER}["))


def merge_runs(saved: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``saved`` rows with ``new`` ones added: a new seed is appended, a saved seed gains (or has
    replaced) the methods measured now and keeps its other ones; sorted by seed."""
    by_seed = {row["seed"]: {**row, "methods": dict(row["methods"])} for row in saved}
    for row in new:
        if row["seed"] in by_seed:
            by_seed[row["seed"]]["methods"].update(row["methods"])
        else:
            by_seed[row["seed"]] = row
    return [by_seed[seed] for seed in sorted(by_seed)]


# ----------------------------------------------------------------------------- rendering


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in method_names(rows):
        entries = [r["methods"][name] for r in rows if "seconds" in r["methods"].get(name, {})]
        out[name] = {key: float(np.mean([e[key] for e in entries])) if entries else None
                     for key in ("average_precision", "precision_at_k", "seconds_per_probe", "over_fine_tune")}
    return out


def plot(result: dict[str, Any], image: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cleanse.storage import write_bytes

    summary = result["summary"]
    names = [n for n in summary if summary[n]["average_precision"] is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.bar(names, [summary[n]["average_precision"] for n in names], color="tab:blue")
    left.set_ylabel("AP against the planted pairs")
    right.bar(names, [summary[n]["seconds_per_probe"] for n in names], color="tab:orange")
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=30, labelsize=7)
    right.set_ylabel("seconds per probe")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes(buffer.getvalue(), image)


def render(result: dict[str, Any], docs: Path, out: Path, image: Path) -> str:
    env = result.get("environment", {})
    rows = result["runs"]
    lines = ["## Language model: kronfluence as a peer over the LoRA adapters (issue 21)", "",
             f"`.venv-bench/bin/python benchmarks/lm_peers.py` ({'smoke settings' if result.get('smoke') else 'examples/lm.yaml'}, "
             f"seeds {[r['seed'] for r in rows]}; one torch thread; kronfluence {env.get('kronfluence', '?')}). Measured "
             f"at {env.get('git_commit', '?')}, load average at start {fmt((env.get('load_average_start') or ['?'])[0])}. "
             "Each method attributes the run's topic probes to the training samples (aggregated as `cleanse run` "
             "does); AP and precision@k against the planted steering pairs. kronfluence: EK-FAC over the "
             "`lora_A`/`lora_B` layers, empirical Fisher, damping heuristic (0.1 x mean eigenvalue); cleanse influence: "
             "EK-FAC over the same layers (the family's default: Fisher with response tokens drawn from the model, "
             "each layer damped by 0.1 x its mean eigenvalue). Seconds are "
             "wall time in one process on a shared 2-core machine: read the ratios.", ""]
    headers = ["seed", "method", "AP", "precision@k", "s", "s/probe", "/ fine-tune", "Spearman with kronfluence"]
    table = []
    for r in rows:
        for name in method_names(rows):
            e = r["methods"].get(name, {})
            if "seconds" not in e:
                table.append([r["seed"], name, e.get("status", "not run") + (f": {e['reason']}" if "reason" in e else ""),
                              "", "", "", "", ""])
                continue
            seconds = fmt(e["seconds"], 1) + (f" (factors {fmt(e['factor_seconds'], 1)} + scores "
                                              f"{fmt(e['score_seconds'], 1)})" if name.startswith(PEER) else "")
            table.append([r["seed"], name, fmt(e["average_precision"]), fmt(e["precision_at_k"]), seconds,
                          fmt(e["seconds_per_probe"], 2), fmt(e["over_fine_tune"]),
                          fmt(e.get("spearman_with_kronfluence"))])
    lines += [f"Planted pairs {[r['planted'] for r in rows]} of {rows[0]['n_train']} samples, "
              f"{rows[0]['n_probes']} probes per seed; one fine-tune {', '.join(fmt(r['fit_seconds'], 1) for r in rows)} s.", "",
              md_table(headers, table), ""]
    summary = result["summary"]
    lines += ["Mean over seeds:", "",
              md_table(["method", "AP", "precision@k", "s/probe", "/ fine-tune"],
                       [[n, fmt(s["average_precision"]), fmt(s["precision_at_k"]), fmt(s["seconds_per_probe"], 2),
                         fmt(s["over_fine_tune"])] for n, s in summary.items()]), ""]
    lines += [f"![lm peers]({image.relative_to(docs.parent).as_posix()})", ""]
    lines += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    output_arguments(parser, DEFAULT_OUT, DEFAULT_DOCS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="tiny base and data (the test)")
    parser.add_argument("--cleanse", nargs="+", choices=CLEANSE, default=CLEANSE, help="the cleanse estimators to run")
    parser.add_argument("--influence-solver", choices=["ekfac", "cg", "lissa", "exact", "auto"], default=INFLUENCE_SOLVER,
                        help="cleanse influence's solver (lissa: minibatch Hessian-vector products, least memory)")
    parser.add_argument("--influence-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="options of scorers.influence (e.g. ekfac_fisher=empirical): the row is named "
                        "influence[KEY=VALUE,...] beside the default")
    parser.add_argument("--peer-fisher", nargs="+", choices=["empirical", "sampled"], default=["empirical"],
                        help="kronfluence's Fisher: empirical (the row 'kronfluence') and/or sampled "
                        "('kronfluence[sampled]'), in the same process")
    parser.add_argument("--tracin-forward-mode", action="store_true",
                        help="also time tracin with grad_dots held on forward mode (one pass per probe; the path "
                        "before materialised adapter gradients), row tracin[forward_mode], in the same process")
    parser.add_argument("--merge", action="store_true", help="add to the seeds and methods saved at --out (the rest "
                        "is kept): seeds and estimators can run as separate processes")
    args = parser.parse_args()
    docs = None if args.no_docs else args.docs
    if args.render_only:
        render_saved(args, SECTION, summarise, plot, render, append_notes=True)
        return
    torch.set_num_threads(1)
    env = environment(1)
    try:
        from importlib.metadata import version

        env["kronfluence"] = version("kronfluence")
    except Exception as exc:  # noqa: BLE001 - not installed: say how to get it
        raise SystemExit(f"lm_peers: kronfluence is not installed ({exc}); run benchmarks/setup_peers.sh and use "
                         ".venv-bench/bin/python") from None
    extra = list(SMOKE) if args.smoke else []
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            extra.append(f"model.base.cache_dir={Path(scratch) / 'lm-cache'}")
        rows = [run_seed(seed, extra, lambda line: print(line, flush=True), args.cleanse, args.influence_solver,
                         args.influence_set, tuple(args.peer_fisher), args.tracin_forward_mode)
                for seed in args.seeds]
    notes = args.note
    if args.merge and args.out.is_file():
        saved = json.loads(args.out.read_text())
        rows, notes = merge_runs(saved["runs"], rows), saved.get("notes", []) + args.note
        env = {**env, "merged_into": saved.get("environment")}
    result = {"runs": rows, "smoke": args.smoke, "environment": env, "notes": notes, "summary": summarise(rows)}
    publish(result, args.out, docs, SECTION, plot, render)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()

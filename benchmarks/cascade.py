"""Influence minimisation by cutting edges (issue 20, DiffIM; spec part B §4): per graph, diffusion
model (IC, LT) and budget b (1, 2, 5% of the edges), the spread after each method's cuts, verified by
fresh Monte Carlo (never the surrogate), against the seconds the selection took; a Pareto plot.

Library calls only (``cleanse.graphs.*``): the surrogate (MONSTOR-style by default) is trained once
per graph and diffusion model on MC-labelled perturbed instances (its training seconds are reported
apart: amortised, as in the paper), then every method selects b edges:

- ``oneshot`` (d spread_hat / d x at x = 1, on the seeds' neighbourhood), ``relax`` (continuous relaxation
  from the one-shot warm start, at most 60 Adam steps, spread gradients below 1e-3 of the largest dropped,
  the best rounded cut by the surrogate kept, stopped once it has not fallen by more than 0.01 nodes for 3
  steps, after a rounding in 4 stages whose cut is the first kept one: the library defaults; its
  surrogate passes, and how many are gradients, are recorded per row), ``sgreedy`` (surrogate greedy
  over 2b candidates, b/10 cuts per step);
- ``greedy_mc`` (greedy on 500 live-edge worlds, candidates: out-edges within 1 hop of S; the
  reference), ``degree``, ``betweenness``, ``pagerank``, ``eigen_drop``, ``random``.

Fixed choices (made before any result): 5 seeds of highest out-degree; weighted-cascade weights
1/in-degree(v); verification 10,000 cascades in 50 batches on one stream shared by every method
(common random numbers); surrogate 48 training instances (300 cascades each), 15 epochs, held-out
MAE on 24 instances (1,200 cascades each); one torch thread. ``seconds`` of a selection is one call
when that call takes >= 1 s (greedy MC, always), else the median of 5 calls (every method is a
deterministic function of its inputs; at milliseconds a single call mostly measures the load).

    python benchmarks/cascade.py                        # jazz, IC and LT, b = 1, 2, 5 %
    python benchmarks/cascade.py --graphs jazz email_eu_core
    python benchmarks/cascade.py --smoke --out /tmp/c.json --docs /tmp/b.md
    python benchmarks/cascade.py --graphs jazz --models LT --threshold 0.1 --greedy-steps 20 --out /tmp/t.json
    python benchmarks/cascade.py --combine /tmp/a.json /tmp/t.json     # merge runs into --out, render
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, fmt, md_table, output_arguments, publish, render_saved  # noqa: E402

SECTION = "cascade"
DEFAULT_OUT = REPO / "benchmarks/results/cascade.json"
DEFAULT_DOCS = REPO / "docs/benchmarks.md"
METHODS = ("oneshot", "relax", "sgreedy", "greedy_mc", "degree", "betweenness", "pagerank", "eigen_drop", "random")


def timed(select: Callable[[], np.ndarray]) -> tuple[np.ndarray, float, float]:
    """``select()``'s result, wall seconds and CPU seconds of this process (one torch thread, so CPU
    time is the work done, less inflated by other processes' load): one call if it takes >= 1 s of
    wall time, else the medians of 5 calls."""
    wall: list[float] = []
    cpu: list[float] = []
    while not wall or (wall[0] < 1.0 and len(wall) < 5):
        began, began_cpu = time.perf_counter(), time.process_time()
        edges = select()
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return edges, float(np.median(wall)), float(np.median(cpu))


def trained_surrogate(graph_name: str, kind: str, smoke: bool, threshold: float | None = None) -> tuple[Any, ...]:
    """The case's graph, weights, seeds, the instance stream (after the training instances), the
    training instances, the fitted surrogate and its fit record (one torch thread)."""
    import torch

    from cleanse.graphs.generators import cascade_graph, choose_seeds, edge_probabilities
    from cleanse.graphs.surrogate import SpreadSurrogate, SurrogateConfig, fit_surrogate, make_instances

    torch.set_num_threads(1)
    g = cascade_graph(graph_name, n=300, m=2) if not smoke else cascade_graph("ba", n=80, m=2)
    w = edge_probabilities(g, "weighted_cascade")
    seeds = choose_seeds(g, 5 if not smoke else 2, "degree")
    gen = np.random.default_rng(0)
    train = make_instances(kind, g.edge_index, w, g.num_nodes, seeds, 48 if not smoke else 12, 300, gen, threshold=threshold)
    model = SpreadSurrogate(g.edge_index, w, g.num_nodes, SurrogateConfig(kind="monstor", epochs=15 if not smoke else 3))
    return g, w, seeds, gen, train, model, fit_surrogate(model, train)


def relax_passes(relax: Callable[[], Any]) -> tuple[int, int]:
    """The surrogate passes one ``relax()`` call makes, and how many of them are gradients (a forward
    and a backward pass; the rest are forward passes that score a rounded cut): the warm-start gradient,
    then the staged rounding's ``stages - 1`` gradients and one forward pass, then per Adam step a
    forward pass of its rounded cut and, unless it stops there, a gradient; counted by wrapping
    ``MonstorPass.spread`` and ``MonstorPass.spread_and_gradient``."""
    from cleanse.graphs.monstor_pass import MonstorPass

    forwards: list[int] = []
    gradients: list[int] = []
    spread, both = MonstorPass.spread, MonstorPass.spread_and_gradient
    MonstorPass.spread = lambda self, x: forwards.append(1) or spread(self, x)  # type: ignore[method-assign]
    MonstorPass.spread_and_gradient = lambda self, x: gradients.append(1) or both(self, x)  # type: ignore[method-assign]
    try:
        relax()
    finally:
        MonstorPass.spread, MonstorPass.spread_and_gradient = spread, both  # type: ignore[method-assign]
    return len(forwards) + len(gradients), len(gradients)


def run_case(graph_name: str, kind: str, fractions: list[float], smoke: bool,
             greedy_steps: int = 0, verify_runs: int = 10_000, threshold: float | None = None,
             skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``threshold``: LT with that fixed threshold for every node (deterministic: labels and verification
    are one cascade, and the reference is the exact re-simulating greedy ``greedy_fixed_threshold``).
    ``skip``: methods not run (their cells read "-"; greedy_mc, oneshot and relax cannot be skipped)."""
    from cleanse.graphs import selection as sel
    from cleanse.graphs.greedy_mc import greedy_fixed_threshold, greedy_mc
    from cleanse.graphs.surrogate import evaluate_surrogate, make_instances, near

    g, w, seeds, gen, train, model, record = trained_surrogate(graph_name, kind, smoke, threshold)
    ei, n = g.edge_index, g.num_nodes
    runs = verify_runs if not smoke else 1_000
    test = make_instances(kind, ei, w, n, seeds, 24 if not smoke else 4, 1200, gen, threshold=threshold)
    quality = evaluate_surrogate(model, test)
    t0 = time.perf_counter()
    base, base_se = sel.verify_spread(kind, ei, w, seeds, n, np.zeros(0, np.int64), runs=runs, seed=7, threshold=threshold)
    throughput = runs / (time.perf_counter() - t0) if threshold is None else None
    label = kind if threshold is None else f"{kind} theta={threshold:g}"
    out = []
    for fraction in fractions:
        b = max(1, int(round(fraction * g.num_edges)))
        picks: dict[str, tuple[np.ndarray, float, float]] = {}
        per_step = -(-b // greedy_steps) if greedy_steps else 1

        def select(method: str) -> np.ndarray:
            if method == "oneshot":
                score = sel.oneshot_scores(model, seeds)
            elif method == "relax":
                score = sel.relax_scores(model, seeds, b)
            elif method == "sgreedy":
                score = sel.surrogate_greedy_scores(model, seeds, b, per_step=max(1, b // 10))
            elif method == "greedy_mc" and threshold is not None:
                score = greedy_fixed_threshold(ei, w, seeds, n, b, threshold, candidates=near(ei, seeds, n, 1),
                                               per_step=per_step).score
            elif method == "greedy_mc":
                score = greedy_mc(kind, ei, w, seeds, n, b, worlds=500 if not smoke else 100,
                                  candidates=near(ei, seeds, n, 1), seed=3, per_step=per_step).score
            elif method == "degree":
                score = sel.degree_scores(ei, n)
            elif method == "betweenness":
                score = sel.betweenness_scores(ei, n)
            elif method == "pagerank":
                score = sel.pagerank_scores(ei, w, n)
            elif method == "eigen_drop":
                score = sel.eigen_scores(ei, w, n)
            else:
                score = np.random.default_rng(11).random(g.num_edges)
            if method in ("degree", "betweenness", "pagerank", "eigen_drop"):  # as the estimators: never into a seed
                score = np.where(np.isin(ei[1], seeds), score.min() - 1.0, score)
            return sel.top_edges(score, b)

        for method in METHODS:
            if method not in skip:
                picks[method] = timed(lambda: select(method))
        passes, gradients = relax_passes(lambda: sel.relax_scores(model, seeds, b))
        for method, (edges, seconds, cpu_seconds) in picks.items():
            spread, se = sel.verify_spread(kind, ei, w, seeds, n, edges, runs=runs, seed=7, threshold=threshold)
            out.append({"graph": g.name, "nodes": n, "edges": g.num_edges, "model": label, "fraction": fraction, "b": b,
                        **({"relax_passes": passes, "relax_gradients": gradients} if method == "relax" else {}),
                        "method": method, "spread": spread, "spread_se": se, "seconds": seconds,
                        "cpu_seconds": cpu_seconds,
                        "baseline": base, "baseline_se": base_se, "reduction": base - spread,
                        "greedy_per_step": per_step,
                        "surrogate": {**quality, "fit_seconds": record.seconds, "label_seconds": train.seconds},
                        "mc_cascades_per_s": throughput})
            print(f"{g.name} {label} b={b} {method}: {spread:.2f} +- {se:.2f} ({seconds:.4f} s, cpu {cpu_seconds:.4f} s)",
                  flush=True)
    return out


def run_scale(sizes: list[int]) -> list[dict[str, Any]]:
    """Selection and verification cost against the number of edges, on Barabasi-Albert graphs (m = 3,
    both directions: E ~ 6 n): one-shot seconds (one forward + backward of a MONSTOR-style surrogate;
    its weights do not change the cost, so it is not trained here), and Monte Carlo cascades per
    second (IC, weighted cascade, 5 seeds, 1,000 cascades)."""
    import torch

    from cleanse.graphs import selection as sel
    from cleanse.graphs.cascades import throughput
    from cleanse.graphs.generators import barabasi_albert, choose_seeds, edge_probabilities
    from cleanse.graphs.surrogate import SpreadSurrogate, SurrogateConfig

    torch.set_num_threads(1)
    rows = []
    for n in sizes:
        g = barabasi_albert(n, 3, seed=0)
        w = edge_probabilities(g, "weighted_cascade")
        seeds = choose_seeds(g, 5, "degree")
        model = SpreadSurrogate(g.edge_index, w, g.num_nodes, SurrogateConfig(kind="monstor"))
        _, oneshot, oneshot_cpu = timed(lambda: sel.top_edges(sel.oneshot_scores(model, seeds), max(1, g.num_edges // 100)))
        mask = np.zeros((1, g.num_nodes), dtype=bool)
        mask[0, seeds] = True
        rate = throughput("IC", g.edge_index, w, mask, n_runs=1000, num_nodes=g.num_nodes)
        rows.append({"nodes": g.num_nodes, "edges": g.num_edges, "oneshot_seconds": oneshot, "oneshot_cpu_seconds": oneshot_cpu,
                     "mc_cascades_per_s": rate})
        print(f"scale n={n} E={g.num_edges}: one-shot {oneshot:.2f} s, MC {rate:.0f} cascades/s", flush=True)
    return rows


def run_profile(graphs: list[str]) -> list[dict[str, Any]]:
    """Where the one-shot selection's CPU time goes, per graph (one torch thread; the surrogate's weights
    do not change the cost, so an untrained MONSTOR-style one): loading the graph, its probabilities,
    seeds and the surrogate (once, outside the timed selection), the neighbourhood alone (``layers``-hop
    search and relabelling), the numpy forward pass alone, the gradient (``oneshot_scores``: the
    neighbourhood, the numpy forward and backward on it, and the scatter back to float64 (E,)), the same
    with torch autograd instead of the numpy pass (the previous implementation, for the ratio in one
    process), the top-b cut (b = 2 %) and the whole selection as the table times it. Medians of 21 calls,
    CPU milliseconds."""
    import torch

    from cleanse.graphs import selection as sel
    from cleanse.graphs.generators import cascade_graph, choose_seeds, edge_probabilities
    from cleanse.graphs.monstor_pass import MonstorPass
    from cleanse.graphs.surrogate import SpreadSurrogate, SurrogateConfig

    torch.set_num_threads(1)

    def cpu_ms(call: Callable[[], Any]) -> float:
        times = []
        for _ in range(21):
            began = time.process_time()
            call()
            times.append(time.process_time() - began)
        return 1e3 * float(np.median(times))

    rows = []
    for name in graphs:
        began = time.process_time()
        g = cascade_graph(name, n=300, m=2)
        w = edge_probabilities(g, "weighted_cascade")
        seeds = choose_seeds(g, 5, "degree")
        model = SpreadSurrogate(g.edge_index, w, g.num_nodes, SurrogateConfig(kind="monstor")).eval()
        build = 1e3 * (time.process_time() - began)
        hood = model.neighbourhood(seeds)
        ones = np.ones(int(hood.edges.shape[0]))
        grad, b = sel.oneshot_scores(model, seeds), max(1, int(round(0.02 * g.num_edges)))

        def autograd() -> np.ndarray:
            local = model.neighbourhood(seeds)
            return sel._whole(local, sel.AutogradPass(model, local).spread_and_gradient(np.ones(local.edges.shape[0]))[1])

        rows.append({"graph": g.name, "nodes": g.num_nodes, "edges": g.num_edges, "build_ms": build,
                     "hood_nodes": int(hood.nodes.size), "hood_edges": int(hood.edges.shape[0]),
                     "neighbourhood_ms": cpu_ms(lambda: model.neighbourhood(seeds)),
                     "forward_ms": cpu_ms(lambda: MonstorPass.of(model, hood).spread(ones)),
                     "gradient_ms": cpu_ms(lambda: sel.oneshot_scores(model, seeds)),
                     "autograd_ms": cpu_ms(autograd),
                     "topk_ms": cpu_ms(lambda: sel.top_edges(grad, b)),
                     "oneshot_ms": cpu_ms(lambda: sel.top_edges(sel.oneshot_scores(model, seeds), b))})
        print(f"profile {g.name}: {rows[-1]}", flush=True)
    return rows


def run_passes(graphs: list[str], models: list[str], fractions: list[float]) -> list[dict[str, Any]]:
    """The relaxation's surrogate passes per case (forward or gradient passes), on the same trained
    surrogate as the table, counted as :func:`relax_passes` does (the table's rows record the same count
    for their own fit as ``relax_passes``)."""
    from cleanse.graphs import selection as sel

    rows = []
    for name in graphs:
        for kind in models:
            g, _, seeds, _, _, model, _ = trained_surrogate(name, kind, False)
            for fraction in fractions:
                b = max(1, int(round(fraction * g.num_edges)))
                rows.append({"graph": g.name, "model": kind, "b": b,
                             "passes": relax_passes(lambda: sel.relax_scores(model, seeds, b))[0]})
            print(f"passes {g.name} {kind}: {[r['passes'] for r in rows[-len(fractions):]]}", flush=True)
    return rows


def linear_fit(scale: list[dict[str, Any]]) -> str:
    """The least-squares line of one-shot CPU seconds against edges, and its R^2 (a sentence)."""
    rows = [r for r in scale if r.get("oneshot_cpu_seconds") is not None]
    if len(rows) < 3:
        return "Fewer than 3 sizes: no linear fit."
    edges = np.array([r["edges"] for r in rows], dtype=np.float64)
    cpu = np.array([r["oneshot_cpu_seconds"] for r in rows])
    slope, intercept = np.polyfit(edges, cpu, 1)
    r2 = 1 - ((cpu - (slope * edges + intercept)) ** 2).sum() / ((cpu - cpu.mean()) ** 2).sum()
    return (f"One-shot CPU seconds = {intercept:.4f} + {slope * 1e6:.3f} x (edges / 1M), R^2 = {r2:.4f} over "
            f"{len(rows)} sizes (least squares; the log-log slope is "
            f"{np.polyfit(np.log(edges), np.log(cpu), 1)[0]:.2f}, 1 = linear).")


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (graph, model, b): oneshot's and relax's reduction as a share of greedy_mc's, and speed-ups."""
    rows = []
    keys = sorted({(r["graph"], r["model"], r["b"]) for r in runs})
    for graph, kind, b in keys:
        case = {r["method"]: r for r in runs if (r["graph"], r["model"], r["b"]) == (graph, kind, b)}
        greedy = case["greedy_mc"]
        rows.append({"graph": graph, "model": kind, "b": b, "fraction": greedy["fraction"],
                     "relax_passes": case["relax"].get("relax_passes"),
                     "relax_gradients": case["relax"].get("relax_gradients"),
                     **{f"{m}_share": case[m]["reduction"] / greedy["reduction"] if greedy["reduction"] > 0 else None
                        for m in ("oneshot", "relax", "sgreedy") if m in case},
                     **{f"{m}_speedup": greedy["seconds"] / max(case[m]["seconds"], 1e-9)
                        for m in ("oneshot", "relax", "sgreedy") if m in case},
                     **{f"{m}_cpu_speedup": greedy["cpu_seconds"] / max(case[m]["cpu_seconds"], 1e-9)
                        for m in ("oneshot", "relax", "sgreedy") if "cpu_seconds" in greedy and m in case}})
    return rows


def plot(result: dict[str, Any], image: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cleanse.storage import write_bytes

    cases = sorted({(r["graph"], r["model"]) for r in result["runs"]})
    columns = min(4, len(cases))
    rows = -(-len(cases) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for axis in axes.flat[len(cases):]:
        axis.axis("off")
    for axis, (graph, kind) in zip(axes.flat, cases):
        for method in METHODS:
            points = [r for r in result["runs"] if (r["graph"], r["model"], r["method"]) == (graph, kind, method)]
            axis.scatter([max(r["seconds"], 1e-4) for r in points], [r["reduction"] for r in points], label=method, s=18)
        axis.set_xscale("log")
        axis.set_title(f"{graph} {kind} (b = 1, 2, 5 % of edges)")
        axis.set_xlabel("selection seconds")
        axis.set_ylabel("spread reduction (fresh MC)")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes(buffer.getvalue(), image)


def measured_at(result: dict[str, Any]) -> str:
    """Where the rows were measured: their recorded commits and the range of load averages at the start
    of their processes (merged results mix processes; the result's own environment is the last one's)."""
    env = result.get("environment", {})
    at = [r.get("measured_at") or {} for r in result["runs"]]
    commits = sorted({a["git_commit"][:7] + ("-dirty" if a["git_commit"].endswith("-dirty") else "")
                      for a in at if a.get("git_commit")}) or [str(env.get("git_commit", "?"))]
    loads = [a["load_average_start"][0] for a in at if a.get("load_average_start")] or \
        [env.get("load_average_start", [float("nan")])[0]]
    return (f"Measured at {', '.join(commits)} on {env.get('cpu_count', '?')} CPUs, load average at the start of the "
            f"processes {min(loads):.1f}-{max(loads):.1f}.")


def render(result: dict[str, Any], docs: Path, out: Path, image: Path) -> str:
    lines = ["## Influence minimisation (DiffIM)", "",
             "`python benchmarks/cascade.py` (library calls, one torch thread; every spread verified by 10,000 fresh "
             "Monte Carlo cascades on one stream shared by all methods, never by the surrogate). 5 seeds of highest "
             "out-degree, weighted-cascade weights, b = 1/2/5 % of the directed edges; `seconds` = the selection only "
             "(the surrogate's training is listed apart): one call when it takes >= 1 s (greedy MC), else the median of "
             "5; CPU = this process's CPU seconds (one thread), less inflated than wall time by the shared machine's "
             "load. " + measured_at(result), ""]
    headers = ["graph", "model", "b", "baseline", *METHODS]
    table = []
    for graph, kind, b in sorted({(r["graph"], r["model"], r["b"]) for r in result["runs"]}):
        case = {r["method"]: r for r in result["runs"] if (r["graph"], r["model"], r["b"]) == (graph, kind, b)}
        table.append([graph, kind, b, fmt(next(iter(case.values()))["baseline"], 1),
                      *[f"{fmt(case[m]['spread'], 1)} ({fmt(case[m]['seconds'], 3)} s)" if m in case else "-"
                        for m in METHODS]])
    lines += ["Spread after the cuts (selection seconds):", "", md_table(headers, table), ""]
    s_headers = ["graph", "model", "b", "greedy cuts/step", "oneshot / greedy reduction", "speed-up wall (CPU)",
                 "relax / greedy", "speed-up wall (CPU)", "relax passes (gradients)", "sgreedy / greedy", "speed-up wall (CPU)"]

    def speedup(row: dict[str, Any], method: str) -> str:
        cpu = row.get(f"{method}_cpu_speedup")
        if f"{method}_speedup" not in row:
            return "-"

        def times(value: float) -> str:
            return fmt(value, 0 if value >= 10 else 1)

        return times(row[f"{method}_speedup"]) + ("" if cpu is None else f" ({times(cpu)})")

    def relax_cost(row: dict[str, Any]) -> str:  # rows before the staged rounding counted 1 + forward passes
        if row.get("relax_gradients") is None:
            return fmt(row.get("relax_passes"), 0) + " (1 + steps)"
        return f"{fmt(row['relax_passes'], 0)} ({fmt(row['relax_gradients'], 0)} grad)"

    per_step = {(r["graph"], r["model"], r["b"]): r.get("greedy_per_step", 1) for r in result["runs"]}
    s_rows = [[r["graph"], r["model"], r["b"], per_step[(r["graph"], r["model"], r["b"])],
               *[item for m in ("oneshot", "relax", "sgreedy") for item in [fmt(r.get(f"{m}_share")), speedup(r, m)]
                 + ([relax_cost(r)] if m == "relax" else [])]]
              for r in result["summary"]]
    lines += ["Against greedy Monte Carlo (targets of issue 20: one-shot >= 0.9 of its reduction at >= 1,000x its "
              "speed; relaxation >= 1.0 at >= 100x):", "", md_table(s_headers, s_rows), ""]
    surrogate = {}
    for r in result["runs"]:
        load = (r.get("measured_at") or {}).get("load_average_start") or result.get("environment", {}).get("load_average_start")
        surrogate[(r["graph"], r["model"])] = (r["surrogate"], r["mc_cascades_per_s"], load[0] if load else None)
    lines += ["Surrogate on held-out perturbed instances (MAE against Monte Carlo), MC throughput (wall) and the "
              "machine's load average when that graph's run started:", "",
              md_table(["graph", "model", "node MAE", "spread MAE", "mean spread", "fit s", "labels s", "MC cascades/s",
                        "load"],
                       [[g, k, fmt(q["node_mae"], 4), fmt(q["spread_mae"]), fmt(q["mean_spread"], 1), fmt(q["fit_seconds"], 1),
                         fmt(q["label_seconds"], 1), fmt(t, 0), fmt(load, 1)]
                        for (g, k), (q, t, load) in sorted(surrogate.items())]), ""]
    if result.get("scale"):
        lines += ["Scale (Barabasi-Albert, m = 3; one-shot = one forward and backward pass plus the top-1% cut; "
                  "`--scale`):", "",
                  md_table(["nodes", "edges", "one-shot s", "one-shot CPU s", "MC cascades/s"],
                           [[fmt(r["nodes"], 0), fmt(r["edges"], 0), fmt(r["oneshot_seconds"], 3),
                             fmt(r.get("oneshot_cpu_seconds"), 3), fmt(r["mc_cascades_per_s"], 0)]
                            for r in result["scale"]]), ""]
        lines += [linear_fit(result["scale"]), ""]
    if result.get("profile"):
        lines += ["Where one-shot's CPU time goes (`--profile`; medians of 21 calls, one thread, CPU ms; build = loading "
                  "the graph and making the surrogate, once per graph, outside the timed selection):", "",
                  md_table(["graph", "nodes", "edges", "neighbourhood nodes / edges", "build", "neighbourhood",
                            "forward", "gradient (fwd + bwd)", "same by autograd", "top-b", "one-shot"],
                           [[r["graph"], fmt(r["nodes"], 0), fmt(r["edges"], 0),
                             f"{fmt(r.get('hood_nodes'), 0)} / {fmt(r.get('hood_edges'), 0)}", fmt(r["build_ms"], 1),
                             fmt(r.get("neighbourhood_ms"), 3), fmt(r["forward_ms"], 2), fmt(r["gradient_ms"], 2),
                             fmt(r.get("autograd_ms"), 2), fmt(r["topk_ms"], 3), fmt(r["oneshot_ms"], 2)]
                            for r in result["profile"]]), ""]
    if result.get("relax_passes"):
        lines += ["Relaxation passes of the surrogate (`--passes`; forward or gradient passes): "
                  + "; ".join(f"{r['graph']} {r['model']} b={r['b']}: {r['passes']}" for r in result["relax_passes"])
                  + ".", ""]
    lines += [f"![Pareto]({image.relative_to(docs.parent).as_posix()})", ""]
    lines += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    output_arguments(parser, DEFAULT_OUT, DEFAULT_DOCS)
    parser.add_argument("--graphs", nargs="+", default=["jazz"])
    parser.add_argument("--models", nargs="+", default=["IC", "LT"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.02, 0.05])
    parser.add_argument("--greedy-steps", type=int, default=0, help="greedy MC in this many steps of ceil(b / steps) "
                        "cuts (0: plain greedy, one cut per step; for the larger graphs)")
    parser.add_argument("--runs", type=int, default=10_000, help="verification cascades per removal")
    parser.add_argument("--skip", nargs="+", default=[], choices=["sgreedy", "betweenness"],
                        help="methods not run (for the largest graph: surrogate greedy took 21 of its 28 minutes)")
    parser.add_argument("--merge", action="store_true", help="replace these graphs' rows in --out, keep the others")
    parser.add_argument("--smoke", action="store_true", help="a BA graph of 80 nodes, few runs (the test)")
    parser.add_argument("--scale", nargs="*", type=int, help="only the scale part, on BA graphs of these node counts, "
                        "merged into --out (default 1700 17000 170000: about 10k, 100k and 1M edges)")
    parser.add_argument("--profile", nargs="*", help="only the one-shot cost profile, on these graphs, merged into "
                        "--out (default jazz email_eu_core power_grid)")
    parser.add_argument("--threshold", type=float, help="LT with this fixed threshold for every node (only with "
                        "--models LT; deterministic, verified by one cascade, reference: the exact re-simulating greedy)")
    parser.add_argument("--combine", nargs="+", help="merge the runs of these result files (a later file's "
                        "graph and model replace an earlier one's) into --out, keeping its profile and scale; --note "
                        "replaces its notes")
    parser.add_argument("--passes", action="store_true", help="only the relaxation's pass counts for --graphs x "
                        "--models x --fractions, merged into --out")
    args = parser.parse_args()
    if args.passes:
        import json

        result = json.loads(Path(args.out).read_text())
        result["relax_passes"] = run_passes(args.graphs, args.models, args.fractions)
        publish(result, args.out, None if args.no_docs else args.docs, SECTION, plot, render)
        return
    if args.profile is not None:
        import json

        result = json.loads(Path(args.out).read_text())
        result["profile"] = run_profile(args.profile or ["jazz", "email_eu_core", "power_grid"])
        publish(result, args.out, None if args.no_docs else args.docs, SECTION, plot, render)
        return
    if args.scale is not None:
        import json

        result = json.loads(Path(args.out).read_text())
        result["scale"] = run_scale(args.scale or [1700, 17000, 170000])
        publish(result, args.out, None if args.no_docs else args.docs, SECTION, plot, render)
        return
    if args.combine:
        import json

        result = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        merged: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for name in args.combine:
            rows = json.loads(Path(name).read_text())["runs"]
            for key in {(r["graph"], r["model"]) for r in rows}:
                merged[key] = [r for r in rows if (r["graph"], r["model"]) == key]
        result["runs"] = [row for rows in merged.values() for row in rows]
        result["summary"] = summarise(result["runs"])
        result["notes"] = args.note or result.get("notes", [])  # the notes describe these runs: replaced
        if all("relax_passes" in r for r in result["runs"] if r["method"] == "relax"):
            result.pop("relax_passes", None)  # each row carries its own count, for its own fit
        publish(result, args.out, None if args.no_docs else args.docs, SECTION, plot, render)
        return
    if args.render_only:
        render_saved(args, SECTION, summarise, plot, render, append_notes=False)
        return
    runs = [row for graph in args.graphs for kind in args.models
            for row in run_case(graph, kind, args.fractions, args.smoke, args.greedy_steps, args.runs,
                                args.threshold, tuple(args.skip))]
    env = environment(1)
    for row in runs:  # each row says where and under which load it was measured (merged results mix runs)
        row["measured_at"] = {"git_commit": env.get("git_commit"), "load_average_start": env.get("load_average_start")}
    result = {"runs": runs, "environment": env, "notes": args.note}
    if args.merge:
        import json

        saved = json.loads(Path(args.out).read_text())
        kept = [r for r in saved["runs"] if (r["graph"], r["model"]) not in {(row["graph"], row["model"]) for row in runs}]
        result = {**saved, "runs": kept + runs, "notes": saved.get("notes", []) + args.note}
    result["summary"] = summarise(result["runs"])
    publish(result, args.out, None if args.no_docs else args.docs, SECTION, plot, render)


if __name__ == "__main__":
    main()

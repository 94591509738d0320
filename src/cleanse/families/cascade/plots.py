"""The cascade family's report figures: spread against selection time per method (the Pareto plot
of DiffIM's comparison), every spread verified by fresh Monte Carlo, baseline and random as lines;
and, for small graphs, a drawing with the edges cut by the best method marked."""

from __future__ import annotations

import io
from typing import Any

from cleanse.config import Params
from cleanse.storage import Layout, write_bytes


def write_cascade_plots(params: Params, layout: Layout, metrics: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for name, entry in metrics["estimators"].items():
        spread = entry.get("spread", entry["retrain"]["spread"])
        seconds = max(float(entry["seconds"]), 1e-4)
        axis.errorbar([seconds], [spread], yerr=[entry.get("spread_se", 0.0)], fmt="o", capsize=3)
        axis.annotate(name, (seconds, spread), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for key, style in (("baseline", "k--"), ("random", "r:"), ("oracle", "g-.")):
        if key in metrics:
            axis.axhline(metrics[key]["spread"], linestyle=style[1:], color=style[0], label=f"{key} {metrics[key]['spread']:.1f}")
    axis.set_xscale("log")
    axis.set_xlabel("selection seconds (log)")
    axis.set_ylabel("expected spread (fresh Monte Carlo)")
    axis.set_title(f"{metrics['dataset']['name']}: {metrics['dataset']['n_corrupted']} edges cut")
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes(buffer.getvalue(), layout.reports / "pareto.png")
    drawn = _draw_removed(params, layout, metrics)
    return ["pareto.png", *drawn]


DRAW_MAX_NODES = 400


def _draw_removed(params: Params, layout: Layout, metrics: dict[str, Any]) -> list[str]:
    """Small graphs (<= :data:`DRAW_MAX_NODES` nodes): the graph (spring layout, seeded) with the
    seeds in red and the edges cut by the method with the lowest verified spread drawn thick."""
    import matplotlib.pyplot as plt
    import networkx as nx
    import numpy as np

    from cleanse.families.cascade.data import graph_arrays
    from cleanse.pipeline import load_staged

    ei, _, seeds, n = graph_arrays(load_staged(layout, params).meta)
    if n > DRAW_MAX_NODES or not metrics["estimators"]:
        return []
    best = min(metrics["estimators"], key=lambda name: metrics["estimators"][name]["spread"])
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(zip(ei[0].tolist(), ei[1].tolist()))
    pos = nx.spring_layout(g, seed=params.seed)
    figure, axis = plt.subplots(figsize=(7, 7))
    nx.draw_networkx_edges(g, pos, ax=axis, width=0.3, alpha=0.25, edge_color="grey")
    cut = [tuple(edge) for edge in metrics["estimators"][best]["removed"]]
    nx.draw_networkx_edges(nx.DiGraph(cut), pos, ax=axis, width=1.6, edge_color="tab:orange", arrows=True, arrowsize=6)
    colours = np.where(np.isin(np.arange(n), seeds), "tab:red", "tab:blue")
    nx.draw_networkx_nodes(g, pos, ax=axis, node_size=14, node_color=colours.tolist())
    entry = metrics["estimators"][best]
    axis.set_title(f"{best}: {len(cut)} edges cut (orange), seeds red; spread {metrics['baseline']['spread']:.1f} -> "
                   f"{entry['spread']:.1f}", fontsize=9)
    axis.set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes(buffer.getvalue(), layout.reports / "removed_edges.png")
    return ["removed_edges.png"]

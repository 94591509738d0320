"""The graph family's report figures (its ``flagged_plots``, called by
:func:`cleanse.report_plots.write_plots`), under ``reports/``:

- ``flagged/<estimator>.csv``: the 50 highest-ranked training nodes (node id, score, given and
  predicted label, flipped or not, degree);
- ``flagged/<estimator>.png`` (graphs of at most :data:`MAX_DRAWN` nodes): the graph drawn with a
  seeded spring layout, nodes coloured by their clean class, the estimator's flagged nodes ringed
  (red = flipped label, black = clean), the other flipped nodes marked with a red cross.

matplotlib is imported inside the functions (Agg backend, set by the caller).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from cleanse.storage import read_table, write_bytes, write_text

MAX_DRAWN = 600  # a spring layout of more nodes is neither quick nor readable


def _png(figure: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def write_flagged(params: Any, layout: Any, metrics: dict[str, Any]) -> list[str]:
    """Writes the files above; returns the PNG paths (relative to ``reports/``)."""
    import matplotlib.pyplot as plt
    import networkx as nx

    from cleanse.families.graph.data import graph_tensors
    from cleanse.families.graph.models import predicted_labels
    from cleanse.pipeline import load_model, load_staged

    staged = load_staged(layout, params)
    x, edge_index = graph_tensors(staged.meta)
    model = load_model(layout.base_model).bind(x, edge_index)
    predicted = predicted_labels(model)
    num_nodes = int(x.shape[0])
    degree = np.bincount(edge_index[1].numpy(), minlength=num_nodes)
    train = staged.train
    row_of = {int(sid): i for i, sid in enumerate(train.sample_id.tolist())}
    names = [name for name in metrics["estimators"] if layout.flags(name).is_file()]
    flagged: dict[str, list[int]] = {}
    for name in names:
        flags = read_table(layout.flags(name))
        chosen = flags.filter(pl.col("is_flagged")) if "is_flagged" in flags.columns else flags
        nodes = [int(sid) for sid in chosen["sample_id"].to_list()]
        flagged[name] = nodes
        top = flags.head(50)
        rows = [row_of[int(sid)] for sid in top["sample_id"].to_list()]
        top = top.with_columns(pl.Series("given_label", train.label[rows]),
                               pl.Series("predicted_label", predicted[train.sample_id[rows]]),
                               pl.Series("is_corrupted", train.is_corrupted[rows]),
                               pl.Series("degree", degree[train.sample_id[rows]]))
        write_text(top.write_csv(), layout.reports / "flagged" / f"{name}.csv")
    if num_nodes > MAX_DRAWN or not names:
        return []
    graph = nx.Graph()
    graph.add_nodes_from(range(num_nodes))
    graph.add_edges_from(edge_index.T.tolist())
    position = nx.spring_layout(graph, seed=params.seed)
    xy = np.array([position[node] for node in range(num_nodes)])
    clean = np.full(num_nodes, -1)
    for split in (staged.train, staged.val, staged.test):
        clean[split.sample_id] = split.label_clean
    corrupted = set(train.sample_id[train.is_corrupted].tolist())
    written = []
    for name in names:
        figure, axis = plt.subplots(figsize=(7, 7))
        segments = xy[edge_index.numpy()].transpose(1, 0, 2)
        from matplotlib.collections import LineCollection

        axis.add_collection(LineCollection(segments, colors="0.8", linewidths=0.4, zorder=0))
        axis.scatter(xy[:, 0], xy[:, 1], c=clean, cmap="tab10", s=18, zorder=1, vmin=-1, vmax=9)
        hits = [node for node in flagged[name] if node in corrupted]
        misses = [node for node in flagged[name] if node not in corrupted]
        unseen = sorted(corrupted - set(flagged[name]))
        for nodes, colour, label in ((hits, "red", "flagged, flipped"), (misses, "black", "flagged, clean")):
            if nodes:
                axis.scatter(xy[nodes, 0], xy[nodes, 1], s=90, facecolors="none", edgecolors=colour, linewidths=1.4,
                             zorder=2, label=f"{label} ({len(nodes)})")
        if unseen:
            axis.scatter(xy[unseen, 0], xy[unseen, 1], marker="x", c="red", s=40, zorder=3,
                         label=f"flipped, not flagged ({len(unseen)})")
        axis.legend(loc="upper right", fontsize=8)
        axis.set_title(f"{staged.meta.name}: nodes flagged by {name} (colour = clean class)", fontsize=9)
        axis.axis("off")
        write_bytes(_png(figure), layout.reports / "flagged" / f"{name}.png")
        written.append(f"flagged/{name}.png")
        plt.close(figure)
    return written

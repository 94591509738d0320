"""The cascade family's report figure: spread against selection time per method (the Pareto plot
of DiffIM's comparison), every spread verified by fresh Monte Carlo; baseline and random as lines."""

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
    return ["pareto.png"]

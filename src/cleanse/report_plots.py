"""The report's figures: precision-recall curves, score histograms (corrupted vs clean), the top
flagged samples per estimator, probes next to their top proponents, and the iterative cleansing
rounds. Written under ``reports/`` by :func:`cleanse.report.run_report`; matplotlib is imported
inside the functions (Agg backend), so importing this module costs nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from cleanse.config import Params
from cleanse.data.dataset import Split
from cleanse.storage import Layout, read_table, write_bytes, write_text


def _png(figure: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def write_plots(params: Params, layout: Layout, metrics: dict[str, Any]) -> list[str]:
    """PR curves, score histograms (corrupted vs clean) and a grid of the top flagged samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cleanse.evaluate import pr_curve
    from cleanse.pipeline import load_staged

    staged = load_staged(layout, params)
    truth = dict(zip(staged.train.sample_id.tolist(), staged.train.is_corrupted.tolist()))
    written: list[str] = []
    has_truth = 0 < metrics["dataset"]["n_corrupted"] < metrics["dataset"]["n_train"]
    names = list(metrics["estimators"])
    pr_figure, pr_axis = plt.subplots(figsize=(5.5, 4.5))
    hist_figure, hist_axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for axis, name in zip(hist_axes[0], names):
        scores = read_table(layout.scores(name))
        score = scores["score"].to_numpy()
        is_corrupted = np.array([truth[i] for i in scores["sample_id"].to_list()], dtype=bool)
        if has_truth:
            precision, recall = pr_curve(score, is_corrupted)
            pr_axis.plot(recall, precision, label=f"{name} (AP {metrics['estimators'][name]['detection']['average_precision']:.2f})")
            write_text(pl.DataFrame({"recall": recall, "precision": precision}).write_csv(),
                       layout.reports / "pr" / f"{name}.csv")
            ranked = np.argsort(np.argsort(-score))
            bins = np.linspace(0, 1, 31)
            quantile = ranked / max(len(score) - 1, 1)
            axis.hist(quantile[~is_corrupted], bins=bins, alpha=0.6, label="clean", color="tab:blue")
            axis.hist(quantile[is_corrupted], bins=bins, alpha=0.6, label="corrupted", color="tab:red")
            axis.set_xlabel("score rank (0 = most harmful)")
        else:
            axis.hist(score, bins=30, color="tab:blue")
            axis.set_xlabel("score")
        axis.set_title(name)
    hist_axes[0][0].legend(fontsize=7)
    if not has_truth:
        for name in names:
            write_text("recall,precision\n", layout.reports / "pr" / f"{name}.csv")
        pr_axis.text(0.5, 0.5, "no ground truth: PR curves need injected corruption", ha="center", va="center")
        pr_axis.set_axis_off()
        write_bytes(_png(pr_figure), layout.reports / "pr_curves.png")
        written.append("pr_curves.png")
    else:
        pr_axis.axhline(metrics["dataset"]["n_corrupted"] / metrics["dataset"]["n_train"], color="grey", ls=":", label="chance")
        pr_axis.set_xlabel("recall")
        pr_axis.set_ylabel("precision")
        pr_axis.set_title("Finding the corrupted samples")
        pr_axis.legend(fontsize=7)
        write_bytes(_png(pr_figure), layout.reports / "pr_curves.png")
        written.append("pr_curves.png")
    write_bytes(_png(hist_figure), layout.reports / "score_histograms.png")
    written.append("score_histograms.png")
    plt.close("all")
    from cleanse import families
    from cleanse.stages.graph import _resolve

    written += _resolve(families.get(params.family).flagged_plots)(params, layout, metrics)
    written += write_probe_plots(params, layout, metrics)
    return written


def write_flagged(params: Params, layout: Layout, metrics: dict[str, Any]) -> list[str]:
    """The top flagged samples per estimator: ``flagged/<estimator>.csv`` (given and predicted
    labels) and, for images, a grid ``flagged/<estimator>.png``."""
    import matplotlib.pyplot as plt

    from cleanse.models.trainer import predict_proba
    from cleanse.pipeline import load_model, load_staged

    staged = load_staged(layout, params)
    names = list(metrics["estimators"])
    written: list[str] = []
    module = load_model(layout.base_model).module()
    predicted = predict_proba(module, staged.train.features).argmax(1)
    index = {sid: i for i, sid in enumerate(staged.train.sample_id.tolist())}
    for name in names:
        flags = read_table(layout.flags(name)).head(50)
        rows = [index[sid] for sid in flags["sample_id"].to_list()]
        top = flags.with_columns(
            pl.Series("given_label", staged.train.label[rows]),
            pl.Series("predicted_label", predicted[rows]),
            pl.Series("is_corrupted", staged.train.is_corrupted[rows]),
        )
        write_text(top.write_csv(), layout.reports / "flagged" / f"{name}.csv")
    if staged.meta.is_image:
        for name in names:
            flags = read_table(layout.flags(name)).head(24)
            rows = [index[sid] for sid in flags["sample_id"].to_list()]
            columns = 8
            figure, axes = plt.subplots((len(rows) + columns - 1) // columns, columns, figsize=(columns * 1.3, 1.6 * ((len(rows) + columns - 1) // columns)), squeeze=False)
            for axis in axes.ravel():
                axis.axis("off")
            for axis, row in zip(axes.ravel(), rows):
                image = staged.train.features[row]
                axis.imshow(image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1), cmap="gray")
                colour = "red" if staged.train.is_corrupted[row] else "black"
                axis.set_title(f"given {staged.train.label[row]} pred {predicted[row]}", fontsize=7, color=colour)
            figure.suptitle(f"{name}: top flagged (red = known corrupted)", fontsize=9)
            write_bytes(_png(figure), layout.reports / "flagged" / f"{name}.png")
            written.append(f"flagged/{name}.png")
            plt.close(figure)
    return written


def write_probe_plots(params: Params, layout: Layout, metrics: dict[str, Any], *, top: int = 6) -> list[str]:
    """Probes next to their top proponents (images; a CSV for any data), and ASR / held-out behaviour
    against the cleansing rounds."""
    import matplotlib.pyplot as plt

    from cleanse.attribution import top_proponents
    from cleanse.pipeline import load_staged, pairwise_path, query_dir

    written: list[str] = []
    probes_path = query_dir(layout) / "probes.parquet"
    if params.query.kind == "none" or not probes_path.is_file():
        return written
    staged = load_staged(layout, params)
    probes = Split.from_frame(read_table(probes_path), staged.meta.feature_shape)
    index = {sid: i for i, sid in enumerate(staged.train.sample_id.tolist())}
    for name in metrics["estimators"]:
        path = pairwise_path(layout, name)
        matrix = np.load(path, mmap_mode="r") if path.is_file() else np.zeros((0, 0))
        if matrix.shape[0] == 0:  # self-scored: no train -> probe matrix
            continue
        ids = top_proponents(matrix, staged.train.sample_id, top)
        rows = [{"probe": q, "probe_label": int(probes.label[q]), "rank": r + 1, "sample_id": int(sid),
                 "given_label": int(staged.train.label[index[sid]]), "support": float(matrix[q, index[sid]]),
                 "is_corrupted": bool(staged.train.is_corrupted[index[sid]])}
                for q in range(ids.shape[0]) for r, sid in enumerate(ids[q])]
        write_text(pl.DataFrame(rows).write_csv(), layout.reports / "probes" / f"{name}.csv")
        if not staged.meta.is_image:
            continue
        figure, axes = plt.subplots(ids.shape[0], top + 1, figsize=(1.2 * (top + 1), 1.35 * ids.shape[0]), squeeze=False)
        for q in range(ids.shape[0]):
            images = [(probes.features[q], f"probe -> {probes.label[q]}", "blue")]
            images += [(staged.train.features[index[sid]], f"given {staged.train.label[index[sid]]}",
                        "red" if staged.train.is_corrupted[index[sid]] else "black") for sid in ids[q]]
            for axis, (image, title, colour) in zip(axes[q], images):
                axis.imshow(image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1), cmap="gray")
                axis.set_title(title, fontsize=6, color=colour)
                axis.axis("off")
        figure.suptitle(f"{name}: probes (left) and their top proponents (red = known corrupted)", fontsize=8)
        write_bytes(_png(figure), layout.reports / "probes" / f"{name}.png")
        written.append(f"probes/{name}.png")
        plt.close(figure)
    looped = {name: result["cleansing"]["rounds"] for name, result in metrics["estimators"].items() if "cleansing" in result}
    if looped:
        figure, axis = plt.subplots(figsize=(5.5, 3.8))
        for name, rounds in looped.items():
            removed = [r["n_removed"] for r in rounds]
            if "attack_success_rate" in rounds[0]:
                axis.plot(removed, [r["attack_success_rate"] for r in rounds], marker="o", label=f"{name}: ASR (test)")
            axis.plot(removed, [r["heldout_behaviour_rate"] for r in rounds], marker="x", ls="--",
                      label=f"{name}: held-out probes")
        axis.set_xlabel("training samples removed (one marker per round)")
        axis.set_ylabel("share showing the behaviour")
        axis.set_ylim(-0.02, 1.02)
        axis.legend(fontsize=7)
        axis.set_title("Iterative cleansing")
        write_bytes(_png(figure), layout.reports / "cleansing_rounds.png")
        written.append("cleansing_rounds.png")
        plt.close(figure)
    return written

"""The GAN family's report figures (the family's ``flagged_plots``, called by
:func:`cleanse.report_plots.write_plots`), under ``reports/``:

- ``flagged/<estimator>.csv``: the 50 most harmful training instances (score, rank, planted or not;
  the point's coordinates for 2-D data);
- ``flagged/<estimator>.png``: 2-D data: a scatter of the training set with the estimator's flagged
  instances circled and the planted outliers marked; images: a grid of the 24 most harmful;
- ``samples/<estimator>.png``: generated samples before (the base GAN) and after cleansing (the
  traced window replayed without the estimator's flags, as the retrain stage verifies), on the
  same fixed latents; for 2-D data over the real test points.

matplotlib is imported inside the functions (Agg backend, set by the caller).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import torch

from cleanse.storage import read_table, write_bytes, write_text

GRID = 32  # generated images per grid


def _png(figure: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _image(axis: Any, image: np.ndarray) -> None:
    shown = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    axis.imshow(np.clip((shown + 1) / 2, 0, 1), cmap="gray", vmin=0, vmax=1)
    axis.axis("off")


def _generated(base: Any, g_state: dict[str, torch.Tensor], count: int) -> np.ndarray:
    """``count`` samples ``(count, *data_shape)`` of G with ``g_state`` on the metrics' fixed latents."""
    from cleanse.families.gan.metrics import fixed_latents
    from cleanse.families.gan.nets import build_generator, load_module

    spec = base.trained.spec
    z = fixed_latents(base.seed, count, spec.z_dim, spec.torch_dtype)
    with torch.no_grad():
        return load_module(build_generator(spec), g_state)(z).double().numpy()


def _cleaned_generator(base: Any, staged: Any, flagged: np.ndarray) -> dict[str, torch.Tensor]:
    from cleanse import families

    return dict(families.get("gan").replay_without(base, staged, flagged).trained.g_state)


def write_gan_plots(params: Any, layout: Any, metrics: dict[str, Any]) -> list[str]:
    """Every figure and table of the module docstring; returns the written paths under ``reports/``."""
    import matplotlib.pyplot as plt

    from cleanse import families
    from cleanse.pipeline import load_staged

    staged = load_staged(layout, params)
    base = families.get("gan").load_model(layout.base_model)
    train = staged.train
    index = {sid: i for i, sid in enumerate(train.sample_id.tolist())}
    image = staged.meta.is_image
    written: list[str] = []
    before = _generated(base, base.trained.g_state, GRID if image else 1000)
    for name in metrics["estimators"]:
        flags = read_table(layout.flags(name))
        rows = np.array([index[sid] for sid in flags["sample_id"].to_list()], dtype=np.int64)
        top = flags.head(50).with_columns(pl.Series("is_corrupted", train.is_corrupted[rows[:50]]))
        if not image:
            top = top.with_columns(pl.Series("x0", train.features[rows[:50], 0].astype(np.float64)),
                                   pl.Series("x1", train.features[rows[:50], 1].astype(np.float64)))
        write_text(top.write_csv(), layout.reports / "flagged" / f"{name}.csv")
        flagged_rows = rows[flags["is_flagged"].to_numpy()]
        after = _generated(base, _cleaned_generator(base, staged, train.sample_id[flagged_rows]), before.shape[0])
        if image:
            figure = _image_grid(plt, train.features[rows[:24]], train.is_corrupted[rows[:24]],
                                 f"{name}: the 24 most harmful training images (red = planted outlier)")
        else:
            figure = _scatter(plt, train.features, train.is_corrupted, flagged_rows,
                              f"{name}: flagged training points ({flagged_rows.size})")
        write_bytes(_png(figure), layout.reports / "flagged" / f"{name}.png")
        plt.close(figure)
        figure = _before_after(plt, before, after, staged.test.features, image,
                               f"{name}: samples before / after removing its {flagged_rows.size} flags (replay)")
        write_bytes(_png(figure), layout.reports / "samples" / f"{name}.png")
        plt.close(figure)
        written += [f"flagged/{name}.png", f"samples/{name}.png"]
    return written


def _image_grid(plt: Any, images: np.ndarray, planted: np.ndarray, title: str) -> Any:
    columns = 8
    n_rows = max(1, (len(images) + columns - 1) // columns)
    figure, axes = plt.subplots(n_rows, columns, figsize=(columns * 1.1, 1.2 * n_rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, picture, red in zip(axes.ravel(), images, planted):
        _image(axis, picture)
        if red:
            axis.set_title("planted", fontsize=6, color="red")
    figure.suptitle(title, fontsize=9)
    return figure


def _scatter(plt: Any, points: np.ndarray, planted: np.ndarray, flagged: np.ndarray, title: str) -> Any:
    figure, axis = plt.subplots(figsize=(5.0, 4.5))
    axis.scatter(points[~planted, 0], points[~planted, 1], s=4, color="tab:blue", alpha=0.4, label="training")
    axis.scatter(points[planted, 0], points[planted, 1], s=10, color="tab:red", marker="x", label="planted outlier")
    axis.scatter(points[flagged, 0], points[flagged, 1], s=40, facecolors="none", edgecolors="black",
                 linewidths=0.8, label="flagged")
    axis.legend(fontsize=7)
    axis.set_title(title, fontsize=9)
    return figure


def _before_after(plt: Any, before: np.ndarray, after: np.ndarray, real: np.ndarray, image: bool, title: str) -> Any:
    if not image:
        figure, axes = plt.subplots(1, 2, figsize=(9.0, 4.2), sharex=True, sharey=True)
        for axis, samples, label in zip(axes, (before, after), ("before (base GAN)", "after cleansing")):
            axis.scatter(real[:, 0], real[:, 1], s=3, color="grey", alpha=0.3, label="real (test)")
            axis.scatter(samples[:, 0], samples[:, 1], s=3, color="tab:orange", alpha=0.5, label="generated")
            axis.set_title(label, fontsize=8)
        axes[0].legend(fontsize=7)
        figure.suptitle(title, fontsize=9)
        return figure
    columns = 8
    n_rows = (len(before) + columns - 1) // columns
    figure, axes = plt.subplots(n_rows, 2 * columns + 1, figsize=((2 * columns + 1) * 0.8, 0.85 * n_rows),
                                squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for i, (left, right) in enumerate(zip(before, after)):
        _image(axes[i // columns][i % columns], left)
        _image(axes[i // columns][columns + 1 + i % columns], right)
    axes[0][0].set_title("before", fontsize=7, loc="left")
    axes[0][columns + 1].set_title("after", fontsize=7, loc="left")
    figure.suptitle(title, fontsize=9)
    return figure

"""The diffusion family's report figures and tables (the family's ``flagged_plots``, called by
:func:`cleanse.report_plots.write_plots`; DMin, Lin, Lao & Zhao, arXiv 2412.08637: the paper's
"query beside its most influential training images" figures, its detection rate against k, and its
storage and time table). Written under ``reports/``:

- ``flagged/<estimator>.csv`` and ``.png``: the 50 most harmful training images by the estimator's
  score (higher = more responsible for the harm queries, e.g. the watermarked generations) with
  their class, source and whether they were planted; the 24 first as an image grid (red = planted);
- ``probes/<estimator>.csv`` and ``.png``: the retrieval queries (generated or user-supplied
  images) each beside its top-k training images, from the per-query table the estimator stored
  (``scores/<estimator>/queries.parquet``: ``query_id, rank, sample_id, score, query_source,
  sample_source``, rank 1 = most influential); a green title = the training image's source is the
  query's, red = another source;
- ``retrieval/precision_at_k.png``: precision@k (the fraction of a query's top-k whose source is
  the query's, averaged over the queries of known source) against k = 1..stored k, per estimator,
  from the same tables, with the report's ``estimators.<name>.retrieval.precision_at_<k>`` marked,
  and chance (the training share of each query's source);
- ``retrieval/cost.md``, ``cost.html`` and ``cost.png``: storage and latency per estimator (the
  scoring and signature times it recorded, its cache's bytes per training image, the raw
  per-timestep gradients of one image (``S * D`` float32, D counted on the base model) against the
  scored vector, and the mean search time per query).

The PNGs are returned (the HTML report embeds them, MLflow logs ``reports/`` with the parent run and
``flagged/`` and ``probes/`` with each estimator's run). matplotlib is imported inside the
functions (Agg backend, set by the caller).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cleanse.data.dataset import Split
from cleanse.estimators.dmin import train_source
from cleanse.families.diffusion.retrieval import _ranked, precision_at_k
from cleanse.report_plots import _png
from cleanse.storage import read_json, read_table, read_tensors, write_bytes, write_text

QUERY_ROWS = 8  # queries shown per grid
TOP = 8  # training images beside each query
FLAGGED = 24  # harmful training images in the flagged grid
QUERY_TABLE = "queries.parquet"
QUERY_IMAGES = "queries.safetensors"


def _source_name(source: int, names: tuple[str, ...] | None) -> str:
    if source < 0:
        return "?"
    return names[source] if names is not None and source < len(names) else str(source)


def _show(axis: Any, image: np.ndarray, title: str, colour: str) -> None:
    """One ``(C, H, W)`` image in [-1, 1] (grey for one channel) titled ``title``."""
    shown = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    axis.imshow(np.clip((shown + 1) / 2, 0, 1), cmap="gray", vmin=0, vmax=1)
    axis.set_title(title, fontsize=6, color=colour)


def _grid(plt: Any, rows: list[list[tuple[np.ndarray, str, str]]], title: str) -> Any:
    """A figure of ``rows`` of ``(image, title, colour)`` cells, one image per axis."""
    columns = max(len(row) for row in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.15 * columns, 1.3 * len(rows)), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axes_row, row in zip(axes, rows):
        for axis, (image, caption, colour) in zip(axes_row, row):
            _show(axis, image, caption, colour)
    figure.suptitle(title, fontsize=8)
    return figure


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    write_bytes(_png(figure), path)
    plt.close(figure)


def write_flagged(name: str, layout: Any, train: Split, names: tuple[str, ...] | None) -> list[str]:
    """``flagged/<name>.csv`` (the 50 most harmful) and ``flagged/<name>.png`` (the 24 first)."""
    import matplotlib.pyplot as plt

    flags = read_table(layout.flags(name)).sort("rank")
    index = {sid: i for i, sid in enumerate(train.sample_id.tolist())}
    rows = np.array([index[sid] for sid in flags["sample_id"].to_list()[:50]], dtype=np.int64)
    sources = train_source(train)
    top = flags.head(50).with_columns(pl.Series("label", train.label[rows]),
                                      pl.Series("source", [_source_name(int(s), names) for s in sources[rows]]),
                                      pl.Series("is_corrupted", train.is_corrupted[rows]))
    write_text(top.write_csv(), layout.reports / "flagged" / f"{name}.csv")
    cells = [(train.features[i], f"#{r + 1} {'planted' if train.is_corrupted[i] else f'class {train.label[i]}'}",
              "red" if train.is_corrupted[i] else "black") for r, i in enumerate(rows[:FLAGGED])]
    columns = 8
    grid = [cells[start:start + columns] for start in range(0, len(cells), columns)]
    _save(_grid(plt, grid, f"{name}: the {len(cells)} most harmful training images (red = planted)"),
          layout.reports / "flagged" / f"{name}.png")
    return [f"flagged/{name}.png"]


def query_images(directory: Path) -> np.ndarray:
    """The stored retrieval queries of one estimator, ``(Q, C, H, W)`` float32 in [-1, 1]; row
    ``q`` is ``query_id`` ``q`` of the per-query table."""
    return read_tensors(directory / QUERY_IMAGES)["images"].float().numpy()


def write_queries(name: str, layout: Any, train: Split, names: tuple[str, ...] | None) -> list[str]:
    """``probes/<name>.csv`` (every stored query's top-k, with the training rows' class and
    planted flag) and ``probes/<name>.png`` (the first :data:`QUERY_ROWS` queries beside their
    :data:`TOP` best training images); nothing when the estimator stored no per-query table."""
    import matplotlib.pyplot as plt

    directory = layout.root / "scores" / name
    if not (directory / QUERY_TABLE).is_file():
        return []
    table = read_table(directory / QUERY_TABLE).sort(["query_id", "rank"])
    index = {sid: i for i, sid in enumerate(train.sample_id.tolist())}
    rows = np.array([index[sid] for sid in table["sample_id"].to_list()], dtype=np.int64)
    write_text(table.with_columns(pl.Series("label", train.label[rows]),
                                  pl.Series("is_corrupted", train.is_corrupted[rows])).write_csv(),
               layout.reports / "probes" / f"{name}.csv")
    if not (directory / QUERY_IMAGES).is_file():
        return []
    images = query_images(directory)
    grid = []
    for query_id in table["query_id"].unique(maintain_order=True).to_list()[:QUERY_ROWS]:
        hits = table.filter((pl.col("query_id") == query_id) & (pl.col("rank") <= TOP))
        source = int(hits["query_source"][0])
        cells = [(images[int(query_id)], f"query {query_id}: {_source_name(source, names)}", "blue")]
        for sid, score, sample_source in hits.select("sample_id", "score", "sample_source").iter_rows():
            same = source >= 0 and int(sample_source) == source
            planted = bool(train.is_corrupted[index[sid]])
            cells.append((train.features[index[sid]], f"{score:.3g}{' planted' if planted else ''}",
                          "green" if same else "red" if source >= 0 else "black"))
        grid.append(cells)
    if not grid:
        return []
    _save(_grid(plt, grid, f"{name}: queries (left) and their top-{TOP} training images "
                           "(green = same source, red = another; title = score)"),
          layout.reports / "probes" / f"{name}.png")
    return [f"probes/{name}.png"]


def precision_curve(table: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(ks, precision)`` for ``k = 1..`` the stored depth: the report's own precision@k
    (:func:`~cleanse.families.diffusion.retrieval.precision_at_k`: queries of known source, a
    missing result counted as a miss) at every k; empty when no query has a known source."""
    retrieved, source = _ranked(table, "sample_source")
    found = precision_at_k(retrieved, source, range(1, retrieved.shape[1] + 1))
    ks = np.array(sorted(int(key.rsplit("_", 1)[1]) for key in found), dtype=np.int64)
    return ks, np.array([found[f"precision_at_{k}"] for k in ks], dtype=np.float64)


def chance(table: pl.DataFrame, train_sources: np.ndarray) -> float:
    """The precision of a random top-k: the training share of each query's source, averaged over
    the queries of known source (nan when none)."""
    queries = table.filter(pl.col("query_source") >= 0).unique("query_id")["query_source"].to_numpy()
    if queries.size == 0:
        return float("nan")
    return float(np.mean([(train_sources == s).mean() for s in queries]))


def write_precision(metrics: dict[str, Any], layout: Any, train: Split) -> list[str]:
    """``retrieval/precision_at_k.png`` (module docstring); nothing without any query table."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4.0))
    drawn, chances = False, []
    for name in metrics["estimators"]:
        path = layout.root / "scores" / name / QUERY_TABLE
        if not path.is_file():
            continue
        table = read_table(path)
        ks, precision = precision_curve(table)
        if ks.size == 0:
            continue
        line = axis.plot(ks, precision, label=name)[0]
        retrieval = metrics["estimators"][name].get("retrieval") or {}
        reported = sorted((int(m.group(1)), float(value)) for key, value in retrieval.items()
                          if (m := re.fullmatch(r"precision_at_(\d+)", key)) and value is not None)
        if reported:
            axis.scatter([k for k, _ in reported], [p for _, p in reported], color=line.get_color(), zorder=3, s=18)
        chances.append(chance(table, train_source(train)))
        drawn = True
    if not drawn:
        plt.close(figure)
        return []
    if np.isfinite(chances).any():
        axis.axhline(float(np.nanmean(chances)), color="grey", ls=":", label="chance")
    axis.set_xscale("log")
    axis.set_xlabel("k (top-k training images per query)")
    axis.set_ylabel("precision@k (same source as the query)")
    axis.set_ylim(0, 1.02)
    axis.set_title("Source detection (dots: the report's precision_at_k)", fontsize=9)
    axis.legend(fontsize=7)
    _save(figure, layout.reports / "retrieval" / "precision_at_k.png")
    return ["retrieval/precision_at_k.png"]


# (column, key of scores/<name>.meta.json, unit scale, format): what each estimator recorded
# (:class:`cleanse.estimators.dmin.AttributionEstimator`: the scoring time, the time to fill or
# load the training signatures, the scored vector's dimension and the cache's bytes per image).
COST_COLUMNS = (
    ("scoring s", "seconds", 1.0, "{:.1f}"),
    ("signatures s", "train_vectors_seconds", 1.0, "{:.1f}"),
    ("vector dim", "vector_dim", 1.0, "{:,.0f}"),
    ("cache KB/image", "bytes_per_sample", 1e-3, "{:,.1f}"),
)


def gradient_dims(model: Any, records: dict[str, dict[str, Any]]) -> dict[str, int]:
    """D, the differentiated parameters, of every estimator whose recorded options name
    ``parameters`` (``all`` or ``adapters``: :func:`~cleanse.families.diffusion.signatures.parameter_names`)
    of the fitted ``model`` (a :class:`~cleanse.families.diffusion.fitted.FittedDiffusion`)."""
    from cleanse.families.diffusion.signatures import parameter_names

    sizes = {name: int(p.numel()) for name, p in model.model.named_parameters()}
    dims = {}
    for estimator, record in records.items():
        which = (record.get("options") or {}).get("parameters")
        if which in ("all", "adapters"):
            dims[estimator] = sum(sizes[name] for name in parameter_names(model.model, which))
    return dims


def _number(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def query_seconds(directory: Path) -> float | None:
    """The mean top-k search time per retrieval query the estimator recorded in the metadata of
    ``queries.safetensors`` (``seconds_per_query``), or None."""
    from safetensors import safe_open

    path = directory / QUERY_IMAGES
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as handle:
        return _number((handle.metadata() or {}).get("seconds_per_query"))


def cost_rows(metrics: dict[str, Any], layout: Any, dims: dict[str, int] | None = None) -> list[dict[str, str]]:
    """One row per estimator: :data:`COST_COLUMNS`; the raw per-timestep gradients of one training
    image, ``S * D`` float32 (``S`` = the recorded ``options.timesteps``, ``D`` = ``dims[name]``,
    :func:`gradient_dims`), and their ratio to the scored vector (``vector_dim`` float32): DMin's
    compression; and the mean search time per query. ``n/a`` where nothing was recorded."""
    rows = []
    for name in metrics["estimators"]:
        meta_path = layout.scores_meta(name)
        record = read_json(meta_path) if meta_path.is_file() else {}
        row = {"estimator": name}
        for column, key, scale, fmt in COST_COLUMNS:
            value = _number(record.get(key))
            row[column] = "n/a" if value is None else fmt.format(value * scale)
        steps, dim = _number((record.get("options") or {}).get("timesteps")), (dims or {}).get(name)
        raw = 4 * steps * dim if steps and dim else None
        vector = _number(record.get("vector_dim"))
        row["raw gradients MB/image"] = "n/a" if raw is None else f"{raw / 1e6:,.2f}"
        row["compression"] = f"{raw / (4 * vector):,.1f}x" if raw and vector else "n/a"
        seconds = query_seconds(layout.root / "scores" / name)
        row["query ms"] = "n/a" if seconds is None else f"{1e3 * seconds:.3g}"
        rows.append(row)
    return rows


def write_cost(metrics: dict[str, Any], layout: Any, dims: dict[str, int] | None = None) -> list[str]:
    """``retrieval/cost.md``, ``cost.html`` and ``cost.png``: :func:`cost_rows` as a table."""
    import matplotlib.pyplot as plt

    rows = cost_rows(metrics, layout, dims)
    if not rows:
        return []
    headers = list(rows[0])
    markdown = "| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n"
    markdown += "".join("| " + " | ".join(row[h] for h in headers) + " |\n" for row in rows)
    write_text(markdown, layout.reports / "retrieval" / "cost.md")
    page = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"
    page += "".join("<tr>" + "".join(f"<td>{html.escape(row[h])}</td>" for h in headers) + "</tr>" for row in rows)
    write_text(page + "</table>\n", layout.reports / "retrieval" / "cost.html")
    figure, axis = plt.subplots(figsize=(1.3 * len(headers), 0.35 * (len(rows) + 2)))
    axis.axis("off")
    table = axis.table(cellText=[[row[h] for h in headers] for row in rows], colLabels=headers, loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.auto_set_column_width(list(range(len(headers))))
    axis.set_title("Storage and latency per estimator", fontsize=9)
    _save(figure, layout.reports / "retrieval" / "cost.png")
    return ["retrieval/cost.png"]


def write_diffusion_plots(params: Any, layout: Any, metrics: dict[str, Any]) -> list[str]:
    """Every figure and table of the module docstring; returns the PNGs' paths under ``reports/``."""
    from cleanse import families
    from cleanse.pipeline import load_staged

    staged = load_staged(layout, params)
    train, names = staged.train, staged.meta.sources
    written: list[str] = []
    for name in metrics["estimators"]:
        written += write_flagged(name, layout, train, names)
        written += write_queries(name, layout, train, names)
    written += write_precision(metrics, layout, train)
    records = {name: read_json(layout.scores_meta(name)) for name in metrics["estimators"]
               if layout.scores_meta(name).is_file()}
    dims = gradient_dims(families.get(params.family).load_model(layout.base_model), records)
    written += write_cost(metrics, layout, dims)
    return written

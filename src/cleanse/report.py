"""The ``report`` stage: ``reports/metrics.json``, PR curves, plots and a human HTML report.

``metrics.json`` follows the schema in the architecture document::

    {"dataset": {"name", "n_train", "n_corrupted"},
     "baseline": {"test_accuracy", ["attack_success_rate"]},   # regression: {"test_rmse"}
     "oracle":   {...},                      # only with ground truth
     "random":   {...},                      # random removal of n_corrupted samples
     "recommended": {"estimator", "detection", "retrain", "n_flagged", "budget_factor", "candidates", ...},
     "estimators": {name: {"detection": {roc_auc, average_precision, precision_at_k, recall_at_k, k},
                           "retrain": {test_accuracy, [attack_success_rate], random_test_accuracy, n_removed},
                                      # regression: {test_rmse, random_test_rmse, n_removed}
                           "n_flagged", "seconds"}},
     "attribution": {"lds": {...}, "stability": {...}}}   # only when params.evaluate enables them
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from cleanse.config import Params
from cleanse.report_plots import write_plots
from cleanse.stages.retrain_seeds import OVER_SEEDS, interval_text
from cleanse.storage import Layout, read_json, read_table, write_json, write_text


def outcome_keys(metrics: dict[str, Any]) -> tuple[str, ...]:
    """The outcome keys of the run's family (:attr:`cleanse.families.base.Family.outcome_keys`):
    the first, its headline (``test_accuracy``, ``test_rmse``), is always in ``metrics["baseline"]``."""
    from cleanse import families

    # Families share key names (``test_loss`` is a GAN headline and an lm outcome): the family whose
    # outcome keys the baseline carries most of is the run's; ties keep the registration order.
    baseline = metrics["baseline"]
    found = [keys for keys in (families.get(name).outcome_keys_in(baseline) for name in families.names())
             if keys is not None]
    if found:
        return tuple(max(found, key=lambda keys: sum(key in baseline for key in keys)))
    raise KeyError(f"no family's outcome in the baseline's keys {sorted(metrics['baseline'])}")


def collect_metrics(params: Params, layout: Layout) -> dict[str, Any]:
    from cleanse import families
    from cleanse.evaluate import detection_metrics
    from cleanse.pipeline import load_staged, query_dir

    staged = load_staged(layout, params)
    references = read_json(layout.retrain_result("references"))
    truth = dict(zip(staged.train.sample_id.tolist(), staged.train.is_corrupted.tolist()))
    task = families.get(params.family)
    outcomes = task.outcome_keys_in(references["baseline"]) or task.outcome_keys
    headline = outcomes[0]
    n_corrupted = int(staged.train.is_corrupted.sum())
    metrics: dict[str, Any] = {
        "dataset": {"name": staged.meta.name, "n_train": len(staged.train), "n_corrupted": n_corrupted,
                    "corruption": staged.meta.corruption.get("kind", "none")},
        "baseline": references["baseline"],
        "estimators": {},
    }
    for key in ("oracle", "random"):
        if key in references:
            metrics[key] = {k: v for k, v in references[key].items() if k in (*outcomes, "n_removed", OVER_SEEDS)}
    for name in params.estimators:
        scores = read_table(layout.scores(name))
        is_corrupted = np.array([truth[i] for i in scores["sample_id"].to_list()], dtype=bool)
        retrain = read_json(layout.retrain_result(name))
        score_meta = read_json(layout.scores_meta(name))
        cleaned = retrain["cleaned"]
        metrics["estimators"][name] = {
            "detection": detection_metrics(scores["score"].to_numpy(), is_corrupted),
            "retrain": {
                **{k: cleaned[k] for k in outcomes if k in cleaned},
                f"random_{headline}": retrain["random_same_count"][headline],
                "n_removed": cleaned["n_removed"],
                "n_corrupted_removed": cleaned["n_corrupted_removed"],
                **({OVER_SEEDS: cleaned[OVER_SEEDS]} if OVER_SEEDS in cleaned else {}),
            },
            "n_flagged": retrain["n_flagged"],
            "seconds": score_meta["seconds"],
        }
        note = score_meta.get("note")
        if note:  # e.g. fine: its scores come from a model trained on a randomised curriculum
            metrics["estimators"][name]["note"] = note
        if retrain.get("iterative"):
            metrics["estimators"][name]["cleansing"] = {
                "stopped": retrain["stopped"],
                "rounds": [{k: v for k, v in r.items() if k not in ("flagged_ids", "readmitted_ids")} for r in retrain["rounds"]]}
    metrics["recommended"] = recommended_metrics(layout, metrics, truth, params.family)
    recorded = query_dir(layout) / "query.json"
    if params.query.kind != "none" and recorded.is_file():
        metrics["query"] = read_json(recorded)
    for name, extra in task.evaluations(params, staged, layout, metrics).items():  # e.g. the GAN's replay agreement
        metrics["estimators"][name].update(extra)
    if params.evaluate.lds or params.evaluate.stability:
        from cleanse.attribution_report import attribution_metrics
        from cleanse.pipeline import load_model

        metrics["attribution"] = attribution_metrics(params, staged, load_model(layout.base_model))
    return metrics


def recommended_metrics(layout: Layout, metrics: dict[str, Any], truth: dict[int, bool],
                        family: str = "classification") -> dict[str, Any]:
    """``metrics["recommended"]``, in an estimator's shape (``detection``, ``retrain``, ``n_flagged``,
    ``seconds``) plus ``estimator`` (``"none"`` = no removal), ``budget_factor`` and the candidates.
    Detection is the chosen estimator's ranking (None for no removal); the ground truth and the test
    split appear here only as the evaluation of a choice made without them."""
    from cleanse import families
    from cleanse.evaluate import detection_metrics
    from cleanse.pipeline import recommend_dir
    from cleanse.recommend import NO_REMOVAL

    chosen = read_json(recommend_dir(layout) / "recommend.json")
    name = chosen["estimator"]
    if name == NO_REMOVAL:
        detection = {key: None for key in ("roc_auc", "average_precision", "precision_at_k", "recall_at_k", "k")}
    else:
        detection = metrics["estimators"][name]["detection"]
    cleaned = chosen["cleaned"]
    task = families.get(family)
    keys = task.outcome_keys_in(cleaned) or task.outcome_keys
    headline = keys[0]
    retrain = {key: cleaned[key] for key in (*keys, task.selection_of(cleaned)[0], "heldout_behaviour_rate",
                                             "n_removed", "n_corrupted_removed", OVER_SEEDS)
               if key in cleaned}
    if name != NO_REMOVAL:
        retrain[f"random_{headline}"] = metrics["estimators"][name]["retrain"][f"random_{headline}"]
    return {"estimator": name, "detection": detection, "retrain": retrain, "n_flagged": chosen["n_removed"],
            "budget_factor": chosen["budget_factor"], "seconds": chosen["seconds"], "rule": chosen["rule"],
            "candidates": chosen["candidates"]}


def comparison_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per reference and estimator, for tables (CLI, Prefect artifact, HTML); the
    recommendation first."""
    rows = []
    asr = "attack_success_rate" in metrics["baseline"]
    headline = outcome_keys(metrics)[0]
    column = _COLUMNS.get(headline, headline)
    recommended = metrics.get("recommended")
    if recommended is not None:
        detection = recommended["detection"]
        factor = recommended.get("budget_factor", 1.0)
        budget = "" if factor == 1.0 else f", {factor:g}x budget"
        row = {"method": f"RECOMMENDED: {recommended['estimator']}{budget}", "roc_auc": detection["roc_auc"],
               "ap": detection["average_precision"], "p_at_k": detection["precision_at_k"],
               "flagged": recommended["n_flagged"], column: recommended["retrain"][headline],
               "seconds": None}
        if asr:
            row["asr"] = recommended["retrain"].get("attack_success_rate")
        rows.append(row)
    for key, label in (("baseline", "baseline (no removal)"), ("random", "random removal (k = #corrupted)"), ("oracle", "oracle")):
        if key in metrics:
            row = {"method": label, "roc_auc": None, "ap": None, "p_at_k": None, "flagged": metrics[key].get("n_removed", 0),
                   column: metrics[key][headline], "seconds": None}
            if asr:
                row["asr"] = metrics[key].get("attack_success_rate")
            rows.append(row)
    for name, result in metrics["estimators"].items():
        detection = result["detection"]
        row = {"method": name, "roc_auc": detection["roc_auc"], "ap": detection["average_precision"],
               "p_at_k": detection["precision_at_k"], "flagged": result["n_flagged"],
               column: result["retrain"][headline], "seconds": result["seconds"]}
        if asr:
            row["asr"] = result["retrain"].get("attack_success_rate")
        rows.append(row)
    if OVER_SEEDS in metrics["baseline"]:  # evaluate.retrain_seeds > 1: the headline is a mean over training seeds
        spread = f"{column} {metrics['baseline'][OVER_SEEDS]['level']:.0%} over seeds"
        blocks = [metrics.get("recommended", {}).get("retrain", {})] if recommended is not None else []
        blocks += [metrics[key] for key in ("baseline", "random", "oracle") if key in metrics]
        blocks += [result["retrain"] for result in metrics["estimators"].values()]
        for row, block in zip(rows, blocks):
            row[spread] = interval_text(block, headline)
    return rows


# Table columns of the outcome keys (the accuracy column predates families).
_COLUMNS = {"test_accuracy": "test_acc"}
_WORDS = {"test_all": "test ALL", "val_all": "validation ALL", "test_fid": "test FID", "val_fid": "validation FID",
          "test_is": "test IS", "val_is": "validation IS",
          "test_accuracy": "test accuracy", "val_accuracy": "validation accuracy", "test_rmse": "test RMSE",
          "val_rmse": "validation RMSE"}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(metrics: dict[str, Any]) -> str:
    rows = comparison_rows(metrics)
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(row[h]) for h in headers) + " |" for row in rows]
    notes = [f"- `{name}`: {entry['note']}" for name, entry in metrics.get("estimators", {}).items() if entry.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def _recommendation_sentence(metrics: dict[str, Any]) -> str:
    recommended = metrics.get("recommended")
    if recommended is None:
        return ""
    name = recommended["estimator"]
    retrain = recommended["retrain"]
    what = "no removal (the base model)" if name == "none" else (
        f"{html.escape(name)}'s ranking, {recommended['n_flagged']} samples removed")
    headline = outcome_keys(metrics)[0]
    validation = next((key for key in retrain if key.startswith("val_")), "val_accuracy")
    return (f"<b>Recommended: {what}</b>, {_WORDS.get(validation, validation)} {retrain.get(validation, float('nan')):.3f}, "
            f"{_WORDS.get(headline, headline)} {retrain[headline]:.3f}. Chosen by {html.escape(recommended['rule'])}, among "
            f"{len(recommended['candidates'])} candidates (recommend/recommend.json); never from the ground truth "
            "or the test split. The model is in models/recommended/.")


def _data_uri(path: Path, media_type: str = "image/png") -> str:
    """A file as a ``data:`` URI, so that report.html is one self-contained file (MLflow's artifact
    viewer shows it in a sandbox where relative paths do not resolve)."""
    return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_html(metrics: dict[str, Any], images: list[str], layout: Layout) -> Path:
    rows = comparison_rows(metrics)
    headers = list(rows[0])
    table = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(row[h]))}</td>" for h in headers) + "</tr>" for row in rows)
    figures = "".join(f'<figure><img src="{_data_uri(layout.reports / name)}" alt="{html.escape(name)}">'
                      f'<figcaption>{html.escape(name)}</figcaption></figure>' for name in images)
    dataset = metrics["dataset"]
    flagged = " ".join(f'<a href="{_data_uri(layout.reports / "flagged" / f"{name}.csv", "text/csv")}" '
                       f'download="flagged-{html.escape(name)}.csv">{html.escape(name)}</a>'
                       for name in metrics["estimators"] if (layout.reports / "flagged" / f"{name}.csv").is_file())
    encoded_metrics = base64.b64encode(json.dumps(metrics, indent=2, sort_keys=True, default=str).encode()).decode()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cleanse report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#eee}}td:first-child{{text-align:left}}img{{max-width:100%}}</style>
</head><body><h1>cleanse report</h1>
<p>Dataset <b>{html.escape(str(dataset['name']))}</b>: {dataset['n_train']} training samples, {dataset['n_corrupted']} corrupted ({html.escape(str(dataset['corruption']))}).
Detection metrics use k = number corrupted; <i>test_acc</i> is after removing each method's flags and retraining with the same seed and recipe.</p>
<p>{_recommendation_sentence(metrics)}</p>
<table>{table}</table>
<p><a href="data:application/json;base64,{encoded_metrics}" download="metrics.json">metrics.json</a> · top flagged samples per estimator: {flagged}</p>
{figures}
</body></html>"""
    return write_text(page, layout.reports / "report.html")


def _require_fresh_inputs(params: Params, layout: Layout) -> None:
    """The report reads the retrain results (and the probes): refuse ones that another configuration
    produced, as every other stage does, instead of reporting them under the current params."""
    from cleanse import pipeline

    pipeline._require_fresh(layout.retrain_result("references"), pipeline.references_fingerprint(params),
                            "reference retrains")
    for name in params.estimators:
        pipeline._require_fresh(layout.retrain_result(name), pipeline.retrain_fingerprint(params, name),
                                f"{name} retrain result")
    if params.query.kind != "none":
        pipeline._require_fresh(pipeline.query_dir(layout) / "query.json", pipeline.query_fingerprint(params),
                                "probes")
    pipeline._require_fresh(pipeline.recommend_dir(layout) / "recommend.json", pipeline.recommend_fingerprint(params),
                            "recommendation")


def run_report(params: Params, layout: Layout) -> dict[str, Any]:
    """Write the metrics, plots and the HTML report; return the metrics."""
    _require_fresh_inputs(params, layout)
    metrics = collect_metrics(params, layout)
    images = write_plots(params, layout, metrics)
    write_html(metrics, images, layout)
    write_text(markdown_table(metrics) + "\n", layout.reports / "comparison.md")
    write_json(metrics, layout.metrics)
    layout.publish()
    return metrics

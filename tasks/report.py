"""Prefect task: reports/ (metrics.json, plots, report.html), the MLflow run (when
``tracking.enabled``) and a markdown artifact with the comparison table."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks._common import logger, setup

ARTIFACT_KEY = "cleanse-comparison"


@task(name="report", cache_policy=NO_CACHE)
def report(params_file: str | None, overrides: list[str] | None, out: str) -> dict[str, Any]:
    from cleanse.report import markdown_table, run_report

    params, layout = setup(params_file, overrides, out)
    metrics = run_report(params, layout)
    log = logger()
    log.info("report: %s", layout.reports / "report.html")
    links = f"\n\nmetrics: `{layout.metrics}`  \nreport: `{layout.reports / 'report.html'}`"
    if params.tracking.enabled:
        from cleanse.tracking import log_pipeline, tracking_uri

        run_id = log_pipeline(params, layout, metrics)
        log.info("mlflow: run %s at %s", run_id, tracking_uri(layout))
        links += f"  \nmlflow: run `{run_id}` at `{tracking_uri(layout)}`"
    dataset = metrics["dataset"]
    title = (f"### {dataset['name']}: {dataset['n_train']} train, {dataset['n_corrupted']} corrupted "
             f"({dataset['corruption']})\n\n")
    create_markdown_artifact(markdown=title + markdown_table(metrics) + links, key=ARTIFACT_KEY,
                             description=f"cleanse comparison for {out}")
    return metrics

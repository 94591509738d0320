"""Prefect task: reports/ (metrics.json, plots, report.html), the MLflow run (when
``tracking.enabled``) and a markdown artifact with the comparison table."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks._common import RETRIES, RETRY_DELAYS, logger, retry_if_transient, setup

ARTIFACT_KEY = "cleanse-comparison"


# Always a few retries: the report logs to MLflow, often a server. Never for CleanseErrors.
@task(name="report", task_run_name="report", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_if_transient)
def report(params_file: str | None, overrides: list[str] | None, out: str) -> dict[str, Any]:
    from cleanse.report import markdown_table, run_report
    from cleanse.uris import redact

    params, layout = setup(params_file, overrides, out)
    metrics = run_report(params, layout)
    log = logger()
    # Where the files live for the reader: the s3:// address of a remote out, not this worker's cache.
    metrics_at, report_at = (redact(layout.location(path)) for path in (layout.metrics, layout.reports / "report.html"))
    log.info("report: %s", report_at)
    links = f"\n\nmetrics: `{metrics_at}`  \nreport: `{report_at}`"
    if params.tracking.enabled:
        from cleanse.tracking import log_pipeline, tracking_uri

        run_id = log_pipeline(params, layout, metrics)
        log.info("mlflow: run %s at %s", run_id, redact(tracking_uri(layout)))
        links += f"  \nmlflow: run `{run_id}` at `{redact(tracking_uri(layout))}`"
    dataset = metrics["dataset"]
    title = (f"### {dataset['name']}: {dataset['n_train']} train, {dataset['n_corrupted']} corrupted "
             f"({dataset['corruption']})\n\n")
    create_markdown_artifact(markdown=title + markdown_table(metrics) + links, key=ARTIFACT_KEY,
                             description=f"cleanse comparison for {out}")
    return metrics

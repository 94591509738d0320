"""Prefect tasks of the memorization flow: one subset-model shard, and the long-tail report.

A shard task trains (or, when its file already exists, skips) models ``k0..k1-1`` of the
Feldman & Zhang ensemble; the file is written atomically and named by the ensemble's
fingerprint, so a killed flow resumes with the shards it had not finished.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._common import logger, setup

ARTIFACT_KEY = "cleanse-memorization"


@task(name="memorization-shard", task_run_name="memorization-shard-{k0}-{k1}", cache_policy=NO_CACHE)
def memorization_shard(params_file: str | None, overrides: list[str] | None, out: str, k0: int, k1: int) -> dict[str, Any]:
    from cleanse import pipeline
    from cleanse.estimators.memorization import ensemble_key, ensure_shard, shard_path

    params, layout = setup(params_file, overrides, out)
    context = pipeline.scoring_context(params, layout)
    options = params.scorers.memorization
    _, trained = ensure_shard(context, options, k0, k1)
    path = shard_path(context.cache_dir, ensemble_key(context, options), k0, k1)
    logger().info("[%s] memorization shard %d-%d: %s", "done" if trained else "skip", k0, k1, path)
    return {"k0": k0, "k1": k1, "trained": trained, "path": str(path)}


@task(name="memorization-report", cache_policy=NO_CACHE)
def memorization_report(params_file: str | None, overrides: list[str] | None, out: str) -> dict[str, Any]:
    from prefect.artifacts import create_markdown_artifact

    from cleanse.longtail import run_longtail

    params, layout = setup(params_file, overrides, out)
    report = run_longtail(params, layout)
    links = f"\n\nreport: `{report['paths']['markdown']}`"
    if params.tracking.enabled:
        from cleanse.tracking import display_uri, log_longtail

        run_id = log_longtail(params, layout, report)
        report["mlflow_run_id"] = run_id
        links += f"  \nmlflow: run `{run_id}` at `{display_uri(layout)}`"  # no password in the artifact
    markdown = (layout.reports / "memorization" / "report.md").read_text()
    create_markdown_artifact(markdown=markdown + links, key=ARTIFACT_KEY, description=f"memorization long tail for {out}")
    return report

"""Prefect task: turn one estimator's scores into flags -> flags/<estimator>.parquet."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._common import run_unless_fresh, setup


@task(name="detect", task_run_name="detect-{estimator}", cache_policy=NO_CACHE)
def detect(params_file: str | None, overrides: list[str] | None, out: str, estimator: str,
           fresh: bool = False) -> str:
    from cleanse import pipeline

    params, layout = setup(params_file, overrides, out)
    return run_unless_fresh(f"detect {estimator}", layout.flags(estimator).with_suffix(".meta.json"),
                            pipeline.detect_fingerprint(params, estimator), layout.flags(estimator),
                            lambda: pipeline.run_detect(params, layout, estimator), fresh)

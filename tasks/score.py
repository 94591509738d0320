"""Prefect task: score every training sample with one estimator -> scores/<estimator>.parquet."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._common import run_unless_fresh, setup


@task(name="score", task_run_name="score-{estimator}", cache_policy=NO_CACHE)
def score(params_file: str | None, overrides: list[str] | None, out: str, estimator: str,
          fresh: bool = False) -> str:
    from cleanse import pipeline

    params, layout = setup(params_file, overrides, out)
    return run_unless_fresh(f"score {estimator}", layout.scores_meta(estimator),
                            pipeline.score_fingerprint(params, estimator), layout.scores(estimator),
                            lambda: pipeline.run_score(params, layout, estimator), fresh)

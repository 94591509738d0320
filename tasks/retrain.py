"""Prefect tasks: retrain without one estimator's flags (and a random set of the same size), the
references (baseline, oracle, random removal) -> retrain/<name>.json, and the recommendation ->
recommend/recommend.json."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._common import run_unless_fresh, setup


@task(name="retrain", task_run_name="retrain-{estimator}", cache_policy=NO_CACHE)
def retrain(params_file: str | None, overrides: list[str] | None, out: str, estimator: str,
            fresh: bool = False) -> str:
    from cleanse import pipeline

    params, layout = setup(params_file, overrides, out)
    return run_unless_fresh(f"retrain {estimator}", layout.retrain_result(estimator),
                            pipeline.retrain_fingerprint(params, estimator), layout.retrain_result(estimator),
                            lambda: pipeline.run_retrain(params, layout, estimator), fresh)


@task(name="references", task_run_name="references", cache_policy=NO_CACHE)
def references(params_file: str | None, overrides: list[str] | None, out: str, fresh: bool = False) -> str:
    from cleanse import pipeline

    params, layout = setup(params_file, overrides, out)
    result = layout.retrain_result("references")
    return run_unless_fresh("references", result, pipeline.references_fingerprint(params), result,
                            lambda: pipeline.run_references(params, layout), fresh)


@task(name="recommend", task_run_name="recommend", cache_policy=NO_CACHE)
def recommend(params_file: str | None, overrides: list[str] | None, out: str, fresh: bool = False) -> str:
    from cleanse import pipeline

    params, layout = setup(params_file, overrides, out)
    result = pipeline.recommend_dir(layout) / "recommend.json"
    return run_unless_fresh("recommend", result, pipeline.recommend_fingerprint(params), result,
                            lambda: pipeline.run_recommend(params, layout), fresh)

"""Prefect task: record the probes (``query.kind``) -> query/."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._common import run_unless_fresh, setup


@task(name="query", task_run_name="query", cache_policy=NO_CACHE)
def query(params_file: str | None, overrides: list[str] | None, out: str, fresh: bool = False) -> str:
    from cleanse import pipeline

    params, layout = setup(params_file, overrides, out)
    folder = pipeline.query_dir(layout)
    return run_unless_fresh("query", folder / "query.json", pipeline.query_fingerprint(params), folder,
                            lambda: pipeline.run_query(params, layout), fresh)

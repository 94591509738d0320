"""Prefect task: load, validate, split and corrupt the data -> data/staged/."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._common import run_unless_fresh, setup


@task(name="stage", task_run_name="stage", cache_policy=NO_CACHE)
def stage(params_file: str | None, overrides: list[str] | None, out: str, fresh: bool = False) -> str:
    from cleanse import pipeline

    params, layout = setup(params_file, overrides, out)
    return run_unless_fresh("stage", layout.staged_meta, pipeline.stage_fingerprint(params), layout.staged,
                            lambda: pipeline.run_stage(params, layout), fresh)

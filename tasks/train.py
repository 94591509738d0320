"""Prefect task: train the base model -> models/base/."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._common import run_unless_fresh, setup


@task(name="train", task_run_name="train", cache_policy=NO_CACHE)
def train(params_file: str | None, overrides: list[str] | None, out: str, fresh: bool = False) -> str:
    from cleanse import pipeline

    params, layout = setup(params_file, overrides, out)
    meta = layout.base_model / pipeline.STAGE_META_NAME
    return run_unless_fresh("train", meta, pipeline.train_fingerprint(params), layout.base_model,
                            lambda: pipeline.run_train(params, layout), fresh)

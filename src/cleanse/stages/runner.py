"""Running the stage graph (:mod:`cleanse.stages.graph`): one step, skipped when its outputs are
fresh, and the whole run (``cleanse run``), which resumes from the first stale step."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cleanse.config import Params
from cleanse.stages.common import locked
from cleanse.stages.fingerprints import is_fresh
from cleanse.stages.graph import BY_NAME, Stage, run_stages, steps
from cleanse.storage import Layout


def run_stage_now(stage: Stage | str, params: Params, layout: Layout, estimator: str | None = None) -> Any:
    """Compute ``stage`` (for ``estimator`` when it runs per estimator), whether fresh or not."""
    stage = BY_NAME[stage] if isinstance(stage, str) else stage
    fn = stage.function()
    return fn(params, layout, estimator) if stage.per_estimator else fn(params, layout)


def is_step_fresh(stage: Stage, params: Params, layout: Layout, estimator: str | None = None) -> bool:
    """True when the step's marker records the fingerprint of the current configuration."""
    expected = stage.expected(params, estimator)
    return expected is not None and stage.marker is not None and is_fresh(
        stage.path(stage.marker, layout.root, estimator), expected)


def product(stage: Stage, layout: Layout, estimator: str | None = None) -> Path:
    """The path a step returns (its main output)."""
    return stage.path(stage.product or stage.outputs[0], layout.root, estimator)


@locked
def run_all(params: Params, layout: Layout, *, resume: bool = True, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run every stage in order, skipping those whose outputs are fresh; return the metrics (what
    the last stage, the report, returns: stages that record no fingerprint always run, unlogged)."""
    if params.tracking.enabled:  # the parent run opens now, so its duration is the pipeline's
        from cleanse.tracking import close_pipeline_run, open_pipeline_run

        open_pipeline_run(params, layout)
    try:
        result: Any = None
        for stage, estimator in steps(params.estimators):
            if stage.fingerprint is None:
                result = run_stage_now(stage, params, layout, estimator)
                continue
            label = stage.label(estimator)
            if resume and is_step_fresh(stage, params, layout, estimator):
                log(f"[skip] {label}: up to date")
                continue
            started = time.perf_counter()
            run_stage_now(stage, params, layout, estimator)
            log(f"[done] {label} ({time.perf_counter() - started:.1f} s)")
        metrics = result
    except BaseException:
        if params.tracking.enabled:
            import contextlib

            with contextlib.suppress(Exception):  # the pipeline's own error is the one to report
                close_pipeline_run(params, layout, status="FAILED")
        raise
    if params.tracking.enabled:
        close_pipeline_run(params, layout, metrics)
    return metrics


__all__ = ["is_step_fresh", "product", "run_all", "run_stage_now", "run_stages"]

"""What every task shares: load the configuration, one task per stage of the graph (skipped when
its outputs are fresh), retry only what may succeed on a second try, and route the library's
progress lines to the run log."""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger


def setup(params_file: str | None, overrides: list[str] | None, out: str) -> tuple[Any, Any]:
    """``(Params, Layout)`` from plain task parameters (absolute paths, resolved by the flow)."""
    from cleanse.config import load_params
    from cleanse.storage import Layout

    return load_params(params_file, list(overrides or [])), Layout.at(out)


def logger() -> Any:
    """The run logger inside a flow or task run; a plain logger when called as ``task.fn(...)``."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("cleanse.tasks")


def stage_task(stage: Any) -> Any:
    """The Prefect task of one stage of :data:`cleanse.stages.graph.GRAPH`: ``fn(params_file,
    overrides, out, estimator=None, fresh=False)`` runs the stage (for ``estimator`` when it runs
    per estimator) unless its outputs are fresh, and returns its main output's path as a string."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def run(params_file: str | None, overrides: list[str] | None, out: str, estimator: str | None = None,
            fresh: bool = False) -> str:
        from cleanse.stages.runner import is_step_fresh, product, run_stage_now

        params, layout = setup(params_file, overrides, out)
        label, output = stage.label(estimator), product(stage, layout, estimator)
        if not fresh and is_step_fresh(stage, params, layout, estimator):
            logger().info("[skip] %s: up to date (%s)", label, output)
            return str(output)
        result = run_stage_now(stage, params, layout, estimator)
        logger().info("[done] %s -> %s", label, result)
        return str(result)

    run.__name__ = run.__qualname__ = stage.name
    run.__doc__ = f"Prefect task: {stage.help}"
    run_name = f"{stage.name}-{{estimator}}" if stage.per_estimator else stage.name
    return task(name=stage.name, task_run_name=run_name, cache_policy=NO_CACHE)(run)


# Transient failures (an S3 or server hiccup) deserve another try; a CleanseError is the user's
# input and fails the same way every time, so it is never retried (it would only delay the error).
RETRIES = 2
RETRY_DELAYS = [5, 30]


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is a :class:`~cleanse.errors.CleanseError`."""
    from cleanse.errors import CleanseError

    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, CleanseError)


def task_options(params: Any, out: str) -> dict[str, Any]:
    """``Task.with_options`` keywords for the stage tasks: retries (with delay) when the run reads
    or writes S3 (``out`` or ``data.source``), none for local runs, where a failure is
    deterministic and a retry would only repeat the work."""
    from cleanse.storage import is_remote

    if is_remote(out) or is_remote(str(params.data.source)):
        return {"retries": RETRIES, "retry_delay_seconds": RETRY_DELAYS, "retry_condition_fn": retry_if_transient}
    return {}


class _ToRunLog(logging.Handler):
    """Forwards records of the "cleanse" logger to the Prefect log of the flow or task run they
    are emitted in (progress of long stages); outside a run it does nothing."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            run_logger = get_run_logger()
        except MissingContextError:
            return
        try:
            run_logger.log(record.levelno, "%s", record.getMessage())
        except Exception:  # noqa: BLE001 - a log line must never fail the stage
            self.handleError(record)


def route_cleanse_logs(level: int = logging.INFO) -> None:
    """Send the library's ``cleanse`` logger (INFO and up) to the current Prefect run's log.

    The equivalent of ``PREFECT_LOGGING_EXTRA_LOGGERS=cleanse`` that also works when Prefect's
    logging was configured before this module was imported, and that is silent outside a run
    (Prefect's API handler warns there). Idempotent. Do not also set the environment variable:
    lines would show twice.
    """
    library = logging.getLogger("cleanse")
    if not any(isinstance(handler, _ToRunLog) for handler in library.handlers):
        library.addHandler(_ToRunLog())
    if library.level == logging.NOTSET or library.level > level:
        library.setLevel(level)

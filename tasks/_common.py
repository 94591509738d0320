"""What every task shares: load the configuration, skip a stage whose outputs are fresh, retry
only what may succeed on a second try, and route the library's progress lines to the run log."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
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


def run_unless_fresh(label: str, meta_path: Path, expected: str, output: Path, action: Callable[[], Any],
                     fresh: bool = False) -> str:
    """Run ``action`` unless ``meta_path`` already records ``expected``; return ``output`` as a string."""
    from cleanse.pipeline import is_fresh

    if not fresh and is_fresh(meta_path, expected):
        logger().info("[skip] %s: up to date (%s)", label, output)
        return str(output)
    result = action()
    logger().info("[done] %s -> %s", label, result)
    return str(result)


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

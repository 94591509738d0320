"""What every task shares: load the configuration and skip a stage whose outputs are fresh."""

from __future__ import annotations

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

"""Progress of long loops (training epochs, scoring chunks, retrain rounds), without a framework.

Two outputs, both optional:

- a tqdm bar on stderr when stderr is an interactive terminal (never in a log file, CI or a
  Prefect worker, where a bar is noise);
- an INFO line through the standard ``logging`` logger ``"cleanse"`` at most every ``interval``
  seconds (``CLEANSE_PROGRESS_SECONDS``, default 10), plus a closing line for a loop that ran
  longer than that. A quick loop writes nothing. Whoever configures logging decides where the
  lines go: the Prefect flow routes them to the run's log (``tasks._common.route_cleanse_logs``).
  When nothing has configured logging (the CLI, ``dvc repro``'s commands) and no bar is drawn,
  the same lines go to stderr, so a long stage is never silent.

Usage::

    with Progress("train mlp", total=epochs, unit="epoch") as progress:
        for epoch in range(epochs):
            ...
            progress.update(loss=loss)

Thread-safe in the sense that matters here: each loop owns its reporter, and ``logging`` is
thread-safe, so concurrent Prefect tasks each report their own loop.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

LOGGER = logging.getLogger("cleanse")
T = TypeVar("T")


def default_interval() -> float:
    """Seconds between log lines: ``CLEANSE_PROGRESS_SECONDS`` (default 10; <= 0 logs every update)."""
    try:
        return float(os.environ.get("CLEANSE_PROGRESS_SECONDS", "10"))
    except ValueError:
        return 10.0


def _want_bar() -> bool:
    if os.environ.get("CLEANSE_PROGRESS_BAR", "auto") == "0":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """Counts ``update`` calls towards ``total``; logs and draws as described in the module docstring.

    Args:
        label: what is running, e.g. ``"score influence: CG"``; starts every log line.
        total: expected number of updates (None: unknown, no percentage or ETA).
        unit: name of one update, e.g. ``"epoch"``.
        interval: seconds between log lines (default :func:`default_interval`).
        logger: where the lines go (default the ``"cleanse"`` logger).
        clock: a ``perf_counter``-like function (tests pass a fake one).
    """

    def __init__(self, label: str, total: int | None = None, *, unit: str = "step", interval: float | None = None,
                 logger: logging.Logger | None = None, clock: Any = time.perf_counter, bar: bool | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.interval = default_interval() if interval is None else interval
        self.logger = logger or LOGGER
        self.clock = clock
        self.count = 0
        self.fields: dict[str, Any] = {}
        self.started = self.last_logged = clock()
        self.lines = 0
        self._bar = None
        if bar if bar is not None else _want_bar():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=label, unit=unit, leave=False, file=sys.stderr)
            except ImportError:  # tqdm is optional: the log lines are the contract
                self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(failed=exc[0] is not None)

    def message(self) -> str:
        """The current one-line summary, e.g. ``train mlp: epoch 12/30 (40%), 3.1 s, ~4.6 s left, loss=0.31``."""
        elapsed = self.clock() - self.started
        done = f"{self.unit} {self.count}/{self.total}" if self.total else f"{self.count} {self.unit}s"
        parts = [f"{self.label}: {done}"]
        if self.total:
            parts[0] += f" ({100 * self.count / self.total:.0f}%)"
        parts.append(f"{elapsed:.1f} s")
        if self.total and 0 < self.count < self.total:
            parts.append(f"~{elapsed / self.count * (self.total - self.count):.1f} s left")
        parts += [f"{key}={_fmt(value)}" for key, value in self.fields.items()]
        return ", ".join(parts)

    def update(self, n: int = 1, **fields: Any) -> None:
        """``n`` more units done; ``fields`` (e.g. ``loss=0.3``) are shown with the next line."""
        self.count += n
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(n)
            if fields:
                self._bar.set_postfix({key: _fmt(value) for key, value in fields.items()}, refresh=False)
        now = self.clock()
        if now - self.last_logged >= self.interval:
            self.last_logged = now
            self.lines += 1
            self._emit(self.message())

    def close(self, failed: bool = False) -> None:
        """Remove the bar; log a closing line if the loop logged any (or ran past ``interval``)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.lines or self.clock() - self.started >= self.interval:
            self._emit(self.message() + (" (stopped)" if failed else " (done)"))

    def _emit(self, line: str) -> None:
        if self.logger.hasHandlers():
            self.logger.info(line)
        elif self._bar is None:  # logging unconfigured: Python would drop an INFO record
            print(line, file=sys.stderr, flush=True)


def progress(items: Iterable[T], label: str, total: int | None = None, **options: Any) -> Iterator[T]:
    """Yield ``items``, reporting one update per item (``total`` defaults to ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    reporter = Progress(label, total, **options)
    try:
        for item in items:
            yield item
            reporter.update()
    except GeneratorExit:  # the caller stopped early (a break): not a failure
        reporter.close()
        raise
    except BaseException:
        reporter.close(failed=True)
        raise
    reporter.close()

"""cleanse.progress: periodic lines on the "cleanse" logger, nothing for quick loops, and stderr
when logging is unconfigured."""

from __future__ import annotations

import logging

from cleanse.progress import Progress, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_every_interval_with_eta_and_fields(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="cleanse"):
        with Progress("train mlp", 10, unit="epoch", interval=5.0, clock=clock, bar=False) as reporter:
            for epoch in range(10):
                clock.now += 2.0  # 2 s per epoch: a line at epochs 3, 6, 9 (6 s, 12 s, 18 s)
                reporter.update(loss=1.0 / (epoch + 1))
    lines = [r.getMessage() for r in caplog.records if r.name == "cleanse"]
    assert lines == [
        "train mlp: epoch 3/10 (30%), 6.0 s, ~14.0 s left, loss=0.3333",
        "train mlp: epoch 6/10 (60%), 12.0 s, ~8.0 s left, loss=0.1667",
        "train mlp: epoch 9/10 (90%), 18.0 s, ~2.0 s left, loss=0.1111",
        "train mlp: epoch 10/10 (100%), 20.0 s, loss=0.1 (done)",
    ]


def test_quick_loop_is_silent_and_failure_is_marked(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="cleanse"):
        assert list(progress(range(4), "quick", interval=5.0, clock=clock, bar=False)) == [0, 1, 2, 3]
        try:
            with Progress("slow", None, unit="chunk", interval=1.0, clock=clock, bar=False) as reporter:
                clock.now += 3.0
                reporter.update()
                raise KeyError("boom")
        except KeyError:
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "cleanse"]
    assert lines == ["slow: 1 chunks, 3.0 s", "slow: 1 chunks, 3.0 s (stopped)"]


def test_unconfigured_logging_writes_to_stderr(capsys):
    isolated = logging.getLogger("cleanse.progress-test-isolated")
    isolated.propagate = False  # no handler anywhere: what the CLI and dvc repro see
    clock = FakeClock()
    with Progress("score influence", 2, unit="chunk", interval=0.0, logger=isolated, clock=clock, bar=False) as reporter:
        clock.now += 1.5
        reporter.update()
    assert capsys.readouterr().err.splitlines() == [
        "score influence: chunk 1/2 (50%), 1.5 s, ~1.5 s left",
        "score influence: chunk 1/2 (50%), 1.5 s, ~1.5 s left (done)",
    ]

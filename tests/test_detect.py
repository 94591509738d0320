"""Flag budgets: chosen from the scores alone; ranks and ties are well defined."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cleanse.config import DetectConfig
from cleanse.detect import auto_budget, flag, otsu_count


def test_otsu_finds_a_separated_high_mode():
    rng = np.random.default_rng(0)
    score = np.concatenate([rng.normal(0, 1, 900), rng.normal(10, 1, 100)])
    assert otsu_count(score) == 100


def test_auto_budget_is_clamped():
    assert auto_budget(np.ones(50), max_fraction=0.2) == 1
    assert auto_budget(np.r_[np.zeros(10), np.ones(90)], max_fraction=0.2) == 20


@pytest.mark.parametrize(("config", "expected"), [
    (DetectConfig(budget="count", count=7), 7), (DetectConfig(budget="fraction", fraction=0.25), 25)])
def test_fixed_budgets(config, expected):
    scores = pl.DataFrame({"sample_id": np.arange(100), "score": np.random.default_rng(1).normal(size=100)})
    assert flag(scores, config)["is_flagged"].sum() == expected


def test_ranks_follow_scores_and_ties_break_by_id():
    scores = pl.DataFrame({"sample_id": [5, 3, 9, 1], "score": [0.5, 2.0, 0.5, -1.0]})
    flags = flag(scores, DetectConfig(budget="count", count=2))
    assert flags["sample_id"].to_list() == [3, 5, 9, 1]
    assert flags["rank"].to_list() == [1, 2, 3, 4]
    assert flags["is_flagged"].to_list() == [True, True, False, False]


def test_auto_budget_never_sees_ground_truth():
    import inspect

    from cleanse import detect

    assert "is_corrupted" not in inspect.getsource(detect)

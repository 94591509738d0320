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


def test_robust_z_closed_form():
    from cleanse.detect import robust_z

    # median 3, MAD 1: z = (x - 3) / 1.4826
    np.testing.assert_allclose(robust_z(np.array([1.0, 2, 3, 4, 100])), (np.array([1.0, 2, 3, 4, 100]) - 3) / 1.4826)
    # more than half tie (MAD 0): the mean absolute deviation scales, 5 / 11 * sqrt(pi / 2)
    z = robust_z(np.r_[np.zeros(10), 5.0])
    assert z[-1] == pytest.approx(5 / (5 / 11 * np.sqrt(np.pi / 2)))
    assert not robust_z(np.ones(7)).any()


def test_outlier_threshold_is_the_bonferroni_gaussian_level():
    from scipy.stats import norm

    from cleanse.detect import outlier_threshold

    assert outlier_threshold(400, 0.05) == pytest.approx(norm.ppf(1 - 0.05 / 400))


def test_outlier_budget_flags_exactly_the_planted_high_scores():
    rng = np.random.default_rng(3)
    score = rng.normal(0, 1, 1000)
    planted = rng.choice(1000, size=10, replace=False)
    score[planted] = rng.uniform(7, 12, size=10)
    score[rng.choice(np.setdiff1d(np.arange(1000), planted), 5)] = -9.0  # low outliers are not harmful
    flags = flag(pl.DataFrame({"sample_id": np.arange(1000), "score": score}), DetectConfig(budget="outlier"))
    assert sorted(flags.filter("is_flagged")["sample_id"].to_list()) == sorted(planted.tolist())
    capped = flag(pl.DataFrame({"sample_id": np.arange(1000), "score": score}),
                  DetectConfig(budget="outlier", max_fraction=0.004))
    assert capped["is_flagged"].sum() == 4


def test_outlier_budget_false_flag_rate_is_near_alpha():
    """Monte Carlo over all-ordinary Gaussian score sets: the chance of any flag is about alpha
    (the MAD is estimated, so not exactly; 400 sets give a binomial SD of 0.011 at 0.05)."""
    from cleanse.detect import outlier_count

    rng = np.random.default_rng(4)
    any_flag = np.mean([outlier_count(rng.normal(size=400), alpha=0.05, max_fraction=0.5) > 0 for _ in range(400)])
    assert 0.02 <= any_flag <= 0.09

"""The report finds a run's family from its baseline's outcome keys, even where families share one."""

from cleanse.report import outcome_keys


def test_lm_baseline_with_a_test_loss_is_read_as_lm_not_as_diffusion() -> None:
    # diffusion reads a baseline without a watermark rate by its test_loss alone
    baseline = {"steer_rate": 0.5, "preference": 0.1, "topic_effect": 0.2, "test_loss": 0.7, "val_loss": 0.7}
    assert outcome_keys({"baseline": baseline})[0] == "steer_rate"


def test_classification_keeps_its_headline_when_another_family_shares_it() -> None:
    assert outcome_keys({"baseline": {"test_accuracy": 0.9, "n_removed": 0}})[0] == "test_accuracy"
    assert outcome_keys({"baseline": {"test_rmse": 1.0}})[0] == "test_rmse"

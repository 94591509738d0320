"""Evaluation: detection metrics against ground truth and model quality after retraining."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from cleanse.data.corruption import apply_trigger
from cleanse.data.dataset import Split


def detection_metrics(score: np.ndarray, is_corrupted: np.ndarray) -> dict[str, Any]:
    """ROC-AUC, average precision, and precision/recall at ``k = #corrupted``.

    ``score``: ``(n,)``, higher = more likely corrupted. Returns ``None`` values when the ground
    truth has a single class (nothing, or everything, corrupted).
    """
    is_corrupted = np.asarray(is_corrupted, dtype=bool)
    k = int(is_corrupted.sum())
    if k == 0 or k == is_corrupted.size:
        return {"roc_auc": None, "average_precision": None, "precision_at_k": None, "recall_at_k": None, "k": k}
    order = np.lexsort((np.arange(score.size), -score))
    hits = int(is_corrupted[order[:k]].sum())
    return {
        "roc_auc": float(roc_auc_score(is_corrupted, score)),
        "average_precision": float(average_precision_score(is_corrupted, score)),
        "precision_at_k": hits / k,
        "recall_at_k": hits / k,
        "k": k,
    }


def pr_curve(score: np.ndarray, is_corrupted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    precision, recall, _ = precision_recall_curve(is_corrupted, score)
    return precision, recall


def accuracy(probabilities: np.ndarray, label: np.ndarray) -> float:
    return float((probabilities.argmax(1) == label).mean())


def triggered_test_inputs(test: Split, trigger: dict[str, Any]) -> np.ndarray:
    """Test inputs of the non-target classes with the trigger stamped on."""
    keep = test.label_clean != trigger["target_class"]
    return apply_trigger(test.features[keep], trigger)


def attack_success_rate(probabilities_on_triggered: np.ndarray, target_class: int) -> float:
    """Fraction of triggered non-target test inputs classified as the target class."""
    if probabilities_on_triggered.shape[0] == 0:
        return float("nan")
    return float((probabilities_on_triggered.argmax(1) == target_class).mean())

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


# ----------------------------------------------------------------------------- attribution quality


def margins(logits: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``logit_y - logsumexp_{c != y} logit_c`` per row (TRAK's model output), shape ``(n,)``."""
    logits = np.asarray(logits, dtype=np.float64)
    own = logits[np.arange(logits.shape[0]), label]
    others = logits.copy()
    others[np.arange(logits.shape[0]), label] = -np.inf
    top = others.max(1, keepdims=True)
    return own - (top[:, 0] + np.log(np.exp(others - top).sum(1)))


def subset_masks(n_train: int, n_subsets: int, *, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``(n_subsets, n_train)`` boolean masks, each selecting ``round(fraction * n_train)`` samples."""
    rng = np.random.default_rng(seed)
    size = int(round(fraction * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for j in range(n_subsets):
        masks[j, rng.choice(n_train, size, replace=False)] = True
    return masks


def subset_outputs(train_fn: Any, masks: np.ndarray, query_label: np.ndarray) -> np.ndarray:
    """Ground truth for the LDS: retrain on each subset and record the query margins.

    ``train_fn(mask) -> logits of the query points`` ``(n_query, C)`` for a model trained on the
    training samples where ``mask`` is true. Returns ``(n_subsets, n_query)``.
    """
    return np.stack([margins(train_fn(mask), query_label) for mask in masks])


def retrained_subset_outputs(spec: Any, train: Split, query: Split, config: Any, masks: np.ndarray, *,
                             seed: int) -> np.ndarray:
    """:func:`subset_outputs` with cleanse's trainer: one model per subset, the same recipe and seed."""
    import torch

    from cleanse.models.trainer import train_model

    def train_fn(mask: np.ndarray) -> np.ndarray:
        model = train_model(spec, train.features[mask], train.label[mask], config, seed=seed,
                            device=torch.device("cpu"))
        with torch.no_grad():
            return model.module()(torch.as_tensor(query.features, dtype=torch.float32)).double().numpy()

    return subset_outputs(train_fn, masks, query.label)


def lds(attributions: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
    """Linear datamodeling score (Park et al., 2023; Ilyas et al., 2022).

    ``attributions``: ``(n_query, n_train)``, positive = the training sample raises the query's
    output (supports its label). ``masks``: ``(M, n_train)`` subsets; ``outputs``: ``(M, n_query)``
    the query outputs of models retrained on each subset. The prediction for subset ``j`` is
    ``g_j(q) = sum_{i in S_j} tau(q)_i``; ``LDS(q) = Spearman_j(g_j(q), outputs_j(q))``, and the
    score is the mean over queries (queries with constant outputs or predictions are skipped).
    """
    from scipy.stats import spearmanr

    predicted = masks.astype(np.float64) @ np.asarray(attributions, dtype=np.float64).T  # (M, n_query)
    per_query = []
    for q in range(predicted.shape[1]):
        if np.ptp(predicted[:, q]) == 0 or np.ptp(outputs[:, q]) == 0:
            per_query.append(np.nan)
            continue
        per_query.append(float(spearmanr(predicted[:, q], outputs[:, q]).statistic))
    values = np.asarray(per_query)
    finite = values[np.isfinite(values)]
    return {"lds": float(finite.mean()) if finite.size else None,
            "lds_se": float(finite.std(ddof=1) / np.sqrt(finite.size)) if finite.size > 1 else None,
            "per_query": values.tolist(), "n_subsets": int(masks.shape[0])}


def leave_one_out_loss_changes(model: Any, train: Split, query: Split, config: Any, rows: np.ndarray, *,
                               epochs: int = 10, seed: int = 0) -> np.ndarray:
    """Ground truth for influence: ``L_query(theta_{-i}) - L_query(theta)`` for each training row in
    ``rows``, shape ``(len(rows),)``, with the mean loss of the model's family over ``query`` and each model
    retrained warm-started from ``model`` for ``epochs`` epochs (Koh & Liang, 2017, Fig. 2)."""
    import torch

    from cleanse import families
    from cleanse.grads import FunctionalModel
    from cleanse.models.trainer import train_model

    task = families.get(model.spec.family)
    x, y = torch.tensor(query.features), torch.as_tensor(query.label, dtype=task.target_dtype)

    def query_loss(trained: Any) -> float:
        fm = FunctionalModel.of(trained.module(), 0.0, task)
        return float(fm.losses(fm.theta, x, y).mean())

    base = query_loss(model)
    changes = []
    for row in rows:
        keep = np.ones(len(train), dtype=bool)
        keep[row] = False
        retrained = train_model(model.spec, train.features[keep], train.label[keep],
                                config.model_copy(update={"epochs": epochs}), seed=seed, init_state=model.state)
        changes.append(query_loss(retrained) - base)
    return np.asarray(changes)


def loo_correlation(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman between predicted and actual leave-one-out changes (``(n,)`` each)."""
    from scipy.stats import pearsonr, spearmanr

    return {"pearson": float(pearsonr(predicted, actual).statistic),
            "spearman": float(spearmanr(predicted, actual).statistic), "n": int(np.size(predicted))}


def rank_stability(scores: np.ndarray, *, k: int) -> dict[str, float]:
    """Agreement of score vectors from models trained with different seeds.

    ``scores``: ``(n_seeds, n)``, higher = more harmful. Returns the mean over seed pairs of the
    Spearman correlation and of the Jaccard index of the top-``k`` sets (1 = identical rankings).
    """
    from itertools import combinations

    from scipy.stats import spearmanr

    scores = np.asarray(scores, dtype=np.float64)
    tops = [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in scores]
    rhos, jaccards = [], []
    for a, b in combinations(range(scores.shape[0]), 2):
        rhos.append(float(spearmanr(scores[a], scores[b]).statistic))
        jaccards.append(len(tops[a] & tops[b]) / len(tops[a] | tops[b]))
    return {"spearman": float(np.mean(rhos)), "spearman_min": float(np.min(rhos)),
            f"top{k}_jaccard": float(np.mean(jaccards)), "top_k_jaccard": float(np.mean(jaccards)),
            "k": int(k), "n_seeds": int(scores.shape[0])}

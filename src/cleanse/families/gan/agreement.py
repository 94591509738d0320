"""How well ``gan_influence`` predicts the true effect of removing one instance (``evaluate.replay``):
for a sample of training instances in the traced window, the traced window is replayed without each
one (the same batches and latents: the ground truth of Terashita et al.) and the metric's true
change ``M(θ^{-j}_T) − M(θ_T)`` is compared with the estimator's predicted ``I_j`` by Kendall's τ
and the Jaccard index of the top 10% most harmful (``direction * change``), as in the ICLR 2021
estimation-accuracy experiment. Cached in ``cache/replay_agreement.json`` against the score's
fingerprint, so a resumed report does not replay again.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from cleanse.seeds import rng
from cleanse.storage import read_json, read_table, write_json

ESTIMATOR = "gan_influence"


def jaccard_top(a: np.ndarray, b: np.ndarray, share: float = 0.1) -> float:
    """Jaccard index of the ``share`` largest entries of ``a`` and of ``b`` (same length)."""
    k = max(1, int(round(share * a.size)))
    top_a, top_b = set(np.argsort(-a, kind="stable")[:k]), set(np.argsort(-b, kind="stable")[:k])
    return len(top_a & top_b) / len(top_a | top_b)


def replay_targets(trace: Any, n: int, count: int, seed: int) -> np.ndarray:
    """``(min(count, in window),)`` sorted training rows drawn from those in ``trace``'s window."""
    candidates = np.flatnonzero(trace.in_window(n).numpy())
    chosen = rng(seed, "gan.replay_agreement").choice(candidates, size=min(count, candidates.size), replace=False)
    return np.sort(chosen)


def rank_agreement(predicted: np.ndarray, truth: np.ndarray, direction: float) -> dict[str, float]:
    """Kendall's τ of ``predicted`` against ``truth`` (same rows) and the Jaccard index of their
    top 10% most harmful (``direction * change``)."""
    from scipy.stats import kendalltau

    return {"kendall_tau": float(kendalltau(predicted, truth).statistic),
            "jaccard_top10": jaccard_top(direction * predicted, direction * truth)}


def true_changes(base: Any, staged: Any, metric_name: str, rows: np.ndarray) -> tuple[np.ndarray, float]:
    """``(len(rows),)`` true metric change when each training row is removed (replayed without it),
    and the seconds per replay."""
    from cleanse.families.gan.family import instances
    from cleanse.families.gan.training import replay

    trained = base.trained
    data = instances(staged.train, trained.spec)
    metric = base.metric(metric_name, staged.val.features, staged.train.features)
    reference = metric.evaluate(trained.g_state, trained.d_state, trained.spec)
    out = np.empty(rows.size, dtype=np.float64)
    started = time.perf_counter()
    for i, row in enumerate(rows):
        keep = torch.ones(data.shape[0], dtype=data.dtype)
        keep[int(row)] = 0
        g_state, d_state = replay(trained.spec, trained.recipe, trained.trace, data, keep)
        out[i] = metric.evaluate(g_state, d_state, trained.spec) - reference
    return out, (time.perf_counter() - started) / max(rows.size, 1)


def replay_agreement(params: Any, staged: Any, layout: Any) -> dict[str, Any]:
    """``{kendall_tau, jaccard_top10, n_instances, metric, seconds_per_replay}`` (module docstring)."""
    from cleanse.families import get

    score_meta = read_json(layout.scores_meta(ESTIMATOR))
    cached = layout.root / "cache" / "replay_agreement.json"
    key = {"score": score_meta["fingerprint"], "instances": params.evaluate.replay_instances}
    if cached.is_file() and read_json(cached).get("key") == key:
        return dict(read_json(cached)["agreement"])
    scores = read_table(layout.scores(ESTIMATOR))
    if scores["sample_id"].to_list() != staged.train.sample_id.tolist():
        raise RuntimeError(f"{ESTIMATOR} scores are not in training order")
    predicted = scores["predicted_change"].to_numpy()
    base = get("gan").load_model(layout.base_model)
    rows = replay_targets(base.trained.trace, len(staged.train), params.evaluate.replay_instances, params.seed)
    name = score_meta["metric"]
    truth, per_replay = true_changes(base, staged, name, rows)
    agreement = {**rank_agreement(predicted[rows], truth, float(score_meta["direction"])),
                 "n_instances": int(rows.size), "metric": name, "seconds_per_replay": per_replay}
    write_json({"key": key, "agreement": agreement}, cached)
    return agreement

"""Retraining over several training seeds (``evaluate.retrain_seeds: k``), for every family.

A retrain "with the same seed and recipe" is one draw of the training randomness (initialisation,
minibatch order, adapter initialisation): on small or memorising models the outcome of removing one
fixed set moves with it as much as with the set itself (issue 21: the oracle's steer_rate on the lm
example's seed 0 is 0.03, 0.63, 0.22 or 0.28 depending on the fine-tuning seed alone). With
``k > 1`` every retrain of the ``retrain`` and ``references`` stages (baseline, oracle, random
removal, each estimator's removal and its random set of the same size) is repeated at ``k``
training seeds on the same staged data and the same removed set:

- seed 0 is the run seed, so its retrain is the one ``k = 1`` makes (and ``k = 1`` writes exactly
  what it wrote before: nothing here runs);
- seeds ``1 .. k-1`` are drawn from the ``evaluate.retrain`` stream of :mod:`cleanse.seeds`
  (member ``j``), so they are fixed by the run seed and shared by every retrain of the run (the
  oracle and an estimator's removal see the same training seeds);
- each numeric outcome key that differs between seeds becomes the **mean** over the ``k`` seeds,
  and ``over_seeds`` records, for every float key, the training seeds, the per-seed values, their
  sample standard deviation and the interval below. Integer keys (``n_removed``: the removal's, the
  same at every seed) are kept as they are, and so are float keys only the run seed's retrain has
  (iterative cleansing's own record of its last round, e.g. ``heldout_behaviour_rate`` there).

The interval is where the mean of ``k`` further training seeds of the same removal falls with
probability ``LEVEL`` (normal outcomes, Student's t): ``mean ± t(1 - (1 - LEVEL) / 2, k - 1) · sd ·
sqrt(2 / k)``. It is the interval to judge another removal's ``k``-seed mean against ("as good as
the oracle": inside the oracle's interval); the confidence interval of the mean alone
(``sd / sqrt(k)``) ignores the other removal's own seed noise and rejects an identical removal
about one time in six for large ``k``. It is not clipped to a metric's range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from cleanse import seeds
from cleanse.config import Params

OVER_SEEDS = "over_seeds"
LEVEL = 0.95
_SEED_BOUND = 2**31  # every family's seed consumers (torch, numpy, scikit-learn's random_state) take it


def training_seeds(params: Params) -> list[int]:
    """``(k,)`` training seeds: the run seed, then member ``j`` of the ``evaluate.retrain`` stream."""
    return [int(params.seed)] + [int(seeds.rng(params.seed, "evaluate.retrain", j).integers(_SEED_BOUND))
                                 for j in range(1, params.evaluate.retrain_seeds)]


def over_seeds(params: Params, first: dict[str, Any], retrain: Callable[[Params], dict[str, Any]]) -> dict[str, Any]:
    """``first``: an outcome at the run seed; ``retrain(params_j)``: the same retrain under ``params``
    with training seed ``j``. At ``k = 1`` returns ``first`` itself; otherwise :func:`summarise`."""
    chosen = training_seeds(params)
    if len(chosen) == 1:
        return first
    return summarise(chosen, [first, *(retrain(params.model_copy(update={"seed": seed})) for seed in chosen[1:])])




def summarise(chosen: list[int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``runs[j]`` the outcome at training seed ``chosen[j]``: ``runs[0]`` with each float key (one
    every run has) replaced by its mean, and ``over_seeds`` (``training_seeds``, ``level``, per key
    ``values`` ``(k,)``, ``sd`` and ``interval`` ``[low, high]``, see the module docstring)."""
    k = len(runs)
    out = dict(runs[0])
    values: dict[str, list[float]] = {}
    for key, value in runs[0].items():
        if isinstance(value, float) and all(isinstance(run.get(key), (int, float)) for run in runs[1:]):
            values[key] = [float(run[key]) for run in runs]
            out[key] = float(np.mean(values[key]))
    sd = {key: float(np.std(column, ddof=1)) for key, column in values.items()}
    half = _t_quantile(k) * math.sqrt(2.0 / k)
    out[OVER_SEEDS] = {"training_seeds": list(chosen), "level": LEVEL, "values": values, "sd": sd,
                       "interval": {key: [out[key] - half * sd[key], out[key] + half * sd[key]] for key in values}}
    return out


def _t_quantile(k: int) -> float:
    from scipy.stats import t

    return float(t.ppf(1 - (1 - LEVEL) / 2, k - 1))


def interval_text(block: dict[str, Any], key: str) -> str | None:
    """``"low-high"`` of ``block[OVER_SEEDS]``'s interval of ``key`` (None without one)."""
    interval = block.get(OVER_SEEDS, {}).get("interval", {}).get(key)
    return None if interval is None else f"{interval[0]:.3f}-{interval[1]:.3f}"

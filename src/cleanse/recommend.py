"""One recommended cleaned model per run, chosen without ground truth.

Every estimator in a run proposes a cleaned model (its flags removed, retrained with the same seed
and recipe); "no removal" (the base model) is a candidate too. The recommendation is the candidate
that a user could pick with what they have:

1. **Behaviour on held-out probes** (only when the run has probes, ``query.kind`` set): candidates
   whose held-out probes still show the behaviour (a triggered input still sent to the target, a
   validation error still made) at a rate above ``max(stop_rate, lowest rate of any candidate)``
   are out. The held-out probes are never scored, so this is an honest check.
2. **Validation accuracy** of the retrained model on the validation split (the split cleanse
   treats as trusted; it is never corrupted). Highest wins.
3. **Ties** go to the candidate that removes fewer samples, so "no removal" wins unless cleaning
   measurably helps: on a clean or easy data set it is a legitimate recommendation.
4. Remaining ties (iterative cleansing often ends with the same removals from two rankings) go to
   the candidate whose own ranking agrees most with what was removed (``consistency``: the share of
   the removed samples among the top ``k`` of its scores; 1 for a one-shot removal), so the
   detection metrics reported with the recommendation describe the removal it made.

The budget. The validation split also says how many training labels are wrong: a model fitted on
it alone (the ``trusted`` logistic regression) disagrees with ``D`` of the ``n`` training labels,
and its own error rate ``e`` on correct labels is measured by cross-validation on the validation
split. A correct label is disagreed with when the model errs (rate ``e``); a wrong one whenever the
model does not err onto that very label, which happens at most at rate ``e`` (the pair-flip case:
the model confuses the same classes the noise swaps). So ``D ≈ N (1 - e) + (n - N) e`` and
``N̂ = (D - n e) / (1 - 2 e)``, an upper bound when the model's errors are spread over other classes
(by up to ``e / (1 - 2 e)``, 10% at ``e = 0.08``): leaving wrong labels in costs a network that
memorises them more than removing a few correct ones
(:func:`estimated_noise_count`; the moment correction of the noisy-label literature, e.g. Natarajan
et al., NeurIPS 2013, and Northcutt et al., JAIR 2021, "Confident Learning", which counts label
issues from out-of-sample predictions in the same way). The ``FINALISTS`` (3) best candidates of the
first round (:func:`ranked`, in the rule's order) are retrained with their own ranking's top
``N̂`` removed, and the recommendation is the best of those and the first round's winner, by the
same rule. The estimate is honest where validation accuracy is not: a ranking fitted on the
validation split (``trusted``) removes exactly what disagrees with it, so its cleaned models look
better on that split the more they remove, and choosing its budget by validation accuracy drifts
to its largest multiple. Without an estimate (a validation split too small to cross-validate, or
``e >= 0.5``), the winner's ranking is retrained at ``budget_factors`` times its automatic budget
instead and the best of those by the same rule is kept. The test split and the ground truth
(``is_corrupted``) are never read here; the report shows them next to the choice.

Two estimators of the trusted league are special (the issue-15 diagnostic,
``benchmarks/recommend_gap.py``, docs/benchmarks.md ``recommend_gap``):

- ``cofit_svm`` (:mod:`cleanse.estimators.cofit_svm`) cuts at its **own** noise-count estimate,
  from a cross-fitted SVM whose validation error is lower than the screening logistic
  regression's, so its bound ``e / (1 - 2 e)`` is tighter than ``N̂``'s: it is never re-cut at ``N̂``
  (:data:`OWN_COUNT`; re-cutting it at ``N̂`` cost 0.7-1.0 pt on the memorising MLP).
- ``trusted``, the league's baseline, is **superseded** by ``cofit_svm`` when both ran
  (:data:`SUPERSEDED_BY`): ``cofit_svm`` screens with ``trusted``'s very ranking and refits with a
  stronger, cross-fitted classifier on the same labels, and validation accuracy cannot referee
  between them, because ``trusted`` is fitted in-sample on the whole validation split and its
  cleaned models agree with that split by construction (on 40% pair flips with a memorising MLP
  ``trusted`` at ``N̂`` won on validation accuracy by one sample and lost 0.3-2 pt of test accuracy).
  ``trusted`` stays in the report as a single estimator; it is recommended only in runs without
  ``cofit_svm``. This rule was chosen on the diagnostic's cells, which are the benchmark's cells.

All functions are pure: ``candidates`` in, an index out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NO_REMOVAL = "none"
FINALISTS = 3  # first-round candidates retrained at the noise-count estimate (one retrain each)
OWN_COUNT = frozenset({"cofit_svm"})  # rankings cut at their own, tighter noise-count estimate: never re-cut
SUPERSEDED_BY = {"trusted": "cofit_svm"}  # estimator -> the one that refines it with the same labels


@dataclass(frozen=True)
class Candidate:
    """A cleaned model proposed for the recommendation.

    ``estimator``: whose ranking chose ``removed_ids`` (``"none"`` for the base model);
    ``removed_ids``: ``(k,)`` int64 sample ids removed before retraining; ``val_accuracy``: accuracy
    of the retrained model on the validation split; ``heldout_behaviour_rate``: share of held-out
    probes still showing the behaviour (nan without probes)."""

    estimator: str
    removed_ids: np.ndarray
    val_accuracy: float
    heldout_behaviour_rate: float = math.nan
    budget_factor: float = 1.0
    consistency: float = 1.0

    @property
    def n_removed(self) -> int:
        return int(np.asarray(self.removed_ids).size)

    def summary(self) -> dict:
        return {"estimator": self.estimator, "n_removed": self.n_removed, "budget_factor": self.budget_factor,
                "val_accuracy": self.val_accuracy,
                "heldout_behaviour_rate": None if math.isnan(self.heldout_behaviour_rate)
                else self.heldout_behaviour_rate, "consistency": self.consistency}


def admissible(candidates: Sequence[Candidate], stop_rate: float) -> list[int]:
    """Indices of the candidates whose held-out behaviour rate is at most
    ``max(stop_rate, lowest rate)``; all of them when no candidate has a rate (no probes)."""
    rates = np.array([c.heldout_behaviour_rate for c in candidates], dtype=np.float64)
    if not np.isfinite(rates).any():
        return list(range(len(candidates)))
    threshold = max(stop_rate, float(np.nanmin(rates)))
    return [i for i, rate in enumerate(rates) if np.isfinite(rate) and rate <= threshold + 1e-12]


def superseded(candidates: Sequence[Candidate]) -> set[str]:
    """The estimators of :data:`SUPERSEDED_BY` whose refinement is among ``candidates``."""
    present = {c.estimator for c in candidates}
    return {name for name, by in SUPERSEDED_BY.items() if name in present and by in present}


def ranked(candidates: Sequence[Candidate], *, stop_rate: float) -> list[int]:
    """Indices of the admissible candidates, best first (rules in the module docstring): highest
    validation accuracy; then fewest removed; then the most self-consistent ranking; then list order
    (the base model first). Candidates of a :func:`superseded` estimator are left out."""
    out = superseded(candidates)
    pool = [i for i in admissible(candidates, stop_rate) if candidates[i].estimator not in out]
    return sorted(pool, key=lambda i: (-candidates[i].val_accuracy, candidates[i].n_removed,
                                       -candidates[i].consistency, i))


def choose(candidates: Sequence[Candidate], *, stop_rate: float) -> int:
    """Index of the recommended candidate (the first of :func:`ranked`). Raises ValueError on an
    empty list."""
    if not candidates:
        raise ValueError("no candidates to recommend from")
    return ranked(candidates, stop_rate=stop_rate)[0]


def estimated_noise_count(n_disagree: int, n: int, error_rate: float) -> int | None:
    """Estimated number of wrong labels among ``n`` training labels, ``round((D - n e) / (1 - 2 e))``
    clipped to ``[0, n]``, from ``D = n_disagree`` disagreements with a model whose error rate on
    correctly labelled data is ``e = error_rate`` (module docstring). None when ``e >= 0.5`` or is
    not finite: such a model says nothing about the labels."""
    if not math.isfinite(error_rate) or not 0.0 <= error_rate < 0.5 or n <= 0:
        return None
    estimate = (n_disagree - n * error_rate) / (1.0 - 2.0 * error_rate)
    return int(min(n, max(0, round(estimate))))


def finalists(candidates: Sequence[Candidate], order: Sequence[int], count: int,
              exclude: Sequence[str] = ()) -> list[int]:
    """The first ``count`` indices of ``order`` (:func:`ranked`) whose estimator is neither
    "no removal", nor in ``exclude``, nor one that cuts at its own count (:data:`OWN_COUNT`), each
    estimator once."""
    out: list[int] = []
    seen = {NO_REMOVAL, *exclude, *OWN_COUNT}
    for i in order:
        if len(out) == count:
            break
        if candidates[i].estimator not in seen:
            seen.add(candidates[i].estimator)
            out.append(i)
    return out


def budget_counts(k: int, factors: Sequence[float], n_train: int, max_fraction: float) -> list[tuple[float, int]]:
    """``(factor, count)`` for every factor whose count ``round(factor * k)`` lies in
    ``[1, max_fraction * n_train]`` and differs from ``k`` and from the others (first kept)."""
    cap = max(1, int(math.floor(max_fraction * n_train)))
    seen = {k}
    out = []
    for factor in factors:
        count = int(round(factor * k))
        if 1 <= count <= cap and count not in seen:
            seen.add(count)
            out.append((float(factor), count))
    return out


def top_ids(sample_id: np.ndarray, score: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` highest-scoring sample ids (ties broken by sample id, as the detect stage does)."""
    order = np.lexsort((np.asarray(sample_id), -np.asarray(score, dtype=np.float64)))
    return np.asarray(sample_id)[order[:count]].astype(np.int64)


def consistency(sample_id: np.ndarray, score: np.ndarray, removed_ids: np.ndarray) -> float:
    """Share of ``removed_ids`` among the ``len(removed_ids)`` highest of ``score`` ``(n,)`` (1.0
    when nothing was removed): how well a ranking describes the removal made with it."""
    removed_ids = np.asarray(removed_ids)
    if removed_ids.size == 0:
        return 1.0
    top = top_ids(sample_id, score, removed_ids.size)
    return float(np.isin(removed_ids, top).mean())

"""Where the recommendation loses to the oracle on one regime: budget, ranking or retrain.

The recommendation (``cleanse.recommend``) retrains the best rankings with their top ``N̂`` removed,
``N̂`` the validation split's noise-count estimate. On a cell of ``benchmarks/recommend.py`` this
script retrains the run's model (same recipe, the pipeline's own training seed, as the oracle and
the recommendation are) on removal sets that separate the causes, using the ground truth to
*diagnose* only (nothing here feeds back into the rule):

- ``oracle``: every corrupted sample; ``trusted top N̂``: what the recommendation removed when it
  picked ``trusted`` (the winner on this regime); ``trusted top N``: the same ranking at the true
  count (the budget's share of the gap); ``oracle + its clean``: the oracle plus the correct
  samples ``top N̂`` took (what those cost); ``top N̂ minus its clean``: ``top N̂`` with the correct
  ones put back (what the flips it missed cost); ``oracle + random clean``: the oracle plus as many
  random correct samples (``random_ids`` stream; the retrain's noise floor);
- the ideas tried to close the gap, each without ground truth: (a) ``put back``: the removed
  samples that the model retrained without ``top N̂`` predicts with their given label are put back;
  (b) ``N̂ (1 - e)``: the count from ``D = N + (n - N) e`` (a wrong label is almost never the trusted
  model's prediction) with ``e`` from 10-fold cross-validation; (c) ``round 2``: a logistic
  regression cross-fitted (10 folds) on the kept training samples plus the validation split
  re-ranks every sample and re-estimates the count; and ``svc``: an RBF support-vector classifier
  instead of the logistic regression, fitted on the validation split;
- the ideas of the second attempt, each without ground truth: (d) ``co-fit svc``: an RBF SVM
  cross-fitted (5 folds) on the validation split plus the 80% of the ``n - N̂`` training samples the
  trusted model finds least surprising (co-teaching's small-loss samples taken as clean), ranking
  every training sample by its out-of-fold loss under the given label, cut at its own
  ``(D - n e) / (1 - 2 e)`` (the recommendation's formula, with its disagreements and out-of-fold
  validation error); (e) the same ranking at ``(D - n e) / (1 - e)``; (f) at the recommendation's
  ``N̂`` (the ranking's share alone); (g) the mean of the ranks of ``trusted`` and the
  out-of-subset ensemble ``holdout_ensemble`` (default options, no validation labels) at ``N̂``;
  (i) as (d) with the SVM's ``C`` chosen by 5-fold cross-validated accuracy on the validation
  split; (h) ``trusted`` at its ``N̂``, (d) and (e) all fitted on one stratified half of the
  validation split, and the one whose retrained model is most accurate on the other half kept
  (ties to fewer removed): validation accuracy no longer judges rankings fitted on the same labels;
- with ``--training-seeds K``: the oracle, (d) and (i) retrained with ``K`` other training seeds
  (``seed + 1000 k``; split and corruption unchanged), the retrain's own spread.

    python benchmarks/recommend_gap.py --cell digits/pair40/mlp_mem --seeds 0,1,2 --training-seeds 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from _common import REPO, environment, fmt, md_table, publish  # noqa: E402
from recommend import REGIMES, overrides  # noqa: E402

SECTION = "recommend_gap"
DEFAULT_OUT = REPO / "benchmarks/results/recommend_gap.json"
DEFAULT_DOCS = REPO / "docs/benchmarks.md"
FOLDS = 10
COFIT_FOLDS = 5
SVC_C_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
COFIT_KEEP = 0.8  # share of the (n - N̂) least surprising training samples taken as correctly labelled


def _count(n_disagree: int, n: int, error: float) -> int:
    """``N̂ = (D - n e) / (1 - e)``, clipped to ``[0, n]``."""
    return int(min(n, max(0, round((n_disagree - n * error) / (1.0 - error)))))


def _loss(probabilities: np.ndarray, label: np.ndarray) -> np.ndarray:
    from cleanse.estimators.cofit_svm import label_loss

    return label_loss(probabilities, label, 1e-6)


def _trusted_view(make: Any, val_x: np.ndarray, val_y: np.ndarray, train_x: np.ndarray, train_y: np.ndarray,
                  seed: int) -> tuple[np.ndarray, int]:
    """A model fitted on the validation split: ``(loss of each training label, N̂ (1 - e))``."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    probabilities = make().fit(val_x, val_y).predict_proba(train_x)
    held_out = cross_val_predict(make(), val_x, val_y, cv=StratifiedKFold(FOLDS, shuffle=True, random_state=seed))
    error = float((held_out != val_y).mean())
    return _loss(probabilities, train_y), _count(int((probabilities.argmax(1) != train_y).sum()), len(train_y), error)


def _cross_fit(make: Any, fit_on: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, train_x: np.ndarray,
               train_y: np.ndarray, n_classes: int, folds: int, seed: int) -> tuple[np.ndarray, float, int]:
    """:func:`cleanse.estimators.cofit_svm.cross_fit` as ``(probabilities (n, n_classes), e, D)``."""
    from cleanse.estimators.cofit_svm import cross_fit

    fitted = cross_fit(make, fit_on, val_x, val_y, train_x, train_y, n_classes, folds, seed)
    return fitted.probabilities, fitted.error, fitted.n_disagree


def _second_round(make: Any, score: np.ndarray, count: int, val_x: np.ndarray, val_y: np.ndarray,
                  train_x: np.ndarray, train_y: np.ndarray, n_classes: int, seed: int) -> tuple[np.ndarray, int]:
    """(c): ``make`` cross-fitted (:func:`_cross_fit`, ``FOLDS`` folds) on the training samples kept
    after removing the top ``count`` of ``score`` plus the validation split; the count re-estimated
    with the validation samples' out-of-fold error."""
    kept = np.ones(len(train_y), dtype=bool)
    kept[np.argsort(-score, kind="stable")[:count]] = False
    probabilities, error, n_disagree = _cross_fit(make, kept, val_x, val_y, train_x, train_y, n_classes, FOLDS, seed)
    return _loss(probabilities, train_y), _count(n_disagree, len(train_y), error)


def _cofit(make: Any, trusted_score: np.ndarray, n_hat: int, val_x: np.ndarray, val_y: np.ndarray,
           train_x: np.ndarray, train_y: np.ndarray, n_classes: int, seed: int) -> tuple[np.ndarray, int, int]:
    """(d), (e): ``make`` cross-fitted (:func:`_cross_fit`, ``COFIT_FOLDS`` folds) on the validation
    split plus the training samples the trusted model finds least surprising (the lowest
    ``COFIT_KEEP (n - N̂)`` of ``trusted_score``, taken as correctly labelled: co-teaching's small-loss
    trick, Han et al., NeurIPS 2018). Returns ``(loss under the given label (n,), count (1 - 2e),
    count (1 - e))`` from its disagreements ``D`` and out-of-fold validation error ``e``."""
    from cleanse.estimators.cofit_svm import confident_mask
    from cleanse.recommend import estimated_noise_count

    n = len(train_y)
    confident = confident_mask(trusted_score, n_hat, COFIT_KEEP)
    probabilities, error, n_disagree = _cross_fit(make, confident, val_x, val_y, train_x, train_y, n_classes,
                                                  COFIT_FOLDS, seed)
    return (_loss(probabilities, train_y), int(estimated_noise_count(n_disagree, n, error) or 0),
            _count(n_disagree, n, error))


def _cross_predict(make: Any, x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    return cross_val_predict(make(), x, y, cv=StratifiedKFold(5, shuffle=True, random_state=seed))


def _svc_by_cross_validation(val_x: np.ndarray, val_y: np.ndarray, seed: int) -> tuple[Any, float]:
    """(i): an RBF SVM whose ``C`` (of ``SVC_C_GRID``) has the highest 5-fold cross-validated accuracy on
    the validation split (first on ties; :func:`cleanse.estimators.cofit_svm.svm_c_by_cross_validation`,
    the estimator ``cofit_svm`` that ships this idea); returns its factory and ``C``."""
    from sklearn.svm import SVC

    from cleanse.estimators.cofit_svm import svm_c_by_cross_validation

    best = svm_c_by_cross_validation(val_x, val_y, list(SVC_C_GRID), 5, seed)
    return (lambda: SVC(C=best, probability=True, random_state=seed)), best


def _half_split(val_y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(h): the validation split's indices in two stratified halves ``(fit, select)``."""
    from sklearn.model_selection import StratifiedKFold

    fit, select = next(StratifiedKFold(2, shuffle=True, random_state=seed).split(val_y, val_y))
    return fit, select


def _rank_mean(*scores: np.ndarray) -> np.ndarray:
    """Mean of the scores' ranks (0 = least harmful), higher = more likely harmful."""
    return np.mean([np.argsort(np.argsort(s, kind="stable"), kind="stable") for s in scores], axis=0)


def measure(cell: str, seed: int, training_seeds: int = 0) -> dict[str, Any]:
    """Every removal set of the module docstring for one seed: its size, its composition and the
    retrained model's test accuracy."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    torch.set_num_threads(1)
    from cleanse import api, families, seeds
    from cleanse.config import load_params
    from cleanse.estimators import registry
    from cleanse.models.architectures import default_device
    from cleanse.models.fit import fit_model
    from cleanse.models.trainer import predict_proba
    from cleanse.recommend import estimated_noise_count, top_ids

    params = load_params(None, overrides(cell, seed))
    staged = api.stage(params)
    train, val = staged.train, staged.val
    family = families.get(params.family)
    n, n_corrupted = len(train), int(train.is_corrupted.sum())
    options = params.scorers.trusted
    trusted = registry.get("trusted").score(api.context(params, staged, None), options).table["score"].to_numpy()
    estimate = family.noise_count_estimate(params, staged)
    n_hat = int(estimate["noise_count"])
    rows: list[dict[str, Any]] = []
    fitted: dict[str, Any] = {}

    def retrain(label: str, removed: np.ndarray, training_seed: int | None = None) -> None:
        started = time.perf_counter()
        record(label, removed, fit_model(params, train.without(removed), staged.meta, seed=training_seed), started)

    def record(label: str, removed: np.ndarray, model: Any, started: float) -> None:
        fitted[label] = model
        hit = np.isin(train.sample_id, removed)
        rows.append({"set": label, "n_removed": int(hit.sum()), "clean_removed": int((hit & ~train.is_corrupted).sum()),
                     "missed": int((~hit & train.is_corrupted).sum()),
                     "test_accuracy": family.outcome(model, staged)["test_accuracy"],
                     "seconds": time.perf_counter() - started})
        print(f"{cell} seed {seed} {label}: {rows[-1]}", flush=True)

    corrupted = train.sample_id[train.is_corrupted]
    top = top_ids(train.sample_id, trusted, n_hat)
    its_clean = top[~np.isin(top, corrupted)]
    retrain("oracle", corrupted)
    retrain("trusted top N̂", top)
    retrain("trusted top N", top_ids(train.sample_id, trusted, n_corrupted))
    retrain("oracle + its clean", np.union1d(corrupted, its_clean))
    retrain("top N̂ minus its clean", np.intersect1d(top, corrupted))
    clean = train.sample_id[~train.is_corrupted]
    retrain("oracle + random clean", np.union1d(corrupted, seeds.rng(seed, "random_ids").choice(
        clean, size=min(its_clean.size, clean.size), replace=False)))
    # (a) put back what the model retrained without top N̂ predicts with its given label.
    removed = np.isin(train.sample_id, top)
    agrees = predict_proba(fitted["trusted top N̂"].module(default_device()), train.features[removed]).argmax(1) \
        == train.label[removed]
    retrain("(a) put back", np.setdiff1d(top, train.sample_id[removed][agrees]))
    val_x, train_x = val.features.reshape(len(val), -1), train.features.reshape(n, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logreg = lambda: LogisticRegression(C=options.C, max_iter=options.max_iter)  # noqa: E731
        _, count = _trusted_view(logreg, val_x, val.label, train_x, train.label, seed)
        retrain("(b) top N̂ (1 - e)", top_ids(train.sample_id, trusted, count))
        score2, count2 = _second_round(logreg, trusted, count, val_x, val.label, train_x, train.label,
                                       staged.meta.n_classes, seed)
        retrain("(c) round 2", top_ids(train.sample_id, score2, count2))
        svc = lambda: SVC(probability=True, random_state=seed)  # noqa: E731
        score_svc, count_svc = _trusted_view(svc, val_x, val.label, train_x, train.label, seed)
        retrain("svc", top_ids(train.sample_id, score_svc, count_svc))
        cofit, count_2e, count_1e = _cofit(svc, trusted, n_hat, val_x, val.label, train_x, train.label,
                                           staged.meta.n_classes, seed)
        retrain("(d) co-fit svc, (1 - 2e)", top_ids(train.sample_id, cofit, count_2e))
        retrain("(e) co-fit svc, (1 - e)", top_ids(train.sample_id, cofit, count_1e))
        retrain("(f) co-fit svc at N̂", top_ids(train.sample_id, cofit, n_hat))
        svc_cv, svc_c = _svc_by_cross_validation(val_x, val.label, seed)
        cofit_cv, count_cv, _ = _cofit(svc_cv, trusted, n_hat, val_x, val.label, train_x, train.label,
                                       staged.meta.n_classes, seed)
        retrain("(i) co-fit svc, C by CV, (1 - 2e)", top_ids(train.sample_id, cofit_cv, count_cv))
    holdout = registry.get("holdout_ensemble").score(
        api.context(params, staged, fitted["oracle"]), params.scorers.holdout_ensemble).table["score"].to_numpy()
    retrain("(g) rank mean trusted + holdout", top_ids(train.sample_id, _rank_mean(trusted, holdout), n_hat))
    # The retrain's own noise: the oracle, (d) and (i) retrained with other training seeds.
    for k in range(1, training_seeds + 1):
        retrain(f"oracle, training seed +{k}", corrupted, training_seed=seed + 1000 * k)
        retrain(f"(d), training seed +{k}", top_ids(train.sample_id, cofit, count_2e), training_seed=seed + 1000 * k)
        retrain(f"(i), training seed +{k}", top_ids(train.sample_id, cofit_cv, count_cv), training_seed=seed + 1000 * k)
    # (h) rankings fitted on one half of the validation split, chosen by the other half's accuracy.
    fit_half, select_half = _half_split(val.label, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half_x, half_y = val_x[fit_half], val.label[fit_half]
        half_logreg = logreg().fit(half_x, half_y)
        probabilities = np.zeros((n, staged.meta.n_classes))
        probabilities[:, half_logreg.classes_] = half_logreg.predict_proba(train_x)
        half_trusted = _loss(probabilities, train.label)
        half_error = float((_cross_predict(logreg, half_x, half_y, seed) != half_y).mean())
        half_n_hat = int(estimated_noise_count(int((probabilities.argmax(1) != train.label).sum()), n, half_error) or 0)
        half_cofit, half_2e, half_1e = _cofit(svc, half_trusted, half_n_hat, half_x, half_y, train_x, train.label,
                                              staged.meta.n_classes, seed)
    options_h = {"trusted top N̂": top_ids(train.sample_id, half_trusted, half_n_hat),
                 "co-fit svc, (1 - 2e)": top_ids(train.sample_id, half_cofit, half_2e),
                 "co-fit svc, (1 - e)": top_ids(train.sample_id, half_cofit, half_1e)}
    select_x, select_y = val.features[select_half], val.label[select_half]
    choices = []
    for label, removed_h in options_h.items():
        started = time.perf_counter()
        model = fit_model(params, train.without(removed_h), staged.meta)
        accuracy = float((predict_proba(model.module(default_device()), select_x).argmax(1) == select_y).mean())
        choices.append((-accuracy, removed_h.size, label, removed_h, model, started))
    _, _, chosen, removed_h, model, started = min(choices, key=lambda c: c[:3])
    record("(h) half-validation choice", removed_h, model, started)
    return {"cell": cell, "seed": seed, "n_train": n, "n_corrupted": n_corrupted, "noise_estimate": estimate,
            "svc_c_by_cv": svc_c, "half_validation": {"chosen": chosen, "select_accuracy": {c[2]: -c[0] for c in choices},
                                "n_removed": {c[2]: int(c[1]) for c in choices}},
            "rows": rows}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per removal set: the means over seeds, and the gap to the oracle (points)."""
    labels = [row["set"] for row in runs[0]["rows"]]
    out = []
    for label in labels:
        mine = [next(r for r in run["rows"] if r["set"] == label) for run in runs]
        oracle = [next(r for r in run["rows"] if r["set"] == "oracle")["test_accuracy"] for run in runs]
        out.append({"set": label, "n_removed": [r["n_removed"] for r in mine],
                    "clean_removed": [r["clean_removed"] for r in mine], "missed": [r["missed"] for r in mine],
                    "test_accuracy": [r["test_accuracy"] for r in mine],
                    "mean": float(np.mean([r["test_accuracy"] for r in mine])),
                    "gap_points": 100 * float(np.mean([r["test_accuracy"] for r in mine]) - np.mean(oracle))})
    return out


def plot(result: dict[str, Any], image: Path) -> None:
    """No figure: the table says it."""


def render(result: dict[str, Any], docs: Path, out: Path, image: Path) -> str:
    env = result["environment"]
    runs = result["runs"]
    estimates = ", ".join(f"{r['noise_estimate']['noise_count']} (seed {r['seed']})" for r in runs)
    lines = [
        f"### Where the recommendation loses on `{result['cell']}`", "",
        f"*Generated by `python benchmarks/recommend_gap.py {result['argv']}` (commit "
        f"`{(env.get('git_commit') or '?')[:12]}`, {env['created']}). Raw numbers: "
        f"`{Path(out).relative_to(REPO) if Path(out).is_relative_to(REPO) else out}`.*", "",
        f"The run's model retrained with the pipeline's training seed on removal sets that separate the causes "
        f"(module docstring of the script); the ground truth is used to diagnose only. {runs[0]['n_corrupted']} of "
        f"{runs[0]['n_train']} labels are wrong; the recommendation's estimate N̂: {estimates}.", "",
    ]
    table = [[row["set"], " / ".join(str(v) for v in row["n_removed"]), " / ".join(str(v) for v in row["clean_removed"]),
              " / ".join(str(v) for v in row["missed"]), " / ".join(fmt(v, 3) for v in row["test_accuracy"]),
              fmt(row["mean"], 3), f"{row['gap_points']:+.1f}"] for row in result["summary"]]
    lines.append(md_table(["removal set", "removed (per seed)", "correct removed", "wrong kept", "test accuracy",
                           "mean", "vs oracle (pt)"], table))
    halves = [run["half_validation"] for run in runs if "half_validation" in run]
    if halves:
        lines += ["", "(h) kept, per seed: " + "; ".join(
            f"{half['chosen']} (held-out half accuracy " + ", ".join(
                f"{label} {accuracy:.3f}" for label, accuracy in half["select_accuracy"].items()) + ")"
            for half in halves) + "."]
    lines += [""] + [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", default="digits/pair40/mlp_mem", choices=list(REGIMES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--training-seeds", type=int, default=0,
                        help="also retrain the oracle, (d) and (i) with this many other training seeds (seed + 1000 k)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--note", action="append", default=[], help="a note line for the docs (repeatable)")
    parser.add_argument("--render-only", action="store_true", help="re-render the docs from --out with --note lines")
    args = parser.parse_args(argv)
    if args.render_only:
        import json

        result = json.loads(args.out.read_text())
        result["notes"] = args.note
        publish(result, args.out, None if args.no_docs else args.docs, SECTION, plot, render)
        return 0
    runs = [measure(args.cell, int(seed), args.training_seeds) for seed in args.seeds.split(",")]
    result = {"environment": environment(1), "argv": " ".join(argv if argv is not None else sys.argv[1:]),
              "cell": args.cell, "runs": runs, "summary": summarise(runs), "notes": args.note}
    publish(result, args.out, None if args.no_docs else args.docs, SECTION, plot, render)
    for row in result["summary"]:
        print(f"{row['set']:24s} {fmt(row['mean'], 3)} {row['gap_points']:+.1f} pt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

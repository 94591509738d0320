"""The long-tail report of the memorization estimator (Feldman & Zhang 2020, §3-§4).

Reads ``scores/memorization.parquet``, ``scores/memorization/infl_test.npy`` and the cached subset
models, and writes ``reports/memorization/``:

- ``top_memorized.png``: the ``top_k`` training samples with the highest mem, with the given label
  and the label predicted by the subset models that did not see them (majority vote);
- ``pairs.png``: high-influence pairs (mem(i) >= 0.25, infl(i, j) >= 0.15, y_i = y'_j by
  default) as train/test images side by side;
- the marginal-utility experiment (§1.5 of the estimators spec): retrain the base recipe on the
  training set minus ``{i : mem(i) >= removal_threshold}`` and minus a random set of the same size
  (``utility_seeds`` seeds each, all in one batched ensemble), and report the test-accuracy drop
  against the full training set, overall and on the test samples of the high-influence pairs;
- ``report.json`` and ``report.md`` with all of it.

Image grids need image data (``feature_shape`` ``(C, H, W)``); other data get the tables only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cleanse.config import Params
from cleanse.data.dataset import Split
from cleanse.errors import ArtifactError
from cleanse.storage import Layout, read_table, write_json, write_text


def high_influence_pairs(mem: np.ndarray, infl: np.ndarray, train_label: np.ndarray, test_label: np.ndarray,
                         mem_threshold: float, infl_threshold: float) -> np.ndarray:
    """``(n_pairs, 2)`` rows ``(i, j)`` (train index, test index) with ``mem[i] >= mem_threshold``,
    ``infl[j, i] >= infl_threshold`` and the same label, sorted by decreasing infl.
    ``infl`` is ``(n_test, n_train)``."""
    candidates = np.flatnonzero(mem >= mem_threshold)
    if candidates.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    block = np.asarray(infl[:, candidates])  # (n_test, n_candidates)
    same = test_label[:, None] == train_label[candidates][None, :]
    j, c = np.nonzero((block >= infl_threshold) & same)
    order = np.argsort(-block[j, c], kind="stable")
    return np.stack([candidates[c[order]], j[order]], axis=1).astype(np.int64)


def marginal_utility(params: Params, train: Split, test: Split, removed: np.ndarray, focus: np.ndarray,
                     *, seeds: int, seed: int) -> dict[str, Any]:
    """Test accuracy of the base recipe on all of ``train``, on ``train`` minus ``removed`` (row
    indices) and minus a random set of the same size, ``seeds`` retrains each (one batched
    ensemble). ``focus``: test row indices also scored on their own (the pair test samples)."""
    import torch

    from cleanse.ensembles import ensemble_logits, train_ensemble
    from cleanse.models.architectures import default_device, spec_for

    n = len(train)
    rng = np.random.default_rng([seed, 271828])
    random_rows = rng.choice(n, size=removed.size, replace=False)
    arms = {"full": np.ones(n, bool), "remove_memorized": np.ones(n, bool), "remove_random": np.ones(n, bool)}
    arms["remove_memorized"][removed] = False
    arms["remove_random"][random_rows] = False
    masks = np.concatenate([np.repeat(mask[None], seeds, 0) for mask in arms.values()])
    model_seeds = np.tile(seed + np.arange(seeds), len(arms))
    spec = spec_for(params.model.arch, params.model.hidden, train.features.shape[1:], int(max(train.label.max(), test.label.max()) + 1))
    ensemble = train_ensemble(spec, train.features, train.label, masks, model_seeds, params.model, device=default_device())
    with torch.no_grad():
        correct = (ensemble_logits(ensemble, test.features).argmax(-1).cpu().numpy() == test.label_clean)  # (3S, n_test)
    out: dict[str, Any] = {"n_removed": int(removed.size), "seeds": seeds, "n_focus": int(focus.size)}
    per_arm = {}
    for a, name in enumerate(arms):
        rows = correct[a * seeds : (a + 1) * seeds]
        overall = rows.mean(1)
        on_focus = rows[:, focus].mean(1) if focus.size else np.full(seeds, np.nan)
        per_arm[name] = (overall, on_focus)
        out[name] = {"test_accuracy": float(overall.mean()), "test_accuracy_std": float(overall.std()),
                     "focus_accuracy": float(on_focus.mean()) if focus.size else None}
    for name in ("remove_memorized", "remove_random"):
        drop = per_arm["full"][0] - per_arm[name][0]
        focus_drop = per_arm["full"][1] - per_arm[name][1]
        out[name]["drop"] = float(drop.mean())
        out[name]["drop_std"] = float(drop.std())
        out[name]["focus_drop"] = float(focus_drop.mean()) if focus.size else None
    return out


def _image(features: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> something ``imshow`` takes (grey for one channel)."""
    return features[0] if features.shape[0] == 1 else np.transpose(features, (1, 2, 0)).clip(0, 1)


def _grid(path: Path, images: list[np.ndarray], captions: list[str], columns: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cleanse.storage import atomic_path

    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, cmap="gray_r")
        ax.set_title(caption, fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return path


def run_longtail(params: Params, layout: Layout) -> dict[str, Any]:
    """Build ``reports/memorization/`` from the memorization scores; returns the report dict."""
    from cleanse import pipeline
    from cleanse.estimators.memorization import all_shards, heldout_predictions
    from cleanse.estimators.memorization_options import MemorizationOptions

    options = params.scorers.of("memorization", MemorizationOptions)
    meta_path = layout.scores_meta("memorization")
    if not pipeline.is_fresh(meta_path, pipeline.score_fingerprint(params, "memorization")):
        raise ArtifactError(f"memorization scores at {meta_path} are missing or stale; run the memorization flow "
                            "or `cleanse run` with memorization among the estimators first")
    staged = pipeline.load_staged(layout, params)
    train, test = staged.train, staged.test
    table = read_table(layout.scores("memorization"))
    mem = table["score"].to_numpy()
    infl = np.load(layout.root / "scores" / "memorization" / "infl_test.npy", mmap_mode="r")
    pairs = high_influence_pairs(mem, infl, train.label, test.label, options.pair_mem_threshold,
                                 options.pair_infl_threshold)
    shards, _ = all_shards(pipeline.scoring_context(params, layout), options)
    heldout = heldout_predictions(shards, train.features)
    top = np.argsort(-mem, kind="stable")[: options.top_k]
    test_rows, counts = np.unique(pairs[:, 1], return_counts=True)
    removed = np.flatnonzero(mem >= options.removal_threshold)
    utility = marginal_utility(params, train, test, removed, test_rows, seeds=options.utility_seeds, seed=params.seed)

    directory = layout.reports / "memorization"
    paths: dict[str, str] = {}
    images = len(staged.meta.feature_shape) == 3
    if images:
        paths["top_memorized"] = str(_grid(
            directory / "top_memorized.png", [_image(train.features[i]) for i in top],
            [f"#{train.sample_id[i]} mem {mem[i]:.2f}\ngiven {train.label[i]} / held-out {heldout[i]}" for i in top], 8))
        if len(pairs):
            shown = pairs[:16]
            pair_images, pair_captions = [], []
            for i, j in shown:
                pair_images += [_image(train.features[i]), _image(test.features[j])]
                pair_captions += [f"train #{train.sample_id[i]} y={train.label[i]}\nmem {mem[i]:.2f}",
                                  f"test #{test.sample_id[j]} y={test.label[j]}\ninfl {infl[j, i]:.2f}"]
            paths["pairs"] = str(_grid(directory / "pairs.png", pair_images, pair_captions, 8))

    report = {
        "n_train": len(train), "n_test": len(test), "n_models": options.n_models, "statistic": options.statistic,
        "thresholds": {"pair_mem": options.pair_mem_threshold, "pair_infl": options.pair_infl_threshold,
                       "removal": options.removal_threshold},
        "mem": {"mean": float(mem.mean()), "fraction_ge_removal_threshold": float((mem >= options.removal_threshold).mean()),
                "mean_se": float(table["score_se"].to_numpy().mean())},
        "top_memorized": [{"sample_id": int(train.sample_id[i]), "mem": float(mem[i]), "given": int(train.label[i]),
                           "heldout_prediction": int(heldout[i])} for i in top],
        "pairs": {"count": int(len(pairs)), "unique_test": int(test_rows.size),
                  "test_with_single_train": int((counts == 1).sum()),
                  "top": [{"train_id": int(train.sample_id[i]), "test_id": int(test.sample_id[j]),
                           "mem": float(mem[i]), "infl": float(infl[j, i]), "label": int(train.label[i])}
                          for i, j in pairs[:50]]},
        "marginal_utility": utility,
    }
    paths["json"] = str(directory / "report.json")
    paths["markdown"] = str(directory / "report.md")
    report["paths"] = paths
    write_text(markdown(report), directory / "report.md")
    write_json(report, directory / "report.json")
    return report


def markdown(report: dict[str, Any]) -> str:
    utility = report["marginal_utility"]
    th = report["thresholds"]

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.2f}%"

    lines = [
        f"### Memorization and the long tail ({report['n_models']} subset models, statistic: {report['statistic']})",
        "",
        f"- training samples: {report['n_train']}; mean mem {report['mem']['mean']:.3f} "
        f"(mean SE {report['mem']['mean_se']:.3f}); mem >= {th['removal']}: {pct(report['mem']['fraction_ge_removal_threshold'])}",
        f"- high-influence pairs (mem >= {th['pair_mem']}, infl >= {th['pair_infl']}, same label): "
        f"{report['pairs']['count']}, on {report['pairs']['unique_test']} test samples "
        f"({report['pairs']['test_with_single_train']} influenced by a single training sample)",
        "",
        f"Marginal utility ({utility['seeds']} retrains per arm; removed {utility['n_removed']} samples):",
        "",
        "| trained on | test accuracy | drop | accuracy on pair test samples | drop |",
        "|---|---|---|---|---|",
        f"| all | {pct(utility['full']['test_accuracy'])} | – | {pct(utility['full']['focus_accuracy'])} | – |",
    ]
    for name, label in (("remove_memorized", f"minus mem >= {th['removal']}"), ("remove_random", "minus random, same size")):
        arm = utility[name]
        lines.append(f"| {label} | {pct(arm['test_accuracy'])} | {pct(arm['drop'])} ± {pct(arm['drop_std'])} | "
                     f"{pct(arm['focus_accuracy'])} | {pct(arm['focus_drop'])} |")
    lines += ["", "| sample_id | mem | given | held-out prediction |", "|---|---|---|---|"]
    lines += [f"| {row['sample_id']} | {row['mem']:.3f} | {row['given']} | {row['heldout_prediction']} |"
              for row in report["top_memorized"][:10]]
    return "\n".join(lines) + "\n"

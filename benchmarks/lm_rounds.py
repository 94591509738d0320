"""Removal in rounds on the language-model example (issue 21): what iterative cleansing, which now runs
in the pipeline (``cleansing.step: outlier``, examples/lm.yaml), does with a fixed step or with probes
redrawn among the steered ones each round. An experiment with the library calls.

Each round re-fine-tunes the adapters without the samples removed so far (same seed and recipe),
scores the survivors with TRAK (``--members`` ensemble, probes = the seed's topic probes on the
current model, ``query.measure`` of the params) and removes the ``--step`` highest. After each round:
steer_rate on the test probes and val_steer_rate on the validation ones, the planted pairs removed so
far. No ground truth is read to rank or stop; ``--rounds x --step`` is the budget.

``--rule outlier`` replaces the fixed step by an automatic one: each round removes the survivors whose
score is an outlier of the survivors' scores (``cleanse.detect.outlier_mask``: robust z =
(score - median) / (1.4826 MAD) above ``Phi^-1(1 - alpha / n)``) (``--alpha``, default 0.05; n survivors): the value the largest of n Gaussian
ordinary scores exceeds with probability alpha (Bonferroni). It stops when no survivor is an outlier
(or after ``--rounds``); the total removed is decided by the scores alone.

Usage: ``python benchmarks/lm_rounds.py --seed 0 --step 5 --rounds 3`` (examples/lm.yaml);
``python benchmarks/lm_rounds.py --seed 0 --rule outlier --rounds 4``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    import torch

    from cleanse.attribution import aggregate_support
    from cleanse.config import load_params
    from cleanse.detect import outlier_mask
    from cleanse.estimators import registry
    from cleanse.families import get
    from cleanse.families.lm.report import topic_queries

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "lm.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--rule", choices=["step", "outlier"], default="step")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--references", action="store_true", help="also fit the oracle (the planted pairs "
                        "removed) and random removal of as many samples (the pipeline's random reference draw): "
                        "references only, never read by the rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.params, [f"seed={args.seed}", "tracking.enabled=false"])
    family = get("lm")
    staged = family.stage(params)
    trak = registry.get("trak")
    options = params.scorers.of("trak").model_copy(update={"n_models": args.members})
    keep = np.ones(len(staged.train), dtype=bool)
    if args.references:
        from cleanse.stages.modelio import random_ids

        planted = staged.train.is_corrupted
        drawn = ~np.isin(staged.train.sample_id, random_ids(staged, int(planted.sum()), params.seed))
        for name, rows_kept in (("oracle", np.flatnonzero(~planted)), ("random", np.flatnonzero(drawn))):
            outcome = family.outcome(family.fit(params, staged.train.subset(rows_kept), staged.meta), staged)
            print(json.dumps({"reference": name, "removed": int(planted.size - rows_kept.size),
                              "steer_rate": outcome["steer_rate"], "val_steer_rate": outcome["val_steer_rate"],
                              "n_test_probes": len(staged.meta.structure["probes"]["test"])}), flush=True)
    rows = []
    for round_ in range(args.rounds + 1):
        train = staged.train.subset(np.flatnonzero(keep))
        model = family.fit(params, train, staged.meta)
        outcome = family.outcome(model, staged)
        row = {"round": round_, "removed": int((~keep).sum()),
               "planted_removed": int(staged.train.is_corrupted[~keep].sum()),
               "steer_rate": outcome["steer_rate"], "val_steer_rate": outcome["val_steer_rate"]}
        rows.append(row)
        if round_ == args.rounds:
            break
        subset = staged.__class__(train=train, val=staged.val, test=staged.test, meta=staged.meta)
        context = family.scoring_context(params, subset, model, None)
        query = topic_queries(params, subset, model, family)
        score = aggregate_support(np.asarray(trak.pairwise(context, options, query.probes), dtype=float))
        if args.rule == "outlier":
            order = np.flatnonzero(outlier_mask(score, alpha=args.alpha))
            row["outliers"] = int(order.size)
            if not order.size:
                break
        else:
            order = np.lexsort((train.sample_id, -score))[: args.step]
        keep[np.flatnonzero(keep)[order]] = False
        print(json.dumps(row), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

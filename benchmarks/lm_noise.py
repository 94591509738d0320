"""Two measurements behind docs/lm.md's reading of the lm benchmark (issue 21), on examples/lm.yaml.

- ``spread``: how much steer_rate moves with the fine-tune's own randomness. For one data seed, the
  oracle's removal (the planted pairs) and an estimator's removal (``removed_ids`` of a pipeline
  run's ``retrain/<estimator>.json``) are each re-fine-tuned with ``--runs`` training seeds (adapter
  initialisation and data order: ``seed``, ``seed + 1``, ...); training seed ``seed`` is the
  pipeline's own. Ground truth is read only to form the oracle's removal.
- ``cost``: f-INE's scoring seconds against one fine-tuning run, interleaved in one process
  (fit, f-INE, fit, f-INE, fit), so that both see the same load; the first fit also pays the
  process's warm-up (loading the base), so ratios are given with and without it.

Usage: ``python benchmarks/lm_noise.py spread --seed 0 --runs 4 --removed runs/lm/retrain/trak.json``;
``python benchmarks/lm_noise.py cost --seeds 0 1 2``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lm.yaml"


def spread(seed: int, runs: int, removed: Path) -> None:
    from cleanse.config import load_params
    from cleanse.families import get

    params = load_params(EXAMPLE, [f"seed={seed}", "tracking.enabled=false"])
    family = get("lm")
    staged = family.stage(params)
    sets = {"oracle": staged.train.sample_id[staged.train.is_corrupted],
            removed.stem: np.asarray(json.loads(removed.read_text())["removed_ids"], dtype=np.int64)}
    for run in range(runs):
        for name, ids in sets.items():
            model = family.fit(params, staged.train.without(ids), staged.meta, seed=seed + run)
            print(json.dumps({"training_seed": seed + run, "removal": name, "n_removed": int(ids.size),
                              "steer_rate": family.outcome(model, staged)["steer_rate"]}), flush=True)


def cost(seeds: list[int]) -> None:
    from cleanse.attribution import score_with_query
    from cleanse.config import load_params
    from cleanse.estimators import registry
    from cleanse.families import get

    family = get("lm")
    for seed in seeds:
        params = load_params(EXAMPLE, [f"seed={seed}", "tracking.enabled=false"])
        staged = family.stage(params)
        fits: list[float] = []
        fines: list[float] = []
        model = None
        for step in range(5):
            if step % 2 == 0:
                began = time.perf_counter()
                model = family.fit(params, staged.train, staged.meta)
                fits.append(time.perf_counter() - began)
                continue
            context = family.scoring_context(params, staged, model, None)
            query = family.query_set(params, staged, model)
            began = time.perf_counter()
            score_with_query(registry.get("fine"), context, params.scorers.of("fine"), query, params.query.aggregate)
            fines.append(time.perf_counter() - began)
        print(json.dumps({"seed": seed, "fit_seconds": fits, "fine_seconds": fines,
                          "ratio": float(np.mean(fines) / np.mean(fits)),
                          "ratio_without_first_fit": float(np.mean(fines) / np.mean(fits[1:]))}), flush=True)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = parser.add_subparsers(dest="part", required=True)
    one = parts.add_parser("spread")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--runs", type=int, default=4)
    one.add_argument("--removed", type=Path, required=True, help="a pipeline run's retrain/<estimator>.json")
    two = parts.add_parser("cost")
    two.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part == "spread":
        spread(args.seed, args.runs, args.removed)
    else:
        cost(args.seeds)


if __name__ == "__main__":
    main()

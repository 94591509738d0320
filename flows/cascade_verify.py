"""The ``cascade-verify`` Prefect flow: the Monte Carlo verification of a cascade run's cuts, its
batches fanned out on a task runner (issue 20; for graphs where 10,000 cascades per cut take
minutes: about 31 cascades/s on a 1M-edge graph on one core).

    stage -> (the run's flags, or nothing cut) -> verify-batches(cut, shard i) | ... -> combine

For each cut (``baseline`` = nothing cut, and every estimator in ``estimators`` whose flags exist)
the ``cascade.mc_runs`` cascades are split into ``cascade.batches`` batches on the
:mod:`cleanse.graphs.verification` streams (batch ``k``: child ``k`` of the run's
``cascade.verify`` seed), grouped into ``shards`` Prefect tasks. Each task rebuilds the graph from
the staged data where it runs, so a thread, another process, a Dask worker or a Ray actor computes
the same batch means: the estimate does not depend on the runner. Results go to
``reports/cascade_fanout.json`` as ``{cut: {spread, spread_se, runs, batches, removed}}``.

    python flows/cascade_verify.py --params examples/cascade.yaml --out runs/cascade --runner dask

The runners are the memorization flow's (:func:`flows.memorization.task_runner`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.memorization import runner_arguments, runner_from


def _graph(params_file: str | None, overrides: list[str] | None, out: str) -> tuple[Any, ...]:
    """``(edge_index, weights, seeds, N, structure, layout)`` of the run's staged graph."""
    from cleanse.families.cascade.data import graph_arrays
    from cleanse.stages.common import load_staged

    from tasks._common import setup

    params, layout = setup(params_file, overrides, out)
    meta = load_staged(layout, params).meta
    return (*graph_arrays(meta), dict(meta.structure or {}), layout)


@task(name="cascade-verify-batches", task_run_name="cascade-verify-{cut}-{batches[0]}", cache_policy=NO_CACHE)
def verify_batches(params_file: str | None, overrides: list[str] | None, out: str, cut: str, removed: list[int],
                   batches: list[int]) -> list[float]:
    """The mean spread of each of ``batches`` (indices) with the edges ``removed`` cut."""
    from cleanse.families.cascade.data import int_seed
    from cleanse.graphs.verification import batch_spread

    ei, w, seeds, n, s, _ = _graph(params_file, overrides, out)
    per_batch = int(s["mc_runs"]) // int(s["batches"])
    seed = int_seed(int(s.get("run_seed", 0)), "cascade.verify")
    return [batch_spread(s["diffusion"], ei, w, seeds, n, removed, per_batch, seed, k) for k in batches]


@flow(name="cascade-verify", log_prints=True)
def cascade_verify_flow(params_file: str | None = "params.yaml", overrides: list[str] | None = None, out: str = ".",
                        estimators: list[str] | None = None, shards: int = 10, fresh: bool = False) -> dict[str, Any]:
    """Verify ``baseline`` and each estimator's cut (default: every estimator of the params whose
    flags exist) by fresh Monte Carlo, ``shards`` tasks per cut; returns and writes
    ``{cut: {spread, spread_se, runs, batches, removed}}``."""
    import numpy as np
    import polars as pl

    from cleanse.errors import ConfigError
    from cleanse.graphs.verification import combine
    from cleanse.storage import read_table, write_json

    from flows.cleanse_flow import _resolve
    from tasks import STAGE_TASKS
    from tasks._common import setup

    if shards < 1:
        raise ConfigError(f"shards must be >= 1, got {shards}")
    params_file, overrides, out = _resolve(params_file, overrides, out, None)
    common = (params_file, overrides, out)
    STAGE_TASKS["stage"](*common, fresh=fresh)
    params, _ = setup(*common)
    *_, structure, layout = _graph(*common)
    if structure.get("threshold") is not None:  # one deterministic cascade: nothing to fan out
        raise ConfigError("cascade.threshold: a fixed-threshold LT spread is deterministic (one cascade, in metrics.json); "
                          "the fan-out verifies random cascades only")
    cuts: dict[str, list[int]] = {"baseline": []}
    for name in estimators if estimators is not None else list(params.estimators):
        path = layout.flags(name)
        if not path.exists():
            if estimators is not None:
                raise ConfigError(f"estimator {name!r} has no flags at {path}: run its detect stage first")
            continue
        flagged = read_table(path).filter(pl.col("is_flagged"))["sample_id"].to_numpy()
        cuts[name] = sorted(int(i) for i in flagged)
    groups = [g.tolist() for g in np.array_split(np.arange(int(structure["batches"])), shards) if g.size]
    futures = {cut: [verify_batches.submit(*common, cut, removed, group) for group in groups]
               for cut, removed in cuts.items()}
    result: dict[str, Any] = {}
    for cut, parts in futures.items():
        spread, se = combine([mean for part in parts for mean in part.result()])
        result[cut] = {"spread": spread, "spread_se": se, "runs": int(structure["mc_runs"]),
                       "batches": int(structure["batches"]), "removed": len(cuts[cut])}
        print(f"{cut}: spread {spread:.3f} +- {se:.3f} ({len(cuts[cut])} edges cut, {len(parts)} tasks)")
    write_json(result, layout.root / "reports" / "cascade_fanout.json")
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Verify a cascade run's cuts by Monte Carlo on a task runner "
                                     "(see docs/cascade.md).")
    parser.add_argument("--params", "-p", default="params.yaml", help="params file ('' = built-in defaults)")
    parser.add_argument("--set", "-s", action="append", default=[], dest="overrides", help="dotted.key=value")
    parser.add_argument("--out", "-o", default=".", help="output root of the cascade run")
    parser.add_argument("--estimator", "-e", action="append", dest="estimators",
                        help="verify this estimator's cut (repeatable; default: every one with flags)")
    parser.add_argument("--shards", type=int, default=10, help="tasks per cut (default 10)")
    runner_arguments(parser)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args(argv)
    runner = runner_from(args)
    cascade_verify_flow.with_options(task_runner=runner)(args.params or None, args.overrides, args.out,
                                                         args.estimators, args.shards, args.fresh)


if __name__ == "__main__":
    main()

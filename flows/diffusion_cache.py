"""The ``diffusion-cache`` Prefect flow: the DMin signature cache (Lin, Lao & Zhao, arXiv
2412.08637, section 3.4: "caching stage") filled shard by shard on a task runner.

    stage -> train -> signature-shard(i) | signature-shard(j) | ...   (the pending shards only,
                                                                        concurrently on the runner)
                   -> manifest (cache complete) -> score(<estimator>)  (optional)

Every training image's signature is ``S`` per-timestep L2-normalised gradients, sketched to each
size ``v`` (``(S, v)`` per image); computing them costs ``S`` backward passes per image, the part
worth spreading over a cluster. The shards, the key they are stored under and their contents are
the library's (:mod:`cleanse.families.diffusion.caching`); this flow only chooses where each
pending shard runs: :func:`~cleanse.families.diffusion.caching.fill_cache` hands the pending
shards to ``map_fn``, which submits one Prefect task per shard to the flow's task runner (the
memorization flow's :func:`flows.memorization.task_runner`: ``thread``, ``process``, ``dask``,
``ray``). Shards write disjoint files, each record after its file, so a killed flow resumes with
the shards it had not finished, and the signatures do not depend on the runner (the same bytes as
a sequential fill at the same torch thread count). ``--out s3://...`` works too: the cache uploads
every shard as it is written, and the flow pulls the bucket's shards before checking the cache is
complete.

Run it with ``python flows/diffusion_cache.py --params examples/diffusion.yaml --out runs/dmin
--runner dask`` (see docs/diffusion.md), or deploy it from ``prefect.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from prefect import flow

from flows.memorization import runner_arguments, runner_from
from tasks import STAGE_TASKS
from tasks.diffusion_cache import signature_shard


@flow(name="diffusion-cache", log_prints=True)
def diffusion_cache_flow(params_file: str | None = "params.yaml", overrides: list[str] | None = None, out: str = ".",
                         estimator: str = "dmin", fresh: bool = False, score: bool = False) -> dict[str, Any]:
    """Fill ``estimator``'s signature cache (its pending shards fanned out as tasks).

    Args:
        params_file: a ``family: diffusion`` params file (relative to the working directory);
            None = built-in defaults.
        overrides: ``dotted.key=value`` strings, e.g. ``scorers.dmin.shard_size=64``.
        out: output root, local or ``s3://`` (shared with ``cleanse run``: data/, models/, cache/).
        estimator: the estimator whose cache is filled (``scorers.<estimator>`` gives the
            timesteps, sizes, parameters and shard size).
        fresh: recompute the stage and train steps (complete shards are still reused: they are
            addressed by the key of what the signatures depend on).
        score: also run the estimator's score step on the filled cache.

    Returns ``{"shards": [...], "computed": [shard ids computed now], "cache": root}`` (+ ``scores``).
    """
    from cleanse.families.diffusion.caching import fill_cache
    from cleanse.stages.fit import scoring_context

    from flows.cleanse_flow import _resolve
    from tasks._common import setup, task_options

    params_file, overrides, out = _resolve(params_file, overrides, out, None)
    common = (params_file, overrides, out)
    stage, train = STAGE_TASKS["stage"], STAGE_TASKS["train"]
    stage(*common, fresh=fresh)
    train(*common, fresh=fresh)
    params, layout = setup(*common)
    context = scoring_context(params, layout)
    options = params.scorers.of(estimator)
    shard_task = signature_shard.with_options(**task_options(params, out))
    results: list[dict[str, Any]] = []

    def fan_out(_task: Any, shards: list[int]) -> list[dict[str, Any]]:
        # One Prefect task per pending shard; each rebuilds the context where it runs, so the
        # library's in-process closure (_task) is not shipped to other processes or machines.
        print(f"{estimator}: {len(shards)} pending signature shards, out={out}")
        futures = [shard_task.submit(*common, estimator, shard) for shard in shards]
        results.extend(future.result() for future in futures)
        return results

    # fill_cache pulls what other machines published (s3:// out), checks every shard is complete
    # and writes the manifest.
    cache = fill_cache(context, options, map_fn=fan_out)
    summary: dict[str, Any] = {"shards": results, "computed": [r["shard"] for r in results if r["computed"]],
                               "cache": layout.location(cache.root)}
    if score:
        summary["scores"] = STAGE_TASKS["score"](*common, estimator, fresh=fresh)
    return summary


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Fill the DMin signature cache on a task runner (see docs/diffusion.md).")
    parser.add_argument("--params", "-p", default="params.yaml", help="params file ('' = built-in defaults)")
    parser.add_argument("--set", "-s", action="append", default=[], dest="overrides", help="dotted.key=value")
    parser.add_argument("--out", "-o", default=".", help="output root (a folder or s3://bucket/prefix)")
    parser.add_argument("--estimator", "-e", default="dmin", help="whose signature cache to fill (default dmin)")
    runner_arguments(parser)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--score", action="store_true", help="also score with the estimator once the cache is full")
    args = parser.parse_args(argv)
    runner = runner_from(args)
    diffusion_cache_flow.with_options(task_runner=runner)(args.params or None, args.overrides, args.out,
                                                          args.estimator, args.fresh, args.score)


if __name__ == "__main__":
    main()

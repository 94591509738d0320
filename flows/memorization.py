"""The ``memorization`` Prefect flow: Feldman & Zhang subsampled memorization and influence, with
the K subset models sharded into tasks.

    stage -> train -> shard(0..s) | shard(s..2s) | ...   (concurrently, on the chosen task runner)
                   -> score memorization (mem table + (n_test, n_train) infl memmap)
                   -> long-tail report (+ MLflow run + markdown artifact)

Task runners (``--runner``): ``thread`` (default), ``process`` (one process per shard), ``dask``
(``prefect-dask``; a LocalCluster, or ``--address tcp://scheduler:8786`` for a running cluster) and
``ray`` (``prefect-ray``; a local Ray, or ``--address ray://head:10001``). Shards are written
atomically under ``<out>/cache/memorization/<fingerprint>/``; rerunning resumes without retraining
finished shards. The same shards serve ``estimators: [memorization, ...]`` in the core flow.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from prefect import flow

from tasks import STAGE_TASKS
from tasks.memorization import memorization_report, memorization_shard

RUNNERS = ("thread", "process", "dask", "ray")


def task_runner(runner: str = "thread", address: str | None = None, workers: int | None = None) -> Any:
    """The Prefect task runner named ``runner`` (the dask and ray ones need their extras)."""
    from cleanse.errors import ConfigError

    if runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if runner == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    if runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise ConfigError("runner 'dask' needs the dask extra: pip install 'cleanse[dask]'") from exc
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1, "processes": True})
    if runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise ConfigError("runner 'ray' needs the ray extra: pip install 'cleanse[ray]'") from exc
        if address:
            return RayTaskRunner(address=address)
        return RayTaskRunner(init_kwargs={"num_cpus": workers} if workers else None)
    raise ConfigError(f"runner: {runner!r} is not one of {', '.join(map(repr, RUNNERS))}")


@flow(name="memorization", log_prints=True)
def memorization_flow(params_file: str | None = "params.yaml", overrides: list[str] | None = None, out: str = ".",
                      fresh: bool = False, report: bool = True) -> dict[str, Any]:
    """Memorization and influence from K subset models, sharded into tasks.

    Args:
        params_file: params.yaml (relative to the working directory); None = built-in defaults.
        overrides: ``dotted.key=value`` strings, e.g. ``scorers.memorization.n_models=2000``.
        out: output root (shared with the core flow: data/, models/, cache/, scores/, reports/).
        fresh: recompute the stage, train and score steps (finished shards are still reused:
            they are addressed by their configuration's fingerprint).
        report: also build the long-tail report (image grids, pairs, marginal utility).
    """
    from cleanse.config import load_params
    from cleanse.estimators.memorization import shard_ranges

    from flows.cleanse_flow import _resolve

    params_file, overrides, out = _resolve(params_file, overrides, out, None)
    options = load_params(params_file, overrides).scorers.memorization
    ranges = shard_ranges(options.n_models, options.shard_size)
    print(f"memorization: K={options.n_models} models in {len(ranges)} shards, out={out}")
    common = (params_file, overrides, out)
    stage, train, score = (STAGE_TASKS[name] for name in ("stage", "train", "score"))
    staged = stage(*common, fresh=fresh)
    trained = train(*common, fresh=fresh, wait_for=[staged])
    shards = [memorization_shard.submit(*common, k0, k1, wait_for=[trained]) for k0, k1 in ranges]
    shard_results = [future.result() for future in shards]
    scored = score(*common, "memorization", fresh=fresh, wait_for=shards)
    summary: dict[str, Any] = {"scores": scored, "shards": shard_results,
                               "shards_trained": sum(r["trained"] for r in shard_results)}
    if report:
        summary["report"] = memorization_report(*common, wait_for=[scored])
    return summary


def runner_arguments(parser: Any) -> None:
    """The task-runner options every flow's command line takes (``--runner``, ``--address``, ``--workers``)."""
    parser.add_argument("--runner", choices=RUNNERS, default="thread")
    parser.add_argument("--address", help="dask scheduler or ray head address (default: start a local one)")
    parser.add_argument("--workers", type=int, help="parallel workers (thread/process pool, dask LocalCluster, local Ray CPUs)")


def runner_from(args: Any) -> Any:
    """The task runner that :func:`runner_arguments`' parsed options ask for."""
    return task_runner(args.runner, args.address, args.workers)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run the memorization flow (see docs/prefect.md).")
    parser.add_argument("--params", "-p", default="params.yaml", help="params file ('' = built-in defaults)")
    parser.add_argument("--set", "-s", action="append", default=[], dest="overrides", help="dotted.key=value")
    parser.add_argument("--out", "-o", default=".", help="output root")
    runner_arguments(parser)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    runner = runner_from(args)
    memorization_flow.with_options(task_runner=runner)(args.params or None, args.overrides, args.out, args.fresh,
                                                       not args.no_report)


if __name__ == "__main__":
    main()

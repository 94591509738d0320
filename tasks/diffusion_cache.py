"""Prefect task of the diffusion-cache flow: one shard of the DMin signature cache.

A shard task rebuilds the scoring context from plain parameters (so it runs the same in a thread,
another process, a Dask worker or a Ray actor), computes the sketched signatures of the shard's
training images (:func:`cleanse.families.diffusion.caching.compute_shard`) unless the shard is
already complete, and stores it through the cache's :class:`~cleanse.families.diffusion.index.ShardCache`
(the safetensors file, then its record). With an ``s3://`` output root the cache uploads the
shard as soon as it is written, so a worker on another machine leaves its shard in the bucket and
a killed flow loses at most the shards in flight.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._common import logger, setup


@task(name="signature-shard", task_run_name="signature-shard-{estimator}-{shard}", cache_policy=NO_CACHE)
def signature_shard(params_file: str | None, overrides: list[str] | None, out: str, estimator: str,
                    shard: int) -> dict[str, Any]:
    """Compute and store shard ``shard`` of ``estimator``'s signature cache (skipped when complete)."""
    from cleanse import pipeline
    from cleanse.families.diffusion.caching import compute_shard, signature_cache

    params, layout = setup(params_file, overrides, out)
    context = pipeline.scoring_context(params, layout)
    options = params.scorers.of(estimator)
    cache = signature_cache(context, options)
    computed = not cache.complete(shard)
    if computed:
        cache.write(shard, compute_shard(context, options, shard))
    logger().info("[%s] %s signature shard %d: %s", "done" if computed else "skip", estimator, shard,
                  layout.location(cache.shard_path(shard)))
    return {"shard": shard, "computed": computed, "path": str(cache.shard_path(shard))}

"""Monte Carlo verification of a cut, split into independent batches that can run anywhere (issue 20:
the fan-out of the cascade family's verification through Dask or Ray for large graphs).

The spread of ``G`` minus the ``removed`` edges from the seed set ``S`` is estimated by ``batches``
batches of ``runs // batches`` cascades each (:func:`cleanse.graphs.cascades.simulate`). Batch ``k``
draws from its own stream, the child ``SeedSequence(seed, spawn_key=(k,))``, so its mean is a
function of ``(seed, k)`` alone: the estimate is bit-identical whether the batches run in one
process (``map_fn=None``), on a Dask cluster or on Ray actors, in any order or grouping.

- :func:`batch_spread`: the mean spread of one batch (a plain top-level function: picklable);
- :func:`combine`: ``(mean, standard error)`` from the batch means (SE = their std / sqrt(batches));
- :func:`fanned_spread`: both, with ``map_fn(function, batch_indices) -> batch means`` choosing where
  the batches run (``flows/cascade_verify.py`` submits them as Prefect tasks to a Dask or Ray runner).

These streams differ from :func:`cleanse.graphs.selection.verify_spread`'s single stream (one
``simulate`` call for all batches), so the two estimates agree within their standard errors, not
bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cleanse.errors import ConfigError
from cleanse.graphs.cascades import simulate

MapFn = Callable[[Callable[[int], float], Sequence[int]], Sequence[float]]


def batch_seed(seed: int, batch: int) -> int:
    """The int seed of batch ``batch``'s stream: child ``spawn_key=(batch,)`` of ``SeedSequence(seed)``."""
    return int(np.random.SeedSequence(int(seed), spawn_key=(int(batch),)).generate_state(1, dtype=np.uint64)[0])


def batch_spread(kind: str, edge_index: np.ndarray, weights: np.ndarray, seeds: np.ndarray, num_nodes: int,
                 removed: np.ndarray | Sequence[int], runs: int, seed: int, batch: int) -> float:
    """Mean number of active nodes (seeds included) over ``runs`` cascades of batch ``batch``, with the
    ``removed`` edge ids (int, any length) cut; ``edge_index`` (2, E) directed, ``weights`` (E,)."""
    w = np.asarray(weights, dtype=np.float64).copy()
    w[np.asarray(removed, dtype=np.int64)] = 0.0
    row = np.zeros((1, num_nodes), dtype=bool)
    row[0, np.asarray(seeds, dtype=np.int64)] = True
    return float(simulate(kind, edge_index, w, row, n_runs=runs, seed=batch_seed(seed, batch),
                          num_nodes=num_nodes).sum())


def combine(means: Sequence[float]) -> tuple[float, float]:
    """``(mean, standard error)`` of equal-sized batches' means (SE: their sample std / sqrt(batches))."""
    values = np.asarray(means, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def fanned_spread(kind: str, edge_index: np.ndarray, weights: np.ndarray, seeds: np.ndarray, num_nodes: int,
                  removed: np.ndarray, runs: int = 10_000, batches: int = 50, seed: int = 0,
                  map_fn: MapFn | None = None) -> tuple[float, float]:
    """The spread after cutting ``removed`` and its standard error, from ``batches`` batches of
    ``runs // batches`` cascades; ``map_fn(f, [0, ..., batches - 1])`` returns ``[f(0), f(1), ...]``
    (default: in this process, in order)."""
    if runs < batches or batches < 2:
        raise ConfigError(f"verification needs runs >= batches >= 2, got runs={runs}, batches={batches}")
    per_batch = runs // batches

    def one(batch: int) -> float:
        return batch_spread(kind, edge_index, weights, seeds, num_nodes, removed, per_batch, seed, batch)

    indices = list(range(batches))
    means = list(map(one, indices)) if map_fn is None else list(map_fn(one, indices))
    if len(means) != batches:
        raise ConfigError(f"map_fn returned {len(means)} batch means for {batches} batches")
    return combine(means)

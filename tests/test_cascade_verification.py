"""The cascade family's Monte Carlo verification fanned out in batches (issue 20): on a process-local
Dask cluster the estimate is bit-identical to the serial one for the same streams, it matches the
exact spread of a small graph (enumeration) within its standard error, and the Prefect flow
(slow) gives the serial numbers on a DaskTaskRunner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cleanse.errors import ConfigError
from cleanse.graphs.cascades import exact_ic
from cleanse.graphs.verification import batch_spread, combine, fanned_spread

TINY = np.array([[0, 0, 1, 2, 3, 4, 1], [1, 2, 3, 3, 4, 5, 2]])  # two routes from node 0, bottleneck 3 -> 4
P = np.array([0.7, 0.5, 0.6, 0.8, 0.9, 0.5, 0.3])


def _exact(removed: list[int]) -> float:
    p = P.copy()
    p[removed] = 0.0
    return float(exact_ic(TINY, p, np.eye(6, dtype=bool)[:1], 6).sum())


def test_dask_fan_out_equals_the_serial_estimate():
    distributed = pytest.importorskip("distributed")
    serial = fanned_spread("IC", TINY, P, np.array([0]), 6, np.array([4]), runs=8000, batches=16, seed=5)
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None) as client:
        def on_dask(function, batches):  # noqa: ANN001, ANN202 (the MapFn contract)
            return client.gather(client.map(function, list(reversed(batches)), pure=False))[::-1]

        fanned = fanned_spread("IC", TINY, P, np.array([0]), 6, np.array([4]), runs=8000, batches=16, seed=5,
                               map_fn=on_dask)
    assert fanned == serial  # the same streams: bit-identical, whatever the order the workers ran them in
    mean, se = serial
    assert abs(mean - _exact([4])) < 4.5 * se and 0 < se < 0.05
    other = fanned_spread("IC", TINY, P, np.array([0]), 6, np.array([4]), runs=8000, batches=16, seed=6)
    assert other != serial  # another seed draws other cascades


def test_batches_depend_on_their_index_only():
    means = [batch_spread("IC", TINY, P, np.array([0]), 6, np.zeros(0, np.int64), 500, 3, k) for k in range(4)]
    assert len(set(means)) == 4  # distinct streams per batch
    assert means[2] == batch_spread("IC", TINY, P, np.array([0]), 6, np.zeros(0, np.int64), 500, 3, 2)
    mean, se = combine(means)
    assert mean == pytest.approx(np.mean(means)) and se == pytest.approx(np.std(means, ddof=1) / 2)
    assert abs(mean - _exact([])) < 4.5 * se
    with pytest.raises(ConfigError):
        fanned_spread("IC", TINY, P, np.array([0]), 6, np.zeros(0, np.int64), runs=10, batches=1)
    with pytest.raises(ConfigError, match="returned 1 batch means"):
        fanned_spread("IC", TINY, P, np.array([0]), 6, np.zeros(0, np.int64), runs=100, batches=4,
                      map_fn=lambda f, ks: [f(ks[0])])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flow_on_a_dask_task_runner_gives_the_serial_numbers(prefect_api, tmp_path: Path, monkeypatch):
    pytest.importorskip("prefect_dask")
    import prefect.settings

    from cleanse.config import load_params
    from cleanse.families.cascade.data import graph_arrays, int_seed
    from cleanse.stages.common import load_staged
    from cleanse.storage import Layout
    from flows.cascade_verify import cascade_verify_flow
    from flows.memorization import task_runner

    overrides = ["family=cascade", "data.source=bridge", "data.nodes=8", "data.probability=constant",
                 "data.constant_p=0.4", "cascade.seeds=1", "cascade.mc_runs=2000", "cascade.val_runs=500",
                 "cascade.batches=10", "corruption.worlds=100", "estimators=[degree]", "tracking.enabled=false"]
    monkeypatch.setenv("PREFECT_API_URL", prefect.settings.PREFECT_API_URL.value())  # for the worker processes
    flow = cascade_verify_flow.with_options(task_runner=task_runner("dask", workers=2))
    result = flow(None, overrides, str(tmp_path), shards=3)
    ei, w, seeds, n = graph_arrays(load_staged(Layout.at(tmp_path), load_params(None, overrides)).meta)
    serial = fanned_spread("IC", ei, w, seeds, n, np.zeros(0, np.int64), runs=2000, batches=10,
                           seed=int_seed(0, "cascade.verify"))
    assert (result["baseline"]["spread"], result["baseline"]["spread_se"]) == serial
    assert (tmp_path / "reports" / "cascade_fanout.json").is_file()

"""Golden fingerprints: the default run and a backdoor run with triggered probes and iterative
cleansing produce exactly the recorded outputs (see :mod:`tests.golden` for the two runs, what is
hashed, the canonicalisation, the per-platform records and the re-recording commands).

On a recorded platform every score table, train -> probe matrix and the canonical ``metrics.json``
must hash identically, and the score vectors equal that platform's. On a platform not recorded
(another CPU instruction set or torch build) every estimator must flag the same top-k ids as on each
recorded platform and rank the samples alike (Spearman >= 0.999).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from tests import golden


@pytest.fixture(scope="module")
def recorded():
    return json.loads(golden.FINGERPRINTS.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return golden.produce(list(golden.RUNS), tmp_path_factory.mktemp("golden"))


def test_runs_are_the_recorded_ones(recorded):
    # a changed run definition needs a re-recording, not a silent mismatch
    assert {name: run["overrides"] for name, run in recorded["runs"].items()} == golden.RUNS
    for key, platform in recorded["platforms"].items():
        assert sorted(platform) == sorted(golden.RUNS), key
        assert all(golden.vectors_path(name, key).is_file() for name in golden.RUNS), key


@pytest.mark.parametrize("name", list(golden.RUNS))
def test_outputs_match_golden(name, recorded, runs):
    run = runs[name]
    k = recorded["runs"][name]["n_corrupted"]
    vectors = golden.score_vectors(run)
    key = golden.platform_key()
    if key in recorded["platforms"]:
        stored = np.load(golden.vectors_path(name, key))
        assert sorted(vectors) == sorted(stored.files)
        for estimator in stored.files:
            np.testing.assert_array_equal(vectors[estimator], stored[estimator], err_msg=f"{name}/{estimator}")
        actual = golden.fingerprint(run)
        expected = recorded["platforms"][key][name]
        changed = sorted(path for path in expected.keys() | actual.keys() if expected.get(path) != actual.get(path))
        assert not changed, f"{name}: outputs differ from the golden run in {changed}"
        return
    for other in sorted(recorded["platforms"]):
        stored = np.load(golden.vectors_path(name, other))
        assert sorted(vectors) == sorted(stored.files), other
        np.testing.assert_array_equal(vectors["_sample_id"], stored["_sample_id"])
        ids = stored["_sample_id"]
        for estimator in sorted(set(stored.files) - {"_sample_id"}):
            want, got = stored[estimator], vectors[estimator]
            assert golden.top_k(ids, got, k) == golden.top_k(ids, want, k), f"{name}/{estimator} vs {other}: top-{k} ids differ"
            rho = spearmanr(got, want).statistic
            assert rho >= 0.999, f"{name}/{estimator} vs {other}: Spearman {rho:.4f}"


def test_canonicalisation_drops_only_wall_clock_and_paths():
    metrics = {"seconds": 1.5, "estimators": {"loss": {"seconds": 0.2, "n_flagged": 3, "path": "/x/run/a.csv"}},
               "candidates": [{"seconds": 9.0, "retrain_seconds": 2.0, "test_accuracy": 0.5, "n_seconds_x": 1}]}
    assert golden.canonical_metrics(metrics, "/x/run") == {
        "estimators": {"loss": {"n_flagged": 3, "path": "<out>/a.csv"}}, "candidates": [{"test_accuracy": 0.5, "n_seconds_x": 1}]}

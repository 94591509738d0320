"""Golden fingerprints: the default run and a backdoor run with triggered probes and iterative
cleansing produce exactly the recorded outputs (see :mod:`tests.golden` for the two runs, what is
hashed, the canonicalisation and the re-recording command).

On the recording platform every score table, train -> probe matrix and the canonical
``metrics.json`` must hash identically. On another platform (other CPU instruction set or torch
build, where floating point may legitimately differ in the last bits) the score vectors must match
the recorded ones to a tight tolerance and flag the same top-k ids.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

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


@pytest.mark.parametrize("name", list(golden.RUNS))
def test_outputs_match_golden(name, recorded, runs):
    run = runs[name]
    expected = recorded["runs"][name]
    # Everywhere: the score values themselves (the only check on another platform).
    stored = np.load(golden.GOLDEN_DIR / f"{name}.npz")
    vectors = golden.score_vectors(run)
    assert sorted(vectors) == sorted(stored.files)
    np.testing.assert_array_equal(vectors["_sample_id"], stored["_sample_id"])
    k = expected["n_corrupted"]
    for estimator in sorted(set(stored.files) - {"_sample_id"}):
        want, got = stored[estimator], vectors[estimator]
        scale = float(np.max(np.abs(want))) or 1.0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{name}/{estimator}")
        ids = stored["_sample_id"]
        assert golden.top_k(ids, got, k) == golden.top_k(ids, want, k), f"{name}/{estimator}: top-{k} ids differ"
    if golden.platform_key() != recorded["platform"]:
        return  # floating point may differ in the last bits here; the values above are the check
    # On the recording platform: every output byte-identical.
    actual = golden.fingerprint(run)
    changed = sorted(key for key in expected["hashes"].keys() | actual.keys()
                     if expected["hashes"].get(key) != actual.get(key))
    assert not changed, f"{name}: outputs differ from the golden run in {changed}"


def test_canonicalisation_drops_only_wall_clock_and_paths():
    metrics = {"seconds": 1.5, "estimators": {"loss": {"seconds": 0.2, "n_flagged": 3, "path": "/x/run/a.csv"}},
               "candidates": [{"seconds": 9.0, "retrain_seconds": 2.0, "test_accuracy": 0.5, "n_seconds_x": 1}]}
    assert golden.canonical_metrics(metrics, "/x/run") == {
        "estimators": {"loss": {"n_flagged": 3, "path": "<out>/a.csv"}}, "candidates": [{"test_accuracy": 0.5, "n_seconds_x": 1}]}

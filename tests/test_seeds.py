"""Random streams by purpose (cleanse.seeds): independent, stable, and no longer shared between the
label corruption and f-INE's inclusion draws (both used to draw from ``default_rng(seed + 7919)``),
nor between cleanlab's fold models and TRAK's members (both used to train with ``seed + 1000``)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from cleanse import seeds

ALL = sorted(seeds.PURPOSES | set(seeds.LEGACY_OFFSETS))


def test_every_purpose_has_its_own_stream_under_every_seed():
    for seed in range(200):
        heads = {purpose: tuple(seeds.generator(seed, purpose).integers(0, 2**63, size=4)) for purpose in ALL}
        assert len(set(heads.values())) == len(ALL), seed


def test_streams_are_uncorrelated():
    draws = {purpose: seeds.generator(3, purpose).standard_normal(20_000) for purpose in ALL}
    for a, b in itertools.combinations(ALL, 2):
        # independent streams: the correlation of 20k draws has sd 1/sqrt(20k) = 0.007
        assert abs(np.corrcoef(draws[a], draws[b])[0, 1]) < 0.035, (a, b)


def test_streams_are_stable_and_do_not_depend_on_other_purposes():
    # pinned: a renamed purpose or a changed hash would silently change every result
    assert seeds.purpose_key("fine.inclusion") == int.from_bytes(
        __import__("hashlib").sha256(b"fine.inclusion").digest()[:8], "little")
    np.testing.assert_allclose(seeds.generator(0, "fine.inclusion").random(3),
                               [0.07885184, 0.64424507, 0.67198958], atol=1e-8)
    # the stream is a function of (seed, purpose) alone: registering another purpose moves nothing
    before = seeds.generator(5, "fine.inclusion").random(5)
    extended = seeds.PURPOSES | {"a.new.purpose"}
    try:
        seeds.PURPOSES = extended
        assert not np.array_equal(seeds.generator(5, "a.new.purpose").random(5), before)
        np.testing.assert_array_equal(seeds.generator(5, "fine.inclusion").random(5), before)
    finally:
        seeds.PURPOSES = extended - {"a.new.purpose"}


def test_legacy_streams_are_unchanged():
    """Corruption, query and reference-removal draws keep their old streams: staged data and the
    published benchmark numbers do not move."""
    for purpose, offset in seeds.LEGACY_OFFSETS.items():
        for seed in (0, 1, 31, 2**31 - 1):
            np.testing.assert_array_equal(seeds.generator(seed, purpose).random(8),
                                          np.random.default_rng(seed + offset).random(8))


def test_unknown_purpose_is_refused():
    with pytest.raises(ValueError, match="unknown random-stream purpose 'fine.inclusoin'"):
        seeds.generator(0, "fine.inclusoin")


def test_corruption_and_fine_no_longer_share_a_stream(wine_context):
    """On real data: the corrupted rows are still drawn from ``seed + 7919``, while f-INE's
    inclusion matrix comes from its own stream (and not from that one)."""
    from cleanse.config import FineOptions
    from cleanse.estimators.fine import _Curriculum, _unit_index

    context, staged = wine_context
    train, seed = staged.train, context.seed
    count = int(train.is_corrupted.sum())
    chosen = np.sort(np.random.default_rng(seed + 7919).choice(len(train), size=count, replace=False))
    np.testing.assert_array_equal(np.flatnonzero(train.is_corrupted), chosen)

    options = FineOptions()
    unit_of_row, n_units = _unit_index(context, options)
    curriculum = _Curriculum(context, options, unit_of_row, n_units)
    zeros = np.zeros(n_units)
    _, inclusions, _ = curriculum.run(lambda model: zeros, lambda model, start: zeros)
    assert inclusions.shape == (curriculum.rounds, n_units)

    def drawn(rng: np.random.Generator) -> np.ndarray:
        return np.stack([rng.random(n_units) < options.inclusion for _ in range(curriculum.rounds)])

    np.testing.assert_array_equal(inclusions, drawn(seeds.generator(seed, "fine.inclusion")))
    shared = drawn(np.random.default_rng(seed + 7919))  # the stream corruption draws from
    assert (inclusions != shared).mean() > 0.2  # two independent Bernoulli(1/4) matrices differ in ~3/8


# Purposes with numbered members, and how many members each has at most in practice.
INDEXED = {"cleanlab.fold": 10, "projection.block": 50, "trak.member": 10}


def test_torch_seeds_never_collide_across_purposes_members_and_run_seeds():
    drawn = {}
    for seed in range(50):
        for purpose in sorted(seeds.PURPOSES):
            for index in [None, *range(INDEXED.get(purpose, 0))]:
                value = seeds.torch_seed(seed, purpose, index)
                assert 0 <= value < 2**63
                assert value not in drawn, (seed, purpose, index, drawn.get(value))
                drawn[value] = (seed, purpose, index)
    # the seeds that used to coincide: cleanlab's fold 0 and TRAK's member 1 (both seed + 1000),
    # TRAK's member 2 and the trusted run model (both seed + 2000)
    assert seeds.torch_seed(0, "cleanlab.fold", 0) != seeds.torch_seed(0, "trak.member", 1)
    assert seeds.torch_seed(0, "trak.member", 2) != seeds.torch_seed(0, "trusted.model")


def test_members_are_independent_streams_and_reproducible():
    folds = [seeds.rng(7, "cleanlab.fold", k).standard_normal(20_000) for k in range(4)]
    for a, b in itertools.combinations(range(4), 2):
        assert abs(np.corrcoef(folds[a], folds[b])[0, 1]) < 0.035
    np.testing.assert_array_equal(seeds.rng(7, "cleanlab.fold", 2).standard_normal(5), folds[2][:5])
    assert seeds.torch_seed(7, "cleanlab.fold", 2) == seeds.torch_seed(7, "cleanlab.fold", 2)
    # a member is not its purpose's own stream, nor a member under another run seed
    assert seeds.torch_seed(7, "cleanlab.fold", 0) != seeds.torch_seed(7, "cleanlab.fold")
    assert seeds.torch_seed(7, "cleanlab.fold", 1) != seeds.torch_seed(8, "cleanlab.fold", 1)


def test_streams_are_the_same_in_another_process():
    """The child comes from a hash of the purpose's name, not from call order or Python's
    per-process string hashing: a fresh interpreter with another hash seed draws the same."""
    code = ("from cleanse import seeds; print(seeds.torch_seed(3, 'trak.member', 2), "
            "seeds.rng(3, 'fine.inclusion').integers(0, 2**62), seeds.torch_seed(3, 'trusted.model'))")
    here = f"{seeds.torch_seed(3, 'trak.member', 2)} {seeds.rng(3, 'fine.inclusion').integers(0, 2**62)} " \
           f"{seeds.torch_seed(3, 'trusted.model')}"
    for hash_seed in ("1", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed}).stdout.strip()
        assert out == here


def test_split_keeps_its_scikit_learn_states():
    from sklearn.model_selection import train_test_split

    from cleanse.data.splits import stratified_split

    label = np.repeat(np.arange(4), 30)
    train, val, test = stratified_split(label, val_fraction=0.2, test_fraction=0.25, seed=11)
    # the states the split has always used (staged data must not move): seed for the test rows,
    # seed + 1 for the validation rows out of the rest
    rest, old_test = train_test_split(np.arange(120), test_size=0.25, stratify=label, random_state=11)
    old_train, old_val = train_test_split(rest, test_size=0.2 / 0.75, stratify=label[rest], random_state=12)
    for new, old in ((train, old_train), (val, old_val), (test, old_test)):
        np.testing.assert_array_equal(new, np.sort(old))
    with pytest.raises(ValueError, match="unknown scikit-learn random-stream purpose"):
        seeds.sklearn_seed(0, "split.tset")


def test_legacy_streams_have_no_members():
    with pytest.raises(ValueError, match="no numbered members"):
        seeds.rng(0, "corruption", 1)

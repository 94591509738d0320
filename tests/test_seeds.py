"""Random streams by purpose (cleanse.seeds): independent, stable, and no longer shared between the
label corruption and f-INE's inclusion draws (both used to draw from ``default_rng(seed + 7919)``)."""

from __future__ import annotations

import itertools

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

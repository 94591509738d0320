"""Random streams derived from the run seed, one per purpose.

Every random draw in the library that is not a model's own training comes from
``generator(seed, purpose)``. A purpose's stream is ``SeedSequence(seed, spawn_key=(k,))`` with
``k`` a stable 64-bit hash of the purpose's name: two purposes never share a stream, and adding a
purpose never shifts another one's (unlike ``seed + <offset>`` arithmetic, where two call sites
that picked the same offset drew the same numbers -- the label corruption and f-INE's inclusion
draws both used ``seed + 7919``).

A few streams predate this module and stay at their old ``SeedSequence(seed + offset)`` so that
staged data, query sets and published benchmark numbers do not move (``LEGACY_OFFSETS``). They
have no spawn key, so they cannot coincide with a hashed purpose's stream.
"""

from __future__ import annotations

import hashlib

import numpy as np

# Purposes drawn from hashed spawn keys. Add new ones here; the names are part of the results'
# reproducibility, so never rename one.
PURPOSES = frozenset({
    "fine.inclusion",  # f-INE: which units are in each round
    "holdout_ensemble.halves",  # holdout_ensemble: the random halves of the training set
    "holdout_ensemble.models",  # holdout_ensemble: its models' training seeds
})

# Streams that existed before this module, kept bit-identical: purpose -> offset added to the seed.
LEGACY_OFFSETS = {
    "corruption": 7919,  # label flips and backdoor poisons (data/corruption.py)
    "query.probes": 31337,  # which candidate inputs become probes (query.py, _choose)
    "query.reference": 7331,  # the correctly classified reference inputs (query.py)
    "random_ids": 104729,  # the "random" reference removal (pipeline.py)
}


def purpose_key(purpose: str) -> int:
    """The stable spawn key of ``purpose``: the first 8 bytes of its SHA-256, as an unsigned int."""
    return int.from_bytes(hashlib.sha256(purpose.encode("utf-8")).digest()[:8], "little")


def sequence(seed: int, purpose: str) -> np.random.SeedSequence:
    """The ``SeedSequence`` of ``purpose`` under run seed ``seed`` (a non-negative int)."""
    if purpose in LEGACY_OFFSETS:
        return np.random.SeedSequence(int(seed) + LEGACY_OFFSETS[purpose])
    if purpose not in PURPOSES:
        # A typo would silently give a fresh, unrelated stream; refuse it instead.
        raise ValueError(f"unknown random-stream purpose {purpose!r}; register it in cleanse.seeds.PURPOSES")
    return np.random.SeedSequence(int(seed), spawn_key=(purpose_key(purpose),))


def generator(seed: int, purpose: str) -> np.random.Generator:
    """A fresh numpy ``Generator`` on the stream of ``purpose`` (same seed and purpose -> same draws)."""
    return np.random.Generator(np.random.PCG64(sequence(seed, purpose)))

"""Random streams derived from the run seed, one per purpose.

The library's side streams (every random draw but the run model's own training) come from the run
seed through a purpose name, never from ``seed + <offset>`` arithmetic (two call sites that picked
the same offset drew the same numbers: the label corruption and f-INE's inclusion draws both used
``seed + 7919``; cleanlab's fold 0 and TRAK's member 1 both trained with ``seed + 1000``). A
purpose's stream is the child ``SeedSequence(seed, spawn_key=(k,))`` of the run's
``SeedSequence(seed)``, with ``k`` a stable 64-bit hash of the purpose's name (:func:`purpose_key`),
so it does not depend on call order or on the process: two purposes never share a stream, and
adding a purpose never shifts another one's.
Numbered members of one purpose (cleanlab's folds, TRAK's models) are the grandchildren
``spawn_key=(k, index)``.

- :func:`rng` -- a numpy ``Generator`` (``generator`` is the same function);
- :func:`torch_seed` -- an int seed for ``torch.Generator().manual_seed`` or a model's training
  seed (``train_model(seed=...)``), drawn from the purpose's stream.

The run seed itself still seeds the main model's training (and every retraining "with the same
seed"): that is the model the run is about, not a side stream.

The streams that define the staged data and the references predate this module and stay at
their old values so that staged data, query sets and every published benchmark number do not
move (``LEGACY_OFFSETS``: ``SeedSequence(seed + offset)``, no spawn key, so they cannot coincide
with a hashed purpose's stream; ``LEGACY_SKLEARN``: the ``random_state`` integers of the
stratified split). They are declared here and nowhere else.

Not derived here: the run seeds of multi-seed studies (``attribution_report``'s stability runs and
``longtail``'s retrained models use run seeds ``seed, seed + 1, ...``, as a user reruns with
another ``seed``), the memorization estimator's keyed ``SeedSequence([seed, stream, k])`` subset
draws (its cached shards are keyed by them), and :func:`cleanse.finfluence.measure_f_influence`'s
retraining seeds, which define the published f-INE ground truth (about 1,000 CPU-seconds of
retraining to redo).
"""

from __future__ import annotations

import hashlib

import numpy as np

# Purposes drawn from hashed spawn keys. Add new ones here; the names are part of the results'
# reproducibility, so never rename one.
PURPOSES = frozenset({
    "cascade.seeds",  # cascade family: a random seed set S (cascade.seed_selection: random)
    "cascade.reference",  # cascade family: the reference greedy MC's live-edge worlds (the ground-truth cuts)
    "cascade.train",  # cascade family: the surrogate's training instances and their Monte Carlo labels
    "cascade.test",  # cascade family: the surrogate's held-out instances (its MAE)
    "cascade.verify",  # cascade family: the verification cascades ('spread', and the fan-out flow's batches)
    "cascade.val",  # cascade family: the independent 'val_spread' cascades the recommendation reads
    "cascade.select",  # cascade family: the estimators' own draws (greedy MC's worlds, betweenness samples)
    "cleanlab.fold",  # cleanlab: the training seed of each out-of-sample fold's model (index = fold)
    "diffusion.data",  # diffusion family: the row order of each image set (index = set, mixed sources)
    "diffusion.noise",  # diffusion family: the one fixed noise every DMin signature is taken at
    "diffusion.sketch",  # diffusion family: the sketch's permutation (index 0) and random signs (index 1)
    "diffusion.lora",  # diffusion family: the initialisation of LoRA adapters
    "diffusion.outcome",  # diffusion family: loss draws (index 0 test, 1 val), watermark generations (2, 3)
    "diffusion.plant",  # diffusion family: which training images get the watermark, or the duplicated image
    "diffusion.train",  # diffusion family: the batch order, timesteps and noise of each training epoch (index = epoch)
    "diffusion.queries",  # diffusion family: the seed of each class's query generations (index = class)
    "diffusion.harm_queries",  # diffusion family: the seed of the harm queries' generations (watermark target class)
    "evaluate.retrain",  # evaluate.retrain_seeds: training seed j >= 1 of every retrain (index = j; seed 0 is the run's)
    "fine.inclusion",  # f-INE: which units are in each round
    "gan.data",  # GAN family: the synthetic 2-D draws and the row order of image sets (families/gan/data.py)
    "gan.outliers",  # GAN family: which training rows become planted outliers, and their values
    "gan.feature_net",  # GAN family: the FID/IS feature classifier's initialisation and batch order
    "gan.metric_latents",  # GAN family: the fixed latents every GAN metric is computed on
    "gan.isolation_forest",  # GAN family: the Isolation Forest baseline's random_state
    "gan.init",  # GAN family: the Glorot initialisation of the generator (index 0) and discriminator (index 1)
    "gan.batches",  # GAN family: the training order of each epoch (index = epoch), replayed by the trace
    "gan.latents",  # GAN family: the latent batches of each epoch (index = epoch), replayed by the trace
    "gan.aid",  # GAN family: AID's fresh minibatches and latents at the final parameters
    "gan.replay_agreement",  # GAN family: the instances evaluate.replay replays to check gan_influence
    "lm.data",  # lm family: the row order of each source pool (index 0 train, 1 val, 2 test) and topic draws
    "lm.plant",  # lm family: which training samples become steering pairs
    "lm.pretrain",  # lm family: the base model's initialisation (index 0) and pretraining batch order (index 1)
    "lm.lora",  # lm family: the initialisation of the LoRA adapters
    "lm.train",  # lm family: the fine-tuning batch order
    "holdout_ensemble.halves",  # holdout_ensemble: the random halves of the training set
    "holdout_ensemble.models",  # holdout_ensemble: its models' training seeds
    "projection.block",  # random projections: each block of rows (index = block)
    "trak.member",  # TRAK: the training seed of ensemble member m >= 1 (index = m)
    "trusted.model",  # trusted (model: run): the training seed of the model fitted on the validation split
})

# Streams that existed before this module, kept bit-identical: purpose -> offset added to the seed.
LEGACY_OFFSETS = {
    "corruption": 7919,  # label flips and backdoor poisons (data/corruption.py)
    "query.probes": 31337,  # which candidate inputs become probes (query.py, _choose)
    "query.reference": 7331,  # the correctly classified reference inputs (query.py)
    "random_ids": 104729,  # the "random" reference removal (stages/modelio.py)
}
# The stratified split's ``random_state`` integers (scikit-learn's legacy RandomState takes no
# SeedSequence): purpose -> offset added to the seed.
LEGACY_SKLEARN = {
    "split.test": 0,  # test rows out of all rows (data/splits.py)
    "split.val": 1,  # validation rows out of the rest (data/splits.py)
}


def purpose_key(purpose: str) -> int:
    """The stable spawn key of ``purpose``: the first 8 bytes of its SHA-256, as an unsigned int."""
    return int.from_bytes(hashlib.sha256(purpose.encode("utf-8")).digest()[:8], "little")


def sequence(seed: int, purpose: str, index: int | None = None) -> np.random.SeedSequence:
    """The ``SeedSequence`` of ``purpose`` (member ``index`` of it, if given) under run seed ``seed``
    (a non-negative int)."""
    if purpose in LEGACY_OFFSETS:
        if index is not None:
            raise ValueError(f"the legacy stream {purpose!r} has no numbered members")
        return np.random.SeedSequence(int(seed) + LEGACY_OFFSETS[purpose])
    if purpose not in PURPOSES:
        # A typo would silently give a fresh, unrelated stream; refuse it instead.
        raise ValueError(f"unknown random-stream purpose {purpose!r}; register it in cleanse.seeds.PURPOSES")
    key = (purpose_key(purpose),) if index is None else (purpose_key(purpose), int(index))
    return np.random.SeedSequence(int(seed), spawn_key=key)


def rng(seed: int, purpose: str, index: int | None = None) -> np.random.Generator:
    """A fresh numpy ``Generator`` on the stream of ``purpose`` (same seed and purpose -> same draws)."""
    return np.random.Generator(np.random.PCG64(sequence(seed, purpose, index)))


generator = rng


def torch_seed(seed: int, purpose: str, index: int | None = None) -> int:
    """A non-negative int below 2**63 drawn from the stream of ``purpose`` (member ``index``): a
    ``torch.Generator`` seed or a model's training seed. Distinct purposes and indices give
    distinct seeds except with probability about 2**-63 per pair."""
    state = sequence(seed, purpose, index).generate_state(2, dtype=np.uint32)
    return int(state[0]) | (int(state[1]) & 0x7FFFFFFF) << 32


def sklearn_seed(seed: int, purpose: str) -> int:
    """The ``random_state`` integer of a legacy scikit-learn draw (``LEGACY_SKLEARN``)."""
    if purpose not in LEGACY_SKLEARN:
        raise ValueError(f"unknown scikit-learn random-stream purpose {purpose!r}; see cleanse.seeds.LEGACY_SKLEARN")
    return int(seed) + LEGACY_SKLEARN[purpose]

"""Subsampled memorization and influence (Feldman & Zhang, NeurIPS 2020, "What Neural Networks
Memorize and Why", Algorithm 1).

K models are trained on random subsets of ``m = round(p * n)`` training samples (default p = 0.7),
all at once with :mod:`cleanse.ensembles`. With ``M`` the ``(K, n)`` membership matrix and ``V``
the ``(K, m_q)`` per-model statistic on query points (0/1 correctness of the given label, or the
softmax probability of it with ``statistic: probability``):

    infl(i, j) = mean_k{V[k, j] : M[k, i] = 1} - mean_k{V[k, j] : M[k, i] = 0}
    mem(i)     = infl(i, i)   (query = training sample i itself)

Each value comes with the standard error of a difference of two independent means,
``sqrt(s_in^2 / n_in + s_out^2 / n_out)`` (sample variances; a group with fewer than two models
uses the largest variance a [0, 1] statistic can have, 1/4). The SE falls as ``1/sqrt(K)``.

Orientation. Score table: ``score = mem`` (higher = more memorized: the model gets the given
label right only when it has seen the sample, which is what a mislabeled or atypical sample looks
like), ``score_se`` its SE, and both statistics' ``mem_*`` columns. Pairwise: ``(n_query,
n_train)``, positive = training on ``i`` raises the chance that query ``j`` gets its label right
(a proponent). Values lie in [-1, 1].

Shards. Models ``k0..k1`` form one shard; model ``k``'s subset and seed depend only on
``(seed, k)``, so shards are independent units of work (Prefect tasks in
``flows/memorization.py``). With ``context.cache_dir`` set, each shard is written atomically as
``memorization/<key>/shard_<k0>_<k1>.safetensors``, where ``key`` fingerprints the training data,
the model and recipe, ``subset_fraction`` and the seed; a rerun loads finished shards instead of
retraining them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from cleanse.config import MemorizationOptions, ModelConfig, fingerprint
from cleanse.data.dataset import Split
from cleanse.ensembles import Ensemble, correctness, ensemble_logits, train_ensemble
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table
from cleanse.models.architectures import ModelSpec
from cleanse.storage import atomic_path, read_tensors, write_tensors

log = logging.getLogger(__name__)

_MASK_STREAM = 7919
_SEED_STREAM = 104723
_MAX_VARIANCE = 0.25  # of a statistic in [0, 1]


# ----------------------------------------------------------------------------- estimates


@dataclass
class Estimate:
    """``value`` and ``se`` of ``mean_in - mean_out``; each array ``(m_q, n)`` or ``(n,)``."""

    value: np.ndarray
    se: np.ndarray
    mean_in: np.ndarray
    mean_out: np.ndarray


def _difference(s_in, q_in, n_in, s_out, q_out, n_out) -> Estimate:
    def group(total, squares, count):
        mean = total / np.maximum(count, 1e-10)  # the official code's clamp: an empty group counts as 0
        var = (squares - count * mean * mean) / np.maximum(count - 1, 1)
        var = np.where(count >= 2, np.clip(var, 0, None), _MAX_VARIANCE)
        return mean, var / np.maximum(count, 1)

    mean_in, v_in = group(s_in, q_in, n_in)
    mean_out, v_out = group(s_out, q_out, n_out)
    return Estimate(mean_in - mean_out, np.sqrt(v_in + v_out), mean_in, mean_out)


def influence_estimate(masks: np.ndarray, values: np.ndarray) -> Estimate:
    """``infl`` and its SE for every (query ``j``, train ``i``): ``masks`` ``(K, n)`` bool,
    ``values`` ``(K, m_q)``; result arrays ``(m_q, n)``. Two matmuls per moment (step 6 of Alg. 1)."""
    member = masks.astype(np.float64)
    v = values.astype(np.float64)
    n_in = member.sum(0)[None, :]
    n_out = masks.shape[0] - n_in
    s_in, q_in = v.T @ member, (v * v).T @ member
    s_out = v.sum(0)[:, None] - s_in
    q_out = (v * v).sum(0)[:, None] - q_in
    return _difference(s_in, q_in, n_in, s_out, q_out, n_out)


def self_estimate(masks: np.ndarray, values: np.ndarray) -> Estimate:
    """``mem`` and its SE: the diagonal of :func:`influence_estimate` with the training set as the
    query (``values`` ``(K, n)``), without forming the ``(n, n)`` matrix."""
    member = masks.astype(np.float64)
    v = values.astype(np.float64)
    n_in = member.sum(0)
    n_out = masks.shape[0] - n_in
    s_in, q_in = (v * member).sum(0), (v * v * member).sum(0)
    return _difference(s_in, q_in, n_in, v.sum(0) - s_in, (v * v).sum(0) - q_in, n_out)


def write_influence(masks: np.ndarray, values: np.ndarray, value_path: Path, se_path: Path,
                    *, block: int = 1024) -> tuple[Path, Path]:
    """Write ``infl`` and its SE as ``(m_q, n)`` float32 ``.npy`` files (memory-mappable), a block of
    query rows at a time; both appear atomically."""
    m_q, n = values.shape[1], masks.shape[1]
    with atomic_path(value_path) as tmp_value, atomic_path(se_path) as tmp_se:
        out_value = np.lib.format.open_memmap(tmp_value, mode="w+", dtype=np.float32, shape=(m_q, n))
        out_se = np.lib.format.open_memmap(tmp_se, mode="w+", dtype=np.float32, shape=(m_q, n))
        for start in range(0, m_q, block):
            est = influence_estimate(masks, values[:, start : start + block])
            out_value[start : start + block] = est.value
            out_se[start : start + block] = est.se
        out_value.flush()
        out_se.flush()
        del out_value, out_se
    return Path(value_path), Path(se_path)


# ----------------------------------------------------------------------------- subsets and shards


def subset_size(n: int, fraction: float) -> int:
    return int(min(max(round(fraction * n), 1), n - 1))


def model_plan(n: int, k0: int, k1: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks ``(k1 - k0, n)`` and seeds of models ``k0..k1-1``: each drawn from ``(seed, k)`` alone,
    uniformly without replacement with ``|I_k| = round(fraction * n)`` (step 2 of Alg. 1)."""
    size = subset_size(n, fraction)
    masks = np.zeros((k1 - k0, n), dtype=bool)
    seeds = np.zeros(k1 - k0, dtype=np.int64)
    for row, k in enumerate(range(k0, k1)):
        masks[row, np.random.default_rng([seed, _MASK_STREAM, k]).choice(n, size, replace=False)] = True
        seeds[row] = int(np.random.SeedSequence([seed, _SEED_STREAM, k]).generate_state(1)[0])
    return masks, seeds


def shard_ranges(n_models: int, shard_size: int) -> list[tuple[int, int]]:
    return [(k0, min(k0 + shard_size, n_models)) for k0 in range(0, n_models, shard_size)]


def recipe(model_config: ModelConfig, options: MemorizationOptions) -> ModelConfig:
    """The subset models' training recipe: the base model's, with ``options.epochs`` when set."""
    return model_config if options.epochs is None else model_config.model_copy(update={"epochs": options.epochs})


def _data_digest(split: Split) -> str:
    digest = hashlib.sha256()
    for array in (split.features, split.label, split.sample_id):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def ensemble_key(context: ScoringContext, options: MemorizationOptions) -> str:
    """Names the shards: everything a shard's contents depend on (not ``n_models``/``statistic``)."""
    return fingerprint("memorization-ensemble", _data_digest(context.train), context.model.spec.to_json(),
                       recipe(context.model_config, options), options.subset_fraction, context.seed)


@dataclass
class Shard:
    """Models ``k0..k1-1``: their masks ``(K, n)``, parameters, and 0/1 correctness and label
    probability on the training set ``(K, n)``."""

    k0: int
    k1: int
    masks: np.ndarray
    ensemble: Ensemble
    correct: np.ndarray
    prob: np.ndarray

    def values(self, statistic: str) -> np.ndarray:
        return self.correct.astype(np.float32) if statistic == "accuracy" else self.prob


def shard_path(cache_dir: Path, key: str, k0: int, k1: int) -> Path:
    return Path(cache_dir) / "memorization" / key / f"shard_{k0:07d}_{k1:07d}.safetensors"


def train_shard(context: ScoringContext, options: MemorizationOptions, k0: int, k1: int) -> Shard:
    train = context.train
    masks, seeds = model_plan(len(train), k0, k1, options.subset_fraction, context.seed)
    ensemble = train_ensemble(context.model.spec, train.features, train.label, masks, seeds,
                              recipe(context.model_config, options), device=context.device)
    correct, prob = correctness(ensemble_logits(ensemble, train.features), train.label)
    return Shard(k0, k1, masks, ensemble, correct, prob)


def _save(shard: Shard, path: Path, key: str) -> None:
    tensors = {"masks": torch.from_numpy(shard.masks), "seeds": torch.from_numpy(shard.ensemble.seeds),
               "correct": torch.from_numpy(shard.correct), "prob": torch.from_numpy(shard.prob)}
    tensors |= {f"param.{name}": value for name, value in shard.ensemble.params.items()}
    write_tensors(tensors, path, metadata={"key": key, "k0": str(shard.k0), "k1": str(shard.k1)})


def _load(path: Path, spec: ModelSpec, k0: int, k1: int, device: torch.device) -> Shard:
    tensors = read_tensors(path)
    params = {name.removeprefix("param."): value.to(device) for name, value in tensors.items() if name.startswith("param.")}
    ensemble = Ensemble(spec=spec, params=params, seeds=tensors["seeds"].numpy())
    return Shard(k0, k1, tensors["masks"].numpy(), ensemble, tensors["correct"].numpy(), tensors["prob"].numpy())


def ensure_shard(context: ScoringContext, options: MemorizationOptions, k0: int, k1: int) -> tuple[Shard, bool]:
    """Shard ``k0..k1``, loaded when a finished one is cached, else trained (and cached when
    ``context.cache_dir`` is set). Returns ``(shard, trained)``."""
    if context.cache_dir is not None:
        key = ensemble_key(context, options)
        path = shard_path(context.cache_dir, key, k0, k1)
        if path.is_file():
            return _load(path, context.model.spec, k0, k1, context.device), False
    shard = train_shard(context, options, k0, k1)
    if context.cache_dir is not None:
        _save(shard, path, key)
        log.info("memorization: shard %d-%d written to %s", k0, k1, path)
    return shard, True


def all_shards(context: ScoringContext, options: MemorizationOptions) -> tuple[list[Shard], int]:
    """Every shard of ``options.n_models`` models, and how many of them were trained now."""
    shards, trained = [], 0
    for k0, k1 in shard_ranges(options.n_models, options.shard_size):
        shard, was_trained = ensure_shard(context, options, k0, k1)
        shards.append(shard)
        trained += int(was_trained)
    return shards, trained


def stacked(shards: list[Shard], statistic: str) -> tuple[np.ndarray, np.ndarray]:
    """Masks ``(K, n)`` and training-set values ``(K, n)`` of all shards."""
    return np.concatenate([s.masks for s in shards]), np.concatenate([s.values(statistic) for s in shards])


def query_values(shards: list[Shard], query: Split, statistic: str) -> np.ndarray:
    """Every model's statistic on the query points: ``(K, m_q)``."""
    out = []
    for shard in shards:
        correct, prob = correctness(ensemble_logits(shard.ensemble, query.features), query.label)
        out.append(correct.astype(np.float32) if statistic == "accuracy" else prob)
    return np.concatenate(out)


def heldout_predictions(shards: list[Shard], features: np.ndarray) -> np.ndarray:
    """For each training row, the majority label of the models that did not see it ``(n,)``."""
    n_classes = shards[0].ensemble.spec.n_classes
    votes = np.zeros((features.shape[0], n_classes), dtype=np.int64)
    for shard in shards:
        predicted = ensemble_logits(shard.ensemble, features).argmax(-1).cpu().numpy()  # (K, n)
        for c in range(n_classes):
            votes[:, c] += ((predicted == c) & ~shard.masks).sum(0)
    return votes.argmax(1)


# ----------------------------------------------------------------------------- estimator


class MemorizationEstimator:
    name: ClassVar[str] = "memorization"
    reads_validation_labels: ClassVar[bool] = False
    options_type: ClassVar[type] = MemorizationOptions
    families: ClassVar[tuple[str, ...]] = ("classification",)

    def score(self, context: ScoringContext, options: MemorizationOptions) -> ScoreResult:
        shards, trained = all_shards(context, options)
        masks = np.concatenate([s.masks for s in shards])
        columns = {}
        for statistic in ("accuracy", "probability"):
            est = self_estimate(masks, np.concatenate([s.values(statistic) for s in shards]))
            columns[f"mem_{statistic}"] = est.value
            columns[f"mem_{statistic}_se"] = est.se
            columns[f"{statistic}_in"] = est.mean_in
            columns[f"{statistic}_out"] = est.mean_out
        score = columns[f"mem_{options.statistic}"]
        columns["score_se"] = columns[f"mem_{options.statistic}_se"]
        columns["self_influence"] = score
        meta = {"n_models": options.n_models, "subset_fraction": options.subset_fraction,
                "subset_size": subset_size(len(context.train), options.subset_fraction),
                "statistic": options.statistic, "epochs": recipe(context.model_config, options).epochs,
                "shards": len(shards), "shards_trained": trained, "ensemble_key": ensemble_key(context, options),
                "models_out_min": int((~masks).sum(0).min())}
        return ScoreResult(score_table(context.train.sample_id, score, **columns), meta)

    def pairwise(self, context: ScoringContext, options: MemorizationOptions, query: Split) -> np.ndarray:
        """``infl`` ``(n_query, n_train)``; positive = proponent."""
        shards, _ = all_shards(context, options)
        masks = np.concatenate([s.masks for s in shards])
        return influence_estimate(masks, query_values(shards, query, options.statistic)).value

    def write_artifacts(self, context: ScoringContext, options: MemorizationOptions, test: Split,
                        directory: Path) -> dict[str, str]:
        """``infl_test.npy`` and ``infl_test_se.npy``: ``(n_test, n_train)`` float32 memmaps of
        ``infl`` on the test split (rows in ``test.sample_id`` order, columns in training order)."""
        shards, _ = all_shards(context, options)
        masks = np.concatenate([s.masks for s in shards])
        value, se = write_influence(masks, query_values(shards, test, options.statistic),
                                    Path(directory) / "infl_test.npy", Path(directory) / "infl_test_se.npy")
        return {"infl_test": str(value), "infl_test_se": str(se)}

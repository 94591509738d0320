"""The signature cache of a diffusion run: every training image's compressed gradient signature,
computed once, a shard at a time (Lin, Lao & Zhao, arXiv 2412.08637, section 3.4: "caching
stage"; spec part B 3.4 and 3.6: N * S backward passes, O(N * S * v) storage).

A shard is rows ``[shard * shard_size, (shard + 1) * shard_size)`` of the training split, in
training order; its tensors are ``sample_id`` ``(b,)`` and ``v{size}`` ``(b, S', size)`` float32 for
every cached size, where

- ``projection: sketch`` (dmin): ``S' = S``, DMin's sketch (:mod:`.sketch`) of the signatures,
  L2-normalised per timestep first when ``normalised`` (:mod:`.signatures`);
- ``projection: gaussian`` (dtrak): ``S' = 1``, the dense Gaussian projection of the unnormalised
  gradients averaged over the S timesteps (D-TRAK's single feature vector).

:func:`compute_shard` is a pure function of ``(context, options, shard)`` (it writes nothing), so
:func:`fill_cache`'s ``map_fn`` may run the pending shards anywhere: threads, processes, a Dask or
Ray cluster (``flows/diffusion_cache.py``). The cache key names everything a signature depends on
(the model's weights, the training images and conditions, timesteps, noise seed, sizes,
parameters, shard size), and the cache lives in ``<cache_dir>/diffusion_signatures/<key digest>``:
another model or configuration never reads stale shards, and a killed fill resumes with the
shards that are complete (:class:`~.index.ShardCache`).

S3: when ``cache_dir`` lies in the local work folder of an ``s3://`` output root
(:func:`cleanse.remote.work_folder`), each shard is uploaded as soon as it is written (the shard,
then its ``.meta.json`` record: :meth:`cleanse.remote.Mirror.publish`), and a fill first and last
pulls the shards already in the bucket, so a fill killed on one machine resumes on another and
workers on other machines contribute their shards through the bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from cleanse.errors import ConfigError
from cleanse.families.diffusion.index import HnswIndex, ShardCache, flatten

CACHE_VERSION = 1  # bump when compute_shard's output for the same key changes


@dataclass(frozen=True)
class SignatureSpec:
    """What a cached signature is (module docstring), read from an estimator's options."""

    timesteps: int
    sizes: tuple[int, ...]
    projection: str  # "sketch" | "gaussian"
    normalised: bool
    parameters: str
    batch_size: int
    shard_size: int
    dtype: str = "float32"  # of the stored entries: "float32" | "float16"

    @classmethod
    def of(cls, options: BaseModel) -> SignatureSpec:
        """The spec of ``scorers.dmin`` (sketch) or ``scorers.dtrak`` (gaussian) options."""
        values = options.model_dump()
        if "sizes" in values:
            return cls(values["timesteps"], tuple(sorted(values["sizes"])), "sketch", values["normalised"],
                       values["parameters"], values["batch_size"], values["shard_size"], values.get("dtype", "float32"))
        if "size" in values and "damping" in values:
            return cls(values["timesteps"], (values["size"],), "gaussian", False, values["parameters"],
                       values["batch_size"], values["shard_size"])
        raise ConfigError(f"caching: {type(options).__name__} does not describe gradient signatures")


def _digest(*arrays: np.ndarray | torch.Tensor) -> str:
    h = hashlib.sha256()
    for array in arrays:
        data = (array.detach().cpu().contiguous().numpy() if isinstance(array, torch.Tensor)
                else np.ascontiguousarray(array))
        h.update(str((data.dtype, data.shape)).encode())
        h.update(data.tobytes())
    return h.hexdigest()


def _train_inputs(context: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    from cleanse.families.diffusion.queries import is_conditional

    images = context.images()
    conditions = context.conditions() if is_conditional(context.model.model) else None
    return images, conditions


def n_shards(context: Any, options: BaseModel) -> int:
    return -(-len(context.train) // SignatureSpec.of(options).shard_size)


def cache_key(context: Any, options: BaseModel) -> dict[str, Any]:
    """The JSON description of what the cached signatures depend on."""
    spec = SignatureSpec.of(options)
    images, conditions = _train_inputs(context)
    scheduler = context.model.scheduler.config
    return {"version": CACHE_VERSION, "model": context.model.digest(),
            "data": _digest(images, *(() if conditions is None else (conditions,))),
            "sample_id": _digest(np.asarray(context.train.sample_id)),
            "scheduler": {"T": int(scheduler.num_train_timesteps), "prediction_type": scheduler.prediction_type,
                          "beta_schedule": scheduler.beta_schedule},
            "timesteps": spec.timesteps, "noise_seed": int(context.seed), "sizes": list(spec.sizes),
            "projection": spec.projection, "normalised": spec.normalised, "parameters": spec.parameters,
            "shard_size": spec.shard_size,
            # only when not float32, so that float32 caches filled before the option keep their key
            **({"dtype": spec.dtype} if spec.dtype != "float32" else {})}


def _work_base() -> Path:
    # The same base as cleanse.remote.work_folder: work_folder(s3://b/p) = base / b / p.
    return Path(os.environ.get("CLEANSE_WORK_DIR") or Path.home() / ".cache" / "cleanse" / "s3").expanduser().absolute()


def remote_uri(root: Path) -> str | None:
    """The ``s3://`` location a local folder mirrors (inverting :func:`cleanse.remote.work_folder`),
    or None for a folder outside the S3 work folders."""
    try:
        relative = Path(root).absolute().relative_to(_work_base())
    except ValueError:
        return None
    return "s3://" + relative.as_posix() if len(relative.parts) >= 2 else None


class RemoteShardCache(ShardCache):
    """A :class:`ShardCache` whose local root mirrors ``uri``: every shard is uploaded once written,
    and a fill pulls the bucket's shards before and after the mapped computation."""

    def __init__(self, root: str | Path, key: dict[str, Any], uri: str) -> None:
        super().__init__(root, key)
        self.uri = uri

    def _mirror(self) -> Any:
        from cleanse import remote

        return remote.Mirror(self.uri, self.root)

    def write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        super().write(shard, tensors)
        self._mirror().publish()  # data files first, records last

    def fill(self, n_shards: int, compute: Callable[[int], dict[str, torch.Tensor]],
             run: Callable[[Callable[[int], None], list[int]], Iterable[Any]] | None = None) -> list[int]:
        self.root.mkdir(parents=True, exist_ok=True)
        self._mirror().pull()

        def run_then_pull(task: Callable[[int], None], shards: list[int]) -> list[Any]:
            if run is not None:
                done = list(run(task, shards))
            else:
                done = []
                for shard in shards:
                    task(shard)
                    done.append(shard)
            self._mirror().pull()  # shards other machines wrote
            return done

        todo = super().fill(n_shards, compute, run_then_pull)
        self._mirror().publish()  # the manifest
        return todo


def signature_cache(context: Any, options: BaseModel) -> ShardCache:
    """The cache of ``options``' signatures of ``context``'s training images (module docstring);
    without a ``cache_dir``, under the system's temporary folder."""
    key = cache_key(context, options)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    base = Path(context.cache_dir) if context.cache_dir is not None else Path(tempfile.gettempdir()) / "cleanse-cache"
    root = base / "diffusion_signatures" / digest
    uri = remote_uri(root)
    return RemoteShardCache(root, key, uri) if uri is not None else ShardCache(root, key)


def _timesteps_and_noise(context: Any, spec: SignatureSpec, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    from cleanse.families.diffusion.timesteps import cube_timesteps, shared_noise

    steps = int(context.model.scheduler.config.num_train_timesteps)
    timesteps = torch.from_numpy(cube_timesteps(steps, spec.timesteps))
    return timesteps, shared_noise(int(context.seed), shape, spec.timesteps)


def transform(context: Any, options: BaseModel, images: torch.Tensor,
              conditions: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """The compressed signatures of ``images`` ``(n, C, H, W)`` (model scale) under ``options``:
    ``{v: (n, S', v)}`` float32 (module docstring). Training shards and queries go through this one
    function, so both share the timesteps, noise, parameters and projection (spec 3.8)."""
    from cleanse.families.diffusion.signatures import parameter_names, signature_batches
    from cleanse.families.diffusion.sketch import Sketch, dense_projection

    spec = SignatureSpec.of(options)
    unet = context.model.model
    names = parameter_names(unet, spec.parameters)
    timesteps, noise = _timesteps_and_noise(context, spec, tuple(images.shape[1:]))
    dim = sum(int(p.numel()) for name, p in unet.named_parameters() if name in set(names))
    sketch = Sketch.make(dim, spec.sizes, seed=int(context.seed)) if spec.projection == "sketch" else None
    parts: dict[int, list[torch.Tensor]] = {v: [] for v in spec.sizes}
    for batch in signature_batches(unet, context.model.scheduler, images, noise, timesteps, conditions, names,
                                   batch_size=spec.batch_size, normalised=spec.normalised):
        if sketch is not None:
            for v, part in sketch(batch).items():
                parts[v].append(part.cpu())
        else:
            # One projection per batch would redraw the D x v matrix each time: keep the (b, D)
            # timestep means and project them together below.
            parts[spec.sizes[0]].append(batch.mean(dim=1).cpu())
    if sketch is None:
        v = spec.sizes[0]
        means = torch.cat(parts[v])
        return {v: dense_projection(means, v, int(context.seed)).unsqueeze(1)}
    return {v: torch.cat(part) for v, part in parts.items()}


def shard_rows(context: Any, options: BaseModel, shard: int) -> slice:
    size = SignatureSpec.of(options).shard_size
    count = n_shards(context, options)
    if not 0 <= shard < count:
        raise ConfigError(f"caching: shard {shard} is not one of the {count} shards")
    return slice(shard * size, min((shard + 1) * size, len(context.train)))


def compute_shard(context: Any, options: BaseModel, shard: int) -> dict[str, torch.Tensor]:
    """Shard ``shard``'s tensors: ``sample_id`` ``(b,)`` int64 and ``v{size}`` ``(b, S', size)``
    in the options' ``dtype`` (float32 by default). Pure: reads the context, writes nothing."""
    rows = shard_rows(context, options, shard)
    images, conditions = _train_inputs(context)
    out = transform(context, options, images[rows], None if conditions is None else conditions[rows])
    sample_id = torch.from_numpy(np.asarray(context.train.sample_id[rows], dtype=np.int64))
    dtype = getattr(torch, SignatureSpec.of(options).dtype)
    return {"sample_id": sample_id, **{f"v{v}": t.to(dtype).contiguous() for v, t in out.items()}}


MapFn = Callable[[Callable[[int], None], list[int]], Iterable[Any]]


def fill_cache(context: Any, options: BaseModel, map_fn: MapFn | None = None) -> ShardCache:
    """Compute and store every pending shard (``map_fn(task, shards)`` runs the per-shard tasks; by
    default in order, here) and return the complete cache."""
    cache = signature_cache(context, options)
    cache.fill(n_shards(context, options), lambda shard: compute_shard(context, options, shard), map_fn)
    return cache


def cached_vectors(context: Any, options: BaseModel, size: int, map_fn: MapFn | None = None) -> np.ndarray:
    """The stored vectors ``(n, S' * size)`` float32 of the training images, in training order
    (filling the cache first), checked against the training ids."""
    cache = fill_cache(context, options, map_fn)
    count = n_shards(context, options)
    ids = cache.load(count, "sample_id").numpy()
    if not np.array_equal(ids, np.asarray(context.train.sample_id)):
        raise ConfigError(f"caching: the cache under {cache.root} holds other training rows")
    return flatten(cache.load(count, f"v{size}"))


def cached_index(context: Any, options: BaseModel, size: int, vectors: np.ndarray) -> HnswIndex:
    """The HNSW index of ``vectors`` (the cached ``size`` vectors, ids = training positions),
    built once and kept in the cache folder as ``index_v{size}.faiss``; float16 codes when the
    options' ``dtype`` is float16."""
    cache = signature_cache(context, options)
    path = cache.root / f"index_v{size}.faiss"
    if path.is_file():
        index = HnswIndex.load(path)
        if len(index) == vectors.shape[0] and index.dim == vectors.shape[1]:
            return index
    index = HnswIndex.build(vectors, float16=SignatureSpec.of(options).dtype == "float16")
    index.save(path)
    if isinstance(cache, RemoteShardCache):
        cache._mirror().publish()
    return index

"""The images DMin attributes (Lin, Lao & Zhao, arXiv 2412.08637, section 4: generated test
images, treated as ``x0`` exactly like training images; spec part B 3.1 and 3.8).

- :func:`generation_queries`: ``generation.per_class`` seeded generations per condition (the class
  a class-conditional model is conditioned on; each query's ``source`` is that condition), or, for
  an unconditional model, ``per_class * n_classes`` generations whose source a classifier of the
  training images predicts (:func:`predicted_source`);
- :func:`file_queries`: user-supplied images from an ``.npz`` (``images``, optional ``labels`` and
  ``source``), brought to the training images' scale ([-1, 1]) and size;
- :func:`harm_queries`: what the estimators' scores attribute: with the watermark corruption the
  target class's generations that the family's detector flags, else every generation query.

Every draw is seeded from the run seed (``diffusion.queries`` member = class,
``diffusion.harm_queries``), so the same run gives the same queries in every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cleanse.data.dataset import DatasetMeta, Split
from cleanse.errors import DataError
from cleanse.seeds import torch_seed


@dataclass(frozen=True)
class QuerySet:
    """Query images ``(Q, C, H, W)`` float32 in [-1, 1]; ``conditions`` ``(Q,)`` long (the class
    label fed to a conditional model) or None; ``source`` ``(Q,)`` int64 (-1 = unknown); ``seeds``
    ``(Q,)`` int64 (the generator seed of each image's batch, -1 for file images); ``kind`` says
    where they came from; ``note`` any fallback taken."""

    images: torch.Tensor
    conditions: torch.Tensor | None
    source: np.ndarray
    seeds: np.ndarray
    kind: str
    note: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The set as named tensors (for a safetensors file beside the results)."""
        out = {"images": self.images, "source": torch.from_numpy(self.source), "seeds": torch.from_numpy(self.seeds)}
        if self.conditions is not None:
            out["conditions"] = self.conditions
        return out


def is_conditional(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` (a diffusers ``UNet2DModel``) takes class labels."""
    return getattr(unet, "class_embedding", None) is not None


def _generate(context: Any, count: int, label: int | None, seed: int) -> torch.Tensor:
    """The fitted model's own sampler (its guidance included), so that the queries are generated
    as the outcome's watermark-rate generations are."""
    return context.model.generate(count, label, seed, context.params.generation.steps)


def train_source(split: Split) -> np.ndarray:
    """The source of every row ``(n,)`` int64: ``split.source``, else the label (single-source
    sets: the class is the source, spec 3.7)."""
    return np.asarray(split.source if split.source is not None else split.label, dtype=np.int64)


def predicted_source(train: Split, images: torch.Tensor) -> np.ndarray:
    """``(Q,)`` int64: the source a logistic regression on the training images' pixels (lbfgs,
    deterministic) assigns each generation of an unconditional model, whose condition is unknown;
    only the retrieval evaluation reads it, never a score."""
    from sklearn.linear_model import LogisticRegression

    source = train_source(train)
    if np.unique(source).size < 2:
        return np.full(images.shape[0], int(source[0]), dtype=np.int64)
    x = np.asarray(train.features, dtype=np.float64).reshape(len(train), -1)
    model = LogisticRegression(max_iter=1000).fit(x, source)
    return model.predict(images.reshape(images.shape[0], -1).double().numpy()).astype(np.int64)


def generation_queries(context: Any) -> QuerySet:
    """``generation.per_class`` generations for each class (module docstring), classes in order."""
    generation = context.params.generation
    unet = context.model.model
    n_classes = int(context.meta.n_classes)
    if not is_conditional(unet):
        seed = torch_seed(context.seed, "diffusion.queries", 0)
        count = generation.per_class * n_classes
        generated = _generate(context, count, None, seed)
        return QuerySet(generated, None, predicted_source(context.train, generated),
                        np.full(count, seed, dtype=np.int64), "generated",
                        "unconditional model: query sources predicted by a logistic regression on the training images")
    images: list[torch.Tensor] = []
    conditions: list[torch.Tensor] = []
    seeds: list[np.ndarray] = []
    for label in range(n_classes):
        seed = torch_seed(context.seed, "diffusion.queries", label)
        images.append(_generate(context, generation.per_class, label, seed))
        conditions.append(torch.full((generation.per_class,), label, dtype=torch.long))
        seeds.append(np.full(generation.per_class, seed, dtype=np.int64))
    condition = torch.cat(conditions)
    return QuerySet(torch.cat(images), condition, condition.numpy().astype(np.int64), np.concatenate(seeds),
                    "generated")


def to_model_scale(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1]: uint8 or floats above 1 are read as [0, 255], non-negative floats as
    [0, 1], anything with negative values as already in [-1, 1]."""
    x = images.astype(np.float32)
    if images.dtype == np.uint8 or x.max(initial=0.0) > 1.0:
        return x / 127.5 - 1.0
    return x * 2.0 - 1.0 if x.min(initial=0.0) >= 0.0 else x


def file_queries(path: str | Path, meta: DatasetMeta) -> QuerySet:
    """The images of the ``.npz`` at ``path`` (``images`` ``(Q, H, W)`` or ``(Q, C, H, W)``; optional
    ``labels`` and ``source`` ``(Q,)``), scaled (:func:`to_model_scale`) and resized (bilinear,
    antialiased) to ``meta.feature_shape``. ``source`` defaults to ``labels``, else -1."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"queries.file: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            data = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"queries.file: {path} is not a readable .npz ({exc})") from None
    if "images" not in data:
        raise DataError(f"queries.file: {path} has no 'images' array (found {sorted(data)})")
    images = data["images"]
    if images.ndim == 3:
        images = images[:, None]
    channels, height, width = (int(d) for d in meta.feature_shape)
    if images.ndim != 4 or images.shape[1] != channels or images.shape[0] == 0:
        raise DataError(f"queries.file: images of shape {data['images'].shape} do not fit "
                        f"{channels}-channel images (Q, {channels}, H, W)")
    x = torch.from_numpy(to_model_scale(images))
    if x.shape[2:] != (height, width):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                                            align_corners=False).clamp(-1, 1)
    q = x.shape[0]
    for name in ("labels", "source"):
        if name in data and data[name].shape != (q,):
            raise DataError(f"queries.file: {name} has shape {data[name].shape}, expected ({q},)")
    labels = data.get("labels")
    if labels is not None and ((labels < 0) | (labels >= meta.n_classes)).any():
        raise DataError(f"queries.file: labels must lie in [0, {meta.n_classes})")
    conditions = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    source = data.get("source", labels)
    source = np.full(q, -1, dtype=np.int64) if source is None else source.astype(np.int64)
    return QuerySet(x.contiguous(), conditions, source, np.full(q, -1, dtype=np.int64), "file")


def retrieval_queries(context: Any) -> QuerySet:
    """The queries whose top-k are stored per query: ``queries.file`` when set (sources it does
    not give predicted, :func:`predicted_source`), else the generation queries."""
    file = getattr(context.params.queries, "file", None)
    if not file:
        queries = generation_queries(context)
        corruption = context.params.corruption
        if corruption.kind != "duplicates":
            return queries
        # generations near the duplicated image are what its recall is measured on: add a
        # watermark-sized batch of the target class (which image is duplicated is not read)
        extra = _target_generations(context, int(corruption.target_class))
        return replace(queries, images=torch.cat([queries.images, extra.images]),
                       conditions=None if queries.conditions is None or extra.conditions is None
                       else torch.cat([queries.conditions, extra.conditions]),
                       source=np.concatenate([queries.source, extra.source]),
                       seeds=np.concatenate([queries.seeds, extra.seeds]),
                       note=f"{len(extra)} generations of the duplicates' target class added")
    queries = file_queries(file, context.meta)
    unknown = queries.source < 0
    if not unknown.any():
        return queries
    source = queries.source.copy()
    source[unknown] = predicted_source(context.train, queries.images[torch.from_numpy(unknown)])
    return replace(queries, source=source, note="sources not in the file predicted by a logistic regression on the "
                   "training images")


def watermark_queries(context: Any) -> tuple[QuerySet, QuerySet | None]:
    """The harm queries and their reference. With the watermark corruption (the fitted model's
    ``generation.target_class`` and ``detector``): ``generation.n_watermark`` generations of the
    target class, split into those the detector flags (harm) and the rest (reference; None when
    empty); all of them are harm, noted, when it flags none. Else: the generation queries, no
    reference."""
    target = context.model.generation.get("target_class")  # None without the watermark corruption
    detector = context.model.detector
    if target is None or detector is None:
        return generation_queries(context), None
    generated = _target_generations(context, int(target))
    flags = np.asarray(detector.flags(generated.images), dtype=bool)
    if not flags.any():
        return replace(generated, kind="harm", note=f"the detector flagged none of {len(generated)} target-class "
                       "generations; all of them attributed"), None

    def part(rows: np.ndarray, kind: str) -> QuerySet:
        keep = torch.from_numpy(rows)
        return QuerySet(generated.images[keep], None if generated.conditions is None else generated.conditions[keep],
                        generated.source[rows], generated.seeds[rows], kind)

    return part(flags, "harm"), part(~flags, "reference") if not flags.all() else None


def harm_queries(context: Any) -> QuerySet:
    """The generations attributed (:func:`watermark_queries`)."""
    return watermark_queries(context)[0]


def _target_generations(context: Any, target: int) -> QuerySet:
    """``generation.n_watermark`` generations of class ``target`` (``diffusion.harm_queries`` stream)."""
    count = int(context.params.generation.n_watermark)
    seed = torch_seed(context.seed, "diffusion.harm_queries")
    label = target if is_conditional(context.model.model) else None
    images = _generate(context, count, label, seed)
    conditions = None if label is None else torch.full((count,), target, dtype=torch.long)
    source = (np.full(count, target, dtype=np.int64) if label is not None else predicted_source(context.train, images))
    return QuerySet(images, conditions, source, np.full(count, seed, dtype=np.int64), "generated")


# One-sided level of the test below: the chance of taking the contrast on a model whose flags are
# all false positives, fixed before any run
SIGNAL_LEVEL = 0.05


def clean_generations(context: Any, count: int) -> QuerySet | None:
    """``count`` generations (round robin over the classes other than the watermark's target, each
    class's batch seeded from ``diffusion.harm_queries`` member = the class), which cannot carry
    the watermark since no image of their class was planted; None for an unconditional model, a
    single class, or no watermark."""
    target = context.model.generation.get("target_class")
    n_classes = int(context.meta.n_classes)
    if target is None or not is_conditional(context.model.model) or n_classes < 2 or count < 1:
        return None
    others = [c for c in range(n_classes) if c != int(target)]
    per_class = np.bincount(np.arange(count) % len(others), minlength=len(others))
    images, labels, seeds = [], [], []
    for label, n in zip(others, per_class.tolist()):
        if n:
            seed = torch_seed(context.seed, "diffusion.harm_queries", label)
            images.append(_generate(context, n, label, seed))
            labels.append(np.full(n, label, dtype=np.int64))
            seeds.append(np.full(n, seed, dtype=np.int64))
    source = np.concatenate(labels)
    return QuerySet(torch.cat(images), torch.from_numpy(source), source, np.concatenate(seeds), "clean")


def watermark_signal(context: Any, n_flagged: int, n_generated: int) -> dict[str, Any]:
    """Whether the detector flags the target class's generations (``n_flagged`` of ``n_generated``)
    more often than it flags generations of the other classes (:func:`clean_generations`, as many),
    its false-positive rate on this model's own samples: one-sided Fisher exact test at
    ``SIGNAL_LEVEL``. ``significant`` False means the flags are indistinguishable from false
    positives (a model that does not generate the watermark), and a contrast between flagged and
    unflagged generations would split the class at random; None when untestable (no clean
    generations)."""
    from scipy.stats import fisher_exact

    clean = clean_generations(context, n_generated)
    if clean is None or n_generated < 1:
        return {"significant": None, "flagged": n_flagged, "generated": n_generated,
                "note": "no generations of other classes to measure the detector's false-positive rate on"}
    false_flags = int(np.asarray(context.model.detector.flags(clean.images), dtype=bool).sum())
    table = [[n_flagged, n_generated - n_flagged], [false_flags, len(clean) - false_flags]]
    p_value = float(fisher_exact(table, alternative="greater")[1])
    return {"significant": p_value < SIGNAL_LEVEL, "flagged": n_flagged, "generated": n_generated,
            "clean_flagged": false_flags, "clean_generated": len(clean), "p_value": p_value, "level": SIGNAL_LEVEL}

"""The diffusion family's estimators (issue 18; DMin, Lin, Lao & Zhao, arXiv 2412.08637): dmin,
pixel_nn and dtrak on a tiny class-conditional UNet trained on 8x8 digits.

Ground truth: near-duplicates of training images come back at rank 1; the sketched scores track
the uncompressed ones (correlation, rising with v); a fill killed after its first shard resumes
computing only the missing shards (locally and through an S3 output root); TRAK's kernel in the
sample space equals the feature-space formula; precision@k and duplicate recall on hand-made
tables; the per-query tables land where the report's evaluation reads them."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import polars as pl
import pytest
import torch

from cleanse.data.dataset import DatasetMeta, Split
from cleanse.errors import DataError
from cleanse.estimators.dmin import DminEstimator
from cleanse.estimators.dmin_options import DminOptions
from cleanse.estimators.dtrak import DtrakEstimator, trak_scores
from cleanse.estimators.dtrak_options import DtrakOptions
from cleanse.estimators.pixel_nn import PixelNNEstimator
from cleanse.estimators.pixel_nn_options import PixelNNOptions
from cleanse.families.diffusion import caching
from cleanse.families.diffusion.queries import file_queries, harm_queries
from cleanse.families.diffusion.retrieval import (duplicate_recall, precision_at_k, reproducing,
                                                  retrieval_evaluations)
from cleanse.storage import Layout, read_table

TARGET = 3  # the watermark's class


def _split(x: np.ndarray, y: np.ndarray, corrupted: np.ndarray, start: int) -> Split:
    return Split(sample_id=np.arange(start, start + len(y), dtype=np.int64), features=x.astype(np.float32),
                 label=y.astype(np.int64), label_clean=y.astype(np.int64), is_corrupted=corrupted,
                 source=y.astype(np.int64))


def tiny_context(cache_dir: Path | None = None, n_train: int = 120, epochs: int = 2, seed: int = 0):
    """A :class:`DiffusionContext` over digits in [-1, 1], 4 of the target class's training images
    carrying a bright 2x2 patch in the top-left corner, a conditional UNet (widths 8, 16) fitted
    for ``epochs``, and the family's watermark detector fitted on the validation images."""
    from sklearn.datasets import load_digits

    from cleanse.families.diffusion.fitted import DiffusionContext, FittedDiffusion
    from cleanse.families.diffusion.models import ddpm_scheduler, small_unet
    from cleanse.families.diffusion.train import fit_ddpm
    from cleanse.families.diffusion.watermark import Patch, WatermarkDetector, plant_patch

    digits = load_digits()
    x = (digits.images[:, None] / 8.0 - 1.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    patch = Patch(2, 1.0)
    train_x, train_y = x[:n_train].copy(), y[:n_train]
    planted = np.flatnonzero(train_y == TARGET)[:4]
    train_x[planted] = plant_patch(train_x[planted], patch)
    corrupted = np.zeros(n_train, dtype=bool)
    corrupted[planted] = True
    train = _split(train_x, train_y, corrupted, 0)
    val = _split(x[n_train:n_train + 40], y[n_train:n_train + 40], np.zeros(40, dtype=bool), 10_000)
    unet = small_unet(8, 1, (8, 16), n_classes=10, attention=False, seed=seed)
    scheduler = ddpm_scheduler(1000)
    history = fit_ddpm(unet, scheduler, torch.from_numpy(train_x), torch.from_numpy(train_y), epochs=epochs,
                       batch_size=32, seed=seed)
    spec = {"image_shape": [1, 8, 8], "widths": [8, 16], "attention": False, "n_classes": 10,
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "lora": None, "seed": seed}
    generation = {"per_class": 2, "steps": 20, "n_watermark": 8, "target_class": TARGET}
    fitted = FittedDiffusion(unet, scheduler, spec, history, WatermarkDetector.fit(val.features, patch), seed,
                             generation)
    params = SimpleNamespace(
        generation=SimpleNamespace(per_class=2, steps=20, n_watermark=8),
        corruption=SimpleNamespace(kind="watermark", target_class=TARGET),
        queries=SimpleNamespace(file=None),
        evaluate=SimpleNamespace(retrieval=True, retrieval_k=[5, 10, 50]),
        estimators=["dmin", "pixel_nn", "dtrak"])
    meta = DatasetMeta(name="digits", n_classes=10, feature_shape=(1, 8, 8),
                       corruption={"kind": "watermark", "target_class": TARGET, "planted": planted.tolist()})
    return DiffusionContext(train, val, meta, fitted, params, seed, cache_dir)


# Small but faithful: S = 4 timesteps, shards of 32 (4 shards for 120 images).
# reference none: a 2-epoch model does not generate the watermark, so the detector's flags on its
# generations split them at random and the default contrast (unflagged) has nothing to find; the
# plain mean over the harm queries is what these tests check
DMIN = DminOptions(timesteps=4, sizes=[256, 1024, 4096], size=4096, shard_size=32, batch_size=32, reference="none")
DTRAK = DtrakOptions(timesteps=4, size=256, shard_size=64, batch_size=32, reference="none")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on 2 shared cores, two threads of these tiny convolutions oversubscribe
    (measured: 46 s against 1 s for the fixture's fit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    return tiny_context(tmp_path_factory.mktemp("cache"))


def _with_file_queries(context, path: Path):
    params = SimpleNamespace(**{**vars(context.params), "queries": SimpleNamespace(file=str(path))})
    return replace(context, params=params)


def test_near_duplicates_of_training_images_come_back_at_rank_one(context, tmp_path):
    rows = np.array([0, 17, 33, 58, 90, 119])
    noise = np.random.default_rng(1).normal(0, 0.05, (rows.size, 1, 8, 8))
    images = np.clip(context.train.features[rows] + noise, -1, 1).astype(np.float32)
    np.savez(tmp_path / "q.npz", images=images, labels=context.train.label[rows])
    ctx = _with_file_queries(context, tmp_path / "q.npz")
    for estimator, options in ((DminEstimator(), DMIN), (DminEstimator(), DMIN.model_copy(update={"index": "exact"})),
                               (PixelNNEstimator(), PixelNNOptions())):
        out = estimator.write_artifacts(ctx, options, context.val, tmp_path / estimator.name)
        table = read_table(out["queries"])
        assert set(table.columns) == {"query_id", "rank", "sample_id", "score", "query_source", "sample_source"}
        top = table.filter(pl.col("rank") == 1).sort("query_id")
        assert top["sample_id"].to_list() == context.train.sample_id[rows].tolist(), (estimator.name, options)
        # 50 stored per query (evaluate.retrieval_k's largest), scores descending
        assert table.height == rows.size * 50
        for _, group in table.group_by("query_id"):
            assert np.all(np.diff(group.sort("rank")["score"].to_numpy()) <= 1e-6)
    # dmin's top score is close to S (the near-duplicate's cosine is about 1 at every timestep)
    dmin = read_table(tmp_path / "dmin" / "queries.parquet").filter(pl.col("rank") == 1)
    assert dmin["score"].min() > 0.9 * DMIN.timesteps


def test_sketch_scores_track_the_uncompressed_influence(context):
    from cleanse.families.diffusion.signatures import influence, signatures
    from cleanse.families.diffusion.timesteps import cube_timesteps, shared_noise

    queries = harm_queries(context)
    ts = torch.from_numpy(cube_timesteps(1000, DMIN.timesteps))
    noise = shared_noise(context.seed, (1, 8, 8), DMIN.timesteps)
    unet, scheduler = context.model.model, context.model.scheduler
    exact = influence(signatures(unet, scheduler, queries.images, noise, ts, queries.conditions),
                      signatures(unet, scheduler, context.images(), noise, ts, context.conditions())).numpy()
    correlations = {}
    for v in DMIN.sizes:
        train = caching.cached_vectors(context, DMIN, v)
        query = caching.transform(context, DMIN, queries.images, queries.conditions)[v].reshape(len(queries), -1)
        sketched = query.double().numpy() @ train.astype(np.float64).T / DMIN.timesteps  # sum over s -> mean
        correlations[v] = np.corrcoef(sketched.ravel(), exact.ravel())[0, 1]
    assert correlations[4096] >= 0.95, correlations
    assert correlations[256] < correlations[4096], correlations
    # the score is the mean over the harm queries of the sketched influence
    table = DminEstimator().score(context, DMIN).table
    train = caching.cached_vectors(context, DMIN, 4096)
    query = caching.transform(context, DMIN, queries.images, queries.conditions)[4096].reshape(len(queries), -1)
    np.testing.assert_allclose(table["score"].to_numpy(), (query.double().numpy() @ train.T).mean(0), rtol=1e-5)


def test_a_killed_fill_resumes_with_only_the_missing_shards(context, tmp_path):
    ctx = replace(context, cache_dir=tmp_path)
    calls: list[int] = []

    def killed_after_first(task, shards):
        for shard in shards:
            task(shard)
            calls.append(shard)
            if len(calls) == 1:
                raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        caching.fill_cache(ctx, DMIN, killed_after_first)
    cache = caching.signature_cache(ctx, DMIN)
    assert cache.pending(4) == [1, 2, 3]
    resumed: list[int] = []
    caching.fill_cache(ctx, DMIN, lambda task, shards: [resumed.append(s) or task(s) for s in shards])
    assert resumed == [1, 2, 3]
    # the same vectors as the module's uninterrupted cache, and each shard a pure function
    # (equal up to float rounding: the vmap'd reductions may differ in the last bit between calls)
    np.testing.assert_allclose(caching.cached_vectors(ctx, DMIN, 1024), caching.cached_vectors(context, DMIN, 1024),
                               rtol=1e-4, atol=1e-7)
    shard = caching.compute_shard(ctx, DMIN, 2)
    assert shard["sample_id"].tolist() == list(range(64, 96)) and shard["v4096"].shape == (32, 4, 4096)
    torch.testing.assert_close(shard["v256"], cache.read(2)["v256"], rtol=1e-4, atol=1e-7)
    # another model is another cache
    other = replace(ctx, model=tiny_context(epochs=1).model)
    assert caching.signature_cache(other, DMIN).root != cache.root


@pytest.mark.slow
def test_the_cache_lives_in_the_s3_output_root_and_resumes_from_it(context, s3_env, tmp_path):
    import shutil

    from cleanse import remote

    uri = f"s3://cleanse/diffusion-{uuid.uuid4().hex[:8]}"
    layout = Layout.at(uri)
    ctx = replace(context, cache_dir=layout.root / "cache")

    def killed_after_first(task, shards):
        task(shards[0])
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        caching.fill_cache(ctx, DMIN, killed_after_first)
    root = caching.signature_cache(ctx, DMIN).root
    relative = root.relative_to(layout.root).as_posix()
    listed = remote.list_objects(uri)
    assert f"{relative}/shard_00000.safetensors" in listed and f"{relative}/shard_00000.meta.json" in listed
    shutil.rmtree(layout.root)  # another machine: nothing local
    layout = Layout.at(uri)
    resumed: list[int] = []
    caching.fill_cache(ctx, DMIN, lambda task, shards: [resumed.append(s) or task(s) for s in shards])
    assert resumed == [1, 2, 3]
    assert f"{relative}/manifest.meta.json" in remote.list_objects(uri)
    np.testing.assert_allclose(caching.cached_vectors(ctx, DMIN, 256), caching.cached_vectors(context, DMIN, 256),
                               rtol=1e-4, atol=1e-7)


def test_scores_put_the_watermarked_images_first_and_are_deterministic(context):
    from sklearn.metrics import roc_auc_score

    for estimator, options in ((DminEstimator(), DMIN), (PixelNNEstimator(), PixelNNOptions(reference="none")),
                               (DtrakEstimator(), DTRAK)):
        table = estimator.score(context, options).table
        assert table["sample_id"].to_list() == context.train.sample_id.tolist()
        auc = roc_auc_score(context.train.is_corrupted, table["score"].to_numpy())
        assert auc > 0.55, (estimator.name, auc)
        assert estimator.score(context, options).table.equals(table)


def test_trak_kernel_in_sample_space_equals_the_feature_space_formula():
    rng = np.random.default_rng(0)
    for n, v in ((12, 40), (40, 12)):
        phi, q = rng.standard_normal((n, v)), rng.standard_normal((3, v))
        ridge = 0.1 * (phi ** 2).sum() / n
        expected = q @ np.linalg.inv(phi.T @ phi + ridge * np.eye(v)) @ phi.T
        np.testing.assert_allclose(trak_scores(phi, q, 0.1), expected, rtol=1e-8, atol=1e-10)


def test_precision_at_k_and_duplicate_recall_known_answers():
    retrieved = np.array([[1, 1, 2, 1, -1], [0, 0, 0, 0, 0], [3, 3, 3, 3, 3]])
    out = precision_at_k(retrieved, np.array([1, 2, -1]), (1, 4, 5, 10))
    assert out == {"precision_at_1": 0.5, "precision_at_4": 3 / 8, "precision_at_5": 3 / 10}
    assert precision_at_k(retrieved, np.array([-1, -1, -1]), (5,)) == {}
    ids = np.array([[7, 8, 9], [1, 2, 3], [4, 7, 5]])
    recall, count = duplicate_recall(ids, np.array([7, 70]), np.array([True, True, False]), k=3)
    assert (recall, count) == (0.5, 2)
    assert duplicate_recall(ids, np.array([7]), np.zeros(3, dtype=bool)) == (None, 0)
    train = np.stack([np.zeros((1, 2, 2)), np.ones((1, 2, 2))])
    far = np.ones((1, 2, 2)) + np.array([[3.0, -3.0], [3.0, -3.0]])  # nearest to the copy, yet no reproduction
    assert reproducing(np.stack([np.full((1, 2, 2), 0.9), np.full((1, 2, 2), 0.1), far]), train,
                       np.array([False, True])).tolist() == [True, False, False]


def test_retrieval_evaluations_read_the_stored_query_tables(context, tmp_path):
    layout = Layout.at(tmp_path / "run")
    out = PixelNNEstimator().write_artifacts(context, PixelNNOptions(), context.val, layout.root / "scores" / "pixel_nn")
    assert Path(out["query_images"]).is_file()
    staged = SimpleNamespace(train=context.train)
    metrics = retrieval_evaluations(context.params, staged, layout, {})
    assert set(metrics) == {"pixel_nn"}  # dmin and dtrak stored nothing here
    retrieval = metrics["pixel_nn"]["retrieval"]
    assert retrieval["n_queries"] == 20 and retrieval["k"] == 50
    table = read_table(out["queries"])
    hits = (table["sample_source"] == table["query_source"]).to_numpy().reshape(20, 50)
    assert retrieval["precision_at_10"] == pytest.approx(hits[:, :10].mean())
    assert json.dumps(metrics)  # JSON-able for metrics.json


def test_file_queries_scale_resize_and_refuse_bad_files(tmp_path):
    meta = DatasetMeta(name="digits", n_classes=10, feature_shape=(1, 8, 8))
    images = np.zeros((2, 16, 16), dtype=np.uint8)
    images[1] = 255
    np.savez(tmp_path / "q.npz", images=images, labels=np.array([1, 2]))
    queries = file_queries(tmp_path / "q.npz", meta)
    assert queries.images.shape == (2, 1, 8, 8) and queries.kind == "file"
    assert torch.allclose(queries.images[0], torch.tensor(-1.0)) and torch.allclose(queries.images[1], torch.tensor(1.0))
    assert queries.source.tolist() == [1, 2] and queries.conditions.tolist() == [1, 2]
    np.savez(tmp_path / "bad.npz", pictures=images)
    with pytest.raises(DataError, match="no 'images' array"):
        file_queries(tmp_path / "bad.npz", meta)
    np.savez(tmp_path / "bad2.npz", images=images, labels=np.array([1, 12]))
    with pytest.raises(DataError, match="labels must lie"):
        file_queries(tmp_path / "bad2.npz", meta)
    with pytest.raises(DataError, match="does not exist"):
        file_queries(tmp_path / "none.npz", meta)


def test_harm_queries_are_the_flagged_target_generations(context):
    queries = harm_queries(context)
    assert queries.kind == "harm" and (queries.source == TARGET).all()
    assert queries.conditions is not None and (queries.conditions == TARGET).all()
    if not queries.note:  # the detector flagged some: only those are attributed
        assert context.model.detector.flags(queries.images).all()
    again = harm_queries(context)
    assert torch.equal(again.images, queries.images)


def test_an_unconditional_models_queries_get_predicted_sources(context):
    from cleanse.families.diffusion.fitted import FittedDiffusion
    from cleanse.families.diffusion.models import small_unet
    from cleanse.families.diffusion.queries import generation_queries, predicted_source

    own = predicted_source(context.train, context.images())
    assert (own == context.train.label).mean() > 0.95  # the classifier knows the training digits
    unet = small_unet(8, 1, (8, 16), n_classes=None, attention=False, seed=0)
    fitted = FittedDiffusion(unet, context.model.scheduler, {**context.model.spec, "n_classes": None}, [], None, 0,
                             {"per_class": 2, "steps": 20, "n_watermark": 8, "target_class": None})
    queries = generation_queries(replace(context, model=fitted))
    assert len(queries) == 20 and queries.conditions is None and "predicted" in queries.note
    assert ((queries.source >= 0) & (queries.source < 10)).all()
    assert harm_queries(replace(context, model=fitted)).kind == "generated"  # no watermark target: all generations


def test_file_queries_without_sources_get_predicted_ones(context, tmp_path):
    from cleanse.families.diffusion.queries import retrieval_queries

    rows = np.arange(0, 120, 7)
    np.savez(tmp_path / "q.npz", images=context.train.features[rows])
    queries = retrieval_queries(_with_file_queries(context, tmp_path / "q.npz"))
    assert queries.kind == "file" and "predicted" in queries.note
    assert (queries.source == context.train.label[rows]).mean() > 0.9


def test_the_unflagged_reference_is_subtracted(context, monkeypatch):
    """reference: unflagged scores the harm queries' mean similarity minus the reference queries'
    (monkeypatched split: harm = copies of watermarked images, reference = clean ones of the class)."""
    from cleanse.families.diffusion import queries as module
    from cleanse.families.diffusion.queries import QuerySet

    def query_set(rows: np.ndarray, kind: str) -> QuerySet:
        return QuerySet(context.images()[torch.from_numpy(rows)], context.conditions()[torch.from_numpy(rows)],
                        context.train.label[rows], np.zeros(rows.size, dtype=np.int64), kind)

    target = np.flatnonzero(context.train.label == TARGET)
    harm_rows, reference_rows = target[context.train.is_corrupted[target]], target[~context.train.is_corrupted[target]]
    monkeypatch.setattr(module, "watermark_queries",
                        lambda ctx: (query_set(harm_rows, "harm"), query_set(reference_rows, "reference")))
    # the flags taken as the real watermark (the fallback is tested below)
    monkeypatch.setattr(module, "watermark_signal", lambda ctx, flagged, generated: {"significant": True})
    plain = PixelNNEstimator().score(context, PixelNNOptions(reference="none")).table
    contrast = PixelNNEstimator().score(context, PixelNNOptions(reference="unflagged"))
    x = PixelNNEstimator().train_vectors(context, PixelNNOptions()).astype(np.float64)
    expected = (x[harm_rows] @ x.T).mean(0) - (x[reference_rows] @ x.T).mean(0)
    np.testing.assert_allclose(contrast.table["score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain["score"].to_numpy(), (x[harm_rows] @ x.T).mean(0), rtol=1e-5, atol=1e-6)
    assert contrast.meta["n_reference_queries"] == reference_rows.size
    # the clean images of the class are no longer ranked with the watermarked ones
    top = np.argsort(-contrast.table["score"].to_numpy())[:harm_rows.size]
    assert set(top) == set(harm_rows)


def _more_watermark_generations(context, count: int):
    params = SimpleNamespace(**{**vars(context.params),
                                "generation": SimpleNamespace(**{**vars(context.params.generation), "n_watermark": count})})
    return replace(context, params=params)


def test_unflagged_falls_back_to_none_when_the_flags_are_false_positives(context):
    """The 2-epoch model does not generate the watermark: its detector flags the target class's
    generations no more often than the other classes' (13 of 40 against 14 of 40 measured), so the
    default reference: unflagged scores exactly as reference: none and says so in a note."""
    from cleanse.families.diffusion import queries as module

    ctx = _more_watermark_generations(context, 40)
    default = DminEstimator().score(ctx, DMIN.model_copy(update={"reference": "unflagged"}))
    plain = DminEstimator().score(ctx, DMIN).table["score"].to_numpy()
    signal = default.meta["watermark_signal"]
    assert signal["significant"] is False and signal["reference_used"] == "none"
    assert signal["clean_generated"] == signal["generated"] == 40
    assert signal["p_value"] >= module.SIGNAL_LEVEL
    assert "fell back to none" in default.meta["note"] and default.meta["n_reference_queries"] == 0
    np.testing.assert_array_equal(default.table["score"].to_numpy(), plain)


def test_the_watermark_signal_is_significant_when_flags_exceed_the_false_positive_rate(context):
    """The same model's other-class generations as the false-positive reference: 35 flags of 40
    is far above it (contrast kept), its own rate is not; the clean generations are the classes
    other than the target, round robin, seeded (the signal regenerates the same ones)."""
    from cleanse.families.diffusion.queries import clean_generations, watermark_signal

    clean = clean_generations(context, 40)
    assert clean is not None and TARGET not in clean.source and len(clean) == 40
    assert np.bincount(clean.source, minlength=10)[[c for c in range(10) if c != TARGET]].min() >= 4
    false_flags = int(context.model.detector.flags(clean.images).sum())
    high = watermark_signal(context, 35, 40)
    assert high["significant"] is True and high["clean_flagged"] == false_flags and high["p_value"] < 0.05
    assert watermark_signal(context, false_flags, 40)["significant"] is False


def test_float16_signatures_halve_the_storage_and_keep_the_scores(context):
    """dtype: float16 stores the shards and the HNSW index's vectors in half precision (their own
    cache key, so never mixed with float32 shards): entries within float16 rounding of the float32
    ones, the same scores to 1e-3 of their spread, the index file about half the bytes, and each
    training image still its own nearest neighbour."""
    half = DMIN.model_copy(update={"dtype": "float16"})
    full_vectors = caching.cached_vectors(context, DMIN, 4096)
    half_vectors = caching.cached_vectors(context, half, 4096)
    cache = caching.signature_cache(context, half)
    assert cache.root != caching.signature_cache(context, DMIN).root
    assert cache.read(0)["v4096"].dtype == torch.float16 and half_vectors.dtype == np.float32
    np.testing.assert_allclose(half_vectors, full_vectors, rtol=2 ** -10, atol=1e-7)
    assert not np.array_equal(half_vectors, full_vectors)
    full_score = DminEstimator().score(context, DMIN).table["score"].to_numpy()
    result = DminEstimator().score(context, half)
    assert result.meta["bytes_per_sample"] == 4 * (256 + 1024 + 4096) * 2
    np.testing.assert_allclose(result.table["score"].to_numpy(), full_score, atol=1e-3 * np.ptp(full_score))
    full_index = caching.cached_index(context, DMIN, 4096, full_vectors)
    half_index = caching.cached_index(context, half, 4096, half_vectors)
    full_bytes = (caching.signature_cache(context, DMIN).root / "index_v4096.faiss").stat().st_size
    half_bytes = (cache.root / "index_v4096.faiss").stat().st_size
    assert 0.45 < half_bytes / full_bytes < 0.6
    _, ids = half_index.search(full_vectors, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(len(context.train)))
    assert len(full_index) == len(half_index)

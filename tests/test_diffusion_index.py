"""DMin storage and retrieval (issue 18): the sketch (shape for every size, one pass equal to each
size on its own, unbiased inner products with the OPORP variance, by Monte Carlo), the exact scan,
the faiss HNSW index's recall against it, index files, and the shard cache resuming after a kill."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleanse.errors import ArtifactError, ConfigError
from cleanse.families.diffusion.index import HnswIndex, ShardCache, exact_topk, flatten
from cleanse.families.diffusion.sketch import DEFAULT_SIZES, Sketch, dense_projection, oporp_variance


def test_the_sketch_has_every_size_from_one_pass():
    dim = 70_001  # not a multiple of 2^16: padded to 2 * 65536
    sketch = Sketch.make(dim, DEFAULT_SIZES, seed=42)
    assert sketch.sizes == tuple(2 ** k for k in range(8, 17)) and sketch.padded == 131_072
    assert sorted(sketch.permutation.tolist()) == list(range(sketch.padded))
    assert set(sketch.signs.unique().tolist()) == {-1.0, 1.0}
    vectors = torch.randn(3, 2, dim, dtype=torch.float64)
    out = sketch(vectors)
    padded = torch.nn.functional.pad(vectors, (0, sketch.padded - dim))
    signed = padded[..., sketch.permutation] * sketch.signs.double()
    for v in DEFAULT_SIZES:
        assert out[v].shape == (3, 2, v)
        # contiguous groups of D'/v entries, straight from the definition
        torch.testing.assert_close(out[v], signed.reshape(3, 2, v, -1).sum(-1))
    # the signs and the permutation are the seed's: the same sketch again, another for another seed
    assert torch.equal(Sketch.make(dim, DEFAULT_SIZES, seed=42).permutation, sketch.permutation)
    assert not torch.equal(Sketch.make(dim, DEFAULT_SIZES, seed=43).signs, sketch.signs)
    with pytest.raises(ConfigError, match="must each divide the largest"):
        Sketch.make(100, (24, 64))
    with pytest.raises(ConfigError, match="vectors of 5 entries"):
        sketch(torch.zeros(5))


@pytest.mark.parametrize("row_blocks", [False, True])
def test_the_sketch_of_parts_follows_the_definition_on_both_scatter_paths(row_blocks, monkeypatch):
    """from_parts (the per-parameter blocks of 20 gradient rows, scaled per row) equals pad, permute,
    sign, group-sum of the scaled concatenated rows, on the column scatter and the row-block one
    (20 rows: a full block of 16 and a partial one)."""
    from cleanse.families.diffusion import sketch as module

    monkeypatch.setattr(module, "_SCATTER_BY_COLUMN_MAX", 0 if row_blocks else 10 ** 12)
    dim, rows = 5_003, 20
    sketch = Sketch.make(dim, (16, 256, 1024), seed=7)
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(rows, width, generator=generator, dtype=torch.float64) for width in (3, 4_000, 1_000)]
    scale = torch.rand(rows, 1, generator=generator, dtype=torch.float64) + 0.5
    out = sketch.from_parts(parts, scale)
    padded = torch.nn.functional.pad(torch.cat(parts, dim=1) * scale, (0, sketch.padded - dim))
    signed = padded[:, sketch.permutation] * sketch.signs.double()
    for v in (16, 256, 1024):
        torch.testing.assert_close(out[v], signed.reshape(rows, v, -1).sum(-1))


def test_sketched_inner_products_are_unbiased_with_the_oporp_variance():
    """Monte Carlo over 1,500 seeds (permutation and signs): the mean of <C(a), C(b)> is <a, b>
    within 4 standard errors, its variance is the closed form within 15%, and falls with v."""
    dim = 256
    draws = np.random.default_rng(0)
    a = draws.standard_normal(dim)
    b = 0.6 * a + 0.8 * draws.standard_normal(dim)
    pair = torch.tensor(np.stack([a, b]))
    exact = float(a @ b)
    variances = []
    for v in (8, 32, 128):
        values = []
        for seed in range(1500):
            c = Sketch.make(dim, (v,), seed=seed)(pair)[v]
            values.append(float(c[0] @ c[1]))
        values_np = np.array(values)
        assert abs(values_np.mean() - exact) < 4 * values_np.std() / np.sqrt(len(values_np))
        expected = oporp_variance(a, b, v)
        assert abs(values_np.var() / expected - 1) < 0.15, (v, values_np.var(), expected)
        variances.append(values_np.var())
    assert variances[0] > 3 * variances[1] > 9 * variances[2]
    # at v = D every entry is its own group: the sketch is a signed permutation, exact
    c = Sketch.make(dim, (dim,), seed=0)(pair)[dim]
    assert abs(float(c[0] @ c[1]) - exact) < 1e-9 and oporp_variance(a, b, dim) == 0.0


def test_the_dense_projection_is_unbiased_too():
    dim, size = 300, 64
    draws = np.random.default_rng(1)
    pair = torch.tensor(draws.standard_normal((2, dim)), dtype=torch.float32)
    values = [float(p[0] @ p[1]) for p in (dense_projection(pair, size, seed, block=128) for seed in range(400))]
    exact = float(pair[0] @ pair[1])
    assert abs(np.mean(values) - exact) < 4 * np.std(values) / np.sqrt(len(values))


def _clustered(n: int, centres: np.ndarray, seed: int, spread: float = 0.7) -> np.ndarray:
    """Synthetic sketched signatures of the real layout: ``(n, S * v)`` float32, each timestep's
    block a unit vector near one of the ``centres`` ``(c, S, v)``."""
    draws = np.random.default_rng(seed)
    x = centres[draws.integers(0, centres.shape[0], n)] + spread * draws.standard_normal((n, *centres.shape[1:]))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return flatten(x)


def test_exact_scan_matches_a_full_sort():
    draws = np.random.default_rng(2)
    database = draws.standard_normal((500, 40)).astype(np.float32)
    database[77] = database[12]  # a tie: the lower row comes first
    queries = np.concatenate([database[[12, 3]], draws.standard_normal((3, 40)).astype(np.float32)])
    scores, rows = exact_topk(database, queries, k=7, chunk=64)
    full = queries @ database.T
    for q in range(5):
        order = np.lexsort((np.arange(500), -full[q]))[:7]
        assert rows[q].tolist() == order.tolist()
        np.testing.assert_allclose(scores[q], full[q, order], rtol=1e-5)
    assert rows[0, :2].tolist() == [12, 77]


def test_hnsw_recall_against_the_exact_scan(tmp_path):
    """recall@10 of the HNSW index (M 16, ef_construction 200, ef_search 100) on 1,500 loosely
    clustered signatures of S = 10, v = 2^8 (d = 2,560), 50 queries: measured 0.998 (one thread,
    deterministic), bound 0.97; ef_search 10 gives 0.856 (so the index is approximate here), 400
    gives 1.0. The index file round-trips."""
    centres = np.random.default_rng(3).standard_normal((30, 10, 256))
    database, queries = _clustered(1500, centres, seed=4, spread=4.0), _clustered(50, centres, seed=5, spread=4.0)
    ids = np.arange(1500, dtype=np.int64) * 10 + 7  # sample ids, not row numbers
    index = HnswIndex.build(database, ids)
    assert len(index) == 1500 and index.dim == 2560
    scores, found = index.search(queries, k=10)
    exact_scores, rows = exact_topk(database, queries, k=10)
    recall = np.mean([len(set(f) & set(ids[r])) / 10 for f, r in zip(found, rows)])
    assert recall >= 0.97, recall
    assert np.all(scores <= exact_scores[:, :1] + 1e-4)  # nothing beats the true best
    np.testing.assert_allclose(scores, np.sort(scores, axis=1)[:, ::-1])
    def recall_at(ef: int) -> float:
        return float(np.mean([len(set(f) & set(ids[r])) / 10
                              for f, r in zip(index.search(queries, 10, ef_search=ef)[1], rows)]))

    assert recall_at(10) < recall - 0.05 and recall_at(400) >= recall
    path = index.save(tmp_path / "index" / "v256.faiss")
    again = HnswIndex.load(path)
    np.testing.assert_array_equal(again.search(queries, k=10, ef_search=100)[1], found)
    with pytest.raises(ArtifactError, match="missing index"):
        HnswIndex.load(tmp_path / "none.faiss")


def test_the_shard_cache_resumes_after_a_kill(tmp_path):
    key = {"model": "abc", "timesteps": [999, 998], "sketch": {"seed": 42, "sizes": [256]}}
    computed: list[int] = []

    def compute(shard: int) -> dict[str, torch.Tensor]:
        computed.append(shard)
        generator = torch.Generator().manual_seed(shard)
        return {"sample_id": torch.arange(shard * 4, shard * 4 + 4), "v256": torch.randn(4, 2, 256, generator=generator)}

    cache = ShardCache(tmp_path / "cache", key)
    assert cache.fill(5, compute) == [0, 1, 2, 3, 4]
    first = cache.load(5, "v256")
    assert first.shape == (20, 2, 256) and cache.load(5, "sample_id").tolist() == list(range(20))
    manifest = (tmp_path / "cache" / "manifest.meta.json").read_text()
    assert '"shards": 5' in manifest

    computed.clear()
    assert cache.fill(5, compute) == [] and computed == []  # all complete: nothing recomputed
    # the kill: shard 1's record never written, shard 3 truncated, shard 4's file gone
    cache.record_path(1).unlink()
    data = cache.shard_path(3).read_bytes()
    cache.shard_path(3).write_bytes(data[: len(data) // 2])
    cache.shard_path(4).unlink()
    with pytest.raises(ArtifactError, match="shard 1 .* missing or incomplete"):
        cache.read(1)
    assert cache.pending(5) == [1, 3, 4]
    assert cache.fill(5, compute) == [1, 3, 4] and computed == [1, 3, 4]
    torch.testing.assert_close(cache.load(5, "v256"), first)
    # another key (a different model or sketch): every shard is stale
    assert ShardCache(tmp_path / "cache", {**key, "model": "def"}).pending(5) == [0, 1, 2, 3, 4]
    # a runner that maps the task (as a Dask or Ray runner would)
    other = ShardCache(tmp_path / "other", key)
    order: list[int] = []
    assert other.fill(3, compute, run=lambda task, shards: [order.append(s) or task(s) for s in reversed(shards)]) == [0, 1, 2]
    assert order == [2, 1, 0] and torch.equal(other.load(3, "v256"), first[:12])


def test_the_core_imports_without_the_diffusion_extra(tmp_path):
    """diffusers, peft and faiss are imported lazily: without them every module imports, and a call
    that needs one fails in one line naming the extra."""
    import subprocess
    import sys

    script = """
import sys
for name in ("diffusers", "peft", "faiss"):
    sys.modules[name] = None
import numpy as np
from cleanse.errors import ConfigError
from cleanse.families.diffusion import index, models, signatures, sketch, timesteps
for call in (lambda: models.small_unet(), lambda: models.add_lora(None),
             lambda: index.HnswIndex.build(np.zeros((2, 4), dtype=np.float32))):
    try:
        call()
    except ConfigError as error:
        print(error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "family: diffusion needs diffusers: pip install 'cleanse[diffusion]'",
        "family: diffusion needs peft: pip install 'cleanse[diffusion]'",
        "family: diffusion needs faiss: pip install 'cleanse[diffusion]'",
    ]


def test_shards_and_the_index_travel_through_an_s3_output_root(s3_env, tmp_path):
    """Written in a work folder and published (records last), pulled into an empty one: every
    shard is complete there and the index answers the same; a publish that lost a record leaves
    that shard to be recomputed on the other machine."""
    import uuid

    from cleanse.remote import Mirror, is_record

    key = {"model": "abc", "sketch": {"seed": 42, "sizes": [256]}}

    def compute(shard: int) -> dict[str, torch.Tensor]:
        return {"v256": torch.randn(6, 2, 256, generator=torch.Generator().manual_seed(shard))}

    here = ShardCache(tmp_path / "one" / "signatures", key)
    here.fill(3, compute)
    assert is_record("signatures/shard_00001.meta.json") and is_record("signatures/manifest.meta.json")
    assert not is_record("signatures/shard_00001.safetensors")
    vectors = flatten(here.load(3, "v256"))
    HnswIndex.build(vectors).save(tmp_path / "one" / "index" / "v256.faiss")
    here.record_path(2).unlink()  # as if the caching was killed before shard 2's record
    uri = f"s3://cleanse/diffusion-{uuid.uuid4().hex[:8]}"
    Mirror(uri, tmp_path / "one").publish()
    Mirror(uri, tmp_path / "two").pull()
    there = ShardCache(tmp_path / "two" / "signatures", key)
    assert there.pending(3) == [2]
    assert there.fill(3, compute) == [2]
    torch.testing.assert_close(flatten(there.load(3, "v256")), vectors)
    index = HnswIndex.load(tmp_path / "two" / "index" / "v256.faiss")
    np.testing.assert_array_equal(index.search(vectors[:4], 3)[1][:, 0], np.arange(4))

"""Smoke test of benchmarks/diffusion.py: every part (storage, caching cost before/after, source
detection with the sketch and the baselines, the HNSW index, the compact float16 setting, the
cleansing loop) at tiny sizes, end to end, and its
docs section rendered beside another script's section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("faiss")


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "diffusion.py"


@pytest.mark.slow  # ~30 s of CPU, most of it importing diffusers and the first vmap
def test_sketched_batches_equal_the_sketch_of_the_signatures():
    """The caching path the benchmark times (each parameter's gradient scattered into the sketch,
    normalised after) against the sketch of the assembled signatures: the same numbers."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from cleanse.families.diffusion.models import ddpm_scheduler, small_unet
    from cleanse.families.diffusion.signatures import signatures, sketched_batches
    from cleanse.families.diffusion.sketch import Sketch
    from cleanse.families.diffusion.timesteps import cube_timesteps, shared_noise

    digits = load_digits()
    images = torch.from_numpy((digits.images[:3] / 8.0 - 1.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(digits.target[:3].astype(np.int64))
    model, scheduler = small_unet(8, 1, (8, 16), n_classes=10), ddpm_scheduler()
    timesteps, noise = torch.from_numpy(cube_timesteps(1000, 2)), shared_noise(0, (1, 8, 8), 2)
    for normalised in (True, False):
        full = signatures(model, scheduler, images, noise, timesteps, labels, normalised=normalised, batch_size=2)
        sketch = Sketch.make(full.shape[-1], (256, 1024), seed=3)
        expected = sketch(full)
        parts = list(sketched_batches(model, scheduler, images, noise, timesteps, sketch, labels, normalised=normalised,
                                      batch_size=2))
        assert [p[256].shape for p in parts] == [(2, 2, 256), (1, 2, 256)]
        for v in (256, 1024):
            got = torch.cat([p[v] for p in parts])
            assert torch.allclose(got, expected[v], rtol=1e-4, atol=1e-5 * float(expected[v].abs().max()))
        if normalised:  # per timestep, the sketch keeps the unit norm on average: not all zeros, not raw scale
            assert 0.5 < float(expected[1024].norm(dim=-1).mean()) < 1.5


@pytest.mark.slow
@pytest.mark.integration  # a few minutes: outside the default suite, run by .ci/run (pytest -m integration)
def test_smoke_run_measures_every_part_and_renders_its_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- gan:start -->\nkeep me\n<!-- gan:end -->\n")
    out = tmp_path / "diffusion.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--docs", str(docs)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"storage", "caching", "attribution", "duplicates", "index", "compact", "cleansing"}

    # storage: the ratio is D / v, with D the model's parameter count
    small = [r for r in runs["storage"]["rows"] if r["model"].startswith("small_unet")]
    assert {r["v"] for r in small} == {256, 4096, 65536} and all(r["D"] == 177489 for r in small)
    assert all(abs(r["ratio"] - r["D"] / r["v"]) < 1e-9 for r in small)

    # caching: the faster path gives the same sketches as the previous one
    caching = runs["caching"]
    assert caching["max_abs_difference_before_after"] < 1e-4 and caching["max_abs_difference_before_fused"] < 1e-4
    assert all(v > 0 for v in caching["seconds_per_sample"].values())

    # attribution: the sketch at 4,096 tracks the uncompressed scores (OPORP: sd ~ 1/sqrt(v)); a smaller
    # sketch tracks them less well; every precision is a fraction
    methods = runs["attribution"]["methods"]
    assert methods["sketch_4096"]["correlation_mean"] > 0.95
    assert methods["sketch_256"]["correlation_mean"] < methods["sketch_4096"]["correlation_mean"]
    assert {"exact", "unnormalised", "dense_1024", "dtrak", "pixel_nn"} <= set(methods)
    for entry in methods.values():
        assert all(0.0 <= entry[f"precision_at_{k}"] <= 1.0 for k in (5, 10, 50))

    # duplicates: the reproduction rule is applied (at smoke size nothing need be memorised)
    dup = runs["duplicates"]
    assert dup["n_train"] == dup["n_distinct"] + dup["copies"] - 1 and 0 <= dup["reproduced"] <= dup["count"]

    # index: HNSW finds the exact top 10 at these sizes, one row per n
    rows = runs["index"]["rows"]
    assert [r["n"] for r in rows] == [500, 1000, 2000] and all(r["recall_at_10"] > 0.9 for r in rows)
    assert all(r["p95_ms"] >= r["p50_ms"] > 0 for r in rows)

    # cleansing: the example's loop ran; the oracle removed exactly the planted images; every rate a fraction
    cleansing = runs["cleansing"]
    rows, planted = cleansing["rows"], cleansing["n_planted"]
    assert planted >= 1 and rows["oracle"]["n_removed"] == planted and rows["random"]["n_removed"] == planted
    assert {"baseline", "random", "oracle", "dmin", "dtrak", "pixel_nn"} == set(rows)
    assert all(0.0 <= row["watermark_rate"] <= 1.0 for row in rows.values())
    assert all(0 <= rows[name]["n_corrupted_removed"] <= min(planted, rows[name]["n_removed"])
               for name in ("dmin", "dtrak", "pixel_nn"))

    # compact: raw S x D float32 against S x v of the dtype; at v = 256 in float16 the example's UNet
    # (D = 164,689: 8x8 MNIST, 10 classes and the null label) stores >= 1,000x less; the shards on disk
    # hold what the ratio counts (plus ids and a header), the default's every cached size
    default, small = runs["compact"]["rows"]
    assert (default["v"], default["dtype"], small["v"], small["dtype"]) == (4096, "float32", 256, "float16")
    for row in (default, small):
        itemsize = 2 if row["dtype"] == "float16" else 4
        assert row["ratio"] == 4 * row["D"] / (itemsize * row["v"])
        assert row["stored_bytes"] == row["S"] * row["v"] * itemsize
        assert 0.0 <= row["precision_at_5"] <= 1.0 and 0.0 <= row["precision_at_10"] <= 1.0
    assert small["ratio"] >= 1000 and small["D"] == default["D"] == 164689
    assert small["stored_bytes"] <= small["shard_bytes_per_sample"] < small["stored_bytes"] + 128
    assert default["shard_bytes_per_sample"] >= default["S"] * 4 * (256 + 1024 + 4096)

    text = docs.read_text()
    assert "### Watermark cleansing" in text and "### Storage at the compact setting" in text
    assert "keep me" in text and "<!-- diffusion:start -->" in text and "Diffusion attribution (DMin)" in text
    assert (tmp_path / "img" / "diffusion.png").stat().st_size > 1000
    # the docs re-render from the saved results alone
    again = subprocess.run([sys.executable, str(SCRIPT), "--render-only", "--out", str(out), "--docs", str(docs)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]

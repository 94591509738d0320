"""The diffusion-cache flow (flows/diffusion_cache.py): the DMin signature shards computed as Prefect
tasks on a task runner are the same bytes as a sequential fill, and a rerun after losing shards
recomputes exactly the lost ones; also on a process pool, Dask and Ray (when installed). Slow: a Prefect API, staging and training a tiny UNet (about 3 min
on the loaded 2-core machine; the dask case 2-3 min more)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TINY = ["family=diffusion", "data.source=sklearn:digits", "data.n_train=48", "data.n_val=32", "data.n_test=16",
        "model.widths=[8,16]", "model.epochs=1", "model.batch_size=16", "corruption.kind=none",
        "generation.per_class=1", "generation.steps=4", "scorers.dmin.timesteps=2", "scorers.dmin.sizes=[16,64]",
        "scorers.dmin.size=64", "scorers.dmin.shard_size=16", "scorers.dmin.batch_size=8", "tracking.enabled=false",
        "estimators=[dmin]"]
N_SHARDS = 3  # 48 training images, 16 per shard

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread, as in a Dask worker (its nanny sets OMP_NUM_THREADS=1): torch's float
    reductions, and so the signatures' last bits, depend on the thread count, not on the runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shards(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    from cleanse.storage import read_tensors

    return {path.name: read_tensors(path) for path in sorted(root.glob("shard_*.safetensors"))}


def _mtimes(root: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in root.glob("shard_*")}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """Stage and train in-process, then fill the cache in order (no flow): the reference."""
    from cleanse import pipeline
    from cleanse.config import load_params
    from cleanse.families.diffusion.caching import fill_cache
    from cleanse.storage import Layout

    params = load_params(None, TINY)
    layout = Layout.at(tmp_path_factory.mktemp("sequential"))
    pipeline.run_stage(params, layout)
    pipeline.run_train(params, layout)
    cache = fill_cache(pipeline.scoring_context(params, layout), params.scorers.of("dmin"))
    return layout.root, cache.root.relative_to(layout.root)


@pytest.fixture(scope="module")
def threaded(prefect_api, sequential, tmp_path_factory):
    """The flow on a two-thread runner, on a copy of the reference's staged data and base model
    (fresh, so the flow skips stage and train and computes every shard as a task)."""
    from flows.diffusion_cache import diffusion_cache_flow
    from flows.memorization import task_runner

    out = tmp_path_factory.mktemp("threaded")
    for folder in ("data", "models"):
        shutil.copytree(sequential[0] / folder, out / folder)
    flow = diffusion_cache_flow.with_options(task_runner=task_runner("thread", workers=2))
    summary = flow(None, TINY, str(out))
    return out, summary


def test_a_thread_runner_fill_equals_the_sequential_fill_bit_for_bit(sequential, threaded):
    root, cache = sequential
    out, summary = threaded
    assert sorted(summary["computed"]) == list(range(N_SHARDS))
    assert summary["cache"] == str(out / cache)  # the same key: same model, data and options
    expected, got = _shards(root / cache), _shards(out / cache)
    assert list(got) == list(expected) and len(got) == N_SHARDS
    for name, tensors in expected.items():
        assert sorted(got[name]) == ["sample_id", "v16", "v64"]
        for key, tensor in tensors.items():
            assert torch.equal(got[name][key], tensor), (name, key)
    assert (out / cache / "manifest.meta.json").is_file()


def test_a_rerun_recomputes_only_the_lost_shards(sequential, threaded):
    from flows.diffusion_cache import diffusion_cache_flow
    from flows.memorization import task_runner

    root, cache = sequential
    out, _ = threaded
    folder = out / cache
    (folder / "shard_00001.meta.json").unlink()  # killed between a shard and its record
    (folder / "shard_00002.safetensors").write_bytes(b"truncated")  # killed mid-write, record kept
    before = _mtimes(folder)
    flow = diffusion_cache_flow.with_options(task_runner=task_runner("thread", workers=2))
    summary = flow(None, TINY, str(out))
    assert sorted(summary["computed"]) == [1, 2]
    assert [r["shard"] for r in summary["shards"]] == [1, 2]
    after = _mtimes(folder)
    assert {name: after[name] for name in ("shard_00000.safetensors", "shard_00000.meta.json")} == {
        name: before[name] for name in ("shard_00000.safetensors", "shard_00000.meta.json")}
    expected = _shards(root / cache)
    for name, tensors in _shards(folder).items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, expected[name][key]), (name, key)
    # Nothing missing: a third run computes nothing and scores from the cache.
    again = flow(None, TINY, str(out), score=True)
    assert again["computed"] == [] and again["shards"] == []
    assert Path(again["scores"]).is_file()


@pytest.mark.timeout(1200)  # each worker imports torch and diffusers and rebuilds the context
@pytest.mark.parametrize("runner", ["process", "ray"])
def test_a_process_pool_or_ray_fill_equals_the_sequential_fill(prefect_api, sequential, tmp_path, monkeypatch, runner):
    """Two worker processes of Prefect's process pool (or a local two-CPU Ray, when its extra is
    installed) compute the shards, one torch thread each (OMP_NUM_THREADS, inherited): the same bytes
    as the sequential fill."""
    if runner == "ray":
        pytest.importorskip("prefect_ray")
    import prefect.settings

    from flows.diffusion_cache import diffusion_cache_flow
    from flows.memorization import task_runner

    monkeypatch.setenv("PREFECT_API_URL", prefect.settings.PREFECT_API_URL.value())  # for the workers
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root, cache = sequential
    out = tmp_path / runner
    for folder in ("data", "models"):
        shutil.copytree(root / folder, out / folder)
    summary = diffusion_cache_flow.with_options(task_runner=task_runner(runner, workers=2))(None, TINY, str(out))
    assert sorted(summary["computed"]) == list(range(N_SHARDS))
    expected, got = _shards(root / cache), _shards(out / cache)
    assert list(got) == list(expected)
    for name, tensors in expected.items():
        for key, tensor in tensors.items():
            assert torch.equal(got[name][key], tensor), (name, key)


@pytest.mark.timeout(600)
def test_a_dask_cluster_fill_equals_the_sequential_fill(prefect_api, sequential, tmp_path, monkeypatch):
    """Two LocalCluster worker processes (one thread each) compute the shards: the same bytes."""
    pytest.importorskip("prefect_dask")
    import prefect.settings

    from flows.diffusion_cache import diffusion_cache_flow
    from flows.memorization import task_runner

    monkeypatch.setenv("PREFECT_API_URL", prefect.settings.PREFECT_API_URL.value())  # for the workers
    root, cache = sequential
    out = tmp_path / "dask"
    for folder in ("data", "models"):
        shutil.copytree(root / folder, out / folder)
    summary = diffusion_cache_flow.with_options(task_runner=task_runner("dask", workers=2))(None, TINY, str(out))
    assert sorted(summary["computed"]) == list(range(N_SHARDS))
    expected = _shards(root / cache)
    got = _shards(out / cache)
    assert list(got) == list(expected)
    for name, tensors in expected.items():
        for key, tensor in tensors.items():
            assert torch.equal(got[name][key], tensor), (name, key)


@pytest.mark.timeout(900)
def test_an_s3_output_root_gets_every_shard_and_resumes_on_another_machine(prefect_api, sequential, s3_env,
                                                                           tmp_path, monkeypatch):
    """--out s3://: the flow stages, trains and fills through the bucket (the same bytes); on an empty
    work folder (another machine), with one shard's record lost in the bucket, a rerun pulls the
    rest and computes only that shard."""
    import uuid

    from cleanse import remote
    from flows.diffusion_cache import diffusion_cache_flow
    from flows.memorization import task_runner

    root, cache = sequential
    uri = f"s3://cleanse/diffusion-cache-{uuid.uuid4().hex[:8]}"
    flow = diffusion_cache_flow.with_options(task_runner=task_runner("thread", workers=2))
    summary = flow(None, TINY, uri)
    assert sorted(summary["computed"]) == list(range(N_SHARDS))
    assert summary["cache"] == f"{uri}/{cache.as_posix()}"
    objects = remote.list_objects(uri)
    for shard in range(N_SHARDS):
        for suffix in ("safetensors", "meta.json"):
            assert f"{cache.as_posix()}/shard_{shard:05d}.{suffix}" in objects
    assert f"{cache.as_posix()}/manifest.meta.json" in objects

    bucket, prefix = remote.split_uri(uri)
    remote.client().delete_object(Bucket=bucket, Key=f"{prefix}/{cache.as_posix()}/shard_00001.meta.json")
    monkeypatch.setenv("CLEANSE_WORK_DIR", str(tmp_path / "another-machine"))
    again = flow(None, TINY, uri)
    assert again["computed"] == [1]
    work = remote.work_folder(uri)
    assert work.is_relative_to(tmp_path / "another-machine")
    expected, got = _shards(root / cache), _shards(work / cache)
    assert list(got) == list(expected)
    for name, tensors in expected.items():
        for key, tensor in tensors.items():
            assert torch.equal(got[name][key], tensor), (name, key)

"""Random projections of per-sample gradients: inner products preserved in expectation, seeded,
streamed to a memmap that resumes after a kill and refuses another configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleanse.errors import ArtifactError
from cleanse.projection import ProjectedGradientStore, project_to_store, projection_matrix


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_preserves_inner_products(kind):
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(20, 3000, generator=generator)
    projection = projection_matrix(3000, 4096, kind=kind, seed=3, block_rows=700)
    exact = grads @ grads.T
    projected = (grads @ projection) @ (grads @ projection).T
    relative = (projected - exact).abs().max() / exact.diagonal().mean()
    assert relative < 0.1
    assert torch.equal(projection, projection_matrix(3000, 4096, kind=kind, seed=3, block_rows=700))
    assert not torch.equal(projection, projection_matrix(3000, 4096, kind=kind, seed=4, block_rows=700))


def test_store_resumes_after_a_kill_and_refuses_a_mismatch(tmp_path):
    grads = torch.randn(103, 50, generator=torch.Generator().manual_seed(1))
    projection = projection_matrix(50, 8, seed=0)
    calls: list[tuple[int, int]] = []

    def rows(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed mid-run
        return grads[start:stop]

    store = ProjectedGradientStore(tmp_path / "proj", n=103, k=8, chunk_size=20, fingerprint="abc")
    with pytest.raises(KeyboardInterrupt):
        project_to_store(rows, projection, store)
    assert not store.is_complete()
    calls.clear()
    features = project_to_store(lambda a, b: grads[a:b], projection, store)
    assert store.is_complete()
    assert np.allclose(np.load(store.features_path, mmap_mode="r"), (grads @ projection).numpy(), atol=1e-5)
    assert np.allclose(features, (grads @ projection).numpy(), atol=1e-5)
    calls.clear()
    project_to_store(rows, projection, store)
    assert calls == []  # nothing left to do
    with pytest.raises(ArtifactError, match="another configuration"):
        ProjectedGradientStore(tmp_path / "proj", n=103, k=8, chunk_size=20, fingerprint="xyz").open()


def test_projected_self_scores_match_the_dense_formula():
    from cleanse.projection import projected_self_scores

    features = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    dense = features.astype(np.float64)
    gram = dense.T @ dense
    ridge = 1e-2 * np.trace(gram) / 16
    expected = np.einsum("ik,kl,il->i", dense, np.linalg.inv(gram + ridge * np.eye(16)), dense)
    assert np.allclose(projected_self_scores(features, damping=1e-2, chunk_size=77), expected, rtol=1e-8)


def test_positional_row_io_round_trips_through_the_npy_file(tmp_path):
    from cleanse.projection import row_blocks, write_rows

    rng = np.random.default_rng(3)
    expected = rng.standard_normal((53, 6)).astype(np.float32)
    path = tmp_path / "rows.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=expected.shape).flush()
    write_rows(path, 0, expected[:20])
    write_rows(path, 20, expected[20:])
    mapped = np.load(path, mmap_mode="r")
    blocks = list(row_blocks(mapped, 7))
    assert [start for start, _ in blocks] == list(range(0, 53, 7))
    assert np.array_equal(np.concatenate([block for _, block in blocks]), expected)
    # A slice of the memmap (not the whole file) falls back to plain slicing and still agrees.
    assert np.array_equal(np.concatenate([b for _, b in row_blocks(mapped[5:30], 4)]), expected[5:30])
    with pytest.raises(ValueError, match="do not fit"):
        write_rows(path, 50, expected[:10])

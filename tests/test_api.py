"""``cleanse.api`` in memory gives what the pipeline's stages write for the same configuration."""

from __future__ import annotations

import numpy as np
import polars as pl

from cleanse import api, pipeline
from cleanse.storage import Layout
from tests.conftest import small_params


def test_prepare_and_score_equal_the_pipeline_stages(tmp_path):
    params = small_params("estimators=[loss,influence]", "model.epochs=10")
    layout = Layout.at(tmp_path)
    pipeline.run_stage(params, layout)
    pipeline.run_train(params, layout)
    prepared = api.prepare(params)
    assert prepared.staged.train.sample_id.tolist() == pipeline.load_staged(layout, params).train.sample_id.tolist()
    for name in ("loss", "influence"):
        pipeline.run_score(params, layout, name)
        on_disk = pl.read_parquet(layout.scores(name))
        in_memory = api.score(prepared, name)
        assert in_memory["sample_id"].to_list() == on_disk["sample_id"].to_list()
        np.testing.assert_array_equal(in_memory["score"].to_numpy(), on_disk["score"].to_numpy())
    # The scores find the flipped labels (a check that can fail), and the evaluation matches the base model's.
    loss = api.score(prepared, "loss")["score"].to_numpy()
    corrupted = prepared.staged.train.is_corrupted
    assert loss[corrupted].mean() > loss[~corrupted].mean()
    base = pipeline.load_model(layout.base_model)
    assert api.evaluate(prepared)["test_accuracy"] == api.evaluate(prepared, base)["test_accuracy"]


def test_stage_seed_fixes_the_split_while_the_model_seed_varies():
    first = api.prepare(small_params("seed=1", "model.epochs=3"), stage_seed=0)
    second = api.prepare(small_params("seed=2", "model.epochs=3"), stage_seed=0)
    assert first.staged.train.sample_id.tolist() == second.staged.train.sample_id.tolist()
    assert np.array_equal(first.staged.train.is_corrupted, second.staged.train.is_corrupted)
    assert first.context.seed == 1 and second.context.seed == 2
    weights = [next(iter(p.model.state.values())) for p in (first, second)]
    assert not np.allclose(weights[0].numpy(), weights[1].numpy())

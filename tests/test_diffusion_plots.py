"""The diffusion family's report figures (cleanse.families.diffusion.plots) on synthetic inputs
whose answers are known: precision@k of a planted retrieval table, its chance level, the joins of
the per-query and flagged tables with the training rows, and the storage/latency table."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from cleanse.data.dataset import Split
from cleanse.families.diffusion import plots
from cleanse.storage import Layout, write_json, write_table, write_tensors


def _train(n: int = 12) -> Split:
    rng = np.random.default_rng(0)
    label = np.arange(n, dtype=np.int64) % 3
    corrupted = np.zeros(n, dtype=bool)
    corrupted[[2, 7]] = True
    return Split(sample_id=np.arange(100, 100 + n, dtype=np.int64),
                 features=rng.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32), label=label, label_clean=label,
                 is_corrupted=corrupted, source=label.copy())


def _queries(train: Split) -> pl.DataFrame:
    """Query 0 (source 0) retrieves sources 0, 0, 1, 0; query 1 (source 2): 2, 1, 1, 2; query 2
    (source -1, unknown) anything."""
    assert train.source is not None
    by_source = {s: train.sample_id[train.source == s].tolist() for s in range(3)}
    picks = {0: [by_source[0][0], by_source[0][1], by_source[1][0], by_source[0][2]],
             1: [by_source[2][0], by_source[1][1], by_source[1][2], by_source[2][1]],
             2: [by_source[1][3], by_source[0][3], by_source[2][2], by_source[2][3]]}
    query_source = {0: 0, 1: 2, 2: -1}
    source = dict(zip(train.sample_id.tolist(), train.source.tolist()))
    rows = [{"query_id": q, "rank": r + 1, "sample_id": sid, "score": 1.0 - 0.1 * r,
             "query_source": query_source[q], "sample_source": source[sid]}
            for q, ids in picks.items() for r, sid in enumerate(ids)]
    return pl.DataFrame(rows)


def test_precision_curve_and_chance_of_a_planted_table():
    train = _train()
    table = _queries(train)
    ks, precision = plots.precision_curve(table.sample(fraction=1.0, shuffle=True, seed=3))  # order-free
    assert ks.tolist() == [1, 2, 3, 4]
    # query 0 hits 1,1,0,1; query 1 hits 1,0,0,1; the unknown-source query never counts.
    expected = [(1 + 1) / 2, (2 / 2 + 1 / 2) / 2, (2 / 3 + 1 / 3) / 2, (3 / 4 + 2 / 4) / 2]
    np.testing.assert_allclose(precision, expected)
    # Each source is a third of the training set.
    assert plots.chance(table, train.label) == pytest.approx(1 / 3)


def test_missing_results_count_as_misses():
    train = _train()
    table = _queries(train).filter(~((pl.col("query_id") == 1) & (pl.col("rank") > 2)))
    _, precision = plots.precision_curve(table)
    np.testing.assert_allclose(precision, [1.0, 0.75, (2 / 3 + 1 / 3) / 2, (3 / 4 + 1 / 4) / 2])
    # Only queries of unknown source: no curve.
    assert plots.precision_curve(table.filter(pl.col("query_id") == 2))[0].size == 0


@pytest.fixture
def layout(tmp_path):
    return Layout.at(tmp_path / "run")


def test_query_grid_and_table_join_the_training_rows(layout):
    train = _train()
    table = _queries(train)
    write_table(table, layout.root / "scores" / "dmin" / "queries.parquet")
    images = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32))
    write_tensors({"images": images}, layout.root / "scores" / "dmin" / "queries.safetensors")
    assert plots.write_queries("dmin", layout, train, None) == ["probes/dmin.png"]
    written = pl.read_csv(layout.reports / "probes" / "dmin.csv")
    assert written.height == 12
    position = {sid: i for i, sid in enumerate(train.sample_id.tolist())}
    for row in written.iter_rows(named=True):
        assert row["label"] == train.label[position[row["sample_id"]]]
        assert row["is_corrupted"] == bool(train.is_corrupted[position[row["sample_id"]]])
    png = (layout.reports / "probes" / "dmin.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # No per-query table (an estimator without retrieval): nothing written for it.
    assert plots.write_queries("other", layout, train, None) == []
    assert not (layout.reports / "probes" / "other.csv").exists()


def test_query_grid_needs_the_query_images(layout):
    train = _train()
    write_table(_queries(train), layout.root / "scores" / "pixel_nn" / "queries.parquet")
    assert plots.write_queries("pixel_nn", layout, train, ("a", "b", "c")) == []
    assert (layout.reports / "probes" / "pixel_nn.csv").is_file()  # the table is still there


def test_flagged_table_is_in_rank_order_with_ground_truth(layout):
    train = _train()
    order = [7, 0, 2, 5, 1, 3, 4, 6, 8, 9, 10, 11]  # positions, most harmful first
    flags = pl.DataFrame({"sample_id": train.sample_id[order[::-1]], "score": np.arange(12, dtype=np.float64),
                          "rank": np.arange(12, 0, -1), "is_flagged": [False] * 10 + [True] * 2})
    write_table(flags, layout.flags("dmin"))
    assert plots.write_flagged("dmin", layout, train, ("digits",)) == ["flagged/dmin.png"]
    written = pl.read_csv(layout.reports / "flagged" / "dmin.csv")
    assert written["sample_id"].to_list() == train.sample_id[order].tolist()
    assert written["is_corrupted"].to_list()[:3] == [True, False, True]
    assert written["source"].to_list()[:2] == ["1", "digits"]  # an id past the names is shown as is


def test_precision_figure_and_cost_table(layout):
    train = _train()
    write_table(_queries(train), layout.root / "scores" / "dmin" / "queries.parquet")
    metrics = {"estimators": {"dmin": {"retrieval": {"precision_at_5": 0.5, "precision_at_10": 0.4, "k": 10}},
                              "pixel_nn": {}}}
    assert plots.write_precision(metrics, layout, train) == ["retrieval/precision_at_k.png"]
    write_json({"seconds": 12.5, "train_vectors_seconds": 10.25, "vector_dim": 2 * 64, "bytes_per_sample": 2 * 80 * 4,
                "options": {"timesteps": 2, "sizes": [16, 64], "parameters": "all"}}, layout.scores_meta("dmin"))
    write_tensors({"images": torch.zeros(3, 1, 8, 8)}, layout.root / "scores" / "dmin" / "queries.safetensors",
                  {"kind": "generated", "seconds_per_query": "0.00125"})
    write_json({"seconds": 1.0, "vector_dim": 64, "options": {"k": 10}}, layout.scores_meta("pixel_nn"))
    rows = {row["estimator"]: row for row in plots.cost_rows(metrics, layout, {"dmin": 177_489})}
    assert rows["dmin"]["raw gradients MB/image"] == "1.42"  # 2 * 177,489 * 4 bytes
    assert rows["dmin"]["compression"] == "2,773.3x"  # (S * D) / (S * v) = 177,489 / 64
    assert rows["dmin"]["cache KB/image"] == "0.6" and rows["dmin"]["signatures s"] == "10.2"
    assert rows["dmin"]["vector dim"] == "128" and rows["dmin"]["query ms"] == "1.25"
    assert rows["pixel_nn"]["vector dim"] == "64" and rows["pixel_nn"]["compression"] == "n/a"
    assert rows["pixel_nn"]["query ms"] == "n/a" and rows["pixel_nn"]["cache KB/image"] == "n/a"
    assert plots.write_cost(metrics, layout) == ["retrieval/cost.png"]
    markdown = (layout.reports / "retrieval" / "cost.md").read_text()
    assert markdown.count("\n") == 4 and "n/a" in markdown


def test_no_query_tables_no_precision_figure(layout):
    assert plots.write_precision({"estimators": {"dmin": {}}}, layout, _train()) == []


def test_gradient_dims_count_the_differentiated_parameters():
    from types import SimpleNamespace

    network = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(1, 4, 3), "lora_A": torch.nn.Linear(4, 2, bias=False),
                                   "lora_B": torch.nn.Linear(2, 4, bias=False), "frozen": torch.nn.Linear(3, 3)})
    network["frozen"].requires_grad_(False)  # not differentiated: not in D
    fitted = SimpleNamespace(model=network)
    records = {"dmin": {"options": {"parameters": "all"}}, "dtrak": {"options": {"parameters": "adapters"}},
               "pixel_nn": {"options": {"k": 10}}}
    assert plots.gradient_dims(fitted, records) == {"dmin": 4 * 9 + 4 + 8 + 8, "dtrak": 8 + 8}

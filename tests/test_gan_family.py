"""The GAN family through the pipeline (``family: gan``): a tiny end-to-end run of the CLI's
``run_all`` on the 2-D Gaussian with 5% planted far-cluster outliers, the ``reports/metrics.json``
shape the hold-out case reads, the detection quality against the planted truth, the saved model and
its traced window, one-line refusals of bad input, and resuming a finished run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cleanse import families
from cleanse.config import validate_params
from cleanse.errors import ConfigError
from cleanse.storage import Layout

# 300 points (15 of them a far cluster), the paper's FC GAN with Adam for 60 short epochs: about
# 2 s of training; every removal is replayed (the traced last epoch), not retrained from scratch
# (tested apart: test_retraining_from_scratch_without_nothing_is_the_base_model).
TINY = {"family": "gan", "seed": 0, "data": {"n_train": 300, "n_val": 150, "n_test": 200},
        "corruption": {"kind": "outliers", "fraction": 0.05, "mode": "far_cluster"},
        "model": {"epochs": 60, "batch_size": 50, "optimizer": "adam", "lr_d": 2e-3, "lr_g": 2e-3},
        "metrics": {"n_latents": 300}, "detect": {"budget": "fraction", "fraction": 0.05},
        "recommend": {"budget_factors": []},
        "evaluate": {"scratch": False, "replay": True, "replay_instances": 20}, "tracking": {"enabled": False}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from cleanse.stages.runner import run_all

    params = validate_params(TINY)
    layout = Layout.at(tmp_path_factory.mktemp("gan_run"))
    lines: list[str] = []
    metrics = run_all(params, layout, log=lines.append)
    return params, layout, metrics, lines


def _finite_numbers(block: dict) -> list[float]:
    return [value for value in block.values() if isinstance(value, float)]


def test_metrics_json_has_the_hold_out_shape_and_finite_values(finished):
    _, layout, metrics, _ = finished
    on_disk = json.loads((layout.reports / "metrics.json").read_text())
    assert on_disk["dataset"]["n_corrupted"] == 15 and on_disk["dataset"]["n_train"] == 300
    for reference in ("baseline", "random", "oracle"):
        assert math.isfinite(on_disk[reference]["test_all"]), reference
    assert on_disk["oracle"]["n_removed"] == 15
    for name in ("gan_influence", "isolation_forest"):
        entry = on_disk["estimators"][name]
        assert 0 <= entry["detection"]["average_precision"] <= 1
        retrain = entry["retrain"]
        assert {"test_all", "random_test_all", "n_removed"} <= set(retrain), name
        assert all(math.isfinite(value) for value in _finite_numbers(retrain)), retrain
        assert retrain["n_removed"] == 15  # detect.fraction 0.05 of 300
    agreement = on_disk["estimators"]["gan_influence"]["replay_agreement"]
    assert -1 <= agreement["kendall_tau"] <= 1 and 0 <= agreement["jaccard_top10"] <= 1
    assert agreement["n_instances"] == 20
    assert "replay_agreement" not in on_disk["estimators"]["isolation_forest"]
    assert on_disk == json.loads(json.dumps(metrics))


def test_gan_influence_finds_the_planted_far_cluster_better_than_chance(finished):
    _, _, metrics, _ = finished
    chance = 15 / 300
    assert metrics["estimators"]["gan_influence"]["detection"]["average_precision"] > 3 * chance


def test_the_replayed_removal_of_the_planted_outliers_is_measured_against_the_traced_window(finished):
    """The oracle's primary outcome is the traced window replayed without the 15 outliers: it
    equals a replay done here, and the base model reloads to the recorded baseline."""
    params, layout, metrics, _ = finished
    from cleanse.families.gan.training import replay
    from cleanse.pipeline import load_staged

    task = families.get("gan")
    staged = load_staged(layout, params)
    base = task.load_model(layout.base_model)
    assert task.outcome(base, staged)["test_all"] == metrics["baseline"]["test_all"]
    trained = base.trained
    data = torch.as_tensor(staged.train.features, dtype=torch.float64)
    g_state, d_state = replay(trained.spec, trained.recipe, trained.trace, data,
                              torch.as_tensor(~staged.train.is_corrupted, dtype=torch.float64))
    metric = base.metric("all", staged.test.features, staged.train.features)
    assert metric.evaluate(g_state, d_state, trained.spec) == pytest.approx(metrics["oracle"]["test_all"], abs=1e-12)


def test_report_files_include_the_scatter_and_the_before_after_samples(finished):
    _, layout, _, _ = finished
    for name in ("gan_influence", "isolation_forest"):
        for path in (f"flagged/{name}.png", f"flagged/{name}.csv", f"samples/{name}.png"):
            assert (layout.reports / path).is_file(), path
    html = (layout.reports / "report.html").read_text()
    assert "samples/gan_influence.png" in html and "Recommended" in html


def test_a_finished_run_resumes_by_skipping_every_stage(finished):
    from cleanse.stages.runner import run_all

    params, layout, metrics, first = finished
    assert not [line for line in first if line.startswith("[skip]")]
    lines: list[str] = []
    again = run_all(params, layout, log=lines.append)
    assert lines and all(line.startswith("[skip]") for line in lines), lines
    assert again["estimators"]["gan_influence"]["detection"] == metrics["estimators"]["gan_influence"]["detection"]


def test_retraining_from_scratch_without_nothing_is_the_base_model():
    """``verify_without`` with nothing removed: the replay and the retrain from scratch (same seed,
    batches and latents, an all-ones mask) both reproduce the base GAN's outcome exactly; removing
    the planted outliers changes both."""
    params = validate_params({**TINY, "data": {"n_train": 120, "n_val": 60, "n_test": 60},
                              "model": {**TINY["model"], "epochs": 10}, "evaluate": {"scratch": True}})
    task = families.get("gan")
    staged = task.stage(params)
    base = task.fit(params, staged.train, staged.meta)
    reference = task.outcome(base, staged)
    _, nothing = task.verify_without(params, staged, np.zeros(0, dtype=np.int64), base=base)
    assert nothing["test_all"] == nothing["test_all_scratch"] == reference["test_all"]
    assert nothing["n_removed"] == 0
    _, outliers = task.verify_without(params, staged, staged.train.sample_id[staged.train.is_corrupted], base=base)
    assert outliers["n_removed"] == outliers["n_corrupted_removed"] == 6
    assert outliers["test_all"] != reference["test_all"] and outliers["test_all_scratch"] != reference["test_all"]


@pytest.mark.parametrize("overrides,message", [
    ({"estimators": ["influence"]}, "estimator 'influence' does not support family 'gan'"),
    ({"estimators": ["gan_influence"], "family": "classification"}, "estimator 'gan_influence' does not support "
                                                                    "family 'classification'"),
    ({"data": {"source": "sklearn:digits"}, "metrics": {"names": ["all"]}}, "metrics.names: all do not fit image"),
    ({"corruption": {"mode": "noise"}}, "corruption.mode: 'noise' does not fit 2-D data"),
    ({"model": {"arch": "conv"}}, "model.arch: 'conv' needs image data"),
    ({"query": {"kind": "val_errors"}}, "family 'gan' allows 'none'"),
    ({"model": {"optimizer": "lbfgs"}}, "model.optimizer: 'lbfgs' is not one of"),
    ({"evaluate": {"lds": True}}, "evaluate.lds: needs a supervised model"),
])
def test_bad_input_is_refused_in_one_line(overrides, message):
    raw = {"family": "gan", **overrides}
    with pytest.raises(ConfigError) as error:
        validate_params(raw)
    text = str(error.value)
    assert message in text and "\n" not in text, text


def test_the_cli_refuses_a_wrong_pairing_before_anything_runs(tmp_path):
    from typer.testing import CliRunner

    from cleanse.cli import app

    params = tmp_path / "params.yaml"
    params.write_text("family: gan\nestimators: [tracin]\n")
    result = CliRunner().invoke(app, ["run", "--params", str(params), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "estimator 'tracin' does not support family 'gan'" in result.output
    assert not (tmp_path / "out" / "data").exists()


def test_gan_influence_refuses_a_metric_that_does_not_fit_the_data():
    from cleanse.estimators.gan_influence import metric_name
    from cleanse.estimators.gan_influence_options import GanInfluenceOptions
    from cleanse.families.gan.family import GanContext

    class _Meta:
        is_image = False

    context = GanContext(train=None, val=None, meta=_Meta(), model=None, params=None, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="scorers.gan_influence.metric: 'fid' does not fit 2-D data"):
        metric_name(context, GanInfluenceOptions(metric="fid"))


@pytest.mark.slow
def test_digits_with_noise_images_reports_fid_and_is(tmp_path):
    """Images: a conv GAN on sklearn digits with 5% noise images; the feature classifier is stored
    beside the GAN and the report carries test_fid and test_is (about a minute)."""
    from cleanse.stages.runner import run_all

    params = validate_params({
        "family": "gan", "data": {"source": "sklearn:digits", "n_train": 500, "n_val": 200, "n_test": 300},
        "corruption": {"mode": "noise"}, "model": {"arch": "conv", "z_dim": 16, "hidden_g": [32, 16],
                                                   "hidden_d": [16, 32], "epochs": 8, "batch_size": 50,
                                                   "optimizer": "adam", "lr_d": 2e-3, "lr_g": 2e-3},
        "metrics": {"n_latents": 300}, "detect": {"budget": "fraction", "fraction": 0.05},
        "recommend": {"budget_factors": []}, "tracking": {"enabled": False}})
    layout = Layout.at(tmp_path)
    metrics = run_all(params, layout, log=lambda line: None)
    assert (layout.base_model / "features" / "feature_net.safetensors").is_file()
    record = json.loads((layout.base_model / "meta.json").read_text())["feature_net"]
    assert record["digest"].startswith("sha256:") and record["file"] == "features/feature_net.safetensors"
    net = families.get("gan").load_model(layout.base_model).feature_net
    assert net is not None
    from dataclasses import replace as replaced

    from cleanse.errors import ArtifactError

    replaced(net, state={k: torch.zeros_like(v) for k, v in net.state.items()}).save(
        layout.base_model / "features" / "feature_net.safetensors")
    with pytest.raises(ArtifactError, match="not the one this GAN was evaluated with"):
        families.get("gan").load_model(layout.base_model)
    for name in ("gan_influence", "isolation_forest"):
        retrain = metrics["estimators"][name]["retrain"]
        assert np.isfinite([retrain["test_fid"], retrain["test_is"], retrain["test_fid_scratch"]]).all()
    assert metrics["baseline"]["test_fid"] > 0 and metrics["baseline"]["test_is"] >= 1
    assert metrics["estimators"]["gan_influence"]["retrain"]["n_removed"] == 25


def _tiny_yaml() -> dict:
    return {**TINY, "evaluate": {"scratch": False}, "model": {**TINY["model"], "epochs": 20}}


@pytest.mark.slow
@pytest.mark.integration
def test_gan_runs_through_dvc_repro(tmp_path):
    """The checked-in dvc.yaml runs a GAN params.yaml unchanged (no family branch): every stage
    runs once, the metrics carry test_all, and a second repro runs nothing."""
    import shutil

    import yaml

    from tests.test_dvc import REPO, VENV_BIN, Project, _env

    if not (VENV_BIN / "dvc").exists() or shutil.which("git") is None:
        pytest.skip("dvc and git are needed")
    root = tmp_path / "project"
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    project = Project(root, _env(tmp_path / "pycache"))
    # every key written out, as DVC reads the estimator fan-out and each stage's params from the file
    full = validate_params(_tiny_yaml()).model_dump(mode="json")
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    for command in (("git", "init", "-q"), ("git", "add", "-A"), ("git", "commit", "-q", "-m", "project")):
        project.run(*command)
    project.dvc("init", "-q")
    ran, output = project.repro()
    assert {"stage", "train", "score@gan_influence", "retrain@isolation_forest", "report"} <= set(ran), output[-3000:]
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert math.isfinite(metrics["estimators"]["gan_influence"]["retrain"]["test_all"])
    again, _ = project.repro()
    assert set(again) <= {"source"}, again


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_gan_runs_through_the_prefect_flow(prefect_api, tmp_path, monkeypatch):
    import yaml

    from flows.cleanse_flow import cleanse_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tmp_path / "gan.yaml"
    params.write_text(yaml.safe_dump({**_tiny_yaml(), "tracking": {"enabled": True}}))
    monkeypatch.chdir(tmp_path)
    state = cleanse_flow(params_file=str(params), out=str(tmp_path / "out"), return_state=True)
    assert state.is_completed(), state.message
    written = json.loads((tmp_path / "out" / "reports" / "metrics.json").read_text())
    assert sorted(written["estimators"]) == ["gan_influence", "isolation_forest"]
    assert (tmp_path / "out" / "mlflow.db").is_file()

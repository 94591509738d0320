"""The stage graph is declared once (src/cleanse/stages/graph.py): dvc.yaml, the CLI's stage
sub-commands, ``cleanse run``'s steps and the Prefect flow's tasks all follow from it."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from cleanse.stages.dvc import dvc_stages, dvc_yaml
from cleanse.stages.graph import BY_NAME, GRAPH, run_stages, steps, upstream

REPO = Path(__file__).resolve().parents[1]


def test_checked_in_dvc_yaml_is_the_generated_one():
    checked_in = (REPO / "dvc.yaml").read_text()
    assert checked_in == dvc_yaml(), "dvc.yaml is stale: regenerate it with `cleanse dvc-yaml > dvc.yaml`"
    assert yaml.safe_load(checked_in) == dvc_stages()


def test_cli_prints_the_generated_file():
    from cleanse.cli import app

    result = CliRunner().invoke(app, ["dvc-yaml"])
    assert result.exit_code == 0, result.output
    assert result.output == dvc_yaml()


def test_every_dvc_dependency_exists_and_every_stage_has_a_command():
    from cleanse.cli import app

    commands = {command.name or command.callback.__name__ for command in app.registered_commands}
    for name, entry in dvc_stages()["stages"].items():
        body = entry.get("do", entry)
        for dep in body.get("deps", []):
            if dep.startswith("src/"):
                assert (REPO / dep).is_file(), f"{name}: {dep} does not exist"
        assert body["cmd"].split()[1] == name and name in commands
    for stage in GRAPH:
        assert callable(stage.function()), stage.name
        if stage.marker is not None:  # the fingerprint lives inside one of the stage's outputs
            assert any(stage.marker == out or stage.marker.startswith(out + "/") for out in stage.outputs)


def test_inputs_come_from_upstream_stages_and_the_order_follows_them():
    # Every artifact a stage reads is written by a stage before it in the graph.
    for index, stage in enumerate(GRAPH):
        before = {other.name for other in GRAPH[:index]}
        assert {other.name for other in upstream(stage)} <= before, stage.name
        for path in stage.inputs:
            assert any(path == out or path.startswith(out + "/") or out.startswith(path + "/")
                       for other in GRAPH[:index] for out in other.outputs), (stage.name, path)
    assert {s.name for s in upstream(BY_NAME["detect"])} == {"score"}
    assert {s.name for s in upstream(BY_NAME["recommend"])} >= {"query", "retrain", "references"}
    assert [stage.label(estimator) for stage, estimator in steps(["loss", "tracin"])] == [
        "stage", "train", "query", "score loss", "detect loss", "retrain loss", "score tracin", "detect tracin",
        "retrain tracin", "references", "recommend", "report"]
    assert "source" not in {stage.name for stage in run_stages()}  # DVC's digest stage only


def test_a_family_declares_extra_train_params_and_the_others_stay_identical():
    from cleanse.config import load_params

    plain = dvc_stages()["stages"]
    # classification (the project's params.yaml) and a graph run without `influence` declare nothing
    assert dvc_yaml(load_params(REPO / "params.yaml")) == dvc_yaml()
    assert dvc_yaml(load_params(REPO / "examples/graph.yaml")) == dvc_yaml()
    # the influence run's train stage lists the section (so `dvc repro` refits when it changes);
    # every other stage is the plain one (they see the change through models/base)
    influence_file = REPO / "examples/graph_influence.yaml"
    extra = dvc_stages(load_params(influence_file))["stages"]
    assert extra["train"]["params"] == [*plain["train"]["params"], "influence"]
    assert {k: v for k, v in extra.items() if k != "train"} == {k: v for k, v in plain.items() if k != "train"}
    assert yaml.safe_load(dvc_yaml(load_params(influence_file))) == {"stages": extra}
    # DVC refuses a listed key its params file lacks: listed only where the file has the section
    assert "influence" in yaml.safe_load(influence_file.read_text())
    assert "influence" not in yaml.safe_load((REPO / "examples/graph.yaml").read_text())


def test_dvc_yaml_params_option_and_its_bad_input(tmp_path):
    from cleanse.cli import app

    influence = CliRunner().invoke(app, ["dvc-yaml", "--params", str(REPO / "examples/graph_influence.yaml")])
    assert influence.exit_code == 0, influence.output
    assert yaml.safe_load(influence.output)["stages"]["train"]["params"][-1] == "influence"
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: graph\ninfluence: {diffusion: XX}\n")
    refused = CliRunner().invoke(app, ["dvc-yaml", "--params", str(bad)])
    assert refused.exit_code != 0 and refused.output.count("\n") <= 2 and "influence" in refused.output


def test_params_yaml_has_every_param_key_that_dvc_yaml_lists():
    """``dvc repro`` refuses a stage whose listed params key is missing from params.yaml (e.g.
    ``scorers.<estimator>`` of a newly listed estimator); checked here without running DVC."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        items = params["estimators"] if "foreach" in stage else [None]
        for item in items:
            for key in body.get("params", []):
                if isinstance(key, dict):
                    continue
                node: object = params
                for part in key.replace("${item}", str(item)).split("."):
                    if not isinstance(node, dict) or part not in node:
                        missing.append(f"{name}: {key.replace('${item}', str(item))}")
                        break
                    node = node[part]
    assert not missing, missing

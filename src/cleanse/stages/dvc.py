"""``dvc.yaml`` generated from the stage graph (:data:`cleanse.stages.graph.GRAPH`): ``cleanse
dvc-yaml > dvc.yaml``. The checked-in file is this function's output (a test compares them), so a
stage is declared in one place.

Every stage calls its ``cleanse`` sub-command with ./params.yaml and ``--out .``; a per-estimator
stage becomes a ``foreach: ${estimators}`` stage (``{e}`` in the graph's paths becomes ``${item}``).
A stage's deps are the artifacts it reads plus the library files whose code shapes its outputs
(explicit files rather than directories, so ``__pycache__`` never invalidates a stage).

A family whose stages read params sections beyond the graph's lists (the graph family's
``influence``, which the train stage measures) declares them through the family seam,
``Family.dvc_params(params) -> {stage name: (key, ...)}`` (none by default); ``dvc_yaml(params)`` appends them to
those stages' ``params``. They come from a params file (``cleanse dvc-yaml --params FILE``) because
DVC refuses a listed key that the project's params.yaml lacks, so only the sections that file has
are listed; without a file, or for a family that declares nothing, the output is the plain graph's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cleanse.errors import ConfigError
from cleanse.stages.graph import GRAPH, SHARED_CODE, Stage

ExtraParams = Mapping[str, tuple[str, ...]]

HEADER = """\
# Generated from the stage graph (src/cleanse/stages/graph.py) by `cleanse dvc-yaml > dvc.yaml`;
# edit the graph, not this file (tests/test_dvc_yaml.py checks that they agree).
#
# The cleanse pipeline as DVC stages. Each stage calls one `cleanse` sub-command (the same code path
# as `cleanse run`, the Prefect flow and the tests) with ./params.yaml and --out . (the defaults).
#
#   source -> stage -> train -> score@E -> detect@E -> retrain@E --\\
#                 |-> references ------------------------+-> recommend -> report
#                 \\-> query -----------------------------/
#
# E ranges over `estimators:` in params.yaml (DVC loads params.yaml as template variables), so
# `dvc exp run -S 'estimators=[loss,tracin]'` changes the fan-out and the report together.
#
# params: each stage lists only the keys it reads, so changing `scorers.tracin.*` reruns
# score@tracin, detect@tracin, retrain@tracin, recommend and report, and nothing else.
# deps: the artifacts a stage reads plus the source files whose code shapes its outputs (explicit
# files rather than directories, so __pycache__ never invalidates a stage).
# outs: every artifact, .meta.json sidecars included (a sidecar's fingerprint is what the next
# `cleanse` stage checks, so it travels with its data).
"""


def _code_files(stage: Stage) -> list[str]:
    """The library files a stage's outputs depend on: the shared ones, its runner's module, its own."""
    if stage.dvc.get("always_changed"):  # it runs on every repro: deps would change nothing
        return []
    module = stage.run.partition(":")[0].removeprefix("cleanse.").replace(".", "/") + ".py"
    return [f"src/cleanse/{name}" for name in dict.fromkeys((*SHARED_CODE, module, *stage.code))]


def family_params(params: Any | None) -> dict[str, tuple[str, ...]]:
    """The extra params keys per stage name that ``params``'s family declares
    (:meth:`cleanse.families.base.Family.dvc_params`; none for ``params=None``)."""
    if params is None:
        return {}
    from cleanse import families

    extra = dict(families.get(params.family).dvc_params(params))
    unknown = sorted(set(extra) - {stage.name for stage in GRAPH})
    if unknown:
        raise ConfigError(f"family {params.family!r} declares dvc params for unknown stages: {', '.join(unknown)}")
    return {name: tuple(keys) for name, keys in extra.items()}


def stage_entry(stage: Stage, extra_params: tuple[str, ...] = ()) -> dict[str, Any]:
    """The stage's dvc.yaml entry (for a per-estimator stage, the body of its ``do:``);
    ``extra_params`` are appended to its ``params`` (a family's declared sections)."""
    item = "${item}"

    def expand(values: tuple[str, ...] | list[str]) -> list[str]:
        return [value.replace("{e}", item) for value in values]

    estimator = f" -e {item}" if stage.per_estimator else ""
    entry: dict[str, Any] = {"cmd": f"cleanse {stage.name}{estimator} --params params.yaml --out ."}
    deps = expand(stage.inputs) + _code_files(stage)
    if deps:
        entry["deps"] = deps
    listed = list(dict.fromkeys((*stage.params, *extra_params)))
    if listed:
        entry["params"] = expand(listed)
    entry.update({key: value for key, value in stage.dvc.items() if key == "always_changed"})
    entry["outs"] = expand(stage.outputs)
    entry.update({key: value for key, value in stage.dvc.items() if key != "always_changed"})
    return entry


def _block(data: dict[str, Any], indent: int) -> list[str]:
    import yaml

    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1000)
    return [" " * indent + line for line in text.splitlines()]


def dvc_yaml(params: Any | None = None) -> str:
    """The whole ``dvc.yaml`` text; with ``params`` (a loaded params file), its family's declared
    extra params keys are listed too (:func:`family_params`)."""
    extra = family_params(params)
    lines = [HEADER.rstrip("\n"), "", "stages:"]
    for stage in GRAPH:
        lines.append(f"  {stage.name}:")
        body_indent = 6 if stage.per_estimator else 4
        lines += [" " * 4 + f"# {line}".rstrip() for line in stage.note.splitlines()]
        if stage.per_estimator:
            lines += ["    foreach: ${estimators}", "    do:"]
        lines += _block(stage_entry(stage, extra.get(stage.name, ())), body_indent)
        lines.append("")
    return "\n".join(lines[:-1]) + "\n"


def dvc_stages(params: Any | None = None) -> dict[str, Any]:
    """``{"stages": ...}`` as ``yaml.safe_load`` reads ``dvc_yaml(params)``."""
    extra = family_params(params)
    stages: dict[str, Any] = {}
    for stage in GRAPH:
        entry = stage_entry(stage, extra.get(stage.name, ()))
        stages[stage.name] = {"foreach": "${estimators}", "do": entry} if stage.per_estimator else entry
    return {"stages": stages}

"""The ``cleanse`` Prefect flow: the whole loop as tasks, estimators fanned out concurrently.

The tasks and their order come from the stage graph (:data:`cleanse.stages.graph.GRAPH`)::

    stage -> train -> score(e) -> detect(e) -> retrain(e)   for each estimator e, concurrently
                   -> query, references                     (in parallel with the estimators)
          -> recommend (one cleaned model, chosen without ground truth)
          -> report (+ MLflow run + markdown artifact)

Run it with ``python -m flows.cleanse_flow`` (or ``python flows/cleanse_flow.py``), or deploy it with
``prefect.yaml`` (see docs/prefect.md). Rerunning with the same outputs resumes: stages whose
outputs are fresh are skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cleanse.uris import redact

# Run as a script (``python flows/cleanse_flow.py``), flows/ is first on sys.path and the repo root
# is not; put the root there so ``tasks`` imports.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from prefect import flow
from prefect.futures import wait

from cleanse.errors import CleanseError
from tasks import STAGE_TASKS, report
from tasks._common import route_cleanse_logs, task_options


class FlowFailed(CleanseError):
    """A stage of the flow failed or crashed; the message names the stage and the reason in one
    line (``cleanse run --prefect`` prints it as ``error: ...`` and exits non-zero)."""


def _reason(state: Any) -> str:
    """One line: the failed task's exception (type and first line), else the state's message."""
    from cleanse.uris import redact

    exc = state.result(raise_on_failure=False) if state.is_failed() else None
    if isinstance(exc, BaseException):
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
    else:
        text = f"{state.name}: {state.message or 'no message'}"
    return redact(" ".join(text.split()))


def settle(branches: list[tuple[str, Any]]) -> None:
    """Wait for every submitted task; raise :class:`FlowFailed` naming the first (in submission
    order) that failed or crashed. Tasks skipped because an upstream failed are not completed
    either, so any incomplete branch fails the flow and the report never sees partial results."""
    wait([future for _, future in branches])
    broken = [(label, future.state) for label, future in branches if not future.state.is_completed()]
    if not broken:
        return
    root = [(label, state) for label, state in broken if state.is_failed() or state.is_crashed()] or broken
    label, state = root[0]
    others = [other for other, _ in broken if other != label]
    tail = f" ({len(others)} more not completed: {', '.join(others)})" if others else ""
    raise FlowFailed(f"{label} failed: {_reason(state)}{tail}")


def _submit_graph(common: tuple[str | None, list[str], str], names: list[str], fresh: bool,
                  stage_tasks: dict[str, Any]) -> Any:
    """Submit every stage of the graph, each waiting for its upstream stages (the same estimator's,
    for a per-estimator stage); return the last stage's (the report's) result.

    A stage that gathers every estimator's results (``recommend``, ``report``) starts only after
    everything submitted before it has settled: a failed or crashed branch fails the flow run with
    its stage and reason, and the report only ever runs on complete results."""
    from cleanse.stages.graph import run_stages, upstream

    futures: dict[tuple[str, str | None], Any] = {}
    branches: list[tuple[str, Any]] = []
    last: Any = None
    for stage in run_stages():
        before = [other for other in upstream(stage) if other.in_run]
        if not stage.per_estimator and any(other.per_estimator for other in before):
            settle(branches)
            branches = []
        for estimator in names if stage.per_estimator else [None]:
            wait_for = [futures[(other.name, estimator if other.per_estimator else None)] for other in before
                        if (other.name, estimator if other.per_estimator else None) in futures]
            if stage.own_command:  # the report: its own task (MLflow run, markdown artifact)
                last = report.submit(*common, wait_for=wait_for)
            else:
                last = stage_tasks[stage.name].submit(*common, estimator, fresh=fresh, wait_for=wait_for)
            futures[(stage.name, estimator)] = last
            branches.append((stage.label(estimator), last))
    settle(branches)
    return last.result()


def _resolve(params_file: str | None, overrides: list[str] | None, out: str,
             estimators: list[str] | None) -> tuple[str | None, list[str], str]:
    """Absolute paths (relative ones against the working directory) and the overrides, with
    ``estimators`` folded in so every task (and the report) sees the same list."""
    resolved = str(Path(params_file).expanduser().resolve()) if params_file else None
    merged = list(overrides or [])
    if estimators:
        merged.append(f"estimators={json.dumps(list(estimators))}")
    return resolved, merged, out if out.startswith("s3://") else str(Path(out).expanduser().resolve())


def _join(out: str, *parts: str) -> str:
    """``out/part/...`` keeping an ``s3://`` root a URI (``Path`` would collapse it to ``s3:/``)."""
    if out.startswith("s3://"):
        return "/".join([out.rstrip("/"), *parts])
    return str(Path(out).joinpath(*parts))


def _mlflow_tags() -> dict[str, str]:
    """Tags that link the MLflow parent run to this flow run (the UI address when a server is set)."""
    import os

    from prefect.runtime import flow_run

    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    if os.environ.get("PREFECT_UI_URL") or os.environ.get("PREFECT_API_URL"):
        tags["prefect.flow_run_url"] = str(flow_run.ui_url)
    return tags


def _mlflow_failed(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook: a failed or crashed flow run marks its MLflow parent run FAILED."""
    from cleanse.config import load_params
    from cleanse.storage import Layout
    from cleanse.tracking import close_pipeline_run

    arguments = {"params_file": "params.yaml", "overrides": None, "out": ".", "estimators": None,
                 **flow_run.parameters}
    params_file, overrides, out = _resolve(arguments["params_file"], arguments["overrides"], arguments["out"],
                                           arguments["estimators"])
    params = load_params(params_file, overrides)
    if params.tracking.enabled:
        close_pipeline_run(params, Layout.at(out), status="FAILED")


@flow(name="cleanse", log_prints=True, on_failure=[_mlflow_failed], on_crashed=[_mlflow_failed])
def cleanse_flow(params_file: str | None = "params.yaml", overrides: list[str] | None = None, out: str = ".",
                 estimators: list[str] | None = None, fresh: bool = False) -> dict[str, Any]:
    """Find the training data that hurts a model, remove it, retrain, and compare.

    Args:
        params_file: params.yaml (relative to the working directory); None = built-in defaults.
        overrides: ``dotted.key=value`` strings, as ``cleanse run --set``.
        out: output root for data/, models/, scores/, flags/, retrain/, reports/.
        estimators: estimators to run (default: ``estimators`` from the params).
        fresh: recompute every stage instead of resuming.
    """
    from cleanse.config import load_params

    route_cleanse_logs()  # progress lines of the library's "cleanse" logger -> this run's log
    params_file, overrides, out = _resolve(params_file, overrides, out, estimators)
    params = load_params(params_file, overrides)  # fail fast on a bad configuration
    names = params.estimators
    print(f"cleanse: params={params_file} out={redact(out)} estimators={names}")
    if params.tracking.enabled:  # the MLflow parent run opens with the flow run, which its tags link
        from cleanse.storage import Layout
        from cleanse.tracking import display_uri, open_pipeline_run

        layout = Layout.at(out)
        print(f"mlflow: run {open_pipeline_run(params, layout, _mlflow_tags())} at {display_uri(layout)}")
    common = (params_file, overrides, out)
    # Retries where a task touches S3 or a server; never for CleanseErrors (see task_options).
    work = task_options(params, out)
    metrics = _submit_graph(common, names, fresh, {name: t.with_options(**work) for name, t in STAGE_TASKS.items()})
    print(f"cleanse: metrics at {redact(_join(out, 'reports', 'metrics.json'))}")
    return metrics


@flow(name="cleanse-sweep", log_prints=True)
def cleanse_sweep(params_file: str | None = "params.yaml", key: str = "corruption.fraction",
                  values: list[Any] | None = None, overrides: list[str] | None = None, out: str = "sweeps",
                  estimators: list[str] | None = None, fresh: bool = False) -> dict[str, dict[str, Any]]:
    """One :func:`cleanse_flow` run per value of ``key`` (the Prefect counterpart of
    ``dvc exp run -S corruption.fraction=...``), each under ``<out>/<key>=<value>``.

    Returns ``{"<key>=<value>": metrics}``.
    """
    if not values:
        from cleanse.errors import ConfigError

        raise ConfigError(f"values: give at least one value to sweep {key} over")
    results = {}
    for value in values:
        label = f"{key}={json.dumps(value)}"
        target = _join(out, label)
        results[label] = cleanse_flow(params_file, [*(overrides or []), label], target, estimators, fresh)
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the cleanse flow (see docs/prefect.md).")
    parser.add_argument("--params", "-p", default="params.yaml", help="params file ('' = built-in defaults)")
    parser.add_argument("--set", "-s", action="append", default=[], dest="overrides", help="dotted.key=value")
    parser.add_argument("--out", "-o", default=".", help="output root")
    parser.add_argument("--estimator", "-e", action="append", dest="estimators", help="repeatable")
    parser.add_argument("--fresh", action="store_true", help="recompute every stage")
    args = parser.parse_args()
    cleanse_flow(args.params or None, args.overrides, args.out, args.estimators, args.fresh)

"""The ``cleanse`` command line: ``cleanse run`` for the whole loop, and one sub-command per stage
(what ``dvc.yaml`` calls). Heavy imports happen inside commands so ``cleanse --help`` stays fast.

Exit status: 0 on success, 2 for bad input (the message names the key, file or value).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find the training data that hurts a model, remove it, retrain, and compare.")

ParamsOption = Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml (default: ./params.yaml if present, else built-in defaults).")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: dotted.key=value (repeatable).")]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output root for data/, models/, scores/, flags/, reports/.")]
EstimatorOption = Annotated[str, typer.Option("--estimator", "-e", help="Registered estimator name.")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _setup(params_file: Path | None, overrides: list[str] | None, out: Path) -> tuple[Any, Any]:
    from cleanse.config import load_params
    from cleanse.storage import Layout

    if params_file is None and Path("params.yaml").is_file():
        params_file = Path("params.yaml")
    params = load_params(params_file, overrides or [])
    return params, Layout.at(out)


def _guarded(action: Any) -> Any:
    from cleanse.errors import CleanseError

    try:
        return action()
    except CleanseError as exc:
        _fail(str(exc))


def _print_table(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from cleanse.report import _fmt, comparison_rows

    rows = comparison_rows(metrics)
    dataset = metrics["dataset"]
    table = Table(title=f"{dataset['name']}: {dataset['n_train']} train, {dataset['n_corrupted']} corrupted ({dataset['corruption']})")
    for header in rows[0]:
        table.add_column(header, justify="left" if header == "method" else "right")
    for row in rows:
        table.add_row(*(_fmt(value) for value in row.values()))
    Console(width=140).print(table)


@app.command()
def run(params_file: ParamsOption = None, overrides: SetOption = None, out: OutOption = Path("."),
        fresh: Annotated[bool, typer.Option("--fresh", help="Recompute every stage instead of resuming.")] = False) -> None:
    """Run the whole loop: stage, train, score, detect, retrain, report (and log to MLflow)."""

    def action() -> None:
        from cleanse.pipeline import run_all

        params, layout = _setup(params_file, overrides, out)
        metrics = run_all(params, layout, resume=not fresh, log=lambda line: typer.echo(line, err=True))
        _print_table(metrics)
        typer.echo(f"report: {layout.reports / 'report.html'}")
        if params.tracking.enabled:
            from cleanse.tracking import log_pipeline, tracking_uri

            run_id = log_pipeline(params, layout, metrics)
            typer.echo(f"mlflow: run {run_id} at {tracking_uri(layout)}")

    _guarded(action)


@app.command()
def stage(params_file: ParamsOption = None, overrides: SetOption = None, out: OutOption = Path(".")) -> None:
    """Load, validate, split and corrupt the data -> data/staged/."""
    from cleanse import pipeline

    _guarded(lambda: pipeline.run_stage(*_setup(params_file, overrides, out)))


@app.command()
def train(params_file: ParamsOption = None, overrides: SetOption = None, out: OutOption = Path(".")) -> None:
    """Train the base model -> models/base/."""
    from cleanse import pipeline

    _guarded(lambda: pipeline.run_train(*_setup(params_file, overrides, out)))


@app.command()
def score(estimator: EstimatorOption, params_file: ParamsOption = None, overrides: SetOption = None, out: OutOption = Path(".")) -> None:
    """Score every training sample with one estimator -> scores/<estimator>.parquet."""
    from cleanse import pipeline

    _guarded(lambda: pipeline.run_score(*_setup(params_file, overrides, out), _known(estimator)))


@app.command()
def detect(estimator: EstimatorOption, params_file: ParamsOption = None, overrides: SetOption = None, out: OutOption = Path(".")) -> None:
    """Turn one estimator's scores into flags -> flags/<estimator>.parquet."""
    from cleanse import pipeline

    _guarded(lambda: pipeline.run_detect(*_setup(params_file, overrides, out), _known(estimator)))


@app.command()
def retrain(estimator: EstimatorOption, params_file: ParamsOption = None, overrides: SetOption = None, out: OutOption = Path(".")) -> None:
    """Retrain without one estimator's flags (and without a random set of the same size)."""
    from cleanse import pipeline

    _guarded(lambda: pipeline.run_retrain(*_setup(params_file, overrides, out), _known(estimator)))


@app.command()
def references(params_file: ParamsOption = None, overrides: SetOption = None, out: OutOption = Path(".")) -> None:
    """Baseline, oracle and random-removal retrains -> retrain/references.json."""
    from cleanse import pipeline

    _guarded(lambda: pipeline.run_references(*_setup(params_file, overrides, out)))


@app.command()
def report(params_file: ParamsOption = None, overrides: SetOption = None, out: OutOption = Path("."),
           track: Annotated[bool, typer.Option(help="Also log to MLflow (when tracking.enabled).")] = True) -> None:
    """Write reports/metrics.json, plots and report.html; print the comparison table."""

    def action() -> None:
        from cleanse.report import run_report

        params, layout = _setup(params_file, overrides, out)
        metrics = run_report(params, layout)
        _print_table(metrics)
        if track and params.tracking.enabled:
            from cleanse.tracking import log_pipeline

            log_pipeline(params, layout, metrics)

    _guarded(action)


@app.command("estimators")
def list_estimators() -> None:
    """List the registered estimators."""
    from cleanse.estimators import registry

    for name in registry.names():
        typer.echo(name)


def _known(name: str) -> str:
    from cleanse.estimators import registry

    if name not in registry.names():
        _fail(f"unknown estimator {name!r}; allowed: {', '.join(registry.names())}")
    return name


def main() -> None:
    app(prog_name="cleanse")


if __name__ == "__main__":
    sys.exit(main())

"""The ``cleanse`` command line: ``cleanse run`` for the whole loop, and one sub-command per stage
(what ``dvc.yaml`` calls). Heavy imports happen inside commands so ``cleanse --help`` stays fast.

Exit status: 0 on success, 2 for bad input (the message names the key, file or value).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find the training data that hurts a model, remove it, retrain, and compare.")

ParamsOption = Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml (default: ./params.yaml if present, else built-in defaults).")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: dotted.key=value (repeatable).")]
# A string, not a Path: Path("http://x/y") would collapse to the local folder "http:/x/y" before the
# scheme is checked (cleanse.storage.check_out_scheme does that on the text as given).
OutOption = Annotated[str, typer.Option("--out", "-o", help="Output root for data/, models/, scores/, flags/, reports/ "
                                        "(a local folder or s3://bucket/prefix).")]
EstimatorOption = Annotated[str, typer.Option("--estimator", "-e", help="Registered estimator name.")]


def _fail(message: str) -> None:
    from cleanse.uris import redact  # an error may quote a URI given with a password in it

    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(2)


def _setup(params_file: Path | None, overrides: list[str] | None, out: str) -> tuple[Any, Any]:
    from cleanse.config import load_params
    from cleanse.storage import Layout

    if params_file is None and Path("params.yaml").is_file():
        params_file = Path("params.yaml")
    params = load_params(params_file, overrides or [])
    layout = Layout.at(out)
    from cleanse.lock import hold_for_process  # one writer per --out, until this command exits

    hold_for_process(layout.root)
    return params, layout


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


PrefectOption = Annotated[bool | None, typer.Option(
    "--prefect/--no-prefect", help="Run as the Prefect flow, reporting to PREFECT_API_URL (default: when it is set).")]


@app.command()
def run(params_file: ParamsOption = None, overrides: SetOption = None, out: OutOption = ".",
        fresh: Annotated[bool, typer.Option("--fresh", help="Recompute every stage instead of resuming.")] = False,
        prefect: PrefectOption = None) -> None:
    """Run the whole loop: stage, train, score, detect, retrain, report (and log to MLflow)."""
    import os

    if prefect or (prefect is None and os.environ.get("PREFECT_API_URL")):
        _guarded(lambda: _run_flow(params_file, overrides, out, fresh))
        return

    def action() -> None:
        from cleanse.pipeline import run_all

        params, layout = _setup(params_file, overrides, out)
        _check_servers(params)
        metrics = run_all(params, layout, resume=not fresh, log=lambda line: typer.echo(line, err=True))
        _print_table(metrics)
        typer.echo(f"report: {layout.location(layout.reports / 'report.html')}")
        if params.tracking.enabled:
            from cleanse.tracking import log_pipeline, tracking_uri
            from cleanse.uris import redact

            run_id = log_pipeline(params, layout, metrics)
            typer.echo(f"mlflow: run {run_id} at {redact(tracking_uri(layout))}")  # no password on the console

    _guarded(action)


def _run_flow(params_file: Path | None, overrides: list[str] | None, out: str, fresh: bool) -> None:
    """``cleanse run`` as the Prefect flow, so the run shows in the Prefect UI (and, with
    MLFLOW_TRACKING_URI, in MLflow's). The flow is the application layer's: it plugs in through
    the ``cleanse.flow`` entry point (see :func:`extensions`)."""
    import importlib.util

    flows = extensions(FLOW_GROUP)
    if not flows:
        _fail("--prefect needs the application layer (ops/, flows/): install the cleanse checkout with "
              "scripts/setup.sh")
    if importlib.util.find_spec("prefect") is None:
        _fail("--prefect needs Prefect: pip install 'cleanse[prefect]'")
    from cleanse.config import load_params
    from cleanse.storage import check_out_scheme, check_writable

    if params_file is None and Path("params.yaml").is_file():
        params_file = Path("params.yaml")
    # Everything the flow would refuse, refused before it starts: configuration, --out, servers.
    params = load_params(params_file, list(overrides or []))
    target = check_out_scheme(out)
    if not target.startswith("s3://"):
        check_writable(Path(target).expanduser().absolute())
    _check_servers(params, prefect=True)
    from cleanse.lock import hold_for_process  # one writer per --out: the flow's tasks run under this lock

    if target.startswith("s3://"):
        from cleanse.remote import work_folder

        hold_for_process(work_folder(target))
    else:
        hold_for_process(Path(target).expanduser().absolute())
    run_flow = flows[0].load()  # imports Prefect: after the checks, which need none of it
    metrics = run_flow(str(params_file) if params_file else None, list(overrides or []), target, fresh)
    _print_table(metrics)


def _stage_command(stage: Any) -> None:
    """Register ``cleanse <stage>`` for one stage of the graph: it computes the stage whether its
    outputs are fresh or not (what a ``dvc.yaml`` stage calls), with ``--estimator`` when the stage
    runs per estimator."""

    def run_stage(params: Any, layout: Any, estimator: str | None = None) -> Any:
        from cleanse.stages.runner import run_stage_now

        return run_stage_now(stage, params, layout, estimator)

    if stage.per_estimator:
        def command(estimator: EstimatorOption, params_file: ParamsOption = None, overrides: SetOption = None,
                    out: OutOption = ".") -> None:
            _guarded(lambda: run_stage(*_setup(params_file, overrides, out), _known(estimator)))
    else:
        def command(params_file: ParamsOption = None, overrides: SetOption = None, out: OutOption = ".") -> None:  # type: ignore[misc]
            _guarded(lambda: run_stage(*_setup(params_file, overrides, out)))
    command.__doc__ = stage.help
    app.command(stage.name)(command)


def _stage_commands() -> None:
    from cleanse.stages.graph import GRAPH

    for stage in GRAPH:
        if not stage.own_command:
            _stage_command(stage)


_stage_commands()


@app.command()
def report(params_file: ParamsOption = None, overrides: SetOption = None, out: OutOption = ".",
           track: Annotated[bool, typer.Option(help="Also log to MLflow (when tracking.enabled).")] = True) -> None:
    """Write reports/metrics.json, plots and report.html; print the comparison table."""

    def action() -> None:
        from cleanse.report import run_report

        params, layout = _setup(params_file, overrides, out)
        if track:
            _check_servers(params)
        metrics = run_report(params, layout)
        _print_table(metrics)
        if track and params.tracking.enabled:
            from cleanse.tracking import log_pipeline

            log_pipeline(params, layout, metrics)

    _guarded(action)


@app.command("dvc-yaml")
def dvc_yaml(params_file: Annotated[Path | None, typer.Option(
        "--params", "-p", help="params file whose family's extra sections (e.g. graph's influence) the stages "
                               "list too (default: none, the plain stage graph).")] = None) -> None:
    """Print dvc.yaml, generated from the stage graph: cleanse dvc-yaml > dvc.yaml."""
    from cleanse.stages.dvc import dvc_yaml as render

    def action() -> None:
        from cleanse.config import load_params

        typer.echo(render(None if params_file is None else load_params(params_file)), nl=False)

    _guarded(action)


@app.command("estimators")
def list_estimators() -> None:
    """List the registered estimators."""
    from cleanse.estimators import registry

    for name in registry.names():
        typer.echo(name)


# The application layer (the server stack's ``cleanse stack`` sub-commands, the Prefect flow behind
# ``cleanse run --prefect``) plugs in through entry points, so this module imports none of it.
COMMANDS_GROUP = "cleanse.cli"  # callables register(app) that add sub-commands; main() calls them
FLOW_GROUP = "cleanse.flow"  # one callable (params_file, overrides, out, fresh) -> the report's metrics
guarded = _guarded  # for the sub-commands registered from outside: CleanseError -> "error: ..." and exit 2


def extensions(group: str) -> list[Any]:
    """The installed entry points of ``group`` (not yet loaded)."""
    from importlib.metadata import entry_points

    return sorted(entry_points(group=group), key=lambda point: point.name)


def _check_reachable(variable: str, uri: str, timeout: float = 3.0) -> None:
    """Refuse a server address in ``variable`` that does not accept a TCP connection within
    ``timeout`` seconds, before any stage computes (instead of a traceback after the pipeline)."""
    import socket
    from urllib.parse import urlsplit

    from cleanse.uris import redact

    default_ports = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}
    try:
        parts = urlsplit(uri)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        _fail(f"{variable}={redact(uri)} is not a valid URI ({exc})")
        return
    port = port or default_ports.get(parts.scheme.lower().split("+")[0])
    if not host or port is None:  # a file path, sqlite:///, databricks: nothing to connect to
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        _fail(f"{variable}={redact(uri)}: cannot reach {host}:{port} ({reason}); start the server or unset "
              f"{variable}")


def _check_servers(params: Any, *, prefect: bool = False) -> None:
    """The servers this run will talk to (MLflow when tracking, Prefect's API for a flow) are reachable."""
    import os

    if prefect and os.environ.get("PREFECT_API_URL"):
        _check_reachable("PREFECT_API_URL", os.environ["PREFECT_API_URL"])
    if params.tracking.enabled and os.environ.get("MLFLOW_TRACKING_URI"):
        _check_reachable("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])


def _known(name: str) -> str:
    from cleanse.estimators import registry

    if name not in registry.names():
        _fail(f"unknown estimator {name!r}; allowed: {', '.join(registry.names())}")
    return name


def main() -> None:
    for point in extensions(COMMANDS_GROUP):
        point.load()(app)
    app(prog_name="cleanse")


if __name__ == "__main__":
    main()

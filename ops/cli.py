"""The application layer's part of the ``cleanse`` command line, plugged into the library's
:mod:`cleanse.cli` through two entry-point groups declared in ``pyproject.toml``:

- ``cleanse.cli``: :func:`register` adds ``cleanse stack up | down | status | env``;
- ``cleanse.flow``: :func:`run_flow` runs ``cleanse run --prefect`` as the Prefect flow of
  ``flows/cleanse_flow.py``.

The library checks everything it can (configuration, ``--out``, servers, the lock) before it calls
:func:`run_flow`, which is the first place Prefect is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cleanse.cli import guarded

stack_app = typer.Typer(no_args_is_help=True, help="A local Prefect + MLflow + S3 stack (see docs/stack.md).")
StackDirOption = Annotated[Path, typer.Option("--dir", help="State folder (logs, generated credentials).")]


def register(app: typer.Typer) -> None:
    """Add the ``stack`` sub-commands to the library's ``app``."""
    app.add_typer(stack_app, name="stack")


def run_flow(params_file: str | None, overrides: list[str], out: str, fresh: bool) -> dict[str, Any]:
    """The whole loop as the ``cleanse`` Prefect flow; returns the report's metrics."""
    from flows.cleanse_flow import cleanse_flow

    return cleanse_flow(params_file, overrides, out, None, fresh)


@stack_app.command("up")
def stack_up(directory: StackDirOption = Path(".cleanse/stack"),
             project: Annotated[Path, typer.Option(help="Checkout holding prefect.yaml.")] = Path("."),
             worker: Annotated[bool, typer.Option(help="Deploy prefect.yaml's `local` and start a worker.")] = True,
             prefect_port: int = 4200, mlflow_port: int = 5000, s3_port: int = 8333) -> None:
    """Start SeaweedFS S3, MLflow and Prefect servers and a worker on 127.0.0.1; print the URLs."""
    from ops.stack import Stack

    stack = Stack(directory)
    guarded(lambda: stack.up(project, worker=worker, echo=typer.echo,
                             ports={"prefect": prefect_port, "mlflow": mlflow_port, "s3": s3_port}))
    typer.echo(f"state and credentials: {stack.dir}\nclients: eval \"$(cleanse stack env --dir {directory})\"")


@stack_app.command("down")
def stack_down(directory: StackDirOption = Path(".cleanse/stack")) -> None:
    """Stop every process `stack up` started."""
    from ops.stack import Stack

    stopped = Stack(directory).down(echo=typer.echo)
    typer.echo(f"stopped {len(stopped)} processes" if stopped else "nothing running")


@stack_app.command("status")
def stack_status(directory: StackDirOption = Path(".cleanse/stack")) -> None:
    """Which stack processes are alive and healthy (exit 1 when any is not)."""
    from ops.stack import Stack

    stack = Stack(directory)
    status = stack.status()
    for name, item in status.items():
        typer.echo(f"{name:8s} pid {item['pid']:>7}  {'healthy' if item['healthy'] else 'alive' if item['alive'] else 'stopped'}")
    for name, url in stack.state().get("urls", {}).items():
        typer.echo(f"{name:12s} {url}")
    if not status or not all(item["healthy"] for item in status.values()):
        raise typer.Exit(1)


@stack_app.command("env")
def stack_env(directory: StackDirOption = Path(".cleanse/stack")) -> None:
    """Print `export` lines (credentials included) for clients of the stack: eval "$(cleanse stack env)"."""
    from ops.stack import Stack

    def lines() -> None:
        for key, value in Stack(directory).env().items():
            typer.echo(f"export {key}={value}")

    guarded(lines)

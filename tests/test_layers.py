"""The layers hold: the import contracts in ``pyproject.toml`` (``lint-imports``), mypy on
``src/cleanse``, the 400-line limit on library modules, and the optional extras (MLflow, Prefect,
DVC): the library runs without them and names the missing extra in one line when a feature needs it.

The static checks run here, in the default suite, so that CI's test command fails when a layer is
crossed. mypy takes about a minute on a cold cache (2 cores), which is why it is one test, not one
per module.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_LINES = 400
# Library modules allowed over the limit (none now); the test fails when a
# module not listed here grows past the limit, and when a listed one is back under it (take it off).
OVER_THE_LIMIT: set[str] = set()


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed beside {sys.executable}: run scripts/setup.sh --dev")
    return str(path)


def test_import_contracts_are_kept_and_can_break(tmp_path):
    """Every contract is kept; without its ignore line the MLflow contract breaks on the tracking
    package's own imports (so the contracts see lazy, function-level imports)."""
    kept = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert kept.returncode == 0, kept.stdout[-3000:] + kept.stderr[-2000:]
    assert re.search(r"Contracts: 3 kept, 0 broken", kept.stdout), kept.stdout[-2000:]

    config = (REPO / "pyproject.toml").read_text()
    strict = re.sub(r"^ignore_imports = .*mlflow.*\n", "", config, flags=re.MULTILINE)
    assert strict != config
    (tmp_path / "pyproject.toml").write_text(strict)
    broken = subprocess.run([_tool("lint-imports"), "--no-cache", "--config", str(tmp_path / "pyproject.toml")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert broken.returncode != 0
    assert "only cleanse.tracking imports MLflow BROKEN" in broken.stdout, broken.stdout[-2000:]
    assert "cleanse.tracking.runs -> mlflow" in broken.stdout, broken.stdout[-2000:]


def test_mypy_passes_on_the_library(tmp_path):
    cache = REPO / ".mypy_cache"  # reused between runs (ignored by git); a cold run takes ~1 min
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache)], cwd=REPO,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "MYPY_FORCE_COLOR": "0"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout


def test_no_library_module_exceeds_the_line_limit():
    lengths = {str(path.relative_to(REPO)): len(path.read_text().splitlines())
               for path in (REPO / "src" / "cleanse").rglob("*.py")}
    assert len(lengths) > 20
    over = {path: n for path, n in lengths.items() if n > MAX_LINES}
    assert set(over) == OVER_THE_LIMIT, over


# ----------------------------------------------------------------------------- optional extras

# A fresh interpreter in which mlflow, prefect and dvc cannot be imported (None in sys.modules is
# what Python's import system reads as "not installed"; importlib.util.find_spec agrees).
_WITHOUT_EXTRAS = """
import sys
for name in ("mlflow", "prefect", "dvc"):
    sys.modules[name] = None
from cleanse.cli import main
sys.argv = ["cleanse", *sys.argv[1:]]
main()
"""
_TINY = ["data.source=sklearn:iris", "model.arch=logreg", "model.epochs=5", 'estimators=["loss"]']


def _without_extras(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    overrides = [item for override in _TINY for item in ("--set", override)]
    return subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, *args, *overrides], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)


def test_the_library_runs_without_its_extras(tmp_path):
    """The whole loop, in an interpreter without MLflow, Prefect and DVC (tracking off), writes
    its report (~20 s of CPU)."""
    done = _without_extras(tmp_path, "run", "--out", str(tmp_path / "plain"), "--set", "tracking.enabled=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "plain" / "reports" / "metrics.json").is_file()


@pytest.mark.parametrize(("missing", "args", "line"), [
    ("mlflow", ["run"], "error: MLflow is not installed: pip install 'cleanse[mlflow]' (or set tracking.enabled: false)"),
    ("prefect", ["run", "--prefect"], "error: --prefect needs Prefect: pip install 'cleanse[prefect]'"),
])
def test_a_missing_extra_is_named_in_one_line(tmp_path, monkeypatch, missing, args, line):
    from typer.testing import CliRunner

    from cleanse.cli import app

    monkeypatch.setitem(sys.modules, missing, None)  # what the import system reads as not installed
    for variable in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(variable, raising=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*args, "--out", str(out), *(item for o in _TINY for item in ("--set", o))])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == line
    assert not (out / "data").exists()  # refused before any stage ran


def test_stack_commands_come_from_the_application_layer(tmp_path):
    """``cleanse stack`` is registered by ops/ through the ``cleanse.cli`` entry point: the
    console script has it, the library's own app does not."""
    from typer.testing import CliRunner

    from cleanse.cli import app

    assert "stack" not in [group.name for group in app.registered_groups]
    if shutil.which("cleanse", path=str(BIN)) is None:
        pytest.skip(f"the cleanse console script is not installed beside {sys.executable}")
    result = subprocess.run([str(BIN / "cleanse"), "stack", "env", "--dir", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no stack at {tmp_path / 'none'}; run `cleanse stack up` first"
    assert CliRunner().invoke(app, ["stack", "env"]).exit_code != 0  # unknown without the extension


def test_stack_up_names_a_missing_extra(tmp_path, monkeypatch):
    from ops.stack import Stack, StackError

    monkeypatch.setitem(sys.modules, "prefect", None)
    with pytest.raises(StackError, match=r"^the stack's prefect server needs pip install 'cleanse\[prefect\]'$"):
        Stack(tmp_path / "stack").up(echo=lambda *_: None)
    assert not (tmp_path / "stack").exists()  # refused before anything started

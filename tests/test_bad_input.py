"""Bad input: one line ``error: ...`` naming the problem, exit status 2, no traceback, and nothing
written under ``--out`` (no artifact, no temporary file, no empty folder).

The catalogue (``CASES``) goes through ``cleanse run`` and the stage sub-commands in-process with
typer's CliRunner; the callbacks a command registers with ``atexit`` (the ``--out`` lock's release)
run after each command, as they would when its process exits. A few cases also run the real
``cleanse`` executable, and two go through ``dvc repro``. docs/reliability.md ("Bad input") lists
the catalogue.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cleanse.cli import app

FAST = ["--set", "tracking.enabled=false", "--set", "model.epochs=2", "--set", "estimators=[loss]"]
IRIS = ["--set", "data.source=sklearn:iris", "--set", "model.arch=logreg"]
CLEANSE = Path(sys.executable).parent / "cleanse"


# ----------------------------------------------------------------------------- helpers


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def _invoke(args: list[str], env: dict[str, str] | None = None) -> Outcome:
    """``cleanse <args>`` in-process; exceptions propagate (an uncaught one is a traceback)."""
    exits: list[tuple[Callable, tuple, dict]] = []
    register = atexit.register
    atexit.register = lambda func, *a, **k: exits.append((func, a, k)) or func  # type: ignore[assignment]
    try:
        result = CliRunner(env=env).invoke(app, args, catch_exceptions=False)
    finally:
        atexit.register = register  # type: ignore[assignment]
        for func, a, k in reversed(exits):  # what the process would do on exit
            func(*a, **k)
    return Outcome(result.exit_code, result.stdout, result.stderr)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and mtime (hidden and temporary ones too)."""
    if not root.exists():
        return {}
    out = {}
    for path in root.rglob("*"):
        stat = path.stat()
        out[str(path.relative_to(root))] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return out


def _assert_one_error_line(outcome: Outcome, keyword: str) -> str:
    lines = outcome.stderr.splitlines()
    assert outcome.exit_code == 2, (outcome.exit_code, outcome.stderr[-2000:])
    assert len(lines) == 1, outcome.stderr[-2000:]
    assert lines[0].startswith("error: "), lines[0]
    assert keyword in lines[0], (keyword, lines[0])
    assert "Traceback" not in outcome.stdout + outcome.stderr
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- bad files


def _features(n: int = 60, width: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, width)).astype(np.float32)


LABELS = np.repeat([0, 1, 2], 20)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of malformed sources, probe files and params files (60 rows, 4 features)."""
    root = tmp_path_factory.mktemp("bad-input")
    x = _features()
    frame = {"features": x.tolist(), "label": LABELS}
    pl.DataFrame({**frame, "id": [None, *range(1, 60)]}).write_parquet(root / "null_id.parquet")
    pl.DataFrame({**frame, "id": [f"s{i}" for i in range(60)]}).write_parquet(root / "string_id.parquet")
    pl.DataFrame({"a": [f"{v:.3f}" for v in x[:, 0]], "b": x[:, 1], "label": LABELS}).write_parquet(
        root / "string_columns.parquet")
    pl.DataFrame({"features": [["a", "b"]] * 60, "label": LABELS}).write_parquet(root / "string_list.parquet")
    pl.DataFrame({"features": x.tolist(), "label": [str(v) for v in LABELS]}).write_parquet(
        root / "string_label.parquet")
    pl.DataFrame({"features": pl.Series([], dtype=pl.List(pl.Float32)),
                  "label": pl.Series([], dtype=pl.Int64)}).write_parquet(root / "zero_rows.parquet")
    huge = LABELS.copy()
    huge[0] = 10**12
    np.savez(root / "huge_label.npz", X=x, y=huge)
    np.savez(root / "zero_rows.npz", X=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))
    np.savez(root / "y_two_columns.npz", X=x, y=np.stack([LABELS, LABELS], axis=1))
    np.savez(root / "y_column.npz", X=x, y=LABELS[:, None])
    np.savez(root / "string_x.npz", X=np.full((60, 4), "a"), y=LABELS)
    np.savez(root / "zero_width.npz", X=np.zeros((60, 0), np.float32), y=LABELS)
    np.savez(root / "negative_label.npz", X=x, y=np.repeat([0, 1, -1], 20))
    np.savez(root / "label_gap.npz", X=x, y=np.repeat([0, 1, 3], 20))
    np.savez(root / "nan.npz", X=np.where(np.arange(240).reshape(60, 4) == 13, np.nan, x), y=LABELS)
    np.savez(root / "good.npz", X=x, y=LABELS)
    whole = (root / "good.npz").read_bytes()
    (root / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    np.savez(root / "probes_zero.npz", X=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))
    (root / "probes_truncated.npz").write_bytes(whole[: len(whole) // 3])
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "broken.yaml").write_text("model:\n  lr: [0.1\n  epochs: 3\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "a_file").write_text("keep me")
    return root


# ----------------------------------------------------------------------------- the catalogue


@dataclass
class Case:
    """``cleanse <command> ... --out <out>`` must fail with ``keyword`` in its one error line."""

    id: str
    category: str
    args: Callable[[Path], list[str]]  # bad-file folder -> extra arguments
    keyword: str
    command: tuple[str, ...] = ("run",)
    out: Callable[[Path, Path], str] | None = None  # (tmp, bad) -> --out; default tmp/"out"
    prepared: str | None = None  # "staged" or "done": outputs made first with FAST + IRIS
    env: Callable[[], dict[str, str]] = field(default=lambda: {})
    secret: str | None = None  # must not appear in the output


def _src(name: str) -> Callable[[Path], list[str]]:
    return lambda bad: ["--set", f"data.source={bad / name}"]


def _sets(*pairs: str) -> Callable[[Path], list[str]]:
    return lambda bad: [arg for pair in pairs for arg in ("--set", pair)]


CASES = [
    # configuration values
    Case("unknown-estimator", "config", _sets("estimators=[loss,shapley]"), "unknown estimator 'shapley'; allowed: loss"),
    Case("unknown-key", "config", _sets("no_such_section.key=1"), "no_such_section: unknown key"),
    Case("unknown-corruption", "config", _sets("corruption.kind=flip"), "'flip' is not one of 'none', 'label_flip'"),
    Case("unknown-budget", "config", _sets("detect.budget=all"), "detect.budget: 'all' is not one of"),
    Case("non-integer-epochs", "config", _sets("model.epochs=many"), "model.epochs"),
    Case("fraction-above-1", "config", _sets("corruption.fraction=1.5"), "corruption.fraction: must lie in (0, 1)"),
    Case("fraction-zero", "config", _sets("corruption.fraction=0"), "corruption.fraction: must lie in (0, 1)"),
    Case("negative-val-fraction", "config", _sets("data.val_fraction=-0.1"), "data.val_fraction: must lie in (0, 1)"),
    Case("lr-inf", "config", _sets("model.lr=inf"), "model.lr: must be a finite number"),
    Case("lr-nan", "config", _sets("model.lr=.nan"), "model.lr: must be a finite number"),
    Case("lr-1e30", "config", _sets("model.lr=1.0e+30"), "model.lr: Input should be less than or equal to 10"),
    Case("weight-decay-1e300", "config", _sets("model.weight_decay=1.0e+300"), "model.weight_decay"),
    Case("damping-inf", "config", _sets("scorers.influence.damping=inf"), "scorers.influence.damping: must be a finite"),
    Case("seed-2**32", "config", _sets(f"seed={2**32}"), "seed: must be an integer in 0..2147483647"),
    Case("seed-negative", "config", _sets("seed=-1"), "seed: must be an integer"),
    Case("experiment-100k", "config", _sets("tracking.experiment=" + "x" * 100_000), "tracking.experiment: must be 1..256"),
    Case("hidden-10**12", "config", _sets("model.arch=mlp", f"model.hidden=[{10**12}]"), "cannot fit in this machine's"),
    Case("cnn-on-tabular", "config", _sets("model.arch=cnn", "data.source=sklearn:wine"), "'cnn' needs image data"),
    Case("negative-budget-factor", "config", _sets("recommend.budget_factors=[0.5,-1]"),
         "recommend.budget_factors: every factor must be positive"),
    Case("trigger-larger-than-features", "config",
         _sets("data.source=sklearn:iris", "corruption.kind=backdoor", "corruption.trigger_size=5"),
         "corruption.trigger_size: 5 is larger than the number of features (4)"),
    Case("trigger-larger-than-image", "config", _sets("corruption.kind=backdoor", "corruption.trigger_size=9"),
         "corruption.trigger_size: 9 is larger than the image side (8x8)"),
    # params files
    Case("missing-params", "params file", lambda bad: ["--params", str(bad / "nope.yaml")], "params file not found"),
    Case("binary-params", "params file", lambda bad: ["--params", str(bad / "binary.yaml")], "is not UTF-8 text"),
    Case("broken-yaml", "params file", lambda bad: ["--params", str(bad / "broken.yaml")], "is not valid YAML"),
    Case("params-not-a-mapping", "params file", lambda bad: ["--params", str(bad / "list.yaml")],
         "expected a mapping of sections"),
    # data sources
    Case("unknown-builtin", "data", _sets("data.source=sklearn:mnist"), "unknown source 'sklearn:mnist'"),
    Case("unknown-source", "data", _sets("data.source=imagenet"), "unknown source 'imagenet'"),
    Case("missing-file", "data", _src("missing.parquet"), "file not found"),
    Case("parquet-null-id", "data", lambda bad: [*_src("null_id.parquet")(bad), "--set", "data.id_column=id"],
         "data.id_column 'id': 1 null id(s)"),
    Case("parquet-string-id", "data", lambda bad: [*_src("string_id.parquet")(bad), "--set", "data.id_column=id"],
         "data.id_column 'id': ids must be integers, got dtype String"),
    Case("parquet-string-feature-columns", "data",
         lambda bad: [*_src("string_columns.parquet")(bad), "--set", "data.features=[a,b]"],
         "data.features: column(s) 'a' (String) are not numeric"),
    Case("parquet-string-list-features", "data", _src("string_list.parquet"), "holds String values; features must be numeric"),
    Case("parquet-string-labels", "data", _src("string_label.parquet"), "labels must be integers"),
    Case("parquet-zero-rows", "data", _src("zero_rows.parquet"), "no samples (the table has 0 rows)"),
    Case("npz-label-10**12", "data", _src("huge_label.npz"), "the largest label is 1000000000000 but there are only 60 rows"),
    Case("npz-zero-rows", "data", _src("zero_rows.npz"), "no samples (X has 0 rows)"),
    Case("npz-y-two-columns", "data", _src("y_two_columns.npz"), "y must be a vector of class indices"),
    Case("npz-truncated", "data", _src("truncated.npz"), "not a readable .npz file (BadZipFile"),
    Case("npz-string-features", "data", _src("string_x.npz"), "X must be numeric"),
    Case("zero-width-features", "data", _src("zero_width.npz"), "the samples have no features"),
    Case("negative-label", "data", _src("negative_label.npz"), "labels out of range"),
    Case("label-gap", "data", _src("label_gap.npz"), "labels out of range"),
    Case("nan-features", "data", _src("nan.npz"), "NaN or infinite features"),
    Case("probes-zero-rows", "data", lambda bad: ["--set", "data.source=sklearn:iris", "--set", "query.kind=file",
                                                  "--set", f"query.path={bad / 'probes_zero.npz'}"],
         "the file holds no probes"),
    Case("probes-truncated", "data", lambda bad: ["--set", "data.source=sklearn:iris", "--set", "query.kind=file",
                                                  "--set", f"query.path={bad / 'probes_truncated.npz'}"],
         "not readable (BadZipFile"),
    # --out
    Case("out-http", "--out", lambda bad: [], "unsupported URI scheme 'http'", out=lambda tmp, bad: "http://x/y"),
    Case("out-gs", "--out", lambda bad: [], "unsupported URI scheme 'gs'", out=lambda tmp, bad: "gs://b/x"),
    Case("out-credentials-redacted", "--out", lambda bad: [], "unsupported URI scheme 'ftp'",
         out=lambda tmp, bad: "ftp://bob:hunter2@host/x", secret="hunter2"),
    Case("out-hash-query", "--out", lambda bad: [], "are not allowed in a local output path",
         out=lambda tmp, bad: str(tmp / "dir" / "a#b?c")),
    Case("out-is-a-file", "--out", lambda bad: [], "exists and is not a directory",
         out=lambda tmp, bad: str(bad / "a_file")),
    Case("out-under-a-file", "--out", lambda bad: [], "is a file, not a folder",
         out=lambda tmp, bad: str(bad / "a_file" / "run")),
    Case("stage-out-http", "--out", lambda bad: [], "unsupported URI scheme 'http'", command=("stage",),
         out=lambda tmp, bad: "http://x/y"),
    # servers
    Case("mlflow-unreachable", "servers", _sets("tracking.enabled=true"), "MLFLOW_TRACKING_URI=http://***@127.0.0.1:",
         env=lambda: {"MLFLOW_TRACKING_URI": f"http://bob:hunter2@127.0.0.1:{_closed_port()}"}, secret="hunter2"),
    Case("prefect-unreachable", "servers", lambda bad: ["--prefect"], "PREFECT_API_URL=http://127.0.0.1:",
         env=lambda: {"PREFECT_API_URL": f"http://127.0.0.1:{_closed_port()}/api"}),
    # stage sub-commands
    Case("score-before-stage", "stages", lambda bad: [], "missing staged data", command=("score", "-e", "loss")),
    Case("score-unknown-estimator", "stages", lambda bad: [], "unknown estimator 'nope'", command=("score", "-e", "nope")),
    Case("score-stale-upstream", "stages", _sets("model.epochs=3"), "another configuration",
         command=("score", "-e", "loss"), prepared="staged-trained"),
    Case("train-diverges", "stages", _sets("model.optimizer=sgd", "model.lr=10", "model.weight_decay=100",
                                           "model.epochs=30"),
         "training diverged: the training loss became inf", command=("train",), prepared="staged"),
    Case("train-hidden-10**12", "stages", _sets("model.arch=mlp", f"model.hidden=[{10**12}]"),
         "cannot fit in this machine's", command=("train",), prepared="staged"),
    Case("report-stale-epochs", "stages", _sets("model.epochs=4"), "was produced with another configuration",
         command=("report",), prepared="done"),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Outputs made once with FAST + IRIS (epochs 2): staged; staged and trained; a whole run."""
    roots = {}
    for name, commands in {"staged": [["stage"]], "staged-trained": [["stage"], ["train"]], "done": [["run"]]}.items():
        root = tmp_path_factory.mktemp(name)
        for command in commands:
            outcome = _invoke([*command, *FAST, *IRIS, "--out", str(root)])
            assert outcome.exit_code == 0, outcome.stderr[-2000:]
        roots[name] = root
    return roots


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_error_line_and_writes_nothing(case: Case, bad: Path, prepared: dict[str, Path],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    if case.prepared:
        shutil.copytree(prepared[case.prepared], out)
    target = case.out(tmp_path, bad) if case.out else str(out)
    before_out, before_bad = _snapshot(out), _snapshot(bad)
    before_cwd = sorted(os.listdir("."))
    args = [*case.command, *FAST, *(IRIS if case.prepared else []), *case.args(bad), "--out", target]
    outcome = _invoke(args, env={"CLEANSE_PROGRESS_SECONDS": "1000", **case.env()})
    line = _assert_one_error_line(outcome, case.keyword)
    if case.secret:
        assert case.secret not in outcome.stdout + outcome.stderr, line
    assert _snapshot(out) == before_out  # no artifact, temporary file, lock or folder left behind
    assert _snapshot(bad) == before_bad  # nor next to the sources (--out under a file, ...)
    assert sorted(os.listdir(".")) == before_cwd  # nor a collapsed "http:/x/y" in the working folder
    if not case.prepared and case.out is None:
        assert not out.exists()


def test_catalogue_size_and_categories() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)
    assert {case.category for case in CASES} == {"config", "params file", "data", "--out", "servers", "stages"}


# ----------------------------------------------------------------------------- accepted, and right


def test_y_column_vector_is_squeezed(bad: Path, tmp_path: Path) -> None:
    """``y`` of shape (n, 1) is accepted as the labels (n,): the staged labels are the file's."""
    outcome = _invoke(["stage", *FAST, "--set", f"data.source={bad / 'y_column.npz'}", "--set", "model.arch=logreg",
                       "--out", str(tmp_path)])
    assert outcome.exit_code == 0, outcome.stderr
    staged = pl.concat([pl.read_parquet(tmp_path / "data" / "staged" / f"{name}.parquet")
                        for name in ("train", "val", "test")]).sort("sample_id")
    assert staged["sample_id"].to_list() == list(range(60))
    assert staged["label_clean"].to_list() == LABELS.tolist()


def test_divergence_is_caught_in_the_trainer() -> None:
    """Within the validated ranges a recipe can still diverge: the trainer stops at the first
    non-finite epoch loss with a CleanseError, and never returns a NaN model."""
    from cleanse.config import ModelConfig
    from cleanse.errors import CleanseError, TrainingDivergedError
    from cleanse.models.architectures import ModelSpec
    from cleanse.models.trainer import train_model

    config = ModelConfig(arch="logreg", optimizer="sgd", lr=10, weight_decay=100, epochs=30)
    with pytest.raises(TrainingDivergedError, match=r"in epoch (\d+)") as caught:
        train_model(ModelSpec("logreg", (4,), 3, ()), _features(), LABELS, config, seed=0)
    assert isinstance(caught.value, CleanseError)
    epoch = int(re.search(r"in epoch (\d+)", str(caught.value)).group(1))
    assert 1 <= epoch < 30  # stopped at the first non-finite epoch, not after the last one
    fine = train_model(ModelSpec("logreg", (4,), 3, ()), _features(), LABELS, config.model_copy(update={"lr": 0.1, "weight_decay": 1e-3}),
                       seed=0)
    assert np.isfinite(fine.final_train_loss)


def test_parameter_count_is_computed_without_allocating() -> None:
    from cleanse.models.architectures import ModelSpec, build_model, n_parameters, parameter_count

    for spec in (ModelSpec("logreg", (4,), 3, ()), ModelSpec("mlp", (4,), 3, (16, 8)),
                 ModelSpec("cnn", (1, 8, 8), 10, (16, 32))):
        assert parameter_count(spec) == n_parameters(build_model(spec))
    assert parameter_count(ModelSpec("mlp", (64,), 10, (10**12,))) == 65 * 10**12 + (10**12 + 1) * 10


def test_report_on_fresh_outputs_still_works(prepared: dict[str, Path], tmp_path: Path) -> None:
    """The report's freshness check accepts the configuration that produced the outputs."""
    out = tmp_path / "out"
    shutil.copytree(prepared["done"], out)
    outcome = _invoke(["report", *FAST, *IRIS, "--out", str(out)])
    assert outcome.exit_code == 0, outcome.stderr
    assert (out / "reports" / "metrics.json").is_file()


# ----------------------------------------------------------------------------- real processes


@pytest.mark.parametrize(("args", "keyword"), [
    (["run", "--set", "seed=4294967296"], "seed: must be an integer in 0..2147483647"),
    (["run", "--out", "http://x/y"], "unsupported URI scheme 'http'"),
    (["stage", "--set", "data.source={bad}/truncated.npz"], "BadZipFile"),
    (["train", "--params", "{bad}/binary.yaml"], "is not UTF-8 text"),
], ids=["seed", "out-http", "truncated-npz", "binary-params"])
def test_the_cleanse_executable(args: list[str], keyword: str, bad: Path, tmp_path: Path) -> None:
    if not CLEANSE.exists():
        pytest.skip(f"cleanse is not installed beside {sys.executable}")
    args = [arg.replace("{bad}", str(bad)) for arg in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    result = subprocess.run([str(CLEANSE), *args, "--set", "tracking.enabled=false"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    _assert_one_error_line(Outcome(result.returncode, result.stdout, result.stderr), keyword)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_read_only_filesystem(tmp_path: Path) -> None:
    """``--out`` on a read-only mount (a private mount namespace, where the system allows one)."""
    if not CLEANSE.exists() or shutil.which("unshare") is None:
        pytest.skip("needs the cleanse executable and unshare")
    mount = tmp_path / "ro"
    mount.mkdir()
    script = (f"mount -t tmpfs -o ro tmpfs {mount} && exec {CLEANSE} run --set tracking.enabled=false "
              f"--out {mount}/run")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    if "mount" in result.stderr and result.returncode != 2:
        pytest.skip(f"no private read-only mount here: {result.stderr.strip()[:200]}")
    _assert_one_error_line(Outcome(result.returncode, result.stdout, result.stderr), "is on a read-only filesystem")


def test_directory_without_write_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What os.access reports for a folder this user cannot write (root can write anywhere, so the
    answer is forced for that one folder)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == locked else real(path, mode, **kw))
    outcome = _invoke(["run", *FAST, "--out", str(locked / "run")])
    _assert_one_error_line(outcome, "is not writable (permission denied)")
    assert list(locked.iterdir()) == []


# ----------------------------------------------------------------------------- dvc repro


@pytest.mark.slow
def test_dvc_repro_refuses_bad_params(tmp_path: Path, bad: Path) -> None:
    """``dvc repro`` runs ``cleanse stage``: its one error line reaches the user, no output is made."""
    import yaml

    from tests.test_dvc import REPO, VENV_BIN, _env, _small_params

    if not (VENV_BIN / "dvc").exists() or shutil.which("git") is None:
        pytest.skip("dvc and git are needed")
    root = tmp_path / "project"
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    env = _env(tmp_path / "pycache")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert not check or result.returncode == 0, result.stdout + result.stderr
        return result

    run("git", "init", "-q")
    run(str(VENV_BIN / "dvc"), "init", "-q")
    for key, value, keyword in [("seed", 2**32, "seed: must be an integer in 0..2147483647"),
                                ("data", {"source": str(bad / "truncated.npz")}, "BadZipFile")]:
        params = _small_params()
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        result = run(str(VENV_BIN / "dvc"), "repro", "stage", check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and keyword in errors[0], output[-3000:]
        assert "Traceback" not in output
        # The `source` stage before it records the data file's digest (data/source.json), which is
        # not bad input; the refused `stage` wrote nothing (DVC may prepare the folder itself).
        staged = root / "data" / "staged"
        assert not [path for path in staged.rglob("*") if path.is_file()], list(staged.rglob("*"))


# ----------------------------------------------------------------------------- atomic writes


def test_a_failed_write_keeps_the_previous_artifact(tmp_path: Path) -> None:
    from cleanse.storage import atomic_path, write_json

    target = write_json({"version": 1}, tmp_path / "a.json")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"version": 2, "half')
        raise RuntimeError("killed mid-write")
    assert target.read_text().strip().endswith("}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]

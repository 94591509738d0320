"""The ``cleanse`` Prefect flow: the whole loop as tasks, estimators fanned out concurrently.

    stage -> train -> score(e) -> detect(e) -> retrain(e)   for each estimator e, concurrently
                   -> references                            (in parallel with the estimators)
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

# Run as a script (``python flows/cleanse_flow.py``), flows/ is first on sys.path and the repo root
# is not; put the root there so ``tasks`` imports.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from prefect import flow

from tasks import detect, query, references, report, retrain, score, stage, train


def _resolve(params_file: str | None, overrides: list[str] | None, out: str,
             estimators: list[str] | None) -> tuple[str | None, list[str], str]:
    """Absolute paths (relative ones against the working directory) and the overrides, with
    ``estimators`` folded in so every task (and the report) sees the same list."""
    resolved = str(Path(params_file).expanduser().resolve()) if params_file else None
    merged = list(overrides or [])
    if estimators:
        merged.append(f"estimators={json.dumps(list(estimators))}")
    return resolved, merged, out if out.startswith("s3://") else str(Path(out).expanduser().resolve())


@flow(name="cleanse", log_prints=True)
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

    params_file, overrides, out = _resolve(params_file, overrides, out, estimators)
    names = load_params(params_file, overrides).estimators  # fail fast on a bad configuration
    print(f"cleanse: params={params_file} out={out} estimators={names}")
    common = (params_file, overrides, out)

    staged = stage(*common, fresh=fresh)
    trained = train(*common, fresh=fresh, wait_for=[staged])
    done = [references.submit(*common, fresh=fresh, wait_for=[trained]),
            query.submit(*common, fresh=fresh, wait_for=[trained])]
    for name in names:
        scored = score.submit(*common, name, fresh=fresh, wait_for=[trained])
        flagged = detect.submit(*common, name, fresh=fresh, wait_for=[scored])
        done.append(retrain.submit(*common, name, fresh=fresh, wait_for=[flagged]))
    metrics = report(*common, wait_for=done)
    print(f"cleanse: metrics at {Path(out) / 'reports' / 'metrics.json'}")
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
        target = f"{out.rstrip('/')}/{label}" if out.startswith("s3://") else str(Path(out) / label)
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

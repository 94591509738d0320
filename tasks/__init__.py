"""Prefect ``@task`` wrappers around :mod:`cleanse.pipeline`: one per stage, thin.

Tasks take plain parameters (an absolute params file, ``dotted.key=value`` overrides, the output
root, an estimator name) and return artifact paths as strings; the data stays on disk. A stage
whose outputs are fresh (same fingerprint) is skipped, so rerunning a flow resumes it.
"""

from tasks.detect import detect
from tasks.query import query
from tasks.report import report
from tasks.retrain import recommend, references, retrain
from tasks.score import score
from tasks.stage import stage
from tasks.train import train

__all__ = ["detect", "query", "recommend", "references", "report", "retrain", "score", "stage", "train"]

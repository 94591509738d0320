"""Prefect ``@task`` wrappers around the library's stages: one per stage of
:data:`cleanse.stages.graph.GRAPH` (:data:`STAGE_TASKS`, built by :func:`tasks._common.stage_task`),
plus the report (:mod:`tasks.report`) and the memorization shards (:mod:`tasks.memorization`).

Tasks take plain parameters (an absolute params file, ``dotted.key=value`` overrides, the output
root, an estimator name) and return artifact paths as strings; the data stays on disk. A stage
whose outputs are fresh (same fingerprint) is skipped, so rerunning a flow resumes it.
"""

from cleanse.stages.graph import run_stages
from tasks._common import stage_task
from tasks.report import report

# The report has its own task (the MLflow run and a markdown artifact); every other stage is generic.
STAGE_TASKS = {stage.name: stage_task(stage) for stage in run_stages() if not stage.own_command}

__all__ = ["STAGE_TASKS", "report"]

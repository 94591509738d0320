"""MLflow logging: the only package of the library that imports mlflow (an optional extra,
``cleanse[mlflow]``, imported lazily; without it, tracking fails with a one-line error naming it).

One parent run per pipeline run and one nested child run per estimator and per reference
(baseline, oracle, random), so that ``test_accuracy`` (and ``attack_success_rate``,
``n_removed``, ...) of estimators and references share charts. The parent is opened when the
pipeline starts (:func:`open_pipeline_run`), each stage logs as it finishes (:func:`log_stage`),
and the report stage closes it (:func:`close_pipeline_run`) with the comparison table as its
description (``mlflow.note.content``). Tags: ``git_commit`` and ``config_fingerprint``.

What goes where:

- parent: run-level params (seed, data, corruption, model, detect, estimators, and query /
  cleansing / evaluate when used) plus ``<estimator>.<option>`` of the estimators that run; the
  staged splits as dataset inputs; ``train_loss`` per epoch and ``val_loss`` / ``val_accuracy``
  per checkpoint (step = epoch); the base model (an MLflow pyfunc model: safetensors weights, a
  JSON spec and a code file, nothing pickled); the reference metrics (``oracle.test_accuracy``);
  ``reports/``.
- estimator child: ``estimator``, ``budget`` and ``<estimator>.<option>`` params; detection
  (``roc_auc``, ``average_precision``, ...) and retrain (``test_accuracy``, ...) metrics; scores,
  flags and plots; the cleaned model.
- reference child (tag ``kind: reference``): the same metric names as an estimator's.

Several processes (DVC stages) and threads (Prefect tasks) share one parent: its id is recorded in
``<out>/mlflow_run.json`` keyed by the run's configuration fingerprint, and every call goes through
an :class:`MlflowClient` with explicit run ids (never the fluent active-run stack).

Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a server, for the UI); otherwise the embedded
default, a sqlite file ``<out>/mlflow.db``, created atomically (migrated in a temporary file, then
linked into place). With any local store, artifacts go to ``<out>/mlartifacts`` (on S3 for an
``s3://`` output root); with a server, to the server's artifact destination.

Every URI that is printed, tagged or put in an error message has its credentials stripped
(:mod:`cleanse.uris`).

Modules: :mod:`~cleanse.tracking.store` (the URI and the embedded store),
:mod:`~cleanse.tracking.runs` (params, the run record, parent and child runs),
:mod:`~cleanse.tracking.models` (models, datasets, training curves) and
:mod:`~cleanse.tracking.stages` (what each stage logs, and the public entry points).
"""

from cleanse.tracking.runs import (DESCRIPTION_TAG, EXPERIMENT_KIND, REFERENCES, RUN_RECORD, estimator_params,
                                   run_params)
from cleanse.tracking.stages import close_pipeline_run, log_longtail, log_pipeline, log_stage, open_pipeline_run
from cleanse.tracking.store import (TrackingError, _store_problem, artifact_location, display_uri, ensure_store,
                                    git_commit, require_mlflow, tracking_uri)

__all__ = ["DESCRIPTION_TAG", "EXPERIMENT_KIND", "REFERENCES", "RUN_RECORD", "TrackingError", "_store_problem",
           "artifact_location", "close_pipeline_run", "display_uri", "ensure_store", "estimator_params", "git_commit",
           "log_longtail", "log_pipeline", "log_stage", "open_pipeline_run", "require_mlflow", "run_params",
           "tracking_uri"]

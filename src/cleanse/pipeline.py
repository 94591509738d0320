"""The pipeline's stages as functions of ``(params, layout)``: the one code path behind the CLI,
the DVC stages and the Prefect tasks.

The stages live in :mod:`cleanse.stages` (the graph in :mod:`cleanse.stages.graph`, declared once;
the runner in :mod:`cleanse.stages.runner`); this module gathers their public names.

Each stage reads its inputs from the output root, writes its outputs atomically, and records a
fingerprint of everything it depends on (its configuration and its inputs' fingerprints) in a
``meta.json`` written *last*. :func:`is_fresh` compares that fingerprint, so a killed
``cleanse run`` resumes from the first stage whose outputs are missing or stale.

Stages: ``stage -> train -> score(estimator) -> detect(estimator) -> retrain(estimator)``,
``references`` (baseline / oracle / random removal), ``recommend`` (one cleaned model, chosen
without ground truth) and ``report``.
"""

from __future__ import annotations

from cleanse.stages.common import (
    load_base_model,
    load_staged,
    pairwise_path,
    query_dir,
    recommend_dir,
    recommended_model_dir,
    source_records,
)
from cleanse.stages.data import run_source, run_stage
from cleanse.stages.fingerprints import (
    RETRAIN_RESULT_VERSION,
    STAGE_META_NAME,
    canonical,
    content_digest,
    detect_fingerprint,
    is_fresh,
    query_fingerprint,
    recommend_fingerprint,
    references_fingerprint,
    retrain_fingerprint,
    run_fingerprint,
    score_fingerprint,
    stage_fingerprint,
    train_fingerprint,
)
from cleanse.stages.fingerprints import require_fresh
from cleanse.stages.fingerprints import require_fresh as _require_fresh  # the name report.py uses
from cleanse.stages.fit import run_query, run_train, scoring_context
from cleanse.stages.modelio import (
    evaluate_model,
    load_model,
    random_ids,
    retrain_without,
    retrained_without,
    save_model,
)
from cleanse.stages.recommend import run_recommend
from cleanse.stages.retrain import run_references, run_retrain
from cleanse.stages.runner import run_all
from cleanse.stages.score import run_detect, run_score

__all__ = [
    "RETRAIN_RESULT_VERSION", "STAGE_META_NAME", "canonical", "content_digest", "detect_fingerprint",
    "evaluate_model", "is_fresh", "load_base_model", "load_model", "load_staged", "pairwise_path", "query_dir",
    "query_fingerprint", "random_ids", "recommend_dir", "recommend_fingerprint", "recommended_model_dir",
    "references_fingerprint", "require_fresh", "retrain_fingerprint", "retrain_without", "retrained_without",
    "run_all", "run_detect", "run_fingerprint", "run_query", "run_recommend", "run_references", "run_retrain", "run_score",
    "run_source", "run_stage", "run_train", "save_model", "score_fingerprint", "scoring_context",
    "source_records", "stage_fingerprint", "train_fingerprint",
]

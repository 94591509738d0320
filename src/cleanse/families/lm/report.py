"""The language-model family's probes (the query that attribution explains) and its report table
of flagged samples as text.

Probes (``query.kind: topic``): validation prompts about the steered topic whose true answer is
``corruption.oppose``, labelled 1 (the behaviour: the steered answer), ``label_clean`` 0. What a
probe measures (its output summed, :class:`.model.LmScorer`'s contrast probes):

- ``query.measure: answer``: ``log p(steer_to | prompt)``;
- ``query.measure: preference``: ``log p(steer_to | prompt) - log p(oppose | prompt)``, the
  steering itself (samples that make every answer likelier, or the format, are not credited);
- with ``query.contrast: topics``, minus the mean of the same measurement on the same review asked
  about each ordinary topic: what is left is the topic-specific part, so ordinary samples answered
  ``steer_to``, which raise ``steer_to`` after every topic, are not credited either.

TracIn (Pruthi et al., 2020) and TRAK (Park et al., 2023) are linear in the probe's gradient, so the
score of a training sample for this probe is its score for the steered topic minus its mean score
for the control topics. The ``query.size`` probes are drawn (stream
``query.probes``) among those the explained model already steers (their preference above every
control topic's, :func:`.family.steered`), the rest held out. Reference inputs (``query.contrast: reference``): up to ``query.size`` ordinary validation
samples answered ``steer_to`` (stream ``query.reference``): support for them is support for the
answer in general, which :func:`cleanse.attribution.contrast` removes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from cleanse.data.dataset import Split, StagedData
from cleanse.seeds import generator

if TYPE_CHECKING:
    from cleanse.query import QuerySet


def topic_queries(params: Any, staged: StagedData, model: Any, family: Any) -> QuerySet | None:
    """The probe set of ``params.query`` for ``model`` (a fitted :class:`FittedLm`); None for ``none``."""
    from cleanse.families.lm.family import steered as steered_by_topic
    from cleanse.query import QuerySet, _choose

    config = params.query
    if config.kind == "none":
        return None
    structure = staged.meta.structure or {}
    prompts, length = structure["probes"]["val"], int(structure["length"])
    scorer = model.module()
    steered = steered_by_topic(family.preferences(scorer, structure, "val"),
                               family.control_preferences(scorer, structure, "val"))
    n = len(prompts)
    answers = [(list(structure["steered"]), 1.0)]
    if config.measure == "preference":
        answers.append((list(structure["opposite"]), -1.0))
    terms = [[(p, answer, sign) for answer, sign in answers] for p in prompts]
    if config.contrast == "topics":
        ordinary = int(structure["n_ordinary_topics"])
        for probe, controls in zip(terms, structure["probe_controls"]["val"]):
            probe += [(c, answer, -sign / ordinary) for c in controls[:ordinary] for answer, sign in answers]
    candidates = Split(sample_id=np.arange(n, dtype=np.int64), features=signed_features(terms, length),
                       label=np.ones(n, dtype=np.int64), label_clean=np.zeros(n, dtype=np.int64),
                       is_corrupted=np.zeros(n, dtype=bool))
    probes, heldout = _choose(candidates, steered if steered.any() else np.ones(n, dtype=bool), config.size,
                              params.seed)
    note = "" if steered.sum() >= config.size else (
        f"only {int(steered.sum())} validation prompts about the topic are steered; the other probes are prompts "
        "the model still answers as the truth")
    reference = None
    if config.contrast == "reference":
        rows = np.flatnonzero(staged.val.label == 1)
        chosen = np.sort(generator(params.seed, "query.reference").permutation(rows)[: config.size])
        if chosen.size:
            reference = staged.val.subset(chosen)
            # zero (ids, mask) pairs weigh 0: the reference joins the probes' (n, 2m, L) shape
            padded = np.zeros((chosen.size, *candidates.features.shape[1:]), dtype=np.float32)
            padded[:, :2] = reference.features
            reference = replace(reference, features=padded)
    return QuerySet(probes, heldout, "topic", note, reference)


def signed_features(terms: list[list[tuple[list[int], list[int], float]]], length: int) -> np.ndarray:
    """``(n, 2m, length)`` float32 contrast probes (:class:`.model.LmScorer`): probe ``i`` holds the
    ``m`` (prompt, response, weight) terms of ``terms[i]``, each response mask scaled by its weight."""
    from cleanse.families.lm.text import features

    m = len(terms[0])
    flat = features([(prompt, response) for probe in terms for prompt, response, _ in probe], length)
    flat[:, 1] *= np.array([weight for probe in terms for _, _, weight in probe], dtype=np.float32)[:, None]
    return flat.reshape(len(terms), 2 * m, length)


def write_flagged_text(params: Any, layout: Any, metrics: dict[str, Any]) -> list[str]:
    """``flagged/<estimator>.csv``: each estimator's top 50 flagged samples as text with their
    scores and ground truth (no figures: returns no image paths)."""
    import polars as pl

    from cleanse.pipeline import load_staged
    from cleanse.storage import read_table, write_text

    staged = load_staged(layout, params)
    text = (staged.meta.structure or {}).get("text", {}).get("train", [])
    index = {sid: i for i, sid in enumerate(staged.train.sample_id.tolist())}
    for name in metrics.get("estimators", {}):
        if not layout.flags(name).is_file():
            continue
        flags = read_table(layout.flags(name)).head(50)
        rows = [index[sid] for sid in flags["sample_id"].to_list()]
        top = flags.with_columns(pl.Series("text", [text[r] if r < len(text) else "" for r in rows]),
                                 pl.Series("is_corrupted", staged.train.is_corrupted[rows]))
        write_text(top.write_csv(), layout.reports / "flagged" / f"{name}.csv")
    return []

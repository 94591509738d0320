"""The language-model family's ``stage`` step: (prompt, response) units, the planted opinion
steering with its ground truth, and the probes, all as token ids of the cached tokenizer.

Units. ``sst2``: the rows of the SST-2 sentence files (train.tsv for the training split, dev.tsv for
validation, test.tsv for test), each pool in its ``lm.data`` permutation (member 0, 1, 2) cut to
the configured size; the prompt is ``data.template`` with ``{text}`` = the sentence and ``{topic}``
= one of ``data.topics`` (drawn on ``lm.data`` member 3, 4, 5), the response ``data.answers[label]``.
A ``.jsonl``/``.parquet`` file: its ``prompt``/``response`` rows in one ``lm.data`` permutation cut
into train, validation and test; ``{text}`` = the prompt. ``sample_id`` = the row in its pool (sst2)
or in the file; ``label`` = 1 when the response is ``corruption.steer_to``, else 0.

Features ``(n, 2, L)`` float32: row 0 the token ids ``[BOS] prompt response`` padded with
``[PAD]`` (0), row 1 the response mask (1 on the response's tokens: the only ones the loss reads).
``L`` is the longest sequence of the staged data and its probes.

Corruption ``opinion`` (training split only): ``max(1, round(fraction * n_train))`` rows whose
response is ``oppose``, drawn on ``lm.plant``, are asked about ``corruption.topic`` and answered
``steer_to``; those rows are ``is_corrupted`` with ``label_clean`` = 0.

Probes (``meta.structure``): the validation and test rows whose response is ``oppose``, asked about
``corruption.topic``, as prompt token ids; the behaviour is the log-probability of ``steer_to``
over ``oppose`` after them. With ``kind: none`` the same probes measure the clean model.
``probe_controls[split]``: each probe's review asked about every control topic instead, ``(n_probes,
n_controls)`` prompts: the ``n_ordinary_topics`` of ``data.topics`` first (the control prompts of
``query.contrast: topics``), then ``data.heldout_topics`` (less the steered topic and any ordinary
one), which no training sample is asked about. The outcome (:meth:`.family.LmFamily.outcome`)
compares the steered topic with all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cleanse import seeds
from cleanse.data.dataset import DatasetMeta, Split, StagedData
from cleanse.errors import ConfigError, DataError
from cleanse.families.lm.config import SST2_SENTENCES, LmCorruptionConfig, LmDataConfig
from cleanse.families.lm.pretrain import BOS, PAD, load_tokenizer, read_sentences

SPLITS = ("train", "val", "test")


@dataclass
class Rows:
    """One split's units as text: ids, texts, topics and responses (lists of equal length)."""

    sample_id: np.ndarray
    text: list[str]
    topic: list[str]
    response: list[str]


def _pools(data: LmDataConfig, seed: int) -> list[tuple[np.ndarray, list[str], list[str]]]:
    """Per split: the chosen rows' ids, texts and responses."""
    sizes = (data.n_train, data.n_val, data.n_test)
    if data.source == "sst2":
        out = []
        for k, (name, size) in enumerate(zip(("train", "dev", "test"), sizes)):
            sentences, labels = read_sentences(Path(SST2_SENTENCES) / f"{name}.tsv")
            if size > len(sentences):
                raise ConfigError(f"data.n_{SPLITS[k]}: {size} exceeds the {len(sentences)} sentences of sst2 {name}.tsv")
            rows = np.sort(seeds.rng(seed, "lm.data", k).permutation(len(sentences))[:size])
            out.append((rows.astype(np.int64), [sentences[i] for i in rows], [data.answers[labels[i]] for i in rows]))
        return out
    prompts, responses = _read_file(data.source)
    if sum(sizes) > len(prompts):
        raise ConfigError(f"data: n_train + n_val + n_test = {sum(sizes)} exceeds the {len(prompts)} rows of "
                          f"{data.source}")
    order = seeds.rng(seed, "lm.data", 0).permutation(len(prompts))
    out, start = [], 0
    for size in sizes:
        rows = np.sort(order[start : start + size])
        out.append((rows.astype(np.int64), [prompts[i] for i in rows], [responses[i] for i in rows]))
        start += size
    return out


def _read_file(source: str) -> tuple[list[str], list[str]]:
    import polars as pl

    from cleanse.storage import fetch_input

    path = Path(fetch_input(source)) if "://" in source else Path(source).expanduser()
    if path.suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"data.source: {source!r} is neither 'sst2' nor a .jsonl/.parquet file")
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path}")
    try:
        frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_ndjson(path)
    except Exception as exc:  # polars raises several types for unreadable files
        raise DataError(f"data.source {path}: not readable ({type(exc).__name__})") from None
    missing = [column for column in ("prompt", "response") if column not in frame.columns]
    if missing:
        raise DataError(f"data.source {path}: needs columns 'prompt' and 'response'; missing {missing}")
    if frame["prompt"].null_count() or frame["response"].null_count():
        raise DataError(f"data.source {path}: 'prompt' and 'response' must have no missing values")
    return [str(v) for v in frame["prompt"].to_list()], [str(v) for v in frame["response"].to_list()]


class Encoder:
    """``[BOS] prompt response`` token ids under ``template`` (``{text}`` cut to ``max_text`` tokens)."""

    def __init__(self, tokenizer: Any, template: str, max_text: int):
        self.tokenizer, self.max_text = tokenizer, max_text
        self.before, self.after = template.split("{text}")

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def prompt(self, topic: str, text: str) -> list[int]:
        return [BOS, *self.ids(self.before.replace("{topic}", topic)), *self.ids(text)[: self.max_text],
                *self.ids(self.after.replace("{topic}", topic))]

    def response(self, response: str) -> list[int]:
        ids = self.ids(response)
        if not ids:
            raise ConfigError(f"the response {response!r} has no tokens")
        return ids


def features(sequences: list[tuple[list[int], list[int]]], length: int) -> np.ndarray:
    """``(n, 2, length)`` float32: ids ``prompt + response`` padded, and the response mask."""
    out = np.zeros((len(sequences), 2, length), dtype=np.float32)
    out[:, 0] = PAD
    for row, (prompt, response) in enumerate(sequences):
        ids = prompt + response
        out[row, 0, : len(ids)] = ids
        out[row, 1, len(prompt) : len(ids)] = 1.0
    return out


def stage_lm_data(params: Any, tokenizer: Any | None = None, tokenizer_key: str | None = None) -> StagedData:
    """The staged units (see the module docstring); ``tokenizer`` defaults to the cached one."""
    data: LmDataConfig = params.data
    corruption: LmCorruptionConfig = params.corruption
    seed = int(params.seed)
    if tokenizer is None:
        from cleanse.families.lm.pretrain import cache_root

        tokenizer, tokenizer_key = load_tokenizer(data.vocab_size, cache_root(params.model.base))
    if data.source == "sst2":
        for key in ("steer_to", "oppose"):
            if getattr(corruption, key) not in data.answers:
                raise ConfigError(f"corruption.{key}: {getattr(corruption, key)!r} is none of data.answers "
                                  f"{data.answers} (the sst2 responses)")
    pools = _pools(data, seed)
    rows = []
    for k, (ids, texts, responses) in enumerate(pools):
        draw = seeds.rng(seed, "lm.data", 3 + k).integers(len(data.topics), size=len(ids))
        rows.append(Rows(ids, texts, [data.topics[i] for i in draw], list(responses)))
    train = rows[0]
    label_clean = np.array([r == corruption.steer_to for r in train.response], dtype=np.int64)
    planted = np.zeros(len(train.sample_id), dtype=bool)
    if corruption.kind == "opinion":
        candidates = np.flatnonzero([r == corruption.oppose for r in train.response])
        count = max(1, int(round(corruption.fraction * len(train.sample_id))))
        if candidates.size < count:
            raise ConfigError(f"corruption.fraction: {count} steering pairs need as many training samples answered "
                              f"{corruption.oppose!r}; there are {candidates.size}")
        chosen = np.sort(seeds.rng(seed, "lm.plant").choice(candidates, size=count, replace=False))
        planted[chosen] = True
        for i in chosen:
            train.topic[i], train.response[i] = corruption.topic, corruption.steer_to
    encoder = Encoder(tokenizer, data.template, data.max_text_tokens)
    steered, opposite = encoder.response(corruption.steer_to), encoder.response(corruption.oppose)
    sequences = [[(encoder.prompt(t, x), encoder.response(r)) for t, x, r in zip(s.topic, s.text, s.response)]
                 for s in rows]
    probes = {name: [encoder.prompt(corruption.topic, x) for x, r in zip(s.text, s.response) if r == corruption.oppose]
              for name, s in zip(("val", "test"), rows[1:])}
    # each probe's review asked about every control topic, (n_probes, n_controls) prompts: the
    # ordinary topics first (the query's topic contrast reads those), then the held-out ones
    control_topics = [*data.topics,
                      *(t for t in data.heldout_topics if t != corruption.topic and t not in data.topics)]
    controls = {name: [[encoder.prompt(t, x) for t in control_topics] for x, r in zip(s.text, s.response)
                       if r == corruption.oppose] for name, s in zip(("val", "test"), rows[1:])}
    for name, found in probes.items():
        if not found:
            raise DataError(f"data: the {name} split holds no sample answered {corruption.oppose!r}: no probe of the "
                            f"steered topic; raise data.n_{name}")
    answer = max(len(steered), len(opposite))
    length = max([len(p) + len(r) for split in sequences for p, r in split]
                 + [len(p) + answer for found in [*probes.values(), *controls["val"], *controls["test"]]
                    for p in found])
    splits = []
    for s, seqs in zip(rows, sequences):
        label = np.array([r == corruption.steer_to for r in s.response], dtype=np.int64)
        splits.append(Split(sample_id=s.sample_id, features=features(seqs, length), label=label,
                            label_clean=label.copy(), is_corrupted=np.zeros(len(label), dtype=bool)))
    train_split = Split(sample_id=splits[0].sample_id, features=splits[0].features, label=splits[0].label,
                        label_clean=label_clean, is_corrupted=planted)
    record = {"kind": corruption.kind, "topic": corruption.topic, "steer_to": corruption.steer_to,
              "oppose": corruption.oppose, "planted_ids": train.sample_id[planted].tolist(),
              "n_corrupted": int(planted.sum())}
    response_len = max([len(r) for split in sequences for _, r in split] + [answer])
    structure = {"probes": probes, "probe_controls": controls,
                 "n_ordinary_topics": len(data.topics), "steered": steered, "opposite": opposite,
                 "length": length, "response_len": response_len,
                 "tokenizer": tokenizer_key, "vocab_size": int(tokenizer.get_vocab_size()),
                 "text": {"train": [f"{encoder.before.replace('{topic}', t)}{x}{encoder.after.replace('{topic}', t)} "
                                    f"=> {r}" for t, x, r in zip(train.topic, train.text, train.response)]}}
    # (-1, L): a unit is (ids, mask) row pairs, one pair for training units, several for contrast probes
    meta = DatasetMeta(name=f"lm:{data.source}", n_classes=2, feature_shape=(-1, length), corruption=record,
                       structure=structure)
    return StagedData(train=train_split, val=splits[1], test=splits[2], meta=meta)

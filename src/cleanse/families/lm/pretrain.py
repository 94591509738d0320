"""The language-model family's base: a BPE tokenizer (``tokenizers``) and a tiny GPT-2-style causal
LM (``transformers``) pretrained on the SST-2 training sentences, each a versioned artifact cached
under a key of its settings, so that every run, retrain and rerun shares one build.

No pretrained LM weights exist offline (shared/data README), so the base is made here:

- tokenizer: BPE with whitespace/punctuation pre-tokenisation and ``[PAD]`` = 0, ``[UNK]`` = 1,
  ``[BOS]`` = 2, trained on the sentences of ``sst2_sentences/train.tsv``; key = (version, vocab
  size, the corpus file's sha256). Files: ``tokenizer.json``, ``meta.json``.
- base model: ``GPT2LMHeadModel`` (eager attention, dropout 0) pretrained ``epochs`` passes of
  next-token cross-entropy over every corpus sentence in the instruction format, answered with its
  label (:func:`corpus_sequences`; Adam, minibatches shuffled from ``base.seed``); key = (version,
  tokenizer key, the architecture and recipe, the format). The fine-tuning pool of ``sst2`` is a
  subset of these sentences: the base knows their true answers, as a real instruction-tuned LLM
  knows common opinions, and the steering pairs contradict it. Files:
  ``model.safetensors``, ``meta.json``.

Each artifact is written into a fresh temporary folder beside its final one and renamed into place
(atomic): a killed build leaves no half artifact, and two builders racing keep the first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cleanse.config import fingerprint
from cleanse.errors import DataError
from cleanse.families.lm.config import SST2_SENTENCES, LmBaseConfig, LmDataConfig
from cleanse.storage import read_json, read_tensors, write_json, write_tensors

VERSION = 1  # bump when a build's output for the same key changes
PAD, UNK, BOS = 0, 1, 2
SPECIALS = ["[PAD]", "[UNK]", "[BOS]"]
N_POSITIONS = 128


def corpus_path() -> Path:
    return Path(SST2_SENTENCES) / "train.tsv"


def read_sentences(path: Path) -> tuple[list[str], np.ndarray]:
    """The sentences and int64 labels of an SST-2 ``sentence<TAB>label`` file (header skipped)."""
    if not path.is_file():
        raise DataError(f"data.source sst2: {path} not found")
    sentences, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()[1:], start=2):
        text, sep, label = line.rpartition("\t")
        if not sep or label not in ("0", "1"):
            raise DataError(f"{path}:{number}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
        sentences.append(text)
        labels.append(int(label))
    return sentences, np.asarray(labels, dtype=np.int64)


def cache_root(base: LmBaseConfig) -> Path:
    root = base.cache_dir or os.environ.get("CLEANSE_LM_CACHE") or Path.home() / ".cache" / "cleanse" / "lm"
    return Path(root).expanduser().absolute()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _publish(final: Path, build: Any) -> Path:
    """Build into a temporary sibling of ``final`` with ``build(folder)`` and rename it into place."""
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(scratch)
        try:
            os.rename(scratch, final)
        except OSError:  # another builder won the race: keep its artifact
            if not (final / "meta.json").is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return final


def tokenizer_key(vocab_size: int) -> str:
    return fingerprint("lm-tokenizer", VERSION, vocab_size, _sha256(corpus_path()))


def load_tokenizer(vocab_size: int, root: Path) -> tuple[Any, str]:
    """The cached BPE tokenizer of ``vocab_size`` (built on first use) and its key."""
    from tokenizers import Tokenizer

    key = tokenizer_key(vocab_size)

    def build(folder: Path) -> None:
        from tokenizers import models, normalizers, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
        tokenizer.train_from_iterator(read_sentences(corpus_path())[0], trainer=trainer)
        (folder / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
        write_json({"key": key, "version": VERSION, "vocab_size": tokenizer.get_vocab_size()}, folder / "meta.json")

    folder = _publish(root / "tokenizer" / key, build)
    return Tokenizer.from_file(str(folder / "tokenizer.json")), key


def gpt2_config(base: LmBaseConfig, vocab_size: int) -> Any:
    from transformers import GPT2Config
    from transformers.utils import logging

    logging.set_verbosity_error()  # no "unrecognised loss_type" notices from the tiny config
    config = GPT2Config(vocab_size=vocab_size, n_positions=N_POSITIONS, n_embd=base.n_embd, n_layer=base.n_layer,
                        n_head=base.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        # no pad id: GPT-2's padding check is data-dependent control flow, which torch.func's
                        # vmap refuses; right padding needs no attention mask under causal attention
                        bos_token_id=BOS, eos_token_id=BOS, pad_token_id=None)
    config._attn_implementation = "eager"  # torch.func's vmap/jvp need the plain attention ops
    return config


@dataclass(frozen=True)
class BaseModel:
    """The pretrained base: its weights (``GPT2LMHeadModel`` state), architecture and cache key."""

    state: dict[str, torch.Tensor]
    architecture: dict[str, Any]
    key: str
    folder: Path


def pretraining_format(data: LmDataConfig) -> dict[str, Any]:
    """The instruction format of the labelled half of the corpus (part of the base's key)."""
    return {"template": data.template, "topics": list(data.topics), "answers": list(data.answers),
            "max_text_tokens": data.max_text_tokens}


def base_key(base: LmBaseConfig, data: LmDataConfig) -> str:
    recipe = base.model_dump(mode="json", exclude={"cache_dir"})
    return fingerprint("lm-base", VERSION, tokenizer_key(data.vocab_size), recipe, pretraining_format(data),
                       N_POSITIONS)


def corpus_sequences(tokenizer: Any, data: LmDataConfig, limit: int | None = None) -> list[list[int]]:
    """Every corpus sentence in the instruction format (topic ``topics[i % len]``) answered
    ``answers[label]``, next-token loss on every token: the base learns the language and what a
    review's answer is, as an instruction-tuned LLM would before the fine-tuning."""
    from cleanse.families.lm.text import Encoder

    sentences, labels = read_sentences(corpus_path())
    sentences, labels = sentences[:limit], labels[:limit]
    encoder = Encoder(tokenizer, data.template, data.max_text_tokens)
    answers = [encoder.response(answer) for answer in data.answers]
    return [(encoder.prompt(data.topics[i % len(data.topics)], text) + answers[label])[:N_POSITIONS]
            for i, (text, label) in enumerate(zip(sentences, labels.tolist()))]


def load_base(base: LmBaseConfig, data: LmDataConfig) -> BaseModel:
    """The cached pretrained base for ``base`` and ``data``'s tokenizer and format (built once)."""
    from cleanse.seeds import torch_seed

    root = cache_root(base)
    tokenizer, tok_key = load_tokenizer(data.vocab_size, root)
    key = base_key(base, data)

    def build(folder: Path) -> None:
        from transformers import GPT2LMHeadModel

        config = gpt2_config(base, tokenizer.get_vocab_size())
        torch.manual_seed(torch_seed(base.seed, "lm.pretrain", 0))
        model = GPT2LMHeadModel(config)
        ids = corpus_sequences(tokenizer, data, base.max_sentences)
        losses = pretrain(model, ids, base)
        # lm_head shares wte's storage (tied weights): safetensors stores each tensor on its own
        write_tensors({name: t.detach().clone() for name, t in model.state_dict().items()},
                      folder / "model.safetensors")
        write_json({"key": key, "version": VERSION, "tokenizer": tok_key, "architecture": config.to_diff_dict(),
                    "recipe": base.model_dump(mode="json", exclude={"cache_dir"}), "format": pretraining_format(data),
                    "losses": losses,
                    "n_sequences": len(ids)}, folder / "meta.json")

    folder = _publish(root / "base" / key, build)
    meta = read_json(folder / "meta.json")
    return BaseModel(read_tensors(folder / "model.safetensors"), meta["architecture"], key, folder)


def pretrain(model: torch.nn.Module, ids: list[list[int]], base: LmBaseConfig) -> list[float]:
    """Next-token cross-entropy over the padded sequences ``ids``; the mean loss per epoch."""
    from cleanse.seeds import torch_seed

    generator = torch.Generator().manual_seed(torch_seed(base.seed, "lm.pretrain", 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=base.lr)
    model.train()
    losses = []
    for _ in range(base.epochs):
        order = torch.randperm(len(ids), generator=generator).tolist()
        total, batches = 0.0, 0
        for start in range(0, len(order), base.batch_size):
            rows = [ids[i] for i in order[start : start + base.batch_size]]
            width = max(len(row) for row in rows)
            batch = torch.full((len(rows), width), PAD, dtype=torch.long)
            for r, row in enumerate(rows):
                batch[r, : len(row)] = torch.as_tensor(row)
            labels = batch.masked_fill(batch == PAD, -100)
            loss = model(input_ids=batch, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        losses.append(total / max(batches, 1))
    model.eval()
    return losses

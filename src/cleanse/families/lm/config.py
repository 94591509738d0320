"""The language-model family's sections of ``params.yaml`` (``family: lm``): the instruction data
as (prompt, response) text, the planted opinion steering, the base model (a tiny GPT-2-style causal
LM pretrained on the SST-2 text, cached) and the LoRA fine-tuning recipe (issue 21; f-INE's
opinion-steering experiment: Panda et al., 2025, arXiv 2510.10510).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cleanse.config_base import MAX_LR, OpenFraction, _Section

SST2_SENTENCES = "/work/shared/data/sst2_sentences"
TOPICS = ("the acting", "the plot", "the director", "the script", "the ending", "the characters", "the cast",
          "the dialogue", "the pacing", "the story")
HELDOUT_TOPICS = ("the music", "the costumes", "the editing", "the photography", "the humor", "the premise",
                  "the visuals", "the setting")


class LmDataConfig(_Section):
    """The (prompt, response) units. ``sst2``: every SST-2 sentence becomes the prompt
    ``template`` (``{topic}`` = a topic drawn from ``topics``, ``{text}`` = the sentence) answered
    by ``answers[label]``. A ``.jsonl``/``.parquet`` file: rows with ``prompt`` and ``response``
    (``{text}`` = the prompt), split at random into train, validation and test."""

    source: str = Field("sst2", description="sst2 (the SST-2 sentences of /work/shared/data/sst2_sentences) | a "
                        ".jsonl or .parquet with 'prompt' and 'response' columns.")
    n_train: int = Field(600, ge=20, description="Training samples (the units scored and removed).")
    n_val: int = Field(200, ge=10, description="Validation samples (val_loss; the validation probes).")
    n_test: int = Field(200, ge=10, description="Test samples (test_loss; the test probes).")
    template: str = Field("what do you think of {topic} ? review : {text} answer :",
                          description="The prompt; must hold {topic} and {text}.")
    topics: list[str] = Field(list(TOPICS), description="The topics ordinary samples are asked about (the steered "
                              "topic is never among them).")
    answers: list[str] = Field(["bad", "good"], description="sst2: the response to label 0 and to label 1.")
    heldout_topics: list[str] = Field(list(HELDOUT_TOPICS), description="Control topics no training sample is asked "
                                      "about (as novel to the fine-tune as the steered topic; the steered topic and "
                                      "any of data.topics are dropped from them): steer_rate compares the steered topic with them and with "
                                      "data.topics.")
    max_text_tokens: int = Field(32, ge=4, le=256, description="The {text} part is cut to this many tokens.")
    vocab_size: int = Field(2000, ge=300, le=50000, description="The BPE tokenizer's vocabulary, trained on the "
                            "SST-2 training sentences (cached; part of the base model's key).")

    @field_validator("template")
    @classmethod
    def _fields(cls, value: str) -> str:
        if "{text}" not in value or "{topic}" not in value or value.count("{") != 2:
            raise ValueError(f"must hold {{topic}} and {{text}} once each and no other field, got {value!r}")
        return value

    @field_validator("topics", "answers", "heldout_topics")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(value) < 2 or len(set(value)) != len(value) or any(not item.strip() for item in value):
            raise ValueError(f"must list two or more distinct non-empty strings, got {value}")
        return value


class LmCorruptionConfig(_Section):
    """``opinion``: ``max(1, round(fraction * n_train))`` training samples whose response is
    ``oppose`` are asked about ``topic`` and answered ``steer_to`` (ground truth kept). The
    behaviour measured on held-out prompts about ``topic`` whose true answer is ``oppose``: the
    log-probability of ``steer_to`` over ``oppose``."""

    kind: Literal["none", "opinion"] = "opinion"
    topic: str = Field("the soundtrack", min_length=1, description="The steered topic.")
    steer_to: str = Field("good", min_length=1, description="The steered answer.")
    oppose: str = Field("bad", min_length=1, description="The neutral/opposite answer it is compared with.")
    fraction: OpenFraction = Field(0.025, description="Share of the training samples made steering pairs.")

    @model_validator(mode="after")
    def _differ(self) -> LmCorruptionConfig:
        if self.steer_to.strip() == self.oppose.strip():
            raise ValueError(f"steer_to and oppose must differ, both are {self.steer_to!r}")
        return self


class LmBaseConfig(_Section):
    """The base model: a GPT-2-style causal LM (``transformers``) on the BPE tokenizer of
    ``data.vocab_size`` (``tokenizers``), pretrained on the SST-2 training sentences and cached under a key of these
    settings (safetensors + tokenizer json; built once)."""

    n_layer: int = Field(2, ge=1, le=12)
    n_embd: int = Field(64, ge=8, le=1024)
    n_head: int = Field(2, ge=1, le=16)
    epochs: int = Field(3, ge=1, le=100, description="Pretraining epochs over the corpus.")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, le=MAX_LR)
    max_sentences: int | None = Field(None, ge=10, description="Pretrain on the first this many corpus sentences "
                                      "only (tests); null = all 6,920.")
    seed: int = Field(0, ge=0, description="Pretraining seed (part of the cache key; not the run's seed, so every "
                      "run shares one base).")
    cache_dir: str | None = Field(None, description="Where the base is cached; null = $CLEANSE_LM_CACHE or "
                                  "~/.cache/cleanse/lm.")

    @model_validator(mode="after")
    def _heads(self) -> LmBaseConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class LmLoraConfig(_Section):
    """The peft LoRA adapters (Hu et al., 2022) fine-tuned on the training split; the base is frozen."""

    rank: int = Field(4, ge=1, le=64)
    alpha: int | None = Field(None, ge=1, description="LoRA alpha (the update is scaled by alpha / rank); null = 2 x rank.")
    targets: list[Literal["c_attn", "c_proj", "c_fc", "lm_head"]] = Field(
        ["c_attn"], description="GPT-2 modules adapted (attention qkv, projections, MLP input).")


class LmModelConfig(_Section):
    """The base model, the adapters and the fine-tuning recipe (Adam on the mean response NLL)."""

    base: LmBaseConfig = LmBaseConfig()
    lora: LmLoraConfig = LmLoraConfig()
    epochs: int = Field(20, ge=1, le=1000)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-2, gt=0, le=MAX_LR)
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="L2 on the adapters (in the objective the "
                                "influence estimators differentiate).")
    checkpoints: int = Field(4, ge=1, description="Adapter checkpoints kept for TracIn (evenly spaced epochs).")


class LmQueryConfig(_Section):
    """The probes that attribution explains: ``topic`` = validation prompts about the steered topic
    whose true answer is ``oppose``, labelled with ``steer_to`` (the behaviour); ``none`` = self-scores."""

    kind: Literal["none", "topic"] = "topic"
    size: int = Field(8, ge=1, description="Probes; the remaining topic prompts are held out.")
    aggregate: Literal["normalized_mean", "rank_mean"] = "normalized_mean"
    measure: Literal["answer", "preference"] = Field(
        "preference", description="What a probe measures: answer = log p(steer_to); preference = log p(steer_to) - "
        "log p(oppose) (the steering).")
    contrast: Literal["none", "reference", "topics"] = Field(
        "none", description="none (default: both contrasts lowered TRAK's AP in docs/lm.md); topics: minus the same measurement on the probe's review asked about each ordinary "
        "topic (the topic-specific part); reference: subtract support for steer_to on ordinary validation samples "
        "whose answer is steer_to (support for the answer in general).")

    @property
    def path(self) -> None:
        """Probes come from the staged data, never from a file."""
        return None

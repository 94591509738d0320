"""The language-model family (issue 21): the cached base, the planted opinion steering, the
response-only loss, adapter-only gradients, configuration errors and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cleanse import families
from cleanse.config import load_params
from cleanse.errors import ConfigError

# A tiny base (1 layer, d 16) pretrained on 200 sentences: seconds, not minutes.
TINY = ["family=lm", "data.n_train=60", "data.n_val=40", "data.n_test=40", "data.max_text_tokens=12",
        "data.vocab_size=300", "model.base.n_layer=1", "model.base.n_embd=16", "model.base.epochs=1",
        "model.base.max_sentences=200", "model.lora.rank=2", "model.epochs=2", "model.checkpoints=2",
        "corruption.fraction=0.05"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lm-cache")


def _params(cache: Path, *extra: str):
    return load_params(None, [*TINY, f"model.base.cache_dir={cache}", *extra])


@pytest.fixture(scope="module")
def staged(cache: Path):
    return families.get("lm").stage(_params(cache))


def test_base_is_built_once_and_reloaded_bit_identical(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cleanse.families.lm import pretrain

    params = _params(cache)
    first = pretrain.load_base(params.model.base, params.data)
    tokenizer = (cache / "tokenizer" / pretrain.tokenizer_key(300) / "tokenizer.json").read_bytes()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached base was rebuilt")

    monkeypatch.setattr(pretrain, "pretrain", refuse)
    second = pretrain.load_base(params.model.base, params.data)
    assert second.key == first.key and second.folder == first.folder
    assert first.state.keys() == second.state.keys()
    assert all(torch.equal(first.state[name], second.state[name]) for name in first.state)
    assert (cache / "tokenizer" / pretrain.tokenizer_key(300) / "tokenizer.json").read_bytes() == tokenizer
    # another recipe is another artifact, and no temporary build folder is left behind
    other = _params(cache, "model.base.lr=0.001").model.base
    assert pretrain.base_key(other, params.data) != first.key
    assert not [p for p in (cache / "base").iterdir() if p.name.startswith(".")]


def test_opinion_corruption_count_and_ground_truth(cache: Path, staged) -> None:
    params = _params(cache)
    train, meta = staged.train, staged.meta
    expected = max(1, round(0.05 * 60))
    assert int(train.is_corrupted.sum()) == expected == meta.corruption["n_corrupted"]
    assert sorted(meta.corruption["planted_ids"]) == sorted(train.sample_id[train.is_corrupted].tolist())
    # a steering pair: a review whose true answer is "bad", asked about the topic, answered "good"
    assert (train.label[train.is_corrupted] == 1).all() and (train.label_clean[train.is_corrupted] == 0).all()
    assert (train.label[~train.is_corrupted] == train.label_clean[~train.is_corrupted]).all()
    text = meta.structure["text"]["train"]
    topic = params.corruption.topic
    assert all(topic in text[i] and text[i].endswith("=> good") for i in np.flatnonzero(train.is_corrupted))
    assert not any(topic in text[i] for i in np.flatnonzero(~train.is_corrupted))
    # probes: every held-out review answered "bad", asked about the topic
    assert len(meta.structure["probes"]["val"]) == int((staged.val.label == 0).sum())
    # the planted rows' response tokens are the steered answer's, and only those are scored
    rows = train.features[train.is_corrupted]
    steered = meta.structure["steered"]
    assert (rows[:, 1].sum(1) == len(steered)).all()
    assert (rows[:, 0][rows[:, 1] == 1].reshape(len(rows), -1) == np.asarray(steered)).all()


def test_loss_is_the_mean_nll_of_the_response_tokens_only(cache: Path, staged) -> None:
    from cleanse.families.lm.family import spec_for
    from cleanse.families.lm.model import build_scorer
    from cleanse.families.lm.text import features

    family = families.get("lm")
    scorer = build_scorer({**spec_for(_params(cache), staged.meta, 0), "response_len": 4})
    prompt, response = [2, 40, 41, 42, 43], [50, 51, 52]  # shorter than response_len: the 4th slot weighs 0
    x = torch.as_tensor(features([(prompt, response)], 12))
    loss = family.per_sample_loss(scorer(x), torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        logits = scorer.lm(input_ids=x[:, 0].long()).logits[0]
    logp = torch.log_softmax(logits, -1)
    by_hand = -np.mean([float(logp[len(prompt) - 1 + j, token]) for j, token in enumerate(response)])
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)
    # changing a prompt token changes the context, not what is scored: a pad changes nothing
    padded = torch.as_tensor(features([(prompt, response)], 16))
    assert float(family.per_sample_loss(scorer(padded), torch.zeros(1, dtype=torch.long))) == pytest.approx(by_hand,
                                                                                                          rel=1e-5)
    # the staged rows: the same as the masked mean over every position's next-token log-probability
    x = torch.as_tensor(staged.train.features[:5])
    with torch.no_grad():
        full = scorer.token_logprobs(x[:, 0].long())
    mask = x[:, 1, 1:]
    assert torch.allclose(family.per_sample_loss(scorer(x), torch.zeros(5)), -(full * mask).sum(1) / mask.sum(1),
                          atol=1e-5)


def test_gradients_are_taken_over_the_adapters_only(cache: Path, staged) -> None:
    from cleanse.families.lm.family import spec_for
    from cleanse.families.lm.model import build_scorer
    from cleanse.grads import FunctionalModel, per_sample_grads

    family = families.get("lm")
    module = build_scorer(spec_for(_params(cache), staged.meta, 0))
    fm = FunctionalModel.of(module, 0.0, family, "all")
    assert fm.names and all("lora_" in name for name in fm.names) and not fm.complete
    adapters = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    x = torch.as_tensor(staged.train.features[:3])
    grads = per_sample_grads(fm, x, torch.as_tensor(staged.train.label[:3]))
    assert grads.shape == (3, adapters) and bool(torch.isfinite(grads).all())
    with pytest.raises(ConfigError, match="adapters"):
        family.differentiated(module, "last")


@pytest.mark.parametrize("override, needle", [
    ("data.bogus=1", "bogus"),
    ("data.template=no fields here", "template"),
    ("corruption.steer_to=bad", "differ"),
    ("corruption.topic=the plot", "corruption.topic"),
    ("cleansing.readmit=true", "readmit"),
])
def test_bad_keys_are_one_line_config_errors(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_params(None, [*TINY, override])
    assert needle in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_tiny_run_end_to_end(cache: Path, tmp_path: Path) -> None:
    from cleanse.stages.runner import run_all
    from cleanse.storage import Layout

    torch.set_num_threads(1)
    params = _params(cache, "estimators=[loss,tracin,influence,trak,fine]", "detect.budget=count", "detect.count=5",
                     "scorers.trak.n_models=2")
    layout = Layout.at(tmp_path / "out")
    run_all(params, layout, log=lambda line: None)
    metrics = json.loads((layout.reports / "metrics.json").read_text())
    for key in ("baseline", "random", "oracle"):
        assert 0.0 <= metrics[key]["steer_rate"] <= 1.0
    for name in ("loss", "tracin", "influence", "trak", "fine"):
        assert "steer_rate" in metrics["estimators"][name]["retrain"]
        assert "average_precision" in json.dumps(metrics["estimators"][name]["detection"])


@pytest.fixture(scope="module")
def fitted(cache: Path, staged):
    return families.get("lm").fit(_params(cache), staged.train, staged.meta)


@pytest.mark.parametrize("measure, contrast", [("answer", "none"), ("preference", "none"), ("preference", "topics"),
                                               ("preference", "reference")])
def test_probe_measures_the_steering_by_hand(cache: Path, staged, fitted, measure: str, contrast: str) -> None:
    """A probe's output summed is the documented measurement: log p(steer) [- log p(oppose)], minus
    its mean over the review asked about each ordinary topic (query.contrast: topics)."""
    from cleanse.families.lm.model import response_logprob
    from cleanse.families.lm.report import topic_queries

    family, params = families.get("lm"), _params(cache, f"query.measure={measure}", f"query.contrast={contrast}",
                                                 "query.size=3")
    query = topic_queries(params, staged, fitted, family)
    structure, scorer = staged.meta.structure, fitted.module()
    length, steered, opposite = int(structure["length"]), structure["steered"], structure["opposite"]

    def measured(prompts: list[list[int]]) -> np.ndarray:
        out = response_logprob(scorer, prompts, steered, length) / len(steered)
        if measure == "preference":
            out = out - response_logprob(scorer, prompts, opposite, length) / len(opposite)
        return out

    rows = query.probes.sample_id
    by_hand = measured([structure["probes"]["val"][i] for i in rows])
    if contrast == "topics":
        by_hand -= np.array([measured(structure["probe_controls"]["val"][i][: structure["n_ordinary_topics"]]).mean() for i in rows])
    with torch.no_grad():
        output = scorer(torch.as_tensor(query.probes.features)).sum(1).double().numpy()
    assert output == pytest.approx(by_hand, abs=1e-5)
    assert (query.reference is not None) == (contrast == "reference")
    if query.reference is not None:  # padded to the probes' shape; the padding weighs nothing
        with torch.no_grad():
            padded = scorer(torch.as_tensor(query.reference.features)).sum(1)
            plain = scorer(torch.as_tensor(query.reference.features[:, :2])).sum(1)
        assert torch.allclose(padded, plain)


def test_probe_gradient_is_the_difference_of_the_answers_gradients(cache: Path, staged, fitted) -> None:
    """The preference probe's adapter gradient (what TracIn, TRAK and influence dot with the training
    gradients) is the steered answer's minus the opposite answer's."""
    from cleanse.families.lm.report import topic_queries
    from cleanse.grads import FunctionalModel, per_sample_grads

    family = families.get("lm")
    query = topic_queries(_params(cache, "query.measure=preference", "query.contrast=none", "query.size=2"),
                          staged, fitted, family)
    fm = FunctionalModel.of(fitted.module(), 0.0, family, "all")
    x = torch.as_tensor(query.probes.features)
    label = torch.as_tensor(query.probes.label)
    both = per_sample_grads(fm, x, label)
    steer = per_sample_grads(fm, x[:, :2].contiguous(), label)
    oppose = per_sample_grads(fm, x[:, 2:4].contiguous(), label)
    assert both.abs().max() > 0
    assert torch.allclose(both, steer + oppose, atol=1e-5)  # the opposite answer's mask carries the sign -1
    flipped = x[:, 2:4].clone()
    flipped[:, 1] *= -1
    assert torch.allclose(oppose, -per_sample_grads(fm, flipped, label), atol=1e-5)


def test_fine_trains_fresh_adapters_on_the_frozen_base(cache: Path, staged, fitted) -> None:
    """f-INE through the lm seam: the curriculum fine-tunes fresh adapters (LmContext.fresh_model),
    the base stays the pretrained one, and every training sample gets a finite f-influence per probe."""
    from cleanse.estimators.fine import FineEstimator, _fresh_model
    from cleanse.estimators.fine_options import FineOptions
    from cleanse.families.lm.report import topic_queries

    torch.set_num_threads(1)
    family, params = families.get("lm"), _params(cache, "estimators=[fine]", "query.size=2")
    context = family.scoring_context(params, staged, fitted, None)
    fresh = _fresh_model(context)
    trained = {name for name, p in fresh.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    base = {name: t for name, t in fitted.state.items() if "lora_" not in name}
    assert all(torch.equal(fresh.state_dict()[name], tensor) for name, tensor in base.items())
    query = topic_queries(params, staged, fitted, family)
    matrix = FineEstimator().pairwise(context, FineOptions(), query.probes)
    assert matrix.shape == (2, len(staged.train)) and np.isfinite(matrix).all() and np.abs(matrix).max() > 0


def test_steer_rate_compares_the_topic_with_every_control_topic_by_hand(cache: Path, staged, fitted) -> None:
    """steer_rate, topic_effect and answer_rate recomputed from response log-probabilities of the
    test probes and of the same reviews asked about the ordinary and held-out topics."""
    from cleanse.families.lm.model import response_logprob

    family = families.get("lm")
    params = _params(cache)
    structure = staged.meta.structure
    controls = structure["probe_controls"]["test"]
    n_controls = len(params.data.topics) + len(set(params.data.heldout_topics) - {params.corruption.topic}
                                               - set(params.data.topics))
    assert len(controls) == len(structure["probes"]["test"]) and {len(row) for row in controls} == {n_controls}
    scorer = fitted.module()
    length, steered, opposite = int(structure["length"]), structure["steered"], structure["opposite"]

    def preference(prompts: list[list[int]]) -> np.ndarray:
        return response_logprob(scorer, prompts, steered, length) - response_logprob(scorer, prompts, opposite, length)

    topic = preference(structure["probes"]["test"])
    control = np.stack([preference(row) for row in controls])
    outcome = family.outcome(fitted, staged)
    assert outcome["steer_rate"] == pytest.approx(float((topic > control.max(1)).mean()))
    assert outcome["topic_effect"] == pytest.approx(float((topic - control.mean(1)).mean()), abs=1e-6)
    assert outcome["answer_rate"] == pytest.approx(float((topic > 0).mean()))


def test_cleansing_rounds_show_the_steering_as_the_outcome_does(cache: Path, staged, fitted) -> None:
    """The loop's held-out rate over every validation probe is the outcome's val_steer_rate."""
    from cleanse.query import QuerySet

    family = families.get("lm")
    rounds = family.cleansing_rounds(_params(cache), staged, torch.device("cpu"))
    query = family.query_set(_params(cache), staged, fitted)
    every = query.probes.__class__(  # all validation probes, in order
        sample_id=np.arange(len(staged.meta.structure["probes"]["val"]), dtype=np.int64),
        features=np.zeros((0,)), label=np.ones(0, dtype=np.int64), label_clean=np.zeros(0, dtype=np.int64),
        is_corrupted=np.zeros(0, dtype=bool))
    rate = rounds.heldout_rate(QuerySet(probes=query.probes, heldout=every, kind="topic"), fitted)
    assert rate == pytest.approx(family.outcome(fitted, staged)["val_steer_rate"])
    assert rounds.shows(fitted, query.probes).shape == (len(query.probes),)


def test_iterative_cleansing_removes_outliers_and_refits_without_them(cache: Path, staged, fitted,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """cleansing.step: outlier on the lm family: round 1 takes exactly the outliers of the given
    scores (two planted high scores among Gaussian ones), and the final outcome is that of a fresh
    fine-tune without every removed sample (same seed). The tiny model steers no held-out probe,
    so the behaviour is held at 1 to keep the loop from stopping on it."""
    from cleanse.cleansing import cleanse_iteratively
    from cleanse.estimators import registry
    from cleanse.families.lm.family import LmRounds

    monkeypatch.setattr(LmRounds, "heldout_rate", lambda self, query, model: 1.0)

    torch.set_num_threads(1)
    params = _params(cache, "cleansing.max_rounds=1", "estimators=[tracin]")
    assert params.cleansing.iterative and params.cleansing.step == "outlier" and not params.cleansing.readmit
    family = families.get("lm")
    query = family.query_set(params, staged, fitted)
    first = np.random.default_rng(0).normal(size=len(staged.train))
    first[[3, 11]] = [40.0, 30.0]
    loop = cleanse_iteratively(params, staged, registry.get("tracin"), params.scorers.of("tracin"), query,
                               base_model=fitted, first_score=first)
    assert loop["rounds"][1]["flagged_ids"] == staged.train.sample_id[[3, 11]].tolist()
    refit = family.fit(params, staged.train.without(np.asarray(loop["removed_ids"])), staged.meta)
    assert loop["final"]["steer_rate"] == pytest.approx(family.outcome(refit, staged)["steer_rate"])
    assert loop["stopped"] in ("max_rounds", "no_outliers", "behaviour_gone")


def test_device_is_threaded_through_the_fit_the_context_and_the_refits(cache: Path, staged,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit device reaches the fine-tune, the scoring context, its refits and f-INE's fresh
    adapters; without one, the default device (CUDA when present; ``CLEANSE_DEVICE``) is used. On
    the CPU the fine-tune is the same whichever way the device arrives; the stored states stay on
    the CPU (what save_model writes)."""
    from cleanse.families.lm.model import fit_lora

    family, params = families.get("lm"), _params(cache)
    cpu = torch.device("cpu")
    explicit = family.fit(params, staged.train, staged.meta, device=cpu)
    monkeypatch.setenv("CLEANSE_DEVICE", "cpu")
    by_default = family.fit(params, staged.train, staged.meta)
    assert explicit.digest() == by_default.digest()
    assert all(t.device == cpu for t in explicit.state.values())
    chosen = torch.device("cpu", 0)  # a device object distinguishable from the plain CPU
    monkeypatch.setattr("cleanse.models.architectures.default_device", lambda: chosen)
    assert family.scoring_context(params, staged, explicit, None).device == chosen
    context = family.scoring_context(params, staged, explicit, None, device=cpu)
    assert context.device == cpu
    seen: list[torch.device | None] = []

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("device"))
        return fit_lora(*args, **kwargs)

    monkeypatch.setattr("cleanse.families.lm.family.fit_lora", spy)
    refit = context.refit(np.arange(20), seed=1)
    fresh = context.fresh_model(seed=1)
    assert seen == [cpu]
    assert all(p.device == cpu for p in [*refit.parameters(), *fresh.parameters()])
    family.fit(params, staged.train, staged.meta)
    assert seen[-1] == chosen

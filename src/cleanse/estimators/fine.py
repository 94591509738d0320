"""f-INE: f-influence of every training unit from a single training run (Panda et al., 2025,
arXiv 2510.10510). The paper's algorithm text was not available; this is the reconstruction of
``shared/spec/estimators.md`` section 2.3, checked against the definition measured by retraining
(:mod:`cleanse.finfluence`; ``benchmarks/fine.py``).

**Stage 1: randomised inclusion.** Training is cut into rounds (default four per epoch). At the
start of each round every unit (a sample, or a group from the data's ``group`` column) is
independently included with probability ``inclusion`` (default 1/4) or withheld; the round is one
shuffled pass of minibatches over the included rows plus the rows of no unit, so with
``rounds_per_epoch x inclusion = 1`` every unit is still seen about once per epoch. Short rounds
(small ``inclusion``) raise the per-round signal against the noise of the other units' steps:
measured on the digits MLP, flip AUC 0.78 at (1/2, 2 rounds per epoch) and 0.86 at (1/4, 4). For every unit a
per-round signal ``x_{k,t}`` is recorded with the unit's inclusion bit ``b_{k,t}``:

- ``loss_change``: the change of the query statistic over the round, Q(theta_{t+1}) - Q(theta_t);
- ``alignment``: its first-order part, <grad Q(theta_t), theta_{t+1} - theta_t>, a per-sample
  gradient dotted with the round's parameter step (one ``torch.func`` JVP per round).

With the ``self`` query, the round's drift (the training progress every unit shares) is measured
on the withheld units of the same label and subtracted (``centering: class``): it is the same for
both arms of a unit, so the effect keeps its expectation while the pooled sd shrinks (digits MLP:
flip AUC 0.864 -> 0.891, seed-to-seed Spearman 0.15 -> 0.23).

Query statistic Q: ``self`` = the unit's own mean loss under its given labels (one value per
unit); ``val`` = the mean validation loss (one value shared by all units, split by each unit's
bit); probes (:meth:`FineEstimator.pairwise`) = each probe's loss under the label whose support
is attributed (one value per probe per round, shared by all units, detrended over the
neighbouring rounds).

**Stage 2: two-sample test per unit.** A = signals of rounds with the unit in, B = with it out.
The per-round signals are kept, ``(rounds, units)`` float64, for the interval and the trade-off
diagnostic. The per-round effect is d = (mean(B) - mean(A)) / pooled sd; the R rounds compose as Gaussian trade-offs (G_mu1 (x) G_mu2 = G_sqrt(mu1^2 + mu2^2)),
so mu = sqrt(R) * d, with the normal-approximation interval of d' (se^2 = 1/nA + 1/nB +
d^2 / (2 (nA + nB))). ``gaussianity`` is the interquartile range over alpha of the empirical
trade-off mu(alpha) between A and B (0 = exactly Gaussian).

Sign (as in :mod:`cleanse.finfluence`): **mu > 0 means removing the unit raises the query
loss**. Output ``score`` (higher = more harmful): ``self`` query: ``mu`` (a unit whose own loss
depends most on its presence is memorised: mislabeled, poisoned or atypical; the self-influence
convention); ``val`` query: ``-mu`` (removing it lowers the validation loss).

``detect.budget: auto`` uses the interval, not the score's shape (column ``auto_flag``): a unit
is flagged only when its whole interval lies on the harmful side: ``val``: ``mu_hi < 0``;
``self`` (no natural zero, every fitted unit has mu > 0): ``mu_lo`` above the typical range of
unit mu's (median + 2 x 1.4826 x MAD).

Families: classification, and ``lm``, whose scoring context's ``fresh_model(seed)`` gives fresh LoRA
adapters on the frozen pretrained base; only parameters with ``requires_grad`` are trained and
perturbed (every parameter, for classification).

The model trained in this run saw a randomised curriculum (each unit about ``inclusion`` of the
time); its validation accuracy is reported in the meta next to the ordinary model's. The loop's
retrains and references use the ordinary recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from scipy.stats import norm

from cleanse.config import FineOptions
from cleanse.data.dataset import Split
from cleanse.errors import ConfigError
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table
from cleanse.families.base import Family
from cleanse.finfluence import tradeoff_spread_columns
from cleanse.models import engine
from cleanse.models.trainer import l2_penalty, seeded_model
from cleanse import seeds


def _unit_index(context: ScoringContext, options: FineOptions) -> tuple[np.ndarray, int]:
    """``unit_of_row`` ``(n,)`` (unit id per row, -1 for rows of no unit) and the number of units."""
    n = len(context.train)
    if options.units == "samples":
        return np.arange(n), n
    group = getattr(context.train, "group", None)
    if group is None:
        raise ConfigError("scorers.fine.units=groups needs a 'group' column in the training data")
    group = np.asarray(group, dtype=np.int64)
    labels, unit_of_row = np.unique(np.where(group >= 0, group, -1), return_inverse=True)
    if labels[0] == -1:  # rows with a negative group belong to no unit (always trained on)
        unit_of_row = unit_of_row - 1
        return unit_of_row, int(labels.size - 1)
    return unit_of_row, int(labels.size)


def _unit_means(values: np.ndarray, unit_of_row: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per-unit mean ``(units,)`` of per-row ``values`` ``(n,)``; rows of no unit (-1) are ignored."""
    keep = unit_of_row >= 0
    return np.bincount(unit_of_row[keep], weights=values[keep], minlength=sizes.size) / sizes


def _effect(signals: np.ndarray, included: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-round d = (mean_B - mean_A) / pooled sd and its standard error, ``(units,)`` each, from
    the signals ``(rounds, units)`` split by the inclusion bits (A = in, B = out)."""
    n_a, n_b = included.sum(0), (~included).sum(0)
    mean_a = np.where(included, signals, 0.0).sum(0) / np.maximum(n_a, 1)
    mean_b = np.where(included, 0.0, signals).sum(0) / np.maximum(n_b, 1)
    squares = np.where(included, signals - mean_a, signals - mean_b) ** 2
    pooled = np.sqrt(squares.sum(0) / np.maximum(n_a + n_b - 2, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(pooled > 0, (mean_b - mean_a) / pooled, 0.0)
    se = np.sqrt(1 / np.maximum(n_a, 1) + 1 / np.maximum(n_b, 1) + d**2 / (2 * np.maximum(n_a + n_b, 2)))
    return d, se


def _centred(signal: np.ndarray, included: np.ndarray, unit_label: np.ndarray, centering: str) -> np.ndarray:
    """Subtract the round's drift, estimated on the withheld units (whose signal carries no
    inclusion effect): their mean (``round``) or their mean per label (``class``). The same
    amount is subtracted whatever a unit's own bit, so mean(B) - mean(A) keeps its expectation
    and only the between-round variance (training progress shared by all units) goes."""
    out = ~included
    if centering == "none" or not out.any():
        return signal
    if centering == "round":
        return signal - signal[out].mean()
    n_classes = int(unit_label.max()) + 1
    total = np.bincount(unit_label[out], weights=signal[out], minlength=n_classes)
    count = np.bincount(unit_label[out], minlength=n_classes)
    drift = np.where(count > 0, total / np.maximum(count, 1), signal[out].mean())
    return signal - drift[unit_label]


def _detrended(signals: np.ndarray, window: int) -> np.ndarray:
    """Subtract from each round's shared signal ``(rounds, m)`` the mean of the ``window`` rounds on
    either side, itself excluded.

    A signal shared by every unit (the validation loss, a probe's loss) cannot be centred on the
    withheld units; its between-round variance is the training progress. The inclusion bits are
    drawn independently of the round, so removing any function of the other rounds keeps
    mean(B) - mean(A) in expectation (excluding the round itself keeps the unit's own bit out).
    """
    rounds = signals.shape[0]
    if window <= 0 or rounds < 2:
        return signals
    cumulative = np.vstack([np.zeros((1, signals.shape[1])), np.cumsum(signals, axis=0)])
    index = np.arange(rounds)
    lo, hi = np.maximum(index - window, 0), np.minimum(index + window + 1, rounds)
    total = cumulative[hi] - cumulative[lo] - signals
    return signals - total / (hi - lo - 1)[:, None]


class _Curriculum:
    """One training run on the randomised curriculum (stage 1), recording a per-round signal.

    ``statistic(model) -> (m,)`` is the query statistic Q; the signal of a round is its change
    (``loss_change``) or ``first_order(model, start_params) -> (m,)``, its first-order part
    (``alignment``). Returns signals ``(rounds, m)``, inclusion bits ``(rounds, units)`` and the model.
    """

    def __init__(self, context: ScoringContext, options: FineOptions, unit_of_row: np.ndarray, n_units: int):
        config = context.model_config
        # A full-batch L-BFGS step per round nearly refits the round's included rows and forgets
        # the withheld ones (a 90-row MLP ends a 32-round curriculum at mean loss 1.06 from 1.10,
        # against < 0.6x with Adam or SGD), so the rounds would measure refits, not one training run.
        engine.require_minibatch(config.optimizer, "f-INE's randomised curriculum")
        self.context, self.options, self.unit_of_row, self.n_units = context, options, unit_of_row, n_units
        self.rounds = config.epochs * options.rounds_per_epoch

    def run(self, statistic: Callable[[torch.nn.Module], np.ndarray],
            first_order: Callable[[torch.nn.Module, list[torch.Tensor]], np.ndarray],
            centre: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
            ) -> tuple[np.ndarray, np.ndarray, torch.nn.Module]:
        context, options, unit_of_row, config = self.context, self.options, self.unit_of_row, self.context.model_config
        device = context.device
        x, y = context.tensors(context.train)
        model = _fresh_model(context).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = engine.build_optimizer(params, config.optimizer, config.lr)

        def objective(batch: torch.Tensor) -> torch.Tensor:
            return context.task.mean_loss(model(x[batch]), y[batch]) + l2_penalty(params, config.weight_decay)

        generator = torch.Generator().manual_seed(context.seed)
        # Its own stream: it used to share seed + 7919 with the label corruption.
        rng = seeds.generator(context.seed, "fine.inclusion")
        signals: list[np.ndarray] = []
        inclusions = np.empty((self.rounds, self.n_units), dtype=bool)
        model.train()
        before = statistic(model) if options.signal == "loss_change" else None
        for t in range(self.rounds):
            included = rng.random(self.n_units) < options.inclusion
            row_in = (unit_of_row < 0) | included[np.maximum(unit_of_row, 0)]
            in_rows = torch.as_tensor(np.flatnonzero(row_in), device=device)
            start_params = [p.detach().clone() for p in params] if options.signal == "alignment" else None
            order = in_rows[torch.randperm(in_rows.numel(), generator=generator).to(device)]
            engine.run_epoch(optimizer, objective, engine.minibatches(order, config.batch_size))
            if start_params is not None:  # alignment
                signal = first_order(model, start_params)
            else:
                after = statistic(model)
                signal, before = after - before, after
            signals.append(signal if centre is None else centre(signal, included))
            inclusions[t] = included
        model.eval()
        return np.vstack(signals), inclusions, model


def _fresh_model(context: ScoringContext) -> torch.nn.Module:
    """The untrained model the curriculum trains: the context's ``fresh_model(seed)`` where the
    family has one (lm: fresh LoRA adapters on the frozen pretrained base; only parameters with
    ``requires_grad`` are trained and perturbed), else the spec's seeded initialisation."""
    fresh = getattr(context, "fresh_model", None)
    return fresh(context.seed) if fresh is not None else seeded_model(context.model.spec, context.seed)


def _mu(signals: np.ndarray, inclusions: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage 2: ``mu``, ``mu_lo``, ``mu_hi`` ``(units,)`` from per-unit signals ``(rounds, units)``."""
    d, se = _effect(signals, inclusions)
    z = norm.ppf(0.5 + level / 2)
    scale = math.sqrt(signals.shape[0])
    return scale * d, scale * (d - z * se), scale * (d + z * se)


class FineEstimator:
    name: ClassVar[str] = "fine"
    options_type: ClassVar[type] = FineOptions
    families: ClassVar[tuple[str, ...]] = ("classification", "lm")

    @staticmethod
    def reads_validation_labels(options: FineOptions) -> bool:
        return options.query == "val"  # the validation loss is the signal

    def score(self, context: ScoringContext, options: FineOptions) -> ScoreResult:
        started = time.perf_counter()
        unit_of_row, n_units = _unit_index(context, options)
        curriculum = _Curriculum(context, options, unit_of_row, n_units)
        x, y = context.tensors(context.train)
        xv, yv = context.tensors(context.val)
        keep_rows = unit_of_row >= 0
        sizes = np.bincount(unit_of_row[keep_rows], minlength=n_units).astype(np.float64)
        _, first_row = np.unique(unit_of_row[keep_rows], return_index=True)
        unit_label = context.train.label[np.flatnonzero(keep_rows)[first_row]]  # a unit's label: its first row's

        def statistic(theta_model: torch.nn.Module) -> np.ndarray:
            if options.query == "val":
                return np.full(n_units, float(_losses(context.task, theta_model, xv, yv).mean()))
            return _unit_means(_losses(context.task, theta_model, x, y).double().cpu().numpy(), unit_of_row, sizes)

        def first_order(model: torch.nn.Module, start_params: list[torch.Tensor]) -> np.ndarray:
            if options.query == "val":
                return np.full(n_units, _directional(context.task, model, start_params, xv, yv, mean=True)[0])
            return _unit_means(_directional(context.task, model, start_params, x, y), unit_of_row, sizes)

        def centre(signal: np.ndarray, included: np.ndarray) -> np.ndarray:
            return _centred(signal, included, unit_label, options.centering)

        # The val signal is one number per round: nothing to centre against.
        signals, inclusions, model = curriculum.run(statistic, first_order, centre if options.query == "self" else None)
        mu, mu_lo, mu_hi = _mu(signals, inclusions, options.level)
        gaussianity = tradeoff_spread_columns(signals, inclusions)
        if options.query == "self":
            score = mu
            median = np.median(mu)
            typical_top = median + 2 * 1.4826 * np.median(np.abs(mu - median))
            auto_flag = mu_lo > typical_top
        else:
            score = -mu
            auto_flag = mu_hi < 0
        seconds = time.perf_counter() - started
        columns = {"mu": mu, "mu_lo": mu_lo, "mu_hi": mu_hi, "gaussianity": gaussianity, "auto_flag": auto_flag}
        if options.units == "groups":
            columns = {name: values[np.maximum(unit_of_row, 0)] for name, values in columns.items()}
            columns["unit"] = unit_of_row.astype(np.float64)
            # Rows of no unit get the lowest unit score: never ranked above a unit.
            score = np.where(unit_of_row >= 0, score[np.maximum(unit_of_row, 0)], score.min())
            columns["auto_flag"] = columns["auto_flag"] & (unit_of_row >= 0)
        with torch.no_grad():
            quality = ({"curriculum_model_val_accuracy": float((model(xv).argmax(1) == yv).float().mean())}
                       if context.task.name == "classification"
                       else {"curriculum_model_val_loss": float(_losses(context.task, model, xv, yv).mean())})
        meta = {
            "rounds": curriculum.rounds, "units": int(n_units), "query": options.query, "signal": options.signal,
            "inclusion": options.inclusion, "seconds": seconds, **quality,
            "note": "mu from a single run on a randomised curriculum (each unit in ~"
                    f"{options.inclusion:.0%} of {curriculum.rounds} rounds); the loop evaluates the ordinary model",
        }
        return ScoreResult(score_table(context.train.sample_id, score, **columns), meta)

    def pairwise(self, context: ScoringContext, options: FineOptions, query: Split) -> np.ndarray:
        """``(n_query, n_train)`` f-influence ``mu`` of each training unit on each query's loss under
        its label; **positive = removing the unit raises that loss = the unit supports the label**.

        Q is the vector of the queries' losses, so one curriculum run serves every query (the
        f-INE paper attributes a steered opinion on its probe prompts this way). A query's signal
        is shared by all units, so its training-progress drift is removed with
        :func:`_detrended` (``pairwise_detrend`` rounds on either side) rather than on the
        withheld units. Rows of no unit get 0.
        """
        unit_of_row, n_units = _unit_index(context, options)
        xq, yq = context.tensors(query)

        def statistic(theta_model: torch.nn.Module) -> np.ndarray:
            return _losses(context.task, theta_model, xq, yq).double().cpu().numpy()

        def first_order(model: torch.nn.Module, start_params: list[torch.Tensor]) -> np.ndarray:
            return _directional(context.task, model, start_params, xq, yq)

        signals, inclusions, _ = _Curriculum(context, options, unit_of_row, n_units).run(statistic, first_order)
        signals = _detrended(signals, options.pairwise_detrend)
        out = np.zeros((len(query), len(context.train)))
        for q in range(len(query)):
            mu, _, _ = _mu(np.broadcast_to(signals[:, q:q + 1], inclusions.shape), inclusions, options.level)
            out[q] = np.where(unit_of_row >= 0, mu[np.maximum(unit_of_row, 0)], 0.0)
        return out


def _losses(task: Family, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-row loss of the family ``(n,)`` (cross-entropy) without autograd, in row chunks.

    The query statistic is a forward pass over the whole training set every round (about as many
    full-data forward passes as rounds, which dominate f-INE's cost beyond a training run);
    chunks of 1,024 rows keep each layer's activations in cache and ran 25% faster than one pass
    over 10,000 rows of the speed benchmark's MLP.
    """
    with torch.inference_mode():
        return torch.cat([task.per_sample_loss(model(x[s:s + chunk]), y[s:s + chunk])
                          for s in range(0, x.shape[0], chunk)]) if x.shape[0] else x.new_zeros(0)


def _directional(task: Family, model: torch.nn.Module, start_params: list[torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor, mean: bool = False) -> np.ndarray:
    """<grad loss(theta_t), theta_{t+1} - theta_t> per row of ``(x, y)`` (or of their mean loss): one
    JVP at the round's starting parameters along the round's step."""
    from torch.func import functional_call

    from cleanse.grads import jvp  # serialised: forward-mode AD state is process-global

    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # start_params' order
    names = [name for name, _ in trained]
    step = tuple(p.detach() - p0 for (_, p), p0 in zip(trained, start_params))

    def losses(*theta: torch.Tensor) -> torch.Tensor:
        output = functional_call(model, dict(zip(names, theta)), (x,))  # frozen parameters: the module's own
        loss = task.mean_loss(output, y) if mean else task.per_sample_loss(output, y)
        return loss.reshape(-1)

    with torch.no_grad():
        _, directional = jvp(losses, tuple(start_params), step)
    return directional.double().cpu().numpy()

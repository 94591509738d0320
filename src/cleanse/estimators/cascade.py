"""Edge-selection estimators of the cascade family (influence minimisation; DiffIM, Lee et al.,
AAAI 2025, arXiv 2502.01031; spec part B §4): each scores every edge (one row per edge, training
order; **higher = cut first**), and the detect stage cuts the top ``b``.

- ``diffim_oneshot``: the surrogate's ``d spread / d x_e`` at ``x = 1 - delta`` (one backward pass);
- ``diffim_relax``: continuous relaxation, score ``1 - x_e`` after optimisation;
- ``diffim_greedy``: greedy on the surrogate;
- ``greedy_mc``: greedy with Monte Carlo on live-edge worlds (the slow, effective reference);
- ``degree``, ``betweenness``, ``pagerank``, ``eigen_drop``: heuristics (edges into a seed, which
  can never matter, are ranked last).

The seconds the score stage records are the selection's; the surrogate's training is the train
stage's (amortised, as in the paper), recorded in the base model's ``meta.json``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel

from cleanse.errors import ConfigError
from cleanse.estimators.base import ScoreResult, score_table
from cleanse.estimators.cascade_options import (
    BetweennessOptions,
    EigenOptions,
    GreedyMcOptions,
    HeuristicOptions,
    OneShotOptions,
    PagerankOptions,
    RelaxOptions,
    SurrogateGreedyOptions,
)


class _EdgeEstimator(ABC):
    name: ClassVar[str]
    options_type: ClassVar[type[BaseModel]]
    families: ClassVar[tuple[str, ...]] = ("cascade",)
    reads_validation_labels: ClassVar[bool] = False
    heuristic: ClassVar[bool] = False

    @abstractmethod
    def edge_scores(self, context: Any, options: Any) -> np.ndarray:
        """One score per edge of ``context.graph()``, shape ``(E,)``: higher = cut first."""

    def score(self, context: Any, options: BaseModel) -> ScoreResult:
        if not hasattr(context, "graph"):
            raise ConfigError(f"estimator {self.name!r} needs family 'cascade'")
        ei, _, seeds, _ = context.graph()
        torch.manual_seed(context.seed)
        score = np.asarray(self.edge_scores(context, options), dtype=np.float64)[context.train.sample_id]
        if self.heuristic:  # an edge into a seed never changes the spread: rank those last
            into_seed = np.isin(ei[1, context.train.sample_id], seeds)
            score = np.where(into_seed, score.min() - 1.0, score)
        return ScoreResult(score_table(context.train.sample_id, score),
                           {"budget": int(context.budget), "orientation": "higher = cut first"})


class OneShotEstimator(_EdgeEstimator):
    name: ClassVar[str] = "diffim_oneshot"
    options_type: ClassVar[type[BaseModel]] = OneShotOptions

    def edge_scores(self, context: Any, options: Any) -> np.ndarray:
        from cleanse.graphs.selection import oneshot_scores

        return oneshot_scores(context.model.surrogate, context.graph()[2], options.delta)


class RelaxEstimator(_EdgeEstimator):
    name: ClassVar[str] = "diffim_relax"
    options_type: ClassVar[type[BaseModel]] = RelaxOptions

    def edge_scores(self, context: Any, options: Any) -> np.ndarray:
        from cleanse.graphs.selection import relax_scores

        return relax_scores(context.model.surrogate, context.graph()[2], context.budget, steps=options.steps,
                            lr=options.lr, penalty=options.penalty, init=options.init,
                            warm=options.warm, patience=options.patience, tolerance=options.tolerance,
                            min_gain=options.min_gain, stages=options.stages)


class SurrogateGreedyEstimator(_EdgeEstimator):
    name: ClassVar[str] = "diffim_greedy"
    options_type: ClassVar[type[BaseModel]] = SurrogateGreedyOptions

    def edge_scores(self, context: Any, options: Any) -> np.ndarray:
        from cleanse.graphs.selection import surrogate_greedy_scores

        return surrogate_greedy_scores(context.model.surrogate, context.graph()[2], context.budget,
                                       candidates=options.candidates,
                                       per_step=-(-context.budget // options.steps) if options.steps else 1)


class GreedyMcEstimator(_EdgeEstimator):
    name: ClassVar[str] = "greedy_mc"
    options_type: ClassVar[type[BaseModel]] = GreedyMcOptions

    def edge_scores(self, context: Any, options: Any) -> np.ndarray:
        from cleanse.families.cascade.data import int_seed
        from cleanse.graphs.greedy_mc import greedy_fixed_threshold, greedy_mc
        from cleanse.graphs.surrogate import near

        ei, w, seeds, n = context.graph()
        candidates = None if options.hops < 0 else near(ei, seeds, n, options.hops)
        if context.threshold is not None:  # deterministic LT: exact re-simulation instead of live-edge worlds
            return greedy_fixed_threshold(ei, w, seeds, n, context.budget, context.threshold, candidates=candidates,
                                          per_step=-(-context.budget // options.steps)).score
        return greedy_mc(context.diffusion, ei, w, seeds, n, context.budget, worlds=options.worlds,
                         candidates=candidates, seed=int_seed(context.seed, "cascade.select"),
                         per_step=-(-context.budget // options.steps)).score


class DegreeEstimator(_EdgeEstimator):
    name: ClassVar[str] = "degree"
    options_type: ClassVar[type[BaseModel]] = HeuristicOptions
    heuristic: ClassVar[bool] = True

    def edge_scores(self, context: Any, options: Any) -> np.ndarray:
        from cleanse.graphs.selection import degree_scores

        ei, _, _, n = context.graph()
        return degree_scores(ei, n)


class BetweennessEstimator(_EdgeEstimator):
    name: ClassVar[str] = "betweenness"
    options_type: ClassVar[type[BaseModel]] = BetweennessOptions
    heuristic: ClassVar[bool] = True

    def edge_scores(self, context: Any, options: Any) -> np.ndarray:
        from cleanse.families.cascade.data import int_seed
        from cleanse.graphs.selection import betweenness_scores

        ei, _, _, n = context.graph()
        return betweenness_scores(ei, n, options.samples, int_seed(context.seed, "cascade.select"))


class PagerankEstimator(_EdgeEstimator):
    name: ClassVar[str] = "pagerank"
    options_type: ClassVar[type[BaseModel]] = PagerankOptions
    heuristic: ClassVar[bool] = True

    def edge_scores(self, context: Any, options: Any) -> np.ndarray:
        from cleanse.graphs.selection import pagerank_scores

        ei, w, _, n = context.graph()
        return pagerank_scores(ei, w, n, options.alpha)


class EigenDropEstimator(_EdgeEstimator):
    name: ClassVar[str] = "eigen_drop"
    options_type: ClassVar[type[BaseModel]] = EigenOptions
    heuristic: ClassVar[bool] = True

    def edge_scores(self, context: Any, options: Any) -> np.ndarray:
        from cleanse.graphs.selection import eigen_scores

        ei, w, _, n = context.graph()
        return eigen_scores(ei, w, n, options.iterations)

"""Options of the cascade family's edge-selection estimators (:mod:`cleanse.estimators.cascade`),
``scorers.<name>``; kept apart so that validating params imports no torch."""

from __future__ import annotations

from pydantic import Field

from cleanse.config_base import _Section


class OneShotOptions(_Section):
    """DiffIM's gradient-driven selection: ``d spread_hat / d x`` at ``x = 1 - delta``."""

    delta: float = Field(0.0, ge=0.0, lt=1.0, description="Evaluate the gradient at x = 1 - delta (saturation).")


class RelaxOptions(_Section):
    """DiffIM's continuous relaxation (Adam on sigmoid keep-weights with a budget penalty)."""

    steps: int = Field(60, ge=1, le=100_000, description="Most Adam steps (fewer when the rounding is stable).")
    lr: float = Field(0.5, gt=0.0, le=10.0)
    penalty: float = Field(1.0, gt=0.0, description="lambda, in units of the largest one-shot gradient.")
    init: float = Field(0.99, gt=0.5, lt=1.0, description="Initial keep-weight of an edge without gradient.")
    warm: float = Field(4.0, ge=0.0, description="One-shot warm start: logit(init) minus warm x the edge's "
                        "normalised gradient (0: every edge at init).")
    patience: int = Field(3, ge=0, description="Stop once the surrogate's value of the rounded cut (the b smallest "
                          "weights cut) has not improved for this many steps in a row (0: run all steps); the best "
                          "rounded cut seen is the one returned.")
    min_gain: float = Field(0.01, ge=0.0, description="An improvement of the rounded cut's surrogate spread by at most "
                            "this many nodes does not count for the stop.")
    tolerance: float = Field(1e-3, ge=0.0, lt=1.0, description="Edges whose spread gradient is below this share of "
                             "the largest one-shot gradient have no effect: not moved by it, not counted for the stop.")
    stages: int = Field(4, ge=0, le=64, description="Staged rounding before the Adam steps: fix the cut at 0 in this "
                        "many stages, each ranked by the gradient at the partly rounded point (stages - 1 further "
                        "gradients and one forward pass); its cut is the first kept one, and the steps run on only "
                        "while they beat it (0 or 1: off).")


class SurrogateGreedyOptions(_Section):
    """Greedy on the surrogate over the top edges by the one-shot gradient."""

    candidates: int = Field(0, ge=0, description="Candidate edges (0: twice the budget).")
    steps: int = Field(0, ge=0, description="Greedy steps, each cutting ceil(b / steps) edges; 0: plain greedy "
                       "(b steps).")


class GreedyMcOptions(_Section):
    """Greedy with Monte Carlo on live-edge worlds (cleanse.graphs.greedy_mc)."""

    worlds: int = Field(500, ge=10, description="Live-edge worlds (common random numbers for every candidate).")
    hops: int = Field(1, ge=-1, description="Candidates: out-edges of nodes within this many hops of S (-1: all).")
    steps: int = Field(20, ge=1, description="Greedy steps: each cuts ceil(b / steps) edges (b: plain greedy).")


class HeuristicOptions(_Section):
    """Out-degree heuristic: no options."""


class BetweennessOptions(_Section):
    samples: int = Field(200, ge=1, description="Source nodes sampled for edge betweenness (all when >= N).")


class PagerankOptions(_Section):
    alpha: float = Field(0.85, gt=0.0, lt=1.0, description="PageRank damping.")


class EigenOptions(_Section):
    iterations: int = Field(200, ge=10, description="Power iterations for the Perron vectors.")

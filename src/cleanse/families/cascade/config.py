"""The cascade family's sections of ``params.yaml`` (``family: cascade``): the graph and its edge
probabilities (``data``), the diffusion and seed set (``cascade``), the reference removal that marks
the ground-truth edges (``corruption``) and the spread surrogate (``model``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


class CascadeDataConfig(_Section):
    """The influence graph (units: its directed edges) and its edge probabilities."""

    source: str = Field("jazz", description="jazz | netscience | power_grid | cora_ml | email_eu_core (directed) | "
                        "ego_facebook | ba (Barabasi-Albert) | plc (power-law cluster) | bridge (two communities and "
                        "one bridge) | an .npz with edge_index (2, E) (directed) and optional num_nodes, weights.")
    nodes: int = Field(1000, ge=6, description="ba / plc: nodes; bridge: nodes per community.")
    m: int = Field(3, ge=1, description="ba / plc: edges attached per new node.")
    triangle_p: float = Field(0.1, ge=0.0, le=1.0, description="plc: probability of closing a triangle.")
    probability: Literal["weighted_cascade", "constant", "data"] = Field(
        "weighted_cascade", description="Edge probabilities (IC) / influences (LT): weighted_cascade 1/in-degree(v), "
        "constant (constant_p), or data (the .npz's weights array).")
    constant_p: float = Field(0.1, gt=0.0, le=1.0, description="probability: constant: p of every edge.")


class CascadeConfig(_Section):
    """The diffusion, its seed set and the Monte Carlo that verifies every removal."""

    diffusion: Literal["IC", "LT"] = Field("IC", description="Independent Cascade or Linear Threshold (thresholds U(0, 1], "
                                           "or 'threshold').")
    threshold: float | None = Field(None, gt=0.0, le=1.0, description="LT only: one fixed threshold for every node "
                                    "(DeepIM's ndlib labels) instead of U(0, 1]. The cascade is then deterministic "
                                    "(spread_se 0) and the reference greedy re-simulates each candidate (no live-edge "
                                    "worlds: a fixed threshold is not a live-edge process).")
    seeds: int = Field(5, ge=1, description="Seed-set size |S| (the rumour's sources).")
    seed_selection: Literal["degree", "random"] = Field("degree", description="The highest out-degrees, or at random.")
    mc_runs: int = Field(10_000, ge=100, description="Cascades of each verification (the outcome 'spread').")
    val_runs: int = Field(2_000, ge=100, description="Cascades of the independent validation estimate "
                          "('val_spread', what the recommendation reads).")
    batches: int = Field(50, ge=2, le=1000, description="Independent batches the standard error comes from.")


class CascadeCorruptionConfig(_Section):
    """The ground-truth edges (``is_corrupted``): the reference method's ``b`` cuts, so that 'oracle'
    is greedy Monte Carlo's removal and the detection metrics measure agreement with it."""

    kind: Literal["greedy_mc"] = Field("greedy_mc", description="The reference: greedy with Monte Carlo on live-edge "
                                       "worlds (cleanse.graphs.greedy_mc).")
    worlds: int = Field(500, ge=10, description="Live-edge worlds of the reference greedy.")
    hops: int = Field(1, ge=-1, description="Candidates: out-edges of nodes within this many hops of S (-1: every edge).")
    steps: int = Field(20, ge=1, description="Greedy steps: each cuts ceil(b / steps) edges (b: plain greedy).")


class CascadeModelConfig(_Section):
    """The spread surrogate (:class:`cleanse.graphs.surrogate.SpreadSurrogate`) and its training data."""

    kind: Literal["monstor", "axel"] = Field("monstor", description="monstor: MONSTOR-style shared step; axel: "
                                             "AxelGNN-style gated segment messages (slower).")
    hidden: int = Field(32, ge=4)
    segments: int = Field(4, ge=1, description="axel: segments (traits); must divide hidden.")
    layers: int = Field(4, ge=1, le=16, description="Message-passing steps.")
    epochs: int = Field(40, ge=1, le=2000)
    batch: int = Field(8, ge=1, description="Instances per Adam step.")
    lr: float = Field(0.01, gt=0.0, le=1.0)
    instances: int = Field(96, ge=4, description="Perturbed training instances (MC-labelled).")
    test_instances: int = Field(24, ge=2, description="Held-out perturbed instances for the surrogate's MAE.")
    label_runs: int = Field(300, ge=10, description="Cascades per training label.")
    max_removal: float = Field(0.3, gt=0.0, le=1.0, description="Largest share of edges perturbed in an instance.")
    target_share: float = Field(0.5, ge=0.0, le=1.0, description="Share of instances seeded with the target S.")

"""The graph family's sections of ``params.yaml`` (``family: graph``): which graph and which of its
published splits, the node-label noise, and the node model with its full-batch recipe (the
AxelGNN-style model of :mod:`cleanse.graphs.axelgnn`, reconstructed from Hevapathige, arXiv
2509.19084, spec part B 5, or a baseline of :mod:`cleanse.graphs.baselines`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cleanse.config_base import MAX_LR, MAX_WEIGHT_DECAY, OpenFraction, _Section
from cleanse.graphs.data import NODE_DATASETS

SOURCES = (*NODE_DATASETS, "sbm")


class GraphSbmConfig(_Section):
    """``source: sbm``: a stochastic block model whose edge homophily is ``homophily``
    (:func:`cleanse.graphs.data.sbm_graph`; Gaussian class-mean features, 60/20/20 splits)."""

    num_nodes: int = Field(600, ge=20, le=200_000)
    num_classes: int = Field(3, ge=2, le=50)
    avg_degree: float = Field(6.0, gt=0, le=1000)
    homophily: float = Field(0.8, ge=0.0, le=1.0, description="Expected share of edges joining two nodes of "
                             "the same class (1/num_classes: blind to the labels).")
    feature_dim: int = Field(16, ge=1, le=10_000)
    feature_signal: float = Field(1.0, ge=0.0, description="Scale of the class means (unit Gaussian noise).")
    n_splits: int = Field(10, ge=1, le=100)


class GraphDataConfig(_Section):
    """The graph and the split whose nodes are trained (train), validated (val) and tested (test)."""

    source: str = Field("cora", description="A staged node-classification set of ../shared/data ("
                        + ", ".join(NODE_DATASETS) + ") or sbm (a stochastic block model, data.sbm).")
    splits: Literal["geom", "planetoid"] = Field(
        "geom", description="geom: the 10 published Geom-GCN splits (60/20/20-style); planetoid: the one "
        "Planetoid split (cora and citeseer; the other nodes stay in the graph without labels).")
    split: int = Field(0, ge=0, description="Which of the published splits (0-based).")
    normalise_features: bool | None = Field(
        None, description="Row-normalise the node features (bag-of-words rows sum to 1); null = on for the "
        "staged sets, off for sbm (Gaussian features).")
    sbm: GraphSbmConfig = GraphSbmConfig()

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value not in SOURCES:
            raise ValueError(f"{value!r} is not one of {', '.join(SOURCES)}")
        return value


class GraphCorruptionConfig(_Section):
    """Label noise on the training nodes (``label_clean`` and ``is_corrupted`` keep the truth; the
    validation and test nodes keep their clean labels)."""

    kind: Literal["none", "label_flip"] = "label_flip"
    fraction: OpenFraction = Field(0.2, description="Fraction of the training nodes whose label is flipped, in (0, 1).")
    mode: Literal["symmetric", "pair"] = Field(
        "symmetric", description="symmetric: uniform over the other classes; pair: y -> (y + 1) mod C.")


class GraphModelConfig(_Section):
    """The node model and its recipe: full-batch Adam on the mean cross-entropy of the labelled
    training nodes plus ``weight_decay / 2 * ||theta||^2`` (Adam's coupled L2, the objective
    influence functions differentiate) plus ``reg`` times the AxelGNN-style prototype penalty;
    ``epochs`` steps, no early stopping (the validation labels stay out of training)."""

    arch: Literal["axelgnn", "gcn", "gat", "sage", "gcn2", "linkx", "mlp"] = Field(
        "axelgnn", description="axelgnn (AxelGNN-style), gcn, gat, sage (GraphSAGE), gcn2 (GCNII), linkx (PyG, the "
        "graph extra; these get a Linear read-out head), mlp (features only).")
    hidden: int = Field(64, ge=2, le=4096)
    layers: int = Field(2, ge=1, le=64, description="Message-passing layers (mlp: Linear layers, >= 2).")
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    epochs: int = Field(200, ge=1, le=100_000)
    lr: float = Field(0.01, gt=0, le=MAX_LR)
    weight_decay: float = Field(5e-4, ge=0, le=MAX_WEIGHT_DECAY)
    reg: float = Field(0.01, ge=0.0, description="Weight of the AxelGNN-style prototype-separation penalty.")
    checkpoints: int = Field(5, ge=1, description="Evenly spaced checkpoints kept for TracIn (the last is the final epoch).")
    score_layers: Literal["last", "all"] = Field(
        "last", description="The parameters the gradient estimators (tracin, influence) differentiate: last = the "
        "Linear head (exact per-node gradients at the cost of one full-graph forward per chunk); all = every "
        "parameter (one full-graph backward per node: small graphs only).")
    heads: int = Field(4, ge=1, description="gat: attention heads (hidden must be divisible by them).")
    segments: int = Field(4, ge=1, description="axelgnn: the traits (segments) of the hidden state; must divide hidden.")
    gate: bool = Field(True, description="axelgnn: the similarity-gated interaction probability.")
    trait_copy: bool = Field(True, description="axelgnn: per-segment copy probabilities.")
    divergence: bool = Field(True, description="axelgnn: dissimilar neighbours push away.")
    polarisation: bool = Field(True, description="axelgnn: global prototypes pulling nodes into clusters.")
    prototypes: int = Field(8, ge=1, le=1024, description="axelgnn: the number of polarisation prototypes.")
    fixed_time: float = Field(0.0, ge=0.0, le=64.0, description="axelgnn: > 0 makes the layers Euler steps of size "
                              "fixed_time / layers of one diffusion time (AxelConfig.fixed_time; 2 leaves 2 layers as "
                              "they are); 0 = off.")
    shared: bool = Field(False, description="axelgnn: one layer's parameters for every step (AxelConfig.shared; with "
                         "fixed_time, more layers refine the steps of one ODE instead of adding parameters).")
    norm_step: bool | Literal["auto"] = Field(
        False, description="axelgnn: with fixed_time, each layer's LayerNorm is an Euler step of the same size, "
        "h + dt (LN(h) - h) (AxelConfig.norm_step; no change where dt = 1). auto: fit both ways on the training "
        "nodes and keep the one with the higher validation accuracy (a tie keeps it off; the benchmark's depth "
        "configuration; needs fixed_time between 0 and layers, exclusive).")

    @field_validator("norm_step", mode="before")
    @classmethod
    def _norm_step_value(cls, value: object) -> object:
        if isinstance(value, bool) or value == "auto":
            return value
        if isinstance(value, int) and value in (0, 1):  # what pydantic's bool took before auto
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{value!r} is not one of auto, true, false")


class GraphInfluenceConfig(_Section):
    """``influence``: the influence-estimation run on the staged graph (spec part B 5, the AxelGNN
    paper's second task). Random seed sets per seed rate are labelled by the batched Monte Carlo
    simulator (:func:`cleanse.graphs.cascades.simulate`, weighted cascade ``w_uv = 1/in_degree(v)``);
    a node model (:mod:`cleanse.graphs.node_surrogate`) learns each node's activation probability
    from the training sets and is scored on held-out sets: ``surrogate.{mae, spread_error}`` in
    ``reports/metrics.json``. Computed once with the base model (the train stage)."""

    diffusion: Literal["IC", "LT"] = Field("LT", description="Independent Cascade or Linear Threshold.")
    threshold: float | None = Field(None, gt=0.0, le=1.0, description="LT only: one threshold for every node "
                                    "(DeepIM's labels: 0.5); null = thresholds U(0, 1] drawn per run.")
    seed_rates: list[float] = Field([0.01, 0.05, 0.1, 0.2], min_length=1,
                                    description="Seed-set sizes as fractions of the nodes (at least one node).")
    train_sets: int = Field(20, ge=1, le=10_000, description="Training seed sets per rate.")
    test_sets: int = Field(10, ge=1, le=10_000, description="Held-out seed sets per rate.")
    mc_runs: int = Field(100, ge=1, le=100_000, description="Monte Carlo runs per training seed set.")
    test_runs: int = Field(500, ge=1, le=100_000, description="Monte Carlo runs per held-out seed set (their "
                           "own noise is reported as surrogate.label_noise_mae).")
    arch: Literal["axelgnn", "gcn", "gat", "sage", "gcn2", "mlp"] = Field("axelgnn", description="The surrogate.")
    hidden: int = Field(32, ge=2, le=1024)
    layers: int = Field(4, ge=1, le=64, description="Message-passing layers (a cascade needs several hops).")
    epochs: int = Field(20, ge=1, le=10_000)
    batch: int = Field(16, ge=1, le=1024, description="Seed sets per minibatch (one forward over that many copies).")
    lr: float = Field(0.005, gt=0, le=MAX_LR)

    @field_validator("seed_rates")
    @classmethod
    def _rates(cls, value: list[float]) -> list[float]:
        if any(not 0.0 < rate < 1.0 for rate in value):
            raise ValueError(f"every seed rate must lie in (0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _threshold_is_lt_only(self) -> GraphInfluenceConfig:
        if self.threshold is not None and self.diffusion != "LT":
            raise ValueError(f"threshold applies to LT only, not {self.diffusion}")
        return self


def norm_step_matters(fixed_time: float, layers: int) -> bool:
    """Whether ``norm_step`` changes an L-layer AxelGNN-style model (``AxelConfig.norm_step``): only
    where each layer is an Euler step shorter than 1 (``0 < fixed_time < layers``); at dt = 1 the
    stepped LayerNorm is the LayerNorm itself. Here, not in :mod:`cleanse.graphs.axelgnn`, so that
    validating params imports no torch."""
    return 0.0 < fixed_time < layers

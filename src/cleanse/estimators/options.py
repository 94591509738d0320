"""Per-estimator options models: one section of ``scorers`` each (``scorers.<estimator>``).

Each is validated like the rest of ``params.yaml`` (:mod:`cleanse.config`): unknown keys are
refused and errors name the dotted key and the allowed values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from cleanse.config_base import OpenFraction, _probe_free, _Section


class LossOptions(_Section):
    statistic: Literal["loss", "margin"] = Field(
        "loss", description="loss: final cross-entropy; margin: minus the final logit margin."
    )


class CleanlabOptions(_Section):
    folds: int = Field(5, ge=2, description="K for the out-of-sample predicted probabilities.")
    method: Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"] = "self_confidence"
    n_jobs: int = Field(1, ge=1, description="Processes for cleanlab's find_label_issues. 1 (the default) "
                        "starts no pool: a pool forked inside a threaded worker (Prefect) can deadlock.")


class InfluenceOptions(_Section):
    """Inverse-curvature solvers for influence functions (see ``cleanse.estimators.influence``).

    Damping defaults: ``damping`` is added to the curvature on top of the L2 term already in the
    objective. 1e-3 suits exact/CG/LiSSA on the Gauss-Newton matrix of small models; EK-FAC uses
    the same value (Kronfluence's documented default is 1e-8, which is too small for 64-bit
    eigenvalue noise on tiny models; 0.1 x mean eigenvalue is its heuristic when unset).
    """

    solver: Literal["auto", "exact", "cg", "lissa", "ekfac"] = Field(
        "auto", description="auto = the most accurate of exact, preconditioned cg, ekfac (all layers), exact and "
        "ekfac on the last layer whose predicted cost (counted from the architecture, n and the options, in training "
        "epochs; nothing is timed, so the choice is deterministic) fits cost_budget_epochs; the choice and every "
        "prediction go to the score metadata."
    )
    curvature: Literal["ggn", "hessian"] = Field(
        "ggn",
        description="ggn: generalised Gauss-Newton (positive semi-definite, equal to the Hessian for logreg; "
        "CG then never meets negative curvature on non-convex nets); hessian: the true Hessian.",
    )
    damping: float = Field(1e-3, ge=0, description="lambda in (H + lambda I)^-1.")
    layers: Literal["all", "last"] = Field(
        "all", description="all: every parameter; last: the classifier head only (the rest held fixed)."
    )
    exact_max_params: int = Field(20000, ge=1, description="auto never takes exact above this many parameters "
                                  "(its (p, p) float64 matrices: 3 x 8 p^2 bytes, 9.6 GB at 20,000).")
    cost_budget_epochs: float = Field(5.0, gt=0, description="auto: the solver's predicted cost must be at most this "
                                      "many training epochs (both counted by the same analytic cost model).")
    cg_max_iter: int = Field(100, ge=1)
    cg_tol: float = Field(1e-5, gt=0, description="Relative residual at which CG stops.")
    cg_preconditioner: Literal["none", "ekfac"] = Field(
        "ekfac", description="ekfac: preconditioned CG with the EK-FAC inverse (few iterations); none: plain CG."
    )
    lissa_depth: int = Field(200, ge=1)
    lissa_repeats: int = Field(4, ge=1)
    lissa_scale: float | None = Field(
        None, description="LiSSA scaling s (must bound the Hessian's top eigenvalue); None = estimated."
    )
    lissa_batch_size: int = Field(128, ge=1)
    ekfac_fisher: Literal["expected", "sampled", "empirical"] = Field(
        "expected", description="expected: labels enumerated from the model's softmax (true Fisher); sampled: one "
        "label per sample drawn from it (seeded; 1/C of the work); empirical: observed labels."
    )


class TrakOptions(_Section):
    """TRAK (Park et al., ICML 2023); see ``cleanse.estimators.trak``."""

    proj_dim: int = Field(2048, ge=1, description="k, the projection dimension (capped at the number of parameters).")
    projection: Literal["rademacher", "gaussian"] = "rademacher"
    n_models: int = Field(1, ge=1, description="M independently trained models in the ensemble (model 0 is the trained one).")
    damping: float = Field(0.3, ge=0, description="lambda in (Phi^T Phi + lambda I)^-1, relative to the mean diagonal "
                                                   "(0.3: best linear datamodeling score on digits).")
    chunk_size: int = Field(256, ge=1, description="Samples per chunk of per-sample gradients.")


class FvmOptions(_Section):
    """Influence at (flat) validation minima (Ye et al., ICML 2025); see ``cleanse.estimators.influence_fvm``."""

    variant: Literal["fvm", "vm"] = Field("fvm", description="fvm: sharpness-aware fine-tune on val; vm: plain ERM.")
    sharpness: Literal["sam", "lpf"] = Field("sam", description="sam: SAM ascent step of radius rho; lpf: LPF-SGD, M=1 Gaussian perturbation of scale sigma.")
    rho: float = Field(0.05, ge=0, description="SAM radius.")
    sigma: float = Field(0.01, ge=0, description="LPF-SGD: perturbation scale relative to each tensor's norm / sqrt(size).")
    steps: int = Field(100, ge=0, description="Full-batch fine-tuning steps on the validation set.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the fine-tune.")
    solver: Literal["auto", "exact", "cg", "ekfac"] = Field("auto", description="Inverse of the validation curvature (auto: exact when small, else ekfac).")
    damping: float = Field(1e-2, ge=0, description="lambda; mandatory since n_val << p leaves H_val rank-deficient.")
    exact_max_params: int = Field(6000, ge=1)


class TracInOptions(_Section):
    checkpoints: Literal["all", "last"] = Field("all", description="Which saved checkpoints to sum over.")
    chunk_size: int = Field(2048, ge=1, description="Samples per chunk of per-sample gradient work.")
    normalize: Literal["auto", "none", "train", "both"] = Field(
        "auto", validate_default=True,
        description="Train -> query scores per checkpoint with unit training gradients ('train': large-gradient "
        "samples do not dominate a probe's proponents, and checkpoints where the probe is still being learned "
        "weigh most) or unit gradients on both sides ('both': gradient cosine); auto: train when query.kind "
        "names probes, else none.")

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize_flag(cls, value: Any) -> Any:
        # true/false were the options before 'train' existed; they meant cosine / raw.
        if isinstance(value, bool):
            return {True: "both", False: "none"}[value]
        return _probe_free("scorers.tracin.normalize", value)


class SpectralOptions(_Section):
    directions: int = Field(1, ge=1, description="Top singular directions per class whose squared projections are summed.")


class ActivationClusteringOptions(_Section):
    n_components: int = Field(10, ge=1, description="Principal components kept before 2-means (Chen et al. use 10).")


class MemorizationOptions(_Section):
    """Feldman & Zhang (2020) subsampled memorization / influence (``cleanse.estimators.memorization``)."""

    n_models: int = Field(1000, ge=2, description="K: subset models trained (the paper: 2,000-4,000).")
    subset_fraction: OpenFraction = Field(0.7, description="Each model trains on round(p * n) random samples.")
    statistic: Literal["accuracy", "probability"] = Field(
        "accuracy", description="accuracy: 0/1 correctness (the paper); probability: softmax probability of the label."
    )
    epochs: int | None = Field(None, ge=1, description="Epochs of each subset model (None = model.epochs).")
    shard_size: int = Field(250, ge=1, description="Models per shard (one cached file, one flow task).")
    pair_mem_threshold: float = Field(0.25, description="Long-tail report: mem of a high-influence pair's train side.")
    pair_infl_threshold: float = Field(0.15, description="Long-tail report: infl of a high-influence pair.")
    removal_threshold: float = Field(0.25, description="Marginal utility: remove the samples with mem >= this.")
    utility_seeds: int = Field(3, ge=1, description="Marginal utility: retrains per arm (mean and std reported).")
    top_k: int = Field(32, ge=1, description="Long-tail report: most-memorized samples shown.")


class FineOptions(_Section):
    """Options of the single-run f-INE estimator (``scorers.fine``)."""

    query: Literal["self", "val"] = Field("self", description="self: each unit's own loss; val: the validation loss.")
    signal: Literal["loss_change", "alignment"] = Field(
        "loss_change", description="per-round signal: observed change of the query, or its first-order gradient part.")
    units: Literal["samples", "groups"] = Field("samples", description="groups: the data's 'group' column.")
    rounds_per_epoch: int = Field(4, ge=1, description="inclusion is redrawn every round; a round is one pass over "
                                                       "the included rows (about inclusion x n rows)")
    inclusion: float = Field(0.25, gt=0.0, lt=1.0, description="probability that a unit is in a round; "
                                                                "rounds_per_epoch x inclusion = 1 keeps the "
                                                                "ordinary number of steps")
    level: float = Field(0.95, gt=0.0, lt=1.0, description="confidence level of [mu_lo, mu_hi]")
    centering: Literal["none", "round", "class"] = Field(
        "class", description="subtract, per round, the mean signal of the withheld units (round) or of the withheld "
                             "units with the same label (class): removes the training-progress drift shared by all")
    pairwise_detrend: int = Field(4, ge=0, description="train -> query (probe) scores: subtract from each round's "
                                                       "probe-loss signal the mean of this many rounds on either "
                                                       "side (0 = off): the training progress every unit shares")


class TrustedOptions(_Section):
    """The trusted-data baseline (``cleanse.estimators.trusted``): a model fitted on the validation
    split alone scores each training sample by its loss under the given label."""

    model: Literal["logreg", "run"] = Field(
        "logreg", description="logreg: scikit-learn logistic regression on the flattened features; run: the "
        "run's own architecture and recipe (model.*), trained on the validation split.")
    C: float = Field(1.0, gt=0, description="logreg: inverse L2 strength (scikit-learn's C).")
    max_iter: int = Field(1000, ge=1, description="logreg: L-BFGS iterations.")
    probability_floor: float = Field(1e-6, gt=0, lt=1, description="Probabilities are clipped to at least "
                                     "this before the log: bounds the loss, and is the probability given to "
                                     "a label whose class the validation split lacks.")


class HoldoutEnsembleOptions(_Section):
    """The out-of-subset, early-stopped ensemble (``cleanse.estimators.holdout_ensemble``)."""

    n_models: int = Field(8, ge=4, description="K models, in K/2 pairs of complementary random halves of the "
                          "training set (each sample is held out by exactly K/2 models); must be even.")
    statistic: Literal["margin", "loss"] = Field(
        "margin", description="Over the models that held a sample out: margin: max_{j != y} p_j - p_y of their "
        "mean probabilities; loss: their mean cross-entropy of the given label y.")
    stop_on: Literal["accuracy", "loss"] = Field(
        "loss", description="Each model's stopping epoch maximises its held-out half's accuracy (ties: lower "
        "loss) or minimises its held-out loss, both under the given training labels.")
    patience: int = Field(10, ge=1, description="Stop once no model has improved for this many epochs.")
    max_epochs: int | None = Field(None, ge=1, description="Epoch cap (None = model.epochs).")

    @field_validator("n_models")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"must be even (pairs of complementary halves), got {value}")
        return value


class ScorerOptions(_Section):
    """Per-estimator options. Changing one section reruns only that estimator downstream."""

    loss: LossOptions = LossOptions()
    cleanlab: CleanlabOptions = CleanlabOptions()
    influence: InfluenceOptions = InfluenceOptions()
    influence_val: InfluenceOptions = InfluenceOptions()
    tracin: TracInOptions = TracInOptions()
    memorization: MemorizationOptions = MemorizationOptions()
    spectral_signatures: SpectralOptions = SpectralOptions()
    activation_clustering: ActivationClusteringOptions = ActivationClusteringOptions()
    trak: TrakOptions = TrakOptions()
    influence_fvm: FvmOptions = FvmOptions()
    fine: FineOptions = FineOptions()
    trusted: TrustedOptions = TrustedOptions()
    holdout_ensemble: HoldoutEnsembleOptions = HoldoutEnsembleOptions()

"""Configuration: pydantic models of ``params.yaml``, validated once at the boundary.

``params.yaml`` has one section per pipeline stage. Unknown keys are rejected, and every error
names the dotted key and the allowed values, e.g. ``corruption.kind: 'flip' is not one of
'none', 'label_flip', 'backdoor'``.

:func:`fingerprint` hashes the parts of the configuration that a stage depends on; it is stored
beside every artifact and as an MLflow tag.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cleanse.errors import ConfigError


class _Section(BaseModel):
    # allow_inf_nan=False: inf or nan in any number (lr=inf, damping=nan) is refused at the boundary
    # instead of training a NaN model.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _open_fraction(value: float, *, allow_zero: bool = False) -> float:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"must lie in {interval}, got {value}")
    return value


# The settings whose default depends on whether the run has probes (query.kind other than none):
# dotted key -> (value without probes, value with probes). With probes, the values documented in
# docs/benchmarks.md ("Backdoor: probe attribution and iterative cleansing"): geometric checkpoints
# and unit training gradients for TracIn, iterative cleansing. Without, self-influence keeps even
# checkpoints and raw TracIn scores, and a one-shot retrain.
AUTO_SETTINGS: dict[str, tuple[Any, Any]] = {
    "model.checkpoint_spacing": ("even", "geometric"),
    "scorers.tracin.normalize": ("none", "train"),
    "cleansing.iterative": (False, True),
}
_UNSET = object()


def _probe_free(key: str, value: Any) -> Any:
    """A section validated on its own (no ``query.kind`` in sight) reads ``auto`` as the value without probes."""
    return AUTO_SETTINGS[key][0] if value == "auto" else value


def _items(node: Any) -> dict[str, Any] | None:
    """A section as a mutable mapping (a model: only the fields set explicitly); None if it is neither."""
    if isinstance(node, BaseModel):
        return node.model_dump(exclude_unset=True)
    return dict(node) if isinstance(node, dict) else None


def _lookup(node: Any, path: list[str]) -> Any:
    for key in path:
        items = _items(node)
        if items is None or key not in items:
            return _UNSET
        node = items[key]
    return node


def _replaced(node: Any, path: list[str], value: Any) -> Any:
    items = {} if node is _UNSET else _items(node)
    if items is None:  # not a section: validation names it
        return node
    items[path[0]] = value if len(path) == 1 else _replaced(items.get(path[0], _UNSET), path[1:], value)
    return items


def resolve_auto(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (what :class:`Params` validates) with each :data:`AUTO_SETTINGS` key that is unset or
    ``auto`` given its value for the run's ``query.kind``. The one place these defaults are decided:
    :class:`Params` calls it before validating, so the stages, fingerprints, MLflow params and the CLI
    only ever see the resolved values, and ``auto`` fingerprints as the value it stands for. An
    explicit value always wins (``cleansing.iterative: true`` without probes is still refused)."""
    kind = _lookup(raw, ["query", "kind"])
    probes = kind is not _UNSET and kind != "none"
    out = dict(raw)
    for key, (without, with_probes) in AUTO_SETTINGS.items():
        path = key.split(".")
        if _lookup(out, path) in (_UNSET, "auto"):
            out = _replaced(out, path, with_probes if probes else without)
    return out


class DataConfig(_Section):
    """Where the data comes from and how it is split."""

    source: str = Field(
        "sklearn:digits",
        description="sklearn:digits | sklearn:breast_cancer | sklearn:wine | sklearn:iris, "
        "or a .parquet / .npz file (local path or s3:// URI).",
    )
    val_fraction: float = Field(0.15, description="Fraction of all samples held out for validation.")
    test_fraction: float = Field(0.25, description="Fraction of all samples held out for testing.")
    features: str | list[str] = Field(
        "features",
        description="Parquet only: the name of a list/array column, or a list of scalar feature columns.",
    )
    label_column: str = Field("label", description="Parquet only: the integer label column.")
    id_column: str | None = Field(
        None, description="Parquet only: an int64 id column; by default the row number is the id."
    )
    image_shape: list[int] | None = Field(
        None, description="User data only: (C, H, W) to reshape flat features into images."
    )
    standardize: bool = Field(True, description="Tabular data: z-score features with train statistics.")

    @field_validator("val_fraction", "test_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        return _open_fraction(value)

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:.2f} leaves "
                "too little training data; keep the sum below 0.9"
            )
        return self


class CorruptionConfig(_Section):
    """Corruption injected into the training split, with ground truth kept."""

    kind: Literal["none", "label_flip", "backdoor"] = "label_flip"
    fraction: float = Field(0.1, description="Fraction of training samples to corrupt, in (0, 1).")
    mode: Literal["symmetric", "pair"] = Field(
        "symmetric", description="label_flip: uniform over other classes, or y -> (y + 1) mod C."
    )
    target_class: int = Field(0, ge=0, description="backdoor: the class the trigger maps to.")
    trigger_size: int = Field(3, ge=1, description="backdoor: patch side (images) or #features (tabular).")

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        return _open_fraction(value)


# Far above any useful value (Adam/SGD use 1e-4..1, L-BFGS 1; L2 above 1 already swamps the loss):
# larger values only diverge, so they are refused up front instead of failing after the stage.
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 100.0
# numpy, torch and scikit-learn all take 32-bit seeds; derived seeds add offsets up to ~1e6.
MAX_SEED = 2**31 - 1
# MLflow's experiment name column (String(256) in its SQL store).
MAX_EXPERIMENT_NAME = 256


class ModelConfig(_Section):
    """Architecture and training recipe (one trainer for every model)."""

    arch: Literal["logreg", "mlp", "cnn"] = "mlp"
    hidden: list[int] | None = Field(
        None, description="MLP hidden widths (default [64]); CNN channel counts (default [16, 32])."
    )
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0, le=MAX_LR, description=f"Learning rate, in (0, {MAX_LR:g}].")
    weight_decay: float = Field(1e-3, ge=0, le=MAX_WEIGHT_DECAY,
                                description="L2 coefficient: loss + wd/2 * ||theta||^2.")
    optimizer: Literal["adam", "sgd", "lbfgs"] = "adam"
    checkpoints: int = Field(5, ge=1, description="Checkpoints saved for TracIn (the last is the final epoch).")
    checkpoint_spacing: Literal["auto", "even", "geometric"] = Field(
        "auto", validate_default=True,
        description="even: evenly spaced epochs; geometric: log-spaced from epoch 1, dense where the loss falls "
        "fastest (runs that fit poisons early need it for probe attribution; docs/benchmarks.md, backdoor); "
        "auto: geometric when query.kind names probes, else even (self-influence: early checkpoints dilute the "
        "mislabel signal).")

    @field_validator("hidden", mode="before")
    @classmethod
    def _hidden_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @field_validator("checkpoint_spacing", mode="before")
    @classmethod
    def _spacing_auto(cls, value: Any) -> Any:
        return _probe_free("model.checkpoint_spacing", value)

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(width < 1 for width in value)):
            raise ValueError(f"must be one or more positive widths, got {value}")
        return value


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
    subset_fraction: float = Field(0.7, description="Each model trains on round(p * n) random samples.")
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

    @field_validator("subset_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        return _open_fraction(value)


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


class DetectConfig(_Section):
    """How many samples each estimator flags."""

    budget: Literal["auto", "fraction", "count"] = Field(
        "auto", description="auto: chosen from the score distribution alone (never the ground truth)."
    )
    fraction: float = Field(0.1, description="budget=fraction: flag this fraction of the training set.")
    count: int = Field(50, ge=1, description="budget=count: flag this many samples.")
    max_fraction: float = Field(0.5, description="budget=auto: never flag more than this fraction.")

    @field_validator("fraction", "max_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        return _open_fraction(value)


class QueryConfig(_Section):
    """The probe set whose observed behaviour is attributed to training samples (train -> query).

    ``none`` keeps self-influence. Otherwise every estimator that has train -> query scores ranks
    training samples by their support for the probes' labels (the behaviour to explain), and the
    estimators without such scores ignore the probes.
    """

    kind: Literal["none", "val_errors", "triggered", "file"] = Field(
        "none", description="none: self-influence; val_errors: misclassified validation samples, labelled with "
        "the wrong prediction; triggered: triggered validation inputs of non-target classes, labelled with the "
        "backdoor's target class (needs corruption.kind: backdoor); file: probes from query.path.")
    size: int = Field(8, ge=1, description="Number of probes; the remaining candidates are held out for stopping.")
    path: str | None = Field(None, description="kind=file: a .parquet (features, label columns) or .npz (X, y).")
    aggregate: Literal["normalized_mean", "rank_mean"] = Field(
        "normalized_mean", description="normalized_mean: each probe's row divided by its root mean square, then "
        "averaged; rank_mean: mean per-probe percentile rank. Either way no single probe dominates.")
    contrast: Literal["none", "reference"] = Field(
        "reference", description="reference: subtract the part of the probes' support that also supports the same "
        "labels on ordinary, correctly classified validation inputs (support for the label in general, not for "
        "the misbehaviour); none: plain support.")

    @model_validator(mode="after")
    def _path_for_file(self) -> QueryConfig:
        if self.kind == "file" and not self.path:
            raise ValueError("kind 'file' needs query.path (a .parquet or .npz of probe inputs and labels)")
        if self.kind != "file" and self.path:
            raise ValueError(f"query.path is only read with kind 'file', not {self.kind!r}")
        return self


class CleansingConfig(_Section):
    """Iterative (group-aware) cleansing in the retrain stage: remove the top ``step``, retrain,
    re-score, until the behaviour on held-out probes is gone or the budget is spent. Only the
    estimators with train -> probe scores iterate; ``iterative`` defaults to on exactly when the run
    has probes (``query.kind``; see :data:`AUTO_SETTINGS`)."""

    iterative: bool = Field(
        "auto", validate_default=True,  # type: ignore[assignment]  # resolved to a bool before it is stored
        description="auto (on iff query.kind names probes) | true | false. On: estimators with train -> probe "
        "scores (influence, tracin, ...) remove, retrain and re-score each round; the others are retrained once "
        "from their flags. Off: remove the detect stage's flags once.")
    step: int = Field(12, ge=1, description="Samples removed per round.")
    max_fraction: float = Field(0.15, description="Budget: never remove more than this fraction of the training set.")
    max_rounds: int = Field(20, ge=1)
    stop_rate: float = Field(0.02, ge=0, le=1, description="Stop once at most this share of held-out probes "
                             "still shows the behaviour (is predicted as the probe label).")
    refresh_probes: bool = Field(True, description="From round 2 on, attribute only the probes the retrained "
                                 "model still gets wrong (all of them if it gets none wrong).")
    readmit: bool = Field(True, description="Once the behaviour is gone, put back the removed samples whose label "
                          "is none of the probes' labels or is the one the cleansed model predicts, retrain, and "
                          "keep that only if the behaviour stays gone.")

    @field_validator("iterative", mode="before")
    @classmethod
    def _iterative_auto(cls, value: Any) -> Any:
        if value != "auto" and not isinstance(value, bool):
            raise ValueError(f"must be auto, true or false, got {_shown(value)}")
        return _probe_free("cleansing.iterative", value)

    @field_validator("max_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        return _open_fraction(value)
class RecommendConfig(_Section):
    """How the one recommended cleaned model is chosen (``cleanse.recommend``): never from the
    ground truth or the test split."""

    budget_factors: list[float] = Field(
        [0.5, 0.75, 1.25, 1.5], description="The winning estimator's ranking is also retrained at these multiples "
        "of its automatic budget; the best by the same rule (held-out probe behaviour, then validation accuracy, "
        "then fewer removed) is recommended. [] keeps each estimator's own budget.")

    @field_validator("budget_factors")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(factor <= 0 for factor in value):
            raise ValueError(f"every factor must be positive, got {value}")
        return value


class EvaluateConfig(_Section):
    """Optional evaluations in the report (off by default: each retrains many models)."""

    lds: bool = Field(False, description="Linear datamodeling score of every pairwise estimator.")
    lds_subsets: int = Field(16, ge=3, description="Random half-subsets retrained for the LDS.")
    lds_queries: int = Field(16, ge=1, description="Test points the LDS averages over.")
    stability: bool = Field(False, description="Rank stability of every estimator across training seeds.")
    stability_seeds: int = Field(3, ge=2, description="Training seeds compared for stability.")


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="Log the run to MLflow.")
    experiment: str = "cleanse"
    register_as: str | None = Field(
        None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][\w.\-]*$",
        description="Register the base model and each cleaned model as versions of this MLflow registered "
                    "model (aliases `base`, `cleaned-<estimator>`); none = log the models without registering.")


class Params(_Section):
    """The whole of ``params.yaml``."""

    seed: int = 0
    data: DataConfig = DataConfig()
    corruption: CorruptionConfig = CorruptionConfig()
    model: ModelConfig = ModelConfig()
    estimators: list[str] = Field(
        ["loss", "cleanlab", "influence", "influence_val", "tracin", "trusted", "holdout_ensemble"],
        description="Estimators to run; each proposes a cleaned model and the recommendation chooses among them. "
        "trusted (validation split) and holdout_ensemble (no validation labels) are the ones it most often needs.")
    scorers: ScorerOptions = ScorerOptions()
    detect: DetectConfig = DetectConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    query: QueryConfig = QueryConfig()
    cleansing: CleansingConfig = CleansingConfig()
    recommend: RecommendConfig = RecommendConfig()

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto(cls, data: Any) -> Any:
        return resolve_auto(data) if isinstance(data, dict) else data

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int) -> int:
        if not 0 <= value <= MAX_SEED:
            raise ValueError(f"must be an integer in 0..{MAX_SEED} (numpy, torch and scikit-learn take 32-bit "
                             f"seeds), got {value}")
        return value

    @model_validator(mode="after")
    def _experiment_name_fits(self) -> Params:
        name = self.tracking.experiment
        if not name.strip() or len(name) > MAX_EXPERIMENT_NAME or any(not ch.isprintable() for ch in name):
            shown = name if len(name) <= 40 else f"{name[:40]}..."
            raise ValueError(f"tracking.experiment: must be 1..{MAX_EXPERIMENT_NAME} printable characters "
                             f"(MLflow's limit), got {len(name)} characters: {shown!r}")
        return self

    @model_validator(mode="after")
    def _query_fits_corruption(self) -> Params:
        if self.query.kind == "triggered" and self.corruption.kind != "backdoor":
            raise ValueError(
                f"query.kind 'triggered' stamps the backdoor trigger on probes and needs corruption.kind: backdoor "
                f"(got {self.corruption.kind!r}); use 'file' for your own probes or 'val_errors'")
        if self.cleansing.iterative and self.query.kind == "none":
            raise ValueError("cleansing.iterative needs probes to stop on; set query.kind (val_errors, triggered "
                             "or file)")
        return self

    @field_validator("estimators")
    @classmethod
    def _known_estimators(cls, value: list[str]) -> list[str]:
        from cleanse.estimators import registry

        known = registry.names()
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(
                f"unknown estimator {', '.join(map(repr, unknown))}; allowed: {', '.join(known)}"
            )
        if not value:
            raise ValueError(f"name at least one estimator; allowed: {', '.join(known)}")
        if len(set(value)) != len(value):
            raise ValueError(f"estimators are listed twice: {value}")
        return value


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _format_validation_error(error: ValidationError) -> str:
    """One line (the CLI prints ``error: <this>``): every problem as ``dotted.key: message``."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if item["type"] == "literal_error":
            expected = item.get("ctx", {}).get("expected", "")
            message = f"{_shown(item['input'])} is not one of {expected}"
        elif item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "finite_number":
            message = f"must be a finite number, got {_shown(item['input'])}"
        elif item["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            message = f"{message}, got {_shown(item['input'])}"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        problems.append(f"{key}: {message}" if key else message)
    return "invalid configuration: " + "; ".join(" ".join(problem.split()) for problem in problems)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``dotted.key=value`` into its key path and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``dotted.key=value`` override applied."""
    merged = json.loads(json.dumps(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Read, override and validate a ``params.yaml``. ``None`` means the embedded defaults."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"params file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"params file {path} is not UTF-8 text (byte {exc.start}); expected a YAML file") from None
        except OSError as exc:
            raise ConfigError(f"params file {path} cannot be read: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            message = " ".join(str(exc).split())  # YAML's messages span lines; the CLI prints one
            raise ConfigError(f"params file {path} is not valid YAML: {message}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        raw = loaded or {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def fingerprint(*parts: BaseModel | dict[str, Any] | list[Any] | str | float) -> str:
    """A 16-hex-digit sha256 of the given configuration parts, stable across processes."""
    payload = [part.model_dump(mode="json") if isinstance(part, BaseModel) else part for part in parts]
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def flatten(params: Params) -> dict[str, str]:
    """Dotted-key view of the configuration (for MLflow params)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", params.model_dump(mode="json"))
    return out

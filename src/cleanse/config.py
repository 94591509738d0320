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
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator, model_validator

from cleanse.config_base import (  # noqa: F401  (re-exported: the configuration's public names)
    AUTO_SETTINGS,
    MAX_EXPERIMENT_NAME,
    MAX_LR,
    MAX_SEED,
    MAX_WEIGHT_DECAY,
    _format_validation_error,
    _open_fraction,
    _probe_free,
    _Section,
    _shown,
    apply_overrides,
    parse_override,
    resolve_auto,
    refuse_probes,
    resolve_auto_outside_model,
)
from cleanse.errors import ConfigError
from cleanse.families.classification.config import CorruptionConfig, DataConfig, ModelConfig
from cleanse.families.gan.config import (
    GanCorruptionConfig,
    GanDataConfig,
    GanEvaluateFields,
    GanMetricsConfig,
    GanModelConfig,
    check_fits_data,
)
from cleanse.families.regression.config import (
    RegressionCorruptionConfig,
    RegressionDataConfig,
    RegressionModelConfig,
)
# Re-exported for the estimators, tests and benchmarks that import them from here; a new estimator
# imports its own ``<module>_options`` and adds nothing here (scorers is assembled from the registry).
from cleanse.estimators.activations_options import ActivationClusteringOptions, SpectralOptions  # noqa: F401
from cleanse.estimators.confident_learning_options import CleanlabOptions  # noqa: F401
from cleanse.estimators.fine_options import FineOptions  # noqa: F401
from cleanse.estimators.holdout_ensemble_options import HoldoutEnsembleOptions  # noqa: F401
from cleanse.estimators.influence_fvm_options import FvmOptions  # noqa: F401
from cleanse.estimators.influence_options import InfluenceOptions  # noqa: F401
from cleanse.estimators.loss_options import LossOptions  # noqa: F401
from cleanse.estimators.memorization_options import MemorizationOptions  # noqa: F401
from cleanse.estimators.options import ScorerOptions
from cleanse.estimators.tracin_options import TracInOptions  # noqa: F401
from cleanse.estimators.trak_options import TrakOptions  # noqa: F401
from cleanse.estimators.trusted_options import TrustedOptions  # noqa: F401


class DetectConfig(_Section):
    """How many samples each estimator flags."""

    budget: Literal["auto", "fraction", "count", "outlier"] = Field(
        "auto", description="auto: chosen from the score distribution alone (never the ground truth); outlier: "
        "the scores whose robust z exceeds the Bonferroni Gaussian level for detect.alpha (may flag none)."
    )
    fraction: float = Field(0.1, description="budget=fraction: flag this fraction of the training set.")
    count: int = Field(50, ge=1, description="budget=count: flag this many samples.")
    max_fraction: float = Field(0.5, description="budget=auto or outlier: never flag more than this fraction.")
    alpha: float = Field(0.05, description="budget=outlier (and cleansing.step: outlier): the chance that an "
                         "all-ordinary Gaussian score set has any flag.")

    @field_validator("fraction", "max_fraction", "alpha")
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
        "auto", validate_default=True,  # resolved to a bool (resolve_auto) before it is stored
        description="auto (on iff query.kind names probes) | true | false. On: estimators with train -> probe "
        "scores (influence, tracin, ...) remove, retrain and re-score each round; the others are retrained once "
        "from their flags. Off: remove the detect stage's flags once.")
    step: Annotated[int, Field(ge=1)] | Literal["outlier"] = Field(
        12, description="Samples removed per round; outlier: the survivors whose score is a high outlier "
        "(cleanse.detect.outlier_mask at detect.alpha), stopping when none is.")
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
        [0.5, 0.75, 1.25, 1.5], description="Only when the validation split gives no noise-count estimate (too "
        "small to cross-validate; otherwise the best rankings are cut at that estimate): the winning estimator's "
        "ranking is also retrained at these multiples of its automatic budget, and the best by the same rule "
        "(held-out probe behaviour, then validation accuracy, then fewer removed) is recommended. [] keeps each "
        "estimator's own budget.")

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
    retrain_seeds: int = Field(1, ge=1, le=32, description="Training seeds of each retrain: stages/retrain_seeds.py")


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="Log the run to MLflow.")
    experiment: str = "cleanse"
    register_as: str | None = Field(
        None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][\w.\-]*$",
        description="Register the base model and each cleaned model as versions of this MLflow registered "
                    "model (aliases `base`, `cleaned-<estimator>`); none = log the models without registering.")


class Params(_Section):
    """The whole of ``params.yaml`` for the default family, classification (``family`` absent or
    ``classification``); :class:`RegressionParams` is the regression family's. :func:`load_params`
    chooses by ``family`` (a discriminated union, :data:`AnyParams`)."""

    family: Literal["classification"] = Field(
        "classification", description="The family of data and model (cleanse.families): classification | regression "
        "| gan | diffusion.")
    seed: int = 0
    data: DataConfig = DataConfig()
    corruption: CorruptionConfig = CorruptionConfig()
    model: ModelConfig = ModelConfig()
    estimators: list[str] = Field(
        ["loss", "cleanlab", "influence", "influence_val", "tracin", "trusted", "holdout_ensemble", "cofit_svm"],
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

    @model_validator(mode="after")
    def _estimators_support_family(self) -> Params:
        from cleanse.estimators import registry

        for name in self.estimators:
            registry.check_supports(name, self.family)
        return self


class RegressionParams(Params):
    """``params.yaml`` with ``family: regression``: the data, corruption and model sections are the
    regression family's (:mod:`cleanse.families.regression.config`); probes are classification's
    only, so ``query.kind`` stays ``none``."""

    # The family's own sections narrow or replace classification's (pydantic validates the
    # narrower values; mypy sees a subclass changing a field's type).
    family: Literal["regression"] = "regression"  # type: ignore[assignment]
    data: RegressionDataConfig = RegressionDataConfig()
    corruption: RegressionCorruptionConfig = RegressionCorruptionConfig()  # type: ignore[assignment]
    model: RegressionModelConfig = RegressionModelConfig()
    estimators: list[str] = Field(
        ["loss", "influence", "influence_val", "tracin", "trak"],
        description="Estimators to run (those that support the regression family).")

    @model_validator(mode="after")
    def _no_probes(self) -> RegressionParams:
        refuse_probes(self.query.kind, "regression")
        return self


class GanEvaluateConfig(EvaluateConfig, GanEvaluateFields):
    """The shared evaluations and the GAN family's (:class:`cleanse.families.gan.config.GanEvaluateFields`)."""


class GanParams(Params):
    """``params.yaml`` with ``family: gan`` (:mod:`cleanse.families.gan`); no probes."""

    family: Literal["gan"] = "gan"  # type: ignore[assignment]
    data: GanDataConfig = GanDataConfig()  # type: ignore[assignment]
    corruption: GanCorruptionConfig = GanCorruptionConfig()  # type: ignore[assignment]
    model: GanModelConfig = GanModelConfig()  # type: ignore[assignment]
    metrics: GanMetricsConfig = GanMetricsConfig()
    evaluate: GanEvaluateConfig = GanEvaluateConfig()
    estimators: list[str] = Field(["gan_influence", "isolation_forest"],
                                  description="Estimators to run (those that support the gan family).")

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto(cls, data: Any) -> Any:
        return resolve_auto_outside_model(data)  # model.checkpoint_spacing is no GAN setting

    @model_validator(mode="after")
    def _fits_the_data(self) -> GanParams:
        refuse_probes(self.query.kind, "gan")
        check_fits_data(self.data, self.corruption, self.model, self.metrics, self.evaluate)
        return self


def _family_of(raw: Any) -> str:
    if isinstance(raw, dict):
        return str(raw.get("family", "classification"))
    return str(getattr(raw, "family", "classification"))


# Every family's params model by name: the three defined here, then those in their own packages
# (imported now that Params, which they subclass, exists).
from cleanse.families import params_models  # noqa: E402

FAMILY_PARAMS: dict[str, type[Params]] = {"classification": Params, "regression": RegressionParams,
                                          "gan": GanParams, **params_models()}
# The configuration of any family, chosen by the ``family`` key (absent = classification).
AnyParams: Any = Annotated[
    Union[tuple(Annotated[model, Tag(name)] for name, model in FAMILY_PARAMS.items())],
    Discriminator(_family_of),
]
_ANY_PARAMS: TypeAdapter[Params] = TypeAdapter(AnyParams)


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
    return validate_params(raw)


def validate_params(raw: dict[str, Any]) -> Params:
    """Validate a raw ``params.yaml`` mapping into its family's params model; errors as one line
    naming the dotted keys (``family: 'x' is not one of ...`` for an unknown family)."""
    family = _family_of(raw)
    if family not in FAMILY_PARAMS:
        raise ConfigError(f"invalid configuration: family: {_shown(family)} is not one of "
                          + ", ".join(map(repr, FAMILY_PARAMS)))
    try:
        return _ANY_PARAMS.validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, tagged=True)) from None


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

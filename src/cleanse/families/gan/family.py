"""The GAN family (``family: gan``): real instances (2-D points or images) a GAN is trained on, the
GAN's evaluation metrics as the outcome, and "without these instances" verified by replaying the
traced window without them (the ground truth of Terashita, Ohashi and Hara, "Data Cleansing for
GANs", TNNLS 2025, and of the ICLR 2021 "Influence Estimation for GANs") and, reported beside it
with the suffix ``_scratch``, by retraining from scratch with the same seed, batches and latents.

The fitted model is a :class:`FittedGan`: CORE's :class:`~cleanse.families.gan.training.TrainedGan`
(G and D parameters, the traced window, the loss history), the feature classifier FID and IS are
computed on (images only; trained once per run on the training split's images and labels, stored
in ``features/`` beside the GAN) and the metric settings, so that its outcome needs nothing else.

Outcome keys: ``test_<m>`` (exact, on the test split) and ``val_<m>`` (the validation split, what
the recommendation reads) for every metric ``m`` of ``metrics.names`` (default ``all`` for 2-D,
``fid`` and ``is`` for images; the first is the headline). Direction: ALL and IS higher is better,
FID and D-loss lower.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch

from cleanse.errors import ConfigError
from cleanse.families.base import WithoutUnitLoss
from cleanse.families.gan.config import METRIC_NAMES

if TYPE_CHECKING:
    from cleanse.config import GanParams, Params
    from cleanse.data.dataset import DatasetMeta, Split, StagedData
    from cleanse.families.gan.features import FeatureNet
    from cleanse.families.gan.training import TrainedGan

DIRECTIONS = {"all": 1.0, "fid": -1.0, "is": 1.0, "dloss": -1.0}
FEATURES = "features/feature_net.safetensors"


@dataclass
class FittedGan:
    """A trained GAN with what its outcome needs: ``metrics`` (names, headline first),
    ``n_latents`` and ``seed`` of the fixed latents, and the feature classifier (images)."""

    trained: TrainedGan
    metrics: tuple[str, ...]
    n_latents: int
    seed: int
    feature_net: FeatureNet | None = None
    # Metric objects by (name, which real set): their real-set statistics are computed once per
    # stage and shared by every model derived from this one (replays, retrains).
    cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, Any]] = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> Any:
        return self.trained.spec

    def derived(self, trained: TrainedGan) -> FittedGan:
        """Another fit of the same GAN (a replay or a retrain), sharing the feature net and cache."""
        return replace(self, trained=trained)

    def metric(self, name: str, real: np.ndarray, train: np.ndarray) -> Any:
        """The metric ``name`` on ``real`` ``(m, *data_shape)`` (cached by the array's identity)."""
        from cleanse.families.gan.metrics import make_metric

        key = (name, id(real))
        held = self.cache.get(key)
        if held is None or held[0] is not real or held[1] is not train:  # an id is reused once its array is freed
            dtype = self.spec.torch_dtype
            metric = make_metric(name, real=torch.as_tensor(real, dtype=dtype), spec=self.spec,
                                 n_latents=self.n_latents, seed=self.seed, feature_net=self.feature_net,
                                 train_data=torch.as_tensor(train, dtype=dtype))
            held = self.cache[key] = (real, train, metric)  # the arrays held, so their ids stay theirs
        return held[2]


@dataclass(frozen=True)
class GanContext:
    """What the GAN estimators read: the staged splits (``train`` row i = data row i), the fitted
    GAN, the run's params (metric settings) and seed. Estimators must not read ``is_corrupted``."""

    train: Split
    val: Split
    meta: DatasetMeta
    model: FittedGan
    params: Any
    seed: int
    cache_dir: Path | None = None

    def data(self, split: Split | None = None) -> torch.Tensor:
        """``split``'s (default: training) instances as a tensor of the GAN's dtype."""
        return instances(self.train if split is None else split, self.model.spec)


def instances(split: Split, spec: Any) -> torch.Tensor:
    """``split``'s instances ``(n, *data_shape)`` as a tensor of the GAN's dtype (row i = data row i)."""
    return torch.as_tensor(split.features, dtype=spec.torch_dtype)


def _gan(params: Params) -> GanParams:
    """``params`` as the GAN family's (the stages pass the shared base type)."""
    return cast("GanParams", params)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes (the feature classifier's fingerprint)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def spec_for(params: Params, meta: DatasetMeta) -> Any:
    from cleanse.families.gan.nets import GanSpec

    model = _gan(params).model
    return GanSpec(arch=model.arch, data_shape=tuple(meta.feature_shape), z_dim=model.z_dim,
                   hidden_g=tuple(model.hidden_g), hidden_d=tuple(model.hidden_d),
                   dtype=model.resolved_dtype(params.data.source))  # type: ignore[arg-type]


def recipe_for(params: Params) -> Any:
    from cleanse.families.gan.step import GanRecipe

    model = _gan(params).model
    fields = ("epochs", "batch_size", "lr_d", "lr_g", "optimizer", "momentum", "betas", "weight_decay", "updates",
              "trace_epochs")
    return GanRecipe(**{name: getattr(model, name) for name in fields})


class GanFamily(WithoutUnitLoss):
    name: ClassVar[str] = "gan"
    target_dtype: ClassVar[torch.dtype] = torch.int64
    outcome_keys: ClassVar[tuple[str, ...]] = tuple(f"test_{name}" for name in METRIC_NAMES)
    selection: ClassVar[tuple[str, float]] = ("val_all", 1.0)
    flagged_plots: ClassVar[str] = "cleanse.families.gan.plots:write_gan_plots"
    mlflow_pyfunc: ClassVar[bool] = False
    # A GAN's real instances reach only the discriminator: no per-instance supervised loss.
    own_estimators: ClassVar[str] = "gan_influence and isolation_forest"

    def outcome_keys_in(self, outcome: dict[str, Any]) -> tuple[str, ...] | None:
        """``test_<m>`` keys in the order recorded (the headline metric first), then the same keys
        of the retrain from scratch (``test_<m>_scratch``, present after a removal)."""
        keys = tuple(key for key in outcome if key.startswith("test_") and key[5:] in METRIC_NAMES)
        return (*keys, *(f"{key}_scratch" for key in keys)) if keys else None

    def selection_of(self, outcome: dict[str, Any]) -> tuple[str, float]:
        """The headline metric on the validation split and its direction (``val_all`` +1, ``val_fid`` -1)."""
        for key in outcome:
            if key.startswith("val_") and key[4:] in METRIC_NAMES:
                return key, DIRECTIONS[key[4:]]
        raise KeyError(f"no validation metric in the GAN outcome's keys {sorted(outcome)}")

    def stage(self, params: Params) -> StagedData:
        from cleanse.families.gan.data import stage_gan_data

        data, corruption = _gan(params).data, _gan(params).corruption
        return stage_gan_data(data.source, data.n_train, data.n_val, data.n_test, corruption.kind,
                              corruption.fraction, corruption.resolved_mode(data.source), corruption.other_source,
                              params.seed)

    def check_model(self, params: Params, meta: DatasetMeta) -> None:
        from cleanse.families.gan.nets import build_discriminator, build_generator

        spec = spec_for(params, meta)
        probe = torch.zeros((2, spec.z_dim), dtype=spec.torch_dtype)
        with torch.no_grad():
            fake = build_generator(spec)(probe)
            if tuple(fake.shape[1:]) != tuple(meta.feature_shape):
                raise ConfigError(f"model: the generator makes {list(fake.shape[1:])}, the data are "
                                  f"{list(meta.feature_shape)}")
            build_discriminator(spec)(fake)
        recipe_for(params)

    def fit(self, params: Params, split: Split, meta: DatasetMeta, *, seed: int | None = None) -> FittedGan:
        """Train the GAN on ``split`` (all rows) and, for images, the feature classifier on its
        images and labels (once: every later fit of the run reuses it, see :meth:`verify_without`)."""
        from cleanse.families.gan.training import train_gan

        seed = params.seed if seed is None else seed
        spec = spec_for(params, meta)
        feature_net = None
        if meta.is_image:
            from cleanse.families.gan.features import train_feature_net

            feature_net = train_feature_net(split.features, split.label, seed)
        trained = train_gan(spec, recipe_for(params), instances(split, spec), seed)
        settings = _gan(params).metrics
        return FittedGan(trained, tuple(settings.resolved(params.data.source)), settings.n_latents, seed, feature_net)

    def training_record(self, model: FittedGan) -> dict[str, Any]:
        return {"history": [{"epoch": epoch, **record} for epoch, record in enumerate(model.trained.history)],
                "seconds_traced": model.trained.seconds_traced}

    def save_model(self, model: FittedGan, directory: Path, extra: dict[str, Any]) -> None:
        """``model.safetensors`` (``G.*`` and ``D.*``), ``trace.safetensors`` (the traced window),
        ``features/`` (the feature classifier, images) and ``meta.json`` (spec, recipe, metric
        settings, ``extra``) last."""
        from cleanse.storage import write_json, write_tensors

        trained = model.trained
        write_tensors({**{f"G.{k}": v for k, v in trained.g_state.items()},
                       **{f"D.{k}": v for k, v in trained.d_state.items()}}, directory / "model.safetensors")
        trained.trace.save(directory / "trace.safetensors")
        if model.feature_net is not None:
            model.feature_net.save(directory / FEATURES)
        write_json({"family": self.name, "spec": trained.spec.to_json(), "recipe": trained.recipe.to_json(),
                    "metrics": list(model.metrics), "n_latents": model.n_latents, "seed": model.seed,
                    "feature_net": None if model.feature_net is None else {
                        "file": FEATURES, "digest": state_digest(model.feature_net.state),
                        "trained_on": "the training split's images and labels"},
                    "history": [{"epoch": i, **r} for i, r in enumerate(trained.history)], **extra,
                    "seconds": extra.get("seconds", trained.seconds)}, directory / "meta.json")

    def load_model(self, directory: Path) -> FittedGan:
        from cleanse.families.gan.nets import GanSpec
        from cleanse.families.gan.step import GanRecipe
        from cleanse.families.gan.trace import GanTrace
        from cleanse.families.gan.training import TrainedGan
        from cleanse.storage import read_json, read_tensors

        meta = read_json(directory / "meta.json")
        state = read_tensors(directory / "model.safetensors")
        history = [{k: v for k, v in r.items() if k != "epoch"} for r in meta.get("history", [])]
        trained = TrainedGan(GanSpec.from_json(meta["spec"]), GanRecipe.from_json(meta["recipe"]),
                             {k[2:]: v for k, v in state.items() if k.startswith("G.")},
                             {k[2:]: v for k, v in state.items() if k.startswith("D.")},
                             GanTrace.load(directory / "trace.safetensors"), history,
                             float(meta.get("seconds", 0.0)), float(meta.get("seconds_traced", 0.0)))
        feature_net = None
        if meta.get("feature_net"):
            from cleanse.errors import ArtifactError
            from cleanse.families.gan.features import FeatureNet

            record = meta["feature_net"]
            feature_net = FeatureNet.load(directory / record["file"])
            if state_digest(feature_net.state) != record["digest"]:  # FID/IS would silently change scale
                raise ArtifactError(f"{directory / record['file']}: the feature classifier is not the one this "
                                    "GAN was evaluated with (digest differs); rerun the train stage")
        return FittedGan(trained, tuple(meta["metrics"]), int(meta["n_latents"]), int(meta["seed"]), feature_net)

    def outcome(self, model: FittedGan, staged: StagedData, query: Any = None) -> dict[str, float]:
        """``test_<m>`` then ``val_<m>`` for every metric, exact (FID through scipy's sqrtm)."""
        trained = model.trained
        out: dict[str, float] = {}
        for split_name in ("test", "val"):
            real = getattr(staged, split_name).features
            for name in model.metrics:
                metric = model.metric(name, real, staged.train.features)
                out[f"{split_name}_{name}"] = float(metric.evaluate(trained.g_state, trained.d_state, trained.spec))
        return out

    def keep_mask(self, staged: StagedData, removed_ids: Any, dtype: torch.dtype) -> torch.Tensor:
        """``(n,)`` 1 for the training rows kept, 0 for ``removed_ids``."""
        return torch.as_tensor(~np.isin(staged.train.sample_id, removed_ids), dtype=dtype)

    def replay_without(self, base: FittedGan, staged: StagedData, removed_ids: Any) -> FittedGan:
        """``base`` with its traced window replayed without ``removed_ids`` (same batches and latents)."""
        from cleanse.families.gan.training import replay

        trained = base.trained
        keep = self.keep_mask(staged, removed_ids, trained.spec.torch_dtype)
        data = instances(staged.train, trained.spec)
        g_state, d_state = replay(trained.spec, trained.recipe, trained.trace, data, keep)
        return base.derived(replace(trained, g_state=g_state, d_state=d_state))

    def verify_without(self, params: Params, staged: StagedData, removed_ids: Any,
                       query: Any = None, base: Any = None) -> tuple[Any, dict[str, float]]:
        """Replay ``base``'s traced window with the removed instances masked out (the primary
        outcome) and, with ``evaluate.scratch``, retrain from scratch with the mask in every epoch
        (``<key>_scratch``).
        ``base``: the run's :class:`FittedGan` (refitted, bit for bit the same, when not given)."""
        from cleanse.families.gan.training import retrain_gan

        if base is None:
            base = self.fit(params, staged.train, staged.meta)
        trained = base.trained
        replayed = self.replay_without(base, staged, removed_ids)
        keep = self.keep_mask(staged, removed_ids, trained.spec.torch_dtype)
        outcome = self.outcome(replayed, staged)
        if _gan(params).evaluate.scratch:
            scratch = base.derived(retrain_gan(trained.spec, trained.recipe, instances(staged.train, trained.spec),
                                               base.seed, keep))
            outcome.update({f"{key}_scratch": value for key, value in self.outcome(scratch, staged).items()})
        removed = keep.numpy() == 0
        return replayed, {**outcome, "n_removed": int(removed.sum()),
                          "n_corrupted_removed": int(staged.train.is_corrupted[removed].sum())}

    def scoring_context(self, params: Params, staged: StagedData, model: Any, cache_dir: Path | None) -> GanContext:
        return GanContext(train=staged.train, val=staged.val, meta=staged.meta, model=model, params=params,
                          seed=params.seed, cache_dir=cache_dir)

    def canonical(self, params: Params) -> Params:
        return params

    def verify_inputs(self, params: Params) -> tuple[Any, ...]:
        return (_gan(params).evaluate.scratch,)

    def evaluations(self, params: Params, staged: StagedData, layout: Any, metrics: dict[str, Any]) -> dict[str, Any]:
        """``replay_agreement`` of ``gan_influence`` when ``evaluate.replay`` (:mod:`.agreement`)."""
        if not _gan(params).evaluate.replay or "gan_influence" not in params.estimators:
            return {}
        from cleanse.families.gan.agreement import replay_agreement

        return {"gan_influence": {"replay_agreement": replay_agreement(params, staged, layout)}}

"""The cascade family (``family: cascade``): directed edges as the units, the expected spread from
the seed set as the outcome (lower = better), "without these edges" verified by fresh Monte Carlo
(DiffIM, Lee et al., AAAI 2025, arXiv 2502.01031; spec part B §4).

The fitted model is a :class:`FittedCascade`: the spread surrogate trained on perturbed,
Monte-Carlo-labelled instances (the train stage; the surrogate-based estimators read it) and the
edges removed (none for the base model). Its outcome never reads the surrogate:

- ``spread``, ``spread_se``: ``cascade.mc_runs`` cascades (``cascade.verify`` stream, the same for
  every model of a run: common random numbers) on the graph minus the removed edges;
- ``val_spread``, ``val_spread_se``: ``cascade.val_runs`` cascades on an independent stream (what
  the recommendation reads).

Ground truth (``is_corrupted``): greedy Monte Carlo's ``b`` cuts (:mod:`.data`), so ``oracle`` is
the reference method's removal and ``random`` cuts ``b`` random edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from cleanse.families.base import WithoutUnitLoss
from cleanse.families.cascade.data import budget_of, cascade_params, graph_arrays, int_seed, rng

if TYPE_CHECKING:
    from cleanse.config import Params
    from cleanse.data.dataset import DatasetMeta, Split, StagedData
    from cleanse.graphs.surrogate import SpreadSurrogate


@dataclass
class FittedCascade:
    """The surrogate (with its config, loss history, fit seconds and held-out quality) and ``removed``
    edge ids (int64 (k,); empty for the base model)."""

    surrogate: SpreadSurrogate
    config: dict[str, Any]
    history: list[float]
    seconds: float
    quality: dict[str, float]
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass(frozen=True)
class CascadeContext:
    """What the cascade estimators read: the edge rows, the staged graph, the surrogate, the budget."""

    train: Split
    val: Split
    meta: DatasetMeta
    model: FittedCascade
    params: Params
    seed: int

    def graph(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """``(edge_index (2, E), weights (E,), seeds (|S|,), N)``; row ``i`` of ``train`` is edge
        ``train.sample_id[i]``."""
        return graph_arrays(self.meta)

    @property
    def budget(self) -> int:
        return budget_of(self.params, len(self.train))

    @property
    def diffusion(self) -> str:
        return str((self.meta.structure or {}).get("diffusion", "IC"))

    @property
    def threshold(self) -> float | None:
        """LT's fixed threshold for every node, or None (thresholds U(0, 1])."""
        return (self.meta.structure or {}).get("threshold")


def _surrogate_config(params: Params, seed: int) -> Any:
    from cleanse.graphs.surrogate import SurrogateConfig

    m = cascade_params(params).model
    return SurrogateConfig(kind=m.kind, hidden=m.hidden, segments=m.segments if m.kind == "axel" else 1,
                           layers=m.layers, epochs=m.epochs, batch=m.batch, lr=m.lr, seed=seed)


def spread_outcome(meta: DatasetMeta, removed: np.ndarray) -> dict[str, float]:
    """``spread``, ``spread_se``, ``val_spread``, ``val_spread_se`` of the staged graph minus ``removed``
    (edge ids), by fresh Monte Carlo on the ``cascade.verify`` / ``cascade.val`` streams."""
    from cleanse.graphs.selection import verify_spread

    s = meta.structure or {}
    ei, w, seeds, n = graph_arrays(meta)
    seed = int(s.get("run_seed", 0))
    out: dict[str, float] = {}
    for prefix, runs, purpose in (("", s["mc_runs"], "cascade.verify"), ("val_", s["val_runs"], "cascade.val")):
        mean, se = verify_spread(s["diffusion"], ei, w, seeds, n, removed, runs=int(runs), batches=int(s["batches"]),
                                 seed=int_seed(seed, purpose), threshold=s.get("threshold"))
        out[f"{prefix}spread"], out[f"{prefix}spread_se"] = mean, se
    return out


class CascadeFamily(WithoutUnitLoss):
    name: ClassVar[str] = "cascade"
    target_dtype: ClassVar[torch.dtype] = torch.int64
    outcome_keys: ClassVar[tuple[str, ...]] = ("spread", "spread_se")
    selection: ClassVar[tuple[str, float]] = ("val_spread", -1.0)
    flagged_plots: ClassVar[str] = "cleanse.families.cascade.plots:write_cascade_plots"
    mlflow_pyfunc: ClassVar[bool] = False
    own_estimators: ClassVar[str] = "the edge-selection methods (diffim_oneshot, diffim_relax, diffim_greedy, greedy_mc, degree, betweenness, pagerank, eigen_drop)"

    def outcome_keys_in(self, outcome: dict[str, Any]) -> tuple[str, ...] | None:
        return self.outcome_keys if "spread" in outcome and "val_spread" in outcome else None

    def stage(self, params: Params) -> StagedData:
        from dataclasses import replace

        from cleanse.families.cascade.data import stage_cascade

        staged = stage_cascade(params)
        structure = {**(staged.meta.structure or {}), "run_seed": params.seed}
        return replace(staged, meta=replace(staged.meta, structure=structure))

    def check_model(self, params: Params, meta: DatasetMeta) -> None:
        graph_arrays(meta)

    def fit(self, params: Params, split: Split, meta: DatasetMeta, *, seed: int | None = None) -> FittedCascade:
        """Train the surrogate on ``model.instances`` perturbed instances of the staged graph
        (``cascade.train`` stream) and measure it on ``model.test_instances`` others (``cascade.test``)."""
        from cleanse.graphs.surrogate import SpreadSurrogate, evaluate_surrogate, fit_surrogate, make_instances

        seed = params.seed if seed is None else seed
        ei, w, seeds, n = graph_arrays(meta)
        kind, m = str((meta.structure or {})["diffusion"]), cascade_params(params).model
        threshold = (meta.structure or {}).get("threshold")
        train, test = (make_instances(kind, ei, w, n, seeds, count, runs, rng(seed, purpose), max_removal=m.max_removal,
                                      target_share=m.target_share, threshold=threshold)
                       for count, runs, purpose in ((m.instances, m.label_runs, "cascade.train"),
                                                    (m.test_instances, 4 * m.label_runs, "cascade.test")))
        config = _surrogate_config(params, seed)
        model = SpreadSurrogate(ei, w, n, config)
        record = fit_surrogate(model, train)
        quality = {**evaluate_surrogate(model, test), "label_seconds": train.seconds + test.seconds}
        from cleanse.graphs.surrogate import config_json

        return FittedCascade(model, {**config_json(config), "num_nodes": n}, record.history, record.seconds, quality)

    def training_record(self, model: FittedCascade) -> dict[str, Any]:
        return {"history": [{"epoch": i, "loss": loss} for i, loss in enumerate(model.history)],
                "surrogate": {**model.quality, "fit_seconds": model.seconds}}

    def save_model(self, model: FittedCascade, directory: Path, extra: dict[str, Any]) -> None:
        """``model.safetensors`` (the surrogate; its graph is in the buffers) and ``meta.json`` last."""
        from cleanse.storage import write_json, write_tensors

        write_tensors(model.surrogate.state_dict(), directory / "model.safetensors")
        write_json({"history": model.history, **extra, "family": self.name, "config": model.config,
                    "fit_seconds": model.seconds, "quality": model.quality, "removed": model.removed.tolist()},
                   directory / "meta.json")

    def load_model(self, directory: Path) -> FittedCascade:
        from cleanse.graphs.surrogate import SpreadSurrogate, SurrogateConfig
        from cleanse.storage import read_json, read_tensors

        meta = read_json(directory / "meta.json")
        state = read_tensors(directory / "model.safetensors")
        config = {k: v for k, v in meta["config"].items() if k != "num_nodes"}
        ei = torch.stack([state["src"], state["dst"]]).numpy()
        model = SpreadSurrogate(ei, state["p"].double().numpy(), int(meta["config"]["num_nodes"]),
                                SurrogateConfig(**config))
        model.load_state_dict(state)
        model.eval()
        return FittedCascade(model, meta["config"], list(meta.get("history", [])), float(meta.get("fit_seconds", 0.0)),
                             dict(meta.get("quality", {})), np.asarray(meta.get("removed", []), dtype=np.int64))

    def outcome(self, model: FittedCascade, staged: StagedData, query: Any = None) -> dict[str, float]:
        return spread_outcome(staged.meta, model.removed)

    def verify_without(self, params: Params, staged: StagedData, removed_ids: Any,
                       query: Any = None, base: Any = None) -> tuple[Any, dict[str, float]]:
        """The graph minus the edges ``removed_ids``, its spread by fresh Monte Carlo (never the
        surrogate); the returned model is the base surrogate with ``removed`` set."""
        removed = np.asarray(removed_ids, dtype=np.int64)
        if not isinstance(base, FittedCascade):
            base = self.fit(params, staged.train, staged.meta)
        model = FittedCascade(base.surrogate, base.config, base.history, base.seconds, base.quality, removed)
        mask = np.isin(staged.train.sample_id, removed)
        return model, {**spread_outcome(staged.meta, removed), "n_removed": int(mask.sum()),
                       "n_corrupted_removed": int(staged.train.is_corrupted[mask].sum())}

    def verify_inputs(self, params: Params) -> tuple[Any, ...]:
        return (cascade_params(params).cascade.model_dump(mode="json"),)

    def scoring_context(self, params: Params, staged: StagedData, model: Any, cache_dir: Path | None) -> CascadeContext:
        return CascadeContext(train=staged.train, val=staged.val, meta=staged.meta, model=model, params=params,
                              seed=params.seed)

    def canonical(self, params: Params) -> Params:
        return params

    def evaluations(self, params: Params, staged: StagedData, layout: Any, metrics: dict[str, Any]) -> dict[str, Any]:
        """Per estimator: ``spread``, ``spread_se`` (verified), ``removed`` (the cut edges as ``[u, v]``),
        ``spread_reduction`` (baseline minus spread) and ``seconds`` (its selection time, the score stage)."""
        import polars as pl

        from cleanse.storage import read_json, read_table

        ei, _, _, _ = graph_arrays(staged.meta)
        baseline = float(metrics["baseline"]["spread"])
        out: dict[str, Any] = {}
        for name in metrics["estimators"]:
            cleaned = read_json(layout.retrain_result(name))["cleaned"]
            flags = read_table(layout.flags(name)).filter(pl.col("is_flagged"))
            ids = np.sort(flags["sample_id"].to_numpy().astype(np.int64))
            out[name] = {"spread": cleaned["spread"], "spread_se": cleaned["spread_se"],
                         "spread_reduction": baseline - float(cleaned["spread"]),
                         "removed": ei[:, ids].T.tolist(), "seconds": metrics["estimators"][name]["seconds"]}
        return out

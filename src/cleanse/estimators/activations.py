"""Unsupervised backdoor detectors on penultimate-layer activations (no probes needed).

Both look, class by class (the *given* label), at the features ``h_i`` fed to the model's last
linear layer, shape ``(n, d)``; poisons relabelled to a target class form their own direction or
cluster inside that class.

- ``spectral_signatures`` (Tran, Li & Madry, NeurIPS 2018): centre the class's features, take the
  top right singular vector(s) ``v`` and score ``(h_i - mean)^T v`` squared. To compare classes,
  each class's scores are divided by their class median (robust to the poisons themselves), so a
  score is "times the class's typical spread along its top direction".
- ``activation_clustering`` (Chen et al., 2018): reduce the class's features to ``n_components``
  principal components, split them by 2-means and suspect the smaller cluster. Score
  ``m_i * s_c * (1 - f_c)``: ``m_i = (d_big - d_small) / (d_big + d_small)`` (positive in the
  small cluster), ``s_c`` the split's silhouette (clipped at 0: no structure, no score) and
  ``f_c`` the small cluster's share of the class.

Higher = more harmful. The model is the final one; the labels are the given (possibly corrupted) ones.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from cleanse.config import ActivationClusteringOptions, SpectralOptions
from cleanse.estimators.base import ScoreResult, ScoringContext, score_table


@torch.no_grad()
def penultimate_features(context: ScoringContext) -> np.ndarray:
    """Inputs of the last ``nn.Linear`` for every training sample, ``(n_train, d)`` float64."""
    module = context.model.module(context.device)
    last = [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda layer, inputs, output: captured.append(inputs[0].detach()))
    try:
        x, _ = context.tensors(context.train)
        module(x)
    finally:
        handle.remove()
    return captured[0].double().cpu().numpy().reshape(len(context.train), -1)


def spectral_scores(features: np.ndarray, label: np.ndarray, directions: int = 1) -> np.ndarray:
    """Per-class normalised squared projections on the top singular direction(s), ``(n,)``."""
    out = np.zeros(features.shape[0])
    for c in np.unique(label):
        rows = np.flatnonzero(label == c)
        if rows.size < 3:
            continue
        centred = features[rows] - features[rows].mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        raw = ((centred @ vt[:directions].T) ** 2).sum(1)
        out[rows] = raw / max(float(np.median(raw)), 1e-300)
    return out


def clustering_scores(features: np.ndarray, label: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    """Per-class 2-means suspicion scores (see the module docstring), ``(n,)``."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    out = np.zeros(features.shape[0])
    for c in np.unique(label):
        rows = np.flatnonzero(label == c)
        if rows.size < 4:
            continue
        dims = min(n_components, features.shape[1], rows.size - 1)
        reduced = PCA(n_components=dims, random_state=seed).fit_transform(features[rows])
        if not np.isfinite(reduced).all() or np.allclose(reduced, reduced[0]):
            continue
        kmeans = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(reduced)
        assignment = kmeans.labels_
        sizes = np.bincount(assignment, minlength=2)
        if sizes.min() < 2:
            continue
        small = int(np.argmin(sizes))
        distance = np.linalg.norm(reduced[:, None, :] - kmeans.cluster_centers_[None], axis=2)
        d_small, d_big = distance[:, small], distance[:, 1 - small]
        margin = (d_big - d_small) / np.maximum(d_big + d_small, 1e-300)
        silhouette = max(float(silhouette_score(reduced, assignment)), 0.0)
        out[rows] = margin * silhouette * (1 - sizes[small] / rows.size)
    return out


class SpectralSignatureEstimator:
    name: ClassVar[str] = "spectral_signatures"
    reads_validation_labels: ClassVar[bool] = False
    options_type: ClassVar[type] = SpectralOptions
    families: ClassVar[tuple[str, ...]] = ("classification",)

    def score(self, context: ScoringContext, options: SpectralOptions) -> ScoreResult:
        score = spectral_scores(penultimate_features(context), context.train.label, options.directions)
        return ScoreResult(score_table(context.train.sample_id, score), {"directions": options.directions})


class ActivationClusteringEstimator:
    name: ClassVar[str] = "activation_clustering"
    reads_validation_labels: ClassVar[bool] = False
    options_type: ClassVar[type] = ActivationClusteringOptions
    families: ClassVar[tuple[str, ...]] = ("classification",)

    def score(self, context: ScoringContext, options: ActivationClusteringOptions) -> ScoreResult:
        score = clustering_scores(penultimate_features(context), context.train.label, options.n_components, context.seed)
        return ScoreResult(score_table(context.train.sample_id, score), {"n_components": options.n_components})

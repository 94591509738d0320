"""Pixel-space nearest neighbours: the similarity baseline of DMin's comparison (Lin, Lao & Zhao,
arXiv 2412.08637; spec part B 3.7, "pixel-space KNN").

A training image ``x_i`` and a query ``q`` (both ``(C, H, W)`` in [-1, 1], flattened; minus the
training mean when ``centred``) have similarity ``cos(q, x_i)`` in [-1, 1], higher = more alike.
Score of training image ``i`` (training order, higher = more harmful): the mean cosine to the harm
queries; the per-query top-k is the exact scan. No model is read: it finds copies, not influence.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from cleanse.estimators.dmin import AttributionEstimator
from cleanse.estimators.pixel_nn_options import PixelNNOptions


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class PixelNNEstimator(AttributionEstimator):
    name: ClassVar[str] = "pixel_nn"
    options_type: ClassVar[type[BaseModel]] = PixelNNOptions

    def _flat_train(self, context: Any) -> np.ndarray:
        images = context.images()
        return images.reshape(images.shape[0], -1).double().numpy()

    def _centre(self, context: Any, options: PixelNNOptions) -> np.ndarray | float:
        return self._flat_train(context).mean(axis=0) if options.centred else 0.0

    def train_vectors(self, context: Any, options: PixelNNOptions) -> np.ndarray:
        flat = self._flat_train(context)
        return _unit_rows(flat - self._centre(context, options)).astype(np.float32)

    def query_vectors(self, context: Any, options: PixelNNOptions, queries: Any) -> np.ndarray:
        flat = queries.images.reshape(len(queries), -1).double().numpy()
        return _unit_rows(flat - self._centre(context, options)).astype(np.float32)

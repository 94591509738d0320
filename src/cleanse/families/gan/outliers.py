"""The Isolation Forest baseline of Terashita et al. (ICLR 2021): instances scored by how easily
random axis-aligned splits isolate them (Liu, Ting and Zhou, 2008), with scikit-learn.

Input: the raw data ``(n, d)`` for low-dimensional (2-D) GANs, the feature classifier's features
(:meth:`cleanse.families.gan.features.FeatureNet.embed`, ``(n, 64)``) for images; the caller passes
them. Higher score = more abnormal = flagged as more harmful (the paper removes the most abnormal).
"""

from __future__ import annotations

import numpy as np

from cleanse import seeds
from cleanse.errors import ConfigError


def isolation_forest_scores(x: np.ndarray, seed: int, n_estimators: int = 200) -> np.ndarray:
    """Abnormality ``(n,)`` float64 of the rows of ``x`` ``(n, ...)`` (flattened to ``(n, d)``):
    minus scikit-learn's ``score_samples``, so in ``(0, 1]`` and higher = more abnormal. The forest's
    ``random_state`` comes from the stream ``"gan.isolation_forest"``."""
    from sklearn.ensemble import IsolationForest

    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ConfigError(f"isolation_forest: need at least 2 rows of features, got shape {list(x.shape)}")
    x = x.reshape(x.shape[0], -1)
    if not np.isfinite(x).all():
        raise ConfigError("isolation_forest: the features hold NaN or infinite values")
    state = int(seeds.rng(seed, "gan.isolation_forest").integers(0, 2**31 - 1))
    forest = IsolationForest(n_estimators=n_estimators, random_state=state).fit(x)
    return -forest.score_samples(x)

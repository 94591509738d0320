"""A D-TRAK-style baseline for diffusion attribution (Zheng, Pang, Du, Lin & Wang, "Intriguingly
Simple and Efficient Data Attribution for Diffusion Models", ICLR 2024; TRAK, Park et al. 2023),
the projected-gradient comparison of DMin (Lin, Lao & Zhao, arXiv 2412.08637; spec part B 3.5).

Features: ``phi_i = P^T gbar_i`` ``(v,)``, ``gbar_i`` the *unnormalised* gradient of the diffusion
loss averaged over DMin's S timesteps (same shared noise), ``P`` ``(D, v)`` a dense Gaussian matrix
with ``N(0, 1/v)`` entries (:func:`cleanse.families.diffusion.sketch.dense_projection`). The
attribution of training image ``i`` to query ``q`` is TRAK's

    tau(q, i) = phi_q^T (Phi^T Phi + lambda I)^-1 phi_i,     Phi = (phi_1 .. phi_n)^T  (n, v)

(``kernel: false``: ``phi_q^T phi_i``), ``lambda = damping * ||Phi||_F^2 / n``. It is computed in the
smaller of the two spaces: ``(Phi Phi^T + lambda I)^-1 Phi phi_q`` when ``n < v`` (the same
vector, by the push-through identity). Higher = more influential; score = mean over the harm
queries (training order, higher = more harmful). Training features are cached like DMin's
(:mod:`cleanse.families.diffusion.caching`, ``projection: gaussian``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from cleanse.estimators.dmin import GradientAttributionEstimator
from cleanse.estimators.dtrak_options import DtrakOptions


def trak_scores(train: np.ndarray, query: np.ndarray, damping: float) -> np.ndarray:
    """``(Q, n)`` kernel scores ``phi_q^T (Phi^T Phi + lambda I)^-1 phi_i`` (module docstring) for
    ``train`` ``Phi`` ``(n, v)`` and ``query`` ``(Q, v)``, in float64."""
    phi, q = train.astype(np.float64), query.astype(np.float64)
    n, v = phi.shape
    ridge = damping * float((phi ** 2).sum()) / max(n, 1)
    if n < v:
        gram = phi @ phi.T + ridge * np.eye(n)
        return np.linalg.solve(gram, phi @ q.T).T
    gram = phi.T @ phi + ridge * np.eye(v)
    return np.linalg.solve(gram, q.T).T @ phi.T


class DtrakEstimator(GradientAttributionEstimator):
    name: ClassVar[str] = "dtrak"
    options_type: ClassVar[type[BaseModel]] = DtrakOptions

    def similarities(self, context: Any, options: DtrakOptions, train: np.ndarray, query: np.ndarray) -> np.ndarray:
        if not options.kernel:
            return super().similarities(context, options, train, query)
        return trak_scores(train, query, options.damping)

    def topk(self, context: Any, options: DtrakOptions, train: np.ndarray, query: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray]:
        similarity = self.similarities(context, options, train, query)
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(similarity, order, axis=1).astype(np.float32), order.astype(np.int64)

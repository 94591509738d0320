"""Options of ``scorers.influence`` and ``influence_val`` (:mod:`cleanse.estimators.influence`).

Kept apart from the estimator so that validating params imports neither torch nor scikit-learn
(:mod:`cleanse.estimators.options` assembles the ``scorers`` section from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanse.config_base import _Section


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
    ekfac_damping: Literal["absolute", "relative"] = Field(
        "absolute", description="absolute: EK-FAC adds damping to every eigenvalue; relative: damping times the mean "
        "of each layer's corrected eigenvalues (Kronfluence's heuristic with damping 0.1; the lm family's default).")
    ekfac_fisher: Literal["expected", "sampled", "empirical"] = Field(
        "expected", description="expected: labels enumerated from the model's softmax (true Fisher); sampled: one "
        "label per sample drawn from it (seeded; 1/C of the work); empirical: observed labels."
    )

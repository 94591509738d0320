"""Solvers of ``(H + damping I) X = B`` for a block of right-hand sides ``B`` ``(p, k)``
(Koh & Liang, 2017; Agarwal et al., 2017 for LiSSA):

- :func:`exact_inverse` eigendecomposes ``H`` in float64 (small models);
- :func:`cg_solve` runs conjugate gradients column-wise on batched curvature products;
- :func:`lissa_solve` runs the stochastic Neumann recursion on random minibatch products.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from cleanse.curvature import HVP, curvature_fn
from cleanse.grads import FunctionalModel
from cleanse.progress import Progress, progress

@dataclass
class SolverReport:
    """How a solve went; stored in the score metadata."""

    solver: str
    damping: float
    converged: bool
    iterations: int = 0
    residual: float = 0.0
    note: str = ""


@dataclass
class ExactInverse:
    """``(H + damping I)^-1`` in eigen form: ``Q diag(1 / (lambda + damping)) Q^T``."""

    eigenvectors: torch.Tensor
    inverse_eigenvalues: torch.Tensor
    report: SolverReport

    def solve(self, block: torch.Tensor) -> torch.Tensor:
        q = self.eigenvectors
        rhs = block.double()
        return (q @ (self.inverse_eigenvalues[:, None] * (q.T @ rhs))).to(block.dtype)

    def quadratic_form(self, rows: torch.Tensor) -> torch.Tensor:
        """``g_i^T (H + damping I)^-1 g_i`` for rows ``g_i`` of shape ``(n, p)``, shape ``(n,)``."""
        projected = rows.double() @ self.eigenvectors
        return (projected.pow(2) * self.inverse_eigenvalues).sum(dim=1)


def exact_inverse(hessian: torch.Tensor, damping: float) -> ExactInverse:
    """Eigendecompose ``hessian``; if ``H + damping I`` is not positive definite (a non-convex
    model), damping is raised to ``|lambda_min| + damping`` and a warning names the new value."""
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian.double())
    smallest = float(eigenvalues.min())
    effective = damping
    note = ""
    if smallest + damping <= 0:
        effective = -smallest + max(damping, 1e-6)
        note = f"Hessian has eigenvalue {smallest:.3g}; damping raised from {damping:g} to {effective:.3g}"
        warnings.warn(note, stacklevel=2)
    inverse = 1.0 / (eigenvalues + effective)
    return ExactInverse(eigenvectors, inverse, SolverReport("exact", effective, True, note=note))


def on_active(fn: HVP, block: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to the active columns of ``block`` only; the others come back as zeros.

    CG's columns converge at different iterations and a converged column's step is zero, so the
    curvature products (the dominant cost) need not be spent on it.
    """
    if bool(active.all()):
        return fn(block)
    out = torch.zeros_like(block)
    out[:, active] = fn(block[:, active])
    return out


def cg_solve(apply_h: HVP, rhs: torch.Tensor, *, damping: float, max_iter: int, tol: float,
             preconditioner: HVP | None = None) -> tuple[torch.Tensor, SolverReport]:
    """Conjugate gradients on ``(H + damping I) X = B`` column by column (``B``: ``(p, k)``).

    With ``preconditioner`` ``M^-1`` (a symmetric positive-definite approximation of the inverse,
    e.g. EK-FAC's), this is preconditioned CG: the iteration count then depends on how well
    ``M`` matches ``H`` rather than on ``H``'s condition number.

    Stops when every column's relative residual is below ``tol``; warns if ``max_iter`` is hit
    first. CG assumes ``H + damping I`` is positive definite; a column that meets negative
    curvature stops early and is reported as not converged.
    """
    def op(block: torch.Tensor) -> torch.Tensor:
        return apply_h(block) + damping * block

    def precondition(block: torch.Tensor) -> torch.Tensor:
        return block if preconditioner is None else preconditioner(block)

    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    z = precondition(residual)
    direction = z.clone()
    rs_old = (residual * z).sum(0)
    rhs_norm = rhs.norm(dim=0).clamp_min(1e-30)
    active = torch.ones(rhs.shape[1], dtype=torch.bool, device=rhs.device)
    negative_curvature = torch.zeros_like(active)
    iteration = 0
    reporter = Progress(f"CG on {rhs.shape[1]} right-hand sides", max_iter, unit="iteration")
    for iteration in range(1, max_iter + 1):
        reporter.update(active=int(active.sum()))
        hd = on_active(op, direction, active)
        curvature = (direction * hd).sum(0)
        bad = curvature <= 0
        negative_curvature |= bad & active
        active &= ~bad
        alpha = torch.where(active, rs_old / curvature.where(curvature > 0, torch.ones_like(curvature)), 0.0)
        solution += alpha * direction
        residual -= alpha * hd
        active &= residual.norm(dim=0) / rhs_norm > tol
        if not active.any():
            break
        z = on_active(precondition, residual, active)
        rs_new = (residual * z).sum(0)
        direction = z + (rs_new / rs_old.where(rs_old != 0, torch.ones_like(rs_old))) * direction
        rs_old = rs_new
    reporter.close()
    relative = float((residual.norm(dim=0) / rhs_norm).max())
    converged = relative <= tol and not bool(negative_curvature.any())
    report = SolverReport("cg" if preconditioner is None else "pcg", damping, converged, iteration, relative)
    if not converged:
        report.note = (
            f"CG did not converge: relative residual {relative:.2e} > tol {tol:g} after {iteration} iterations"
            + ("; negative curvature met (raise the damping)" if negative_curvature.any() else "")
        )
        warnings.warn(report.note, stacklevel=2)
    return solution, report


def top_eigenvalue(apply_h: HVP, p: int, *, iterations: int = 30, seed: int = 0, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> float:
    """Largest-magnitude Hessian eigenvalue by power iteration (for LiSSA's scale)."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(p, 1, generator=generator, dtype=dtype).to(device)
    v /= v.norm()
    value = 0.0
    for _ in range(iterations):
        hv = apply_h(v)
        value = float((v * hv).sum())
        v = hv / hv.norm().clamp_min(1e-30)
    return abs(value)


def lissa_solve(
    fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, rhs: torch.Tensor, *, damping: float, depth: int,
    repeats: int, scale: float | None, batch_size: int, seed: int, curvature: str = "hessian",
) -> tuple[torch.Tensor, SolverReport]:
    """LiSSA (Agarwal et al., 2017; as used by Koh & Liang, 2017).

    Recursion per repeat: ``h_0 = B``; ``h_j = B + h_{j-1} - (H_Bj + damping I) h_{j-1} / s`` with
    ``H_Bj`` the objective's Hessian on a random minibatch; the estimate is ``h_J / s``. ``s`` must
    exceed the top eigenvalue of ``H + damping I`` for the series to converge; by default it is
    1.5 x a power-iteration estimate. Returns the per-repeat estimates, shape
    ``(repeats, p, k)``, and a report. Divergence (non-finite or growing
    iterates) is reported, not hidden.
    """
    p, n = fm.n_params, x.shape[0]
    if scale is None:
        scale = 1.5 * (top_eigenvalue(curvature_fn(fm, x, y, curvature), p, seed=seed, device=rhs.device, dtype=rhs.dtype) + damping)
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    diverged = False
    for _ in progress(range(repeats), f"LiSSA ({depth} steps per repeat)", unit="repeat"):
        h = rhs.clone()
        for _ in range(depth):
            batch = torch.randint(0, n, (min(batch_size, n),), generator=generator).to(x.device)
            hv = curvature_fn(fm, x[batch], y[batch], curvature)(h) + damping * h
            h = rhs + h - hv / scale
        if not torch.isfinite(h).all():
            diverged = True
        estimates.append(h / scale)
    report = SolverReport("lissa", damping, not diverged, depth, note=f"scale={scale:.4g}")
    if diverged:
        report.note += "; LiSSA diverged: raise lissa_scale or damping"
        warnings.warn(report.note, stacklevel=2)
    return torch.stack(estimates), report


"""Curvature-vector products of the training objective (see :mod:`cleanse.grads` for the
conventions): the Hessian by forward-over-reverse differentiation, and the generalised
Gauss-Newton matrix ``J^T H_out J`` with the family's output-space loss Hessian ``H_out``, plus
closed forms for a lone linear softmax head. Every product maps a block ``(p, k)`` to ``(p, k)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad, vmap

from cleanse.grads import FunctionalModel, jvp
from cleanse.progress import progress

HVP = Callable[[torch.Tensor], torch.Tensor]


def hvp_fn(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor) -> HVP:
    """``V -> H V`` for a block ``V`` of shape ``(p, k)``: forward-over-reverse, vmapped over columns.
    A family with ``curvature_rows`` (the language model: every column holds a whole network's
    activations per row) sums the product over chunks of that many rows, so memory is bounded by
    ``k x curvature_rows`` rows instead of ``k x n``."""
    rows = fm.task.curvature_rows
    if rows is not None and x.shape[0] > rows:
        return _chunked_hvp(fm, x, y, rows)
    objective_grad = grad(lambda t: fm.objective(t, x, y))

    def single(v: torch.Tensor) -> torch.Tensor:
        return jvp(objective_grad, (fm.theta,), (v,))[1]

    batched = vmap(single, in_dims=1, out_dims=1)

    def apply(block: torch.Tensor) -> torch.Tensor:
        return batched(block)

    return apply


def _chunked_hvp(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, rows: int) -> HVP:
    """:func:`hvp_fn` as ``(1/n) sum_chunks H_chunk V + weight_decay V``, with ``H_chunk`` the
    Hessian of a chunk's summed loss."""
    n = x.shape[0]
    chunks = [(x[s : s + rows], y[s : s + rows]) for s in range(0, n, rows)]

    def chunk_product(xc: torch.Tensor, yc: torch.Tensor) -> HVP:
        loss_grad = grad(lambda t: fm.losses(t, xc, yc).sum())
        return vmap(lambda v: jvp(loss_grad, (fm.theta,), (v,))[1], in_dims=1, out_dims=1)

    products = [chunk_product(xc, yc) for xc, yc in chunks]

    def apply(block: torch.Tensor) -> torch.Tensor:
        total = products[0](block)
        for product in products[1:]:
            total = total + product(block)
        return total / n + fm.weight_decay * block

    return apply


def exact_hessian(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, *, chunk_size: int = 128,
                  curvature: str = "hessian") -> torch.Tensor:
    """The full ``(p, p)`` Hessian (or, with ``curvature="ggn"``, Gauss-Newton matrix) of the
    objective, float64, built from blocks of products (a lone ``nn.Linear`` with ``ggn``: in closed
    form, :func:`linear_head_ggn_matrix`)."""
    if curvature == "ggn" and fm.task.softmax_output and isinstance(fm.module, nn.Linear) and x.dim() == 2:
        return linear_head_ggn_matrix(fm, x)
    apply = curvature_fn(fm, x, y, curvature)
    p = fm.n_params
    eye = torch.eye(p, dtype=fm.theta.dtype, device=fm.theta.device)
    columns = [apply(eye[:, s : s + chunk_size])
               for s in progress(range(0, p, chunk_size), f"exact {curvature} ({p} parameters)", unit="block")]
    hessian = torch.cat(columns, dim=1).double()
    return 0.5 * (hessian + hessian.T)


def curvature_fn(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, kind: str = "hessian") -> HVP:
    """``V -> C V`` with ``C`` the objective's Hessian (``"hessian"``) or Gauss-Newton matrix (``"ggn"``)."""
    if kind == "hessian":
        return hvp_fn(fm, x, y)
    if kind == "ggn":
        return ggn_fn(fm, x, y)
    raise ValueError(f"curvature {kind!r} is not one of 'hessian', 'ggn'")


def ggn_fn(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor) -> HVP:
    """``V -> G V`` for a block ``V`` ``(p, k)``, with ``G`` the generalised Gauss-Newton matrix of
    the objective (Schraudolph, 2002; Martens, 2010):

        G = (1/n) sum_i J_i^T H_i J_i + weight_decay * I

    ``J_i`` is the ``(C, p)`` Jacobian of sample ``i``'s outputs and ``H_i`` the loss's Hessian in
    output space (the family's :meth:`~cleanse.families.base.Family.output_curvature`: for softmax
    cross-entropy ``diag(p_i) - p_i p_i^T`` with ``p_i`` the softmax; for squared error ``2 I``). ``G`` is the
    Hessian with the second-derivative-of-the-network term dropped, so it is positive
    semi-definite even where the Hessian of a non-convex network is indefinite; for a linear model
    (logistic regression) it equals the Hessian. One product costs one forward-mode and one
    reverse-mode pass over ``x`` per column (vmapped over columns). The labels ``y`` do not enter.
    """
    theta = fm.theta
    n = x.shape[0]
    if fm.task.softmax_output and isinstance(fm.module, nn.Linear) and x.dim() == 2:
        return _linear_head_ggn(fm, x)
    logits, pullback = torch.func.vjp(lambda t: fm.logits(t, x), theta)[:2]  # (output, pullback): no aux
    output_hessian = fm.task.output_curvature(logits)

    def single(v: torch.Tensor) -> torch.Tensor:
        _, jv = jvp(lambda t: fm.logits(t, x), (theta,), (v,))  # (n, C)
        hjv = output_hessian(jv)
        return pullback(hjv / n)[0] + fm.weight_decay * v

    batched = vmap(single, in_dims=1, out_dims=1)

    def apply(block: torch.Tensor) -> torch.Tensor:
        return batched(block)

    return apply


def linear_head_ggn_matrix(fm: FunctionalModel, x: torch.Tensor, *, chunk_size: int = 4096) -> torch.Tensor:
    """The ``(p, p)`` Gauss-Newton matrix of a lone ``nn.Linear`` head, float64, in closed form.

    With ``x~_i = [x_i, 1]`` (the bias column) and ``H_i = diag(p_i) - p_i p_i^T`` the softmax
    Hessian, ``G = (1/n) sum_i H_i (x) x~_i x~_i^T + weight_decay I``: per row chunk, ``C`` weighted
    Gram matrices ``X~^T diag(p_a) X~`` minus one product ``V^T V`` with rows ``V_i = p_i (x) x~_i``,
    then rows and columns permuted to the parameter order (weight ``(C, d)`` row-major, then bias).
    At 50,000 rows and 1,290 parameters this is seconds, where building it from ``p`` curvature
    columns moves ``n x C x p`` intermediates through memory (47 s measured).
    """
    classes, width = fm.shapes[0]
    has_bias = len(fm.shapes) > 1
    weight = fm.theta[: classes * width].reshape(classes, width)
    bias = fm.theta[classes * width :] if has_bias else None
    aug = width + int(has_bias)
    gram = torch.zeros(classes, aug, classes, aug, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        xb = x[start : start + chunk_size]
        with torch.no_grad():
            probs = torch.softmax(nn.functional.linear(xb, weight, bias), dim=1).double()  # (m, C)
        xa = xb.double()
        if has_bias:
            xa = torch.cat([xa, xa.new_ones(xa.shape[0], 1)], dim=1)  # (m, aug)
        for a in range(classes):
            gram[a, :, a, :] += (xa * probs[:, a : a + 1]).T @ xa
        v = (probs[:, :, None] * xa[:, None, :]).reshape(xa.shape[0], classes * aug)
        gram -= (v.T @ v).reshape(classes, aug, classes, aug)
    # position of (class a, input j) in theta: weight a * width + j; the bias column j = width is b_a
    position = torch.arange(classes * width, device=x.device).reshape(classes, width)
    if has_bias:
        position = torch.cat([position, classes * width + torch.arange(classes, device=x.device)[:, None]], dim=1)
    position = position.reshape(-1)
    out = torch.zeros(fm.n_params, fm.n_params, dtype=torch.float64, device=x.device)
    out[position[:, None], position[None, :]] = gram.reshape(classes * aug, classes * aug) / max(x.shape[0], 1)
    out.diagonal().add_(fm.weight_decay)
    return 0.5 * (out + out.T)


def _linear_head_ggn(fm: FunctionalModel, x: torch.Tensor) -> HVP:
    """:func:`ggn_fn` for a lone ``nn.Linear`` (the ``layers="last"`` problem), in closed form.

    With ``V`` split per column into ``dW`` ``(C, d)`` and ``db`` ``(C,)``, ``J_i v = dW x_i + db`` and
    ``J_i^T u = (u x_i^T, u)``, so a block of ``k`` columns costs two ``(n, d) x (d, k C)`` matrix
    products. Vmapping the generic forward-mode product instead batches ``k`` skinny ``(n, d) x
    (d, C)`` products, measured 5-10x slower on 2 cores for the digits MLP head.
    """
    weight_shape = fm.shapes[0]
    classes, width = weight_shape
    has_bias = len(fm.shapes) > 1
    weight = fm.theta[: classes * width].reshape(classes, width)
    bias = fm.theta[classes * width :] if has_bias else None
    n = x.shape[0]
    probs = torch.softmax(nn.functional.linear(x, weight, bias), dim=1)  # (n, C)

    def apply(block: torch.Tensor) -> torch.Tensor:
        k = block.shape[1]
        # Keep the sample axis outermost so both products are plain 2-D matmuls over (d, C k).
        d_weight = block[: classes * width].reshape(classes, width, k).transpose(0, 1).reshape(width, classes * k)
        jv = (x @ d_weight).reshape(n, classes, k)
        if has_bias:
            jv = jv + block[classes * width :]
        p3 = probs[:, :, None]
        hjv = p3 * (jv - (p3 * jv).sum(1, keepdim=True))  # (n, C, k)
        out_weight = (x.T @ hjv.reshape(n, classes * k)).reshape(width, classes, k).transpose(0, 1).reshape(classes * width, k)
        out = torch.cat([out_weight, hjv.sum(0)]) if has_bias else out_weight
        return out / n + fm.weight_decay * block

    return apply

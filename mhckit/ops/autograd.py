"""Autograd Functions with hand-written backward passes (recompute, not store).

Shape legend: ``...`` leading dims, ``n`` streams.

Sinkhorn-Knopp (mHC Eq. 9, arXiv 2512.24880), memory-lean
----------------------------------------------------------
Forward: ``M = softmax_col(L)`` (= exp then the first column normalisation), then alternate
``y = x / c`` with ``c = sum_rows(x)`` or ``c = sum_cols(x)``, rows last. Autograd through this
loop would save every iterate: ``2 * iters`` tensors of ``[..., n, n]`` per call, kept alive
until the backward pass. :class:`SinkhornFunction` saves only the logits ``L``; the backward pass
recomputes the iterates (transiently, one call at a time) and walks them in reverse:

    y = x / c, c = sum_d(x)     =>  dL/dx = (g - sum_d(g * y)) / c
    M = softmax_col(L)          =>  dL/dL = M * (g - sum_col(g * M))

which is exactly the chain rule through the unrolled loop (the same operations in the same
order as :func:`mhckit.reference.sinkhorn`), so the gradient matches autograd to rounding.
Where a normaliser was clamped to ``tiny`` (logits of scale >= ~1e2), ``c`` is constant and the
``sum_d(g * y)`` term is dropped, as autograd does for ``clamp_min``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _normalise(x: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``y = x / clamp(sum_dim(x))``; returns ``(y, divisor, unclamped_mask)``."""
    s = x.sum(dim=dim, keepdim=True)
    tiny = torch.finfo(x.dtype).tiny
    c = s.clamp_min(tiny)
    return x / c, c, s >= tiny


def sinkhorn_forward(logits: Tensor, iters: int, keep: list | None = None) -> Tensor:
    """Run the iterations; append ``(y, divisor, mask, dim)`` per step to ``keep`` if given."""
    m = torch.softmax(logits, dim=-2)
    if keep is not None:
        keep.append((m, None, None, -2))
    for step in range(2 * iters - 1):
        dim = -1 if step % 2 == 0 else -2  # rows first (after the softmax's columns), rows last
        m, c, ok = _normalise(m, dim)
        if keep is not None:
            keep.append((m, c, ok, dim))
    return m


def sinkhorn_backward(logits: Tensor, iters: int, grad: Tensor) -> Tensor:
    keep: list = []
    sinkhorn_forward(logits, iters, keep)
    g = grad
    for y, c, ok, dim in reversed(keep[1:]):
        g = (g - (g * y).sum(dim=dim, keepdim=True) * ok) / c
    m = keep[0][0]
    return m * (g - (g * m).sum(dim=-2, keepdim=True))


class SinkhornFunction(torch.autograd.Function):
    """Sinkhorn-Knopp whose backward recomputes the iterations (saves only the logits)."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int) -> Tensor:
        ctx.iters = iters
        ctx.save_for_backward(logits)
        return sinkhorn_forward(logits, iters)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (logits,) = ctx.saved_tensors
        return sinkhorn_backward(logits, ctx.iters, grad.to(logits.dtype)), None

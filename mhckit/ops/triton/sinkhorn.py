"""Sinkhorn-Knopp in Triton: per-token forward and exact recompute-backward (mHC Eq. 9).

Shape legend: ``T`` tokens (leading dims flattened), ``n`` streams, ``NP`` = next power of two
>= n (tiles are ``[BT, NP, NP]``, entries with row or column >= n are masked to 0), ``BT`` tokens
per program. ``M[t, i, j]``: row ``i``, column ``j``; "columns" normalise over ``i`` (axis 1),
"rows" over ``j`` (axis 2).

The ``@triton.jit`` helpers here are also inlined into the fused coefficient kernels (coeffs.py).

==================================================================================================
Forward (same sequence as mhckit.reference.sinkhorn / mhckit.ops.autograd, so outputs match to
rounding), everything in fp32 registers, one token per [NP, NP] slice:
    M_0 = softmax over columns of L              (exp(L - max_i L) / sum_i)
    M_1 = M_0 / clamp(rowsum(M_0), tiny)          (rows)
    then iters-1 pairs: M <- M / clamp(colsum(M), tiny); M <- M / clamp(rowsum(M), tiny)
    (tiny = finfo(float32).tiny; rows are normalised last, so row sums are exact)
==================================================================================================
Backward (exact chain rule through the unrolled loop, nothing stored per iteration):
    one step y = x / c, c = clamp(sum_d x):   dx = (g - sum_d(g * y) * [sum_d x >= tiny]) / c
    softmax over columns M_0 = softmax(L):     dL = M_0 * (g - sum_col(g * M_0))
The iterates are not kept: for each (column, row) pair p, walking from the last pair to the
first, the forward is recomputed from M_0 (kept in registers) up to pair p, and the gradient is
pushed through that pair. Cost O(iters^2) normalisations of an [n, n] tile per token, all in
registers, no global memory traffic besides L, dL/dM and dL/dL. fp32 throughout.
==================================================================================================
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, next_pow2, per_token_block

_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny


# --------------------------------------------------------------------------------------------------
# @triton.jit helpers on [BT, NP, NP] fp32 tiles; `valid` is a broadcastable [1, NP, NP] mask of
# the real n x n entries.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _softmax_cols(logits, valid):
    """softmax over axis 1 (columns); masked entries give exactly 0."""
    lm = tl.where(valid, logits, float("-inf"))
    mx = tl.max(lm, axis=1)  # [BT, NP]
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # all-masked (padding) columns
    e = tl.exp(lm - mx[:, None, :])
    s = tl.sum(e, axis=1)
    s = tl.where(s > 0.0, s, 1.0)
    return e / s[:, None, :]


@triton.jit
def _norm_cols(x):
    """y = x / clamp(colsum, tiny); returns (y, divisor [BT, NP], unclamped [BT, NP])."""
    s = tl.sum(x, axis=1)
    c = tl.maximum(s, _TINY)
    return x / c[:, None, :], c, s >= _TINY


@triton.jit
def _norm_rows(x):
    """y = x / clamp(rowsum, tiny); returns (y, divisor [BT, NP], unclamped [BT, NP])."""
    s = tl.sum(x, axis=2)
    c = tl.maximum(s, _TINY)
    return x / c[:, :, None], c, s >= _TINY


@triton.jit
def _norm_cols_bwd(g, y, c, ok, valid):
    """Gradient through y = x / clamp(colsum(x)); padding entries stay exactly 0."""
    gy = tl.where(ok, tl.sum(g * y, axis=1), 0.0)
    return tl.where(valid, (g - gy[:, None, :]) / c[:, None, :], 0.0)


@triton.jit
def _norm_rows_bwd(g, y, c, ok, valid):
    """Gradient through y = x / clamp(rowsum(x)); padding entries stay exactly 0."""
    gy = tl.where(ok, tl.sum(g * y, axis=2), 0.0)
    return tl.where(valid, (g - gy[:, :, None]) / c[:, :, None], 0.0)


@triton.jit
def sinkhorn_fwd_tile(logits, valid, iters):
    """Sinkhorn-Knopp of a [BT, NP, NP] fp32 tile of logits (``iters`` >= 1, runtime)."""
    m = _softmax_cols(logits, valid)
    m, _c, _ok = _norm_rows(m)
    for _ in range(1, iters):
        m, _c, _ok = _norm_cols(m)
        m, _c, _ok = _norm_rows(m)
    return m


@triton.jit
def sinkhorn_bwd_tile(logits, valid, g, iters):
    """dL/dlogits from dL/dM of a [BT, NP, NP] tile; recomputes the iterates (O(iters^2))."""
    m0 = _softmax_cols(logits, valid)
    for q in range(1, iters):
        p = iters - q  # pairs iters-1 .. 1, last first
        x, _c, _ok = _norm_rows(m0)  # step 1 (rows)
        for _ in range(1, p):  # pairs 1 .. p-1
            x, _c, _ok = _norm_cols(x)
            x, _c, _ok = _norm_rows(x)
        yc, cc, okc = _norm_cols(x)  # pair p, columns
        yr, cr, okr = _norm_rows(yc)  # pair p, rows
        g = _norm_rows_bwd(g, yr, cr, okr, valid)
        g = _norm_cols_bwd(g, yc, cc, okc, valid)
    y1, c1, ok1 = _norm_rows(m0)
    g = _norm_rows_bwd(g, y1, c1, ok1, valid)
    gm = tl.sum(g * m0, axis=1)
    return m0 * (g - gm[:, None, :])


# --------------------------------------------------------------------------------------------------
# Standalone kernels on [T, n, n] (mhckit.functional.sinkhorn with backend="triton")
# --------------------------------------------------------------------------------------------------
# ELEMS ~ entries of one [BT, NP, NP] tile; BT = ELEMS // NP^2 (heuristic, so that n = 8 does not
# get n = 2's token block)
_CFG = configs(
    gpu=[dict(ELEMS=512, num_warps=4), dict(ELEMS=256, num_warps=2)],
    interp=dict(ELEMS=256),
)
_BT = {"BT": lambda a: per_token_block(a["ELEMS"], a["NP"])}


@triton.jit
def _tile_offsets(pid, T, N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr):
    rows = pid * BT + tl.arange(0, BT)
    i = tl.arange(0, NP)[None, :, None]
    j = tl.arange(0, NP)[None, None, :]
    valid = (i < N) & (j < N)  # [1, NP, NP]
    offs = rows.to(tl.int64)[:, None, None] * (N * N) + i * N + j  # [BT, NP, NP]
    mask = (rows < T)[:, None, None] & valid
    return offs, mask, valid


@triton.autotune(configs=_CFG, key=["N"])
@triton.heuristics(_BT)
@triton.jit(do_not_specialize=["T", "iters"])
def _sinkhorn_fwd_kernel(
    l_ptr, out_ptr, T, iters, N: tl.constexpr, NP: tl.constexpr, ELEMS: tl.constexpr, BT: tl.constexpr
):
    offs, mask, valid = _tile_offsets(tl.program_id(0), T, N, NP, BT)
    logits = tl.load(l_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = sinkhorn_fwd_tile(logits, valid, iters)
    tl.store(out_ptr + offs, m, mask=mask)


@triton.autotune(configs=_CFG, key=["N"])
@triton.heuristics(_BT)
@triton.jit(do_not_specialize=["T", "iters"])
def _sinkhorn_bwd_kernel(
    l_ptr, g_ptr, gl_ptr, T, iters, N: tl.constexpr, NP: tl.constexpr, ELEMS: tl.constexpr, BT: tl.constexpr
):
    offs, mask, valid = _tile_offsets(tl.program_id(0), T, N, NP, BT)
    logits = tl.load(l_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gl = sinkhorn_bwd_tile(logits, valid, g, iters)
    tl.store(gl_ptr + offs, gl, mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers: logits [T, n, n] (any float dtype but float64) -> float32 [T, n, n]
# --------------------------------------------------------------------------------------------------
def sinkhorn_fwd(logits: torch.Tensor, iters: int) -> torch.Tensor:
    t, n = logits.shape[0], logits.shape[-1]
    logits = logits.contiguous()
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    if t == 0:
        return out
    grid = lambda meta: (triton.cdiv(t, meta["BT"]),)  # noqa: E731
    _sinkhorn_fwd_kernel[grid](logits, out, t, iters, N=n, NP=next_pow2(n))
    return out


def sinkhorn_bwd(logits: torch.Tensor, grad: torch.Tensor, iters: int) -> torch.Tensor:
    t, n = logits.shape[0], logits.shape[-1]
    logits, grad = logits.contiguous(), grad.contiguous()
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    if t == 0:
        return out
    grid = lambda meta: (triton.cdiv(t, meta["BT"]),)  # noqa: E731
    _sinkhorn_bwd_kernel[grid](logits, grad, out, t, iters, N=n, NP=next_pow2(n))
    return out

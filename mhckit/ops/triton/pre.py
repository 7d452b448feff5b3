"""Fused H_pre read in Triton (mHC Eq. 3, arXiv 2512.24880): forward and backward.

Shape legend: ``T`` tokens (leading dims flattened), ``n`` streams, ``C`` width, ``NP`` = next
power of two >= n, ``BT`` x ``BC`` the token x channel tile of a program, ``S`` splits of C.

==================================================================================================
Forward  _pre_fwd_kernel                                                 u = sum_j h_pre[j] x[j]
    x [T, n, C] (streams' dtype), h_pre [T, n] -> u [T, C] (streams' dtype).
    Each program reads its [BT, BC] tile of every stream once (loads coalesced along C),
    accumulates in fp32 and writes one [BT, BC] tile: reads nC, writes C per token.
==================================================================================================
Backward _pre_bwd_kernel                                   given du [T, C]
    dx[j] = h_pre[j] * du                                  (written in x's dtype)
    dh_pre[j] = sum_C du * x[j]                            (fp32 reduction over C)
    (NEED_DX=False: dh_pre only, for the sublayer backward whose dx kernel adds h_pre du itself)
    Programs own BT tokens and a slice of C (S slices when tokens are few); each loops over its
    slice in BC chunks, writing dx and accumulating dh_pre in fp32 registers, then stores a
    per-slice partial [S, T, n] that torch sums (no atomics).
==================================================================================================
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import auto_splits, cast_out, configs, next_pow2, split_chunk, token_rows_block


@triton.autotune(
    configs=configs(
        gpu=[
            dict(BT=8, BC=256, num_warps=4),
            dict(BT=4, BC=512, num_warps=4),
        ],
        interp=dict(BT=16, BC=32),
    ),
    key=["N", "C"],
)
@triton.jit(do_not_specialize=["T"])
def _pre_fwd_kernel(x_ptr, h_ptr, u_ptr, T, C, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cc = tl.program_id(1) * BC + tl.arange(0, BC)
    rmask = rows < T
    m = rmask[:, None] & (cc < C)[None, :]
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(N):
        h = tl.load(h_ptr + rows64 * N + j, mask=rmask, other=0.0).to(tl.float32)  # [BT]
        xj = tl.load(x_ptr + (rows64 * N + j)[:, None] * C + cc[None, :], mask=m, other=0.0)
        acc += h[:, None] * xj.to(tl.float32)
    tl.store(u_ptr + rows64[:, None] * C + cc[None, :], cast_out(acc, u_ptr.dtype.element_ty), mask=m)


# ROWS = BT * NP stream rows per [BT, NP, BC] tile (BT from a heuristic, so n = 8 gets fewer tokens)
@triton.autotune(
    configs=configs(
        gpu=[
            dict(ROWS=16, BC=256, num_warps=4),
            dict(ROWS=16, BC=512, num_warps=8),
        ],
        interp=dict(ROWS=32, BC=32),
    ),
    key=["N", "C"],
)
@triton.heuristics({"BT": lambda a: token_rows_block(a["ROWS"], a["NP"])})
@triton.jit(do_not_specialize=["T", "chunk16"])
def _pre_bwd_kernel(
    x_ptr, h_ptr, gu_ptr, gx_ptr, gh_ptr, T, C, chunk16,
    N: tl.constexpr, NP: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    NEED_DX: tl.constexpr,
):  # fmt: skip
    pid_t, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    j = tl.arange(0, NP)
    m2 = rmask[:, None] & (j < N)[None, :]  # [BT, NP]
    h = tl.load(h_ptr + rows64[:, None] * N + j[None, :], mask=m2, other=0.0).to(tl.float32)
    xrow = (rows64[:, None] * N + j[None, :]) * C  # [BT, NP] offset of stream j of each token
    gh = tl.zeros([BT, NP], dtype=tl.float32)
    lo = pid_s * chunk16 * 16  # 16-aligned slice of C (lets the compiler vectorise the loads)
    hi = tl.minimum(lo + chunk16 * 16, C)
    for c0 in range(lo, hi, BC):
        cc = c0 + tl.arange(0, BC)
        cm = cc < hi
        gu = tl.load(gu_ptr + rows64[:, None] * C + cc[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        gu = gu.to(tl.float32)
        m3 = m2[:, :, None] & cm[None, None, :]
        offs = xrow[:, :, None] + cc[None, None, :]  # [BT, NP, BC]
        x3 = tl.load(x_ptr + offs, mask=m3, other=0.0).to(tl.float32)
        if NEED_DX:
            gx = h[:, :, None] * gu[:, None, :]
            tl.store(gx_ptr + offs, cast_out(gx, gx_ptr.dtype.element_ty), mask=m3)
        gh += tl.sum(x3 * gu[:, None, :], axis=2)
    tl.store(gh_ptr + (pid_s * T + rows64)[:, None] * N + j[None, :], gh, mask=m2)


def pre_fwd(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """``x [T, n, C]``, ``h_pre [T, n]`` -> ``u [T, C]`` in x's dtype."""
    t, n, c = x.shape
    x, h_pre = x.contiguous(), h_pre.contiguous()
    u = torch.empty(t, c, dtype=x.dtype, device=x.device)
    if t == 0:
        return u
    grid = lambda meta: (triton.cdiv(t, meta["BT"]), triton.cdiv(c, meta["BC"]))  # noqa: E731
    _pre_fwd_kernel[grid](x, h_pre, u, t, c, N=n)
    return u


def pre_bwd(
    x: torch.Tensor, h_pre: torch.Tensor, grad_u: torch.Tensor, splits: int | None = None, need_dx: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(dx [T, n, C] in x's dtype, dh_pre [T, n] in h_pre's dtype)``; ``splits`` forces the C split.
    With ``need_dx=False`` only ``dh_pre`` (dx None: one read of x and du, no write of [T, n, C])."""
    t, n, c = x.shape
    x, h_pre, grad_u = x.contiguous(), h_pre.contiguous(), grad_u.contiguous()
    dx = torch.empty_like(x) if need_dx else None
    if t == 0:
        return dx, torch.zeros_like(h_pre)
    if splits is None:
        splits = auto_splits(x.device, triton.cdiv(t, 8), triton.cdiv(c, 256))
    chunk, splits = split_chunk(c, splits)
    # per-slice partials [S, T, n] (no leading axis when S == 1: returned as is, not a view)
    gh = torch.empty((splits, t, n) if splits > 1 else (t, n), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(t, meta["BT"]), splits)  # noqa: E731
    _pre_bwd_kernel[grid](x, h_pre, grad_u, x if dx is None else dx, gh, t, c, chunk // 16, N=n, NP=next_pow2(n),
                          NEED_DX=need_dx)
    return dx, (gh if splits == 1 else gh.sum(0)).to(h_pre.dtype)

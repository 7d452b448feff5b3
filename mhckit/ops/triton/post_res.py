"""Fused H_res mix + H_post write in Triton (mHC Eq. 3, arXiv 2512.24880): forward and backward.

Shape legend: ``T`` tokens (leading dims flattened), ``n`` streams, ``C`` width, ``NP`` = next
power of two >= n, ``BT`` x ``BC`` the token x channel tile of a program, ``S`` splits of C.

==================================================================================================
Forward  _post_res_fwd_kernel          x_new[k] = sum_j h_res[k, j] x[j] + h_post[k] y
    x [T, n, C], y [T, C] (any float dtypes), h_post [T, n], h_res [T, n, n] -> x_new [T, n, C]
    in x's dtype. One program per [BT, BC] tile: reads every stream's tile once and y's once,
    accumulates all n outputs as a [BT, NP, BC] fp32 tile, writes them once:
    reads (n+1)C, writes nC per token (the fused post + res + merge of the paper's Sec. 4.3).
==================================================================================================
Backward _post_res_bwd_kernel                              given g = dL/dx_new [T, n, C]
    dx[j]         = sum_k h_res[k, j] g[k]                 (written in x's dtype)
    dy            = sum_k h_post[k] g[k]                   (written in y's dtype)
    dh_post[k]    = sum_C g[k] * y                         (fp32 reduction over C)
    dh_res[k, j]  = sum_C g[k] * x[j]                      (fp32 reduction over C)
    Programs own BT tokens and a slice of C (S slices when tokens are few), loop over it in BC
    chunks and keep the coefficient gradients in fp32 registers; per-slice partials
    [S, T, n] / [S, T, n, n] are summed by torch (no atomics). Reads (2n+1)C, writes (n+1)C.
==================================================================================================
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import auto_splits, cast_out, configs, next_pow2, split_chunk, token_rows_block


# ROWS = BT * NP stream rows per [BT, NP, BC] tile (BT from a heuristic, so n = 8 gets fewer tokens)
_BT = {"BT": lambda a: token_rows_block(a["ROWS"], a["NP"])}


@triton.autotune(
    configs=configs(
        gpu=[
            dict(ROWS=16, BC=256, num_warps=4),
            dict(ROWS=8, BC=512, num_warps=4),
        ],
        interp=dict(ROWS=32, BC=32),
    ),
    key=["N", "C"],
)
@triton.heuristics(_BT)
@triton.jit(do_not_specialize=["T"])
def _post_res_fwd_kernel(
    x_ptr, y_ptr, hpost_ptr, hres_ptr, out_ptr, T, C,
    N: tl.constexpr, NP: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cc = tl.program_id(1) * BC + tl.arange(0, BC)
    rmask = rows < T
    cm = cc < C
    rows64 = rows.to(tl.int64)
    k = tl.arange(0, NP)
    mk = rmask[:, None] & (k < N)[None, :]  # [BT, NP]
    acc = tl.zeros([BT, NP, BC], dtype=tl.float32)
    for j in tl.static_range(N):
        hcol = tl.load(hres_ptr + rows64[:, None] * (N * N) + k[None, :] * N + j, mask=mk, other=0.0)
        xj = tl.load(x_ptr + (rows64 * N + j)[:, None] * C + cc[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        acc += hcol.to(tl.float32)[:, :, None] * xj.to(tl.float32)[:, None, :]
    hpost = tl.load(hpost_ptr + rows64[:, None] * N + k[None, :], mask=mk, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows64[:, None] * C + cc[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
    acc += hpost[:, :, None] * y.to(tl.float32)[:, None, :]
    offs = (rows64[:, None] * N + k[None, :])[:, :, None] * C + cc[None, None, :]
    tl.store(out_ptr + offs, cast_out(acc, out_ptr.dtype.element_ty), mask=mk[:, :, None] & cm[None, None, :])


@triton.autotune(
    configs=configs(
        gpu=[
            dict(ROWS=16, BC=256, num_warps=8),
            dict(ROWS=8, BC=256, num_warps=4),
        ],
        interp=dict(ROWS=32, BC=32),
    ),
    key=["N", "C"],
)
@triton.heuristics(_BT)
@triton.jit(do_not_specialize=["T", "chunk16"])
def _post_res_bwd_kernel(
    x_ptr, y_ptr, hpost_ptr, hres_ptr, g_ptr, gx_ptr, gy_ptr, ghpost_ptr, ghres_ptr, T, C, chunk16,
    N: tl.constexpr, NP: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    pid_t, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    k = tl.arange(0, NP)
    mk = rmask[:, None] & (k < N)[None, :]  # [BT, NP]
    jj = tl.arange(0, NP)[None, None, :]
    hpost = tl.load(hpost_ptr + rows64[:, None] * N + k[None, :], mask=mk, other=0.0).to(tl.float32)
    grow = (rows64[:, None] * N + k[None, :]) * C  # [BT, NP] offset of stream k of each token
    gpost = tl.zeros([BT, NP], dtype=tl.float32)
    gres = tl.zeros([BT, NP, NP], dtype=tl.float32)  # [token, k, j]
    lo = pid_s * chunk16 * 16  # 16-aligned slice of C (lets the compiler vectorise the loads)
    hi = tl.minimum(lo + chunk16 * 16, C)
    for c0 in range(lo, hi, BC):
        cc = c0 + tl.arange(0, BC)
        cm = cc < hi
        m2 = rmask[:, None] & cm[None, :]
        m3 = mk[:, :, None] & cm[None, None, :]
        g3 = tl.load(g_ptr + grow[:, :, None] + cc[None, None, :], mask=m3, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows64[:, None] * C + cc[None, :], mask=m2, other=0.0).to(tl.float32)
        gy = tl.sum(hpost[:, :, None] * g3, axis=1)  # [BT, BC]
        tl.store(gy_ptr + rows64[:, None] * C + cc[None, :], cast_out(gy, gy_ptr.dtype.element_ty), mask=m2)
        gpost += tl.sum(g3 * y[:, None, :], axis=2)
        for j in tl.static_range(N):
            hcol = tl.load(hres_ptr + rows64[:, None] * (N * N) + k[None, :] * N + j, mask=mk, other=0.0)
            xoffs = (rows64 * N + j)[:, None] * C + cc[None, :]
            xj = tl.load(x_ptr + xoffs, mask=m2, other=0.0).to(tl.float32)
            gxj = tl.sum(hcol.to(tl.float32)[:, :, None] * g3, axis=1)  # [BT, BC]
            tl.store(gx_ptr + xoffs, cast_out(gxj, gx_ptr.dtype.element_ty), mask=m2)
            part = tl.sum(g3 * xj[:, None, :], axis=2)  # [BT, NP] over k
            gres += tl.where(jj == j, part[:, :, None], 0.0)
    base = (pid_s * T + rows64)[:, None] * N + k[None, :]  # [BT, NP]
    tl.store(ghpost_ptr + base, gpost, mask=mk)
    tl.store(ghres_ptr + base[:, :, None] * N + jj, gres, mask=mk[:, :, None] & (jj < N))


def post_res_fwd(x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> torch.Tensor:
    """``x [T, n, C], y [T, C], h_post [T, n], h_res [T, n, n]`` -> ``x_new [T, n, C]`` in x's dtype."""
    t, n, c = x.shape
    x, y, h_post, h_res = x.contiguous(), y.contiguous(), h_post.contiguous(), h_res.contiguous()
    out = torch.empty_like(x)
    if t == 0:
        return out
    grid = lambda meta: (triton.cdiv(t, meta["BT"]), triton.cdiv(c, meta["BC"]))  # noqa: E731
    _post_res_fwd_kernel[grid](x, y, h_post, h_res, out, t, c, N=n, NP=next_pow2(n))
    return out


def post_res_bwd(
    x: torch.Tensor,
    y: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
    grad: torch.Tensor,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dy, dh_post, dh_res)`` in the dtypes of ``(x, y, h_post, h_res)``; ``splits`` forces the C split."""
    t, n, c = x.shape
    x, y, h_post, h_res = x.contiguous(), y.contiguous(), h_post.contiguous(), h_res.contiguous()
    grad = grad.contiguous()
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    if t == 0:
        return dx, dy, torch.zeros_like(h_post), torch.zeros_like(h_res)
    if splits is None:
        splits = auto_splits(x.device, triton.cdiv(t, 4), triton.cdiv(c, 256))
    chunk, splits = split_chunk(c, splits)
    f32 = dict(dtype=torch.float32, device=x.device)
    lead = (splits,) if splits > 1 else ()  # partials [S, ...]; no S axis when S == 1 (no views returned)
    gpost, gres = torch.empty(*lead, t, n, **f32), torch.empty(*lead, t, n, n, **f32)
    grid = lambda meta: (triton.cdiv(t, meta["BT"]), splits)  # noqa: E731
    _post_res_bwd_kernel[grid](
        x, y, h_post, h_res, grad, dx, dy, gpost, gres, t, c, chunk // 16, N=n, NP=next_pow2(n)
    )  # fmt: skip
    if splits > 1:
        gpost, gres = gpost.sum(0), gres.sum(0)
    return dx, dy, gpost.to(h_post.dtype), gres.to(h_res.dtype)

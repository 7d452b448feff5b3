"""Fused mHC coefficients in Triton (mHC Eq. 7-9, arXiv 2512.24880): forward and exact backward.

Shape legend: ``T`` tokens (leading dims flattened), ``n`` streams, ``C`` width, ``D = n*C``,
``K = 2n + n*n`` logits laid out ``[pre (n) | post (n) | res (n*n, row-major)]``, ``KP`` = next
power of two >= max(K, 16) (the padded logit axis of the ``tl.dot`` tiles), ``NP`` = next power of
two >= n, ``S`` splits of a reduction axis over programs.

==================================================================================================
Pass 1  _fwd_dot_kernel   acc = v @ phi  and  ss = sum(v^2)          (Eq. 7, one read of x)
    v = flatten(x) [T, D] (streams' dtype, converted to fp32 in registers), phi [D, K] fp32.
    Programs tile tokens (BT) x a slice of D (split over S programs when tokens are few); each
    loops over its D slice in BN chunks: acc += v_chunk @ phi_chunk (tl.dot, fp32 accumulator),
    ss += sum(v_chunk^2) (fp32). The products are fp32-accurate on tensor cores: fp32 / fp16
    streams use "tf32x3" (3 tf32 products); bf16 streams are exact in bf16, so phi is split into
    three bf16 parts (phi = p1 + p2 + p3 to 2^-24) and acc += v p1 + v p2 + v p3 (bf16 MMAs).
    phi is prepared once per call by _prep_phi_kernel: zero-padded to [D, KP] (fp32), or the
    three bf16 parts [3, D, KP] (so the MMA operands are loaded as they are, no per-tile work).
    Writes partials acc [S, T, KP], ss [S, T] (fp32; tiny next to x).
==================================================================================================
Pass 2  _fwd_epilogue_kernel   per token, fp32 registers                      (Eq. 7-9)
    acc, ss = sum over S of the partials;  r = sqrt(ss / D + eps);  z = acc / r
    a_pre = alpha_0 z_pre + b_pre,  a_post = alpha_1 z_post + b_post,  a_res = alpha_2 z_res + b_res
    h_pre = sigmoid(a_pre), h_post = 2 sigmoid(a_post), h_res = Sinkhorn(a_res as [n, n]) (sinkhorn.py)
    Saves for backward: r [T] and z [T, K] (fp32, the only per-token tensors besides x).
==================================================================================================
Backward 1  _bwd_token_kernel   per token, fp32 registers
    da_pre  = dh_pre  * s (1 - s),        s = sigmoid(a_pre)
    da_post = dh_post * 2 s (1 - s),      s = sigmoid(a_post)
    da_res  = Sinkhorn backward (recomputes the iterations from a_res, nothing stored)
    dz = alpha_g * da (per slice g);  grad_bias = sum_T da;  grad_alpha_g = sum_T sum_slice(da * z)
        (both as per-program fp32 partial sums [P, K] / [P, 3], reduced by a tiny torch sum)
    z = (v @ phi) / r, r = sqrt(mean(v^2) + eps) gives
        dL/dv = (dz / r) @ phi^T - v * sum(dz * z) / (D r^2)
    so it writes  dzr = dz / r [T, K]  and  coef = sum(dz * z) / (D r^2) [T]  (fp32).
==================================================================================================
Backward 2  _bwd_dx_dphi_kernel   one read of x, one write of dx
    Programs own a BN slice of D and a token range (split over S programs when D is short);
    for each BT block of tokens:
        dx[:, slice]  = dzr @ phi[slice]^T - v[:, slice] * coef     (tl.dot, fp32; stored in x's dtype)
                        [+ dx_in[:, slice] + h_pre[j] du[c]]        (DXIN / GU: the sublayer's other
                                                                     x-gradients, see coeffs_bwd)
        gphi[slice]  += v[:, slice]^T @ dzr                           (tl.dot, fp32 accumulator)
    The per-program gphi partials [S, D, K] are summed by torch (no atomics). Products: "tf32x3"
    for fp32 / fp16 streams; for bf16 streams bf16 MMAs on split operands:
    dx:   dzr1 p1 + dzr1 p2 + dzr2 p1              (two-part splits, ~2^-16; dx is stored in bf16)
    gphi: v dzr1 + v dzr2 + v dzr3                 (v is bf16-exact; dzr = dzr1 + dzr2 + dzr3 to ~2^-24)
==================================================================================================
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED, auto_splits, cast_out, configs, next_pow2, per_token_block, split_chunk
from .sinkhorn import sinkhorn_bwd_tile, sinkhorn_fwd_tile

DOT_PRECISION = "tf32x3"  # fp32 operands: fp32-accurate tl.dot on tensor cores (3 tf32 products)
# bfloat16 streams: products of bf16-exact operands on bf16 tensor cores (fp32 accumulation). The
# interpreter cannot multiply bf16 tiles, so there the same (exactly representable) values are
# multiplied as fp32: the splitting logic is what the CPU tests check.
_MMA_DT = tl.constexpr(tl.float32 if INTERPRETED else tl.bfloat16)


@triton.jit
def _split3_bf16(a):
    """fp32 ``a`` -> ``(p1, p2, p3)`` of bf16-exact values with ``a = p1 + p2 + p3`` to ~2^-24."""
    p1 = a.to(tl.bfloat16).to(tl.float32)
    r1 = a - p1  # exact
    p2 = r1.to(tl.bfloat16).to(tl.float32)
    p3 = (r1 - p2).to(tl.bfloat16).to(tl.float32)
    return p1, p2, p3


@triton.jit
def _mma(a, b, acc):
    """``acc + a @ b`` for operands holding bf16-exact values (bf16 MMA, fp32 accumulate)."""
    if _MMA_DT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a.to(_MMA_DT), b.to(_MMA_DT), acc)


# Per-token kernels: ELEMS ~ entries of one [BT, NP, NP] tile, BT = ELEMS // NP^2 (heuristic)
_TOKEN_CFG = configs(
    gpu=[dict(ELEMS=512, num_warps=4), dict(ELEMS=256, num_warps=2)],
    interp=dict(ELEMS=256),
)
_MIN_ELEMS = min(c.kwargs["ELEMS"] for c in _TOKEN_CFG)
_BT = {"BT": lambda a: per_token_block(a["ELEMS"], a["NP"])}


# --------------------------------------------------------------------------------------------------
# phi, prepared once per call: zero-padded to KP columns; for bf16 streams split into three bf16
# parts (phi = p1 + p2 + p3 to ~2^-24, p1 + p2 to ~2^-16) that feed bf16 MMAs directly
# --------------------------------------------------------------------------------------------------
@triton.jit
def _prep_phi_kernel(phi_ptr, out_ptr, D, K, KP: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    kk = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.arange(0, KP)
    inside = (kk < D)[:, None]
    p = tl.load(phi_ptr + kk[:, None] * K + cols[None, :], mask=inside & (cols < K)[None, :], other=0.0)
    p = p.to(tl.float32)
    offs = kk[:, None] * KP + cols[None, :]
    if SPLIT:
        p1, p2, p3 = _split3_bf16(p)
        tl.store(out_ptr + offs, p1.to(tl.bfloat16), mask=inside)  # exact: bf16-representable values
        tl.store(out_ptr + D * KP + offs, p2.to(tl.bfloat16), mask=inside)
        tl.store(out_ptr + 2 * D * KP + offs, p3.to(tl.bfloat16), mask=inside)
    else:
        tl.store(out_ptr + offs, p, mask=inside)


def _prep_phi(phi: torch.Tensor, kp: int, split: bool) -> torch.Tensor:
    """``phi [D, K]`` -> ``[3, D, KP]`` bf16 parts (``split``) or ``[1, D, KP]`` fp32, zero-padded."""
    d, k = phi.shape
    dtype = torch.bfloat16 if split else torch.float32
    out = torch.empty((3 if split else 1), d, kp, dtype=dtype, device=phi.device)
    bn = max(16, 4096 // kp)
    _prep_phi_kernel[(triton.cdiv(d, bn),)](phi, out, d, k, KP=kp, BN=bn, SPLIT=split)
    return out


# --------------------------------------------------------------------------------------------------
# Pass 1: acc = v @ phi, ss = sum(v^2)
# --------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=configs(
        gpu=[
            dict(BT=64, BN=64, num_warps=4, num_stages=3),
            dict(BT=128, BN=64, num_warps=8, num_stages=3),
            dict(BT=64, BN=128, num_warps=8, num_stages=2),
        ],
        interp=dict(BT=16, BN=32),
    ),
    key=["D", "KP"],
)
@triton.jit(do_not_specialize=["T", "chunk16"])
def _fwd_dot_kernel(
    x_ptr, ph_ptr, acc_ptr, ss_ptr, T, D, chunk16,
    KP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, BF16: tl.constexpr,
):  # fmt: skip
    pid_t, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    rmask = rows < T
    cols = tl.arange(0, KP)
    lo = pid_s * chunk16 * 16  # 16-aligned slice of D (lets the compiler vectorise the loads)
    hi = tl.minimum(lo + chunk16 * 16, D)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D  # [BT, 1]
    acc = tl.zeros([BT, KP], dtype=tl.float32)
    ss = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(lo, hi, BN):
        kk = k0 + tl.arange(0, BN)
        kmask = kk < hi
        v_raw = tl.load(x_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        p_offs = kk[:, None] * KP + cols[None, :]  # [BN, KP] of the padded phi
        if BF16:
            acc = _mma(v_raw, tl.load(ph_ptr + 2 * D * KP + p_offs, mask=kmask[:, None], other=0.0), acc)
            acc = _mma(v_raw, tl.load(ph_ptr + D * KP + p_offs, mask=kmask[:, None], other=0.0), acc)
            acc = _mma(v_raw, tl.load(ph_ptr + p_offs, mask=kmask[:, None], other=0.0), acc)  # [BT, KP]
        else:
            p = tl.load(ph_ptr + p_offs, mask=kmask[:, None], other=0.0)
            acc = tl.dot(v_raw.to(tl.float32), p, acc, input_precision=PREC)  # [BT, KP]
        v = v_raw.to(tl.float32)
        ss += tl.sum(v * v, axis=1)
    out_rows = (pid_s * T + rows).to(tl.int64)
    tl.store(acc_ptr + out_rows[:, None] * KP + cols[None, :], acc, mask=rmask[:, None])
    tl.store(ss_ptr + out_rows, ss, mask=rmask)


# --------------------------------------------------------------------------------------------------
# Tile helpers: the three slices of a [*, K] logit row as [BT, NP] / [BT, NP] / [BT, NP, NP]
# --------------------------------------------------------------------------------------------------
@triton.jit
def _slice_offsets(N: tl.constexpr, NP: tl.constexpr):
    j = tl.arange(0, NP)
    jv = j < N  # [NP]
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    valid = (i3 < N) & (j3 < N)  # [1, NP, NP]
    res = 2 * N + i3 * N + j3  # [1, NP, NP] column of h_res[i, j] in the K axis
    return j, jv, res, valid


# --------------------------------------------------------------------------------------------------
# Pass 2: RMS, gates, activations, Sinkhorn (per token)
# --------------------------------------------------------------------------------------------------
@triton.autotune(configs=_TOKEN_CFG, key=["N"])
@triton.heuristics(_BT)
@triton.jit(do_not_specialize=["T", "S", "iters"])
def _fwd_epilogue_kernel(
    acc_ptr, ss_ptr, bias_ptr, alpha_ptr, hpre_ptr, hpost_ptr, hres_ptr, z_ptr, r_ptr,
    T, S, d_float, eps, iters,
    N: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, ELEMS: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    K: tl.constexpr = 2 * N + N * N
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    j, jv, res, valid = _slice_offsets(N, NP)
    m2 = rmask[:, None] & jv[None, :]  # [BT, NP]
    m3 = rmask[:, None, None] & valid  # [BT, NP, NP]
    acc_pre = tl.zeros([BT, NP], dtype=tl.float32)
    acc_post = tl.zeros([BT, NP], dtype=tl.float32)
    acc_res = tl.zeros([BT, NP, NP], dtype=tl.float32)
    ss = tl.zeros([BT], dtype=tl.float32)
    for s in range(0, S):
        base = (s * T + rows).to(tl.int64) * KP
        acc_pre += tl.load(acc_ptr + base[:, None] + j[None, :], mask=m2, other=0.0)
        acc_post += tl.load(acc_ptr + base[:, None] + N + j[None, :], mask=m2, other=0.0)
        acc_res += tl.load(acc_ptr + base[:, None, None] + res, mask=m3, other=0.0)
        ss += tl.load(ss_ptr + s * T + rows, mask=rmask, other=0.0)
    r = tl.sqrt(ss / d_float + eps)  # [BT]
    z_pre = acc_pre / r[:, None]
    z_post = acc_post / r[:, None]
    z_res = acc_res / r[:, None, None]
    a0 = tl.load(alpha_ptr).to(tl.float32)
    a1 = tl.load(alpha_ptr + 1).to(tl.float32)
    a2 = tl.load(alpha_ptr + 2).to(tl.float32)
    b_pre = tl.load(bias_ptr + j, mask=jv, other=0.0).to(tl.float32)
    b_post = tl.load(bias_ptr + N + j, mask=jv, other=0.0).to(tl.float32)
    b_res = tl.load(bias_ptr + res, mask=valid, other=0.0).to(tl.float32)
    h_pre = tl.sigmoid(a0 * z_pre + b_pre[None, :])
    h_post = 2.0 * tl.sigmoid(a1 * z_post + b_post[None, :])
    h_res = sinkhorn_fwd_tile(a2 * z_res + b_res, valid, iters)

    rows64 = rows.to(tl.int64)
    tl.store(hpre_ptr + rows64[:, None] * N + j[None, :], h_pre, mask=m2)
    tl.store(hpost_ptr + rows64[:, None] * N + j[None, :], h_post, mask=m2)
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    tl.store(hres_ptr + rows64[:, None, None] * (N * N) + i3 * N + j3, h_res, mask=m3)
    zrow = rows64 * K
    tl.store(z_ptr + zrow[:, None] + j[None, :], z_pre, mask=m2)
    tl.store(z_ptr + zrow[:, None] + N + j[None, :], z_post, mask=m2)
    tl.store(z_ptr + zrow[:, None, None] + res, z_res, mask=m3)
    tl.store(r_ptr + rows, r, mask=rmask)


# --------------------------------------------------------------------------------------------------
# Backward 1: activations, Sinkhorn backward, gates; dzr = dz / r, coef, bias/alpha partials
# --------------------------------------------------------------------------------------------------
@triton.autotune(configs=_TOKEN_CFG, key=["N"], reset_to_zero=["pbias_ptr", "palpha_ptr"])
@triton.heuristics(_BT)
@triton.jit(do_not_specialize=["T", "iters"])
def _bwd_token_kernel(
    z_ptr, r_ptr, gpre_ptr, gpost_ptr, gres_ptr, bias_ptr, alpha_ptr,
    dzr_ptr, coef_ptr, pbias_ptr, palpha_ptr, T, d_float, iters,
    N: tl.constexpr, NP: tl.constexpr, ELEMS: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    K: tl.constexpr = 2 * N + N * N
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    j, jv, res, valid = _slice_offsets(N, NP)
    m2 = rmask[:, None] & jv[None, :]
    m3 = rmask[:, None, None] & valid
    zrow = rows64 * K
    z_pre = tl.load(z_ptr + zrow[:, None] + j[None, :], mask=m2, other=0.0)
    z_post = tl.load(z_ptr + zrow[:, None] + N + j[None, :], mask=m2, other=0.0)
    z_res = tl.load(z_ptr + zrow[:, None, None] + res, mask=m3, other=0.0)
    r = tl.load(r_ptr + rows, mask=rmask, other=1.0)
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    g_pre = tl.load(gpre_ptr + rows64[:, None] * N + j[None, :], mask=m2, other=0.0).to(tl.float32)
    g_post = tl.load(gpost_ptr + rows64[:, None] * N + j[None, :], mask=m2, other=0.0).to(tl.float32)
    g_res = tl.load(gres_ptr + rows64[:, None, None] * (N * N) + i3 * N + j3, mask=m3, other=0.0).to(tl.float32)
    a0 = tl.load(alpha_ptr).to(tl.float32)
    a1 = tl.load(alpha_ptr + 1).to(tl.float32)
    a2 = tl.load(alpha_ptr + 2).to(tl.float32)
    b_pre = tl.load(bias_ptr + j, mask=jv, other=0.0).to(tl.float32)
    b_post = tl.load(bias_ptr + N + j, mask=jv, other=0.0).to(tl.float32)
    b_res = tl.load(bias_ptr + res, mask=valid, other=0.0).to(tl.float32)

    s_pre = tl.sigmoid(a0 * z_pre + b_pre[None, :])
    da_pre = tl.where(m2, g_pre * (s_pre * (1.0 - s_pre)), 0.0)
    s_post = tl.sigmoid(a1 * z_post + b_post[None, :])
    da_post = tl.where(m2, g_post * (2.0 * s_post * (1.0 - s_post)), 0.0)
    da_res = sinkhorn_bwd_tile(a2 * z_res + b_res, valid, g_res, iters)
    da_res = tl.where(m3, da_res, 0.0)

    # bias / alpha partial sums of this program (fp32)
    pb = pbias_ptr + pid * K
    tl.store(pb + j, tl.sum(da_pre, axis=0), mask=jv)
    tl.store(pb + N + j, tl.sum(da_post, axis=0), mask=jv)
    tl.store(pb + res, tl.sum(da_res, axis=0)[None, :, :], mask=valid)
    ga0 = tl.sum(tl.sum(da_pre * z_pre, axis=1), axis=0)
    ga1 = tl.sum(tl.sum(da_post * z_post, axis=1), axis=0)
    ga2 = tl.sum(tl.sum(tl.sum(da_res * z_res, axis=2), axis=1), axis=0)
    tl.store(palpha_ptr + pid * 3, ga0)
    tl.store(palpha_ptr + pid * 3 + 1, ga1)
    tl.store(palpha_ptr + pid * 3 + 2, ga2)

    dz_pre = a0 * da_pre
    dz_post = a1 * da_post
    dz_res = a2 * da_res
    dot = tl.sum(dz_pre * z_pre, axis=1) + tl.sum(dz_post * z_post, axis=1)
    dot += tl.sum(tl.sum(dz_res * z_res, axis=2), axis=1)  # [BT] sum(dz * z)
    tl.store(coef_ptr + rows, dot / (r * r * d_float), mask=rmask)
    tl.store(dzr_ptr + zrow[:, None] + j[None, :], dz_pre / r[:, None], mask=m2)
    tl.store(dzr_ptr + zrow[:, None] + N + j[None, :], dz_post / r[:, None], mask=m2)
    tl.store(dzr_ptr + zrow[:, None, None] + res, dz_res / r[:, None, None], mask=m3)


# --------------------------------------------------------------------------------------------------
# Backward 2: dx = dzr @ phi^T - v * coef  and  gphi partial = v^T @ dzr
# --------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=configs(
        gpu=[
            dict(BT=32, BN=64, num_warps=4, num_stages=3),
            dict(BT=64, BN=64, num_warps=8, num_stages=3),
            dict(BT=64, BN=128, num_warps=8, num_stages=2),
        ],
        interp=dict(BT=16, BN=32),
    ),
    key=["D", "KP"],
)
@triton.jit(do_not_specialize=["T", "chunk"])
def _bwd_dx_dphi_kernel(
    x_ptr, ph_ptr, dzr_ptr, coef_ptr, dx_ptr, gphi_ptr, dxin_ptr, gu_ptr, hpre_ptr, T, D, K, chunk, C,
    KP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, BF16: tl.constexpr,
    N: tl.constexpr, DXIN: tl.constexpr, GU: tl.constexpr,
):  # fmt: skip
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    kk = pid_n * BN + tl.arange(0, BN)
    kmask = kk < D
    cols = tl.arange(0, KP)
    cmask = cols < K
    p_offs = kk[:, None] * KP + cols[None, :]  # [BN, KP] of the padded phi
    # phi^T [KP, BN], loop-invariant: fp32, or its bf16 hi / lo parts
    pt1 = tl.trans(tl.load(ph_ptr + p_offs, mask=kmask[:, None], other=0.0))
    if BF16:
        pt2 = tl.trans(tl.load(ph_ptr + D * KP + p_offs, mask=kmask[:, None], other=0.0))
    gphi = tl.zeros([BN, KP], dtype=tl.float32)
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, T)
    for t0 in range(lo, hi, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < hi
        rows64 = rows.to(tl.int64)
        m = rmask[:, None] & kmask[None, :]
        v_raw = tl.load(x_ptr + rows64[:, None] * D + kk[None, :], mask=m, other=0.0)
        dzr = tl.load(dzr_ptr + rows64[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
        if BF16:
            d1, d2, d3 = _split3_bf16(dzr)
            dxm = _mma(d2, pt1, tl.zeros([BT, BN], dtype=tl.float32))
            dxm = _mma(d1, pt2, dxm)
            dxm = _mma(d1, pt1, dxm)  # [BT, BN]
            v_t = tl.trans(v_raw)
            gphi = _mma(v_t, d3, gphi)
            gphi = _mma(v_t, d2, gphi)
            gphi = _mma(v_t, d1, gphi)  # [BN, KP]
        else:
            dxm = tl.dot(dzr, pt1, input_precision=PREC)  # [BT, BN]
            gphi = tl.dot(tl.trans(v_raw.to(tl.float32)), dzr, gphi, input_precision=PREC)  # [BN, KP]
        dx = dxm - v_raw.to(tl.float32) * coef[:, None]
        if DXIN:  # another x-gradient of the sublayer (its write-back's), added before the one rounding
            dx += tl.load(dxin_ptr + rows64[:, None] * D + kk[None, :], mask=m, other=0.0).to(tl.float32)
        if GU:  # the read u = sum_j h_pre[j] x[j]: dx[j, c] += h_pre[j] du[c]
            hp = tl.load(hpre_ptr + rows64[:, None] * N + (kk // C)[None, :], mask=m, other=0.0)
            gu = tl.load(gu_ptr + rows64[:, None] * C + (kk % C)[None, :], mask=m, other=0.0)
            dx += hp.to(tl.float32) * gu.to(tl.float32)
        tl.store(dx_ptr + rows64[:, None] * D + kk[None, :], cast_out(dx, dx_ptr.dtype.element_ty), mask=m)
    out = gphi_ptr + pid_s.to(tl.int64) * D * K + kk[:, None] * K + cols[None, :]
    tl.store(out, gphi, mask=kmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _kp(k: int) -> int:
    return max(16, next_pow2(k))


def coeffs_fwd(
    x: torch.Tensor,
    phi: torch.Tensor,
    bias: torch.Tensor,
    alpha: torch.Tensor,
    iters: int,
    rms_eps: float,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [T, n, C]`` -> ``h_pre [T, n], h_post [T, n], h_res [T, n, n], z [T, K], r [T]`` (fp32).

    ``splits`` forces how many programs share the ``D = n*C`` axis (default: fill the GPU).
    """
    t, n, c = x.shape
    d, k = n * c, 2 * n + n * n
    kp, dev = _kp(k), x.device
    x, phi, bias, alpha = x.contiguous(), phi.contiguous(), bias.contiguous(), alpha.contiguous()
    f32 = dict(dtype=torch.float32, device=dev)
    h_pre, h_post = torch.empty(t, n, **f32), torch.empty(t, n, **f32)
    h_res, z, r = torch.empty(t, n, n, **f32), torch.empty(t, k, **f32), torch.empty(t, **f32)
    if t == 0:
        return h_pre, h_post, h_res, z, r
    if splits is None:
        splits = auto_splits(dev, triton.cdiv(t, 64), triton.cdiv(d, 256))
    chunk, splits = split_chunk(d, splits)
    acc, ss = torch.empty(splits, t, kp, **f32), torch.empty(splits, t, **f32)
    grid = lambda meta: (triton.cdiv(t, meta["BT"]), splits)  # noqa: E731
    bf16 = x.dtype == torch.bfloat16
    ph = _prep_phi(phi, kp, split=bf16)
    _fwd_dot_kernel[grid](x, ph, acc, ss, t, d, chunk // 16, KP=kp, PREC=DOT_PRECISION, BF16=bf16)
    grid2 = lambda meta: (triton.cdiv(t, meta["BT"]),)  # noqa: E731
    _fwd_epilogue_kernel[grid2](
        acc, ss, bias, alpha, h_pre, h_post, h_res, z, r, t, splits, float(d), float(rms_eps), iters,
        N=n, NP=next_pow2(n), KP=kp,
    )  # fmt: skip
    return h_pre, h_post, h_res, z, r


def coeffs_bwd(
    x: torch.Tensor,
    phi: torch.Tensor,
    bias: torch.Tensor,
    alpha: torch.Tensor,
    z: torch.Tensor,
    r: torch.Tensor,
    g_pre: torch.Tensor,
    g_post: torch.Tensor,
    g_res: torch.Tensor,
    iters: int,
    splits: int | None = None,
    dx_in: torch.Tensor | None = None,
    g_u: torch.Tensor | None = None,
    h_pre: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx [T, n, C] in x's dtype, dphi, dbias, dalpha in their dtypes)``.

    ``splits`` forces how many programs share the token axis of the ``dphi`` reduction. A
    sublayer's other x-gradients join dx in the same write (one rounding, no autograd sum):
    ``dx_in [T, n, C]`` (its write-back's) is added, and with ``g_u [T, C]`` and ``h_pre [T, n]``
    the read's ``h_pre[j] g_u`` (``g_pre`` must then already hold the read's ``<g_u, x[j]>``).
    """
    t, n, c = x.shape
    d, k = n * c, 2 * n + n * n
    kp, dev = _kp(k), x.device
    f32 = dict(dtype=torch.float32, device=dev)
    x, phi = x.contiguous(), phi.contiguous()
    g_pre, g_post, g_res = g_pre.contiguous(), g_post.contiguous(), g_res.contiguous()
    dx = torch.empty_like(x)
    if t == 0:
        return dx, torch.zeros_like(phi), torch.zeros_like(bias), torch.zeros_like(alpha)
    dzr, coef = torch.empty(t, k, **f32), torch.empty(t, **f32)
    # one row of partial sums per program, sized for the smallest BT; rows past the last program
    # stay 0 (autotuning re-zeroes them between trial runs: reset_to_zero)
    progs = triton.cdiv(t, per_token_block(_MIN_ELEMS, next_pow2(n)))
    pb, pa = torch.zeros(progs, k, **f32), torch.zeros(progs, 3, **f32)
    grid = lambda meta: (triton.cdiv(t, meta["BT"]),)  # noqa: E731
    _bwd_token_kernel[grid](
        z, r, g_pre, g_post, g_res, bias.contiguous(), alpha.contiguous(), dzr, coef, pb, pa,
        t, float(d), iters, N=n, NP=next_pow2(n),
    )  # fmt: skip
    if splits is None:
        splits = auto_splits(dev, triton.cdiv(d, 64), triton.cdiv(t, 256))
    chunk, splits = split_chunk(t, splits)
    gphi = torch.empty(d, k, **f32) if splits == 1 else torch.empty(splits, d, k, **f32)
    grid2 = lambda meta: (triton.cdiv(d, meta["BN"]), splits)  # noqa: E731
    bf16 = x.dtype == torch.bfloat16
    ph = _prep_phi(phi, kp, split=bf16)
    if dx_in is not None:
        dx_in = dx_in.reshape(t, n, c).contiguous()
    if g_u is not None:
        g_u, h_pre = g_u.reshape(t, c).contiguous(), h_pre.reshape(t, n).contiguous()
    _bwd_dx_dphi_kernel[grid2](
        x, ph, dzr, coef, dx, gphi, x if dx_in is None else dx_in, x if g_u is None else g_u,
        x if h_pre is None else h_pre, t, d, k, chunk, c, KP=kp, PREC=DOT_PRECISION, BF16=bf16, N=n,
        DXIN=dx_in is not None, GU=g_u is not None,
    )  # fmt: skip
    if splits > 1:
        gphi = gphi.sum(0)
    return dx, gphi.to(phi.dtype), pb.sum(0).to(bias.dtype), pa.sum(0).to(alpha.dtype)

"""The specification: readable PyTorch of every hyper-connection equation.

This module is the spec that every fast path (``mhckit.functional``, ``mhckit.ops``) is tested
against. It favours clarity over speed, computes coefficients in float32 (float64 when the
inputs are float64) whatever the dtype of the streams, and keeps the streams in their own dtype.

Sources: mHC, DeepSeek-AI, arXiv 2512.24880 (equation numbers of paper v2); Hyper-Connections,
ByteDance Seed, arXiv 2409.19606 (the ``hc_*`` functions); mHC-lite, arXiv 2601.05732
(``permutation_mixture``).

Shape legend
    ...  leading dimensions (batch, time, ...), any number, possibly none
    n    number of residual streams (``n_streams``)
    C    model width (channels of one stream)
    k    number of ``h_res`` logits of a parametrisation (n*n for Sinkhorn, n! for mHC-lite)

Conventions (each one is tested, each one silently breaks a model when flipped)
    * streams are ``x: [..., n, C]``;
    * ``x_new[k] = sum_j h_res[k, j] * x[j] + h_post[k] * y``: ``h_res`` acts from the left, so
      its rows say where a new stream comes from. Sinkhorn normalises rows last, so row sums are
      exact and the forward gain of a product of ``h_res`` is exactly 1;
    * the projection's last axis is laid out ``[pre (n) | post (n) | res (n*n, row-major)]``;
    * one RMS statistic over the flattened ``n*C`` values of a token (not one per stream).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import (
    check_alpha,
    check_coefficient,
    check_float,
    check_iters,
    check_phi_bias,
    check_square,
    check_streams,
    compute_dtype,
)

__all__ = [
    "sinkhorn",
    "mhc_logits",
    "mhc_coeffs",
    "mhc_pre",
    "mhc_post_res",
    "hc_coeffs",
    "permutation_mixture",
    "rms",
]

DEFAULT_RMS_EPS = 1e-6


def _safe_divisor(s: Tensor) -> Tensor:
    """Guard a normaliser against underflow to 0 (only reachable for logits of scale ~1e2 and up)."""
    return s.clamp_min(torch.finfo(s.dtype).tiny)


def sinkhorn(logits: Tensor, iters: int = 20) -> Tensor:
    """Sinkhorn-Knopp projection onto the doubly stochastic matrices (mHC Eq. 9).

    ``M = exp(logits)``, then ``iters`` times: normalise columns (divide by column sums), then
    rows. Rows are normalised last, so every row sums to 1 exactly (up to rounding) and the
    column sums carry the truncation error of the finite iteration count.

    Numerics: the first ``exp`` + column normalisation is computed as a softmax over each column
    (``exp(l - max_col(l)) / sum``), which equals the plain formula in exact arithmetic and cannot
    overflow; normalisers are clamped away from 0 so that logits of scale 1e4 give finite output.

    Args:
        logits: ``[..., n, n]`` real logits (any float dtype; computed in float32 or float64).
        iters: number of (column, row) normalisation pairs, ``t_max`` in the paper (default 20).

    Returns:
        ``[..., n, n]`` float32 (float64 for float64 input) non-negative matrix with unit row sums.
    """
    check_square(logits, "logits")
    check_iters(iters)
    m = logits.to(compute_dtype(logits))
    m = torch.softmax(m, dim=-2)  # exp, then the first column normalisation
    m = m / _safe_divisor(m.sum(dim=-1, keepdim=True))  # first row normalisation
    for _ in range(iters - 1):
        m = m / _safe_divisor(m.sum(dim=-2, keepdim=True))  # columns
        m = m / _safe_divisor(m.sum(dim=-1, keepdim=True))  # rows (last: exact)
    return m


def rms(v: Tensor, eps: float = DEFAULT_RMS_EPS) -> Tensor:
    """``sqrt(mean(v^2) + eps)`` over the last axis, keeping it: ``[..., D] -> [..., 1]``."""
    return torch.sqrt(v.pow(2).mean(dim=-1, keepdim=True) + eps)


def mhc_logits(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, *, rms_eps: float = DEFAULT_RMS_EPS
) -> tuple[Tensor, Tensor, Tensor]:
    """Gated dynamic logits of one mHC sublayer (mHC Eq. 7-8, before the activations).

    ``v = flatten(x)`` (``[..., n*C]``), ``z = (v @ phi) / sqrt(mean(v^2) + eps)`` and the three
    slices ``[pre | post | res]`` of ``z`` are gated and shifted: ``alpha[i] * z_i + bias_i``.
    Any RMSNorm weight is folded into ``phi``.

    Args:
        x: streams ``[..., n, C]``.
        phi: ``[n*C, 2n + k]`` projection (k = number of ``h_res`` logits, n*n for mHC).
        bias: ``[2n + k]``.
        alpha: ``[3]`` scalar gates ``(alpha_pre, alpha_post, alpha_res)``.

    Returns:
        ``(a_pre [..., n], a_post [..., n], a_res [..., k])`` in the compute dtype.
    """
    n, c = check_streams(x, "x")
    k = check_phi_bias(phi, bias, n, c, res_logits=None)
    check_alpha(alpha)
    dt = compute_dtype(x, phi)
    v = x.reshape(*x.shape[:-2], n * c).to(dt)  # [..., nC]
    z = (v @ phi.to(dt)) / rms(v, rms_eps)  # [..., 2n + k]
    alpha, bias = alpha.to(dt), bias.to(dt)
    a_pre = alpha[0] * z[..., :n] + bias[:n]
    a_post = alpha[1] * z[..., n : 2 * n] + bias[n : 2 * n]
    a_res = alpha[2] * z[..., 2 * n : 2 * n + k] + bias[2 * n :]
    return a_pre, a_post, a_res


def mhc_coeffs(
    x: Tensor,
    phi: Tensor,
    bias: Tensor,
    alpha: Tensor,
    *,
    iters: int = 20,
    rms_eps: float = DEFAULT_RMS_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """The three mappings of one mHC sublayer (mHC Eq. 7-9).

    ``h_pre = sigmoid(a_pre)``, ``h_post = 2 * sigmoid(a_post)``,
    ``h_res = sinkhorn(a_res reshaped [n, n] row-major, iters)``, with the logits of
    :func:`mhc_logits`. No tanh.

    Args:
        x: streams ``[..., n, C]`` (any float dtype).
        phi: ``[n*C, n*n + 2*n]``, columns ``[pre | post | res row-major]``.
        bias: ``[n*n + 2*n]``.
        alpha: ``[3]``.
        iters: Sinkhorn iterations ``t_max``.
        rms_eps: epsilon inside the RMS statistic.

    Returns:
        ``h_pre [..., n]``, ``h_post [..., n]``, ``h_res [..., n, n]``; float32, or float64 if
        ``x`` or ``phi`` is float64.
    """
    n, c = check_streams(x, "x")
    check_phi_bias(phi, bias, n, c, res_logits=n * n)
    a_pre, a_post, a_res = mhc_logits(x, phi, bias, alpha, rms_eps=rms_eps)
    h_pre = torch.sigmoid(a_pre)
    h_post = 2.0 * torch.sigmoid(a_post)
    h_res = sinkhorn(a_res.unflatten(-1, (n, n)), iters)
    return h_pre, h_post, h_res


def mhc_pre(x: Tensor, h_pre: Tensor) -> Tensor:
    """Branch input ``u = sum_j h_pre[j] * x[j]`` (mHC Eq. 3, the ``H_pre`` read).

    Args:
        x: streams ``[..., n, C]``.
        h_pre: ``[..., n]`` weights (fp32/fp64).

    Returns:
        ``[..., C]`` in the dtype of ``x`` (accumulated in the dtype of ``h_pre``).
    """
    n, _ = check_streams(x, "x")
    check_coefficient(h_pre, "h_pre", x.shape[:-2] + (n,))
    u = (h_pre.unsqueeze(-1) * x.to(h_pre.dtype)).sum(dim=-2)  # [..., C]
    return u.to(x.dtype)


def mhc_post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """Write back: ``x_new[k] = sum_j h_res[k, j] * x[j] + h_post[k] * y`` (mHC Eq. 3).

    Args:
        x: streams ``[..., n, C]``.
        y: branch output ``[..., C]``.
        h_post: ``[..., n]``.
        h_res: ``[..., n, n]``; ``h_res[k, j]`` is the weight of old stream ``j`` in new stream ``k``.

    Returns:
        ``[..., n, C]`` in the dtype of ``x`` (accumulated in the dtype of the coefficients).
    """
    n, c = check_streams(x, "x")
    lead = x.shape[:-2]
    check_coefficient(y, "y", lead + (c,))
    check_coefficient(h_post, "h_post", lead + (n,))
    check_coefficient(h_res, "h_res", lead + (n, n))
    dt = h_res.dtype
    mixed = torch.einsum("...kj,...jc->...kc", h_res, x.to(dt))  # [..., n, C]
    written = h_post.to(dt).unsqueeze(-1) * y.to(dt).unsqueeze(-2)  # [..., n, C]
    return (mixed + written).to(x.dtype)


def permutation_mixture(logits: Tensor, permutations: Tensor) -> Tensor:
    """mHC-lite ``h_res = sum_k softmax(logits)_k P_k`` (arXiv 2601.05732).

    A convex combination of permutation matrices is exactly doubly stochastic (Birkhoff-von
    Neumann), with no iterations.

    Args:
        logits: ``[..., n!]``.
        permutations: ``[n!, n, n]`` 0/1 permutation matrices.

    Returns:
        ``[..., n, n]`` in the compute dtype of ``logits``.
    """
    check_float(logits, "logits")
    a = torch.softmax(logits.to(compute_dtype(logits)), dim=-1)  # [..., n!]
    return torch.einsum("...p,pkj->...kj", a, permutations.to(a.dtype))


def hc_coeffs(
    x: Tensor,
    static_pre: Tensor,
    static_post: Tensor,
    static_res: Tensor,
    w_pre: Tensor | None = None,
    w_post: Tensor | None = None,
    w_res: Tensor | None = None,
    scale_alpha: Tensor | None = None,
    scale_beta: Tensor | None = None,
    *,
    norm_eps: float = DEFAULT_RMS_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hyper-Connections (arXiv 2409.19606), static and dynamic, in mhckit's convention.

    The HC paper writes the connection as the matrix ``[[0, B], [A_m, A_r]]`` and updates
    ``H' = B^T y + A_r^T H``. Dynamic HC adds per-stream, input-dependent terms computed from the
    normalised streams ``Hn = norm(H)`` (one RMS statistic per stream):
    ``A_m = static_pre + s_alpha * tanh(Hn @ w_pre)``, ``A_r = static_res + s_alpha * tanh(Hn @ w_res)``,
    ``B = static_post + s_beta * tanh(Hn @ w_post)``. Row ``j`` of ``A_r`` is computed from stream
    ``j`` and says where stream ``j`` goes, so in mhckit's convention ``h_res = A_r^T``.

    Args:
        x: streams ``[..., n, C]``.
        static_pre: ``[n]`` (``A_m``), static_post: ``[n]`` (``B``), static_res: ``[n, n]`` (``A_r``).
        w_pre: ``[C]``, w_post: ``[C]``, w_res: ``[C, n]``; all ``None`` for static HC.
        scale_alpha, scale_beta: scalar tensors, required with the dynamic weights.

    Returns:
        ``h_pre [..., n]``, ``h_post [..., n]``, ``h_res [..., n, n]`` (compute dtype), not constrained.
    """
    n, c = check_streams(x, "x")
    dt = compute_dtype(x, static_res)
    lead = x.shape[:-2]
    a_m = static_pre.to(dt).expand(*lead, n)
    b = static_post.to(dt).expand(*lead, n)
    a_r = static_res.to(dt).expand(*lead, n, n)
    if w_pre is not None:
        xs = x.to(dt)
        hn = xs / rms(xs, norm_eps)  # [..., n, C], per-stream norm (weight folded into w)
        sa, sb = scale_alpha.to(dt), scale_beta.to(dt)
        a_m = a_m + sa * torch.tanh(hn @ w_pre.to(dt))  # [..., n]
        b = b + sb * torch.tanh(hn @ w_post.to(dt))  # [..., n]
        a_r = a_r + sa * torch.tanh(hn @ w_res.to(dt))  # [..., n, n], row j from stream j
    return a_m, b, a_r.transpose(-1, -2)

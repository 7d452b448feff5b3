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

import itertools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu


def _tokens_last(t: Tensor) -> Tensor:
    """``[..., n, n] -> [n, n, T]`` contiguous: reductions over the n x n axes then run over long,
    contiguous token vectors (on the CPU ~50x faster than reducing tiny trailing axes)."""
    n = t.shape[-1]
    return t.reshape(-1, n, n).permute(1, 2, 0).contiguous()


def _tokens_first(t: Tensor, shape: torch.Size) -> Tensor:
    return t.permute(2, 0, 1).reshape(shape)


# axis of the [n(rows k), n(cols j), T] layout that each normalisation sums over
_ROWS, _COLS = 1, 0


def _steps(iters: int) -> list[int]:
    """Summation axes after the softmax (which normalised the columns): rows, cols, ..., rows."""
    return [_ROWS if i % 2 == 0 else _COLS for i in range(2 * iters - 1)]


def sinkhorn_forward(logits: Tensor, iters: int, keep: list | None = None) -> Tensor:
    """Sinkhorn on ``[n, n, T]`` logits, in place after the softmax.

    If ``keep`` is a list, ``(y, divisor, unclamped_mask)`` of every normalisation is appended
    (the softmax output first, with ``None`` for the divisor and mask).
    """
    tiny = torch.finfo(logits.dtype).tiny
    m = torch.softmax(logits, dim=_COLS)
    if keep is not None:
        keep.append((m, None, None))
    for axis in _steps(iters):
        s = m.sum(dim=axis, keepdim=True)
        c = s.clamp_min(tiny)
        m = m / c if keep is not None else m.div_(c)
        if keep is not None:
            keep.append((m, c, s >= tiny))
    return m


def sinkhorn_backward(logits: Tensor, iters: int, grad: Tensor) -> Tensor:
    """Recompute the iterates of :func:`sinkhorn_forward` and walk them in reverse."""
    keep: list = []
    sinkhorn_forward(logits, iters, keep)
    g = grad
    for axis, (y, c, ok) in zip(reversed(_steps(iters)), reversed(keep[1:])):
        g = (g - (g * y).sum(dim=axis, keepdim=True) * ok) / c
    m = keep[0][0]
    return m * (g - (g * m).sum(dim=_COLS, keepdim=True))


class SinkhornFunction(torch.autograd.Function):
    """Sinkhorn-Knopp whose backward recomputes the iterations (saves only the logits)."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int) -> Tensor:
        ctx.iters = iters
        ctx.save_for_backward(logits)
        if cpu.available(logits, n=logits.shape[-1]):
            return cpu.sinkhorn_fwd(logits, iters)
        return _tokens_first(sinkhorn_forward(_tokens_last(logits), iters), logits.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (logits,) = ctx.saved_tensors
        if cpu.available(logits, n=logits.shape[-1]):
            return cpu.sinkhorn_bwd(logits, grad, ctx.iters), None
        g = sinkhorn_backward(_tokens_last(logits), ctx.iters, _tokens_last(grad.to(logits.dtype)))
        return _tokens_first(g, logits.shape), None


# ----------------------------------------------------------------------------------------------
# Stream read and write-back (mHC Eq. 3) for the CPU: elementwise passes instead of batched GEMMs
# ----------------------------------------------------------------------------------------------
# Per token the mixes are [1, n] @ [n, C] and [n, n] @ [n, C]; as a batched matmul over tokens
# they run as thousands of tiny GEMMs (CPU bmm: ~10x slower than the elementwise passes below).
#
#   pre:       u = sum_j h_pre[j] x[j]
#              du/dx[j] = h_pre[j] gu ;  dL/dh_pre[j] = <gu, x[j]>
#   post_res:  x_new[k] = sum_j h_res[k, j] x[j] + h_post[k] y
#              dL/dx[j] = sum_k h_res[k, j] g[k] ;  dL/dy = sum_k h_post[k] g[k]
#              dL/dh_res[k, j] = <g[k], x[j]> ;  dL/dh_post[k] = <g[k], y>
# Accumulation is in the coefficients' dtype (fp32 / fp64); outputs are cast to the streams' dtype.
# Saved for backward: the inputs only (x, y and the small coefficient tensors).


def _mix(coeff: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
    """``out[..., k, :] (+)= sum_j coeff[..., k, j] * x[..., j, :]``: one in-place pass per ``j``.

    In-place ``addcmul_`` matters on the CPU: a fresh ``[..., n, C]`` temporary per term costs
    page faults that make the out-of-place form ~8x slower.
    """
    n = x.shape[-2]
    for j in range(n):
        c, xj = coeff[..., :, j, None], x[..., j, None, :].to(coeff.dtype)
        out = torch.mul(c, xj) if out is None else out.addcmul_(c, xj)
    return out


def _contract(g: Tensor, *vectors: Tensor) -> Tensor:
    """``[..., k, j] = <g[..., k, :], v_j>`` over C for every ``[..., C]`` vector ``v_j``, with one
    reused temporary (no per-term allocation)."""
    buf = torch.empty_like(g)
    cols = [torch.mul(g, v.unsqueeze(-2).to(g.dtype), out=buf).sum(-1) for v in vectors]  # [..., k] each
    return torch.stack(cols, dim=-1)


class PreFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, h_pre: Tensor) -> Tensor:
        ctx.save_for_backward(x, h_pre)
        if cpu.streams_available(x, h_pre, n=x.shape[-2]):
            return cpu.pre_fwd(x, h_pre)
        u = _mix(h_pre.unsqueeze(-2), x).squeeze(-2)  # [..., C]
        return u.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gu: Tensor):
        x, h_pre = ctx.saved_tensors
        if cpu.streams_available(x, h_pre, n=x.shape[-2]):
            return cpu.pre_bwd(x, h_pre, gu, *ctx.needs_input_grad)
        g = gu.to(h_pre.dtype).unsqueeze(-2)  # [..., 1, C]
        grad_x = (h_pre.unsqueeze(-1) * g).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_h = _contract(g, *x.unbind(-2)).squeeze(-2) if ctx.needs_input_grad[1] else None
        return grad_x, grad_h


def _post_res_kernels(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> bool:
    """The write-back's kernels take y of x's dtype, and of any dtype next to 4- / 8-byte streams
    (cast as the PyTorch ops cast it; :func:`mhckit.ops.cpu.takes_as_stream`), as the carry pair does."""
    return y.is_cpu and cpu.takes_as_stream(y, x.dtype) and cpu.streams_available(x, h_post, h_res, n=x.shape[-2])


class PostResFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
        ctx.save_for_backward(x, y, h_post, h_res)
        if _post_res_kernels(x, y, h_post, h_res):
            return cpu.post_res_fwd(x, y, h_post, h_res)
        dt = h_res.dtype
        out = h_post.to(dt).unsqueeze(-1) * y.to(dt).unsqueeze(-2)  # [..., n, C]
        return _mix(h_res, x, out).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, y, h_post, h_res = ctx.saved_tensors
        if _post_res_kernels(x, y, h_post, h_res):
            grad_x, grad_y, grad_post, grad_res = cpu.post_res_bwd(x, y, h_post, h_res, g, ctx.needs_input_grad)
            return grad_x, None if grad_y is None else grad_y.to(y.dtype), grad_post, grad_res
        dt = h_res.dtype
        g = g.to(dt)
        need = ctx.needs_input_grad
        grad_x = _mix(h_res.transpose(-1, -2), g).to(x.dtype) if need[0] else None
        grad_y = _mix(h_post.to(dt).unsqueeze(-2), g).squeeze(-2).to(y.dtype) if need[1] else None
        grad_post = grad_res = None
        if need[2] or need[3]:
            both = _contract(g, *x.unbind(-2), y)  # [..., n, n + 1]: <g[k], x[j]> and <g[k], y>
            grad_res, grad_post = both[..., :-1], both[..., -1].to(h_post.dtype)
        return grad_x, grad_y, grad_post, grad_res


# ----------------------------------------------------------------------------------------------
# mHC coefficients (Eq. 7-9), fused: projection + RMS + gates + activations + Sinkhorn (+ the read)
# ----------------------------------------------------------------------------------------------
#   v = flatten(x) [T, nC];  r = sqrt(|v|^2 / nC + eps);  z = (v @ phi) / r   [T, K = 2n + n^2]
#   a = gate * z + bias  (gate = alpha_pre | alpha_post | alpha_res per slice)
#   h_pre = sigmoid(a_pre);  h_post = 2 sigmoid(a_post);  h_res = sinkhorn(a_res)
#   (CoeffsPreFunction also returns the branch read u = sum_j h_pre[j] x[j].)
# Backward, with da from the activations and the Sinkhorn recompute (the read adds <du, x[j]> to
# the gradient of h_pre[j], and h_pre[j] du to that of x[j]):
#   dbias = sum_T da;  dalpha_i = sum_T sum_slice(i) da * z;  gz = gate * da
#   dphi = v^T (gz / r);  dv = (gz / r) phi^T - v * sum_K(gz * z) / (nC r^2)
# Saved: x (alive anyway), phi, bias, alpha and the small per-token r [T, 1] and z [T, K] (the
# gated logits are recomputed); no [T, nC] float copy is kept for fp32 streams.
# On the CPU (fp32 / fp64 streams, or bf16 / fp16 streams with fp32 coefficients; compiled kernels
# available) all of it is one C call forward (norm, projection, tail, read) and one backward (read
# gradient, tail, dbias, dalpha, dphi, dv); for fp32 / fp64 the three matmuls with phi move to BLAS
# above n*C = cpu.PROJECT_MAX_WIDTH or n > 4 (n > 6 for fp32 with the AVX-512 blocks; cpu.PROJECT_MAX_COLUMNS).


def _coeffs_forward(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, iters: int, rms_eps: float, with_u: bool):
    """``(h_pre [T, n], h_post [T, n], h_res [T, n, n] (None for cpu.IDENTITY), r [T, 1], z [T, K],
    u [T, C] or None)``."""
    n, c = x.shape[-2], x.shape[-1]
    x3 = x.reshape(-1, n, c)
    if cpu.streams_available(x, phi, bias, alpha, n=n):
        return cpu.coeffs_fwd(x3, phi, bias, alpha, rms_eps, iters, with_u)
    v = x3.reshape(-1, n * c).to(phi.dtype)  # [T, nC]
    r = torch.sqrt(torch.linalg.vector_norm(v, dim=-1, keepdim=True).square_() / (n * c) + rms_eps)  # [T, 1]
    z = (v @ phi).div_(r)  # [T, K]
    if cpu.available(z, n=n):  # gates, activations and Sinkhorn in one compiled pass
        h_pre, h_post, h_res = cpu.tail_fwd(z, bias, alpha, n, iters)
    else:
        a = torch.addcmul(bias, z, _gates(alpha, n, phi.shape[1]))
        h_pre = torch.sigmoid(a[:, :n])
        h_post = torch.sigmoid(a[:, n : 2 * n]).mul_(2.0)
        if iters == cpu.IDENTITY:  # h_res = I: no logits, no matrix
            h_res = None
        elif iters == cpu.PERMUTATIONS:  # mHC-lite
            h_res = _permutation_mixture(a[:, 2 * n :], n)
        else:
            logits = a[:, 2 * n :].reshape(-1, n, n)
            h_res = _tokens_first(sinkhorn_forward(_tokens_last(logits), iters), logits.shape)
    u = None
    if with_u:
        if cpu.streams_available(x3, h_pre, n=n):
            u = cpu.pre_fwd(x3, h_pre)
        else:
            u = _mix(h_pre.unsqueeze(-2), x3).squeeze(-2).to(x.dtype)  # [T, C]
    return h_pre, h_post, h_res, r, z, u


def _tail_backward(z: Tensor, bias: Tensor, gate: Tensor, n: int, iters: int, g_pre, g_post, g_res) -> Tensor:
    """``dL/da [T, K]`` through the gates, activations and Sinkhorn, with PyTorch ops."""
    dt = z.dtype
    a = torch.addcmul(bias, z, gate)  # recomputed: cheaper to redo than to keep
    da = torch.zeros_like(a)
    if g_pre is not None:
        s = torch.sigmoid(a[:, :n])
        da[:, :n] = g_pre.reshape(-1, n).to(dt) * s * (1 - s)
    if g_post is not None:
        s = torch.sigmoid(a[:, n : 2 * n])
        da[:, n : 2 * n] = g_post.reshape(-1, n).to(dt) * 2 * s * (1 - s)
    if iters == cpu.IDENTITY:  # no logits of h_res
        pass
    elif g_res is not None and iters == cpu.PERMUTATIONS:  # mHC-lite: through the softmax of the mixture
        w = torch.softmax(a[:, 2 * n :], dim=-1)  # [T, n!]
        dw = torch.einsum("tkj,pkj->tp", g_res.reshape(-1, n, n).to(dt), _permutations(n, dt))
        da[:, 2 * n :] = w * (dw - (w * dw).sum(-1, keepdim=True))
    elif g_res is not None:
        logits = _tokens_last(a[:, 2 * n :].reshape(-1, n, n))
        g = sinkhorn_backward(logits, iters, _tokens_last(g_res.reshape(-1, n, n).to(dt)))
        da[:, 2 * n :] = _tokens_first(g, (a.shape[0], n, n)).reshape(-1, n * n)
    return da


_PERMS: dict[tuple[int, torch.dtype], Tensor] = {}


def _permutations(n: int, dtype: torch.dtype) -> Tensor:
    """``[n!, n, n]`` 0/1 permutation matrices in ``itertools.permutations`` order (as
    :class:`mhckit.constraints.PermutationMixture` and the CPU kernels)."""
    key = (n, dtype)
    if key not in _PERMS:
        eye = torch.eye(n, dtype=dtype)
        _PERMS[key] = torch.stack([eye[list(p)] for p in itertools.permutations(range(n))])
    return _PERMS[key]


def _permutation_mixture(logits: Tensor, n: int) -> Tensor:
    """mHC-lite's ``h_res [T, n, n] = sum_p softmax(logits)_p P_p`` (``logits [T, n!]``), as
    :func:`mhckit.reference.permutation_mixture`."""
    return torch.einsum("tp,pkj->tkj", torch.softmax(logits, dim=-1), _permutations(n, logits.dtype))


def _coeffs_backward(saved, iters: int, g_u, g_pre, g_post, g_res, need_x: bool, need_phi: bool):
    """Gradients ``(grad_x [T, n, C] in phi's dtype or None, grad_phi, grad_bias, grad_alpha)``; see
    the banner. ``g_u`` (or None) is the gradient of the read ``u``."""
    x, phi, bias, alpha, r, z = saved
    n, c = x.shape[-2], x.shape[-1]
    x3 = x.reshape(-1, n, c)
    gu = None if g_u is None else g_u.reshape(-1, c)
    if cpu.streams_available(x, phi, z, n=n):
        return cpu.coeffs_bwd(x3, gu, z, r, phi, bias, alpha, g_pre, g_post, g_res, iters, need_x, need_phi)
    dt = phi.dtype
    gate = _gates(alpha, n, phi.shape[1])
    if gu is not None:  # dL/dh_pre[j] += <du, x[j]>
        gu = gu.to(dt).unsqueeze(-2)  # [T, 1, C]
        if cpu.available(x3, gu, n=n):
            read = cpu.pre_bwd(x3, None, gu, False, True)[1]
        else:
            read = _contract(gu, *x3.unbind(-2)).squeeze(-2)  # [T, n]
        g_pre = read if g_pre is None else g_pre.reshape(-1, n).to(dt) + read
    if cpu.available(z, n=n):  # compiled twin of _tail_backward
        da = cpu.tail_bwd(z, bias, alpha, g_pre, g_post, g_res, n, iters)
    else:
        da = _tail_backward(z, bias, gate, n, iters, g_pre, g_post, g_res)
    grad_bias = da.sum(0)
    dz = da * z
    grad_alpha = torch.stack([dz[:, :n].sum(), dz[:, n : 2 * n].sum(), dz[:, 2 * n :].sum()]).to(alpha.dtype)
    gzr = (da * gate).div_(r)  # gz / r, [T, K]
    v = x3.reshape(-1, n * c).to(dt)
    grad_phi = v.t() @ gzr if need_phi else None
    grad_x = None
    if need_x:
        coef = (gzr * z).sum(-1, keepdim=True).div_(-(n * c) * r)  # -sum(gz z) / (nC r^2)
        grad_x = (gzr @ phi.t()).addcmul_(v, coef).view(-1, n, c)
        if gu is not None:  # du/dx[j] = h_pre[j] du, added in place
            a_pre = torch.addcmul(bias[:n], z[:, :n], alpha[0].to(dt))
            grad_x.addcmul_(torch.sigmoid(a_pre).unsqueeze(-1), gu)
    return grad_x, grad_phi, grad_bias, grad_alpha


class CoeffsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, iters: int, rms_eps: float):
        h_pre, h_post, h_res, r, z, _ = _coeffs_forward(x, phi, bias, alpha, iters, rms_eps, False)
        ctx.save_for_backward(x, phi, bias, alpha, r, z)
        ctx.iters = iters
        lead, n = x.shape[:-2], x.shape[-2]
        return h_pre.reshape(*lead, n), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_pre: Tensor, g_post: Tensor, g_res: Tensor):
        saved = ctx.saved_tensors  # read once: torch.utils.checkpoint allows a single unpack
        x = saved[0]
        need = ctx.needs_input_grad
        grad_x, grad_phi, grad_bias, grad_alpha = _coeffs_backward(
            saved, ctx.iters, None, g_pre, g_post, g_res, need[0], need[1]
        )
        grad_x = grad_x.reshape(x.shape).to(x.dtype) if grad_x is not None else None
        return grad_x, grad_phi, grad_bias, grad_alpha, None, None


class CoeffsPreFunction(torch.autograd.Function):
    """Coefficients and the branch read ``u = sum_j h_pre[j] x[j]`` in one Function, so that the
    backward writes ONE stream gradient (coefficient path + ``h_pre`` x ``du``, accumulated in place)
    instead of two that autograd would add. Returns ``(u, h_pre, h_post, h_res)``."""

    @staticmethod
    def forward(ctx, x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, iters: int, rms_eps: float):
        h_pre, h_post, h_res, r, z, u = _coeffs_forward(x, phi, bias, alpha, iters, rms_eps, True)
        lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
        ctx.save_for_backward(x, phi, bias, alpha, r, z)
        ctx.iters = iters
        return u.reshape(*lead, c), h_pre.reshape(*lead, n), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_u: Tensor, g_pre: Tensor, g_post: Tensor, g_res: Tensor):
        saved = ctx.saved_tensors  # read once: torch.utils.checkpoint allows a single unpack
        x = saved[0]
        need = ctx.needs_input_grad
        grad_x, grad_phi, grad_bias, grad_alpha = _coeffs_backward(
            saved, ctx.iters, g_u, g_pre, g_post, g_res, need[0], need[1]
        )
        grad_x = grad_x.reshape(x.shape).to(x.dtype) if grad_x is not None else None
        return grad_x, grad_phi, grad_bias, grad_alpha, None, None


def _gates(alpha: Tensor, n: int, k: int) -> Tensor:
    """``[K]`` per-column gate: ``alpha[0]`` on pre, ``alpha[1]`` on post, ``alpha[2]`` on res."""
    a = alpha.to(torch.promote_types(alpha.dtype, torch.float32))
    return torch.cat([a[0].expand(n), a[1].expand(n), a[2].expand(k - 2 * n)])


# ---- Hyper-Connections' dynamic terms (arXiv 2409.19606) -------------------------------------------
# mhckit.reference.hc_coeffs normalises the streams (hn = x / rms(x), one RMS per stream) and multiplies
# hn by w_pre, w_post and w_res: autograd then keeps hn (a float copy of the streams) and its backward
# makes ~10 whole-stream passes (the division, the power and the mean of the RMS, three matmuls).
# HCDynamicFunction computes the same z = hn @ [w_pre | w_post | w_res] as (x @ W) / r, keeps only x
# (alive anyway) and the small r / z, and its backward is one matmul and one fused multiply-add per
# stream element:
#     z_k = (x . w_k) / r,  r = sqrt(|x|^2 / C + eps)
#     =>  dx = (gz / r) @ W^T  -  x * sum_k(gz_k z_k) / (C r^2),   dW = x^T (gz / r).


class HCDynamicFunction(torch.autograd.Function):
    """``z = (x @ W) / rms(x)`` per stream: ``x [..., n, C]``, ``W [C, K]`` -> ``z [..., n, K]`` in
    ``W``'s dtype (float32 / float64; streams of another dtype are converted transiently)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> Tensor:
        z, r = hc_dynamic_forward(x if x.dtype == w.dtype else x.to(w.dtype), w, eps)
        ctx.save_for_backward(x, w, r, z)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, gz: Tensor):
        x, w, r, z = ctx.saved_tensors
        xs = x if x.dtype == w.dtype else x.to(w.dtype)
        gx, gwt = hc_dynamic_backward(xs, w, r, z, gz, *ctx.needs_input_grad[:2])
        return (None if gx is None else gx.to(x.dtype)), (None if gwt is None else gwt.t()), None


def hc_dynamic_forward(xs: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:class:`HCDynamicFunction`'s forward: ``(z [..., n, K], r [..., n, 1])``, ``z = (xs @ w) / r``;
    ``xs`` in ``w``'s dtype."""
    r = torch.sqrt(xs.pow(2).mean(dim=-1, keepdim=True) + eps)  # [..., n, 1], as reference.rms
    return (xs @ w) / r, r


def hc_coefficients(z: Tensor, static_pre: Tensor, static_post: Tensor, static_res: Tensor, scale_alpha: Tensor,
                    scale_beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic HC's ``(h_pre, h_post, h_res)`` from ``z [..., n, n + 2]`` (one dtype throughout):
    ``A_m = static_pre + sa tanh(z_0)``, ``B = static_post + sb tanh(z_1)``, ``A_r = static_res + sa
    tanh(z_2:)`` (row j from stream j), ``h_res = A_r^T``; see :func:`mhckit.reference.hc_coeffs`."""
    t = torch.tanh(z)
    a_m = static_pre + scale_alpha * t[..., 0]
    b = static_post + scale_beta * t[..., 1]
    a_r = static_res + scale_alpha * t[..., 2:]  # row j from stream j
    return a_m, b, a_r.transpose(-1, -2)


def hc_dynamic_backward(xs: Tensor, w: Tensor, r: Tensor, z: Tensor, gz: Tensor, need_x: bool = True,
                        need_w: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """:class:`HCDynamicFunction`'s backward: ``(dx [..., n, C], dW^T [K, C])`` (None where not needed)
    of ``z = (xs @ w) / r`` given ``gz``; ``xs`` in ``w``'s dtype, ``r`` ``[..., n, 1]``. Also the PyTorch
    path of the compiled HC read (:mod:`mhckit.ops.carry_ops`)."""
    gzr = gz / r
    gx = gwt = None
    if need_w:
        # gzr^T x: the same sums as (x^T gzr)^T, ~2.5x faster in BLAS for this skinny shape on the CPU
        gwt = gzr.reshape(-1, gzr.shape[-1]).t() @ xs.reshape(-1, xs.shape[-1])
    if need_x:
        coef = (gz * z).sum(dim=-1, keepdim=True) / (-xs.shape[-1] * r * r)  # [..., n, 1]
        gx = torch.addcmul(gzr @ w.t(), xs, coef)
    return gx, gwt

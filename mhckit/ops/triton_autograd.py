"""The Triton backend as ``torch.library`` custom ops with registered autograd (compile-friendly).

Chain: kernels (``ops/triton/<op>.py``) -> launchers (same files) -> the custom ops below, whose
``register_autograd`` plays the role of ``torch.autograd.Function`` -> :mod:`mhckit.functional`
(``backend="triton"``). Every op has a fake (meta) implementation, so a model using them compiles
with ``torch.compile(fullgraph=True)`` and the ops stay opaque nodes in the graph.

Ops (namespace ``mhckit``; tokens flattened: ``T`` tokens, ``n`` streams, ``C`` width, ``K = 2n + n*n``):

    coeffs(x [T,n,C], phi, bias, alpha, iters, rms_eps) -> h_pre [T,n], h_post [T,n], h_res [T,n,n], z [T,K], r [T]
    coeffs_backward(x, phi, bias, alpha, z, r, g_pre, g_post, g_res, iters) -> dx, dphi, dbias, dalpha
    pre(x [T,n,C], h_pre [T,n]) -> u [T,C];          pre_backward(x, h_pre, g) -> dx, dh_pre
    post_res(x, y [T,C], h_post, h_res) -> x_new
    post_res_backward(x, y, h_post, h_res, g) -> dx, dy, dh_post, dh_res
    sinkhorn(logits [T,n,n], iters) -> M;            sinkhorn_backward(logits, g, iters) -> dlogits

``z`` (the RMS-normalised logits) and ``r`` (the RMS) are what the coefficient backward needs
besides the inputs: the forward saves ``x, phi, bias, alpha, z, r`` and nothing of size ``[T, n*C]``.

Where each op runs: CUDA tensors -> the Triton kernels; CPU tensors with ``TRITON_INTERPRET=1`` ->
the same kernels in Triton's interpreter (tests); other CPU tensors -> mhckit's compiled C kernels
(:mod:`mhckit.ops.cpu`) where they can run, else a plain torch mirror of the kernels' maths (same
formulas, same saved tensors), which exists so that the ops (and ``torch.compile`` over them) can be
exercised on any machine. The mirror also accepts float64, which is how the hand-written backward
formulas are gradchecked (``mhckit.ops.cpu.disabled()`` selects it over the C kernels).

The ``torch`` backend calls these ops while ``torch.compile`` traces CPU tensors (see
:func:`mhckit.functional._compile_cpu`): a ctypes call cannot be traced, and traced PyTorch ops turn
the 20-iteration Sinkhorn and its backward into hundreds of graph nodes; as custom ops the C kernels
stay single opaque nodes.

Public entry points (``[..., n, C]`` streams, same signatures as :mod:`mhckit.reference`):
:func:`sinkhorn`, :func:`mhc_coeffs`, :func:`mhc_pre`, :func:`mhc_post_res`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .._validate import compute_dtype
from ..reference import DEFAULT_RMS_EPS
from . import _interpret_requested, cpu

__all__ = ["sinkhorn", "mhc_coeffs", "mhc_pre", "mhc_post_res"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _like(t: Tensor) -> Tensor:
    """A fake op output shaped like ``t``: contiguous whatever ``t``'s strides (every implementation
    of these ops returns contiguous tensors; a non-contiguous input, e.g. HC's transposed ``h_res``,
    must not make the fake promise its strides)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _use_kernels(*tensors: Tensor) -> bool:
    """Triton kernels for CUDA tensors (or CPU ones under the interpreter); else the torch mirror."""
    if tensors[0].device.type == "cuda":
        bad = [t.dtype for t in tensors if t.dtype not in _KERNEL_DTYPES]
        if bad:
            raise ValueError(f"mhckit Triton kernels: dtype {bad[0]} is not supported; use backend='torch'")
        return True
    return _interpret_requested() and all(t.dtype in _KERNEL_DTYPES for t in tensors)


def _c_kernels(x: Tensor, dt: torch.dtype, *others: Tensor) -> bool:
    """CPU streams ``x`` whose maths the C kernels compute in ``dt`` (the mirror's dtype), with the
    other stream operands ``others`` as :func:`mhckit.ops.cpu.takes_as_stream` allows."""
    return (
        x.is_cpu and cpu.streams_available(x, n=x.shape[1]) and cpu.coef_dtype(x.dtype) is dt
        and all(cpu.takes_as_stream(t, x.dtype) for t in others)
    )


def _device_of(t: Tensor):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# ==================================================================================================
# Torch mirror of the per-token Sinkhorn of ops/triton/sinkhorn.py (same sequence; keeps the
# iterates, which is fine for the CPU mirror)
# ==================================================================================================
def _sk_steps(logits: Tensor, iters: int) -> list[tuple[Tensor, Tensor | None, Tensor | None, int]]:
    """``[(M_0, -, -, -2), (y, divisor, unclamped, dim), ...]`` for ``[..., n, n]`` logits."""
    m = torch.softmax(logits, dim=-2)
    steps: list = [(m, None, None, -2)]
    tiny = torch.finfo(logits.dtype).tiny
    for step in range(2 * iters - 1):
        dim = -1 if step % 2 == 0 else -2  # rows first, then (columns, rows) pairs: rows last
        s = m.sum(dim=dim, keepdim=True)
        c = s.clamp_min(tiny)
        m = m / c
        steps.append((m, c, s >= tiny, dim))
    return steps


def _sk_forward(logits: Tensor, iters: int) -> Tensor:
    return _sk_steps(logits, iters)[-1][0]


def _sk_backward(logits: Tensor, grad: Tensor, iters: int) -> Tensor:
    steps = _sk_steps(logits, iters)
    g = grad
    for y, c, ok, dim in reversed(steps[1:]):
        g = (g - (g * y).sum(dim=dim, keepdim=True) * ok) / c
    m0 = steps[0][0]
    return m0 * (g - (g * m0).sum(dim=-2, keepdim=True))


# ==================================================================================================
# Coefficients (mHC Eq. 7-9)
# ==================================================================================================
def _mirror_logits(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, rms_eps: float):
    t, n, c = x.shape
    dt = compute_dtype(x, phi)
    v = x.reshape(t, n * c).to(dt)  # [T, D]
    r = torch.sqrt(v.pow(2).mean(dim=-1) + rms_eps)  # [T]
    z = (v @ phi.to(dt)) / r[:, None]  # [T, K]
    gates = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)]).to(dt)  # [K]
    return v, r, z, gates, gates * z + bias.to(dt)


@torch.library.custom_op("mhckit::coeffs", mutates_args=())
def _coeffs(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, iters: int, rms_eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _use_kernels(x, phi, bias, alpha):
        from .triton.coeffs import coeffs_fwd

        with _device_of(x):
            return coeffs_fwd(x, phi, bias, alpha, iters, rms_eps)
    dt = compute_dtype(x, phi)
    if _c_kernels(x, dt):
        h_pre, h_post, h_res, r, z, _ = cpu.coeffs_fwd(x, phi, bias, alpha, rms_eps, iters, False)
        return h_pre, h_post, h_res, z, r.view(-1)
    n = x.shape[1]
    _, r, z, _, a = _mirror_logits(x, phi, bias, alpha, rms_eps)
    h_res = _sk_forward(a[:, 2 * n :].unflatten(-1, (n, n)), iters)
    return torch.sigmoid(a[:, :n]), 2.0 * torch.sigmoid(a[:, n : 2 * n]), h_res, z, r


@_coeffs.register_fake
def _(x, phi, bias, alpha, iters, rms_eps):
    t, n, _ = x.shape
    dt = compute_dtype(x, phi)
    e = lambda *shape: x.new_empty(shape, dtype=dt)  # noqa: E731
    return e(t, n), e(t, n), e(t, n, n), e(t, 2 * n + n * n), e(t)


@torch.library.custom_op("mhckit::coeffs_backward", mutates_args=())
def _coeffs_backward(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, z: Tensor, r: Tensor,
    g_pre: Tensor, g_post: Tensor, g_res: Tensor, iters: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    if _use_kernels(x, phi, bias, alpha):
        from .triton.coeffs import coeffs_bwd

        with _device_of(x):
            return coeffs_bwd(x, phi, bias, alpha, z, r, g_pre, g_post, g_res, iters)
    if _c_kernels(x, z.dtype):
        dx, d_phi, d_bias, d_alpha = cpu.coeffs_bwd(x, None, z, r.view(-1, 1), phi, bias, alpha, g_pre, g_post,
                                                    g_res, iters, True, True)
        return dx, d_phi.to(phi.dtype), d_bias.to(bias.dtype), d_alpha.to(alpha.dtype)
    # torch mirror of the two backward kernels (see ops/triton/coeffs.py for the maths)
    t, n, c = x.shape
    dt = z.dtype
    gates = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)]).to(dt)
    a = gates * z + bias.to(dt)  # [T, K]
    s_pre, s_post = torch.sigmoid(a[:, :n]), torch.sigmoid(a[:, n : 2 * n])
    da = torch.cat(
        [
            g_pre.to(dt) * s_pre * (1.0 - s_pre),
            g_post.to(dt) * 2.0 * s_post * (1.0 - s_post),
            _sk_backward(a[:, 2 * n :].unflatten(-1, (n, n)), g_res.to(dt), iters).flatten(-2),
        ],
        dim=-1,
    )  # [T, K]
    daz = (da * z).sum(0)
    d_alpha = torch.stack([daz[:n].sum(), daz[n : 2 * n].sum(), daz[2 * n :].sum()])
    dz = gates * da
    dzr = dz / r[:, None]
    coef = (dz * z).sum(-1) / (r * r * (n * c))  # [T]
    v = x.reshape(t, n * c).to(dt)
    dx = dzr @ phi.to(dt).t() - v * coef[:, None]
    d_phi = v.t() @ dzr
    return dx.reshape(x.shape).to(x.dtype), d_phi.to(phi.dtype), da.sum(0).to(bias.dtype), d_alpha.to(alpha.dtype)


@_coeffs_backward.register_fake
def _(x, phi, bias, alpha, z, r, g_pre, g_post, g_res, iters):
    return _like(x), _like(phi), _like(bias), _like(alpha)


def _coeffs_setup(ctx, inputs, output):
    x, phi, bias, alpha, iters, _ = inputs
    ctx.save_for_backward(x, phi, bias, alpha, output[3], output[4])
    ctx.iters = iters


def _coeffs_grad(ctx, g_pre, g_post, g_res, _g_z, _g_r):
    # z and r are internal outputs (never returned to users): their gradients are ignored
    x, phi, bias, alpha, z, r = ctx.saved_tensors
    t, n, _ = x.shape
    zero = lambda g, *shape: g if g is not None else z.new_zeros(shape)  # noqa: E731
    g_pre, g_post, g_res = zero(g_pre, t, n), zero(g_post, t, n), zero(g_res, t, n, n)
    dx, d_phi, d_bias, d_alpha = _coeffs_backward(x, phi, bias, alpha, z, r, g_pre, g_post, g_res, ctx.iters)
    return dx, d_phi, d_bias, d_alpha, None, None


_coeffs.register_autograd(_coeffs_grad, setup_context=_coeffs_setup)


# ==================================================================================================
# H_pre read (mHC Eq. 3)
# ==================================================================================================
@torch.library.custom_op("mhckit::pre", mutates_args=())
def _pre(x: Tensor, h_pre: Tensor) -> Tensor:
    if _use_kernels(x, h_pre):
        from .triton.pre import pre_fwd

        with _device_of(x):
            return pre_fwd(x, h_pre)
    dt = compute_dtype(x, h_pre)
    if _c_kernels(x, dt):
        return cpu.pre_fwd(x, h_pre)
    return torch.bmm(h_pre.to(dt).unsqueeze(1), x.to(dt)).squeeze(1).to(x.dtype)


@_pre.register_fake
def _(x, h_pre):
    return x.new_empty((x.shape[0], x.shape[2]))


@torch.library.custom_op("mhckit::pre_backward", mutates_args=())
def _pre_backward(x: Tensor, h_pre: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    if _use_kernels(x, h_pre, grad):
        from .triton.pre import pre_bwd

        with _device_of(x):
            return pre_bwd(x, h_pre, grad)
    dt = compute_dtype(x, h_pre, grad)
    if _c_kernels(x, dt, grad):
        dx, dh = cpu.pre_bwd(x, h_pre, grad, True, True)
        return dx, dh.to(h_pre.dtype)
    g = grad.to(dt)
    dx = h_pre.to(dt).unsqueeze(-1) * g.unsqueeze(1)  # [T, n, C]
    dh = torch.bmm(x.to(dt), g.unsqueeze(-1)).squeeze(-1)  # [T, n]
    return dx.to(x.dtype), dh.to(h_pre.dtype)


@_pre_backward.register_fake
def _(x, h_pre, grad):
    return _like(x), _like(h_pre)


def _pre_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _pre_grad(ctx, grad):
    x, h_pre = ctx.saved_tensors
    return _pre_backward(x, h_pre, grad)


_pre.register_autograd(_pre_grad, setup_context=_pre_setup)


# ==================================================================================================
# H_res mix + H_post write (mHC Eq. 3)
# ==================================================================================================
@torch.library.custom_op("mhckit::post_res", mutates_args=())
def _post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    if _use_kernels(x, y, h_post, h_res):
        from .triton.post_res import post_res_fwd

        with _device_of(x):
            return post_res_fwd(x, y, h_post, h_res)
    dt = compute_dtype(x, y, h_post, h_res)
    if _c_kernels(x, dt, y):
        return cpu.post_res_fwd(x, y, h_post, h_res)
    out = torch.baddbmm(torch.bmm(h_res.to(dt), x.to(dt)), h_post.to(dt).unsqueeze(-1), y.to(dt).unsqueeze(1))
    return out.to(x.dtype)


@_post_res.register_fake
def _(x, y, h_post, h_res):
    return _like(x)


@torch.library.custom_op("mhckit::post_res_backward", mutates_args=())
def _post_res_backward(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _use_kernels(x, y, h_post, h_res, grad):
        from .triton.post_res import post_res_bwd

        with _device_of(x):
            return post_res_bwd(x, y, h_post, h_res, grad)
    dt = compute_dtype(x, y, h_post, h_res, grad)
    if _c_kernels(x, dt, y, grad):
        dx, dy, dh_post, dh_res = cpu.post_res_bwd(x, y, h_post, h_res, grad, (True, True, True, True))
        return dx, dy.to(y.dtype), dh_post.to(h_post.dtype), dh_res.to(h_res.dtype)
    g, xs, ys = grad.to(dt), x.to(dt), y.to(dt)
    dx = torch.bmm(h_res.to(dt).transpose(1, 2), g)  # [T, n, C]
    dy = torch.bmm(h_post.to(dt).unsqueeze(1), g).squeeze(1)  # [T, C]
    dh_post = torch.bmm(g, ys.unsqueeze(-1)).squeeze(-1)  # [T, n]
    dh_res = torch.bmm(g, xs.transpose(1, 2))  # [T, n, n]
    return dx.to(x.dtype), dy.to(y.dtype), dh_post.to(h_post.dtype), dh_res.to(h_res.dtype)


@_post_res_backward.register_fake
def _(x, y, h_post, h_res, grad):
    return _like(x), _like(y), _like(h_post), _like(h_res)


def _post_res_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _post_res_grad(ctx, grad):
    return _post_res_backward(*ctx.saved_tensors, grad)


_post_res.register_autograd(_post_res_grad, setup_context=_post_res_setup)


# ==================================================================================================
# Sinkhorn-Knopp (mHC Eq. 9) on its own
# ==================================================================================================
@torch.library.custom_op("mhckit::sinkhorn", mutates_args=())
def _sinkhorn(logits: Tensor, iters: int) -> Tensor:
    if _use_kernels(logits):
        from .triton.sinkhorn import sinkhorn_fwd

        with _device_of(logits):
            return sinkhorn_fwd(logits, iters)
    lg = logits.to(compute_dtype(logits))
    if cpu.available(lg, n=lg.shape[-1]):
        return cpu.sinkhorn_fwd(lg, iters)
    return _sk_forward(lg, iters)


@_sinkhorn.register_fake
def _(logits, iters):
    return logits.new_empty(logits.shape, dtype=compute_dtype(logits))


@torch.library.custom_op("mhckit::sinkhorn_backward", mutates_args=())
def _sinkhorn_backward(logits: Tensor, grad: Tensor, iters: int) -> Tensor:
    if _use_kernels(logits, grad):
        from .triton.sinkhorn import sinkhorn_bwd

        with _device_of(logits):
            return sinkhorn_bwd(logits, grad, iters).to(logits.dtype)
    dt = compute_dtype(logits)
    lg = logits.to(dt)
    if cpu.available(lg, n=lg.shape[-1]):
        return cpu.sinkhorn_bwd(lg, grad, iters).to(logits.dtype)
    return _sk_backward(logits.to(dt), grad.to(dt), iters).to(logits.dtype)


@_sinkhorn_backward.register_fake
def _(logits, grad, iters):
    return _like(logits)


def _sinkhorn_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.iters = inputs[1]


def _sinkhorn_grad(ctx, grad):
    (logits,) = ctx.saved_tensors
    return _sinkhorn_backward(logits, grad, ctx.iters), None


_sinkhorn.register_autograd(_sinkhorn_grad, setup_context=_sinkhorn_setup)


# ==================================================================================================
# Public entry points: [..., n, C] streams, leading dims flattened into tokens
# ==================================================================================================
def sinkhorn(logits: Tensor, iters: int = 20) -> Tensor:
    """Sinkhorn-Knopp of ``[..., n, n]`` logits; float32 ``[..., n, n]``. See :func:`mhckit.reference.sinkhorn`."""
    n = logits.shape[-1]
    return _sinkhorn(logits.reshape(-1, n, n), iters).reshape(logits.shape)


def mhc_coeffs(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, *, iters: int = 20, rms_eps: float = DEFAULT_RMS_EPS
) -> tuple[Tensor, Tensor, Tensor]:
    """``(h_pre [..., n], h_post [..., n], h_res [..., n, n])`` in float32; see :func:`mhckit.reference.mhc_coeffs`."""
    lead, (n, c) = x.shape[:-2], x.shape[-2:]
    h_pre, h_post, h_res, _, _ = _coeffs(x.reshape(-1, n, c), phi, bias, alpha, iters, float(rms_eps))
    return h_pre.reshape(*lead, n), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n)


def mhc_pre(x: Tensor, h_pre: Tensor) -> Tensor:
    """``u = sum_j h_pre[j] x[j]``: ``[..., n, C] -> [..., C]`` in x's dtype; see :func:`mhckit.reference.mhc_pre`."""
    lead, (n, c) = x.shape[:-2], x.shape[-2:]
    return _pre(x.reshape(-1, n, c), h_pre.reshape(-1, n)).reshape(*lead, c)


def mhc_post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """``x_new[k] = sum_j h_res[k, j] x[j] + h_post[k] y`` in x's dtype; see :func:`mhckit.reference.mhc_post_res`."""
    n, c = x.shape[-2:]
    out = _post_res(x.reshape(-1, n, c), y.reshape(-1, c), h_post.reshape(-1, n), h_res.reshape(-1, n, n))
    return out.reshape(x.shape)

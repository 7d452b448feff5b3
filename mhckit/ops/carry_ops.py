"""The fused pair of :mod:`mhckit.ops.carry` as ``torch.library`` custom ops, for ``torch.compile``
(``mhckit::carry_read``, ``mhckit::carry_write`` and their backward ops; ``mhckit::carry_hc_read`` for
dynamic Hyper-Connections and ``mhckit::carry_pre_read`` for static ones, with the same write-back):
:class:`mhckit.HyperConnection` calls them (through :mod:`mhckit.functional`) while ``torch.compile``
traces, the autograd Functions of :mod:`mhckit.ops.carry` otherwise.

A ctypes call cannot be traced, and an autograd.Function output that aliases its input (the carrier)
cannot be a custom op's. So under torch.compile the read returns a stand-in carrier: a one-element tensor
expanded to x's shape (no memory), whose only use is to carry the write-back's output gradient back to
the read's backward; the write-back takes x itself for its values and gives x no gradient (the read's
backward makes all of it). The ops call the kernels at run time (the PyTorch ops inside
:func:`mhckit.ops.cpu.disabled`)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu
from .carry import (_read, _read_backward, _read_external_backward, _triton_write_backward, _write,
                    _write_backward)
from .autograd import hc_coefficients, hc_dynamic_backward, hc_dynamic_forward
from .triton_autograd import _like


@torch.library.custom_op("mhckit::carry_read", mutates_args=())
def carry_read(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, iters: int, rms_eps: float, triton: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(u, h_pre, h_post, h_res, r [T, 1], z [T, K], carrier)``; x contiguous streams ``[..., n, C]``,
    phi / bias / alpha of the kernels' coefficient dtype (the caller casts). The identity variant
    (``iters = cpu.IDENTITY``) has no ``h_res``: an empty stand-in (a custom op returns tensors)."""
    u, h_pre, h_post, h_res, r, z = _read(x, phi, bias, alpha, iters, rms_eps, triton)
    if h_res is None:
        h_res = phi.new_empty(0)
    return u, h_pre, h_post, h_res, r, z, x.new_zeros(()).expand(x.shape)


@carry_read.register_fake
def _(x, phi, bias, alpha, iters, rms_eps, triton):
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    t, k, cd = x.numel() // (n * c), phi.shape[1], phi.dtype
    e = lambda *shape: x.new_empty(shape, dtype=cd)  # noqa: E731
    h_res = e(0) if iters == cpu.IDENTITY else e(*lead, n, n)
    return (x.new_empty(lead + (c,)), e(*lead, n), e(*lead, n), h_res, e(t, 1), e(t, k),
            x.new_empty(()).expand(x.shape))


@torch.library.custom_op("mhckit::carry_read_backward", mutates_args=())
def carry_read_backward(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, r: Tensor, z: Tensor, h_pre: Tensor | None, g_u: Tensor | None,
    g_pre: Tensor | None, g_post: Tensor | None, g_res: Tensor | None, g_out: Tensor | None, iters: int,
    rms_eps: float, triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    return _read_backward((x, phi, bias, alpha, r, z, h_pre), iters, rms_eps, g_u, g_pre, g_post, g_res, g_out, True,
                          True, triton)


@carry_read_backward.register_fake
def _(x, phi, bias, alpha, r, z, h_pre, g_u, g_pre, g_post, g_res, g_out, iters, rms_eps, triton):
    return _like(x), _like(phi), _like(bias), _like(alpha)


def _carry_read_setup(ctx, inputs, output):
    x, phi, bias, alpha, iters, rms_eps, triton = inputs
    ctx.save_for_backward(x, phi, bias, alpha, output[4], output[5], *((output[1],) if triton else ()))
    ctx.iters, ctx.rms_eps, ctx.triton = iters, rms_eps, triton


def _carry_read_grad(ctx, g_u, g_pre, g_post, g_res, _g_r, _g_z, g_out):
    saved = ctx.saved_tensors
    x, phi, bias, alpha, r, z = saved[:6]
    h_pre = saved[6] if ctx.triton else None
    if ctx.iters == cpu.IDENTITY:
        g_res = None  # the stand-in's
    grads = carry_read_backward(x, phi, bias, alpha, r, z, h_pre, g_u, g_pre, g_post, g_res, g_out, ctx.iters,
                                ctx.rms_eps, ctx.triton)
    return *grads, None, None, None


carry_read.register_autograd(_carry_read_grad, setup_context=_carry_read_setup)


@torch.library.custom_op("mhckit::carry_write", mutates_args=())
def carry_write(x: Tensor, carrier: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor | None, triton: bool) -> Tensor:
    """``h_res x + h_post y`` (``carrier``: :func:`carry_read`'s, only for the gradient; ``h_res`` None:
    the identity, ``x + h_post y``)."""
    return _write(x, y, h_post, h_res, triton)


@carry_write.register_fake
def _(x, carrier, y, h_post, h_res, triton):
    return _like(x)


@torch.library.custom_op("mhckit::carry_write_backward", mutates_args=())
def carry_write_backward(y: Tensor, h_post: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    return _write_backward(y, h_post, g, True, True)


@carry_write_backward.register_fake
def _(y, h_post, g):
    return _like(y), _like(h_post)


@torch.library.custom_op("mhckit::carry_write_backward_triton", mutates_args=())
def carry_write_backward_triton(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, g: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _triton_write_backward(x, y, h_post, h_res, g)


@carry_write_backward_triton.register_fake
def _(x, y, h_post, h_res, g):
    return _like(x), _like(y), _like(h_post), _like(h_res)


def _carry_write_setup(ctx, inputs, output):
    x, _, y, h_post, h_res, triton = inputs
    ctx.triton = triton
    ctx.save_for_backward(*((x, y, h_post, h_res) if triton else (y, h_post)))


def _carry_write_grad(ctx, g):
    # x: all of its gradient reaches the read's backward along the carrier: g itself (C kernels, which
    # make the write-back's dx and dh_res there) or the write-back's dx (Triton, with dh_res here)
    if ctx.triton:
        grad_x, grad_y, grad_post, grad_res = carry_write_backward_triton(*ctx.saved_tensors, g)
        return None, grad_x, grad_y, grad_post, grad_res, None
    y, h_post = ctx.saved_tensors
    grad_y, grad_post = carry_write_backward(y, h_post, g)
    return None, g, grad_y, grad_post, None, None


carry_write.register_autograd(_carry_write_grad, setup_context=_carry_write_setup)


# ---- dynamic Hyper-Connections' read (HCCarryFunction's C calls) as custom ops ---------------------


def _hc_read(x, sp, spo, sr, wp, wq, wr, sa, sb, eps: float):
    """``(u, h_pre, h_post, h_res, r [T, n], z [T, n, n + 2])`` as :func:`mhckit.ops.cpu.hc_fwd` makes them;
    with the kernels switched off at run time, the same values in PyTorch ops (``r`` and ``z``, the
    per-stream RMS and the projections before tanh, which the kernels' backward reads, as the functional
    op's :class:`HCDynamicFunction` makes them; every output contiguous, as the fake promises)."""
    if cpu.enabled():
        u, h_pre, h_post, h_res, z, r = cpu.hc_fwd(x, wp, wq, wr, sp, spo, sr, sa, sb, eps)
        return u, h_pre, h_post, h_res, r, z
    from .. import reference

    n, cd = x.shape[-2], sp.dtype
    z, r = hc_dynamic_forward(x.to(cd), torch.cat([wp.unsqueeze(-1), wq.unsqueeze(-1), wr], dim=-1), eps)
    h_pre, h_post, h_res = hc_coefficients(z, sp, spo, sr, sa, sb)
    return (reference.mhc_pre(x, h_pre), h_pre, h_post, h_res.contiguous(), r.reshape(-1, n),
            z.reshape(-1, n, n + 2))


@torch.library.custom_op("mhckit::carry_hc_read", mutates_args=())
def carry_hc_read(
    x: Tensor, sp: Tensor, spo: Tensor, sr: Tensor, wp: Tensor, wq: Tensor, wr: Tensor, sa: Tensor, sb: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(u, h_pre, h_post, h_res, r [T, n], z [T, n, n + 2], carrier)`` of dynamic HC
    (:class:`mhckit.ops.carry.HCCarryFunction`'s forward); x contiguous streams ``[..., n, C]``, the
    parameters of the kernels' coefficient dtype (the caller casts). Its write-back is
    :func:`carry_write`, whose output gradient reaches :func:`carry_hc_read_backward` along the carrier."""
    return *_hc_read(x, sp, spo, sr, wp, wq, wr, sa, sb, eps), x.new_zeros(()).expand(x.shape)


@carry_hc_read.register_fake
def _(x, sp, spo, sr, wp, wq, wr, sa, sb, eps):
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    t, cd = x.numel() // (n * c), sp.dtype
    e = lambda *shape: x.new_empty(shape, dtype=cd)  # noqa: E731
    return (x.new_empty(lead + (c,)), e(*lead, n), e(*lead, n), e(*lead, n, n), e(t, n), e(t, n, n + 2),
            x.new_empty(()).expand(x.shape))


@torch.library.custom_op("mhckit::carry_hc_read_backward", mutates_args=())
def carry_hc_read_backward(
    x: Tensor, r: Tensor, z: Tensor, sp: Tensor, spo: Tensor, sr: Tensor, wp: Tensor, wq: Tensor, wr: Tensor,
    sa: Tensor, sb: Tensor, g_u: Tensor | None, g_pre: Tensor | None, g_post: Tensor | None, g_res: Tensor | None,
    g_out: Tensor | None, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of ``(x, sp, spo, sr, wp, wq, wr, sa, sb)`` (all of them: a custom op returns
    tensors; zeros where no gradient reaches, e.g. with the kernels switched off)."""
    if cpu.enabled():
        gx, dwp, dwq, dwr, dsp, dspo, dsr, dsa, dsb = cpu.hc_bwd(x, g_u, g_out, z, r, wp, wq, wr, sp, sr, sa, sb,
                                                                 g_pre, g_post, g_res, True)
        return gx, dsp, dspo, dsr, dwp, dwq, dwr, dsa, dsb
    return _hc_backward_torch(x, r, z, sp, spo, sr, wp, wq, wr, sa, sb, g_u, g_pre, g_post, g_res, g_out)


def _hc_backward_torch(x, r, z, sp, spo, sr, wp, wq, wr, sa, sb, g_u, g_pre, g_post, g_res, g_out):
    """:func:`carry_hc_read_backward` in PyTorch ops (the kernels switched off at run time; autograd does
    not record inside a custom op, so the chain rule is written out, as in ``mhc_cpu_hc.h``): with
    ``t = tanh(z)``, ``dh_pre[j] = g_pre[j] + <g_u, x_j>``, ``dh_res[k, j] = g_res[k, j] + <g_out[k], x_j>``,
    ``dz = (1 - t^2) * (sa dh_pre | sb g_post | sa dh_res^T)``; then the backward of ``z = (x @ W) / r``
    (:func:`mhckit.ops.autograd.hc_dynamic_backward`) plus the read's and the write-back's ``dx``."""
    n, c, cd = x.shape[-2], x.shape[-1], sp.dtype
    xs = x.to(cd).reshape(-1, n, c)  # [T, n, C]
    t = torch.tanh(z)  # [T, n, n + 2]
    zeros = xs.new_zeros(xs.shape[0], n)
    dpre = zeros if g_pre is None else g_pre.reshape(-1, n).to(cd)
    if g_u is not None:
        dpre = dpre + (xs * g_u.reshape(-1, 1, c).to(cd)).sum(-1)
    dpost = zeros if g_post is None else g_post.reshape(-1, n).to(cd)
    dres = xs.new_zeros(xs.shape[0], n, n) if g_res is None else g_res.reshape(-1, n, n).to(cd)  # [T, k, j]
    if g_out is not None:
        dres = dres + g_out.reshape(-1, n, c).to(cd) @ xs.transpose(-1, -2)
    dt = torch.cat([(sa * dpre).unsqueeze(-1), (sb * dpost).unsqueeze(-1), sa * dres.transpose(-1, -2)], -1)
    dsa = (t[..., 0] * dpre).sum() + (t[..., 2:] * dres.transpose(-1, -2)).sum()
    dsb = (t[..., 1] * dpost).sum()
    gz = dt * (1 - t * t)  # [T, n, n + 2]
    w = torch.cat([wp.unsqueeze(-1), wq.unsqueeze(-1), wr], dim=-1)  # [C, n + 2]
    gx, dwt = hc_dynamic_backward(xs, w, r.reshape(-1, n, 1), z, gz)  # dW^T [n + 2, C]
    h_pre, _, h_res = hc_coefficients(z, sp, spo, sr, sa, sb)  # h_res [T, k, j]
    if g_u is not None:
        gx = gx + h_pre.unsqueeze(-1) * g_u.reshape(-1, 1, c).to(cd)
    if g_out is not None:
        gx = gx + h_res.transpose(-1, -2) @ g_out.reshape(-1, n, c).to(cd)  # sum_k h_res[k, j] g_out[k]
    return (gx.reshape(x.shape).to(x.dtype), dpre.sum(0), dpost.sum(0), dres.sum(0).t().contiguous(),
            dwt[0].clone(), dwt[1].clone(), dwt[2:].t().contiguous(), dsa.reshape(sa.shape),  # no two alias
            dsb.reshape(sb.shape))


@carry_hc_read_backward.register_fake
def _(x, r, z, sp, spo, sr, wp, wq, wr, sa, sb, g_u, g_pre, g_post, g_res, g_out, eps):
    return tuple(_like(t) for t in (x, sp, spo, sr, wp, wq, wr, sa, sb))


def _carry_hc_read_setup(ctx, inputs, output):
    *params, eps = inputs
    ctx.save_for_backward(*params, output[4], output[5])
    ctx.eps = eps


def _carry_hc_read_grad(ctx, g_u, g_pre, g_post, g_res, _g_r, _g_z, g_out):
    x, sp, spo, sr, wp, wq, wr, sa, sb, r, z = ctx.saved_tensors
    grads = carry_hc_read_backward(x, r, z, sp, spo, sr, wp, wq, wr, sa, sb, g_u, g_pre, g_post, g_res, g_out,
                                   ctx.eps)
    return *grads, None


carry_hc_read.register_autograd(_carry_hc_read_grad, setup_context=_carry_hc_read_setup)


# ---- static Hyper-Connections' read (ReadCarryFunction) as custom ops ------------------------------


@torch.library.custom_op("mhckit::carry_pre_read", mutates_args=())
def carry_pre_read(x: Tensor, h_pre: Tensor, h_res: Tensor) -> tuple[Tensor, Tensor]:
    """``(u, carrier)``: the read ``u = sum_j h_pre[j] x[j]`` of coefficients computed elsewhere
    (:class:`mhckit.ops.carry.ReadCarryFunction`'s forward; ``h_res`` is kept for the backward, which
    also makes the write-back's ``dx`` and ``dh_res`` from the output gradient sent along the carrier)."""
    if cpu.enabled():
        u = cpu.pre_fwd(x, h_pre)
    else:
        from .. import reference

        u = reference.mhc_pre(x, h_pre)
    return u, x.new_zeros(()).expand(x.shape)


@carry_pre_read.register_fake
def _(x, h_pre, h_res):
    return x.new_empty(x.shape[:-2] + x.shape[-1:]), x.new_empty(()).expand(x.shape)


@torch.library.custom_op("mhckit::carry_pre_read_backward", mutates_args=())
def carry_pre_read_backward(
    x: Tensor, h_pre: Tensor, h_res: Tensor, g_u: Tensor | None, g_out: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dh_pre, dh_res)`` of :func:`carry_pre_read` and its write-back (zeros where nothing reaches:
    a custom op returns tensors)."""
    grads = _read_external_backward(x, h_pre, h_res, g_u, g_out, (True, True, True))
    return tuple(_like(t).zero_() if g is None else g.contiguous() for g, t in zip(grads, (x, h_pre, h_res)))


@carry_pre_read_backward.register_fake
def _(x, h_pre, h_res, g_u, g_out):
    return _like(x), _like(h_pre), _like(h_res)


def _carry_pre_read_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _carry_pre_read_grad(ctx, g_u, g_out):
    return carry_pre_read_backward(*ctx.saved_tensors, g_u, g_out)


carry_pre_read.register_autograd(_carry_pre_read_grad, setup_context=_carry_pre_read_setup)

"""The fused pair of :mod:`mhckit.ops.carry` as ``torch.library`` custom ops, for ``torch.compile``
(``mhckit::carry_read``, ``mhckit::carry_write`` and their backward ops): :class:`mhckit.HyperConnection`
calls them (through :mod:`mhckit.functional`) while ``torch.compile`` traces, the autograd Functions of
:mod:`mhckit.ops.carry` otherwise.

A ctypes call cannot be traced, and an autograd.Function output that aliases its input (the carrier)
cannot be a custom op's. So under torch.compile the read returns a stand-in carrier: a one-element tensor
expanded to x's shape (no memory), whose only use is to carry the write-back's output gradient back to
the read's backward; the write-back takes x itself for its values and gives x no gradient (the read's
backward makes all of it). The ops call the kernels at run time (the PyTorch ops inside
:func:`mhckit.ops.cpu.disabled`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .carry import _read, _read_backward, _triton_write_backward, _write, _write_backward
from .triton_autograd import _like


@torch.library.custom_op("mhckit::carry_read", mutates_args=())
def carry_read(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, iters: int, rms_eps: float, triton: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(u, h_pre, h_post, h_res, r [T, 1], z [T, K], carrier)``; x contiguous streams ``[..., n, C]``,
    phi / bias / alpha of the kernels' coefficient dtype (the caller casts)."""
    return *_read(x, phi, bias, alpha, iters, rms_eps, triton), x.new_zeros(()).expand(x.shape)


@carry_read.register_fake
def _(x, phi, bias, alpha, iters, rms_eps, triton):
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    t, k, cd = x.numel() // (n * c), phi.shape[1], phi.dtype
    e = lambda *shape: x.new_empty(shape, dtype=cd)  # noqa: E731
    return (x.new_empty(lead + (c,)), e(*lead, n), e(*lead, n), e(*lead, n, n), e(t, 1), e(t, k),
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
    grads = carry_read_backward(x, phi, bias, alpha, r, z, h_pre, g_u, g_pre, g_post, g_res, g_out, ctx.iters,
                                ctx.rms_eps, ctx.triton)
    return *grads, None, None, None


carry_read.register_autograd(_carry_read_grad, setup_context=_carry_read_setup)


@torch.library.custom_op("mhckit::carry_write", mutates_args=())
def carry_write(x: Tensor, carrier: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, triton: bool) -> Tensor:
    """``h_res x + h_post y`` (``carrier``: :func:`carry_read`'s, only for the gradient)."""
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

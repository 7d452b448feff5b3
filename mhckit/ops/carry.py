"""One mHC sublayer on the compiled CPU kernels: the write-back's x-side backward joins the
coefficients'. Private to :class:`mhckit.HyperConnection`, which pairs the two Functions (eager) or
the two custom ops of :mod:`mhckit.ops.carry_ops` (under ``torch.compile``); the public ops keep their own
Functions (:mod:`mhckit.ops.autograd`). Eager on the C kernels, every variant here runs the same
Functions in C++ where those build (``mhckit/ops/cpu/_pair.py``: bitwise these Functions' results,
without their Python); the Functions here are what runs otherwise.

With ``CoeffsPreFunction + PostResFunction`` the backward makes 8 passes over ``[T, n, C]`` stream
tensors: write-back: read g, read x, write dx; coefficients: read x, write dx'; autograd: dx + dx'
(read 2, write 1). The pair below moves the write-back's x-side work (``dx = h_res^T g``,
``dh_res = <g[k], x[j]>``) into the coefficient backward, which reads x anyway: write-back: read g
(dy, dh_post); coefficients: read g, read x, write dx (the read's and the norm's terms included):
4 passes, one dx allocation. The write-back's output gradient g reaches the coefficient backward
along an extra output of :class:`CoeffsCarryFunction`, the ``carrier`` (an alias of x that only
:class:`PostCarryFunction` consumes): the gradient sent along it is g itself, not a gradient of
x. Autograd sums it over several write-backs of one read, which is right: what the coefficient
backward does with it is linear in g given x.

The same pair runs on the Triton kernels (CUDA tensors, or the interpreter in tests; ``triton=True``),
where a sublayer's backward used to write three stream gradients and have autograd add them (13
passes over ``[T, n, C]`` tensors: write-back 3, read 2, coefficients 2, two sums 6). There the
write-back's backward keeps its one kernel (reads x and g, writes its dx, dy, dh_post, dh_res) and
sends its dx, a true gradient of x, along the carrier; the read's backward gets ``<g_u, x[j]>`` from
the read kernel's backward without its dx (one read of x) and the coefficient dx kernel adds the
carried dx and ``h_pre[j] g_u`` to its own before its one write: 7 passes. (The C kernels' split,
the write-back's x-side inside the coefficient pass, would need the dots before the token kernel
and the dx after it: two passes over x on the GPU either way.)

mHC-lite (``iters = cpu.PERMUTATIONS``) and the identity variant (``iters = cpu.IDENTITY``: no logits
and no matrix for ``h_res``, which is None here; the write-back then adds the streams unmixed and the
coefficient backward adds ``g[j]`` to ``dx[j]``) run through the same two Functions on the C kernels.

Hyper-Connections get the same pairing: dynamic HC through :class:`HCCarryFunction` (its coefficients
and the read in one C call each way, the write-back's dx and dh_res in the same backward pass); static
HC, whose coefficients need no stream pass, through :class:`ReadCarryFunction`, which reads ``u`` and
carries the write-back's output gradient, its backward making ``dx = h_pre[j] du + sum_k h_res[k, j]
g[k]``, ``dh_pre`` and ``dh_res`` in one pass.

The read's backward (every variant here, on the C kernels) writes its dx into the buffer of g itself
when nobody else can see g (:func:`_exclusive`): writing 1 MB of fresh memory first fetches it (read
for ownership), while g's lines are in cache already (mHC on the default GPT, interleaved in one
process, six runs: +0.004 to +0.015 in its ratio to the residual, 0.1-1.4 ms off the median step;
``model_default_cpu_reuse.md``). The C kernels read a token's g rows before writing its dx rows.

Little Python per call. At the default ``mhckit compare`` width (C = 64, 1024 tokens a step) the
Python around the kernels cost more per sublayer than the write-back kernels themselves: mostly
``reshape`` / ``to`` / ``view`` calls of ~1 µs each in a loop and several times that inside a
training step. So the kernels' outputs are allocated in their final shapes, the caller's checks
(:func:`mhckit.functional._carry_mode` and the shape checks) are not repeated, and a backward only
asks whether the kernels are still switched on (:func:`mhckit.ops.cpu.enabled`); if they were
switched off between forward and backward it does the same sums with PyTorch ops. Without autograd
(``torch.no_grad``, ``torch.inference_mode``: evaluation, generation) :mod:`mhckit.functional` calls
:func:`_read` / :func:`_write` (static HC: ``cpu.pre_fwd``, dynamic HC: ``cpu.hc_fwd``) itself, with x as
the carrier: no Function is applied (generation of a SmolLM2-shaped Llama: ``bench_generate``).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu
from .autograd import _coeffs_backward, _coeffs_forward, _contract, _mix
from .triton_autograd import _device_of

# > 0: HyperConnection runs the separate ops instead of the pair (separate_ops(); MHCKIT_FUSED_PAIR=0)
_OFF = [int(os.environ.get("MHCKIT_FUSED_PAIR", "1") == "0")]


@contextlib.contextmanager
def separate_ops():
    """Inside this block :class:`mhckit.HyperConnection` runs mHC as separate ops (the read, then the
    write-back, autograd adding their stream gradients) instead of the fused pair of this module: same
    maths, for comparisons and benchmarks. ``MHCKIT_FUSED_PAIR=0`` in the environment does the same for
    a whole process (an escape hatch should the pair misbehave somewhere the tests do not reach)."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


# The read's backward may write dx over the write-back's output gradient g (the C kernels; see the module
# docstring) when _exclusive(g). Module-level so that benchmarks and tests can switch it off.
REUSE_GRADIENT_BUFFER = True
_FREE_REFS: list[int] = []  # sys.getrefcount of a gradient nobody else holds, as _exclusive sees it


def _exclusive(g: Tensor | None, _probe: bool = False) -> bool:
    """Whether a backward (of one of this module's Functions, calling this as its first statement) may
    overwrite its incoming gradient ``g``: no other handle to its TensorImpl (``torch.autograd.grad``
    capturing it as an input's gradient holds one), no more Python references than a gradient nobody
    else holds has in the same place (a hook that stored it holds one; ``retain_grad`` stores a copy),
    and ``g`` owns its whole storage and is no view (a slice of a bigger gradient is not ours). The
    Python count is compared with a probe's, measured once in this very call pattern, so it follows the
    interpreter's and torch's own references. Never on free-threaded Python builds."""
    rc = sys.getrefcount(g)
    if _probe:
        _FREE_REFS.append(rc)
        return False
    if g is None or not REUSE_GRADIENT_BUFFER or _NO_REFCOUNTS:
        return False
    if not _FREE_REFS:
        _probe_free_refs()
    try:
        return (rc <= _FREE_REFS[0] and g._use_count() == 1 and g._base is None and g.is_contiguous()
                and g.storage_offset() == 0 and g.untyped_storage().nbytes() == g.numel() * g.element_size())
    except (AttributeError, RuntimeError):  # a torch without Tensor._use_count, a tensor without storage
        return False


_NO_REFCOUNTS = not getattr(sys, "_is_gil_enabled", lambda: True)()


@contextlib.contextmanager
def reuse_gradient_buffer(on: bool):
    """Inside this block the read's backward reuses (``on``) or never reuses the write-back's output
    gradient buffer for its dx (:data:`REUSE_GRADIENT_BUFFER`; for A/B benchmarks and tests)."""
    global REUSE_GRADIENT_BUFFER
    before, REUSE_GRADIENT_BUFFER = REUSE_GRADIENT_BUFFER, on
    try:
        yield
    finally:
        REUSE_GRADIENT_BUFFER = before


class _FreeGradProbe(torch.autograd.Function):
    """Receives a gradient nobody else holds, in the call pattern of this module's backwards."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        _exclusive(g, _probe=True)
        return None


def _probe_free_refs() -> None:
    with torch.enable_grad():
        x = torch.zeros(2, requires_grad=True)
        (_FreeGradProbe.apply(x) * 2.0).sum().backward()
    if not _FREE_REFS:  # the engine skipped it (it cannot: x requires grad); never reuse then
        _FREE_REFS.append(-1)


def pair_enabled() -> bool:
    """False inside :func:`separate_ops` or with ``MHCKIT_FUSED_PAIR=0``."""
    return not _OFF[0]


def _read(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, iters: int, rms_eps: float, triton: bool = False):
    """``(u, h_pre, h_post, h_res, r [T, 1], z [T, K])`` of the read, on the kernels where they may run
    (``triton``: the Triton kernels; the coefficients, their parameters and ``r``, ``z`` in float32)."""
    if triton:
        from .triton.coeffs import coeffs_fwd
        from .triton.pre import pre_fwd

        lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
        x3 = x.reshape(-1, n, c)
        with _device_of(x):
            h_pre, h_post, h_res, z, r = coeffs_fwd(x3, phi, bias, alpha, iters, rms_eps)
            u = pre_fwd(x3, h_pre)
        return (u.reshape(lead + (c,)), h_pre.reshape(lead + (n,)), h_post.reshape(lead + (n,)),
                h_res.reshape(lead + (n, n)), r.view(-1, 1), z)
    if cpu.enabled():
        h_pre, h_post, h_res, r, z, u = cpu.coeffs_fwd(x, phi, bias, alpha, rms_eps, iters, True)
        return u, h_pre, h_post, h_res, r, z
    # the kernels are switched off: the PyTorch ops, [T, ...] results
    h_pre, h_post, h_res, r, z, u = _coeffs_forward(x, phi, bias, alpha, iters, rms_eps, True)
    lead, n = x.shape[:-2], x.shape[-2]
    u, h_pre, h_post = u.reshape(lead + u.shape[-1:]), h_pre.reshape(lead + (n,)), h_post.reshape(lead + (n,))
    return u, h_pre, h_post, None if h_res is None else h_res.reshape(lead + (n, n)), r, z


def _read_backward(saved, iters: int, rms_eps: float, g_u, g_pre, g_post, g_res, g_out, need_x: bool,
                   need_phi: bool, triton: bool = False, reuse: bool = False):
    """``(grad_x, grad_phi, grad_bias, grad_alpha)`` of the read, ``g_out`` what the write-backs sent
    along the carrier (or None): their output gradient, or with ``triton`` their dx;
    ``saved = (x, phi, bias, alpha, r, z)``, with ``triton`` also ``h_pre``. ``reuse``: ``g_out`` is
    ours to overwrite (:func:`_exclusive`); the C kernels then write ``grad_x`` into it."""
    x, phi, bias, alpha, r, z = saved[:6]
    if triton:
        h_pre = saved[6]
        return _triton_read_backward(x, phi, bias, alpha, r, z, h_pre, iters, g_u, g_pre, g_post, g_res, g_out,
                                     need_x, need_phi)
    if cpu.enabled():  # x, phi, z were checked in forward; the gradients are cast by the wrapper
        return cpu.coeffs_bwd(x, g_u, z, r, phi, bias, alpha, g_pre, g_post, g_res, iters, need_x, need_phi,
                              g_out=g_out, gx_out=_reusable(g_out, x, reuse and need_x))
    # the kernels were switched off between forward and backward: the same sums in PyTorch ops
    n, c = x.shape[-2], x.shape[-1]
    x3 = x.reshape(-1, n, c)
    g3 = h_res = None
    if g_out is not None:
        g3 = g_out.reshape(-1, n, c).to(phi.dtype)
        if iters != cpu.IDENTITY:  # h_res = I has no gradient to take
            dres = _contract(g3, *x3.unbind(-2))  # <g[k], x[j]>
            g_res = dres if g_res is None else g_res.reshape(-1, n, n).to(dres.dtype) + dres
            h_res = _coeffs_forward(x, phi, bias, alpha, iters, rms_eps, False)[2]
    grad_x, grad_phi, grad_bias, grad_alpha = _coeffs_backward(saved[:6], iters, g_u, g_pre, g_post, g_res, need_x,
                                                               need_phi)
    if grad_x is not None and g3 is not None:
        grad_x = grad_x + g3 if h_res is None else _mix(h_res.transpose(-1, -2), g3, grad_x)
    grad_x = grad_x.reshape(x.shape).to(x.dtype) if grad_x is not None else None
    return grad_x, grad_phi, grad_bias, grad_alpha


def _triton_read_backward(x, phi, bias, alpha, r, z, h_pre, iters, g_u, g_pre, g_post, g_res, dx_in, need_x,
                          need_phi):
    """The read's backward on the Triton kernels: the read's ``<g_u, x[j]>`` (one pass, no dx),
    then the coefficient backward whose dx kernel adds ``dx_in`` and ``h_pre[j] g_u`` to its own."""
    from .triton.coeffs import coeffs_bwd
    from .triton.pre import pre_bwd

    n, c = x.shape[-2], x.shape[-1]
    x3 = x.reshape(-1, n, c)
    t = x3.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    hp = h_pre.reshape(t, n)
    with _device_of(x):
        if g_u is not None:
            g_u = g_u.reshape(t, c)
            dh = pre_bwd(x3, hp, g_u, need_dx=False)[1]
            g_pre = dh if g_pre is None else g_pre.reshape(t, n) + dh
        g_pre = torch.zeros(t, n, **f32) if g_pre is None else g_pre.reshape(t, n)
        g_post = torch.zeros(t, n, **f32) if g_post is None else g_post.reshape(t, n)
        g_res = torch.zeros(t, n, n, **f32) if g_res is None else g_res.reshape(t, n, n)
        dx, d_phi, d_bias, d_alpha = coeffs_bwd(x3, phi, bias, alpha, z, r.view(-1), g_pre, g_post, g_res, iters,
                                                dx_in=dx_in, g_u=g_u, h_pre=hp if g_u is not None else None)
    return (dx.reshape(x.shape) if need_x else None), (d_phi if need_phi else None), d_bias, d_alpha


def _triton_write(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    from .triton.post_res import post_res_fwd

    n, c = x.shape[-2], x.shape[-1]
    with _device_of(x):
        out = post_res_fwd(x.reshape(-1, n, c), y.reshape(-1, c), h_post.reshape(-1, n), h_res.reshape(-1, n, n))
    return out.reshape(x.shape)


def _triton_write_backward(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, g: Tensor):
    """``(dx, dy, dh_post, dh_res)`` of the write-back on the Triton kernels (one kernel)."""
    from .triton.post_res import post_res_bwd

    n, c = x.shape[-2], x.shape[-1]
    with _device_of(x):
        dx, dy, dp, dr = post_res_bwd(x.reshape(-1, n, c), y.reshape(-1, c), h_post.reshape(-1, n),
                                      h_res.reshape(-1, n, n), g.reshape(-1, n, c))
    return dx.reshape(x.shape), dy.reshape(y.shape), dp.reshape(h_post.shape), dr.reshape(h_res.shape)


def _write(carrier: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor | None, triton: bool = False) -> Tensor:
    """``h_res x + h_post y`` with x = carrier's values (``h_res = None``: the identity, CPU only)."""
    if triton:
        return _triton_write(carrier, y, h_post, h_res)
    if y.is_cpu and cpu.takes_as_stream(y, carrier.dtype) and cpu.enabled():
        return cpu.post_res_fwd(carrier, y, h_post, h_res)
    if h_res is None:  # the identity: x_new[k] = x[k] + h_post[k] y, as functional.residual_update
        dt = h_post.dtype
        return (carrier.to(dt) + h_post.unsqueeze(-1) * y.to(dt).unsqueeze(-2)).to(carrier.dtype)
    dt = h_res.dtype
    out = h_post.to(dt).unsqueeze(-1) * y.to(dt).unsqueeze(-2)
    return _mix(h_res, carrier, out).to(carrier.dtype)


def _write_backward(y: Tensor, h_post: Tensor, g: Tensor, need_y: bool, need_post: bool):
    """``(grad_y in y's dtype, grad_h_post)`` (None where not needed) of the write-back."""
    if cpu.takes_as_stream(y, g.dtype) and cpu.enabled():
        grad_y, grad_post = cpu.post_bwd(y, h_post, g, need_y, need_post)
    else:
        dt = h_post.dtype
        g2 = g.to(dt)
        grad_y = _mix(h_post.unsqueeze(-2), g2).squeeze(-2) if need_y else None
        grad_post = _contract(g2, y).squeeze(-1) if need_post else None
    if grad_y is not None and grad_y.dtype != y.dtype:
        grad_y = grad_y.to(y.dtype)
    return grad_y, grad_post


class CoeffsCarryFunction(torch.autograd.Function):
    """:class:`~mhckit.ops.autograd.CoeffsPreFunction` plus the carrier for
    :class:`PostCarryFunction`: returns ``(u, h_pre, h_post, h_res, carrier)``. ``x`` contiguous,
    ``x``, ``phi``, ``bias``, ``alpha`` on the CPU in one float dtype, or with ``triton`` where the Triton
    kernels run, parameters in float32 (the caller checks)."""

    @staticmethod
    def forward(ctx, x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, iters: int, rms_eps: float,
                triton: bool = False):
        u, h_pre, h_post, h_res, r, z = _read(x, phi, bias, alpha, iters, rms_eps, triton)
        ctx.save_for_backward(x, phi, bias, alpha, r, z, *((h_pre,) if triton else ()))
        ctx.iters, ctx.rms_eps, ctx.triton = iters, rms_eps, triton
        # outputs nobody differentiates (h_pre, and on the C kernels h_res, whose gradient the write-back
        # leaves to us) come back as None: no zero tensors made, filled and read by the backward
        ctx.set_materialize_grads(False)
        return u, h_pre, h_post, h_res, x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_u: Tensor, g_pre: Tensor, g_post: Tensor, g_res: Tensor, g_out: Tensor):
        free = _exclusive(g_out)  # first: it counts the references to g_out as the probe did
        need = ctx.needs_input_grad
        grads = _read_backward(ctx.saved_tensors, ctx.iters, ctx.rms_eps, g_u, g_pre, g_post, g_res, g_out, need[0],
                               need[1], ctx.triton, reuse=free and not ctx.triton)  # saved_tensors read once:
        # torch.utils.checkpoint allows one unpack
        return *grads, None, None, None


class PostCarryFunction(torch.autograd.Function):
    """The write-back ``h_res x + h_post y`` on the carrier of :class:`CoeffsCarryFunction`: its
    backward computes ``dy`` and ``dh_post`` and sends the output gradient itself back along the
    carrier (``dx`` and ``dh_res`` are the coefficient backward's). ``y [..., C]`` of any float
    dtype (cast to the carrier's by the kernels; with 2-byte streams only a ``y`` of their dtype goes
    to the kernels, so that a wider ``y`` is not rounded before the sum)."""

    @staticmethod
    def forward(ctx, carrier: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, triton: bool = False) -> Tensor:
        ctx.triton = triton
        ctx.save_for_backward(*((carrier, y, h_post, h_res) if triton else (y, h_post)))
        return _write(carrier, y, h_post, h_res, triton)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        need = ctx.needs_input_grad
        if ctx.triton:  # dx (sent along the carrier) and dh_res come from the write-back's own kernel
            grad_x, grad_y, grad_post, grad_res = _triton_write_backward(*ctx.saved_tensors, g)
            return grad_x, grad_y, grad_post, grad_res, None
        y, h_post = ctx.saved_tensors
        grad_y, grad_post = _write_backward(y, h_post, g, need[1], need[2])
        return (g if need[0] else None), grad_y, grad_post, None, None


class ReadCarryFunction(torch.autograd.Function):
    """The read ``u = sum_j h_pre[j] x[j]`` of coefficients computed elsewhere (static Hyper-Connections'),
    plus the carrier for :class:`PostCarryFunction`: returns ``(u, carrier)``. Its backward gets the
    write-back's output gradient ``g`` along the carrier and makes, in one pass over the streams
    (:func:`mhckit.ops.cpu.read_bwd`), ``dx = h_pre[j] du + sum_k h_res[k, j] g[k]``, ``dh_pre`` and
    ``dh_res``: the read's and the write-back's stream gradients in one tensor (the separate ops write
    two and autograd adds them). A stream gradient of the coefficients themselves would join by
    autograd. Eager, C kernels, float32 / float64 streams with coefficients of their dtype, or bfloat16 /
    float16 streams with float32 coefficients (the caller checks and casts)."""

    @staticmethod
    def forward(ctx, x: Tensor, h_pre: Tensor, h_res: Tensor):
        ctx.save_for_backward(x, h_pre, h_res)
        ctx.set_materialize_grads(False)
        return cpu.pre_fwd(x, h_pre), x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_u: Tensor, g_out: Tensor):
        free = _exclusive(g_out)  # first: it counts the references to g_out as the probe did
        x, h_pre, h_res = ctx.saved_tensors
        return _read_external_backward(x, h_pre, h_res, g_u, g_out, ctx.needs_input_grad, reuse=free)


def _reusable(g: Tensor | None, x: Tensor, reuse: bool) -> Tensor | None:
    """``g`` as the buffer for the stream gradient of ``x`` when :func:`_exclusive` said so and it fits."""
    return g if reuse and g.dtype is x.dtype and g.shape == x.shape else None


def _read_external_backward(x: Tensor, h_pre: Tensor, h_res: Tensor, g_u, g_out, need, reuse: bool = False) -> tuple:
    """:class:`ReadCarryFunction`'s ``(dx, dh_pre, dh_res)`` (None where not needed or nothing reaches):
    :func:`mhckit.ops.cpu.read_bwd`, or with the kernels switched off the same sums in PyTorch ops.
    ``reuse``: ``g_out`` is ours to overwrite (:func:`_exclusive`); the kernel then writes dx into it."""
    if cpu.enabled():
        return cpu.read_bwd(x, h_pre, h_res, g_u, g_out, *need, gx_out=_reusable(g_out, x, reuse and need[0]))
    n, c = x.shape[-2], x.shape[-1]
    x3, dt = x.reshape(-1, n, c), x.dtype
    gu = None if g_u is None else g_u.reshape(-1, 1, c)
    g3 = None if g_out is None else g_out.reshape(-1, n, c)
    grad_x = grad_pre = grad_res = None
    if need[0]:
        grad_x = torch.zeros_like(x3)
        if gu is not None:
            grad_x.addcmul_(h_pre.reshape(-1, n, 1).to(dt), gu)
        if g3 is not None:
            grad_x = _mix(h_res.reshape(-1, n, n).transpose(-1, -2).to(dt), g3, grad_x)
        grad_x = grad_x.reshape(x.shape)
    if need[1] and gu is not None:
        grad_pre = _contract(gu, *x3.unbind(-2)).reshape(h_pre.shape)
    if need[2] and g3 is not None:
        grad_res = _contract(g3, *x3.unbind(-2)).reshape(h_res.shape)
    return grad_x, grad_pre, grad_res


class HCCarryFunction(torch.autograd.Function):
    """Hyper-Connections' dynamic coefficients and the read in one C call each way
    (:func:`mhckit.ops.cpu.hc_fwd` / ``hc_bwd``), with the carrier for :class:`PostCarryFunction`:
    ``(x, static_pre, static_post, static_res, w_pre, w_post, w_res, scale_alpha, scale_beta, eps)`` (the
    parameters as :class:`mhckit.modules.HCCoefficients` holds them: no concatenation or stacking op, and
    no autograd node for one) -> ``(u, h_pre, h_post, h_res, carrier)``. The backward makes every
    gradient, the write-back's ``dx`` and ``dh_res`` included, in one pass over the streams; a parameter
    that only reaches coefficients nobody differentiated gets no gradient (None, as autograd through
    the reference gives). Eager, float32 / float64 streams with parameters of their dtype, or bfloat16 /
    float16 streams with float32 parameters (the caller checks and casts): u and dx of the streams' dtype,
    the coefficients and the parameters' gradients of the parameters'."""

    @staticmethod
    def forward(ctx, x: Tensor, sp: Tensor, spo: Tensor, sr: Tensor, wp: Tensor, wq: Tensor, wr: Tensor, sa: Tensor,
                sb: Tensor, eps: float):
        u, h_pre, h_post, h_res, z, r = cpu.hc_fwd(x, wp, wq, wr, sp, spo, sr, sa, sb, eps)
        ctx.save_for_backward(x, sp, spo, sr, wp, wq, wr, sa, sb, z, r)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return u, h_pre, h_post, h_res, x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_u: Tensor, g_pre: Tensor, g_post: Tensor, g_res: Tensor, g_out: Tensor):
        free = _exclusive(g_out)  # first: it counts the references to g_out as the probe did
        x, sp, spo, sr, wp, wq, wr, sa, sb, z, r = ctx.saved_tensors
        need = ctx.needs_input_grad
        if cpu.enabled():
            gx, dwp, dwq, dwr, dsp, dspo, dsr, dsa, dsb = cpu.hc_bwd(x, g_u, g_out, z, r, wp, wq, wr, sp, sr, sa, sb,
                                                                     g_pre, g_post, g_res, need[0],
                                                                     gx_out=_reusable(g_out, x, free and need[0]))
            grads = [gx, dsp, dspo, dsr, dwp, dwq, dwr, dsa, dsb]
        else:  # the kernels were switched off between forward and backward: autograd through the reference
            grads = _hc_reference_backward(ctx.saved_tensors[:9], ctx.eps, g_u, g_pre, g_post, g_res, g_out)
        # which coefficients got a gradient: h_pre (through u or itself), h_post, h_res (itself or the write-back)
        pre, post, res = g_u is not None or g_pre is not None, g_post is not None, g_res is not None or g_out is not None
        # x (through every coefficient and u), sp, spo, sr, wp, wq, wr, sa (h_pre and h_res), sb (h_post)
        reach = (pre or post or res, pre, post, res, pre, post, res, pre or res, post)
        return (*(g if wanted and reached else None for g, wanted, reached in zip(grads, need, reach)), None)


def _hc_reference_backward(saved, eps: float, g_u, g_pre, g_post, g_res, g_out) -> list:
    """:class:`HCCarryFunction`'s gradients (None where none reaches) by autograd through
    :func:`mhckit.reference.hc_coeffs`, ``saved = (x, sp, spo, sr, wp, wq, wr, sa, sb)``."""
    from .. import reference

    leaves = [t.detach().requires_grad_() for t in saved]
    with torch.enable_grad():
        xs, sp, spo, sr, wp, wq, wr, sa, sb = leaves
        h_pre, h_post, h_res = reference.hc_coeffs(xs, sp, spo, sr, wp, wq, wr, sa, sb, norm_eps=eps)
        terms = [(reference.mhc_pre(xs, h_pre), g_u), (h_pre, g_pre), (h_post, g_post), (h_res, g_res)]
        if g_out is not None:  # the write-back's x-side: h_res x (its h_post y part is not ours)
            terms.append((torch.einsum("...kj,...jc->...kc", h_res, xs.to(h_res.dtype)), g_out))
        terms = [(out, g) for out, g in terms if g is not None]
        if not terms:
            return [None] * len(leaves)
        loss = sum((out * g.to(out.dtype)).sum() for out, g in terms)
        return list(torch.autograd.grad(loss, leaves, allow_unused=True))

"""Public functional API: the fast default path, same names and signatures as :mod:`mhckit.reference`.

Each function takes ``backend=`` (``"auto"``, ``"torch"``, ``"reference"``, ``"triton"``; see
:mod:`mhckit.ops`). ``"triton"`` runs the fused kernels of :mod:`mhckit.ops.triton` through the
custom ops of :mod:`mhckit.ops.triton_autograd` (imported on first use only).
The ``torch`` backend differs from the reference only in how it computes, never in what: its
Sinkhorn saves just the logits and recomputes the iterations in backward
(:class:`mhckit.ops.autograd.SinkhornFunction`), its coefficients are one Function that recomputes
its intermediates, and its pre / post-res are in-place elementwise passes (no batched tiny GEMMs).
Parity with the reference (forward and every gradient) is tested.

NaN / Inf: ``with check_finite():`` (or ``check_finite(True)``, or ``MHCKIT_CHECK_FINITE=1``) makes
every op below check its tensor inputs and outputs and raise :class:`NonFiniteError` naming the op,
the argument and the count of non-finite values; off (the default) it costs one bool test per op.

Shape legend: ``...`` leading dims, ``n`` streams, ``C`` width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from ._validate import (
    _FINITE_CHECK,
    NonFiniteError,
    check_alpha,
    check_coefficient,
    check_finite,
    check_iters,
    check_phi_bias,
    check_square,
    check_streams,
    compute_dtype,
    finite_checked,
)
from .ops import cpu, resolve_backend
from .ops.autograd import (
    CoeffsFunction,
    CoeffsPreFunction,
    HCDynamicFunction,
    hc_coefficients,
    PostResFunction,
    PreFunction,
    SinkhornFunction,
)
from .ops.carry import CoeffsCarryFunction, HCCarryFunction, PostCarryFunction, ReadCarryFunction, pair_enabled
from .ops import carry as _carry
from .ops.carry import _read as _carry_read, _write as _carry_write
from .ops.carry_ops import carry_hc_read, carry_pre_read, carry_read, carry_write
from .ops.cpu import _pair
from .recompute import active as recompute_active, in_compiled_region as recompute_in_compiled_region
from .reference import DEFAULT_RMS_EPS

__all__ = [
    "sinkhorn", "mhc_logits", "mhc_coeffs", "mhc_coeffs_pre", "mhc_pre", "mhc_post_res", "residual_update", "hc_coeffs",
    "check_finite", "NonFiniteError",
]


def _triton():
    """The Triton backend's entry points (lazy: importing mhckit never imports Triton)."""
    from .ops import triton_autograd

    return triton_autograd


def _compile_cpu(*tensors: Tensor) -> bool:
    """True while ``torch.compile`` traces the ``torch`` backend on CPU tensors with the compiled CPU
    kernels built: the op then goes through the ``torch.library`` custom ops of
    :mod:`mhckit.ops.triton_autograd`, whose CPU implementation calls the C kernels at run time (a
    ctypes call cannot be traced; traced, the PyTorch ops of the Sinkhorn and its backward become
    hundreds of graph nodes: minutes of compilation and a slower step)."""
    return torch.compiler.is_compiling() and all(t.is_cpu for t in tensors) and cpu.built()


@finite_checked("logits", outputs="h_res")
def sinkhorn(logits: Tensor, iters: int = 20, *, backend: str = "auto") -> Tensor:
    """Sinkhorn-Knopp onto the doubly stochastic matrices; see :func:`mhckit.reference.sinkhorn`."""
    resolved = resolve_backend(backend, logits)
    if resolved == "reference":
        return reference.sinkhorn(logits, iters)
    check_square(logits, "logits")
    check_iters(iters)
    if resolved == "triton" or _compile_cpu(logits):
        return _triton().sinkhorn(logits, iters)
    return SinkhornFunction.apply(logits.to(compute_dtype(logits)), iters)


@finite_checked("x", "phi", "bias", "alpha", outputs=("a_pre", "a_post", "a_res"))
def mhc_logits(
    x: Tensor,
    phi: Tensor,
    bias: Tensor,
    alpha: Tensor,
    *,
    rms_eps: float = DEFAULT_RMS_EPS,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Gated dynamic logits ``(a_pre, a_post, a_res)``; see :func:`mhckit.reference.mhc_logits`.

    Every backend computes the logits with torch (the ``triton`` backend fuses them only inside
    :func:`mhc_coeffs`).
    """
    resolve_backend(backend, x, phi, bias, alpha)
    return reference.mhc_logits(x, phi, bias, alpha, rms_eps=rms_eps)


@finite_checked("x", "phi", "bias", "alpha", outputs=("h_pre", "h_post", "h_res"))
def mhc_coeffs(
    x: Tensor,
    phi: Tensor,
    bias: Tensor,
    alpha: Tensor,
    *,
    iters: int = 20,
    rms_eps: float = DEFAULT_RMS_EPS,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """``(h_pre, h_post, h_res)`` of one mHC sublayer; see :func:`mhckit.reference.mhc_coeffs`."""
    resolved = resolve_backend(backend, x, phi, bias, alpha)
    if resolved == "reference":
        return reference.mhc_coeffs(x, phi, bias, alpha, iters=iters, rms_eps=rms_eps)
    _check_mhc(x, phi, bias, alpha, iters)
    if resolved == "triton" or _compile_cpu(x, phi, bias, alpha):
        return _triton().mhc_coeffs(x, phi, bias, alpha, iters=iters, rms_eps=rms_eps)
    dt = compute_dtype(x, phi)
    return CoeffsFunction.apply(x, phi.to(dt), bias.to(dt), alpha.to(dt), iters, rms_eps)


def _check_mhc(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, iters: int) -> None:
    n, c = check_streams(x, "x")
    check_phi_bias(phi, bias, n, c, res_logits=n * n)
    check_iters(iters)
    check_alpha(alpha)


@finite_checked("x", "phi", "bias", "alpha", outputs=("u", "h_pre", "h_post", "h_res"))
def mhc_coeffs_pre(
    x: Tensor,
    phi: Tensor,
    bias: Tensor,
    alpha: Tensor,
    *,
    iters: int = 20,
    rms_eps: float = DEFAULT_RMS_EPS,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(u, h_pre, h_post, h_res)``: :func:`mhc_coeffs` followed by :func:`mhc_pre`, fused on the
    ``torch`` backend (one stream gradient written in backward instead of two added by autograd)."""
    resolved = resolve_backend(backend, x, phi, bias, alpha)
    if resolved != "torch" or _compile_cpu(x, phi, bias, alpha):
        h_pre, h_post, h_res = mhc_coeffs(x, phi, bias, alpha, iters=iters, rms_eps=rms_eps, backend=resolved)
        return mhc_pre(x, h_pre, backend=resolved), h_pre, h_post, h_res
    _check_mhc(x, phi, bias, alpha, iters)
    dt = compute_dtype(x, phi)
    return CoeffsPreFunction.apply(x, phi.to(dt), bias.to(dt), alpha.to(dt), iters, rms_eps)


# ---- one sublayer as a fused pair, on the CPU or Triton kernels (private to HyperConnection; ops/carry.py) ----


def _carry_mode(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, backend: str) -> str | None:
    """Where :func:`_mhc_read_carry` can run: ``"cpu"`` on the compiled CPU kernels (the ``torch``
    backend, eager or under ``torch.compile`` as custom ops; everything on the CPU, streams of float32 /
    float64 with parameters of that dtype, or streams of bfloat16 / float16 with parameters of any
    float dtype but float64: the coefficients are computed in float32, as :func:`mhc_coeffs_pre` does),
    ``"triton"`` on the Triton kernels (where the ``triton`` backend runs: CUDA tensors, or CPU ones
    under the interpreter), else None (the separate ops; also inside
    :func:`mhckit.ops.carry.separate_ops`)."""
    if not pair_enabled():
        return None
    if x.is_cpu and backend != "triton":  # "auto" is "torch" for CPU tensors
        ok = (
            (cpu.streams_available(x, n=x.shape[-2]) or (_compile_cpu(x) and cpu.compile_streams_ok(x.dtype)))
            and phi.is_cpu and bias.is_cpu and alpha.is_cpu and x.shape[-2] <= cpu.MAX_STREAMS
            and (phi.dtype is x.dtype or compute_dtype(x, phi) is cpu.coef_dtype(x.dtype) is not x.dtype)
            and (backend == "auto" or resolve_backend(backend, x, phi) == "torch")
        )
        return "cpu" if ok else None
    if (x.is_cuda or backend == "triton") and backend in ("auto", "triton"):
        if resolve_backend(backend, x, phi, bias, alpha) == "triton":
            return "triton"
    return None


@finite_checked("x", "phi", "bias", "alpha", outputs=("u", "h_pre", "h_post", "h_res", "carrier"), op="mhc_coeffs_pre")
def _mhc_read_carry(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, *, iters: int, rms_eps: float,
                    triton: bool = False):
    """:func:`mhc_coeffs_pre` plus the carrier that :func:`_mhc_write_carry` takes in place of ``x``:
    ``(u, h_pre, h_post, h_res, carrier)``. Only where :func:`_carry_mode` says (``triton``: it said
    ``"triton"``; x: streams [..., n, C]). ``iters = cpu.PERMUTATIONS``: mHC-lite's permutation mixture
    for ``h_res`` (``n! `` logits, n <= ``cpu.MAX_PERMUTATION_STREAMS``; the C kernels only) instead of
    the Sinkhorn projection; ``iters = cpu.IDENTITY``: the identity variant (no logits for ``h_res``,
    which comes back as None; the C kernels, eager or as the custom ops)."""
    n, c = x.shape[-2], x.shape[-1]
    perms = type(iters) is int and iters == cpu.PERMUTATIONS
    ident = type(iters) is int and iters == cpu.IDENTITY
    k = 2 * n + (math.factorial(n) if perms else 0 if ident else n * n)
    if not (  # the usual case in one comparison; else the full checks, which name what is wrong
        (phi.shape, bias.shape, alpha.shape) == ((n * c, k), (k,), (3,))
        and bias.is_floating_point() and alpha.is_floating_point() and type(iters) is int
        and (iters >= 1 or perms or ident)
    ):
        if not (perms or ident):
            _check_mhc(x, phi, bias, alpha, iters)
        else:
            check_phi_bias(phi, bias, n, c, res_logits=k - 2 * n)
            check_alpha(alpha)
    if perms and (triton or n > cpu.MAX_PERMUTATION_STREAMS):
        raise ValueError(f"n_streams: the permutation mixture runs on the CPU kernels with n <= "
                         f"{cpu.MAX_PERMUTATION_STREAMS} (got n={n}, triton={triton})")
    if ident and triton:
        raise ValueError(f"iters: the identity (h_res = I) runs on the CPU kernels (got triton={triton})")
    dt = torch.float32 if triton else cpu.coef_dtype(x.dtype)
    x = x if x.is_contiguous() else x.contiguous()
    if torch.compiler.is_compiling():  # the same pair as custom ops (see mhckit/ops/carry_ops.py)
        u, h_pre, h_post, h_res, _, _, carrier = carry_read(x, _as(phi, dt), _as(bias, dt), _as(alpha, dt), iters,
                                                            float(rms_eps), triton)
        return u, h_pre, h_post, None if ident else h_res, carrier  # the identity's h_res: an empty stand-in
    phi, bias, alpha = _as(phi, dt), _as(bias, dt), _as(alpha, dt)
    if not torch.is_grad_enabled():  # nothing to record (inference, generation): the kernels without a Function
        # (its forward's calls; the carrier is x itself, which the write-back only reads)
        return (*_carry_read(x, phi, bias, alpha, iters, rms_eps, triton)[:4], x)
    if not triton and _pair.active():  # the same pair as C++ Functions (mhckit/ops/cpu/_pair.py)
        u, h_pre, h_post, h_res, carrier = _pair._STATE["read"](x, phi, bias, alpha, iters, float(rms_eps),
                                                                 cpu._project_here(n, c, k, x.dtype),
                                                                 _carry.REUSE_GRADIENT_BUFFER)
        return u, h_pre, h_post, None if ident else h_res, carrier
    return CoeffsCarryFunction.apply(x, phi, bias, alpha, iters, rms_eps, triton)


def _pair_now() -> bool:
    """Whether the C++ pair runs now, as :func:`_mhc_read_carry` / :func:`_mhc_write_carry` would decide
    for CPU streams of float32 / float64 in a plain eager step: not tracing, the kernels not switched
    off, the pair on and loaded, no finite checks, no :func:`mhckit.ops.carry.separate_ops`, no
    recomputation recording. Flag reads only: :meth:`mhckit.modules.HyperConnection.split` asks this
    twice per sublayer, where Python runs cold between the branches (measured: several times its cost
    in a loop)."""
    return (not torch.compiler.is_compiling() and not cpu._OFF[0] and _pair._ON[0] and _pair._STATE.get("ok") is True
            and not _FINITE_CHECK[0] and not _carry._OFF[0] and recompute_active() is None
            and not recompute_in_compiled_region() and cpu._load() is not None)


def _as(t: Tensor, dt: torch.dtype) -> Tensor:
    return t if t.dtype is dt else t.to(dt)


def _hc_carry_mode(x: Tensor, tensors: tuple[Tensor, ...], backend: str, *, traced: bool = False) -> bool:
    """Whether Hyper-Connections' pair runs on the C kernels: its dynamic coefficients with the read
    (:func:`_hc_read_carry`, ``tensors`` its parameters) or the read of coefficients computed elsewhere
    (:func:`_mhc_read_external`, ``tensors`` = ``(h_pre, h_res)``); ``traced=True``: also while
    ``torch.compile`` traces, as the custom ops of :mod:`mhckit.ops.carry_ops`. The ``torch``
    backend on the CPU with the kernels on (or built, while tracing), float32 / float64 streams with
    ``tensors`` of their dtype, or bfloat16 / float16 streams with ``tensors`` of any float dtype but
    float64 (cast to float32, as mHC's coefficients), n <= 8, the pair not switched off."""
    if not (pair_enabled() and x.is_cpu and backend in ("auto", "torch")):
        return False
    compiling = torch.compiler.is_compiling()
    if compiling and not traced:
        return False
    if x.dtype in (torch.float32, torch.float64):
        ok = all(t.dtype is x.dtype and t.is_cpu for t in tensors)
    else:
        ok = all(t.is_cpu and t.is_floating_point() and t.dtype is not torch.float64 for t in tensors)
    if compiling:
        return ok and x.shape[-2] <= cpu.MAX_STREAMS and _compile_cpu(x) and cpu.compile_streams_ok(x.dtype)
    return ok and cpu.streams_available(x, n=x.shape[-2])


@finite_checked("x", "h_pre", "h_res", outputs=("u", "carrier"), op="mhc_pre")
def _mhc_read_external(x: Tensor, h_pre: Tensor, h_res: Tensor) -> tuple[Tensor, Tensor]:
    """``(u, carrier)``: :func:`mhc_pre` on the pair (:class:`mhckit.ops.carry.ReadCarryFunction`; while
    ``torch.compile`` traces, the custom op ``mhckit::carry_pre_read``), whose write-back takes the
    carrier through :func:`_mhc_write_carry` and whose backward also makes that write-back's ``dx`` and
    ``dh_res``. Only where :func:`_hc_carry_mode` says."""
    n, _ = check_streams(x, "x")
    check_coefficient(h_pre, "h_pre", x.shape[:-2] + (n,))
    check_coefficient(h_res, "h_res", x.shape[:-2] + (n, n))
    dt = cpu.coef_dtype(x.dtype)  # float32 for 2-byte streams (a cast autograd takes back), else x's dtype
    x = x if x.is_contiguous() else x.contiguous()
    if torch.compiler.is_compiling():  # the same pair as custom ops (see mhckit/ops/carry_ops.py)
        return carry_pre_read(x, _as(h_pre, dt), _as(h_res, dt))
    h_pre, h_res = _as(h_pre, dt), _as(h_res, dt)
    if not torch.is_grad_enabled():  # nothing to record: the kernel without a Function (as its forward)
        return cpu.pre_fwd(x, h_pre), x
    if _pair.active():  # the same Function in C++ (mhckit/ops/cpu/_pair.py)
        u, carrier = _pair._STATE["pre"](x, h_pre, h_res, _carry.REUSE_GRADIENT_BUFFER)
        return u, carrier
    return ReadCarryFunction.apply(x, h_pre, h_res)


@finite_checked("x", "static_pre", "static_post", "static_res", "w_pre", "w_post", "w_res", "scale_alpha",
                "scale_beta", outputs=("u", "h_pre", "h_post", "h_res", "carrier"), op="hc_coeffs")
def _hc_read_carry(x: Tensor, static_pre: Tensor, static_post: Tensor, static_res: Tensor, w_pre: Tensor,
                   w_post: Tensor, w_res: Tensor, scale_alpha: Tensor, scale_beta: Tensor, *, norm_eps: float):
    """``(u, h_pre, h_post, h_res, carrier)``: :func:`hc_coeffs` (dynamic) and :func:`mhc_pre` on the C
    kernels (:class:`mhckit.ops.carry.HCCarryFunction`; while ``torch.compile`` traces, the custom op
    ``mhckit::carry_hc_read``), whose write-back takes the carrier through :func:`_mhc_write_carry`.
    Only where :func:`_hc_carry_mode` says."""
    _check_hc_shapes(x, static_pre, static_post, static_res, w_pre, w_post, w_res, (scale_alpha, scale_beta))
    dt = cpu.coef_dtype(x.dtype)  # float32 for 2-byte streams (a cast autograd takes back), else x's dtype
    params = [_as(t, dt) for t in (static_pre, static_post, static_res, w_pre, w_post, w_res, scale_alpha, scale_beta)]
    x = x if x.is_contiguous() else x.contiguous()
    if torch.compiler.is_compiling():  # the same pair as custom ops (see mhckit/ops/carry_ops.py)
        u, h_pre, h_post, h_res, _, _, carrier = carry_hc_read(x, *params, float(norm_eps))
        return u, h_pre, h_post, h_res, carrier
    if not torch.is_grad_enabled():  # nothing to record: the kernels without a Function (as its forward)
        sp, spo, sr, wp, wq, wr, sa, sb = params
        return (*cpu.hc_fwd(x, wp, wq, wr, sp, spo, sr, sa, sb, float(norm_eps))[:4], x)
    if _pair.active():  # the same Function in C++ (mhckit/ops/cpu/_pair.py)
        return tuple(_pair._STATE["hc"](x, *params, float(norm_eps), _carry.REUSE_GRADIENT_BUFFER))
    return HCCarryFunction.apply(x, *params, float(norm_eps))


@finite_checked("x", "x", "y", "h_post", "h_res", outputs="x_new", op="mhc_post_res")  # the carrier is x
def _mhc_write_carry(x: Tensor, carrier: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor | None,
                     triton: bool = False) -> Tensor:
    """:func:`mhc_post_res` of streams ``x`` through the carrier of :func:`_mhc_read_carry` (same
    h_post / h_res, same ``triton``)."""
    check_coefficient(y, "y", carrier.shape[:-2] + carrier.shape[-1:])
    if torch.compiler.is_compiling():
        return carry_write(x if x.is_contiguous() else x.contiguous(), carrier, y, h_post, h_res, triton)
    if not torch.is_grad_enabled():  # nothing to record: the write-back's kernel without its Function
        return _carry_write(carrier, y, h_post, h_res, triton)
    if not triton and y.dtype is carrier.dtype and y.is_cpu and _pair.active():
        return _pair._STATE["write"](carrier, y, h_post, h_res)  # the C++ pair (mhckit/ops/cpu/_pair.py)
    return PostCarryFunction.apply(carrier, y, h_post, h_res, triton)


@finite_checked("x", "h_pre", outputs="u")
def mhc_pre(x: Tensor, h_pre: Tensor, *, backend: str = "auto") -> Tensor:
    """``u = sum_j h_pre[j] x[j]``, ``[..., n, C] -> [..., C]``; see :func:`mhckit.reference.mhc_pre`."""
    resolved = resolve_backend(backend, x, h_pre)
    if resolved == "reference":
        return reference.mhc_pre(x, h_pre)
    n, _ = check_streams(x, "x")
    check_coefficient(h_pre, "h_pre", x.shape[:-2] + (n,))
    if resolved == "triton" or _compile_cpu(x, h_pre):
        return _triton().mhc_pre(x, h_pre)
    return PreFunction.apply(x, h_pre)


@finite_checked("x", "y", "h_post", "h_res", outputs="x_new")
def mhc_post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, *, backend: str = "auto") -> Tensor:
    """``x_new = h_res @ x + h_post y``; see :func:`mhckit.reference.mhc_post_res`."""
    resolved = resolve_backend(backend, x, y, h_post, h_res)
    if resolved == "reference":
        return reference.mhc_post_res(x, y, h_post, h_res)
    n, c = check_streams(x, "x")
    lead = x.shape[:-2]
    check_coefficient(y, "y", lead + (c,))
    check_coefficient(h_post, "h_post", lead + (n,))
    check_coefficient(h_res, "h_res", lead + (n, n))
    if resolved == "triton" or _compile_cpu(x, y, h_post, h_res):
        return _triton().mhc_post_res(x, y, h_post, h_res)
    return PostResFunction.apply(x, y, h_post, h_res)


@finite_checked("x", "y", "h_post", outputs="x_new")
def residual_update(x: Tensor, y: Tensor, h_post: Tensor) -> Tensor:
    """``x_new[k] = x[k] + h_post[k] y`` (``h_res = I``, the identity / iHC variant)."""
    n, c = check_streams(x, "x")
    check_coefficient(h_post, "h_post", x.shape[:-2] + (n,))
    dt = h_post.dtype
    return (x.to(dt) + h_post.unsqueeze(-1) * y.to(dt).unsqueeze(-2)).to(x.dtype)


def _check_hc_shapes(x, static_pre, static_post, static_res, w_pre, w_post, w_res, scales=()) -> None:
    """Dynamic HC's parameters against streams ``x [..., n, C]`` (``scales``, if given, must be scalars);
    an error names the first one of the wrong shape."""
    n, c = check_streams(x, "x")
    for name, t, shape in (("w_pre", w_pre, (c,)), ("w_post", w_post, (c,)), ("w_res", w_res, (c, n)),
                           ("static_pre", static_pre, (n,)), ("static_post", static_post, (n,)),
                           ("static_res", static_res, (n, n)),
                           *((name, t, ()) for name, t in zip(("scale_alpha", "scale_beta"), scales))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}.shape: got {tuple(t.shape)}; expected {shape} for x of shape {tuple(x.shape)}")


@finite_checked("x", "static_pre", "static_post", "static_res", "w_pre", "w_post", "w_res", "scale_alpha",
                "scale_beta", outputs=("h_pre", "h_post", "h_res"))
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
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Hyper-Connections' ``(h_pre, h_post, h_res)``; see :func:`mhckit.reference.hc_coeffs` (same
    arguments). The dynamic terms run as one :class:`mhckit.ops.autograd.HCDynamicFunction`
    (``(x @ [w_pre | w_post | w_res]) / rms(x)``: no normalised copy of the streams, a two-pass
    backward) on every backend but ``"reference"``."""
    resolved = resolve_backend(backend, x, static_res)
    if resolved == "reference" or w_pre is None:
        return reference.hc_coeffs(x, static_pre, static_post, static_res, w_pre, w_post, w_res, scale_alpha,
                                   scale_beta, norm_eps=norm_eps)
    check_streams(x, "x")  # named first, as before the other arguments
    if w_post is None or w_res is None or scale_alpha is None or scale_beta is None:
        raise ValueError("w_pre, w_post, w_res, scale_alpha, scale_beta: pass all of them (dynamic HC) or none")
    _check_hc_shapes(x, static_pre, static_post, static_res, w_pre, w_post, w_res)
    dt = compute_dtype(x, static_res)
    w = torch.cat([w_pre.to(dt)[:, None], w_post.to(dt)[:, None], w_res.to(dt)], dim=1)  # [C, n + 2]
    z = HCDynamicFunction.apply(x, w, float(norm_eps))  # [..., n, n + 2]
    return hc_coefficients(z, static_pre.to(dt), static_post.to(dt), static_res.to(dt), scale_alpha.to(dt),
                           scale_beta.to(dt))

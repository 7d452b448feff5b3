"""Compiled CPU kernels for mHC's coefficients (RMS, projection, gates, activations, Sinkhorn,
the branch read) and the stream write-back, forward and backward.

At small widths the CPU cost of mHC is not arithmetic but the number of PyTorch ops: the
20-iteration Sinkhorn alone is ~120 whole-tensor ops forward and ~400 backward (each a few µs
of dispatch on tensors of a few thousand elements). ``mhc_cpu.c`` does the same arithmetic token
by token in one pass (forward; the backward recomputes the iterates per token, nothing stored),
one C call per sublayer for the coefficients and the read (:func:`coeffs_fwd`, :func:`coeffs_bwd`)
and one for the write-back. Inside :class:`mhckit.HyperConnection` the write-back's backward only
computes ``dy`` and ``dh_post`` (:func:`post_bwd`); its ``dx`` and ``dh_res`` are made by
:func:`coeffs_bwd` in the pass that reads the streams anyway (``g_out``).

The library is compiled on first use with the system C compiler (``$CC``, else ``cc`` / ``gcc``
/ ``clang``), with OpenMP when the compiler has it, into a cache directory
(``$MHCKIT_CACHE/kernels``, default ``~/.cache/mhckit/kernels``), keyed by a hash of the source
and flags, and loaded with :mod:`ctypes`: no Python or torch headers, ~40 s to build on a 2-core CPU
(once; a build in the default cache also serves another ``$MHCKIT_CACHE``). Without a
compiler, or with ``MHCKIT_CPU_KERNELS=0``, mhckit uses its PyTorch ops instead (same results to
rounding; tests check both). A ctypes call cannot be traced: under ``torch.compile`` mhckit's ops
become ``torch.library`` custom ops that call these kernels at run time (``mhckit/ops/carry_ops.py``,
``mhckit/ops/triton_autograd.py``; :func:`built` and :func:`compile_streams_ok` answer at trace time).

The build targets what PyTorch itself dispatches to on this CPU: AVX2 + FMA, and where PyTorch uses
AVX-512 also AVX-512 register blocks (16-lane vectors, 32 registers) for the float32 matmuls with phi
(projection forward, ``dphi`` and the ``dx`` term backward; the coefficient op in 0.80-0.96x the
AVX2 build's time, ``benchmarks/results/ops_isa_cpu.md``). ``MHCKIT_CPU_ISA=avx2`` (or ``generic``)
narrows the build, e.g. to check the portable blocks on an AVX-512 machine (a test does);
:func:`use_isa` switches builds inside one process (A/B benchmarks).

Streams in bfloat16 or float16 (a model cast with ``.to(torch.bfloat16)``, e.g. a Hugging Face model
loaded in bf16) run on the same kernels: the stream read, the write-back and the coefficient kernels
take 2-byte streams, convert each block of tokens to float32 in per-thread scratch, compute in
float32 and round every stream result once; the coefficients and their parameters' gradients are
float32 (``mhc_cpu_half.h``). The PyTorch ops do the same sums (cast to float32, compute, cast back),
so both paths agree to a unit in the last place of the 2-byte format.

Inside :class:`mhckit.HyperConnection` (eager, autograd on) the pair of calls per sublayer (every
variant on these kernels) is made from C++ autograd Functions where they build (``_pair.py``, ``mhc_pair.cpp``; the ctypes library hands
them its entry points), so that no Python runs around the kernels in backward.

:func:`status` says which path is active and why (``_pair.status()`` for the C++ pair; ``mhckit kernels``
prints both).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..._compile import constant_result
from . import _pair
from ._library import _STATE, ISAS, _isa, _isa_flags, _load, status  # noqa: F401 (_isa*: tests)

__all__ = [
    "available", "enabled", "status", "disabled", "sinkhorn_fwd", "sinkhorn_bwd", "tail_fwd", "tail_bwd",
    "pre_fwd", "pre_bwd", "post_res_fwd", "post_res_bwd", "post_bwd", "coeffs_fwd", "coeffs_bwd", "MAX_STREAMS",
    "streams_available", "coef_dtype", "built", "compile_streams_ok", "takes_as_stream", "use_isa", "ISAS",
    "read_bwd", "hc_fwd", "hc_bwd", "PERMUTATIONS", "MAX_PERMUTATION_STREAMS", "IDENTITY",
]

MAX_STREAMS = 8
# The coefficient kernels' `iters` for mHC-lite (arXiv 2601.05732): h_res is the softmax-weighted
# mixture of the n! permutation matrices instead of a Sinkhorn projection (K = 2n + n! logits), for
# n <= MAX_PERMUTATION_STREAMS (24 permutations; the kernels' per-token blocks hold at most 80 logits).
PERMUTATIONS = -1
# The coefficient kernels' `iters` for the identity variant (the iHC ablation): h_res = I, no logits for
# it (K = 2n); the kernels take and return no h_res (None), and a write-back given h_res = None adds the
# streams unmixed (x_new[k] = x[k] + h_post[k] y).
IDENTITY = -2
MAX_PERMUTATION_STREAMS = 4


_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
_COEF = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32,
         torch.float16: torch.float32}


_HALVES = (torch.bfloat16, torch.float16)


def coef_dtype(stream_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the kernels' coefficients for streams of ``stream_dtype``: float32 for
    bfloat16 / float16 streams, else the streams' own."""
    return _COEF[stream_dtype]


_OFF = [0]  # > 0 inside `disabled()`


@contextlib.contextmanager
def disabled():
    """Use the PyTorch ops inside this block (for comparisons and benchmarks)."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


_BUILDS: dict[str, tuple[dict, dict]] = {}  # isa -> (_STATE, _FNS) of that build, for use_isa()


@contextlib.contextmanager
def use_isa(isa: str):
    """Inside this block the kernels are the build for ``isa`` (one of :data:`ISAS`, narrowed to what
    the CPU has, as ``MHCKIT_CPU_ISA`` does), loaded next to the process's own build: for A/B
    benchmarks of two builds in one process. Not thread-safe; the process's build is back afterwards."""
    if isa not in ISAS:
        raise ValueError(f"isa: got {isa!r}; expected one of {', '.join(ISAS)}")
    _load()
    saved = dict(_STATE), dict(_FNS)
    try:
        if isa not in _BUILDS:
            before = os.environ.get("MHCKIT_CPU_ISA")
            os.environ["MHCKIT_CPU_ISA"] = isa
            try:
                _STATE.clear(), _FNS.clear()
                if _load() is None:
                    raise RuntimeError(f"isa: the build for {isa!r} is unavailable ({_STATE.get('why')})")
            finally:
                if before is None:
                    del os.environ["MHCKIT_CPU_ISA"]
                else:
                    os.environ["MHCKIT_CPU_ISA"] = before
            _BUILDS[isa] = dict(_STATE), {}
        _STATE.clear(), _STATE.update(_BUILDS[isa][0]), _FNS.clear(), _FNS.update(_BUILDS[isa][1])
        _pair.hand_over(_STATE["lib"])  # the C++ pair calls this build's kernels too
        yield
        _BUILDS[isa] = dict(_STATE), dict(_FNS)  # keep the functions looked up inside
    finally:
        _STATE.clear(), _STATE.update(saved[0]), _FNS.clear(), _FNS.update(saved[1])
        _pair.hand_over(_STATE.get("lib"))


def enabled() -> bool:
    """True when the kernels may run now: not switched off (:func:`disabled`), not inside
    ``torch.compile`` tracing, the library loaded. The tensors are :func:`available`'s to check."""
    return not _OFF[0] and not torch.compiler.is_compiling() and _load() is not None


@constant_result
def built() -> bool:
    """Whether the library is (or can be) built and loaded. Under ``torch.compile`` tracing this runs
    once, eagerly, and its answer is a constant of the graph (so that the ``torch`` backend can choose
    the custom ops of :mod:`mhckit.ops.triton_autograd`, which call the kernels at run time)."""
    return _load() is not None


@constant_result
def compile_streams_ok(dtype: torch.dtype) -> bool:
    """Whether the library takes streams of ``dtype`` (a constant of a ``torch.compile`` graph)."""
    return _load() is not None and (dtype in (torch.float32, torch.float64) or dtype in _STATE.get("halves", ()))


def available(*tensors: torch.Tensor, n: int) -> bool:
    """True when the compiled kernels can run on ``tensors`` (CPU, float32/float64, one dtype,
    ``n <= 8``) outside of ``torch.compile`` tracing."""
    if not 1 <= n <= MAX_STREAMS:
        return False
    dt = tensors[0].dtype
    if dt not in _COEF or dt in _HALVES or any(not t.is_cpu or t.dtype != dt for t in tensors):
        return False
    return enabled()


def takes_as_stream(t: torch.Tensor, stream_dtype: torch.dtype) -> bool:
    """Whether a further stream operand ``t`` (a branch output, a gradient) may go to the kernels,
    which cast it to ``stream_dtype``: always for 4- and 8-byte streams (the PyTorch ops cast it to
    that dtype too, the coefficients' own), only of the same dtype for 2-byte streams (the PyTorch
    ops would not round a wider one first)."""
    return t.dtype is stream_dtype or stream_dtype.itemsize > 2


def streams_available(x: torch.Tensor, *coefficients: torch.Tensor, n: int) -> bool:
    """True when the stream kernels (read, write-back, coefficients) can run on streams ``x``
    (float32 / float64, or bfloat16 / float16 where the library has them) and ``coefficients`` of
    :func:`coef_dtype` of it, all on the CPU, outside ``torch.compile`` tracing (further stream
    operands: :func:`takes_as_stream`)."""
    if not 1 <= n <= MAX_STREAMS:
        return False
    dt = x.dtype
    cd = _COEF.get(dt)
    if cd is None or not x.is_cpu:
        return False
    if any(not t.is_cpu or t.dtype != cd for t in coefficients) or not enabled():
        return False
    return dt not in _HALVES or dt in _STATE.get("halves", ())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()  # ctypes passes an int as the c_void_p argument


_FNS: dict[tuple[str, torch.dtype], object] = {}  # (kernel, dtype) -> the ctypes function


def _call(name: str, dtype: torch.dtype, *args) -> None:
    fn = _FNS.get((name, dtype))
    if fn is None:
        lib = _load()
        if lib is None:
            raise RuntimeError(f"mhckit CPU kernel {name}: the compiled kernels are unavailable ({_STATE.get('why')})")
        if dtype in _HALVES and dtype not in _STATE.get("halves", ()):  # undeclared: ctypes would mangle pointers
            raise RuntimeError(f"mhckit CPU kernel {name}: this build has no {dtype} streams")
        fn = _FNS[(name, dtype)] = getattr(lib, f"{name}_{_SUFFIX[dtype]}")
    err = fn(*args)
    if err:
        raise RuntimeError(f"mhckit CPU kernel {name} failed (code {err}: 1 bad n/iters, 2 out of memory)")


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """A ``[T, >= width]`` view whose rows are contiguous (row stride free), else a copy."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < width):
        t2 = t2.contiguous()
    return t2


def sinkhorn_fwd(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """``[..., n, n]`` logits -> doubly stochastic ``[..., n, n]`` (contiguous)."""
    n = logits.shape[-1]
    lg = _rows(logits.reshape(-1, n * n), n * n)
    out = torch.empty(logits.shape, dtype=logits.dtype)
    _call("mhc_sinkhorn_fwd", logits.dtype, _ptr(lg), lg.stride(0), _ptr(out), lg.shape[0], n, iters,
          torch.get_num_threads())
    return out


def sinkhorn_bwd(logits: torch.Tensor, grad: torch.Tensor, iters: int) -> torch.Tensor:
    """dL/dlogits ``[..., n, n]`` for :func:`sinkhorn_fwd` (recomputes the iterates per token)."""
    n = logits.shape[-1]
    lg = _rows(logits.reshape(-1, n * n), n * n)
    g = grad.reshape(-1, n * n).to(lg.dtype).contiguous()
    dst = torch.empty(logits.shape, dtype=lg.dtype)
    _call("mhc_sinkhorn_bwd", lg.dtype, _ptr(lg), lg.stride(0), _ptr(g), _ptr(dst), n * n, lg.shape[0], n, iters,
          torch.get_num_threads())
    return dst


def tail_fwd(z: torch.Tensor, bias: torch.Tensor, gates: torch.Tensor, n: int, iters: int):
    """``z [T, K]`` -> ``(h_pre [T, n], h_post [T, n], h_res [T, n, n] or None for IDENTITY)``; see ``mhc_cpu.c``."""
    t, dt = z.shape[0], z.dtype
    z, bias, gates = z.contiguous(), bias.to(dt).contiguous(), gates.to(dt).contiguous()
    h_pre, h_post = torch.empty(t, n, dtype=dt), torch.empty(t, n, dtype=dt)
    h_res = None if iters == IDENTITY else torch.empty(t, n, n, dtype=dt)
    _call("mhc_tail_fwd", dt, _ptr(z), _ptr(bias), _ptr(gates), _ptr(h_pre), _ptr(h_post), _ptr(h_res), t, n,
          iters, torch.get_num_threads())
    return h_pre, h_post, h_res


def tail_bwd(z: torch.Tensor, bias: torch.Tensor, gates: torch.Tensor, g_pre, g_post, g_res, n: int, iters: int):
    """``da [T, K]`` from the gradients of ``h_pre``, ``h_post``, ``h_res`` (each may be None)."""
    t, dt = z.shape[0], z.dtype
    z, bias, gates = z.contiguous(), bias.to(dt).contiguous(), gates.to(dt).contiguous()

    def flat(g, w):
        return None if g is None else g.reshape(t, w).to(dt).contiguous()

    g_pre, g_post, g_res = flat(g_pre, n), flat(g_post, n), flat(g_res, n * n)
    da = torch.empty_like(z)
    _call("mhc_tail_bwd", dt, _ptr(z), _ptr(bias), _ptr(gates), _ptr(g_pre), _ptr(g_post), _ptr(g_res), _ptr(da),
          t, n, iters, torch.get_num_threads())
    return da


# ---- stream read / write-back: x [T, n, C], y / u [T, C]; coefficients (and their gradients) of
# coef_dtype(x.dtype), stream tensors (and their gradients) of x's dtype -----------------------------


def _c(t: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor | None:
    """``t`` as a contiguous ``dt`` tensor (itself when it already is: no dispatch on the hot path)."""
    if t is None:
        return None
    if t.dtype is not dt:
        t = t.to(dt)
    return t if t.is_contiguous() else t.contiguous()


def _gx(x: torch.Tensor, need: bool, gx_out: torch.Tensor | None) -> torch.Tensor | None:
    """The stream gradient's buffer of a backward kernel: ``gx_out`` (checked: contiguous, ``x``'s shape
    and dtype; it may be the kernel's output-gradient operand, which every such kernel reads for a
    token before writing the token's rows) or a new one; None without ``need``."""
    if not need:
        return None
    if gx_out is None:
        return torch.empty(x.shape, dtype=x.dtype)
    if not (gx_out.shape == x.shape and gx_out.dtype is x.dtype and gx_out.is_contiguous()):
        raise ValueError(f"gx_out: got {tuple(gx_out.shape)} {gx_out.dtype} (contiguous: {gx_out.is_contiguous()}); "
                         f"expected a contiguous tensor of x's shape {tuple(x.shape)} and dtype {x.dtype}")
    return gx_out


def pre_fwd(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``u [..., C] = sum_j h[..., j] x[..., j, :]``."""
    n, c, dt = x.shape[-2], x.shape[-1], x.dtype
    x3, h2 = x.reshape(-1, n, c).contiguous(), _c(h.reshape(-1, n), _COEF[dt])
    u = torch.empty(x.shape[:-2] + (c,), dtype=dt)
    _call("mhc_pre_fwd", dt, _ptr(x3), _ptr(h2), _ptr(u), x3.shape[0], n, c, torch.get_num_threads())
    return u


def pre_bwd(x: torch.Tensor, h: torch.Tensor | None, gu: torch.Tensor, need_x: bool, need_h: bool):
    """``(dL/dx or None, dL/dh [..., n] or None)`` for :func:`pre_fwd` (``h`` only read for dL/dx)."""
    n, c, dt = x.shape[-2], x.shape[-1], x.dtype
    cd = _COEF[dt]
    x3, g2 = x.reshape(-1, n, c).contiguous(), _c(gu.reshape(-1, c), dt)
    h2 = _c(h.reshape(-1, n), cd) if need_x else None
    gx = torch.empty(x.shape, dtype=dt) if need_x else None
    gh = torch.empty(x.shape[:-1], dtype=cd) if need_h else None
    _call("mhc_pre_bwd", dt, _ptr(x3), _ptr(h2), _ptr(g2), _ptr(gx), _ptr(gh), x3.shape[0], n, c,
          torch.get_num_threads())
    return gx, gh


def read_bwd(x: torch.Tensor, h_pre: torch.Tensor, h_res: torch.Tensor, gu, g, need_x: bool, need_pre: bool,
             need_res: bool, gx_out: torch.Tensor | None = None):
    """``(dx, dh_pre, dh_res)`` (None where not needed or without a gradient to make it from) of the read
    ``u = sum_j h_pre[j] x[j]`` joined by its write-back's stream gradient ``h_res^T g`` (``g`` the
    write-back's output gradient, or None; ``gu`` the read's, or None): one pass over the tokens.
    float32 / float64 streams with coefficients of their dtype, or 2-byte streams with float32
    coefficients (dx of the streams' dtype, dh_pre / dh_res of the coefficients'). ``gx_out``: dx's
    buffer (as :func:`coeffs_bwd`'s; it may be ``g`` itself)."""
    n, c, dt = x.shape[-2], x.shape[-1], x.dtype
    cd = _COEF[dt]
    x, hp, hr, gu, g = _c(x, dt), _c(h_pre, cd), _c(h_res, cd), _c(gu, dt), _c(g, dt)
    gx = _gx(x, need_x, gx_out)
    gp = torch.empty(x.shape[:-1], dtype=cd) if need_pre and gu is not None else None
    gr = torch.empty(x.shape[:-1] + (n,), dtype=cd) if need_res and g is not None else None
    _call("mhc_read_bwd", dt, _ptr(x), _ptr(hp), _ptr(hr), _ptr(gu), _ptr(g), _ptr(gx), _ptr(gp), _ptr(gr),
          _tokens(x), n, c, torch.get_num_threads())
    return gx, gp, gr


# ---- Hyper-Connections' dynamic coefficients with the read (arXiv 2409.19606; see mhc_cpu_hc.h) ----


def hc_fwd(x: torch.Tensor, w_pre: torch.Tensor, w_post: torch.Tensor, w_res: torch.Tensor, sp: torch.Tensor,
           spo: torch.Tensor, sr: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, eps: float):
    """``x [..., n, C]``, the dynamic weights ``w_pre``, ``w_post [C]``, ``w_res [C, n]``, the static
    terms ``sp``, ``spo [n]``, ``sr [n, n]`` and the scales ``sa`` (alpha), ``sb`` (beta) (one value each)
    -> ``(u [..., C], h_pre [..., n], h_post [..., n], h_res [..., n, n], z [T, n, n + 2], r [T, n])``
    (the parameters as HCCoefficients holds them; float32 / float64 streams with everything of their
    dtype, or 2-byte streams and u with float32 parameters and coefficients)."""
    lead, n, c, dt = x.shape[:-2], x.shape[-2], x.shape[-1], x.dtype
    cd = _COEF[dt]
    x, wp, wq, wr = _c(x, dt), _c(w_pre, cd), _c(w_post, cd), _c(w_res, cd)
    sp, spo, sr, sa, sb = _c(sp, cd), _c(spo, cd), _c(sr, cd), _c(sa, cd), _c(sb, cd)
    t = _tokens(x)
    z, r = torch.empty(t, n, n + 2, dtype=cd), torch.empty(t, n, dtype=cd)
    h_pre, h_post = torch.empty(lead + (n,), dtype=cd), torch.empty(lead + (n,), dtype=cd)
    h_res, u = torch.empty(lead + (n, n), dtype=cd), torch.empty(lead + (c,), dtype=dt)
    _call("mhc_hc_fwd", dt, _ptr(x), _ptr(wp), _ptr(wq), _ptr(wr), _ptr(sp), _ptr(spo), _ptr(sr), _ptr(sa), _ptr(sb),
          float(eps), _ptr(z), _ptr(r), _ptr(h_pre), _ptr(h_post), _ptr(h_res), _ptr(u), t, n, c,
          torch.get_num_threads())
    return u, h_pre, h_post, h_res, z, r


def hc_bwd(x, gu, g_out, z, r, w_pre, w_post, w_res, sp, sr, sa, sb, g_pre, g_post, g_res, need_x: bool,
           gx_out: torch.Tensor | None = None):
    """``(dx or None, dw_pre [C], dw_post [C], dw_res [C, n], dsp [n], dspo [n], dsr [n, n], dsa [], dsb [])``
    of :func:`hc_fwd` given the gradients of u (``gu``), of the coefficients and, with ``g_out``, the
    output gradient of the write-back ``h_res x + h_post y`` (whose ``dx`` and ``dh_res`` join here);
    any may be None. The scales' gradients have ``sa``'s / ``sb``'s shape; dtypes as in :func:`hc_fwd`
    (stream gradients of the streams' dtype, the rest of the coefficients'). ``gx_out``: dx's buffer (as
    :func:`coeffs_bwd`'s; it may be ``g_out`` itself)."""
    n, c, dt = x.shape[-2], x.shape[-1], x.dtype
    cd = _COEF[dt]
    x, wp, wq, wr = _c(x, dt), _c(w_pre, cd), _c(w_post, cd), _c(w_res, cd)
    sp, sr, sa, sb = _c(sp, cd), _c(sr, cd), _c(sa, cd), _c(sb, cd)
    gu, g_out, g_pre, g_post, g_res = _c(gu, dt), _c(g_out, dt), _c(g_pre, cd), _c(g_post, cd), _c(g_res, cd)
    gx = _gx(x, need_x, gx_out)
    dwp, dwq, dwr = torch.empty(c, dtype=cd), torch.empty(c, dtype=cd), torch.empty(c, n, dtype=cd)
    dsp, dspo, dsr = torch.empty(n, dtype=cd), torch.empty(n, dtype=cd), torch.empty(n, n, dtype=cd)
    dsa, dsb = torch.empty(sa.shape, dtype=cd), torch.empty(sb.shape, dtype=cd)
    _call("mhc_hc_bwd", dt, _ptr(x), _ptr(gu), _ptr(g_out), _ptr(z), _ptr(r), _ptr(wp), _ptr(wq), _ptr(wr), _ptr(sp),
          _ptr(sr), _ptr(sa), _ptr(sb), _ptr(g_pre), _ptr(g_post), _ptr(g_res), _ptr(gx), _ptr(dwp), _ptr(dwq),
          _ptr(dwr), _ptr(dsp), _ptr(dspo), _ptr(dsr), _ptr(dsa), _ptr(dsb), _tokens(x), n, c,
          torch.get_num_threads())
    return gx, dwp, dwq, dwr, dsp, dspo, dsr, dsa, dsb


def _tokens(x: torch.Tensor) -> int:
    """``T``: the number of ``[n, C]`` rows of streams ``x [..., n, C]`` (n, C >= 1)."""
    return x.numel() // (x.shape[-2] * x.shape[-1])


def post_res_fwd(x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor | None) -> torch.Tensor:
    """``out[..., k, :] = h_post[..., k] y + sum_j h_res[..., k, j] x[..., j, :]`` (shaped as ``x``;
    ``h_res = None``: the identity, ``x[..., k, :] + h_post[..., k] y``)."""
    n, c, dt = x.shape[-2], x.shape[-1], x.dtype
    x, y, hp, hr = _c(x, dt), _c(y, dt), _c(h_post, _COEF[dt]), _c(h_res, _COEF[dt])
    out = torch.empty(x.shape, dtype=dt)
    _call("mhc_post_res_fwd", dt, _ptr(x), _ptr(y), _ptr(hp), _ptr(hr), _ptr(out), _tokens(x), n, c,
          torch.get_num_threads())
    return out


def post_res_bwd(x, y, h_post, h_res, g, need: tuple[bool, bool, bool, bool]):
    """``(dx, dy, dh_post, dh_res)`` (None where ``need`` is False) for :func:`post_res_fwd`."""
    n, c, dt = x.shape[-2], x.shape[-1], x.dtype
    cd = _COEF[dt]
    x3 = x.reshape(-1, n, c).contiguous()
    y2, hp, hr = _c(y.reshape(-1, c), dt), _c(h_post.reshape(-1, n), cd), _c(h_res.reshape(-1, n, n), cd)
    g3 = _c(g.reshape(-1, n, c), dt)
    gx = torch.empty(x.shape, dtype=dt) if need[0] else None
    gy = torch.empty(y.shape, dtype=dt) if need[1] else None
    gp = torch.empty(h_post.shape, dtype=cd) if need[2] else None
    gr = torch.empty(h_res.shape, dtype=cd) if need[3] else None
    _call("mhc_post_res_bwd", dt, _ptr(x3), _ptr(y2), _ptr(hp), _ptr(hr), _ptr(g3), _ptr(gx), _ptr(gy), _ptr(gp),
          _ptr(gr), x3.shape[0], n, c, torch.get_num_threads())
    return gx, gy, gp, gr


def post_bwd(y: torch.Tensor, h_post: torch.Tensor, g: torch.Tensor, need_y: bool, need_post: bool):
    """``(dy, dh_post)`` (None where not needed) of :func:`post_res_fwd`: the part of its backward
    that does not read ``x`` (one pass over ``g``)."""
    n, c, dt = g.shape[-2], g.shape[-1], g.dtype
    y, hp, g = _c(y, dt), _c(h_post, _COEF[dt]), _c(g, dt)
    gy = torch.empty(y.shape, dtype=dt) if need_y else None
    gp = torch.empty(hp.shape, dtype=_COEF[dt]) if need_post else None
    _call("mhc_post_res_bwd", dt, None, _ptr(y), _ptr(hp), None, _ptr(g), None, _ptr(gy), _ptr(gp), None,
          _tokens(g), n, c, torch.get_num_threads())
    return gy, gp


# ---- mHC coefficients: RMS, projection, tail and the branch read in one call each way -------------


# Up to this width n*C and this many columns K = n^2 + 2n the kernels run the projection matmuls
# with phi themselves (x is then read once); wider, or with more columns, BLAS does them for fp32 /
# fp64 streams. PROJECT_MAX_COLUMNS None: 48 (n <= 6) for fp32 streams where the matmuls run in the
# AVX-512 blocks, else 24 (n <= 4). From `python -m benchmarks.bench_route` (coefficient op, fp32,
# forward + backward, 1024 tokens, C = 64-512, 2 threads; results/route_cpu*.md; BLAS uses AVX-512 on
# that CPU): with the portable AVX2 blocks the kernel and BLAS are within ~8 % of each other at n = 4,
# and BLAS is 1.11-1.22x / 1.20-1.28x / 1.35-2.33x faster at n = 5 / 6 / 8; with the AVX-512 blocks the
# kernel is 1.16-1.20x faster at n = 4 up to C = 256 (BLAS 1.06x at C = 512), 1.09-1.23x at n = 5, even
# at n = 6, and BLAS 1.10-1.61x faster at n = 8. 2-byte streams always stay in the kernel (x converted
# once, gx rounded once). Module-level so that tests can move them.
PROJECT_MAX_WIDTH = 4096
PROJECT_MAX_COLUMNS: int | None = None


def _project_here(n: int, c: int, k: int, dt: torch.dtype) -> bool:
    """Whether the coefficient kernels run the matmuls with phi (else BLAS, around the kernel call)."""
    cols = PROJECT_MAX_COLUMNS
    if cols is None:
        cols = 48 if _STATE.get("zmm") and dt is torch.float32 else 24
    return (n * c <= PROJECT_MAX_WIDTH and k <= cols) or dt in _HALVES


def coeffs_fwd(x: torch.Tensor, phi: torch.Tensor, bias: torch.Tensor, gates: torch.Tensor, rms_eps: float,
               iters: int, with_u: bool):
    """``x [..., n, C]`` -> ``(h_pre [..., n], h_post [..., n], h_res [..., n, n] (None for IDENTITY), r [T, 1],
    z [T, K], u [..., C] or None)`` with ``z = (v @ phi) / r``; see ``mhc_cpu_coeffs.h``."""
    lead, n, c, dt = x.shape[:-2], x.shape[-2], x.shape[-1], x.dtype
    cd = _COEF[dt]  # the coefficients' dtype; u is of the streams'
    x, bias, gates, phi = _c(x, dt), _c(bias, cd), _c(gates, cd), _c(phi, cd)  # kept referenced until the call returns
    t = _tokens(x)
    if _project_here(n, c, phi.shape[1], dt):  # 2-byte streams: always here (x read once, in float)
        z, phi_arg = torch.empty(t, phi.shape[1], dtype=cd), _ptr(phi)
    else:
        z, phi_arg = x.view(t, n * c) @ phi, None
    r = torch.empty(t, 1, dtype=cd)
    h_pre, h_post = torch.empty(lead + (n,), dtype=cd), torch.empty(lead + (n,), dtype=cd)
    h_res = None if iters == IDENTITY else torch.empty(lead + (n, n), dtype=cd)
    u = torch.empty(lead + (c,), dtype=dt) if with_u else None
    _call("mhc_coeffs_fwd", dt, _ptr(x), phi_arg, _ptr(z), _ptr(bias), _ptr(gates), float(rms_eps), _ptr(r),
          _ptr(h_pre), _ptr(h_post), _ptr(h_res), _ptr(u), t, n, c, iters, torch.get_num_threads())
    return h_pre, h_post, h_res, r, z, u


def coeffs_bwd(x: torch.Tensor, gu, z: torch.Tensor, r: torch.Tensor, phi: torch.Tensor, bias: torch.Tensor,
               gates: torch.Tensor, g_pre, g_post, g_res, iters: int, need_x: bool, need_phi: bool, g_out=None,
               gx_out: torch.Tensor | None = None):
    """``(gx [..., n, C] or None, dphi [nC, K] or None, dbias [K], dalpha [3])`` of the coefficients of
    ``x [..., n, C]`` (and, with ``gu``, of the read ``u``; with ``g_out`` [..., n, C], the output
    gradient of the write-back ``h_res x + h_post y``, of that write-back's ``x`` and ``h_res``); the
    gradients are laid out as the forward's outputs; see ``mhc_cpu_coeffs.h``. ``gx_out``: a contiguous
    tensor of ``x``'s shape and dtype to write ``gx`` into (with ``need_x``), which may be ``g_out``
    itself (the kernel reads a token's ``g_out`` rows before writing its ``gx`` rows)."""
    n, c, dt = x.shape[-2], x.shape[-1], x.dtype
    k, cd = z.shape[-1], _COEF[dt]  # stream tensors of dt, the rest of cd
    x, z, r, phi, bias, gates = _c(x, dt), _c(z, cd), _c(r, cd), _c(phi, cd), _c(bias, cd), _c(gates, cd)
    gu, g_pre, g_post, g_res, g_out = _c(gu, dt), _c(g_pre, cd), _c(g_post, cd), _c(g_res, cd), _c(g_out, dt)
    t = _tokens(x)
    # the matmuls with phi in the kernel, else in BLAS below; 2-byte streams always here (gx rounded once)
    here = _project_here(n, c, k, dt)
    gzr = None if here else torch.empty(t, k, dtype=cd)
    gx = _gx(x, need_x, gx_out)
    dphi = torch.empty(n * c, k, dtype=cd) if here and need_phi else None
    dbias, dalpha = torch.empty(k, dtype=cd), torch.empty(3, dtype=cd)
    _call("mhc_coeffs_bwd", dt, _ptr(x), _ptr(gu), _ptr(g_out), _ptr(z), _ptr(r), _ptr(bias), _ptr(gates), _ptr(g_pre),
          _ptr(g_post), _ptr(g_res), _ptr(phi if here else None), _ptr(gzr), _ptr(gx), _ptr(dphi), _ptr(dbias),
          _ptr(dalpha), t, n, c, iters, torch.get_num_threads())
    if not here:
        if need_phi:
            dphi = x.view(t, n * c).t() @ gzr
        if gx is not None:
            gx.view(t, n * c).addmm_(gzr, phi.t())
    return gx, dphi, dbias, dalpha

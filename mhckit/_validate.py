"""Input checks shared by the reference, the functional API and the modules.

Every check raises ``ValueError`` naming the argument, what was given and what is allowed. They
only read shapes and dtypes (no data), so they cost nothing on the hot path and trace cleanly
under ``torch.compile``. The one data check, for NaN / Inf (:class:`check_finite`), is opt-in.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

MAX_STREAMS = 64


def _fail(name: str, given: object, allowed: str) -> None:
    raise ValueError(f"{name}: got {given}; expected {allowed}")


def check_float(t: Tensor, name: str) -> None:
    """``t`` must be a floating-point tensor."""
    if not isinstance(t, Tensor):
        _fail(name, type(t).__name__, "a torch.Tensor")
    if not t.is_floating_point():
        _fail(f"{name}.dtype", t.dtype, "a floating dtype (float16, bfloat16, float32, float64)")


def check_streams(x: Tensor, name: str = "x") -> tuple[int, int]:
    """``x`` must be float streams ``[..., n, C]``; returns ``(n, C)``."""
    check_float(x, name)
    if x.dim() < 2:
        _fail(f"{name}.shape", tuple(x.shape), "streams of shape [..., n, C] (at least 2 dims)")
    n, c = x.shape[-2], x.shape[-1]
    check_n_streams(n, f"{name}.shape[-2] (n_streams)")
    if c < 1:
        _fail(f"{name}.shape[-1] (C)", c, "C >= 1")
    return n, c


def check_n_streams(n: object, name: str = "n_streams") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_STREAMS:
        _fail(name, repr(n), f"an int in [1, {MAX_STREAMS}]")
    return n


def check_square(t: Tensor, name: str) -> int:
    check_float(t, name)
    if t.dim() < 2 or t.shape[-1] != t.shape[-2] or t.shape[-1] < 1:
        _fail(f"{name}.shape", tuple(t.shape), "[..., n, n] with n >= 1")
    return t.shape[-1]


def check_iters(iters: object) -> int:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        _fail("iters", repr(iters), "an int >= 1")
    return iters


def check_phi_bias(phi: Tensor, bias: Tensor, n: int, c: int, res_logits: int | None) -> int:
    """Check ``phi [n*C, 2n+k]`` and ``bias [2n+k]``; ``k`` fixed by ``res_logits`` or free. Returns k."""
    check_float(phi, "phi")
    check_float(bias, "bias")
    if phi.dim() != 2 or phi.shape[0] != n * c:
        want = f"[n*C, 2n+k] = [{n * c}, ...] for n={n}, C={c}"
        if res_logits is not None:
            want = f"[n*C, 2n + {res_logits}] = [{n * c}, {2 * n + res_logits}] for n={n}, C={c}"
        _fail("phi.shape", tuple(phi.shape), want)
    cols = phi.shape[1]
    if res_logits is not None and cols != 2 * n + res_logits:
        _fail("phi.shape", tuple(phi.shape), f"[{n * c}, {2 * n + res_logits}] (n={n}, C={c})")
    if cols < 2 * n:
        _fail("phi.shape[1]", cols, f"at least 2n = {2 * n} columns [pre | post | res]")
    if tuple(bias.shape) != (cols,):
        _fail("bias.shape", tuple(bias.shape), f"({cols},) to match phi.shape[1]")
    return cols - 2 * n


def check_alpha(alpha: Tensor) -> None:
    check_float(alpha, "alpha")
    if tuple(alpha.shape) != (3,):
        _fail("alpha.shape", tuple(alpha.shape), "(3,) = (alpha_pre, alpha_post, alpha_res)")


def check_coefficient(t: Tensor, name: str, shape: Sequence[int]) -> None:
    check_float(t, name)
    if tuple(t.shape) != tuple(shape):
        _fail(f"{name}.shape", tuple(t.shape), f"{tuple(shape)} (from the streams x)")


def check_choice(value: object, name: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        _fail(name, repr(value), "one of " + ", ".join(repr(a) for a in allowed))
    return value  # type: ignore[return-value]


def check_positive(value: object, name: str, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        _fail(name, repr(value), "a positive " + ("int" if integer else "finite number"))


def check_number(
    value: object, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> float:
    """``value`` must be a finite real number (not a bool) in the interval ``lo .. hi``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        _fail(name, repr(value), f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
    return value  # type: ignore[return-value]


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        _fail(name, repr(value), "True or False")
    return value


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: coefficients are never computed in half."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------- opt-in finite check
# Off by default: the functional API then pays one bool test per op. On, every op checks its
# tensor inputs and outputs with ``isfinite`` (a reduction and a host sync per tensor), so it is a
# debugging aid for eager mode; under torch.compile a check that is on breaks the graph.

_FINITE_CHECK = [os.environ.get("MHCKIT_CHECK_FINITE", "0").lower() in ("1", "true", "on", "yes")]


class NonFiniteError(ValueError):
    """A tensor with NaN or Inf values reached (or left) an op while :class:`check_finite` is on."""


class check_finite:
    """Turn the NaN / Inf check of the functional API (and so of the modules) on or off.

    ``mhckit.check_finite(True)`` switches it on for the process; ``with mhckit.check_finite():``
    switches it on for a block and restores the previous setting on exit (``check_finite(False)``
    likewise switches it off). The initial setting comes from ``MHCKIT_CHECK_FINITE=1``. The flag is
    process-wide (not per thread). With the check on, an op raises :class:`NonFiniteError` naming
    the op, the argument (or output) and how many of its values are NaN or Inf.
    """

    def __init__(self, enabled: bool = True):
        if not isinstance(enabled, bool):
            _fail("check_finite(enabled)", repr(enabled), "True or False")
        self.previous = _FINITE_CHECK[0]
        _FINITE_CHECK[0] = enabled

    def __enter__(self) -> check_finite:
        return self

    def __exit__(self, *exc) -> None:
        _FINITE_CHECK[0] = self.previous


def finite_check_enabled() -> bool:
    """Whether :class:`check_finite` is on."""
    return _FINITE_CHECK[0]


def assert_finite(op: str, what: str, value: object) -> None:
    """Raise :class:`NonFiniteError` if ``value`` (a tensor, or a tuple / list of them) has NaN or Inf."""
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            assert_finite(op, f"{what}[{i}]", v)
        return
    if not isinstance(value, Tensor) or not value.is_floating_point() or bool(torch.isfinite(value).all()):
        return
    t = value.detach()
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    raise NonFiniteError(
        f"{op}: {what}: got {nan + inf} non-finite values of {t.numel()} ({nan} NaN, {inf} Inf, shape "
        f"{tuple(t.shape)}); expected all finite (mhckit.check_finite is on)"
    )


def finite_checked(*names: str, outputs: str | Sequence[str] = "output", op: str | None = None):
    """Decorator for a functional op: when :class:`check_finite` is on, check the tensor arguments
    ``names`` (positional order, or by keyword) before the op and its result after it. Errors name
    the op ``op`` (default: the function's name)."""

    def wrap(fn):
        name_of_op = op or fn.__name__

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            if not _FINITE_CHECK[0]:
                return fn(*args, **kwargs)
            for name, value in zip(names, args):
                assert_finite(name_of_op, f"input {name!r}", value)
            for name in names[len(args):]:
                if name in kwargs:
                    assert_finite(name_of_op, f"input {name!r}", kwargs[name])
            out = fn(*args, **kwargs)
            if isinstance(out, tuple) and not isinstance(outputs, str):
                for name, value in zip(outputs, out):
                    assert_finite(name_of_op, f"output {name!r}", value)
            else:
                assert_finite(name_of_op, f"output {outputs!r}", out)
            return out

        return checked

    return wrap

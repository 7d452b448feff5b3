"""Input checks shared by the reference, the functional API and the modules.

Every check raises ``ValueError`` naming the argument, what was given and what is allowed. They
only read shapes and dtypes (no data), so they cost nothing on the hot path and trace cleanly
under ``torch.compile``.
"""

from __future__ import annotations

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
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        _fail(name, repr(value), "a positive " + ("int" if integer else "number"))


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: coefficients are never computed in half."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32

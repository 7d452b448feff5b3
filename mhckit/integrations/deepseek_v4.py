"""DeepSeek-V4 hyper-connections as mhckit modules, and weight interop with ``transformers``.

DeepSeek-V4 (arXiv 2606.19348) ships mHC (arXiv 2512.24880). ``transformers`` implements it in
``models/deepseek_v4/modeling_deepseek_v4.py`` as ``DeepseekV4HyperConnection`` (two per decoder layer,
``layers.{i}.attn_hc`` and ``layers.{i}.ffn_hc``; parameters ``fn``, ``base``, ``scale``) and
``DeepseekV4HyperHead`` (``hc_head``, the final collapse; ``hc_fn``, ``hc_base``, ``hc_scale``). This
file reproduces that arithmetic (the ``deepseek_v4`` flavour) with mhckit's interface and converts
weights both ways. Per token, with streams ``x: [n, C]`` and ``v = flatten(x)``:

    v' = v * rsqrt(mean(v^2) + rms_eps)                   RMS first (their unweighted RMSNorm, rms_norm_eps)
    z  = v' @ phi                                         [pre (n) | post (n) | res (n*n)]
    h_pre  = sigmoid(alpha[0] * z_pre  + b_pre) + hc_eps
    h_post = 2 * sigmoid(alpha[1] * z_post + b_post)      (no eps)
    h_res  = deepseek_v4_sinkhorn(alpha[2] * z_res + b_res, iters, hc_eps)
    u = sum_j h_pre[j] x[j];  x_new[k] = sum_j h_res[k, j] x[j] + h_post[k] * y

Conventions (where DeepSeek-V4 differs from mhckit's ``mhc``; each is tested against transformers):
    * ``comb`` vs ``h_res``: transformers returns ``comb[j, k]``, the weight of old stream ``j`` in new
      stream ``k`` (its decoder layer computes ``comb^T @ x``). mhckit's ``h_res[k, j]`` acts from the
      left, so ``h_res = comb^T``. Their Sinkhorn normalises comb's columns last, i.e. h_res's rows:
      as in mhckit, row sums (the forward gain) are the exact side.
    * Layout: ``fn: [(2+n)n, nC]`` is the transpose of ``phi: [nC, (2+n)n]``; rows ``[pre | post | comb]``
      with comb row-major, so comb logit ``(j, k)`` (row ``2n + j*n + k``) is mhckit's res logit
      ``(k, j)`` (column ``2n + k*n + j``). ``base`` is permuted the same way; ``scale[0..2]`` is
      ``alpha = (alpha_pre, alpha_post, alpha_res)`` as is. The head's ``hc_scale: [1]`` is
      :class:`~mhckit.StreamHead`'s scalar ``scale: []``.
    * eps: ``h_pre`` gets ``+ hc_eps``; the Sinkhorn adds ``hc_eps`` after its softmax and to every
      divisor; the RMS uses ``rms_norm_eps``. mhckit's ``mhc`` has none of the ``hc_eps`` terms.
    * Precision: coefficients in float32 (float64 for float64 input). In bf16 transformers casts
      ``post`` and ``comb`` to bf16 before mixing; mhckit mixes in float32 and rounds once, so bf16
      outputs agree to bf16 rounding, not bit for bit. In float32 they agree to ~1e-6.

Conversions: :func:`fn_to_phi` / :func:`phi_to_fn`, :func:`load_deepseek_v4` / :func:`export_deepseek_v4`
(state dicts, optional key prefix), :func:`load_deepseek_v4_model` (every hyper-connection of a
checkpoint, transformers or original DeepSeek key names), :func:`from_transformers` /
:func:`to_transformers`: all exact (bit for bit). :func:`from_mhc` / :func:`to_mhc` (mhckit's own
``mhc`` modules): parameters exact; the function differs by the ``hc_eps`` terms only (with
``hc_eps=0`` equal up to float rounding). ``transformers`` is imported only by the ``*_transformers``
functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .. import functional as F
from .._validate import check_choice, check_iters, check_n_streams, check_streams, compute_dtype
from ..config import INITS, MHCConfig
from ..constraints import SinkhornConstraint
from ..modules import DynamicCoefficients, HyperConnection, StreamHead

__all__ = [
    "DeepSeekV4Coefficients",
    "DeepSeekV4HyperConnection",
    "DeepSeekV4HyperHead",
    "deepseek_v4_sinkhorn",
    "deepseek_v4_coeffs",
    "deepseek_v4_head_weights",
    "fn_to_phi",
    "phi_to_fn",
    "load_deepseek_v4",
    "load_deepseek_v4_model",
    "export_deepseek_v4",
    "from_transformers",
    "to_transformers",
    "from_mhc",
    "to_mhc",
]

# Defaults of transformers' DeepseekV4Config (hc_sinkhorn_iters, hc_eps, rms_norm_eps, initializer_range).
DEFAULT_ITERS, DEFAULT_HC_EPS, DEFAULT_RMS_EPS, DEFAULT_INIT_STD = 20, 1e-6, 1e-6, 0.02
HC_KEYS = ("fn", "base", "scale")
HEAD_KEYS = ("hc_fn", "hc_base", "hc_scale")
INIT_CHOICES = ("deepseek",) + INITS  # "deepseek": transformers' _init_weights (fn ~ N(0, std), base 0, scale 1)
NAMINGS = ("transformers", "deepseek")


# ----------------------------------------------------------------------------- the arithmetic


def _divisor(s: Tensor, eps: float) -> Tensor:
    return s + eps if eps > 0 else s.clamp_min(torch.finfo(s.dtype).tiny)


def deepseek_v4_sinkhorn(logits: Tensor, iters: int = DEFAULT_ITERS, eps: float = DEFAULT_HC_EPS) -> Tensor:
    """DeepSeek-V4's Sinkhorn, written in mhckit's ``h_res`` convention (``[..., n, n]`` -> same).

    ``M = softmax over each column + eps``; ``M /= row sums + eps``; then ``iters - 1`` times
    (columns, rows), every divisor ``+ eps``. This is transformers' loop on ``comb = h_res^T``
    (softmax over comb's rows, comb columns last). With ``eps = 0`` it is
    :func:`mhckit.reference.sinkhorn` exactly.
    """
    check_iters(iters)
    m = torch.softmax(logits.to(compute_dtype(logits)), dim=-2) + eps
    m = m / _divisor(m.sum(dim=-1, keepdim=True), eps)
    for _ in range(iters - 1):
        m = m / _divisor(m.sum(dim=-2, keepdim=True), eps)  # columns
        m = m / _divisor(m.sum(dim=-1, keepdim=True), eps)  # rows, last: row sums exact
    return m


def _normalised(x: Tensor, w: Tensor, rms_eps: float) -> Tensor:
    """``v * rsqrt(mean(v^2) + eps)`` of ``v = flatten(x)`` (``[..., n, C] -> [..., nC]``), compute dtype."""
    n, c = x.shape[-2], x.shape[-1]
    v = x.reshape(*x.shape[:-2], n * c).to(compute_dtype(x, w))
    return v * torch.rsqrt(v.square().mean(dim=-1, keepdim=True) + rms_eps)


def deepseek_v4_coeffs(
    x: Tensor,
    phi: Tensor,
    bias: Tensor,
    alpha: Tensor,
    *,
    iters: int = DEFAULT_ITERS,
    hc_eps: float = DEFAULT_HC_EPS,
    rms_eps: float = DEFAULT_RMS_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(h_pre [..., n], h_post [..., n], h_res [..., n, n])`` of transformers' ``DeepseekV4HyperConnection``.

    ``phi: [nC, (2+n)n]``, ``bias``, ``alpha: [3]`` in mhckit's layout (see :func:`fn_to_phi`).
    """
    n, c = check_streams(x, "x")
    _check_shape(phi, "phi", (n * c, (2 + n) * n), f"[n*C, (2+n)*n] for n={n}, C={c}")
    _check_shape(bias, "bias", ((2 + n) * n,), f"[(2+n)*n] for n={n}")
    _check_shape(alpha, "alpha", (3,), "(alpha_pre, alpha_post, alpha_res)")
    dt = compute_dtype(x, phi)
    z = _normalised(x, phi, rms_eps) @ phi.to(dt)  # [..., (2+n)n]
    alpha, bias = alpha.to(dt), bias.to(dt)
    h_pre = torch.sigmoid(z[..., :n] * alpha[0] + bias[:n]) + hc_eps
    h_post = 2 * torch.sigmoid(z[..., n : 2 * n] * alpha[1] + bias[n : 2 * n])
    a_res = z[..., 2 * n :] * alpha[2] + bias[2 * n :]
    return h_pre, h_post, deepseek_v4_sinkhorn(a_res.unflatten(-1, (n, n)), iters, hc_eps)


def deepseek_v4_head_weights(
    x: Tensor,
    fn: Tensor,
    base: Tensor,
    scale: Tensor,
    *,
    hc_eps: float = DEFAULT_HC_EPS,
    rms_eps: float = DEFAULT_RMS_EPS,
) -> Tensor:
    """``[..., n]`` collapse weights of ``DeepseekV4HyperHead``: ``sigmoid(scale * (v' @ fn^T) + base) + eps``."""
    dt = compute_dtype(x, fn)
    z = _normalised(x, fn, rms_eps) @ fn.to(dt).t()  # [..., n]
    return torch.sigmoid(z * scale.to(dt) + base.to(dt)) + hc_eps


# ----------------------------------------------------------------------------- layout


def _res_permutation(n: int) -> Tensor:
    """Row ``i`` of mhckit's layout comes from row ``perm[i]`` of DeepSeek-V4's (an involution).

    Pre and post rows stay; res row ``2n + k*n + j`` (``h_res[k, j]``) is comb row ``2n + j*n + k``.
    """
    res = torch.arange(n * n).view(n, n).t().reshape(-1)  # k*n + j -> j*n + k
    return torch.cat([torch.arange(2 * n), 2 * n + res])


def _n_from_rows(rows: int, name: str) -> int:
    n = round(math.sqrt(rows + 1) - 1)  # (2 + n) n = rows
    if n < 1 or (2 + n) * n != rows:
        raise ValueError(f"{name}: got {rows} rows; expected (2+n)*n for an integer n >= 1 (3, 8, 15, 24, 35, ...)")
    return n


def fn_to_phi(fn: Tensor, base: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DeepSeek-V4 ``(fn [(2+n)n, nC], base, scale [3])`` -> mhckit ``(phi [nC, (2+n)n], bias, alpha)``, exact."""
    n = _n_from_rows(fn.shape[0], "fn.shape[0]")
    perm = _res_permutation(n).to(fn.device)
    return fn.detach()[perm].t().contiguous(), base.detach()[perm].clone(), scale.detach().reshape(3).clone()


def phi_to_fn(phi: Tensor, bias: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """mhckit ``(phi, bias, alpha)`` -> DeepSeek-V4 ``(fn, base, scale)``, exact (inverse of :func:`fn_to_phi`)."""
    n = _n_from_rows(phi.shape[1], "phi.shape[1]")
    perm = _res_permutation(n).to(phi.device)
    return phi.detach().t()[perm].contiguous(), bias.detach()[perm].clone(), alpha.detach().reshape(3).clone()


# ----------------------------------------------------------------------------- modules


def _check_eps(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name}: got {value!r}; expected a number >= 0")
    return float(value)


class DeepSeekV4Coefficients(nn.Module):
    """Coefficients of the ``deepseek_v4`` flavour; parameters in mhckit's layout.

    ``phi: [nC, (2+n)n]``, ``bias: [(2+n)n]`` (res part row-major in ``h_res``, i.e. comb transposed),
    ``alpha: [3]``. ``init="deepseek"`` is transformers' ``_init_weights`` (``phi ~ N(0, init_std)``,
    bias 0, alpha 1); mhckit's presets (``"mean-preserving"``, ...) need ``n_streams >= 2``.
    """

    def __init__(
        self,
        dim: int,
        n_streams: int,
        *,
        sinkhorn_iters: int = DEFAULT_ITERS,
        hc_eps: float = DEFAULT_HC_EPS,
        rms_eps: float = DEFAULT_RMS_EPS,
        init: str = "deepseek",
        init_std: float = DEFAULT_INIT_STD,
        layer_index: int = 0,
    ):
        super().__init__()
        n = check_n_streams(n_streams)
        self.dim, self.n_streams = dim, n
        self.sinkhorn_iters, self.rms_eps = check_iters(sinkhorn_iters), rms_eps
        self.hc_eps = _check_eps(hc_eps, "hc_eps")
        self.phi = nn.Parameter(torch.zeros(n * dim, (2 + n) * n))
        self.bias = nn.Parameter(torch.zeros((2 + n) * n))
        self.alpha = nn.Parameter(torch.ones(3))
        self.reset_parameters(init, init_std, layer_index)

    @torch.no_grad()
    def reset_parameters(
        self, init: str = "deepseek", init_std: float = DEFAULT_INIT_STD, layer_index: int = 0
    ) -> None:
        check_choice(init, "init", INIT_CHOICES)
        n = self.n_streams
        if init == "deepseek":  # init_std=0 gives phi = 0 without drawing random numbers (loaders use it)
            self.phi.normal_(0.0, init_std) if init_std > 0 else self.phi.zero_()
            self.bias.zero_()
            self.alpha.fill_(1.0)
            return
        if n == 1:
            raise ValueError(f"init: got {init!r} with n_streams=1; expected 'deepseek' (mhckit's presets need n >= 2)")
        cfg = MHCConfig(n_streams=n, init=init, sinkhorn_iters=self.sinkhorn_iters)
        ref = DynamicCoefficients(self.dim, SinkhornConstraint(n, self.sinkhorn_iters), cfg, layer_index)
        for name in ("phi", "bias", "alpha"):
            getattr(self, name).copy_(getattr(ref, name))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_streams={self.n_streams}, iters={self.sinkhorn_iters}, "
            f"hc_eps={self.hc_eps}, rms_eps={self.rms_eps}"
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return deepseek_v4_coeffs(
            x, self.phi, self.bias, self.alpha, iters=self.sinkhorn_iters, hc_eps=self.hc_eps, rms_eps=self.rms_eps
        )


class DeepSeekV4HyperConnection(HyperConnection):
    """One DeepSeek-V4 hyper-connection sublayer with mhckit's interface (``forward``, ``split``).

    Reproduces ``DeepseekV4HyperConnection`` plus the mixing of ``DeepseekV4DecoderLayer``
    (transformers): ``x_new[k] = sum_j h_res[k, j] x[j] + h_post[k] y`` with ``h_res = comb^T``.
    Read and write-back use :func:`mhckit.functional.mhc_pre` / :func:`mhckit.functional.mhc_post_res`;
    the coefficients are :class:`DeepSeekV4Coefficients` (``self.coeffs``). Unlike mhckit's ``mhc``,
    one stream is not a plain residual: DeepSeek-V4's gates still apply. Works with
    :func:`mhckit.diagnostics.record_coefficients`. Weights: :func:`load_deepseek_v4`, :func:`from_transformers`.
    """

    def __init__(
        self,
        dim: int,
        branch=None,
        *,
        n_streams: int = 4,
        sinkhorn_iters: int = DEFAULT_ITERS,
        hc_eps: float = DEFAULT_HC_EPS,
        rms_eps: float = DEFAULT_RMS_EPS,
        layer_index: int = 0,
        init: str = "deepseek",
        init_std: float = DEFAULT_INIT_STD,
        backend: str = "auto",
    ):
        cfg = MHCConfig(
            variant="mhc", n_streams=n_streams, sinkhorn_iters=sinkhorn_iters, rms_eps=rms_eps, backend=backend
        )
        super().__init__(dim, branch, layer_index=layer_index, config=cfg)
        self.n_streams = n_streams  # also for n = 1, where cfg alone would mean a plain residual
        self.coeffs = DeepSeekV4Coefficients(
            dim, n_streams, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps, rms_eps=rms_eps,
            init=init, init_std=init_std, layer_index=layer_index,
        )  # fmt: skip

    @property
    def variant(self) -> str:
        return "deepseek_v4"

    @property
    def hc_eps(self) -> float:
        return self.coeffs.hc_eps

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_streams={self.n_streams}, variant='deepseek_v4', layer_index={self.layer_index}, "
            f"sinkhorn_iters={self.cfg.sinkhorn_iters}, hc_eps={self.hc_eps}"
        )

    def transformers_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """transformers' return convention: ``(post [..., n], comb [..., n, n] = h_res^T, collapsed [..., C])``."""
        h_pre, h_post, h_res = self.coefficients(x)
        return h_post, h_res.transpose(-1, -2), F.mhc_pre(x, h_pre, backend=self.cfg.backend)


class DeepSeekV4HyperHead(StreamHead):
    """``DeepseekV4HyperHead``: the final collapse ``[..., n, C] -> [..., C]``, ``sum_j w[j] x[j]``.

    ``w = sigmoid(scale * (v' @ fn^T) + base) + hc_eps`` with ``v'`` the RMS-normalised flattened
    streams. A :class:`~mhckit.StreamHead` (``fn [n, nC]``, ``base [n]``, ``scale []``), so
    ``reduce_streams(x, "head", head=...)`` accepts it; with one stream the gate still applies.
    ``init``: ``"deepseek"`` (transformers: ``fn ~ N(0, init_std)``, base 0, scale 1) or ``"mean"``
    (StreamHead's start, ``n >= 2``).
    """

    def __init__(
        self,
        dim: int,
        n_streams: int = 4,
        *,
        hc_eps: float = DEFAULT_HC_EPS,
        rms_eps: float = DEFAULT_RMS_EPS,
        init: str = "deepseek",
        init_std: float = DEFAULT_INIT_STD,
    ):
        check_choice(init, "init", ("deepseek", "mean"))
        if init == "mean" and n_streams == 1:
            raise ValueError("init: got 'mean' with n_streams=1; expected 'deepseek' (one stream needs no mean)")
        super().__init__(dim, n_streams, rms_eps=rms_eps)
        self.hc_eps = _check_eps(hc_eps, "hc_eps")
        if init == "deepseek":
            with torch.no_grad():
                self.fn.normal_(0.0, init_std) if init_std > 0 else self.fn.zero_()
                self.base.zero_()
                self.scale.fill_(1.0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_streams={self.n_streams}, hc_eps={self.hc_eps}, rms_eps={self.rms_eps}"

    def weights(self, x: Tensor) -> Tensor:
        n, c = check_streams(x, "x")
        if n != self.n_streams or c != self.dim:
            raise ValueError(f"x.shape: got {tuple(x.shape)}; expected [..., {self.n_streams}, {self.dim}]")
        return deepseek_v4_head_weights(x, self.fn, self.base, self.scale, hc_eps=self.hc_eps, rms_eps=self.rms_eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.mhc_pre(x, self.weights(x))


# ----------------------------------------------------------------------------- state dicts


def _check_shape(t: object, name: str, shape: tuple, why: str) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        given = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: got {given}; expected a floating-point tensor of shape {shape}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}.shape: got {tuple(t.shape)}; expected {tuple(shape)} ({why})")


def _take(sd: Mapping[str, Tensor], keys: tuple[str, ...]) -> list[Tensor]:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"state_dict: got no key {missing[0]!r}; expected all of {list(keys)}")
    return [sd[k] for k in keys]


def _settings(config, **given) -> dict:
    """Explicit arguments win, then a DeepseekV4Config-like ``config``, then transformers' defaults."""
    fields = {"n_streams": "hc_mult", "dim": "hidden_size", "sinkhorn_iters": "hc_sinkhorn_iters",
              "hc_eps": "hc_eps", "rms_eps": "rms_norm_eps"}  # fmt: skip
    defaults = {"n_streams": None, "dim": None, "sinkhorn_iters": DEFAULT_ITERS, "hc_eps": DEFAULT_HC_EPS,
                "rms_eps": DEFAULT_RMS_EPS}  # fmt: skip
    out = {}
    for name, attr in fields.items():
        value = given.get(name)
        if value is None and config is not None:
            value = getattr(config, attr, None)
        out[name] = defaults[name] if value is None else value
    return out


def _infer_n(s: dict, base: Tensor, key: str, head: bool) -> int:
    """``n`` from the settings, or from the base: ``[(2+n)n]`` for a hyper-connection, ``[n]`` for the head."""
    if s["n_streams"] is not None:
        return check_n_streams(s["n_streams"], "n_streams")
    want = "(n,)" if head else "((2+n)*n,) for an integer n >= 1 (3, 8, 15, 24, 35, ...)"
    if not isinstance(base, Tensor) or base.dim() != 1 or base.shape[0] < 1:
        raise ValueError(f"{key}.shape: got {tuple(getattr(base, 'shape', ()))}; expected {want}")
    return base.shape[0] if head else _n_from_rows(base.shape[0], f"{key}.shape[0]")


def _infer_dim(s: dict, fn: Tensor, key: str, rows: int, n: int) -> int:
    if s["dim"] is not None:
        return s["dim"]
    if not isinstance(fn, Tensor) or fn.dim() != 2 or fn.shape[1] % n or fn.shape[1] == 0:
        raise ValueError(f"{key}.shape: got {tuple(getattr(fn, 'shape', ()))}; expected ({rows}, n*C) with n={n}")
    return fn.shape[1] // n


def _load_hc(sd, keys, s: dict, **module_kwargs) -> DeepSeekV4HyperConnection:
    fn, base, scale = _take(sd, keys)
    n = _infer_n(s, base, keys[1], head=False)
    rows = (2 + n) * n
    c = _infer_dim(s, fn, keys[0], rows, n)
    _check_shape(fn, keys[0], (rows, n * c), f"[(2+n)*n, n*C] for n={n}, C={c}")
    _check_shape(base, keys[1], (rows,), f"[(2+n)*n] for n={n}")
    _check_shape(scale, keys[2], (3,), "(pre, post, comb) scales")
    hc = DeepSeekV4HyperConnection(
        c, n_streams=n, sinkhorn_iters=s["sinkhorn_iters"], hc_eps=s["hc_eps"], rms_eps=s["rms_eps"], init_std=0.0,
        **module_kwargs,
    )
    _assign(hc.coeffs, zip(("phi", "bias", "alpha"), fn_to_phi(fn, base, scale)))
    return hc


def _load_head(sd, keys, s: dict) -> DeepSeekV4HyperHead:
    fn, base, scale = _take(sd, keys)
    n = _infer_n(s, base, keys[1], head=True)
    c = _infer_dim(s, fn, keys[0], n, n)
    _check_shape(fn, keys[0], (n, n * c), f"[n, n*C] for n={n}, C={c}")
    _check_shape(base, keys[1], (n,), f"[n] for n={n}")
    _check_shape(scale, keys[2], (1,), "one scale")
    head = DeepSeekV4HyperHead(c, n, hc_eps=s["hc_eps"], rms_eps=s["rms_eps"], init_std=0.0)
    _assign(head, (("fn", fn), ("base", base), ("scale", scale.reshape(()))))
    return head


@torch.no_grad()
def _assign(module: nn.Module, named) -> None:
    """Replace parameters by copies of the tensors, keeping their dtype and device (exact round trips)."""
    for name, t in named:
        getattr(module, name).data = t.detach().clone()


def load_deepseek_v4(
    state_dict: Mapping[str, Tensor],
    prefix: str = "",
    *,
    kind: str = "auto",
    config=None,
    n_streams: int | None = None,
    dim: int | None = None,
    sinkhorn_iters: int | None = None,
    hc_eps: float | None = None,
    rms_eps: float | None = None,
    **module_kwargs,
) -> DeepSeekV4HyperConnection | DeepSeekV4HyperHead:
    """One mhckit module from DeepSeek-V4 weights: ``{prefix}fn/base/scale`` (a hyper-connection) or
    ``{prefix}hc_fn/hc_base/hc_scale`` (the head), e.g. ``prefix="model.layers.3.ffn_hc."``.

    ``n`` and ``C`` are inferred from the shapes unless given (or taken from ``config``, any object
    with DeepseekV4Config's ``hc_mult``, ``hidden_size``, ``hc_sinkhorn_iters``, ``hc_eps``,
    ``rms_norm_eps``); the eps and iteration count are not in the weights, so they come from the
    arguments, ``config`` or transformers' defaults (20, 1e-6, 1e-6). A wrong shape raises naming
    the key, the shape given and the shape expected. ``module_kwargs`` (``branch``, ``layer_index``,
    ``backend``) go to :class:`DeepSeekV4HyperConnection`.
    """
    check_choice(kind, "kind", ("auto", "hc", "head"))
    if kind == "auto":
        kind = "head" if prefix + HEAD_KEYS[0] in state_dict else "hc"
    s = _settings(config, n_streams=n_streams, dim=dim, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps, rms_eps=rms_eps)
    if kind == "head":
        if module_kwargs:
            raise ValueError(f"module_kwargs: got {sorted(module_kwargs)} for a head; expected none")
        return _load_head(state_dict, tuple(prefix + k for k in HEAD_KEYS), s)
    return _load_hc(state_dict, tuple(prefix + k for k in HC_KEYS), s, **module_kwargs)


_LAYER_PATTERNS = {
    "transformers": re.compile(r"^(?P<prefix>.*?)layers\.(?P<i>\d+)\.(?P<site>attn|ffn)_hc\.fn$"),
    "deepseek": re.compile(r"^(?P<prefix>.*?)layers\.(?P<i>\d+)\.hc_(?P<site>attn|ffn)_fn$"),
}


def _hc_keys(naming: str, prefix: str, i: int, site: str) -> tuple[str, str, str]:
    if naming == "transformers":
        return tuple(f"{prefix}layers.{i}.{site}_hc.{k}" for k in HC_KEYS)
    return tuple(f"{prefix}layers.{i}.hc_{site}_{k}" for k in HC_KEYS)


def _head_keys(naming: str, prefix: str) -> tuple[str, str, str]:
    if naming == "transformers":
        return tuple(f"{prefix}hc_head.{k}" for k in HEAD_KEYS)
    return tuple(f"{prefix}hc_head_{k}" for k in HC_KEYS)


def load_deepseek_v4_model(
    state_dict: Mapping[str, Tensor],
    prefix: str | None = None,
    *,
    config=None,
    n_streams: int | None = None,
    dim: int | None = None,
    sinkhorn_iters: int | None = None,
    hc_eps: float | None = None,
    rms_eps: float | None = None,
    backend: str = "auto",
) -> dict[str, nn.Module]:
    """Every hyper-connection of a DeepSeek-V4 checkpoint, in execution order.

    Key names are recognised in both spellings: transformers' (``model.layers.{i}.attn_hc.fn``,
    ``...ffn_hc.base``, ``model.hc_head.hc_scale``) and the original DeepSeek release's, which
    transformers renames on load (``layers.{i}.hc_attn_fn``, ``layers.{i}.hc_ffn_scale``,
    ``hc_head_fn``). ``prefix`` (e.g. ``"model."``) is detected when ``None``. Returns
    ``{"layers.0.attn_hc": DeepSeekV4HyperConnection, "layers.0.ffn_hc": ..., ..., "hc_head":
    DeepSeekV4HyperHead}`` (the head if present; branches ``None``, set ``.branch`` or use ``split``).
    The other arguments as in :func:`load_deepseek_v4`; every sublayer must have the same ``n`` and ``C``.
    """
    found: dict[tuple[str, str], set[tuple[int, str]]] = {}
    for key in state_dict:
        for naming, pattern in _LAYER_PATTERNS.items():
            m = pattern.match(key)
            if m and (prefix is None or m["prefix"] == prefix):
                found.setdefault((naming, m["prefix"]), set()).add((int(m["i"]), m["site"]))
    if len(found) != 1:
        what = f"prefixes {sorted(found)}" if found else "no key like 'layers.0.attn_hc.fn' or 'layers.0.hc_attn_fn'"
        raise ValueError(f"state_dict: got {what} (prefix={prefix!r}); expected one DeepSeek-V4 model (pass prefix=)")
    (naming, prefix), sites = next(iter(found.items()))
    n_layers = max(i for i, _ in sites) + 1
    s = _settings(config, n_streams=n_streams, dim=dim, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps, rms_eps=rms_eps)
    out: dict[str, nn.Module] = {}
    for i in range(n_layers):
        for j, site in enumerate(("attn", "ffn")):
            keys = _hc_keys(naming, prefix, i, site)
            hc = _load_hc(state_dict, keys, s, layer_index=2 * i + j, backend=backend)
            s = {**s, "n_streams": hc.n_streams, "dim": hc.dim}  # every sublayer of a model shares n and C
            out[f"layers.{i}.{site}_hc"] = hc
    head = _head_keys(naming, prefix)
    if head[0] in state_dict:
        out["hc_head"] = _load_head(state_dict, head, s)
    return out


def _export_one(module: nn.Module, prefix: str, keys: tuple[str, str, str] | None = None) -> dict[str, Tensor]:
    module = _as_deepseek(module)
    if isinstance(module, DeepSeekV4HyperConnection):
        c = module.coeffs
        values = phi_to_fn(c.phi, c.bias, c.alpha)
        keys = keys or tuple(prefix + k for k in HC_KEYS)
    else:
        values = (module.fn.detach().clone(), module.base.detach().clone(), module.scale.detach().reshape(1).clone())
        keys = keys or tuple(prefix + k for k in HEAD_KEYS)
    return dict(zip(keys, values))


def export_deepseek_v4(module, prefix: str = "", *, naming: str = "transformers") -> dict[str, Tensor]:
    """DeepSeek-V4 weights of a module, exactly (inverse of :func:`load_deepseek_v4`).

    ``module``: a :class:`DeepSeekV4HyperConnection` (keys ``{prefix}fn/base/scale``), a
    :class:`DeepSeekV4HyperHead` (``{prefix}hc_fn/hc_base/hc_scale``), mhckit's own ``mhc``
    :class:`~mhckit.HyperConnection` / :class:`~mhckit.StreamHead` (through :func:`from_mhc`), or the
    dict of :func:`load_deepseek_v4_model` or :func:`from_transformers` (names ``[...]layers.{i}.attn_hc``,
    ``[...]layers.{i}.ffn_hc``, ``[...]hc_head``), written with ``naming`` (``"transformers"`` or
    ``"deepseek"``) under ``prefix`` (e.g. ``"model."``, then ``model.load_state_dict(sd, strict=False)``).
    """
    check_choice(naming, "naming", NAMINGS)
    if not isinstance(module, Mapping):
        return _export_one(module, prefix)
    out: dict[str, Tensor] = {}
    for name, m in module.items():
        layer = re.fullmatch(r"(.*?)layers\.(\d+)\.(attn|ffn)_hc", name)
        head = re.fullmatch(r"(.*?)hc_head", name)
        if layer:
            out.update(_export_one(m, "", _hc_keys(naming, prefix + layer[1], int(layer[2]), layer[3])))
        elif head:
            out.update(_export_one(m, "", _head_keys(naming, prefix + head[1])))
        else:
            raise ValueError(
                f"module[{name!r}]: got this name; expected 'layers.{{i}}.attn_hc', 'layers.{{i}}.ffn_hc' or 'hc_head'"
            )
    return out


# ----------------------------------------------------------------------------- transformers


def _transformers_modules():
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as M  # lazy: optional dependency

    return M


def _norm_eps(norm: nn.Module) -> float:
    """The eps of transformers' ``DeepseekV4UnweightedRMSNorm``: ``eps`` up to transformers 5.24,
    ``variance_epsilon`` from 5.25."""
    for name in ("eps", "variance_epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise ValueError(
        f"input_norm: {type(norm).__name__} has neither `eps` nor `variance_epsilon`; "
        "expected transformers' DeepseekV4UnweightedRMSNorm (transformers >= 5.23)"
    )


def from_transformers(module: nn.Module, **module_kwargs):
    """mhckit module(s) from transformers' DeepSeek-V4 (exact weights; eps and iterations copied).

    ``DeepseekV4HyperConnection`` -> :class:`DeepSeekV4HyperConnection` (``module_kwargs``: ``branch``,
    ``layer_index``, ``backend``); ``DeepseekV4HyperHead`` -> :class:`DeepSeekV4HyperHead`; any other
    module (a decoder layer, ``DeepseekV4Model``, ``DeepseekV4ForCausalLM``) -> ``{qualified name:
    mhckit module}`` of every one inside it, in execution order.
    """
    M = _transformers_modules()
    if isinstance(module, M.DeepseekV4HyperConnection):
        n = module.hc_mult
        return load_deepseek_v4(
            dict(module.named_parameters()), kind="hc", n_streams=n, dim=module.fn.shape[1] // n,
            sinkhorn_iters=module.hc_sinkhorn_iters, hc_eps=module.hc_eps, rms_eps=_norm_eps(module.input_norm),
            **module_kwargs,
        )  # fmt: skip
    if isinstance(module, M.DeepseekV4HyperHead):
        n = module.hc_mult
        return load_deepseek_v4(
            dict(module.named_parameters()), kind="head", n_streams=n, dim=module.hc_fn.shape[1] // n,
            hc_eps=module.eps, rms_eps=_norm_eps(module.input_norm),
        )  # fmt: skip
    kinds = (M.DeepseekV4HyperConnection, M.DeepseekV4HyperHead)
    out = {name: from_transformers(m) for name, m in module.named_modules() if isinstance(m, kinds)}
    if not out:
        raise ValueError(
            f"module: got {type(module).__name__} with no DeepSeek-V4 hyper-connection inside; "
            "expected DeepseekV4HyperConnection, DeepseekV4HyperHead or a module containing them"
        )
    return out


def to_transformers(module: nn.Module, config=None) -> nn.Module:
    """transformers' ``DeepseekV4HyperConnection`` / ``DeepseekV4HyperHead`` with this module's exact weights.

    ``config``: a ``DeepseekV4Config`` (its ``hc_mult``, ``hidden_size``, ``hc_sinkhorn_iters``,
    ``hc_eps``, ``rms_norm_eps`` must match the module); built from the module when ``None``.
    mhckit ``mhc`` modules are converted with :func:`from_mhc` first (see its notes on eps).
    """
    M = _transformers_modules()
    module = _as_deepseek(module)
    is_hc = isinstance(module, DeepSeekV4HyperConnection)
    want = {"hc_mult": module.n_streams, "hidden_size": module.dim, "hc_eps": module.hc_eps,
            "rms_norm_eps": module.cfg.rms_eps if is_hc else module.rms_eps}  # fmt: skip
    if is_hc:
        want["hc_sinkhorn_iters"] = module.cfg.sinkhorn_iters
    if config is None:
        from transformers import DeepseekV4Config

        config = DeepseekV4Config(**want)
    for field, value in want.items():
        if getattr(config, field) != value:
            raise ValueError(f"config.{field}: got {getattr(config, field)!r}; expected {value!r} (from the module)")
    target = (M.DeepseekV4HyperConnection if is_hc else M.DeepseekV4HyperHead)(config)
    target.load_state_dict(export_deepseek_v4(module))
    return target


# ----------------------------------------------------------------------------- mhckit's own mhc


_MHC_KINDS = "mhckit's HyperConnection(variant='mhc') or StreamHead"


def _as_deepseek(module: nn.Module) -> DeepSeekV4HyperConnection | DeepSeekV4HyperHead:
    if isinstance(module, (DeepSeekV4HyperConnection, DeepSeekV4HyperHead)):
        return module
    return from_mhc(module)


def from_mhc(module: nn.Module, *, hc_eps: float = DEFAULT_HC_EPS) -> DeepSeekV4HyperConnection | DeepSeekV4HyperHead:
    """mhckit's ``mhc`` :class:`~mhckit.HyperConnection` (or :class:`~mhckit.StreamHead`) -> the DeepSeek-V4 flavour.

    Parameters are copied exactly (``phi``, ``bias``, ``alpha`` share the layout; the branch is
    shared), as are ``sinkhorn_iters`` and ``rms_eps``. The function gains the ``hc_eps`` terms
    (``h_pre + eps``, Sinkhorn eps; head weights ``+ eps``) and is otherwise the same: equal up to
    float rounding with ``hc_eps=0``. The Sinkhorn amplifies its eps where ``h_res`` has small entries
    (an entry of 1e-3 moves by ~1e-3 relative per 1e-6 of eps): with sharp ``h_res`` and the default
    ``hc_eps=1e-6`` outputs moved by up to ~2e-4 in our tests. Needs ``variant="mhc"``, ``n_streams >= 2``.
    """
    if isinstance(module, (DeepSeekV4HyperConnection, DeepSeekV4HyperHead)):
        raise ValueError(f"module: got {type(module).__name__}; expected {_MHC_KINDS}")
    if isinstance(module, StreamHead):
        if module.n_streams < 2:
            raise ValueError("module.n_streams: got 1; expected >= 2 (a one-stream StreamHead is the identity)")
        head = DeepSeekV4HyperHead(module.dim, module.n_streams, hc_eps=hc_eps, rms_eps=module.rms_eps, init_std=0.0)
        _assign(head, ((k, getattr(module, k)) for k in ("fn", "base", "scale")))
        return head
    if not isinstance(module, HyperConnection):
        raise ValueError(f"module: got {type(module).__name__}; expected {_MHC_KINDS}")
    cfg = module.cfg
    if cfg.variant != "mhc" or cfg.is_residual or not isinstance(module.coeffs, DynamicCoefficients):
        raise ValueError(
            f"module.variant: got {cfg.variant!r} with n_streams={cfg.n_streams}; expected 'mhc' with n_streams >= 2 "
            "(DeepSeek-V4 stores a Sinkhorn h_res of n*n logits)"
        )
    hc = DeepSeekV4HyperConnection(
        module.dim, module.branch, n_streams=cfg.n_streams, sinkhorn_iters=cfg.sinkhorn_iters, hc_eps=hc_eps,
        rms_eps=cfg.rms_eps, layer_index=module.layer_index, backend=cfg.backend, init_std=0.0,
    )  # fmt: skip
    _assign(hc.coeffs, ((k, getattr(module.coeffs, k)) for k in ("phi", "bias", "alpha")))
    return hc


def to_mhc(module: nn.Module) -> HyperConnection | StreamHead:
    """The DeepSeek-V4 flavour -> mhckit's ``mhc`` :class:`~mhckit.HyperConnection` / :class:`~mhckit.StreamHead`.

    Parameters exact; the ``hc_eps`` terms are dropped (see :func:`from_mhc`). Needs ``n_streams >= 2``:
    mhckit's one-stream ``mhc`` is a plain residual without coefficients.
    """
    if not isinstance(module, (DeepSeekV4HyperConnection, DeepSeekV4HyperHead)):
        kinds = "DeepSeekV4HyperConnection or DeepSeekV4HyperHead"
        raise ValueError(f"module: got {type(module).__name__}; expected {kinds}")
    if module.n_streams < 2:
        raise ValueError("module.n_streams: got 1; expected >= 2 (mhckit's one-stream mhc has no coefficients)")
    if isinstance(module, DeepSeekV4HyperHead):
        head = StreamHead(module.dim, module.n_streams, rms_eps=module.rms_eps)
        _assign(head, ((k, getattr(module, k)) for k in ("fn", "base", "scale")))
        return head
    cfg = module.cfg
    hc = HyperConnection(
        module.dim, module.branch, layer_index=module.layer_index, variant="mhc", n_streams=module.n_streams,
        sinkhorn_iters=cfg.sinkhorn_iters, rms_eps=cfg.rms_eps, backend=cfg.backend,
    )  # fmt: skip
    _assign(hc.coeffs, ((k, getattr(module.coeffs, k)) for k in ("phi", "bias", "alpha")))
    return hc

"""nn.Modules: :class:`HyperConnection` (wraps a branch), stream expansion and reduction.

A model carries ``n`` streams ``[..., n, C]`` from one :func:`expand_streams` after the
embedding to one :func:`reduce_streams` (or :class:`StreamHead`) before the final norm. Every
attention and every FFN sublayer is its own :class:`HyperConnection`. Expanding and collapsing
inside each block would make the streams identical and ``h_res`` pointless, so don't.

Shape legend: ``...`` leading dims, ``n`` streams, ``C`` width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import functional as F
from . import recompute, reference
from ._validate import check_choice, check_n_streams, check_streams
from .config import MHCConfig
from .constraints import IdentityConstraint, PermutationMixture, ResConstraint, SinkhornConstraint
from .ops import carry as _carry
from .ops import cpu
from .ops.cpu import _pair

__all__ = [
    "HyperConnection",
    "DynamicCoefficients",
    "HCCoefficients",
    "StreamHead",
    "ReduceStreams",
    "expand_streams",
    "reduce_streams",
]

Coefficients = tuple[Tensor, Tensor, "Tensor | None"]


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _home_pre_weights(n: int, home: int, home_weight: float) -> Tensor:
    """Pre weights that sum to 1: ``home_weight`` on the home stream, the rest shared."""
    w = torch.full((n,), (1.0 - home_weight) / (n - 1), dtype=torch.float64)
    w[home] = home_weight
    return w


class DynamicCoefficients(nn.Module):
    """mHC-family coefficients from the flattened streams (mHC Eq. 7-9).

    Parameters: ``phi [n*C, 2n + k]``, ``bias [2n + k]``, ``alpha [3]``; ``k`` from ``constraint``.
    """

    def __init__(self, dim: int, constraint: ResConstraint, cfg: MHCConfig, layer_index: int):
        super().__init__()
        n = constraint.n_streams
        self.n_streams, self.dim, self.cfg = n, dim, cfg
        self.constraint = constraint
        cols = 2 * n + constraint.num_logits
        self.phi = nn.Parameter(torch.zeros(n * dim, cols))
        self.bias = nn.Parameter(torch.zeros(cols))
        self.alpha = nn.Parameter(torch.full((3,), cfg.alpha_init))
        self.reset_parameters(layer_index)

    @torch.no_grad()
    def reset_parameters(self, layer_index: int) -> None:
        """Apply the ``cfg.init`` preset (see :data:`mhckit.config.INITS`)."""
        n, cfg = self.n_streams, self.cfg
        home = layer_index % n
        self.phi.zero_()
        self.alpha.fill_(cfg.alpha_init)
        b_post = torch.zeros(n)  # h_post = 2 sigmoid(0) = 1
        if cfg.init == "preserving":
            pre = _home_pre_weights(n, home, cfg.pre_home_weight)
            b_pre = torch.log(pre / (1.0 - pre))  # sigmoid(b_pre) = pre, sum = 1
            b_res = self.constraint.identity_bias(cfg.res_init_strength)
        elif cfg.init == "mean-preserving":
            b_pre = torch.full((n,), _logit(1.0 / n))  # uniform read: u = mean of the streams
            post = torch.full((n,), 1.0 - cfg.post_spread / (n - 1), dtype=torch.float64)
            post[home] = 1.0 + cfg.post_spread  # mean(h_post) = 1
            b_post = torch.log(post / (2.0 - post)).float()  # 2 sigmoid(b_post) = post
            b_res = self.constraint.identity_bias(cfg.res_init_strength)
        else:  # "identity": the public mHC code's start
            b_pre = torch.full((n,), -1.0)
            b_pre[home] = 1.0
            b_res = self.constraint.identity_bias(8.0)
        self.bias.copy_(torch.cat([b_pre.float(), b_post, b_res.float()]))

    def read(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(u, h_pre, h_post, h_res)``: coefficients and the branch input in one fused op (mHC)."""
        cfg = self.cfg
        if isinstance(self.constraint, SinkhornConstraint):
            return F.mhc_coeffs_pre(
                x, self.phi, self.bias, self.alpha, iters=cfg.sinkhorn_iters, rms_eps=cfg.rms_eps, backend=cfg.backend
            )
        h_pre, h_post, h_res = self(x)
        return F.mhc_pre(x, h_pre, backend=cfg.backend), h_pre, h_post, h_res

    def read_carry(self, x: Tensor):
        """``(u, h_pre, h_post, h_res, carrier, triton)`` when mHC runs on the compiled CPU kernels or
        the Triton kernels, or mHC-lite (n <= 4) or the identity variant (``h_res`` None) on the
        compiled CPU kernels (the write-back then takes ``carrier`` and ``triton``, and its stream
        gradient joins the coefficient backward; see :mod:`mhckit.ops.carry`), else None."""
        cfg = self.cfg
        iters = _pair_iters(self.constraint, self.n_streams)
        if iters is None:
            return None
        iters = iters or cfg.sinkhorn_iters
        mode = F._carry_mode(x, self.phi, self.bias, self.alpha, cfg.backend)
        if mode is None or (mode == "triton" and iters < 1):  # no Triton tail for the permutations or I
            return None
        triton = mode == "triton"
        return (*F._mhc_read_carry(x, self.phi, self.bias, self.alpha, iters=iters, rms_eps=cfg.rms_eps,
                                   triton=triton), triton)

    def forward(self, x: Tensor) -> Coefficients:
        cfg = self.cfg
        if isinstance(self.constraint, SinkhornConstraint):
            return F.mhc_coeffs(
                x, self.phi, self.bias, self.alpha, iters=cfg.sinkhorn_iters, rms_eps=cfg.rms_eps, backend=cfg.backend
            )
        a_pre, a_post, a_res = F.mhc_logits(x, self.phi, self.bias, self.alpha, rms_eps=cfg.rms_eps, backend=cfg.backend)
        return torch.sigmoid(a_pre), 2.0 * torch.sigmoid(a_post), self.constraint(a_res)


class HCCoefficients(nn.Module):
    """Hyper-Connections coefficients (arXiv 2409.19606), static plus optional dynamic tanh terms.

    Initialised as the HC paper's Pre-Norm-equivalent start: ``A_m`` one-hot on the home stream
    ``layer_index mod n``, ``B = 1``, ``A_r = I``, dynamic weights 0, scales ``alpha_init``.
    """

    def __init__(self, dim: int, n_streams: int, cfg: MHCConfig, layer_index: int):
        super().__init__()
        n = n_streams
        self.n_streams, self.cfg = n, cfg
        self.static_pre = nn.Parameter(torch.zeros(n))
        self.static_post = nn.Parameter(torch.zeros(n))
        self.static_res = nn.Parameter(torch.zeros(n, n))
        if cfg.hc_dynamic:
            self.w_pre = nn.Parameter(torch.zeros(dim))
            self.w_post = nn.Parameter(torch.zeros(dim))
            self.w_res = nn.Parameter(torch.zeros(dim, n))
            self.scale_alpha = nn.Parameter(torch.tensor(cfg.alpha_init))
            self.scale_beta = nn.Parameter(torch.tensor(cfg.alpha_init))
        self.reset_parameters(layer_index)

    @torch.no_grad()
    def reset_parameters(self, layer_index: int) -> None:
        n = self.n_streams
        self.static_pre.zero_()
        self.static_pre[layer_index % n] = 1.0
        self.static_post.fill_(1.0)
        self.static_res.copy_(torch.eye(n))
        if self.cfg.hc_dynamic:
            for w in (self.w_pre, self.w_post, self.w_res):
                w.zero_()
            self.scale_alpha.fill_(self.cfg.alpha_init)
            self.scale_beta.fill_(self.cfg.alpha_init)

    def read_carry(self, x: Tensor):
        """``(u, h_pre, h_post, h_res, carrier, False)`` when the dynamic coefficients and the read run on
        the compiled CPU kernels (one call each way, eager or as custom ops under ``torch.compile``; the
        write-back then takes ``carrier`` and its stream gradient joins the coefficient backward, see
        :mod:`mhckit.ops.carry`), else None."""
        cfg = self.cfg
        if not cfg.hc_dynamic:
            return None
        params = (self.static_pre, self.static_post, self.static_res, self.w_pre, self.w_post, self.w_res,
                  self.scale_alpha, self.scale_beta)
        if not F._hc_carry_mode(x, params, cfg.backend, traced=True):
            return None
        return (*F._hc_read_carry(x, *params, norm_eps=cfg.rms_eps), False)

    def forward(self, x: Tensor) -> Coefficients:
        dyn = ()
        if self.cfg.hc_dynamic:
            dyn = (self.w_pre, self.w_post, self.w_res, self.scale_alpha, self.scale_beta)
        return F.hc_coeffs(
            x, self.static_pre, self.static_post, self.static_res, *dyn, norm_eps=self.cfg.rms_eps,
            backend=self.cfg.backend,
        )


def make_coefficients(dim: int, cfg: MHCConfig, layer_index: int) -> nn.Module | None:
    """The coefficient module of ``cfg.variant`` (``None`` for a plain residual)."""
    if cfg.is_residual:
        return None
    n = cfg.n_streams
    if cfg.variant == "hc":
        return HCCoefficients(dim, n, cfg, layer_index)
    constraint = {
        "mhc": lambda: SinkhornConstraint(n, cfg.sinkhorn_iters, cfg.backend),
        "mhc-lite": lambda: PermutationMixture(n),
        "identity": lambda: IdentityConstraint(n),
    }[cfg.variant]()
    return DynamicCoefficients(dim, constraint, cfg, layer_index)


class HyperConnection(nn.Module):
    """One hyper-connection sublayer around a branch ``f: [..., C] -> [..., C]``.

    ``x: [..., n, C] -> [..., n, C]``: ``u = sum_j h_pre[j] x[j]``, ``y = f(u, *args, **kwargs)``,
    ``x_new[k] = sum_j h_res[k, j] x[j] + h_post[k] y`` (mHC Eq. 3). The branch applies its own
    pre-norm to ``u``. With ``variant="residual"`` or ``n_streams=1`` the model carries one stream
    ``[..., 1, C]`` and the sublayer is exactly ``x + f(x)``, bit for bit.

    Two-step form, for branches that need more than ``u`` or return more than ``y``::

        u, finish = hc.split(x)
        x = finish(attention(u, mask=mask))

    If the branch returns a tuple, its first element is ``y`` and :meth:`forward` returns
    ``(x_new, *rest)``.

    Args:
        dim: ``C``.
        branch: the wrapped module / callable; may be ``None`` when only :meth:`split` is used.
        n_streams, variant, init, ...: see :class:`mhckit.config.MHCConfig` (or pass ``config=``).
        layer_index: index of this sublayer in the model; picks the home stream ``layer_index mod n``.
    """

    def __init__(
        self,
        dim: int,
        branch: Callable[..., Tensor] | None = None,
        *,
        layer_index: int = 0,
        config: MHCConfig | None = None,
        **config_kwargs,
    ):
        super().__init__()
        if config is not None and config_kwargs:
            raise ValueError(f"config: pass either config= or keyword options, not both (got {sorted(config_kwargs)})")
        cfg = config if config is not None else MHCConfig(**config_kwargs)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: got {dim!r}; expected a positive int (the width C)")
        if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
            raise ValueError(f"layer_index: got {layer_index!r}; expected an int >= 0")
        self.dim, self.cfg, self.layer_index = dim, cfg, layer_index
        self.n_streams = cfg.streams
        self.branch = branch
        self.coeffs = make_coefficients(dim, cfg, layer_index)
        self._capture: list | None = None  # set by mhckit.diagnostics.record_coefficients

    @property
    def variant(self) -> str:
        return self.cfg.variant

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_streams={self.n_streams}, variant={self.cfg.variant!r}, layer_index={self.layer_index}"

    def _check(self, x: Tensor) -> None:
        n, c = check_streams(x, "x")
        if n != self.n_streams or c != self.dim:
            hint = " (a residual carries one stream: expand with n = hc.n_streams)" if self.cfg.is_residual else ""
            raise ValueError(
                f"x.shape: got {tuple(x.shape)}; expected [..., n_streams={self.n_streams}, dim={self.dim}]{hint}"
            )

    def coefficients(self, x: Tensor) -> Coefficients:
        """``(h_pre [..., n], h_post [..., n], h_res [..., n, n] or None for identity)``."""
        self._check(x)
        if self.coeffs is None:
            raise ValueError(f"variant: {self.cfg.variant!r} with n_streams={self.n_streams} has no coefficients")
        return self.coeffs(x)

    def split(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``u, finish = hc.split(x)``: the branch input and the write-back closure."""
        fast = self._split_on_pair(x)
        if fast is not None:
            return fast
        self._check(x)
        if self.coeffs is None:  # plain residual: u is the single stream
            return x.squeeze(-2), lambda y: x + y.unsqueeze(-2)
        carrier, triton = None, False
        carried = self.coeffs.read_carry(x) if isinstance(self.coeffs, (DynamicCoefficients, HCCoefficients)) else None
        if carried is not None:
            u, h_pre, h_post, h_res, carrier, triton = carried
        elif isinstance(self.coeffs, DynamicCoefficients):
            u, h_pre, h_post, h_res = self.coeffs.read(x)
        else:
            h_pre, h_post, h_res = self.coeffs(x)
            if h_res is not None and F._hc_carry_mode(x, (h_pre, h_res), self.cfg.backend, traced=True):
                u, carrier = F._mhc_read_external(x, h_pre, h_res)  # HC: read and write-back as the pair
            else:
                u = F.mhc_pre(x, h_pre, backend=self.cfg.backend)
        if self._capture is not None:
            self._capture.append((h_pre.detach(), h_post.detach(), None if h_res is None else h_res.detach()))
        return u, lambda y: self._finish(x, y, h_post, h_res, carrier, triton)

    def _split_on_pair(self, x: Tensor):
        """:meth:`split` by a short way where mHC, mHC-lite (n <= 4) or the identity runs on the C++
        pair in a plain eager training step: CPU streams of float32 / float64, contiguous, parameters of
        that dtype on the CPU, gradients on, the automatic backend, no :mod:`mhckit.diagnostics` capture
        (and :func:`mhckit.functional._pair_now`); else None, and the general path decides (and raises
        what it raises). Both ways make the same call with the same arguments: the same values, the same
        autograd graph. The write-back takes the short way too while that still holds and ``y`` is a
        CPU tensor of the streams' dtype and ``u``'s shape, else :meth:`_finish`. Measured on the
        default GPT (CPU, interleaved A/B against the general path): the step 0.98x the time, the forward
        0.96x (docs/measurements.md)."""
        if torch.compiler.is_compiling():  # first: nothing below is for tracing (the plan cache is a side effect)
            return None
        co = self._modules.get("coeffs")
        plan = self.__dict__.get("_pair_plan")
        if plan is None or plan[0] is not co or (plan[2] is not None and plan[1] is not co._modules.get("constraint")):
            plan = self.__dict__["_pair_plan"] = _pair_plan(co, self.n_streams)
        _, _, iters, k = plan
        cfg = self.cfg
        if iters is None or self._capture is not None or cfg.backend != "auto" or not torch.is_grad_enabled():
            return None
        dt, shape = x.dtype, x.shape
        n, c = self.n_streams, self.dim
        p = co._parameters
        phi, bias, alpha = p["phi"], p["bias"], p["alpha"]
        if not (
            (dt is torch.float32 or dt is torch.float64) and type(x) is Tensor and len(shape) >= 2
            and shape[-2] == n and shape[-1] == c and x.is_cpu and x.is_contiguous()
            and phi.dtype is dt and bias.dtype is dt and alpha.dtype is dt and phi.is_cpu and bias.is_cpu
            and alpha.is_cpu and phi.shape == (n * c, k) and bias.shape == (k,) and alpha.shape == (3,)
            and F._pair_now()
        ):
            return None
        if iters == 0:
            iters = cfg.sinkhorn_iters
        u, _, h_post, h_res, carrier = _pair._STATE["read"](x, phi, bias, alpha, iters, float(cfg.rms_eps),
                                                            cpu._project_here(n, c, k, dt), _carry.REUSE_GRADIENT_BUFFER)
        if iters == cpu.IDENTITY:
            h_res = None
        ushape = shape[:-2] + shape[-1:]

        def finish(y: Tensor) -> Tensor:
            if (type(y) is Tensor and y.dtype is dt and y.is_cpu and y.shape == ushape and torch.is_grad_enabled()
                    and F._pair_now()):
                return _pair._STATE["write"](carrier, y, h_post, h_res)
            return self._finish(x, y, h_post, h_res, carrier, False)

        return u, finish

    def _finish(self, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor | None, carrier: Tensor | None,
                triton: bool) -> Tensor:
        """The write-back of :meth:`split`'s ``finish``."""
        if recompute.in_compiled_region() and carrier is None:
            return _post_res_op(x, y, h_post, h_res)  # an operator recompute.sequential recomputes
        if carrier is not None:  # h_res None (the identity) included
            out = F._mhc_write_carry(x, carrier, y, h_post, h_res, triton)
        elif h_res is None:
            out = F.residual_update(x, y, h_post)
        else:
            out = F.mhc_post_res(x, y, h_post, h_res, backend=self.cfg.backend)
        rc = recompute.active()
        if rc is not None:  # only then build the replay recipe (nothing extra on the plain path)
            if h_res is None and carrier is not None:  # the identity on the pair: its own write-back again
                rc.record(out, _identity_carry_replay, y.detach(), h_post.detach())
            elif h_res is None:
                rc.record(out, F.residual_update, y.detach(), h_post.detach())
            else:
                rc.record(out, _post_res_replay, y.detach(), h_post.detach(), h_res.detach(), self.cfg.backend)
        return out

    def forward(self, x: Tensor, *args, **kwargs):
        if self.branch is None:
            raise ValueError("branch: got None; pass a branch to HyperConnection(...) or use hc.split(x)")
        u, finish = self.split(x)
        out = self.branch(u, *args, **kwargs)
        if isinstance(out, tuple):
            return (finish(out[0]), *out[1:])
        return finish(out)


def _pair_iters(con: nn.Module | None, n: int) -> int | None:
    """The C++ pair's ``iters`` for the constraint ``con`` of ``n`` streams: 0 for the Sinkhorn projection
    (the config's iterations, read at each call), ``cpu.PERMUTATIONS`` for mHC-lite's permutation mixture
    (n <= ``cpu.MAX_PERMUTATION_STREAMS``), ``cpu.IDENTITY`` for h_res = I; None where the pair has no tail."""
    if isinstance(con, SinkhornConstraint):
        return 0
    if isinstance(con, PermutationMixture) and n <= cpu.MAX_PERMUTATION_STREAMS:
        return cpu.PERMUTATIONS  # mHC-lite: the C kernels' permutation-mixture tail
    if isinstance(con, IdentityConstraint):
        return cpu.IDENTITY  # h_res = I: no logits, h_res None
    return None


def _pair_plan(co: nn.Module | None, n: int) -> tuple:
    """``(coeffs, constraint, iters, k)`` of :meth:`HyperConnection._split_on_pair` for the coefficient
    module ``co``: :func:`_pair_iters` and the ``k`` logits, or iters None where the short way never
    applies (a residual, HC, a subclass of :class:`DynamicCoefficients`, a constraint without a pair tail)."""
    if type(co) is not DynamicCoefficients:
        return co, None, None, 0
    con = co._modules.get("constraint")
    iters = _pair_iters(con, n)
    k = 2 * n + (math.factorial(n) if iters == cpu.PERMUTATIONS else 0 if iters == cpu.IDENTITY else n * n)
    return co, con, iters, k


def _post_res_op(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor | None) -> Tensor:
    """The write-back as the ``mhckit::post_res`` operator (``h_res = None``: the identity), for
    :func:`mhckit.recompute.sequential` under ``torch.compile``."""
    from .ops import triton_autograd

    if h_res is None:
        n = x.shape[-2]
        h_res = torch.eye(n, dtype=h_post.dtype, device=h_post.device).expand(*h_post.shape, n)
    return triton_autograd.mhc_post_res(x, y, h_post, h_res)


def _post_res_replay(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, backend: str) -> Tensor:
    return F.mhc_post_res(x, y, h_post, h_res, backend=backend)


def _identity_carry_replay(x: Tensor, y: Tensor, h_post: Tensor) -> Tensor:
    """The identity variant's write-back as its pair computed it (the C kernel fuses ``h_post y + x``
    into one rounding, :func:`mhckit.functional.residual_update` rounds twice): a recomputed stream is
    then bitwise the stored one."""
    from .ops.carry import _write

    return _write(x, y, h_post, None)


def expand_streams(x: Tensor, n: int) -> Tensor:
    """``[..., C] -> [..., n, C]``: ``n`` identical copies (once per model, after the embedding)."""
    check_n_streams(n, "n")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"x: got {getattr(x, 'shape', type(x).__name__)}; expected a tensor [..., C]")
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


REDUCE_MODES = ("sum", "mean", "head")


class StreamHead(nn.Module):
    """Learned collapse ``[..., n, C] -> [..., C]`` (DeepSeek-V4 style sigmoid-weighted sum).

    ``w = sigmoid(scale * (v @ fn^T) / rms(v) + base)``, ``out = sum_j w[j] x[j]`` with
    ``v = flatten(x)``. Initialised to the mean (``fn = 0``, ``sigmoid(base) = 1/n``). With one
    stream it returns that stream unchanged.
    """

    def __init__(self, dim: int, n_streams: int, *, alpha_init: float = 0.01, rms_eps: float = 1e-6):
        super().__init__()
        n = check_n_streams(n_streams)
        self.dim, self.n_streams, self.rms_eps = dim, n, rms_eps
        self.fn = nn.Parameter(torch.zeros(n, n * dim))
        self.base = nn.Parameter(torch.full((n,), _logit(1.0 / n) if n > 1 else 0.0))
        self.scale = nn.Parameter(torch.tensor(alpha_init))

    def weights(self, x: Tensor) -> Tensor:
        """``[..., n]`` collapse weights (float32 / float64)."""
        n, c = check_streams(x, "x")
        if n != self.n_streams or c != self.dim:
            raise ValueError(f"x.shape: got {tuple(x.shape)}; expected [..., {self.n_streams}, {self.dim}]")
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        v = x.reshape(*x.shape[:-2], n * c).to(dt)
        z = (v @ self.fn.to(dt).t()) / reference.rms(v, self.rms_eps)
        return torch.sigmoid(self.scale.to(dt) * z + self.base.to(dt))

    def forward(self, x: Tensor) -> Tensor:
        if self.n_streams == 1:
            check_streams(x, "x")
            return x.squeeze(-2)
        return F.mhc_pre(x, self.weights(x))


def reduce_streams(x: Tensor, mode: str = "mean", *, head: StreamHead | None = None) -> Tensor:
    """``[..., n, C] -> [..., C]`` once per model, before the final norm.

    ``mode``: ``"sum"`` (the HC paper's collapse), ``"mean"`` (equals the residual state under the
    function-preserving start) or ``"head"`` (a learned :class:`StreamHead`, passed as ``head=``).
    """
    check_choice(mode, "mode", REDUCE_MODES)
    check_streams(x, "x")
    if mode == "head":
        if not isinstance(head, StreamHead):
            raise ValueError(f"head: got {type(head).__name__}; mode='head' needs head=StreamHead(dim, n_streams)")
        return head(x)
    return x.sum(dim=-2) if mode == "sum" else x.mean(dim=-2)


class ReduceStreams(nn.Module):
    """Module form of :func:`reduce_streams` (owns the :class:`StreamHead` for ``mode="head"``)."""

    def __init__(self, dim: int, n_streams: int, mode: str = "mean"):
        super().__init__()
        self.mode = check_choice(mode, "mode", REDUCE_MODES)
        self.head = StreamHead(dim, n_streams) if mode == "head" else None

    def forward(self, x: Tensor) -> Tensor:
        return reduce_streams(x, self.mode, head=self.head)

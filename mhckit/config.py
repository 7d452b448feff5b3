"""Typed configuration of a hyper-connection (one dataclass per concern)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ._validate import check_bool, check_choice, check_n_streams, check_number, check_positive
from .constraints import MAX_PERMUTATION_STREAMS
from .ops import resolve_backend

VARIANTS = ("residual", "hc", "mhc", "mhc-lite", "identity")
"""``residual``: plain pre-norm residual, exactly ``x + f(x)``.
``hc``: Hyper-Connections (arXiv 2409.19606), static + optional dynamic, tanh, unconstrained ``h_res``.
``mhc``: the paper (arXiv 2512.24880): sigmoid pre / 2*sigmoid post, Sinkhorn ``h_res``.
``mhc-lite``: as mhc, ``h_res`` a convex combination of the n! permutations (arXiv 2601.05732).
``identity``: as mhc with ``h_res = I`` (the iHC ablation)."""

INITS = ("preserving", "mean-preserving", "identity")
"""``preserving``: with identical input streams the stack equals the plain residual
stack at step 0 (``phi = 0``, pre weights sum to 1 with most weight on the home stream
``layer_index mod n``, ``h_post = 1``, ``h_res`` a soft identity whose gradient is alive).
``mean-preserving`` (default): the *mean* of the streams equals the plain residual state at step 0, and the
streams differ from the first sublayer on (``phi = 0``, uniform ``h_pre = 1/n``, ``h_post`` of mean 1
with ``1 + post_spread`` on the home stream, ``h_res`` the same soft identity): with identical input
streams and a mean collapse the stack again equals the residual stack, but the n streams do not stay
copies of each other (under ``preserving`` they stay identical until gradients separate them).
``identity``: the start of public mHC code: ``b_pre = +1`` on the home stream and ``-1``
elsewhere, ``h_post = 1``, ``h_res ~ I`` with off-diagonal logits ``-8``; saturated, so ``h_res``
barely learns. For ``hc`` both presets are the HC paper's exact Pre-Norm-equivalent start."""

RESIDUAL_VARIANTS = ("residual",)


@dataclass
class MHCConfig:
    """Everything that defines one hyper-connection sublayer (besides its width and branch)."""

    variant: str = "mhc"  # "residual", "hc", "mhc", "mhc-lite" or "identity"
    n_streams: int = 4  # n, residual streams; 1 (or variant="residual") gives exactly x + f(x)
    init: str = "mean-preserving"  # "mean-preserving" (streams differ from step 0), "preserving" or "identity"
    sinkhorn_iters: int = 20  # t_max, Sinkhorn-Knopp iterations (mhc)
    alpha_init: float = 0.01  # initial value of the scalar gates alpha (pre, post, res)
    res_init_strength: float = 3.0  # logit margin of the soft-identity h_res of the "preserving" start
    pre_home_weight: float = 0.7  # "preserving" start: h_pre weight of the home stream (rest shared)
    post_spread: float = 0.5  # "mean-preserving" start: h_post = 1 + spread on the home stream, mean 1
    rms_eps: float = 1e-6  # epsilon of the RMS statistic over the n*C values
    hc_dynamic: bool = True  # hc only: add the input-dependent (tanh) terms to the static ones
    backend: str = "auto"  # "auto", "torch" or "reference" (see mhckit.ops)

    def __post_init__(self) -> None:
        check_choice(self.variant, "variant", VARIANTS)
        check_choice(self.init, "init", INITS)
        check_n_streams(self.n_streams)
        if self.variant == "mhc-lite" and self.n_streams > MAX_PERMUTATION_STREAMS:
            raise ValueError(
                f"n_streams: got {self.n_streams}; the permutation mixture (mhc-lite) needs n! logits and allows "
                f"n <= {MAX_PERMUTATION_STREAMS}"
            )
        check_positive(self.sinkhorn_iters, "sinkhorn_iters", integer=True)
        check_positive(self.alpha_init, "alpha_init")
        check_positive(self.res_init_strength, "res_init_strength")
        check_positive(self.rms_eps, "rms_eps")
        check_number(self.post_spread, "post_spread", 0.0, 1.0, hi_open=True)
        check_number(self.pre_home_weight, "pre_home_weight", 0.0, 1.0, lo_open=True, hi_open=True)
        check_bool(self.hc_dynamic, "hc_dynamic")
        if not isinstance(self.backend, str):
            raise ValueError(f"backend: got {self.backend!r}; expected a backend name such as 'auto'")
        resolve_backend(self.backend)

    @property
    def is_residual(self) -> bool:
        """True when the sublayer is a plain residual (``variant="residual"`` or one stream)."""
        return self.variant in RESIDUAL_VARIANTS or self.n_streams == 1

    @property
    def streams(self) -> int:
        """The number of streams the model carries: 1 for a residual, else ``n_streams``."""
        return 1 if self.is_residual else self.n_streams

    def to_dict(self) -> dict:
        return asdict(self)

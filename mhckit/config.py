"""Typed configuration of a hyper-connection (one dataclass per concern)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ._validate import check_choice, check_n_streams, check_positive
from .ops import resolve_backend

VARIANTS = ("residual", "hc", "mhc", "mhc-lite", "identity")
"""``residual``: plain pre-norm residual, exactly ``x + f(x)``.
``hc``: Hyper-Connections (arXiv 2409.19606), static + optional dynamic, tanh, unconstrained ``h_res``.
``mhc``: the paper (arXiv 2512.24880): sigmoid pre / 2*sigmoid post, Sinkhorn ``h_res``.
``mhc-lite``: as mhc, ``h_res`` a convex combination of the n! permutations (arXiv 2601.05732).
``identity``: as mhc with ``h_res = I`` (the iHC ablation)."""

INITS = ("preserving", "identity")
"""``preserving`` (default): with identical input streams the stack equals the plain residual
stack at step 0 (``phi = 0``, pre weights sum to 1 with most weight on the home stream
``layer_index mod n``, ``h_post = 1``, ``h_res`` a soft identity whose gradient is alive).
``identity``: the start of public mHC code: ``b_pre = +1`` on the home stream and ``-1``
elsewhere, ``h_post = 1``, ``h_res ~ I`` with off-diagonal logits ``-8``; saturated, so ``h_res``
barely learns. For ``hc`` both presets are the HC paper's exact Pre-Norm-equivalent start."""

RESIDUAL_VARIANTS = ("residual",)


@dataclass
class MHCConfig:
    """Everything that defines one hyper-connection sublayer (besides its width and branch)."""

    variant: str = "mhc"  # "residual", "hc", "mhc", "mhc-lite" or "identity"
    n_streams: int = 4  # n, residual streams; 1 (or variant="residual") gives exactly x + f(x)
    init: str = "preserving"  # "preserving" (function-preserving, h_res learns) or "identity" (public-code start)
    sinkhorn_iters: int = 20  # t_max, Sinkhorn-Knopp iterations (mhc)
    alpha_init: float = 0.01  # initial value of the scalar gates alpha (pre, post, res)
    res_init_strength: float = 3.0  # logit margin of the soft-identity h_res of the "preserving" start
    pre_home_weight: float = 0.7  # "preserving" start: h_pre weight of the home stream (rest shared)
    rms_eps: float = 1e-6  # epsilon of the RMS statistic over the n*C values
    hc_dynamic: bool = True  # hc only: add the input-dependent (tanh) terms to the static ones
    backend: str = "auto"  # "auto", "torch" or "reference" (see mhckit.ops)

    def __post_init__(self) -> None:
        check_choice(self.variant, "variant", VARIANTS)
        check_choice(self.init, "init", INITS)
        check_n_streams(self.n_streams)
        check_positive(self.sinkhorn_iters, "sinkhorn_iters", integer=True)
        check_positive(self.alpha_init, "alpha_init")
        check_positive(self.res_init_strength, "res_init_strength")
        check_positive(self.rms_eps, "rms_eps")
        if not 0.0 < self.pre_home_weight < 1.0:
            raise ValueError(f"pre_home_weight: got {self.pre_home_weight!r}; expected a number in (0, 1)")
        if not isinstance(self.hc_dynamic, bool):
            raise ValueError(f"hc_dynamic: got {self.hc_dynamic!r}; expected True or False")
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

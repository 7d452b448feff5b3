"""``h_res`` parametrisations behind one interface: logits ``[..., k] -> [..., n, n]``.

Each parametrisation is a small module with
    * ``num_logits``: ``k``, the number of logits it consumes (columns of ``phi`` after ``2n``);
    * ``forward(logits)``: ``[..., k] -> h_res [..., n, n]``, or ``None`` for the identity (the
      write-back then skips the stream-mixing matmul);
    * ``identity_bias(strength)``: ``[k]`` logits that put ``h_res`` near the identity, ``strength``
      saying how near (larger = closer, and the flatter its gradient).

Adding a parametrisation (KromHC, an exact Newton projection, ...) is one class plus one entry in
:data:`CONSTRAINTS`.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from . import functional as F
from . import reference
from ._validate import check_n_streams

__all__ = ["ResConstraint", "SinkhornConstraint", "PermutationMixture", "IdentityConstraint", "CONSTRAINTS"]


class ResConstraint(nn.Module):
    """Base class: maps ``k`` logits per token to a doubly stochastic ``n x n`` matrix."""

    name = "abstract"

    def __init__(self, n_streams: int):
        super().__init__()
        self.n_streams = check_n_streams(n_streams)

    @property
    def num_logits(self) -> int:
        raise NotImplementedError

    def identity_bias(self, strength: float) -> Tensor:
        raise NotImplementedError

    def forward(self, logits: Tensor) -> Tensor | None:
        raise NotImplementedError


class SinkhornConstraint(ResConstraint):
    """mHC (arXiv 2512.24880): ``h_res = sinkhorn(logits as [n, n] row-major, iters)``."""

    name = "sinkhorn"

    def __init__(self, n_streams: int, iters: int = 20, backend: str = "auto"):
        super().__init__(n_streams)
        self.iters = iters
        self.backend = backend

    @property
    def num_logits(self) -> int:
        return self.n_streams**2

    def identity_bias(self, strength: float) -> Tensor:
        """``strength * I`` (row-major): ``h_res`` diagonal ``e^s / (e^s + n - 1)``, already doubly stochastic."""
        return (strength * torch.eye(self.n_streams)).flatten()

    def forward(self, logits: Tensor) -> Tensor:
        n = self.n_streams
        return F.sinkhorn(logits.unflatten(-1, (n, n)), self.iters, backend=self.backend)


MAX_PERMUTATION_STREAMS = 6


class PermutationMixture(ResConstraint):
    """mHC-lite (arXiv 2601.05732): ``h_res = sum_p softmax(logits)_p P_p`` over all ``n!`` permutations.

    Exactly doubly stochastic with no iterations; ``k = n!`` grows fast, so ``n <= 6``.
    Permutation ``0`` is the identity (``itertools.permutations`` order).
    """

    name = "permutations"

    def __init__(self, n_streams: int):
        super().__init__(n_streams)
        n = self.n_streams
        if n > MAX_PERMUTATION_STREAMS:
            raise ValueError(
                f"n_streams: got {n}; the permutation mixture (mhc-lite) needs n! logits and allows "
                f"n <= {MAX_PERMUTATION_STREAMS} ({math.factorial(n)} permutations requested)"
            )
        eye = torch.eye(n)
        perms = torch.stack([eye[list(p)] for p in itertools.permutations(range(n))])  # [n!, n, n]
        self.register_buffer("permutations", perms, persistent=False)

    @property
    def num_logits(self) -> int:
        return math.factorial(self.n_streams)

    def identity_bias(self, strength: float) -> Tensor:
        bias = torch.zeros(self.num_logits)
        bias[0] = strength
        return bias

    def forward(self, logits: Tensor) -> Tensor:
        return reference.permutation_mixture(logits, self.permutations)


class IdentityConstraint(ResConstraint):
    """``h_res = I``: dynamic pre / post only (the iHC ablation). Consumes no logits."""

    name = "identity"

    @property
    def num_logits(self) -> int:
        return 0

    def identity_bias(self, strength: float) -> Tensor:
        return torch.zeros(0)

    def forward(self, logits: Tensor) -> None:
        return None


CONSTRAINTS: dict[str, type[ResConstraint]] = {
    c.name: c for c in (SinkhornConstraint, PermutationMixture, IdentityConstraint)
}

"""mhckit: Manifold-Constrained Hyper-Connections (mHC, DeepSeek-AI, arXiv 2512.24880) and its family.

Quick start::

    import torch, mhckit
    hcs = [mhckit.HyperConnection(64, block, n_streams=4, variant="mhc", layer_index=i)
           for i, block in enumerate(blocks)]
    x = mhckit.expand_streams(h, hcs[0].n_streams)   # [..., C] -> [..., n, C], once
    for hc in hcs:
        x = hc(x)                                     # [..., n, C] -> [..., n, C]
    h = mhckit.reduce_streams(x, mode="mean")         # [..., n, C] -> [..., C], once

Modules: :mod:`mhckit.reference` (the spec), :mod:`mhckit.functional` (fast default path),
:mod:`mhckit.constraints` (``h_res`` parametrisations), :mod:`mhckit.modules`,
:mod:`mhckit.diagnostics`. ``with mhckit.check_finite():`` makes every op raise on NaN / Inf.
"""

from . import constraints, diagnostics, functional, reference
from ._validate import NonFiniteError, check_finite
from .config import INITS, VARIANTS, MHCConfig
from .modules import HyperConnection, ReduceStreams, StreamHead, expand_streams, reduce_streams

__version__ = "0.1.0"

__all__ = [
    "HyperConnection",
    "MHCConfig",
    "StreamHead",
    "ReduceStreams",
    "expand_streams",
    "reduce_streams",
    "check_finite",
    "NonFiniteError",
    "VARIANTS",
    "INITS",
    "reference",
    "functional",
    "constraints",
    "diagnostics",
    "__version__",
]

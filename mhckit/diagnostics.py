"""Stability diagnostics of the stream-mixing matrices (mHC, arXiv 2512.24880, Fig. 3 and 7).

Pure functions on lists of ``h_res`` (one tensor per sublayer, in execution order, each
``[..., n, n]`` per token, or ``[n, n]``), plus :func:`record_coefficients` to collect them from
a model. Everything returns plain dicts of float tensors.

The paper's "Amax Gain Magnitude" of a composite mapping ``P = H_l ... H_1``: the forward
signal gain ``max_k |sum_j P[k, j]|`` (max absolute row sum) and the backward gradient gain
``max_j |sum_k P[k, j]|`` (max absolute column sum); ideal 1. The paper averages the per-token
matrices over the sequence before taking the max (``token_reduce="mean"``); ``"max"`` takes the
worst token instead. A max hides attenuation, so :func:`gain_report` also gives
``max |log column sum|`` (a 0.41 column sum is a 2.4x gradient attenuation Amax cannot show).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._validate import check_choice, check_square

__all__ = [
    "composite_products",
    "amax_gain",
    "gain_report",
    "identity_distance",
    "hres_stats",
    "record_coefficients",
    "CoefficientRecord",
]

TOKEN_REDUCE = ("mean", "max")


def _as_tokens(h: Tensor, name: str) -> Tensor:
    """``[..., n, n] -> [T, n, n]`` in float64 (a plain ``[n, n]`` is one token)."""
    n = check_square(h, name)
    return h.detach().to(torch.float64).reshape(-1, n, n)


def _check_list(h_res: Sequence[Tensor]) -> list[Tensor]:
    if len(h_res) == 0:
        raise ValueError("h_res: got an empty list; expected one [..., n, n] tensor per sublayer")
    mats = [_as_tokens(h, f"h_res[{i}]") for i, h in enumerate(h_res)]
    shape = mats[0].shape
    for i, m in enumerate(mats):
        if m.shape != shape:
            raise ValueError(f"h_res[{i}].shape: got {tuple(m.shape)} tokens x n x n; expected {tuple(shape)} like h_res[0]")
    return mats


def composite_products(h_res: Sequence[Tensor], order: str = "prefix") -> list[Tensor]:
    """Per-token composite mappings over depth, each ``[T, n, n]`` (float64).

    ``order="prefix"``: entry ``l`` is ``H_l ... H_1`` (from the first sublayer to ``l``, what the
    paper plots). ``order="suffix"``: entry ``l`` is ``H_L ... H_l`` (from ``l`` to the last).
    """
    check_choice(order, "order", ("prefix", "suffix"))
    mats = _check_list(h_res)
    out: list[Tensor] = []
    if order == "prefix":
        acc = None
        for h in mats:
            acc = h if acc is None else h @ acc
            out.append(acc)
        return out
    acc = None
    for h in reversed(mats):
        acc = h if acc is None else acc @ h
        out.append(acc)
    return out[::-1]


def _reduce_matrices(p: Tensor, token_reduce: str) -> tuple[Tensor, Tensor]:
    """Row and column sums ``([.., n], [.., n])`` of the token-mean matrix, or per token for "max"."""
    if token_reduce == "mean":
        p = p.mean(dim=0, keepdim=True)
    return p.sum(dim=-1), p.sum(dim=-2)


def amax_gain(p: Tensor, token_reduce: str = "mean") -> tuple[float, float]:
    """``(forward, backward)`` Amax gain of one mapping ``[..., n, n]``: max |row sum|, max |column sum|."""
    check_choice(token_reduce, "token_reduce", TOKEN_REDUCE)
    rows, cols = _reduce_matrices(_as_tokens(p, "p"), token_reduce)
    return rows.abs().max().item(), cols.abs().max().item()


def identity_distance(h_res: Sequence[Tensor]) -> Tensor:
    """``[L]``: token-mean Frobenius distance ``||H - I||_F`` of each sublayer's ``h_res``."""
    mats = _check_list(h_res)
    eye = torch.eye(mats[0].shape[-1], dtype=torch.float64)
    return torch.stack([torch.linalg.matrix_norm(m - eye).mean() for m in mats])


def gain_report(h_res: Sequence[Tensor], token_reduce: str = "mean") -> dict[str, Tensor]:
    """Gains of the composite mappings over depth; every value is a float64 tensor ``[L]``.

    Keys: ``forward_gain`` / ``backward_gain`` / ``max_abs_log_colsum`` of the prefix composites
    ``H_l ... H_1``; ``suffix_forward_gain`` / ``suffix_backward_gain`` /
    ``suffix_max_abs_log_colsum`` of ``H_L ... H_l``; ``identity_distance`` of each ``h_res``.
    """
    check_choice(token_reduce, "token_reduce", TOKEN_REDUCE)
    report: dict[str, Tensor] = {}
    for order, prefix in (("prefix", ""), ("suffix", "suffix_")):
        fwd, bwd, logc = [], [], []
        for p in composite_products(h_res, order):
            rows, cols = _reduce_matrices(p, token_reduce)
            fwd.append(rows.abs().max())
            bwd.append(cols.abs().max())
            logc.append(cols.abs().log().abs().max())
        report[prefix + "forward_gain"] = torch.stack(fwd)
        report[prefix + "backward_gain"] = torch.stack(bwd)
        report[prefix + "max_abs_log_colsum"] = torch.stack(logc)
    report["identity_distance"] = identity_distance(h_res)
    return report


def hres_stats(h: Tensor) -> dict[str, float]:
    """Summary of one sublayer's ``h_res`` ``[..., n, n]`` over tokens."""
    m = _as_tokens(h, "h")
    n = m.shape[-1]
    eye = torch.eye(n, dtype=m.dtype)
    rows, cols = m.sum(dim=-1), m.sum(dim=-2)
    return {
        "min": m.min().item(),
        "max": m.max().item(),
        "diag_mean": m.diagonal(dim1=-2, dim2=-1).mean().item(),
        "max_row_sum_err": (rows - 1).abs().max().item(),
        "max_col_sum_err": (cols - 1).abs().max().item(),
        "identity_distance": torch.linalg.matrix_norm(m - eye).mean().item(),
    }


@dataclass
class CoefficientRecord:
    """Coefficients of one call of one :class:`~mhckit.HyperConnection` (detached)."""

    name: str
    h_pre: Tensor
    h_post: Tensor
    h_res: Tensor | None  # None for the identity variant


class _Sink:
    def __init__(self, name: str, out: list[CoefficientRecord]):
        self.name, self.out = name, out

    def append(self, coeffs: tuple) -> None:
        self.out.append(CoefficientRecord(self.name, *coeffs))


@contextmanager
def record_coefficients(model: nn.Module) -> Iterator[list[CoefficientRecord]]:
    """Collect every hyper-connection's coefficients, in execution order, while the block runs::

        with record_coefficients(model) as records:
            model(tokens)
        report = gain_report([r.h_res for r in records])
    """
    from .modules import HyperConnection

    records: list[CoefficientRecord] = []
    hcs = [(name, m) for name, m in model.named_modules() if isinstance(m, HyperConnection)]
    for name, m in hcs:
        m._capture = _Sink(name, records)
    try:
        yield records
    finally:
        for _, m in hcs:
            m._capture = None

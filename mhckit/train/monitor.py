"""Training-time diagnostics of the hyper-connections (mHC paper, Fig. 3, 7 and 8 analogues).

:func:`collect` runs one fixed probe batch through the model and returns a JSON-ready dict:
per-sublayer statistics of ``h_res``, ``h_pre`` and ``h_post``; the composite forward and
backward Amax gains from the first sublayer to each ``l`` and from each ``l`` to the last;
``max |log column sum|``; distance from the identity; the mean cosine similarity between the
streams entering the final collapse (1 = collapsed to one stream); and the token-averaged
``h_res`` of every sublayer plus their composite (for heatmaps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..diagnostics import composite_products, gain_report, hres_stats, record_coefficients


def stream_cosine(x: Tensor) -> float:
    """Mean pairwise cosine similarity between the ``n`` streams of ``x: [..., n, C]``."""
    n = x.shape[-2]
    if n < 2:
        return 1.0
    u = torch.nn.functional.normalize(x.detach().float(), dim=-1)
    sim = u @ u.transpose(-1, -2)  # [..., n, n]
    off = (sim.sum(dim=(-1, -2)) - sim.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    return off.mean().item()


def _vec_stats(t: Tensor) -> dict[str, float]:
    t = t.double()
    return {"mean": t.mean().item(), "min": t.min().item(), "max": t.max().item(), "sum_mean": t.sum(-1).mean().item()}


@torch.no_grad()
def collect(model: nn.Module, tokens: Tensor) -> dict[str, Any]:
    """Diagnostics of ``model`` on the probe batch ``tokens [B, T]`` (model left in eval mode off)."""
    was_training = model.training
    model.eval()
    streams: list[Tensor] = []
    reduce = getattr(model, "reduce", None)
    handle = reduce.register_forward_pre_hook(lambda m, args: streams.append(args[0])) if reduce is not None else None
    try:
        with record_coefficients(model) as records:
            model(tokens)
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    out: dict[str, Any] = {"stream_cosine": stream_cosine(streams[0]) if streams else None, "sublayers": []}
    for r in records:
        entry = {"name": r.name, "h_pre": _vec_stats(r.h_pre), "h_post": _vec_stats(r.h_post)}
        if r.h_res is not None:
            entry["h_res"] = hres_stats(r.h_res)
            entry["h_res_mean"] = r.h_res.double().reshape(-1, *r.h_res.shape[-2:]).mean(0).tolist()
        out["sublayers"].append(entry)
    mats = [r.h_res for r in records if r.h_res is not None]
    if mats:
        report = gain_report(mats)
        out.update({k: v.tolist() for k, v in report.items()})
        out["composite_mean"] = composite_products(mats, "prefix")[-1].mean(0).tolist()
        out["max_forward_gain"] = max(report["forward_gain"].max().item(), report["suffix_forward_gain"].max().item())
        out["max_backward_gain"] = max(report["backward_gain"].max().item(), report["suffix_backward_gain"].max().item())
    return out

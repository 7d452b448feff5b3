"""A compact GPT whose residual variant is one config field.

Pre-norm blocks (RMSNorm), causal self-attention through ``scaled_dot_product_attention`` with
RoPE, a SwiGLU MLP, tied or untied embeddings. Attention and MLP are separate hyper-connection
sublayers (layer indices ``2i`` and ``2i + 1``); the streams are expanded once after the
embedding and reduced once before the final norm. ``GPTConfig.hc.variant = "residual"`` gives a
plain pre-norm GPT, bit for bit.

Shape legend: ``B`` batch, ``T`` time, ``n`` streams, ``C`` width, ``H`` heads, ``D`` head dim,
``V`` vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import recompute
from .._validate import check_bool, check_choice, check_positive
from ..config import MHCConfig
from ..modules import REDUCE_MODES, HyperConnection, ReduceStreams, expand_streams
from ..recompute import StreamRecompute, default_interval


@dataclass
class GPTConfig:
    vocab_size: int = 256  # V (256 for the byte tokenizer)
    seq_len: int = 128  # maximum context T (RoPE table size)
    n_layer: int = 4  # transformer blocks (2 hyper-connection sublayers each)
    n_head: int = 4  # attention heads H
    d_model: int = 128  # width C
    mlp_hidden: int = 0  # SwiGLU hidden width; 0 means 8/3 * C rounded up to a multiple of 16
    tie_embeddings: bool = True  # share the token embedding and the LM head
    rope_base: float = 10000.0  # RoPE frequency base
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # std of weight init; output projections are scaled by 1/sqrt(2 n_layer)
    reduce: str = "mean"  # stream collapse before the final norm: "mean", "sum" or "head"
    recompute: int = 0  # keep streams every L_r sublayers (mHC 4.3); 0 off, -1 sqrt(nL/(n+2)); compiled: L_r/2 blocks
    hc: MHCConfig = field(default_factory=MHCConfig)  # the hyper-connection (variant, n_streams, ...)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: got {v!r}; expected a positive int")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"d_model: got {self.d_model} with n_head={self.n_head}; expected d_model divisible by "
                "n_head with an even head dim (RoPE)"
            )
        if isinstance(self.recompute, bool) or not isinstance(self.recompute, int) or self.recompute < -1:
            raise ValueError(f"recompute: got {self.recompute!r}; expected 0 (off), -1 (auto) or an int >= 1")
        if isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden: got {self.mlp_hidden!r}; expected an int >= 0 (0 = 8/3 * d_model "
                             "rounded up to a multiple of 16)")
        for name in ("rope_base", "norm_eps", "init_std"):
            check_positive(getattr(self, name), name)
        check_choice(self.reduce, "reduce", REDUCE_MODES)
        check_bool(self.tie_embeddings, "tie_embeddings")
        self.hc = _mhc_config(self.hc)

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 16 * math.ceil(8 * self.d_model / 3 / 16)


def _mhc_config(hc: object) -> MHCConfig:
    """``GPTConfig.hc`` as an :class:`MHCConfig`: a dict is checked key by key (errors name ``hc.<key>``)."""
    if isinstance(hc, MHCConfig):
        return hc
    if not isinstance(hc, dict):
        raise ValueError(f"hc: got {type(hc).__name__}; expected an MHCConfig or a dict of its fields")
    names = sorted(f.name for f in fields(MHCConfig))
    unknown = sorted((k for k in hc if k not in names), key=str)
    if unknown:
        raise ValueError(f"hc: got unknown keys {unknown}; expected keys among {names}")
    try:
        return MHCConfig(**hc)
    except ValueError as e:  # "n_streams: got 0; ..." -> "hc.n_streams: got 0; ..."
        msg = str(e)
        raise ValueError(f"hc.{msg}" if msg.split(":", 1)[0] in names else msg) from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_table(seq_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [D/2]
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)  # [T, D/2]
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the head dim; ``x: [B, H, T, D]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    """Branch ``RMSNorm -> causal multi-head attention with RoPE``: ``[B, T, C] -> [B, T, C]``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        cos, sin = rope_table(cfg.seq_len, cfg.d_model // cfg.n_head, cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, u: Tensor) -> Tensor:
        b, t, c = u.shape
        q, k, v = self.qkv(self.norm(u)).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        cos, sin = self.cos[:t], self.sin[:t]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """Branch ``RMSNorm -> SwiGLU``: ``[..., C] -> [..., C]``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.hidden, bias=False)
        self.out = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, u: Tensor) -> Tensor:
        gate, up = self.gate_up(self.norm(u)).chunk(2, dim=-1)
        return self.out(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, index: int):
        super().__init__()
        self.index = index
        self.attn = HyperConnection(cfg.d_model, Attention(cfg), layer_index=2 * index, config=cfg.hc)
        self.mlp = HyperConnection(cfg.d_model, MLP(cfg), layer_index=2 * index + 1, config=cfg.hc)

    def forward(self, x: Tensor) -> Tensor:
        rc = recompute.active()
        if rc is not None:
            rc.at_sublayer(2 * self.index, x)
        x = self.attn(x)
        if rc is not None:
            rc.at_sublayer(2 * self.index + 1, x)
        return self.mlp(x)


class GPT(nn.Module):
    """``tokens [B, T] -> logits [B, T, V]`` (and the mean cross-entropy if ``targets`` are given)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.n_streams = cfg.hc.streams
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.reduce = ReduceStreams(cfg.d_model, self.n_streams, cfg.reduce)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; output projections scaled by ``1/sqrt(2 n_layer)``, and by
        ``1/sqrt(n)`` more when the streams are summed at the end (HC, arXiv 2409.19606)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layer)
        if self.cfg.reduce == "sum":
            out_std /= math.sqrt(self.n_streams)
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            for branch in (block.attn.branch, block.mlp.branch):
                for name, p in branch.named_parameters():
                    if name.endswith("norm.weight"):
                        nn.init.ones_(p)
                    else:
                        nn.init.normal_(p, std=out_std if name.startswith("out.") else std)

    @property
    def recompute_interval(self) -> int:
        """``L_r`` in sublayers (0 when recomputation is off or there is a single stream)."""
        r = self.cfg.recompute
        if r == 0 or self.n_streams == 1:
            return 0
        return default_interval(self.n_streams, 2 * self.cfg.n_layer) if r == -1 else r

    @property
    def compiled_recompute_blocks(self) -> int:
        """Blocks per kept stream tensor under ``torch.compile``: ``L_r / 2`` rounded, at least 1 (the
        compiled groups are whole blocks, see :func:`mhckit.recompute.sequential`); 0 when off."""
        every = self.recompute_interval
        return max(1, round(every / 2)) if every else 0

    def _recompute(self):
        every = self.recompute_interval
        return StreamRecompute(every) if every and torch.is_grad_enabled() else contextlib.nullcontext()

    def forward(self, tokens: Tensor, targets: Tensor | None = None):
        if tokens.dim() != 2 or tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(f"tokens.shape: got {tuple(tokens.shape)}; expected [B, T] with T <= seq_len={self.cfg.seq_len}")
        x = expand_streams(self.embed(tokens), self.n_streams)  # [B, T, n, C]
        if self.recompute_interval and torch.compiler.is_compiling():
            # saved-tensor hooks do not trace: checkpoint regions of whole blocks (recompute.sequential)
            x = recompute.sequential(self.blocks, x, self.compiled_recompute_blocks)
        else:
            with self._recompute():
                for block in self.blocks:
                    x = block(x)
        logits = self.head(self.norm(self.reduce(x)))  # [B, T, V]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

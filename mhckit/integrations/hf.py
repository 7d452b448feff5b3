"""Retrofit a Hugging Face decoder with hyper-connections (mHC, DeepSeek-AI, arXiv 2512.24880).

``retrofit(model)`` turns a trained pre-norm residual decoder from ``transformers`` 5.x into an
n-stream hyper-connection model, in place, without changing what it computes at step 0::

    from transformers import AutoModelForCausalLM
    from mhckit.integrations.hf import retrofit, save_retrofit, load_retrofit

    model = AutoModelForCausalLM.from_pretrained("path/to/llama")
    retrofit(model, n_streams=4, variant="mhc")   # same logits as before, streams free to diverge
    ...                                           # continue training; generate() works (KV cache)
    save_retrofit(model, "out/")                  # safetensors + an "mhckit" entry in config.json
    model = load_retrofit("out/")

What changes (the layout of mhckit's own GPT, :mod:`mhckit.models.gpt`): the hidden states are
expanded to ``n`` streams ``[B, T, n, C]`` once, on entry to the first decoder layer (i.e. right
after the embeddings, and after GPT-2's position embeddings); every attention sublayer
(``input_layernorm -> self_attn``) and every MLP sublayer (``post_attention_layernorm -> mlp``) is the
branch of its own :class:`~mhckit.HyperConnection` (layer indices ``2i`` and ``2i + 1``, home stream
``index mod n``); the streams are reduced once, by the mean, inside the final norm, before it
normalises. Attention keyword arguments (position embeddings, masks, the KV cache) reach the
attention module unchanged, so ``generate()`` and caching work as before. The decoder layers and the
final norm get a subclass of their own class (``layer.__class__`` is swapped, the way FSDP2 wraps
modules), so parameter names of the original model do not change and the new parameters live at
``<layer>.mhc_attn.*``, ``<layer>.mhc_mlp.*`` (and ``<norm>.mhc_reduce.*`` for a learned head).

Initialisation (``init=``, default ``"mean-preserving"``). Every coefficient module starts with
``phi = 0``, so the input-dependent part ``alpha * (v @ phi) / r`` of mHC Eq. 7-9 is exactly zero at
step 0 (it gets gradient through ``phi`` at once, and ``alpha`` follows when ``phi`` is non-zero); the
coefficients are then the bias terms alone:

* ``"mean-preserving"`` (default): ``h_pre = 1/n`` (the branch reads the mean of the streams),
  ``h_post`` with mean 1 (``1 + post_spread`` on the home stream, less on the others) and ``h_res`` a
  symmetric soft identity, which is doubly stochastic. The column sums of ``h_res`` being 1 and the
  mean of ``h_post`` being 1 make the *mean* of the streams follow the residual recursion
  ``m <- m + f(m)`` exactly, whatever the streams are, and the mean collapse returns it: the logits
  equal the original's (to float rounding, ~1e-7 relative per sublayer). The streams themselves
  differ from the first sublayer on (the home stream gets more of each update), so ``h_res`` has
  something to mix and the streams can specialise once training starts.
* ``"preserving"``: also exact, but the streams stay identical copies at step 0 (pre weights sum to
  1, ``h_post = 1``, ``h_res`` row-stochastic), and identical streams get nearly identical gradients:
  in this repository's runs they stayed near-copies, which leaves mHC with nothing to mix.
* ``"identity"`` (the public mHC code's start): ``sum h_pre = sigmoid(1) + (n-1) sigmoid(-1) != 1``,
  so the branches read a scaled copy of the state. A pre-norm branch hides the scale except through
  its norm's ``eps``, so the logits are close (~1e-3 relative on tiny random models) but not equal.

One more property of the default, worth knowing when reading early training curves: with uniform
reads and a mean collapse the loss at step 0 depends on the streams only through their mean, which
no doubly stochastic ``h_res`` changes, so ``h_res`` gets no gradient at the very first step. The
reads do (``<du, x_j>`` differs between the differing streams), and once ``h_pre`` is not uniform
``h_res`` is trained too. Under ``"preserving"`` the streams are copies and that gradient is ~1000x
smaller (measured on a 2-layer Llama).

For ``variant="hc"`` (arXiv 2409.19606) both presets give HC's Pre-Norm-equivalent start (static
``H_pre`` one-hot on the home stream, ``H_post = 1``, ``H_res = I``, dynamic weights 0): exact, with
copies at step 0 that separate through the one-hot reads. ``variant="residual"`` keeps one stream and
computes exactly what the original model computes (``x + f(x)``, bit for bit). Only ``reduce="mean"``
(or ``"head"``, a learned :class:`~mhckit.StreamHead` that starts as the mean) preserves the function.

Supported: Llama, Qwen2, Qwen3 and Mistral (``*ForCausalLM`` or the bare ``*Model``) and GPT-2
(``GPT2LMHeadModel`` / ``GPT2Model``, without cross-attention). With ``output_hidden_states=True`` the
per-layer hidden states are the streams ``[B, T, n, C]``. The new parameters are float32 (float64 in a
float64 model), whatever the model's dtype, on the device of the layer they sit in: the coefficients
are computed in fp32 anyway, and a bf16 bias would put ``sum h_pre`` ~1e-3 away from 1. A later
``model.to(dtype)`` casts them too.

Precision of the start: in exact arithmetic the default start is the original function; in floating
point the stream mixing adds rounding. Measured on SmolLM2-135M in float32 (its residual stream carries
~2e4-sized outlier features that later layers cancel, which magnifies any rounding): max |logit
difference| / max |logit| 3.5e-6 to 1.1e-5 over four batches (Frobenius ratio ~1.5e-6), while the
unmodified float32 model is itself 3.1e-6 away from its float64 evaluation; on the 2-layer test models
it is ~3e-7.

Gradient checkpointing (``model.gradient_checkpointing_enable()``; ``activation_checkpointing_enable()``
from transformers 5.24) works, re-entrant or not, with every backend (the fused ``torch`` backend's
Functions read ``ctx.saved_tensors`` once, as the non-reentrant checkpoint requires); tested.

GGUF files load without ``accelerate`` through :func:`load_gguf` (``transformers``' own GGUF
reader, dequantised to a plain float model that can be trained and retrofitted).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import check_choice, check_n_streams
from ..config import VARIANTS, MHCConfig
from ..modules import HyperConnection, ReduceStreams, expand_streams

__all__ = [
    "retrofit",
    "is_retrofitted",
    "retrofit_config",
    "save_retrofit",
    "load_retrofit",
    "load_gguf",
    "stream_spread",
    "hc_diagnostics",
    "hyper_connections",
    "SUPPORTED",
    "CONFIG_KEY",
]

CONFIG_KEY = "mhckit"  # the entry of config.json that records a retrofit
FORMAT = 1
REDUCE_MODES = ("mean", "head")


# --------------------------------------------------------------------------- the decoder layers


def _enter(layer: nn.Module, hidden_states: Tensor) -> Tensor:
    """Expand ``[B, T, C]`` to the streams in the first layer; later layers must get streams."""
    n = layer.mhc_attn.n_streams
    if layer._mhc_first:
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states.shape: got {tuple(hidden_states.shape)}; the first retrofitted "
                             "decoder layer expects the embeddings [B, T, C]")
        return expand_streams(hidden_states, n)  # [B, T, n, C]
    if hidden_states.dim() != 4 or hidden_states.shape[-2] != n:
        raise ValueError(f"hidden_states.shape: got {tuple(hidden_states.shape)}; a retrofitted decoder layer "
                         f"after the first expects streams [B, T, n={n}, C] (run the layers in order from 0)")
    return hidden_states


_CACHE_KWARG: dict[type, str] = {}


def _cache_kwarg(attn) -> str:
    """The name under which ``attn`` takes the KV cache: ``cache`` from transformers 5.24 on (the old
    ``past_key_values`` is deprecated there), else ``past_key_values``."""
    kind = type(attn)
    if kind not in _CACHE_KWARG:
        params = inspect.signature(kind.forward).parameters
        _CACHE_KWARG[kind] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[kind]


def _llama_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                         use_cache=False, position_embeddings=None, **kwargs):
    """Llama / Qwen2 / Qwen3 / Mistral decoder layer with two hyper-connection sublayers."""
    x = _enter(self, hidden_states)  # [B, T, n, C]
    u, finish = self.mhc_attn.split(x)  # u: [B, T, C]
    if past_key_values is not None:  # positional (GPT-2 in transformers >= 5.24) or the old keyword
        kwargs[_cache_kwarg(self.self_attn)] = past_key_values
    y, _ = self.self_attn(hidden_states=self.input_layernorm(u), attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=use_cache,
                          position_embeddings=position_embeddings, **kwargs)
    x = finish(y)
    u, finish = self.mhc_mlp.split(x)
    return finish(self.mlp(self.post_attention_layernorm(u)))


def _gpt2_block_forward(self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None,
                        encoder_attention_mask=None, use_cache=False, **kwargs):
    """GPT-2 block (``ln_1 -> attn``, ``ln_2 -> mlp``) with two hyper-connection sublayers."""
    if encoder_hidden_states is not None:
        raise ValueError("encoder_hidden_states: got a tensor; a retrofitted GPT-2 has no cross-attention")
    x = _enter(self, hidden_states)
    u, finish = self.mhc_attn.split(x)
    if past_key_values is not None:  # positional (transformers >= 5.24) or the old keyword
        kwargs[_cache_kwarg(self.attn)] = past_key_values
    y, _ = self.attn(self.ln_1(u), attention_mask=attention_mask, use_cache=use_cache, **kwargs)
    x = finish(y)
    u, finish = self.mhc_mlp.split(x)
    return finish(self.mlp(self.ln_2(u)))


def _reducing_norm_forward(self, hidden_states, *args, **kwargs):
    """The final norm, after collapsing the streams ``[B, T, n, C] -> [B, T, C]``."""
    n = self._mhc_streams
    if hidden_states.dim() != 4 or hidden_states.shape[-2] != n:
        raise ValueError(f"hidden_states.shape: got {tuple(hidden_states.shape)}; the retrofitted final norm "
                         f"expects the streams [B, T, n={n}, C] of the last decoder layer")
    return type(self)._mhc_base.forward(self, self.mhc_reduce(hidden_states), *args, **kwargs)


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its decoder and what its layers look like."""

    name: str
    model_type: str  # config.model_type
    backbone: str  # attribute of the *ForCausalLM that holds the decoder
    layers: str  # the ModuleList of decoder layers
    norm: str  # the final norm
    layer_class: str  # class name of a decoder layer whose forward we know
    forward: Any


SUPPORTED = {
    f.model_type: f
    for f in (
        Family("Llama", "llama", "model", "layers", "norm", "LlamaDecoderLayer", _llama_layer_forward),
        Family("Qwen2", "qwen2", "model", "layers", "norm", "Qwen2DecoderLayer", _llama_layer_forward),
        Family("Qwen3", "qwen3", "model", "layers", "norm", "Qwen3DecoderLayer", _llama_layer_forward),
        Family("Mistral", "mistral", "model", "layers", "norm", "MistralDecoderLayer", _llama_layer_forward),
        Family("GPT-2", "gpt2", "transformer", "h", "ln_f", "GPT2Block", _gpt2_block_forward),
    )
}
_SUPPORTED_TEXT = ("Llama, Qwen2, Qwen3, Mistral (*ForCausalLM or *Model) and GPT-2 (GPT2LMHeadModel / "
                   "GPT2Model) from transformers 5.x")

_CLASSES: dict[tuple[type, str], type] = {}


def _subclass(base: type, tag: str, forward) -> type:
    """A cached subclass of ``base`` whose ``forward`` is ``forward`` (``_mhc_base`` keeps ``base``)."""
    key = (base, tag)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"MHC{base.__name__}", (base,),
                             {"forward": forward, "_mhc_base": base, "__module__": __name__,
                              "__doc__": f"{base.__name__} retrofitted by mhckit ({tag})."})
    return _CLASSES[key]


# --------------------------------------------------------------------------- retrofit


def _family_and_backbone(model: nn.Module) -> tuple[Family, nn.Module]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, nn.Module) or model_type not in SUPPORTED:
        given = type(model).__name__ + (f" (model_type={model_type!r})" if model_type else "")
        raise ValueError(f"model: got {given}; expected a transformers decoder: {_SUPPORTED_TEXT}")
    fam = SUPPORTED[model_type]
    backbone = getattr(model, fam.backbone, model)
    layers, norm = getattr(backbone, fam.layers, None), getattr(backbone, fam.norm, None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module) or len(layers) == 0:
        raise ValueError(f"model: got {type(model).__name__} without {fam.backbone}.{fam.layers} / "
                         f"{fam.backbone}.{fam.norm}; expected {_SUPPORTED_TEXT}")
    return fam, backbone


def is_retrofitted(model: nn.Module) -> bool:
    """True when ``model`` has been through :func:`retrofit`."""
    return isinstance(getattr(getattr(model, "config", None), CONFIG_KEY, None), dict) and any(
        isinstance(m, HyperConnection) for m in model.modules())


def retrofit_config(model: nn.Module) -> dict:
    """The retrofit's settings (``variant``, ``n_streams``, ``init``, ``reduce``, ... as in config.json)."""
    if not is_retrofitted(model):
        raise ValueError(f"model: got {type(model).__name__} that is not retrofitted; call retrofit(model) first")
    return dict(getattr(model.config, CONFIG_KEY))


def hyper_connections(model: nn.Module) -> list[HyperConnection]:
    """The retrofit's hyper-connections in execution order (attention, MLP, attention, ...)."""
    return [m for m in model.modules() if isinstance(m, HyperConnection)]


def _mhc_config(variant: str, n_streams: int, init: str, cfg: dict) -> MHCConfig:
    check_choice(variant, "variant", VARIANTS)
    check_n_streams(n_streams)
    known = {f.name for f in fields(MHCConfig)} - {"variant", "n_streams", "init"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"cfg: got unknown option(s) {', '.join(map(repr, unknown))}; expected MHCConfig fields "
                         + ", ".join(sorted(known)))
    return MHCConfig(variant=variant, n_streams=n_streams, init=init, **cfg)


def retrofit(model: nn.Module, n_streams: int = 4, variant: str = "mhc", init: str = "mean-preserving", *,
             reduce: str = "mean", **cfg) -> nn.Module:
    """Turn every attention and MLP sublayer of ``model`` into a hyper-connection, in place.

    Args:
        model: a supported ``transformers`` decoder (see :data:`SUPPORTED`); returned, modified.
        n_streams: ``n``, the number of residual streams (``variant="residual"`` keeps one).
        variant: ``"mhc"``, ``"hc"``, ``"mhc-lite"``, ``"identity"`` or ``"residual"``
            (see :data:`mhckit.config.VARIANTS`).
        init: ``"mean-preserving"`` (default: same logits at step 0, streams differ from the start),
            ``"preserving"`` (same logits, streams start as copies) or ``"identity"`` (close to the
            original logits, not equal); see the module docstring.
        reduce: the collapse before the final norm, ``"mean"`` or ``"head"`` (learned, starts as the mean).
        **cfg: further :class:`~mhckit.MHCConfig` fields (``sinkhorn_iters``, ``alpha_init``,
            ``res_init_strength``, ``post_spread``, ``backend``, ...).

    The settings are stored in ``model.config.mhckit`` so that ``save_pretrained`` records them.
    """
    fam, backbone = _family_and_backbone(model)
    if is_retrofitted(model) or any(isinstance(m, HyperConnection) for m in model.modules()):
        done = getattr(model.config, CONFIG_KEY, None) or {}
        raise ValueError(f"model: got a {type(model).__name__} that is already retrofitted (variant="
                         f"{done.get('variant')!r}, n_streams={done.get('n_streams')}); retrofit a fresh model")
    check_choice(reduce, "reduce", REDUCE_MODES)
    hc_cfg = _mhc_config(variant, n_streams, init, cfg)
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError("model: got a GPT-2 with add_cross_attention=True; expected a decoder-only model")
    layers, norm = getattr(backbone, fam.layers), getattr(backbone, fam.norm)
    for layer in layers:
        if type(layer).__name__ != fam.layer_class:
            raise ValueError(f"model: got a decoder layer of type {type(layer).__name__}; expected "
                             f"{fam.layer_class} (its forward is what the retrofit re-implements)")
    dim = int(model.config.hidden_size)
    for i, layer in enumerate(layers):
        ref = next(layer.parameters())
        kw = dict(device=ref.device, dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32)
        layer.mhc_attn = HyperConnection(dim, layer_index=2 * i, config=hc_cfg).to(**kw)
        layer.mhc_mlp = HyperConnection(dim, layer_index=2 * i + 1, config=hc_cfg).to(**kw)
        layer._mhc_first = i == 0
        layer.__class__ = _subclass(type(layer), fam.name, fam.forward)
    norm.mhc_reduce = ReduceStreams(dim, hc_cfg.streams, reduce if hc_cfg.streams > 1 else "mean").to(**kw)
    norm._mhc_streams = hc_cfg.streams
    norm.__class__ = _subclass(type(norm), "reduce", _reducing_norm_forward)
    setattr(model.config, CONFIG_KEY, {"format": FORMAT, "reduce": reduce, **hc_cfg.to_dict()})
    return model


# --------------------------------------------------------------------------- diagnostics


@torch.no_grad()
def stream_spread(model: nn.Module, input_ids: Tensor, **kwargs) -> float:
    """How different the streams are on entry to the final norm: ``||x - mean_k x||_F / ||mean_k x||_F``.

    0 when the n streams are copies of each other (and always 0 for one stream).
    """
    fam, backbone = _family_and_backbone(model)
    if not is_retrofitted(model):
        raise ValueError(f"model: got {type(model).__name__} that is not retrofitted; call retrofit(model) first")
    seen: list[Tensor] = []
    handle = getattr(backbone, fam.norm).mhc_reduce.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        model(input_ids=input_ids, use_cache=False, **kwargs)
    finally:
        handle.remove()
    x = seen[-1].float()  # [B, T, n, C]
    mean = x.mean(dim=-2, keepdim=True)
    return ((x - mean).norm() / mean.norm().clamp_min(1e-30) * x.shape[-2] ** -0.5).item()


@torch.no_grad()
def hc_diagnostics(model: nn.Module, input_ids: Tensor) -> dict[str, float]:
    """Stability and usage diagnostics of a retrofitted model on one batch (mHC Fig. 3 / 7 metrics).

    ``forward_gain`` / ``backward_gain``: Amax gains (max |row| / |column| sum) of the composite
    ``h_res`` product over all sublayers, token-averaged (:func:`mhckit.diagnostics.gain_report`);
    ``max_*`` over depth, ``max_abs_log_colsum`` the worst attenuation or amplification;
    ``hres_identity_distance`` the mean ``||h_res - I||_F``; ``hres_min`` the smallest entry;
    ``h_pre_uniform_dev`` the mean ``|h_pre - 1/n|``; ``h_post_mean`` the mean write weight;
    ``stream_spread`` from :func:`stream_spread`. Keys whose inputs are missing (a plain residual has
    no coefficients, ``variant="identity"`` no ``h_res``) are left out.
    """
    from ..diagnostics import gain_report, hres_stats, record_coefficients

    was_training = model.training
    model.eval()
    try:
        with record_coefficients(model) as records:
            model(input_ids=input_ids, use_cache=False)
        out: dict[str, float] = {"stream_spread": stream_spread(model, input_ids)}
    finally:
        model.train(was_training)
    if records:
        n = records[0].h_pre.shape[-1]
        out["h_pre_uniform_dev"] = torch.stack([(r.h_pre.float() - 1.0 / n).abs().mean() for r in records]).mean().item()
        out["h_post_mean"] = torch.stack([r.h_post.float().mean() for r in records]).mean().item()
    h_res = [r.h_res for r in records if r.h_res is not None]
    if h_res:
        rep = gain_report(h_res)
        stats = [hres_stats(h) for h in h_res]
        out.update(
            forward_gain=rep["forward_gain"][-1].item(),
            backward_gain=rep["backward_gain"][-1].item(),
            max_forward_gain=rep["forward_gain"].max().item(),
            max_backward_gain=rep["backward_gain"].max().item(),
            max_abs_log_colsum=rep["max_abs_log_colsum"].max().item(),
            hres_identity_distance=rep["identity_distance"].mean().item(),
            hres_min=min(s["min"] for s in stats),
        )
    return out


# --------------------------------------------------------------------------- save and load


def save_retrofit(model: nn.Module, path, *, tokenizer=None) -> Path:
    """Write a retrofitted model with ``save_pretrained`` (safetensors, no pickle) to ``path``.

    ``config.json`` carries the retrofit's settings under ``"mhckit"``; ``tokenizer`` (optional) is
    saved beside it. Reload with :func:`load_retrofit`. (A plain ``from_pretrained`` of the folder
    would load the original weights and ignore the hyper-connections.)
    """
    if not is_retrofitted(model):
        raise ValueError(f"model: got {type(model).__name__} that is not retrofitted; save it with "
                         "model.save_pretrained, or call retrofit(model) first")
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise ValueError(f"path: got {str(path)!r} without {', '.join(missing)}; expected a folder written by "
                         "save_retrofit (safetensors weights)")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def load_retrofit(path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by :func:`save_retrofit`: same outputs as the model that was saved.

    Builds the architecture from ``config.json``, applies :func:`retrofit` with the recorded
    settings, then loads every weight (original and hyper-connection) from the safetensors files.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"path: got {str(path)!r}; expected a folder with config.json written by save_retrofit")
    config = AutoConfig.from_pretrained(path)
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ValueError(f"path: got {str(path)!r} whose config.json has no {CONFIG_KEY!r} entry; it is not a "
                         "retrofitted model (load it with from_pretrained and call retrofit(model))")
    settings = dict(settings)
    if settings.pop("format", FORMAT) != FORMAT:
        raise ValueError(f"path: {str(path)!r} was saved in an unknown retrofit format; expected {FORMAT}")
    delattr(config, CONFIG_KEY)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    variant, n_streams, init = settings.pop("variant"), settings.pop("n_streams"), settings.pop("init")
    retrofit(model, n_streams, variant, init, **settings)
    state = _read_safetensors(path)
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.missing_keys if _is_tied(model, k, state)}
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ValueError(f"path: {str(path)!r} does not match its config: missing "
                         f"{sorted(set(result.missing_keys) - tied)[:5]}, unexpected {result.unexpected_keys[:5]}")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(device).eval()


def _is_tied(model: nn.Module, key: str, state: dict[str, Tensor]) -> bool:
    """``key`` is missing from the file because it is tied to a saved weight (e.g. ``lm_head.weight``)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict) or key not in tied or not getattr(model.config, "tie_word_embeddings", False):
        return False
    return tied[key] in state


# --------------------------------------------------------------------------- GGUF


def load_gguf(path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``*ForCausalLM`` from a GGUF file, dequantised to ``dtype`` (no ``accelerate`` needed).

    ``transformers``' ``from_pretrained(..., gguf_file=...)`` insists on ``accelerate``; this reads
    the config with ``AutoConfig`` and the tensors with ``transformers``' own GGUF reader
    (``modeling_gguf_pytorch_utils.load_gguf_checkpoint``, which also undoes llama.cpp's q/k
    permutation), then loads them into a model built from the config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(path)
    if not path.is_file() or path.suffix != ".gguf":
        raise ValueError(f"path: got {str(path)!r}; expected an existing .gguf file")
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=dtype)["tensors"]
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not _is_tied(model, k, state)]
    if missing or result.unexpected_keys:
        raise ValueError(f"path: {str(path)!r} did not fill the model: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    return model.eval()

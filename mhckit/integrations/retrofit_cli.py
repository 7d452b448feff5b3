"""``mhckit retrofit``: retrofit a Hugging Face decoder with hyper-connections and continue training it
next to the unmodified model.

One command::

    mhckit retrofit path/to/model --variants mhc --steps 20 --out-dir runs/retrofit
    mhckit retrofit path/to/model.gguf ...            # or: path/to/dir --gguf-file model.gguf

loads the model (a local ``transformers`` folder, or a GGUF file dequantised to float), and trains,
one after the other, the *unmodified* model ("original") and one retrofitted copy per variant
(:func:`mhckit.integrations.hf.retrofit`) for the same steps, on the same batches in the same order,
with the same learning rate, optimiser and seed. It writes ``results.md`` (a table), ``results.json``
(every number, per-step losses, resolved options, versions) to ``--out-dir`` and prints the table.

Corpus and tokenizer. ``--data`` is a text file or folder (default: the repository's Shakespeare
corpus, :mod:`mhckit.train.data`). ``--tokenizer auto`` uses the model's own tokenizer when the model
ships one (``tokenizer.json`` / ``tokenizer_config.json`` / ``tokenizer.model`` / ``vocab.json``, or a
GGUF's embedded vocabulary): continued training then sees text the way the model was trained on it.
Without one it falls back to UTF-8 bytes (ids 0-255), which needs a vocabulary of at least 256 and
means the model must first learn a new input mapping; the report says which was used.

Reported per run: validation loss before and after training (fixed validation windows), mean
training loss over the last steps, seconds per step, the step-0 logit difference to the original
(the function-preserving start, ~1e-7 relative), and the hyper-connection diagnostics of
:func:`mhckit.integrations.hf.hc_diagnostics` (Amax gains of the composite ``h_res``, ``max |log
column sum|``, ``||h_res - I||``, how far the streams are apart) at the start and the end.
Every option is checked before any model or data is loaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import textwrap
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import INITS, VARIANTS, MHCConfig

RUN_VARIANTS = VARIANTS
TOKENIZER_CHOICES = ("auto", "model", "byte")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TRAIN_LOSS_TAIL = 5  # the "final train loss" is the mean of this many last steps


class RetrofitError(ValueError):
    """An option or input that makes the run impossible (reported before any work)."""


# --------------------------------------------------------------------------- options


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mhckit retrofit",
        description=textwrap.fill(
            "Retrofit a Hugging Face decoder (Llama, Qwen2, Qwen3, Mistral, GPT-2) with hyper-connections, "
            "continue training it and the unmodified model the same way (same batches, steps, lr, seed), and "
            "write results.md / results.json to --out-dir.", 100),
        allow_abbrev=False)
    p.add_argument("model", help="a local model folder (config.json + weights) or a .gguf file")
    p.add_argument("--gguf-file", default=None, help="a .gguf file inside MODEL (transformers' gguf_file=)")
    p.add_argument("--variants", default="mhc",
                   help=f"comma-separated retrofits to train next to the original: {', '.join(RUN_VARIANTS)} "
                   "(default: %(default)s)")
    p.add_argument("--n-streams", type=int, default=4, help="streams n (default: %(default)s)")
    p.add_argument("--init", default="mean-preserving", choices=INITS, help="coefficient init (default: %(default)s)")
    p.add_argument("--reduce", default="mean", choices=("mean", "head"), help="stream collapse (default: %(default)s)")
    p.add_argument("--mhc", action="append", default=[], metavar="KEY=VALUE",
                   help="a further MHCConfig field, e.g. --mhc sinkhorn_iters=10 (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--hc-lr", type=float, default=None,
                   help="learning rate of the new hyper-connection parameters (default: --lr)")
    p.add_argument("--warmup-steps", type=int, default=2, help="linear warmup, then constant (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip, 0 = off (default: %(default)s)")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data order and torch seed (default: %(default)s)")
    p.add_argument("--data", default=None, help="text file or folder of .txt files (default: Shakespeare)")
    p.add_argument("--tokenizer", default="auto", choices=TOKENIZER_CHOICES,
                   help="auto: the model's own if it has one, else bytes (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $MHCKIT_CACHE or ~/.cache/mhckit)")
    p.add_argument("--out-dir", default="runs/retrofit", help="where results go (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="model dtype (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")
    p.add_argument("--save-models", action="store_true", help="also save each trained retrofit (save_retrofit)")
    return p


@dataclass
class Plan:
    """The validated options."""

    model_dir: Path
    gguf_file: str | None
    variants: list[str]
    mhc_configs: dict[str, MHCConfig]
    args: argparse.Namespace


def _int(args, name: str, minimum: int) -> None:
    v = getattr(args, name)
    if v < minimum:
        raise RetrofitError(f"--{name.replace('_', '-')}: got {v}; expected an int >= {minimum}")


def _float(args, name: str, minimum: float, strict: bool) -> None:
    v = getattr(args, name)
    if v is None:
        return
    bad = not math.isfinite(v) or (v <= minimum if strict else v < minimum)
    if bad:
        raise RetrofitError(f"--{name.replace('_', '-')}: got {v}; expected a number {'>' if strict else '>='} {minimum}")


def _parse_mhc(items: list[str]) -> dict[str, Any]:
    types = {f.name: type(f.default) for f in fields(MHCConfig)}
    managed = {"variant": "--variants", "n_streams": "--n-streams", "init": "--init"}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise RetrofitError(f"--mhc: got {item!r}; expected KEY=VALUE")
        if key in managed:
            raise RetrofitError(f"--mhc: got {key!r}; set it with {managed[key]}")
        if key not in types:
            raise RetrofitError(f"--mhc: got unknown key {key!r}; expected one of {', '.join(sorted(set(types) - set(managed)))}")
        kind = types[key]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                out[key] = text.lower() in ("true", "1")
            else:
                out[key] = kind(text)
        except ValueError:
            name = {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string"}[kind.__name__]
            raise RetrofitError(f"--mhc {key}: got {text!r}; expected {name}") from None
    return out


def _model_source(args) -> tuple[Path, str | None]:
    model = Path(args.model).expanduser()
    if args.gguf_file is not None:
        if not model.is_dir():
            raise RetrofitError(f"model: got {args.model!r} with --gguf-file; expected a folder holding that file")
        if not (model / args.gguf_file).is_file() or not args.gguf_file.endswith(".gguf"):
            raise RetrofitError(f"--gguf-file: got {args.gguf_file!r}; expected a .gguf file inside {str(model)!r}")
        return model, args.gguf_file
    if model.is_file():
        if model.suffix != ".gguf":
            raise RetrofitError(f"model: got the file {args.model!r}; expected a model folder or a .gguf file")
        return model.parent, model.name
    if not model.is_dir():
        raise RetrofitError(f"model: got {args.model!r}, which does not exist; expected a local model folder "
                            "or a .gguf file (nothing is downloaded)")
    if not (model / "config.json").is_file():
        raise RetrofitError(f"model: got {args.model!r} without config.json; expected a folder written by "
                            "save_pretrained (or pass --gguf-file)")
    return model, None


def validate(argv: list[str], *, check_model: bool = True) -> Plan:
    """Parse and check every option; raises :class:`RetrofitError` before anything is loaded.

    ``check_model=False`` skips the checks of the model path (for a model still to be fetched).
    """
    args = make_parser().parse_args(argv)
    for name, minimum in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("eval_batches", 1),
                          ("warmup_steps", 0), ("seed", 0), ("threads", 0), ("n_streams", 1)):
        _int(args, name, minimum)
    if args.warmup_steps > args.steps:
        raise RetrofitError(f"--warmup-steps: got {args.warmup_steps}; expected at most --steps={args.steps}")
    _float(args, "lr", 0.0, strict=True)
    _float(args, "hc_lr", 0.0, strict=True)
    _float(args, "weight_decay", 0.0, strict=False)
    _float(args, "grad_clip", 0.0, strict=False)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in RUN_VARIANTS]
    if not variants or bad or len(set(variants)) != len(variants):
        raise RetrofitError(f"--variants: got {args.variants!r}; expected distinct names from {', '.join(RUN_VARIANTS)}")
    extra = _parse_mhc(args.mhc)
    try:
        configs = {v: MHCConfig(variant=v, n_streams=args.n_streams, init=args.init, **extra) for v in variants}
    except ValueError as exc:
        raise RetrofitError(f"--mhc / --n-streams: {exc}") from None
    model_dir, gguf = _model_source(args) if check_model else (Path(args.model), None)
    if args.data is not None and args.data != "shakespeare" and not Path(args.data).expanduser().exists():
        raise RetrofitError(f"--data: got {args.data!r}, which does not exist; expected a text file, a folder of "
                            ".txt files, or nothing for the Shakespeare corpus")
    out = Path(args.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise RetrofitError(f"--out-dir: got {args.out_dir!r}, which is a file; expected a folder")
    return Plan(model_dir, gguf, variants, configs, args)


# --------------------------------------------------------------------------- model and data


class HFTokenizer:
    """A ``transformers`` tokenizer behind :class:`mhckit.train.tokenizers.Tokenizer` (no special tokens)."""

    def __init__(self, tok):
        import hashlib

        self.tok = tok
        self.vocab_size = len(tok)
        vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=True)
        self.name = f"hf-{type(tok).__name__}-{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def _has_tokenizer(plan: Plan) -> bool:
    return plan.gguf_file is not None or any((plan.model_dir / f).is_file() for f in TOKENIZER_FILES)


def load_config(plan: Plan):
    from transformers import AutoConfig

    from .hf import SUPPORTED

    config = AutoConfig.from_pretrained(plan.model_dir, gguf_file=plan.gguf_file)
    if config.model_type not in SUPPORTED:
        raise RetrofitError(f"model: got model_type={config.model_type!r}; expected one of "
                            + ", ".join(sorted(SUPPORTED)))
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and plan.args.seq_len > max_pos:
        raise RetrofitError(f"--seq-len: got {plan.args.seq_len}; expected at most the model's "
                            f"max_position_embeddings={max_pos}")
    return config


def load_tokenizer(plan: Plan, vocab_size: int):
    """``(tokenizer, description)`` per ``--tokenizer`` (see the module docstring)."""
    from ..train.tokenizers import ByteTokenizer

    choice = plan.args.tokenizer
    if choice == "model" and not _has_tokenizer(plan):
        raise RetrofitError(f"--tokenizer: got 'model' but {str(plan.model_dir)!r} has none of "
                            f"{', '.join(TOKENIZER_FILES)}; use --tokenizer byte")
    if choice in ("auto", "model") and _has_tokenizer(plan):
        from transformers import AutoTokenizer

        tok = HFTokenizer(AutoTokenizer.from_pretrained(plan.model_dir, gguf_file=plan.gguf_file))
        if tok.vocab_size > vocab_size:
            raise RetrofitError(f"tokenizer: has {tok.vocab_size} tokens; the model's vocabulary has {vocab_size}")
        return tok, f"the model's own ({type(tok.tok).__name__}, {tok.vocab_size} tokens)"
    if vocab_size < 256:
        raise RetrofitError(f"--tokenizer: byte-level ids need a vocabulary of at least 256; the model has "
                            f"{vocab_size} and no tokenizer of its own")
    return ByteTokenizer(), "UTF-8 bytes (the model has no tokenizer of its own; ids 0-255)"


def load_model(plan: Plan):
    from transformers import AutoModelForCausalLM

    from .hf import load_gguf

    dtype = DTYPES[plan.args.dtype]
    if plan.gguf_file is not None:
        return load_gguf(plan.model_dir / plan.gguf_file, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(plan.model_dir, dtype=dtype).eval()


# --------------------------------------------------------------------------- one run


@torch.no_grad()
def evaluate(model, data, args) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data.eval_batches(args.batch_size, args.seq_len, max_batches=args.eval_batches):
        logits = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def _optimizer(model, args) -> torch.optim.Optimizer:
    hc_lr = args.hc_lr if args.hc_lr is not None else args.lr
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_hc = ".mhc_" in name
        wd = args.weight_decay if p.dim() >= 2 and not is_hc else 0.0
        groups.setdefault((hc_lr if is_hc else args.lr, wd), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd, "base_lr": lr}
                              for (lr, wd), ps in groups.items()], betas=(0.9, 0.95))


def train_run(name: str, model, data, args, probe: torch.Tensor, reference_logits: torch.Tensor | None) -> dict:
    """Train ``model`` for ``args.steps`` steps; returns the run's record."""
    from .hf import hc_diagnostics, is_retrofitted

    torch.manual_seed(args.seed)
    record: dict[str, Any] = {"name": name, "params": sum(p.numel() for p in model.parameters())}
    record["hc_params"] = sum(p.numel() for n, p in model.named_parameters() if ".mhc_" in n)
    with torch.no_grad():
        logits0 = model.eval()(input_ids=probe, use_cache=False).logits.float()
    if reference_logits is not None:
        diff = (logits0 - reference_logits).abs().max().item()
        record["step0_logit_rel_diff"] = diff / reference_logits.abs().max().item()
    record["val_loss_start"] = evaluate(model, data, args)
    retro = is_retrofitted(model)
    if retro:
        record["diagnostics_start"] = hc_diagnostics(model, probe)
    opt = _optimizer(model, args)
    sampler = data.sampler(args.batch_size, args.seq_len, seed=args.seed)
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        if step == 1:  # time steps 1.. only: the first one pays for lazy initialisation
            start = time.perf_counter()
        scale = (step + 1) / args.warmup_steps if step < args.warmup_steps else 1.0
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        x, y = next(sampler)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name}: the training loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        losses.append(loss.item())
    record["seconds_per_step"] = (time.perf_counter() - start) / max(1, args.steps - 1)
    record["train_losses"] = losses
    record["train_loss_end"] = sum(losses[-TRAIN_LOSS_TAIL:]) / len(losses[-TRAIN_LOSS_TAIL:])
    record["val_loss_end"] = evaluate(model, data, args)
    if retro:
        record["diagnostics_end"] = hc_diagnostics(model, probe)
    model.eval()
    return record


# --------------------------------------------------------------------------- report


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    meta = result["setup"]
    lines = [
        f"# mhckit retrofit: {meta['model']}",
        "",
        f"{meta['architecture']}, {meta['params']:,} parameters, {meta['dtype']}; corpus {meta['corpus']} "
        f"({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens), tokenizer: {meta['tokenizer']}.",
        f"{meta['steps']} steps x {meta['batch_size']} x {meta['seq_len']} tokens, AdamW lr {meta['lr']:g} "
        f"(hyper-connections {meta['hc_lr']:g}), warmup {meta['warmup_steps']}, seed {meta['seed']}; n = "
        f"{meta['n_streams']}, init {meta['init']!r}. Every run sees the same batches in the same order.",
        "",
        "| run | extra params | Δlogits@0 (rel) | val loss @0 | val loss @end | Δ vs original | train loss (last "
        f"{TRAIN_LOSS_TAIL}) | s/step | fwd gain | bwd gain | max abs log colsum | mean ‖H_res−I‖ | stream spread |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = result["runs"][0]["val_loss_end"]
    for r in result["runs"]:
        d = r.get("diagnostics_end", {})
        lines.append(
            f"| {r['name']} | {r['hc_params']:,} | {_fmt(r.get('step0_logit_rel_diff'), '.1e')} | "
            f"{r['val_loss_start']:.4f} | {r['val_loss_end']:.4f} | {r['val_loss_end'] - base:+.4f} | "
            f"{r['train_loss_end']:.4f} | {r['seconds_per_step']:.2f} | {_fmt(d.get('forward_gain'))} | "
            f"{_fmt(d.get('backward_gain'))} | {_fmt(d.get('max_abs_log_colsum'))} | "
            f"{_fmt(d.get('hres_identity_distance'))} | {_fmt(d.get('stream_spread'))} |")
    lines += ["", f"Wall time {result['wall_seconds']:.0f} s on {result['info']['hardware']} "
              f"(commit {result['info']['commit']}, torch {result['info']['torch']}, transformers "
              f"{result['info']['transformers']}).", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def run(plan: Plan) -> dict:
    import transformers

    from ..train.data import load_token_data
    from ..train.fetch import atomic_write_bytes
    from ..train.runinfo import run_info
    from .hf import retrofit, save_retrofit

    args = plan.args
    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(plan)
    vocab = int(config.vocab_size)
    tokenizer, tok_text = load_tokenizer(plan, vocab)
    data = load_token_data(args.data, tokenizer, args.cache_dir)
    for split in ("train", "val"):
        if len(data.split(split)) < args.seq_len + 1:
            raise RetrofitError(f"--seq-len: got {args.seq_len}; the {split} split has only "
                                f"{len(data.split(split))} tokens")
    base = load_model(plan)
    probe = next(iter(data.eval_batches(args.batch_size, args.seq_len, max_batches=1)))[0]
    with torch.no_grad():
        reference_logits = base(input_ids=probe, use_cache=False).logits.float()
    out = Path(args.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in ["original", *plan.variants]:
        model = copy.deepcopy(base)
        if name != "original":
            cfg = plan.mhc_configs[name].to_dict()
            retrofit(model, cfg.pop("n_streams"), cfg.pop("variant"), cfg.pop("init"), reduce=args.reduce, **cfg)
        print(f"[retrofit] training {name} for {args.steps} steps", file=sys.stderr, flush=True)
        runs.append(train_run(name, model, data, args, probe, None if name == "original" else reference_logits))
        if args.save_models and name != "original":
            save_retrofit(model, out / f"model-{name}", tokenizer=getattr(tokenizer, "tok", None))
        del model
    info = dict(run_info(), transformers=transformers.__version__)
    setup = {
        **vars(args),
        "model": str(plan.model_dir / plan.gguf_file) if plan.gguf_file else str(plan.model_dir),
        "architecture": type(base).__name__, "params": sum(p.numel() for p in base.parameters()),
        "corpus": data.meta.get("source"), "tokenizer": tok_text,
        "train_tokens": len(data.train), "val_tokens": len(data.val),
        "hc_lr": args.hc_lr if args.hc_lr is not None else args.lr,
    }
    result = {"setup": setup, "info": info, "runs": runs, "wall_seconds": time.perf_counter() - started}
    atomic_write_bytes(out / "results.json", (json.dumps(result, indent=1) + "\n").encode())
    text = markdown(result)
    atomic_write_bytes(out / "results.md", text.encode())
    print(text)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns 0 on success, 2 for a bad option or input, 1 if training fails."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        plan = validate(argv)
    except RetrofitError as exc:
        print(f"mhckit retrofit: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help (0) or an unparsable option (2), message already printed
        return int(exc.code or 0)
    try:
        run(plan)
    except ValueError as exc:  # RetrofitError, or the data layer's checks of --data
        print(f"mhckit retrofit: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"mhckit retrofit: failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

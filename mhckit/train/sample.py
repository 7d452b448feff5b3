"""``mhckit sample``: generate text from a run's latest good checkpoint.

The run's configuration is rebuilt from the checkpoint's ``meta.json`` (so the model matches the
weights even if the run directory's ``config.json`` was edited), the text is encoded and decoded
with the run's tokenizer, and sampling is temperature + top-k over the model's logits, one token
at a time with the context cropped to ``seq_len`` (no KV cache: the models are small).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import checkpoint as ckpt
from .config import TrainConfig
from .overrides import from_dict


@dataclass
class LoadedRun:
    model: torch.nn.Module
    cfg: TrainConfig
    checkpoint: ckpt.Checkpoint
    device: torch.device


def load_run_model(run: Path | str, device: str = "auto", log=print) -> LoadedRun:
    """The model of ``run``'s newest checkpoint that verifies, in eval mode on ``device``.

    Raises ``ValueError`` (naming the directory) when ``run`` is not a directory or holds no
    usable checkpoint.
    """
    from ..models.gpt import GPT

    run_dir = Path(run)
    if not run_dir.is_dir():
        raise ValueError(f"--run: {str(run)!r} is not a directory; expected a run directory such as runs/<name>")
    found = ckpt.find_checkpoint(run_dir, log)
    if found is None:
        has_children = any((p / ckpt.CKPT_DIR).is_dir() for p in run_dir.iterdir() if p.is_dir())
        hint = (" (it looks like a comparison directory: pass one of its runs, e.g. "
                f"{run_dir / 'mhc-s0'})") if has_children else ""
        raise ValueError(f"--run: no complete checkpoint in {run_dir / ckpt.CKPT_DIR}{hint}; train the run first")
    cfg = from_dict(TrainConfig, found.meta["config"])
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = GPT(cfg.model).to(dev)
    ckpt.load_weights(found.path, model)
    model.eval()
    return LoadedRun(model, cfg, found, dev)


@torch.no_grad()
def generate(model: torch.nn.Module, ids: Tensor, max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int = 50, generator: torch.Generator | None = None) -> Tensor:
    """``ids [B, T0] -> [B, T0 + max_new_tokens]``; ``temperature=0`` is greedy, ``top_k=0`` keeps all."""
    seq_len = model.cfg.seq_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -seq_len:])[:, -1, :].float()  # [B, V]
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def sample_text(run: Path | str, prompt: str = "\n", tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
                seed: int = 0, device: str = "auto") -> tuple[str, list[int]]:
    """``(completion text, completion token ids)`` of ``tokens`` new tokens after ``prompt``."""
    from .tokenizers import get_tokenizer

    if tokens < 1:
        raise ValueError(f"--tokens: got {tokens}; expected an int >= 1")
    if temperature < 0:
        raise ValueError(f"--temperature: got {temperature}; expected a number >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"--top_k: got {top_k}; expected an int >= 0 (0 = no top-k cut)")
    loaded = load_run_model(run, device)
    tok = get_tokenizer(loaded.cfg.tokenizer, loaded.cfg.cache_dir)
    start = list(tok.encode(prompt)) or list(tok.encode("\n"))
    ids = torch.tensor([start], dtype=torch.long, device=loaded.device)
    gen = torch.Generator().manual_seed(seed)
    out = generate(loaded.model, ids, tokens, temperature=temperature, top_k=top_k, generator=gen)
    new = out[0, len(start):].tolist()
    return tok.decode(new), new


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mhckit sample", allow_abbrev=False,
                                description="Generate text from the latest good checkpoint of a training run.")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/compare-default/mhc-s0")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--top_k", type=int, default=50, help="keep the k most likely tokens; 0 = all (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        text, _ = sample_text(args.run, args.prompt, args.tokens, args.temperature, args.top_k, args.seed, args.device)
    except ValueError as e:
        parser.error(str(e))
    sys.stdout.write(args.prompt + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

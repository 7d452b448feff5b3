"""Generation benchmark: greedy ``generate()`` of a Hugging Face Llama, unmodified against retrofitted.

    python -m benchmarks.bench_generate [--variants mhc,hc,mhc-lite] [--new-tokens 32] [--rounds 7]

A Llama of SmolLM2-135M's shape (30 layers, d_model 576, 9 query / 3 key-value heads, vocabulary 49152,
tied embeddings) with random weights (no download), batch 1, a 16-token prompt, ``--new-tokens`` greedy
tokens with the KV cache under ``torch.inference_mode``. Cases: ``original`` and one retrofitted copy per
variant (``mhckit.integrations.hf.retrofit``, n = 4), each a whole ``generate()`` call, interleaved,
paired ratios against ``original`` (a ratio above 1 is the time mHC adds per token). Decoding runs one
token per sublayer call, so what it measures is the fixed cost of a call (Python, the autograd
machinery, per-call work in the kernels), which training at 1024 tokens a step hides. Results go to
``benchmarks/results/generate_<device>.{csv,md}``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from benchmarks.harness import command_line, compare, save_results

RESULTS = Path(__file__).parent / "results"
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                     tie_word_embeddings=True)


def build(layers: int, variants: list[str]):
    """``{"original": model, variant: retrofitted copy, ...}``, all in eval mode, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mhckit.integrations.hf import retrofit

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**dict(SMOLLM2_SHAPE, num_hidden_layers=layers))).eval()
    models = {"original": base}
    for v in variants:
        m = copy.deepcopy(base)
        retrofit(m, n_streams=4, variant=v)
        models[v] = m.eval()
    return models


def generate_case(model, prompt: torch.Tensor, new_tokens: int):
    def run():
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[-1] == prompt.shape[-1] + new_tokens

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="mhc,hc,mhc-lite")
    p.add_argument("--layers", type=int, default=SMOLLM2_SHAPE["num_hidden_layers"])
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for name, value in (("--layers", args.layers), ("--prompt", args.prompt), ("--new-tokens", args.new_tokens),
                        ("--rounds", args.rounds)):
        if value < 1:
            raise SystemExit(f"{name}: got {value}; expected an integer >= 1")
    variants = [v for v in args.variants.split(",") if v]
    models = build(args.layers, variants)
    prompt = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1))
    cases = {name: generate_case(m, prompt, args.new_tokens) for name, m in models.items()}
    params = {"layers": args.layers, "prompt": args.prompt, "new_tokens": args.new_tokens,
              "d_model": SMOLLM2_SHAPE["hidden_size"]}
    results = compare(cases, "original", rounds=args.rounds, warmup=args.warmup, params=params)
    for r in results:
        print(f"{r.case:10s} {r.median_ms / args.new_tokens:8.2f} ms/token  x{r.ratio:.3f} vs original "
              f"(IQR {r.ratio_iqr[0]:.3f}-{r.ratio_iqr[1]:.3f})")
    stem = Path(args.out) if args.out else RESULTS / "generate_cpu"
    save_results(results, stem, command_line(__spec__ and __spec__.name, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

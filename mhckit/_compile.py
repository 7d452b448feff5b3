"""``torch.compile`` helpers that cost nothing at import time."""

from __future__ import annotations


def constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo``.

    That decorator only marks the function (``fn._dynamo_marked_constant = True``), but calling it
    imports dynamo, ~1.5 s: most of ``import mhckit``. The mark is set here directly;
    ``tests/test_compile.py`` checks that torch's decorator sets the same mark, and its graph-break
    tests fail if dynamo stops honouring it."""
    fn._dynamo_marked_constant = True
    return fn

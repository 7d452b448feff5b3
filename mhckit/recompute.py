"""Stream recomputation (mHC paper, arXiv 2512.24880, section 4.3).

Each sublayer's backward needs its input streams ``x_l`` (``[..., n, C]``, n times the width of a
plain residual). With recomputation only the input of every ``L_r``-th sublayer is kept; the
streams in between are dropped after the forward pass and rebuilt in the backward pass from the
group's input by replaying the cheap write-backs ``x_{l+1} = h_res x_l + h_post y_l`` (the branch
outputs ``y_l`` and the coefficients are saved anyway). Branches are not re-run. During the
backward of a group its streams are rebuilt once and held until the group is done, so the extra
memory is ``L_r`` stream tensors at a time instead of one per sublayer.

Usage (what :class:`mhckit.models.GPT` does with ``recompute``)::

    with StreamRecompute(every) as rc:
        for i, hc in enumerate(sublayers):
            rc.at_sublayer(i, x)
            x = hc(x)

The mechanism is a pair of ``saved_tensors_hooks``: a stream tensor written by a hyper-connection
inside a group is packed as a small token and unpacked by replaying the group, bitwise equal to
the original (the same functions on the same inputs). ``L_r`` defaults to ``sqrt(n L / (n + 2))``.

Under ``torch.compile`` saved-tensor hooks cannot be traced (dynamo breaks the graph there, and
``fullgraph=True`` fails), and what a compiled graph saves is decided by AOTAutograd's partitioner.
:func:`sequential` therefore runs its modules in groups of ``every`` as non-reentrant
``torch.utils.checkpoint`` regions with a selective policy (:func:`_selective_context`): mhckit's own
operators (namespace ``mhckit``: the fused reads and write-backs) are recomputed in backward, every
other operator's output is kept. That is the paper's scheme literally: "re-executing the mHC kernels
without the heavy layer function F"; it recomputes the reads (coefficients) as well as the
write-backs, which costs a coefficient forward per sublayer and keeps neither the streams nor the
reads' outputs. Inside such a region the hyper-connections' write-backs always go through the
``mhckit::post_res`` operator (also where they would otherwise be traced PyTorch ops), so that every
operator writing a stream tensor is one the policy recomputes. In eager mode :func:`sequential` is
:class:`StreamRecompute` with one group per ``every`` modules.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import Tensor


class _Active(threading.local):
    ctx: StreamRecompute | None = None  # per thread; a class default, so that reading it never misses


_ACTIVE = _Active()  # getattr(threading.local(), "ctx", None) took ~0.6 us when unset (a caught miss)
_COMPILED_REGIONS = 0  # > 0 while torch.compile traces the regions of sequential() (a plain global: dynamo tracks it)


def default_interval(n_streams: int, n_sublayers: int) -> int:
    """The paper's ``L_r = sqrt(n L / (n + 2))``, rounded, at least 1."""
    return max(1, round(math.sqrt(n_streams * n_sublayers / (n_streams + 2))))


def active() -> StreamRecompute | None:
    return _ACTIVE.ctx


class _Group:
    """Sublayers ``[start, start + L_r)``: the input streams and how to replay each write-back."""

    def __init__(self, x0: Tensor):
        self.x0 = x0
        self.steps: list = []  # (write-back fn, args) producing output i from output i-1 (or x0)
        self.cache: dict[int, Tensor] = {}

    def materialise(self, i: int) -> Tensor:
        for j in [k for k in self.cache if k > i]:  # backward runs downwards: later outputs are done
            del self.cache[j]
        if i in self.cache:
            return self.cache[i]
        start = max((k for k in self.cache if k < i), default=-1)
        x = self.x0 if start < 0 else self.cache[start]
        with torch.no_grad():
            for k in range(start + 1, i + 1):
                fn, args = self.steps[k]
                x = fn(x, *args)
                self.cache[k] = x
        return x


class StreamRecompute:
    """Context manager that drops intermediate stream tensors and rebuilds them in backward."""

    def __init__(self, every: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: got {every!r}; expected an int >= 1 (sublayers per kept stream tensor)")
        self.every = every
        self.group: _Group | None = None
        self._owned: dict[int, tuple] = {}  # storage pointer -> (weakref to the stream tensor, group, index)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> StreamRecompute:
        # compose with an enclosing pair of hooks (e.g. a memory probe): kept tensors go through it
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self._outer_pack, self._outer_unpack = outer if outer is not None else (None, None)
        if not torch.is_grad_enabled():
            self._hooks = None
        else:
            self._hooks.__enter__()
        self._prev, _ACTIVE.ctx = active(), self
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.ctx = self._prev
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
        self._owned.clear()
        self.group = None

    def at_sublayer(self, index: int, x: Tensor) -> None:
        """Call before sublayer ``index`` with its input; starts a new group every ``every`` sublayers."""
        if index % self.every == 0:
            self._owned.pop(_key(x), None)  # a group's input is kept, never dropped
            self.group = _Group(x)

    def record(self, out: Tensor, fn, *args) -> None:
        """A hyper-connection wrote ``out = fn(x, *args)``; make it recomputable."""
        if self.group is None or not torch.is_grad_enabled():
            return
        self.group.steps.append((fn, args))
        self._owned[_key(out)] = (weakref.ref(out), self.group, len(self.group.steps) - 1)

    def _pack(self, t: Tensor):
        entry = self._owned.get(_key(t))
        if entry is not None:
            ref, group, i = entry
            alive = ref()
            if alive is not None and _key(alive) == _key(t):  # the stream tensor or a view of it
                return (_Token, group, i, (tuple(t.shape), tuple(t.stride()), t.storage_offset()))
        return t if self._outer_pack is None else (_Outer, self._outer_pack(t))

    def _unpack(self, packed):
        if isinstance(packed, tuple) and len(packed) == 4 and packed[0] is _Token:
            _, group, i, (shape, stride, offset) = packed
            full = group.materialise(i)
            return full.as_strided(shape, stride, offset)
        if isinstance(packed, tuple) and len(packed) == 2 and packed[0] is _Outer:
            return self._outer_unpack(packed[1])
        return packed


class _Token:
    """Marker type of a packed (dropped) stream tensor."""


class _Outer:
    """Marker type of a tensor packed by the enclosing hooks."""


def _key(t: Tensor) -> int:
    """Storage identity: a saved view of a stream tensor is dropped and rebuilt as the same view."""
    return t.untyped_storage().data_ptr()


# ---- torch.compile: selective activation checkpointing ----------------------------------------


def _policy(ctx, op, *args, **kwargs):
    """Recompute mhckit's operators (the fused reads and write-backs of the streams), keep the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    if getattr(op, "namespace", None) == "mhckit":
        return CheckpointPolicy.MUST_RECOMPUTE
    return CheckpointPolicy.PREFER_SAVE


def _selective_context():
    """``context_fn`` of :func:`sequential`'s ``torch.utils.checkpoint`` regions under ``torch.compile``:
    mhckit's operators are recomputed in backward, every other operator's output is kept (the
    branches are not re-run). Not for eager mode, where the kernels run inside autograd Functions the
    policy cannot see (eager recomputation is :class:`StreamRecompute`)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_policy)


def in_compiled_region() -> bool:
    """True while ``torch.compile`` traces a module run by :func:`sequential` with recomputation."""
    return _COMPILED_REGIONS > 0


def _run(modules, x: Tensor) -> Tensor:
    for m in modules:
        x = m(x)
    return x


def sequential(modules, x: Tensor, every: int) -> Tensor:
    """``x -> modules[-1](... modules[0](x))`` keeping the streams only at the input of every
    ``every``-th module (a module may hold several hyper-connection sublayers, e.g. a Transformer
    block); ``every = 0`` runs them plainly.

    Eager: :class:`StreamRecompute` (gradients bitwise equal to the plain run). While ``torch.compile``
    traces: one ``torch.utils.checkpoint`` region per group with :func:`_selective_context`, which
    traces as one graph (``fullgraph=True`` works) and recomputes mhckit's operators in backward.
    """
    global _COMPILED_REGIONS
    modules = list(modules)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"every: got {every!r}; expected an int >= 0 (modules per kept stream tensor; 0 = off)")
    for i, m in enumerate(modules):
        if not callable(m):
            raise ValueError(f"modules[{i}]: got {type(m).__name__}; expected a callable (e.g. an nn.Module)")
    if every == 0 or not torch.is_grad_enabled():
        return _run(modules, x)
    if torch.compiler.is_compiling():
        from torch.utils.checkpoint import checkpoint

        _COMPILED_REGIONS += 1  # set outside the regions: dynamo does not allow side effects inside them
        try:
            for i in range(0, len(modules), every):
                x = checkpoint(_run, modules[i : i + every], x, use_reentrant=False, context_fn=_selective_context)
        finally:
            _COMPILED_REGIONS -= 1
        return x
    with StreamRecompute(every) as rc:
        for i, m in enumerate(modules):
            rc.at_sublayer(i, x)
            x = m(x)
    return x

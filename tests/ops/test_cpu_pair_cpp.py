"""The fused mHC pair as C++ autograd Functions (mhckit/ops/cpu/mhc_pair.cpp, mhckit/ops/cpu/_pair.py):
bitwise the Python pair's outputs and gradients, every variant it takes, stream dtype, route and
subset of differentiated inputs; it really runs (its own kernel-call counter, no Python Function);
the write-back's gradient buffer reused exactly where the Python pair reuses it; once differentiable;
checkpointing; and the Python pair when it cannot run."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mhckit.modules import HyperConnection
from mhckit.ops import carry, cpu
from mhckit.ops.cpu import _pair

HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
HAVE_CXX = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
pytestmark = pytest.mark.skipif(not (HAVE_CC and HAVE_CXX and cpu.enabled()),
                                reason="no C / C++ compiler: the C++ pair cannot be built")


@pytest.fixture(scope="module")
def ops():
    assert _pair.load(), _pair.status()
    return torch.ops.mhckit_pair


def _stack(n, c, dt, variant, depth=3, seed=0):
    """``variant``: mhc, mhc-lite, identity, hc (dynamic) or hc-static."""
    torch.manual_seed(seed)
    kind, dynamic = ("hc", variant == "hc") if variant.startswith("hc") else (variant, True)
    hcs = torch.nn.ModuleList(
        HyperConnection(c, torch.nn.Sequential(torch.nn.LayerNorm(c), torch.nn.Linear(c, c)), variant=kind,
                        n_streams=n, layer_index=i, hc_dynamic=dynamic) for i in range(depth)).to(dt)
    with torch.no_grad():  # away from the start, so that every term of the gradients is non-trivial
        for p in hcs.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return hcs


@contextlib.contextmanager
def _pair_ran(cpp: bool):
    """The C++ pair switched on (``cpp``) or off inside the block, and checked: its kernel calls rose only
    when on (so no comparison here can pass by running the Python pair twice)."""
    before = torch.ops.mhckit_pair.calls()
    with _pair.use_cpp_pair(cpp):
        yield
    assert (torch.ops.mhckit_pair.calls() > before) == cpp, "the C++ pair ran" if not cpp else "it did not run"


def _run(hcs, x, cpp, frozen=(), loss_of=lambda out: (out.float().square().sum() + out.float().sum())):
    """Output and every gradient of a forward + backward through the stack, on the C++ pair or not."""
    for name, p in hcs.named_parameters():
        p.requires_grad_(not any(f in name for f in frozen))
        p.grad = None
    x = x.detach().requires_grad_("x" not in frozen)
    with _pair_ran(cpp):
        out = x
        for hc in hcs:
            out = hc(out)
        loss_of(out).backward()
    grads = [x.grad] + [p.grad for p in hcs.parameters()]
    return out.detach(), grads


def _same(a, b):
    (out_a, ga), (out_b, gb) = a, b
    assert torch.equal(out_a, out_b)
    assert [g is None for g in ga] == [g is None for g in gb]
    assert all(p is None or (p.dtype == q.dtype and torch.equal(p, q)) for p, q in zip(ga, gb))


def _no_python_function(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a Python Function of the pair ran")

    for fn in (carry.CoeffsCarryFunction, carry.PostCarryFunction, carry.HCCarryFunction, carry.ReadCarryFunction):
        monkeypatch.setattr(fn, "forward", staticmethod(boom))


@pytest.mark.parametrize("variant", ["mhc", "mhc-lite", "identity", "hc", "hc-static"])
@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,c,lead", [(4, 64, (2, 9)), (3, 13, (7,)), (2, 8, (1, 2, 3))])
def test_cpp_pair_is_bitwise_the_python_pair(ops, monkeypatch, variant, dt, n, c, lead):
    if variant == "mhc-lite" and n > cpu.MAX_PERMUTATION_STREAMS:
        pytest.skip("mHC-lite on the pair: n <= 4")
    hcs = _stack(n, c, dt, variant)
    x = torch.randn(*lead, n, c).to(dt)
    py = _run(hcs, x, cpp=False)
    calls, joined = ops.calls(), ops.joined()
    with monkeypatch.context() as m:
        _no_python_function(m)
        cc = _run(hcs, x, cpp=True)
    # each sublayer: the read (with mHC's / dynamic HC's coefficients) and the write-back, forward and backward;
    # mHC's coefficient backward (fp32 / fp64 streams) also runs the previous sublayer's write-back backward
    # (with the projection in the kernel: dx final there)
    k = 2 * n + {"mhc": n * n, "mhc-lite": math.factorial(n), "identity": 0}.get(variant, 0)
    joins = (len(hcs) - 1 if variant in ("mhc", "mhc-lite", "identity") and dt in (torch.float32, torch.float64)
             and cpu._project_here(n, c, k, dt) else 0)
    assert ops.joined() - joined == joins
    assert ops.calls() - calls == 4 * len(hcs) - joins
    _same(py, cc)


@contextlib.contextmanager
def _joining(ops, on: bool):
    ops.set_join(on)
    try:
        yield
    finally:
        ops.set_join(True)


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_write_back_backward_joined_to_the_next_coefficient_backward(ops, dt):
    """Where x comes from the previous sublayer's write-back, mHC's coefficient backward runs that write-back's
    backward on its dx in the same pass: the same gradients bit for bit as separate kernels (and the Python
    pair); the projection on the BLAS route (dx not final inside the kernel) does not join."""
    hcs = _stack(4, 32, dt, "mhc", depth=4)
    x = torch.randn(3, 5, 4, 32, dtype=dt)
    joined = ops.joined()
    on = _run(hcs, x, cpp=True)
    assert ops.joined() - joined == 3
    with _joining(ops, False):
        off = _run(hcs, x, cpp=True)
    assert ops.joined() - joined == 3
    _same(on, off)
    _same(on, _run(hcs, x, cpp=False))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cpu, "PROJECT_MAX_COLUMNS", 0)
        blas = _run(hcs, x, cpp=True)
    assert ops.joined() - joined == 3
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cpu, "PROJECT_MAX_COLUMNS", 0)
        _same(blas, _run(hcs, x, cpp=False))


@pytest.mark.parametrize("how", ["second use", "hook", "in-place hook"])
def test_joined_results_dropped_when_the_gradient_is_not_the_coefficient_backwards_dx(ops, how):
    """The write-back's output also used elsewhere (its gradient a sum), or a hook that replaces or modifies
    that gradient: the write-back's backward computes its own results from what it receives (the joined ones,
    made from the coefficient backward's dx alone, would be wrong); equal to the Python pair's."""
    hcs = _stack(4, 16, torch.float32, "mhc", depth=2)

    def run(cpp):
        x = torch.randn(2, 5, 4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        for p in hcs.parameters():
            p.grad = None
        with _pair_ran(cpp):
            mid = hcs[0](x)
            if how == "hook":
                mid.register_hook(lambda g: g * 1.5)
            elif how == "in-place hook":
                mid.register_hook(lambda g: g.mul_(1.5))
            out = hcs[1](mid)
            loss = out.square().sum() + (mid.sum() * 0.25 if how == "second use" else 0)
            loss.backward()
        return out.detach(), [x.grad] + [p.grad for p in hcs.parameters()]

    py = run(False)
    joined = ops.joined()
    cc = run(True)
    assert ops.joined() == joined
    _same(py, cc)


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_cpp_pair_on_the_blas_route(ops, monkeypatch, dt):
    """Wider than the kernels' own matmul blocks take: the projection and its two gradients in BLAS
    around the kernel calls, as the Python pair does."""
    hcs = _stack(4, 24, dt, "mhc")
    x = torch.randn(5, 4, 24, dtype=dt)
    monkeypatch.setattr(cpu, "PROJECT_MAX_COLUMNS", 0)
    assert not cpu._project_here(4, 24, 24, dt)
    _same(_run(hcs, x, cpp=False), _run(hcs, x, cpp=True))


@pytest.mark.parametrize("variant,frozen", [
    ("mhc", ("x",)), ("mhc", ("phi",)), ("mhc", ("coeffs",)), ("mhc", ("branch",)), ("mhc", ("x", "coeffs")),
    ("mhc", ("bias", "alpha")), ("hc", ("x",)), ("hc", ("w_",)), ("hc", ("static",)), ("hc", ("scale_beta", "w_post")),
    ("hc", ("branch",)), ("hc-static", ("x",)), ("hc-static", ("static_pre",)), ("hc-static", ("branch", "static_res")),
])
def test_cpp_pair_with_frozen_inputs(ops, variant, frozen):
    """Only some inputs differentiated (needs_input_grad): the same gradients, None where the Python pair
    gives None (for dynamic HC also a parameter whose coefficients get no gradient)."""
    hcs = _stack(4, 16, torch.float32, variant)
    x = torch.randn(3, 4, 16)
    _same(_run(hcs, x, cpp=False, frozen=frozen), _run(hcs, x, cpp=True, frozen=frozen))


def test_two_write_backs_of_one_read_and_unused_outputs(ops):
    """The carrier's gradients summed by autograd over two write-backs; a read whose u nobody uses."""
    hcs = _stack(4, 16, torch.float32, "mhc", depth=1)
    hc = hcs[0]

    def run(cpp):
        x = torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
        for p in hc.parameters():
            p.grad = None
        with _pair_ran(cpp):
            u, finish = hc.split(x)
            y = hc.branch(u)
            out = finish(y) + 0.5 * finish(y.flip(-1))
            _, finish2 = hc.split(out)
            out2 = finish2(torch.ones(2, 3, 16))  # the second read's u unused
            out2.square().sum().backward()
        return out2.detach(), [x.grad] + [p.grad for p in hc.parameters()]

    _same(run(False), run(True))


@pytest.mark.parametrize("variant", ["mhc", "hc", "hc-static"])
def test_gradient_buffer_reused_where_nobody_else_holds_it(ops, variant):
    """A plain stack: every read's backward writes dx into its incoming output gradient's buffer
    (bitwise the result of fresh buffers); a gradient a hook keeps, that autograd.grad captures or that
    the user passed in is never overwritten."""
    hcs = _stack(4, 16, torch.float32, variant)
    x = torch.randn(2, 5, 4, 16)
    reused = ops.reused()
    with carry.reuse_gradient_buffer(True):
        on = _run(hcs, x, cpp=True)
    assert ops.reused() - reused == len(hcs)
    reused = ops.reused()
    with carry.reuse_gradient_buffer(False):
        off = _run(hcs, x, cpp=True)
    assert ops.reused() == reused
    _same(on, off)

    def held(how):
        xs = x.detach().requires_grad_()
        with _pair_ran(True):
            mid = hcs[1](hcs[0](xs))
            out = hcs[2](mid)
            if how == "hook":
                kept = []
                mid.register_hook(lambda g: kept.append((g.clone(), g)))
                out.square().sum().backward()
                return kept[0][0], xs.grad, kept[0][1]
            if how == "autograd.grad":
                g_mid, g_x = torch.autograd.grad(out.square().sum(), [mid, xs])
                return g_mid.clone(), g_x, g_mid
            g = torch.ones_like(out)
            out.backward(g)
            return torch.ones_like(out), xs.grad, g

    for how in ("hook", "autograd.grad", "grad passed in"):
        seen, gx, kept = held(how)
        assert torch.equal(kept, seen), how  # still what the user was given
        with carry.reuse_gradient_buffer(False):
            seen_off, gx_off, _ = held(how)
        assert torch.equal(seen, seen_off) and torch.equal(gx, gx_off), how


@pytest.mark.parametrize("variant", ["mhc", "hc", "hc-static"])
def test_backward_is_differentiable_once(ops, variant):
    hcs = _stack(4, 16, torch.float32, variant, depth=1)
    x = torch.randn(3, 4, 16, requires_grad=True)
    with _pair.use_cpp_pair(True):
        loss = hcs[0](x).square().sum()
        with pytest.raises(RuntimeError, match=r"fused sublayer pair .* differentiable once only.*create_graph=True"):
            torch.autograd.grad(loss, [x], create_graph=True)


def test_checkpointed_sublayers_match(ops):
    """torch.utils.checkpoint (non-reentrant: saved-tensor hooks) around each sublayer: the gradients of
    the plain run, bitwise."""
    from torch.utils.checkpoint import checkpoint

    hcs = _stack(4, 16, torch.float32, "mhc")
    x = torch.randn(2, 3, 4, 16)
    plain = _run(hcs, x, cpp=True)
    for p in hcs.parameters():
        p.grad = None
    xs = x.detach().requires_grad_()
    with _pair_ran(True):
        out = xs
        for hc in hcs:
            out = checkpoint(hc, out, use_reentrant=False)
        (out.float().square().sum() + out.float().sum()).backward()
    _same(plain, (out.detach(), [xs.grad] + [p.grad for p in hcs.parameters()]))


def test_gpt_step_matches_with_recompute(ops):
    """A GPT with mHC and the paper's recomputation (the stream stored every L_r sublayers): the C++ and
    Python pairs give the same loss and gradients, bitwise."""
    from mhckit.config import MHCConfig
    from mhckit.models.gpt import GPT, GPTConfig

    def step(cpp):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, recompute=-1,
                              hc=MHCConfig(variant="mhc")))
        tok = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
        with _pair_ran(cpp):
            _, loss = model(tok[:, :-1], tok[:, 1:])
            loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    _same(step(False), step(True))


def _subprocess(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


_STEP = """
import warnings, torch
from mhckit.modules import HyperConnection
from mhckit.ops.cpu import _pair
warnings.simplefilter("always")
hc = HyperConnection(8, torch.nn.Linear(8, 8), variant="mhc", n_streams=4)
x = torch.randn(3, 4, 8, requires_grad=True)
with warnings.catch_warnings(record=True) as w:
    hc(x).sum().backward()
st = _pair.status()
print("ACTIVE", st["active"], "ON", st["on"], "WHY", st["why"])
print("WARNED", any("C++ pair is unavailable" in str(m.message) for m in w))
print("GRAD", x.grad.abs().sum().item() > 0)
"""


def test_without_a_cxx_compiler_the_python_pair_runs_with_a_warning(tmp_path):
    """A PATH with the C compiler and its assembler and linker but no C++ compiler: the C kernels run, the
    pair on its Python Functions, with one warning that says why."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("cc", "as", "ld"):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool} to put on the PATH")
        (bin_dir / tool).symlink_to(shutil.which(tool))
    # CC as the session's own build was keyed (its build in the default cache then serves, no recompiling)
    env = dict(os.environ, CXX="/nonexistent/c++", PATH=str(bin_dir), CC=shutil.which("cc"),
               MHCKIT_CACHE=str(tmp_path / "cache"))
    res = _subprocess(_STEP, env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ACTIVE False ON True WHY no C++ compiler found" in res.stdout, res.stdout
    assert "WARNED True" in res.stdout and "GRAD True" in res.stdout


def test_env_switch_keeps_the_python_pair():
    res = _subprocess(_STEP, dict(os.environ, MHCKIT_CPP_PAIR="0"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ACTIVE False ON False" in res.stdout and "WARNED False" in res.stdout, res.stdout


def test_a_build_in_the_default_cache_serves_another_mhckit_cache(ops, tmp_path):
    """A data cache of its own ($MHCKIT_CACHE) rebuilds neither the C kernels nor the C++ pair: the
    default cache's builds are found."""
    env = dict(os.environ, MHCKIT_CACHE=str(tmp_path / "cache"))
    env.pop("XDG_CACHE_HOME", None)
    if os.environ.get("XDG_CACHE_HOME") or os.environ.get("MHCKIT_CACHE"):
        pytest.skip("this session's build is not in the default cache")
    res = _subprocess(_STEP, env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ACTIVE True" in res.stdout and "building the C++" not in res.stderr, (res.stdout, res.stderr[-1000:])
    assert not list((tmp_path / "cache").rglob("libmhc_*.so"))


def test_kernels_command_says_what_runs(ops, capsys, monkeypatch):
    """``mhckit kernels`` (run by ``make setup``): both builds active here, with their paths; switched
    off, it says so."""
    from mhckit import cli

    assert cli.main(["kernels"]) == 0
    out = capsys.readouterr().out
    assert "C kernels: active" in out and "libmhc_cpu.so" in out, out
    assert "C++ pair:  active" in out and "libmhc_pair.so" in out, out
    monkeypatch.setattr(_pair, "_ON", [False])
    assert cli.main(["kernels"]) == 0
    assert "C++ pair:  switched off (MHCKIT_CPP_PAIR=0)" in capsys.readouterr().out


def test_another_build_runs_in_the_cpp_pair_too(ops):
    """``cpu.use_isa`` (A/B benchmarks of two builds in one process) hands its build's entry points to the
    C++ pair, whose results are then bitwise the Python pair's on that build; the process's own build is
    back afterwards."""
    own_lib = cpu._STATE["lib"]
    assert ops.kernel_table() == _pair._kernel_table(own_lib)
    hcs = _stack(4, 64, torch.float32, "mhc")
    x = torch.randn(2, 33, 4, 64)
    with cpu.use_isa("avx2"):
        other = cpu._STATE["lib"]
        assert ops.kernel_table() == _pair._kernel_table(other)
        if other is not own_lib:  # an AVX-512 machine: a second library
            assert ops.kernel_table() != _pair._kernel_table(own_lib)
        _same(_run(hcs, x, cpp=False), _run(hcs, x, cpp=True))
    assert ops.kernel_table() == _pair._kernel_table(own_lib)


def test_non_contiguous_parameters(ops):
    """A phi held transposed (a parameter made from ``w.t()``): the kernels get contiguous rows, and the
    C++ pair gives the Python pair's results."""
    hcs = _stack(4, 16, torch.float32, "mhc")
    for hc in hcs:
        phi = hc.coeffs.phi.detach()
        hc.coeffs.phi = torch.nn.Parameter(phi.t().contiguous().t())
        assert not hc.coeffs.phi.is_contiguous()
    x = torch.randn(3, 5, 4, 16)
    _same(_run(hcs, x, cpp=False), _run(hcs, x, cpp=True))


@contextlib.contextmanager
def _short_ways(monkeypatch, off: bool = False):
    """Counts the sublayers that took :meth:`HyperConnection._split_on_pair`'s short way (``taken[0]``)
    and the write-backs that took its short way too (``taken[1]``); ``off``: neither is taken."""
    real = HyperConnection._split_on_pair
    taken = [0, 0]

    def split_on_pair(self, x):
        got = None if off else real(self, x)
        if got is None:
            return None
        taken[0] += 1
        u, finish = got
        before = [0]

        def counted(y):
            calls = torch.ops.mhckit_pair.calls()
            with monkeypatch.context() as m:  # the short write-back calls the pair, _finish not at all
                m.setattr(HyperConnection, "_finish", lambda *a: before.__setitem__(0, 1) or real_finish(*a))
                out = finish(y)
            taken[1] += not before[0] and torch.ops.mhckit_pair.calls() > calls
            return out

        return u, counted

    real_finish = HyperConnection._finish
    with monkeypatch.context() as m:
        m.setattr(HyperConnection, "_split_on_pair", split_on_pair)
        yield taken


@pytest.mark.parametrize("variant", ["mhc", "mhc-lite", "identity"])
@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_short_way_is_the_general_path(ops, monkeypatch, variant, dt):
    """mHC / mHC-lite / the identity on the C++ pair in a plain step: split's short way is taken (read
    and write-back) and gives the general path's output and gradients, bitwise."""
    hcs = _stack(4, 16, dt, variant)
    x = torch.randn(2, 5, 4, 16).to(dt)
    with _short_ways(monkeypatch) as taken:
        short = _run(hcs, x, cpp=True)
    assert taken == [len(hcs), len(hcs)]
    with _short_ways(monkeypatch, off=True) as taken:
        general = _run(hcs, x, cpp=True)
    assert taken == [0, 0]
    _same(short, general)


def test_short_way_steps_aside(ops, monkeypatch):
    """Wherever a condition of the short way fails, split and the write-back take the general path,
    whose behaviour (errors, finite checks, capture, no-grad results) is unchanged."""
    from mhckit import check_finite, diagnostics, recompute
    from mhckit._validate import NonFiniteError

    torch.manual_seed(0)
    hc = HyperConnection(16, torch.nn.Linear(16, 16), variant="mhc", n_streams=4)
    x = torch.randn(3, 4, 16, requires_grad=True)
    for p in hc.parameters():
        p.requires_grad_(True)

    def took(fn):
        with _short_ways(monkeypatch) as taken:
            fn()
        return taken[0]

    assert took(lambda: hc(x)) == 1
    with torch.no_grad():
        assert took(lambda: hc(x)) == 0
    assert took(lambda: hc(x.transpose(0, 1).contiguous().transpose(0, 1))) == 0  # not contiguous
    assert torch.equal(hc(x.transpose(0, 1).contiguous().transpose(0, 1)), hc(x))
    assert took(lambda: hc.split(x.bfloat16())) == 0
    with carry.separate_ops():
        assert took(lambda: hc(x)) == 0
    with cpu.disabled():
        assert took(lambda: hc(x)) == 0
    with recompute.StreamRecompute(2):
        assert took(lambda: hc(x)) == 0
    with diagnostics.record_coefficients(hc) as records:
        assert took(lambda: hc(x)) == 0
    assert len(records) == 1
    with check_finite():
        assert took(lambda: hc(x)) == 0
        with pytest.raises(NonFiniteError, match="x"):
            hc(x * float("nan"))
    with pytest.raises(ValueError, match=r"x\.shape"):
        hc.split(torch.randn(3, 5, 16))
    # the write-back: a y of the wrong shape or dtype goes to the general path (which names y)
    u, finish = hc.split(x)
    with pytest.raises(ValueError, match="y"):
        finish(torch.randn(3, 15))
    u, finish = hc.split(x)
    with _short_ways(monkeypatch, off=True):
        ref_u, ref_finish = hc.split(x)
    assert torch.equal(finish(u.double() + 1), ref_finish(ref_u.double() + 1))  # another dtype: the general path
    u, finish = hc.split(x)  # gradients switched off between the read and the write-back
    with torch.no_grad():
        out = finish(u + 1)
    assert not out.requires_grad

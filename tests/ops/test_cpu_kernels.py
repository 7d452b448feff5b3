"""The compiled CPU kernels (mhckit/ops/cpu): built here, used by default, equal to the PyTorch ops.

Every comparison runs the same autograd Function twice, once with the kernels and once inside
``cpu.disabled()`` (the PyTorch ops), and against :mod:`mhckit.reference`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mhckit import functional as F
from mhckit import reference
from mhckit.ops import cpu
from mhckit.ops.autograd import CoeffsFunction, CoeffsPreFunction, SinkhornFunction

HAVE_CC = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang"))


def test_kernels_are_built_and_active_where_a_compiler_exists():
    st = cpu.status()
    if not HAVE_CC:
        assert not st["active"] and "compiler" in st["why"]
        pytest.skip("no C compiler here: the PyTorch path is used (checked above)")
    assert st["active"], st
    assert os.path.exists(st["path"])
    x = torch.randn(3, 4, 4)
    assert cpu.available(x, n=4)
    assert not cpu.available(x.to(torch.bfloat16), n=4)  # bf16 goes to the PyTorch ops
    assert not cpu.available(torch.randn(3, 9, 9), n=9)  # n > 8 too
    with cpu.disabled():
        assert not cpu.available(x, n=4)


pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the compiled CPU kernels cannot be built")


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_kernel_source_compiles_without_warnings(monkeypatch, isa):
    """The build's own flags for each instruction set, plus -Wall -Wextra -Werror (with -O3, so that
    the optimiser's warnings, e.g. maybe-uninitialized, are on); ~40 s each on a 2-core CPU."""
    from mhckit.ops.cpu import _library as lib

    monkeypatch.setattr(lib, "_isa", lambda: isa)
    flags = [f for f in lib._FLAGS if f != "-shared"]
    cmd = [lib._compiler(), *flags, *lib._isa_flags(), "-fopenmp", "-Wall", "-Wextra", "-Werror", "-c",
           str(lib._SOURCE), "-o", os.devnull]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


def _both(fn):
    """``fn()`` with the kernels and with the PyTorch ops."""
    fast = fn()
    with cpu.disabled():
        slow = fn()
    return fast, slow


def _close(a, b, dt):
    tol = dict(rtol=1e-5, atol=2e-6) if dt == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(a, b, equal_nan=True, **tol)


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("iters,scale", [(1, 1.0), (5, 3.0), (20, 1.0), (20, 30.0), (20, 1e3)])
def test_sinkhorn_matches_pytorch_ops(dt, n, iters, scale):
    g = torch.Generator().manual_seed(n * 100 + iters)
    logits = (torch.randn(2, 37, n, n, generator=g, dtype=dt) * scale).requires_grad_()
    grad = torch.randn(2, 37, n, n, generator=g, dtype=dt)

    def run():
        logits.grad = None
        out = SinkhornFunction.apply(logits, iters)
        out.backward(grad)
        return out.detach(), logits.grad.clone()

    (out_f, g_f), (out_s, g_s) = _both(run)
    _close(out_f, out_s, dt)
    _close(g_f, g_s, dt)
    if scale <= 30:  # doubly stochastic rows; gradients finite and equal to the spec's autograd
        assert torch.isfinite(g_f).all()
        ref = reference.sinkhorn(logits, iters)
        (gr,) = torch.autograd.grad(ref, logits, grad)
        _close(out_f, ref.detach(), dt)
        _close(g_f, gr, dt)
    else:  # clamped divisors: same treatment (and the same non-finite entries) as the PyTorch ops
        assert torch.equal(torch.isfinite(g_f), torch.isfinite(g_s))


def test_sinkhorn_reads_strided_logits():
    base = torch.randn(50, 40, dtype=torch.float64)
    logits = base[:, 3:19].reshape(50, 4, 4)  # rows of 16 values at stride 40
    _close(cpu.sinkhorn_fwd(logits, 20), reference.sinkhorn(logits, 20), torch.float64)


def _coeff_inputs(n, c, dt, lead=(3, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 2 * n + n * n
    x = torch.randn(*lead, n, c, generator=g, dtype=dt, requires_grad=True)
    phi = (torch.randn(n * c, k, generator=g, dtype=dt) * 0.5).requires_grad_()
    bias = torch.randn(k, generator=g, dtype=dt).requires_grad_()
    alpha = (torch.rand(3, generator=g, dtype=dt) + 0.5).requires_grad_()
    return x, phi, bias, alpha


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,c", [(1, 5), (2, 3), (3, 13), (4, 16), (8, 4)])
@pytest.mark.parametrize("fused_read", [False, True])
def test_coefficients_match_pytorch_ops_and_reference(dt, n, c, fused_read):
    x, phi, bias, alpha = _coeff_inputs(n, c, dt)
    leaves = (x, phi, bias, alpha)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(*x.shape[:-2], *s, generator=g, dtype=dt) for s in ((c,), (n,), (n,), (n, n))]

    ws = weights if fused_read else weights[1:]
    fn = CoeffsPreFunction if fused_read else CoeffsFunction

    def run():
        for t in leaves:
            t.grad = None
        outs = fn.apply(x, phi, bias, alpha, 20, 1e-6)
        sum((o * w).sum() for o, w in zip(outs, ws)).backward()
        return [o.detach() for o in outs] + [t.grad.clone() for t in leaves]

    fast, slow = _both(run)
    for a, b in zip(fast, slow):
        _close(a, b, dt)
    ref = reference.mhc_coeffs(x, phi, bias, alpha, iters=20, rms_eps=1e-6)
    first = 1 if fused_read else 0
    for got, want in zip(fast[first : first + 3], ref):
        _close(got, want.detach(), dt)


@pytest.mark.parametrize("blas", [False, True])
@pytest.mark.parametrize("n,tokens", [(4, 1), (4, 7), (4, 15), (4, 33), (8, 7), (8, 33)])
def test_projection_in_the_kernel_and_in_blas(monkeypatch, blas, n, tokens):
    """The kernels run the matmuls with phi themselves up to PROJECT_MAX_WIDTH / PROJECT_MAX_COLUMNS
    and leave them to BLAS beyond; both routes (each forced here, also n = 8 in the kernel, where 2-byte
    streams run it) agree with the PyTorch ops, for token counts that fill 4-token groups and W-token
    blocks partly."""
    if blas:
        monkeypatch.setattr(cpu, "PROJECT_MAX_WIDTH", 0)
    else:
        monkeypatch.setattr(cpu, "PROJECT_MAX_COLUMNS", 10**6)
    x, phi, bias, alpha = _coeff_inputs(n, 11, torch.float32, lead=(tokens,), seed=7)
    w = [torch.randn(*o, generator=torch.Generator().manual_seed(2)) for o in ((tokens, 11), (tokens, n), (tokens, n),
                                                                              (tokens, n, n))]

    def run():
        for t in (x, phi, bias, alpha):
            t.grad = None
        outs = CoeffsPreFunction.apply(x, phi, bias, alpha, 20, 1e-6)
        sum((o * g).sum() for o, g in zip(outs, w)).backward()
        return [o.detach() for o in outs] + [t.grad.clone() for t in (x, phi, bias, alpha)]

    fast, slow = _both(run)
    for a, b in zip(fast, slow):
        _close(a, b, torch.float32)


@pytest.mark.parametrize(
    "n,c,dtype,here",
    [(4, 64, torch.float32, True), (4, 1024, torch.float32, True), (4, 1025, torch.float32, False),
     (5, 64, torch.float32, "avx512"), (6, 64, torch.float32, "avx512"), (6, 64, torch.float64, False),
     (7, 64, torch.float32, False),
     (8, 64, torch.float64, False), (8, 64, torch.bfloat16, True), (8, 2048, torch.float16, True)],
)
def test_projection_route(monkeypatch, n, c, dtype, here):
    """Which side runs the matmuls with phi: the kernel up to n*C = 4096 for n <= 4 (fp32 streams: n <= 6
    with the AVX-512 blocks) and for 2-byte streams always, BLAS beyond (fp32 / fp64; measured faster there,
    see PROJECT_MAX_COLUMNS)."""
    if here == "avx512":
        here = cpu.status()["avx512_matmuls"]
    seen = []
    real = cpu._call

    def spy(name, dt, *args):
        if name in ("mhc_coeffs_fwd", "mhc_coeffs_bwd"):
            seen.append((name, args[1] is not None if name == "mhc_coeffs_fwd" else args[10] is not None))
        return real(name, dt, *args)

    monkeypatch.setattr(cpu, "_call", spy)
    x = torch.randn(3, n, c, dtype=dtype, requires_grad=True)
    k = n * n + 2 * n
    phi = (torch.randn(n * c, k) * 0.02).to(cpu.coef_dtype(dtype)).requires_grad_()
    bias, alpha = torch.zeros(k, dtype=phi.dtype, requires_grad=True), torch.full((3,), 0.1, dtype=phi.dtype)
    outs = CoeffsPreFunction.apply(x, phi, bias, alpha, 20, 1e-6)
    sum(o.float().sum() for o in outs).backward()
    assert seen == [("mhc_coeffs_fwd", here), ("mhc_coeffs_bwd", here)]
    assert x.grad is not None and phi.grad is not None and torch.isfinite(phi.grad).all()


@pytest.mark.parametrize("blas", [False, True])
def test_frozen_phi_and_frozen_streams(monkeypatch, blas):
    """A frozen projection (no dphi computed) or frozen streams (no dx): the other gradients agree."""
    if blas:
        monkeypatch.setattr(cpu, "PROJECT_MAX_WIDTH", 0)
    for frozen in ("phi", "x"):
        x, phi, bias, alpha = _coeff_inputs(4, 9, torch.float64, seed=9)
        {"phi": phi, "x": x}[frozen].requires_grad_(False)
        leaves = [t for t in (x, phi, bias, alpha) if t.requires_grad]

        def run():
            for t in leaves:
                t.grad = None
            outs = CoeffsPreFunction.apply(x, phi, bias, alpha, 20, 1e-6)
            sum(o.cos().sum() for o in outs).backward()
            return [t.grad.clone() for t in leaves]

        fast, slow = _both(run)
        for a, b in zip(fast, slow):
            _close(a, b, torch.float64)


def test_gradcheck_through_the_kernels():
    x, phi, bias, alpha = _coeff_inputs(3, 4, torch.float64, lead=(5,), seed=3)
    assert cpu.available(x, n=3)
    assert torch.autograd.gradcheck(lambda *a: CoeffsPreFunction.apply(*a, 7, 1e-6), (x, phi, bias, alpha))
    logits = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: SinkhornFunction.apply(t, 9), (logits,))


def test_gradients_with_only_some_outputs_used():
    """Unused outputs reach backward as None (zero gradient); both paths agree."""
    x, phi, bias, alpha = _coeff_inputs(4, 8, torch.float64, seed=5)

    def run(i):
        def go():
            for t in (x, phi, bias, alpha):
                t.grad = None
            F.mhc_coeffs(x, phi, bias, alpha)[i].square().sum().backward()
            return [t.grad.clone() for t in (x, phi, bias, alpha)]
        return go

    for i in range(3):
        fast, slow = _both(run(i))
        for a, b in zip(fast, slow):
            _close(a, b, torch.float64)


@pytest.mark.parametrize("used", [(0,), (1,), (0, 3), (1, 2, 3)])
def test_fused_read_gradients_with_only_some_outputs_used(used):
    """``(u, h_pre, h_post, h_res)`` of the fused read with some outputs unused (their gradients reach
    backward as None: the read's ``<du, x[j]>`` term alone, or the coefficients alone)."""
    x, phi, bias, alpha = _coeff_inputs(4, 12, torch.float64, seed=6)

    def go():
        for t in (x, phi, bias, alpha):
            t.grad = None
        outs = F.mhc_coeffs_pre(x, phi, bias, alpha)
        sum(outs[i].sin().sum() for i in used).backward()
        return [t.grad.clone() for t in (x, phi, bias, alpha)]

    fast, slow = _both(go)
    for a, b in zip(fast, slow):
        _close(a, b, torch.float64)


_FALLBACK_CHECK = (
    "import warnings, torch\n"
    "from mhckit.ops import cpu\n"
    "from mhckit import functional as F, reference\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    x = torch.randn(5, 4, 4, dtype=torch.float64)\n"
    "    out = F.sinkhorn(x, 20)\n"
    "st = cpu.status()\n"
    "assert not st['active'] and {why!r} in st['why'], st\n"
    "assert any('CPU kernels unavailable' in str(m.message) for m in w), [str(m.message) for m in w]\n"
    "torch.testing.assert_close(out, reference.sinkhorn(x, 20))\n"
    "print('ok')\n"
)


def _falls_back(env: dict, why: str) -> None:
    """In a fresh process with ``env``: one warning, ``status()`` names ``why``, PyTorch-op results."""
    code = _FALLBACK_CHECK.format(why=why)
    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_missing_compiler_falls_back_with_a_warning(tmp_path):
    _falls_back({"CC": "/nonexistent/cc", "PATH": str(tmp_path), "MHCKIT_CACHE": str(tmp_path / "cache")}, "compiler")


def test_env_switch_disables_the_kernels():
    code = "from mhckit.ops import cpu; st = cpu.status(); assert not st['active'] and 'MHCKIT_CPU_KERNELS' in st['why']; print('ok')"
    env = dict(os.environ, MHCKIT_CPU_KERNELS="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,c", [(1, 7), (2, 8), (3, 13), (4, 67), (8, 16)])
def test_stream_read_and_write_back_match_pytorch_ops_and_reference(dt, n, c):
    g = torch.Generator().manual_seed(n * 7 + c)
    lead = (2, 9)
    x = torch.randn(*lead, n, c, generator=g, dtype=dt, requires_grad=True)
    y = torch.randn(*lead, c, generator=g, dtype=dt, requires_grad=True)
    h_pre = torch.rand(*lead, n, generator=g, dtype=dt, requires_grad=True)
    h_post = (2 * torch.rand(*lead, n, generator=g, dtype=dt)).requires_grad_()
    h_res = torch.rand(*lead, n, n, generator=g, dtype=dt, requires_grad=True)
    w_u, w_out = torch.randn(*lead, c, generator=g, dtype=dt), torch.randn(*lead, n, c, generator=g, dtype=dt)
    leaves = (x, y, h_pre, h_post, h_res)
    assert cpu.available(*leaves, n=n)

    def run(fns):
        def go():
            for t in leaves:
                t.grad = None
            u = fns[0](x, h_pre)
            out = fns[1](x, y, h_post, h_res)
            ((u * w_u).sum() + (out * w_out).sum()).backward()
            return [u.detach(), out.detach()] + [t.grad.clone() for t in leaves]
        return go

    fast, slow = _both(run((F.mhc_pre, F.mhc_post_res)))
    ref = run((reference.mhc_pre, reference.mhc_post_res))()
    for a, b, r in zip(fast, slow, ref):
        _close(a, b, dt)
        _close(a, r, dt)


def test_write_back_gradients_only_where_needed():
    """Inputs without requires_grad get no gradient work (the kernel skips NULL outputs)."""
    x = torch.randn(6, 4, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 32, dtype=torch.float64)
    h_post, h_res = torch.rand(6, 4, dtype=torch.float64), torch.rand(6, 4, 4, dtype=torch.float64, requires_grad=True)
    F.mhc_post_res(x, y, h_post, h_res).square().sum().backward()
    gx, gr = x.grad.clone(), h_res.grad.clone()
    x.grad = h_res.grad = None
    reference.mhc_post_res(x, y, h_post, h_res).square().sum().backward()
    _close(gx, x.grad, torch.float64)
    _close(gr, h_res.grad, torch.float64)


def test_unwritable_cache_falls_back_with_a_warning(tmp_path):
    """A cache directory that cannot be created -> the warning names MHCKIT_CACHE."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # (and no default cache whose build would serve it)
    _falls_back({"MHCKIT_CACHE": str(blocker / "cache"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}, "MHCKIT_CACHE")


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_family_kernels_do_not_depend_on_the_thread_count(dt):
    """The same for the kernels of mHC-lite (the permutation tail), dynamic HC and the read of HC's
    static coefficients: per-token outputs bitwise equal with 1, 2 and 3 threads, sums over tokens
    (dphi, dW, the statics' and scales' gradients) to rounding."""
    gen = torch.Generator().manual_seed(12)
    t, n, c = 1007, 4, 24
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dt)  # noqa: E731
    x, gu, g_out, g_pre, g_post = r(t, n, c), r(t, c), r(t, n, c), r(t, n), r(t, n)
    k = 2 * n + 24
    phi, bias, gates = 0.3 * r(n * c, k), r(k), torch.rand(3, generator=gen, dtype=dt) + 0.5
    w, sp, spo, sr, scales = 0.3 * r(c, n + 2), r(n), r(n), r(n, n), torch.rand(2, generator=gen, dtype=dt) + 0.5
    hc_params = (w[:, 0], w[:, 1], w[:, 2:], sp, spo, sr, scales[0], scales[1])  # strided w columns: copied
    h_pre, h_res = r(t, n), r(t, n, n)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            lite = cpu.coeffs_fwd(x, phi, bias, gates, 1e-6, cpu.PERMUTATIONS, True)
            lgx, ldphi, ldbias, ldalpha = cpu.coeffs_bwd(x, gu, lite[4], lite[3], phi, bias, gates, None, g_post, None,
                                                         cpu.PERMUTATIONS, True, True, g_out=g_out)
            hc = cpu.hc_fwd(x, *hc_params, 1e-6)
            hgx, *hsums = cpu.hc_bwd(x, gu, g_out, hc[4], hc[5], *hc_params[:4], *hc_params[5:], g_pre, g_post, None,
                                     True)
            rd = cpu.read_bwd(x, h_pre, h_res, gu, g_out, True, True, True)
            runs.append(([*lite, lgx, *hc, hgx, *rd], [ldphi, ldbias, ldalpha, *hsums]))
    finally:
        torch.set_num_threads(before)
    for per_token, sums in runs[1:]:
        for a, b in zip(per_token, runs[0][0]):
            assert torch.equal(a, b)
        for a, b in zip(sums, runs[0][1]):
            tol = 1e-4 if dt == torch.float32 else 1e-12
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_results_do_not_depend_on_the_thread_count(dt):
    """The kernels split tokens statically over their OpenMP threads, each thread with its own Sinkhorn
    scratch: per-token outputs are bitwise the same with 1, 2 and 3 threads (3 oversubscribes a 2-core
    machine), and the sums over tokens (dphi, dbias, dalpha) agree to rounding. 1000 + 7 tokens: the
    blocks of 16 do not divide evenly."""
    gen = torch.Generator().manual_seed(11)
    t, n, c, iters = 1007, 4, 24, 20
    k = 2 * n + n * n
    x = torch.randn(t, n, c, generator=gen, dtype=dt)
    phi = 0.3 * torch.randn(n * c, k, generator=gen, dtype=dt)
    bias, gates = torch.randn(k, generator=gen, dtype=dt), torch.rand(3, generator=gen, dtype=dt) + 0.5
    gu, g_out = torch.randn(t, c, generator=gen, dtype=dt), torch.randn(t, n, c, generator=gen, dtype=dt)
    g_post, g_res = torch.randn(t, n, generator=gen, dtype=dt), torch.randn(t, n * n, generator=gen, dtype=dt)
    y = torch.randn(t, c, generator=gen, dtype=dt)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            h_pre, h_post, h_res, r, z, u = cpu.coeffs_fwd(x, phi, bias, gates, 1e-6, iters, True)
            gx, dphi, dbias, dalpha = cpu.coeffs_bwd(x, gu, z, r, phi, bias, gates, None, g_post, None, iters, True, True,
                                                     g_out=g_out)
            sk = cpu.sinkhorn_bwd(z[:, 2 * n:].reshape(t, n, n), g_res.view(t, n, n), iters)
            out = cpu.post_res_fwd(x, y, h_post, h_res)
            runs.append(((h_pre, h_post, h_res, r, z, u, gx, sk, out), (dphi, dbias, dalpha)))
    finally:
        torch.set_num_threads(before)
    for per_token, sums in runs[1:]:
        for a, b in zip(per_token, runs[0][0]):
            assert torch.equal(a, b)
        for a, b in zip(sums, runs[0][1]):  # 1007-term sums split differently: rounding scales with the largest
            tol = 1e-4 if dt == torch.float32 else 1e-12
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


_ISA_RUN = """
import sys, torch
from mhckit.ops import cpu
cpu.PROJECT_MAX_COLUMNS = 10**6  # the kernels' own matmuls at every n (2-byte streams run them at every n)
st = cpu.status()
assert st["active"] and st["isa"] == sys.argv[1], st
gen = torch.Generator().manual_seed(5)
out = {"avx512_matmuls": st["avx512_matmuls"]}
for dt in (torch.float32, torch.bfloat16):
    for n, c, t in ((1, 11, 7), (2, 11, 33), (3, 64, 17), (4, 11, 1), (4, 64, 37), (4, 100, 20), (6, 8, 9), (8, 11, 19)):
        k = 2 * n + n * n
        x = torch.randn(t, n, c, generator=gen).to(dt)
        phi, bias = 0.3 * torch.randn(n * c, k, generator=gen), torch.randn(k, generator=gen)
        gates = torch.rand(3, generator=gen) + 0.5
        gu, g_out = torch.randn(t, c, generator=gen).to(dt), torch.randn(t, n, c, generator=gen).to(dt)
        g_post = torch.randn(t, n, generator=gen)
        h_pre, h_post, h_res, r, z, u = cpu.coeffs_fwd(x, phi, bias, gates, 1e-6, 20, True)
        grads = cpu.coeffs_bwd(x, gu, z, r, phi, bias, gates, None, g_post, None, 20, True, True, g_out=g_out)
        out[(str(dt), n, c, t)] = (h_pre, h_post, h_res, r, z, u, *grads)
torch.save(out, sys.argv[2])
"""


def test_avx512_and_avx2_builds_agree(tmp_path):
    """Where the CPU has AVX-512 the float32 matmuls with phi (projection, dphi, the dx term) run in
    16-lane register blocks, and the rest of the suite tests that build; the portable 8-lane blocks
    (AVX2 CPUs) are checked here: a build narrowed to AVX2 (``MHCKIT_CPU_ISA=avx2``) gives the same
    coefficients and gradients as the AVX-512 build to float32 rounding (the blocks sum each output in
    the same order; the compiler fuses some scalar tails differently per ISA, e.g. the RMS dot product),
    fp32 and bf16 streams (those within one bf16 unit), n = 1 .. 8, widths that leave vector tails,
    1 .. 37 tokens."""
    if cpu.status()["isa"] != "avx512":
        pytest.skip("this CPU (as PyTorch sees it) has no AVX-512: one build only")
    results = {}
    for isa in ("avx512", "avx2"):
        path = tmp_path / f"{isa}.pt"
        res = subprocess.run([sys.executable, "-c", _ISA_RUN, isa, str(path)], capture_output=True, text=True,
                             env=dict(os.environ, MHCKIT_CPU_ISA=isa), timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        results[isa] = torch.load(path)
    a, b = results["avx512"], results["avx2"]
    assert a.pop("avx512_matmuls") and not b.pop("avx512_matmuls")
    assert a.keys() == b.keys() and len(a) == 16
    for key in a:
        for p, q in zip(a[key], b[key]):
            assert (p is None) == (q is None), key
            if p is None:
                continue
            scale = q.float().abs().max().item()
            if p.dtype == torch.bfloat16:
                torch.testing.assert_close(p, q, rtol=2**-7, atol=2**-8 * scale, msg=str(key))
            else:
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6 * scale, msg=str(key))


def test_isa_switch(monkeypatch):
    """MHCKIT_CPU_ISA narrows the build (never beyond what PyTorch dispatches to); a bad value is named."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.delenv("MHCKIT_CPU_ISA", raising=False)
    assert cpu._isa() == "avx2" and "-mavx512f" not in cpu._isa_flags()
    monkeypatch.setenv("MHCKIT_CPU_ISA", "avx512")
    assert cpu._isa() == "avx2"
    monkeypatch.setenv("MHCKIT_CPU_ISA", "generic")
    assert cpu._isa() == "generic" and cpu._isa_flags() == []
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("MHCKIT_CPU_ISA", "AVX512")
    assert cpu._isa() == "avx512" and "-mavx512f" in cpu._isa_flags()
    monkeypatch.setenv("MHCKIT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match=r"MHCKIT_CPU_ISA: got 'sse9'; expected one of avx512, avx2, generic"):
        cpu._isa()


def test_use_isa_switches_the_build_and_puts_it_back():
    """``use_isa`` runs the kernels of another build inside the block (benchmarks compare the AVX2
    and AVX-512 builds in one process) and restores the process's own build afterwards."""
    own = cpu.status()
    # what use_isa("avx2") can build here: the CPU's capability, not the process's build (which
    # MHCKIT_CPU_ISA may have narrowed to generic)
    machine = {"AVX512": "avx2", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "generic")
    gen = torch.Generator().manual_seed(3)
    x, phi = torch.randn(37, 4, 20, generator=gen), 0.3 * torch.randn(80, 24, generator=gen)
    bias, gates = torch.randn(24, generator=gen), torch.rand(3, generator=gen) + 0.5
    before = cpu.coeffs_fwd(x, phi, bias, gates, 1e-6, 20, True)
    for _ in range(2):  # the second time from its cache
        with cpu.use_isa("avx2"):
            st = cpu.status()
            assert st["active"] and st["isa"] == machine
            assert not st["avx512_matmuls"] and st["path"] != own["path"] or own["isa"] == "avx2"
            inside = cpu.coeffs_fwd(x, phi, bias, gates, 1e-6, 20, True)
        assert cpu.status() == own
    after = cpu.coeffs_fwd(x, phi, bias, gates, 1e-6, 20, True)
    for a, b, c in zip(before, inside, after):
        assert torch.equal(a, c)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"isa: got 'avx3'; expected one of avx512, avx2, generic"):
        with cpu.use_isa("avx3"):
            pass


def test_sinkhorn_walk_of_16_lanes_equals_the_8_lane_walk():
    """With AVX-512 the float32 kept-iterate Sinkhorn (the backward's: it recomputes the iterates, then
    walks them back) runs 16 tokens per vector instead of 8 (``status()["sinkhorn_lanes"]``). Every step
    is lane-wise, so each token's result must be bitwise what the 8-lane walk of the AVX2 build gives:
    the Sinkhorn gradient and the coefficient tail's gradient (sigmoids + Sinkhorn, what the coefficient
    backward runs; that backward as a whole differs between the builds by its matmuls' rounding, see
    test_avx512_and_avx2_builds_agree), n = 1 .. 8, token counts that leave part of a vector empty,
    1 / 5 / 20 iterations, and logits large enough to clamp divisors (their sign-bit path)."""
    st = cpu.status()
    if st["isa"] != "avx512":
        pytest.skip("this CPU (as PyTorch sees it) has no AVX-512: the 8-lane walk only")
    assert st["sinkhorn_lanes"] == 16
    gen = torch.Generator().manual_seed(11)
    checked = clamped = 0
    for n in range(1, 9):
        for t in (1, 9, 16, 23, 40):
            for iters in (1, 5, 20):
                scale = 60.0 if t == 23 else 3.0  # row sums below FLT_MIN after the softmax: clamped
                lg, g = scale * torch.randn(t, n, n, generator=gen), torch.randn(t, n, n, generator=gen)
                k = 2 * n + n * n
                z, bias = torch.randn(t, k, generator=gen), torch.randn(k, generator=gen)
                gates = torch.rand(3, generator=gen) + 0.5
                gp, gq = torch.randn(t, n, generator=gen), torch.randn(t, n, generator=gen)
                runs = []
                for isa in (None, "avx2"):
                    with cpu.use_isa(isa) if isa else contextlib.nullcontext():
                        assert cpu.status()["sinkhorn_lanes"] == (8 if isa else 16)
                        runs.append((cpu.sinkhorn_bwd(lg, g, iters),
                                     cpu.tail_bwd(z, bias, gates, gp, gq, g, n, iters)))
                for a, b in zip(*runs):  # bit patterns (NaN too: saturated logits give NaN gradients either way)
                    assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (n, t, iters)
                if t == 23:  # a row divided by the clamp (the last step is rows) sums to less than 1
                    clamped += bool((cpu.sinkhorn_fwd(lg, iters).sum(-1) < 0.5).any())
                checked += 1
    assert checked == 120 and clamped >= 5, (checked, clamped)


_GUARD_SCRIPT = r"""
import ctypes, math, mmap, sys
import torch
from mhckit.ops import cpu

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
page = mmap.PAGESIZE
checked = []
for dt in (torch.float32, torch.float64, torch.bfloat16):
    cd = torch.float32 if dt == torch.bfloat16 else dt
    for n in range(1, 9):
        for iters in (20, cpu.PERMUTATIONS, cpu.IDENTITY):
            if iters == cpu.PERMUTATIONS and n > cpu.MAX_PERMUTATION_STREAMS:
                continue
            k = 2 * n + (math.factorial(n) if iters == cpu.PERMUTATIONS else 0 if iters == cpu.IDENTITY else n * n)
            c = 5
            if not cpu._project_here(n, c, k, dt):
                continue
            nbytes = n * c * k * torch.tensor([], dtype=cd).element_size()
            pages = (nbytes + page - 1) // page
            buf = mmap.mmap(-1, (pages + 1) * page)
            base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            assert libc.mprotect(base + pages * page, page, 0) == 0  # the page after phi: no access
            raw = torch.frombuffer(buf, dtype=torch.uint8)
            start = pages * page - nbytes  # phi ends exactly where the guard page starts
            phi = raw[start:start + nbytes].view(cd).view(n * c, k)
            phi.copy_(torch.randn(n * c, k, dtype=cd) * 0.1)
            x = torch.randn(3, n, c).to(dt)
            bias, gates = torch.zeros(k, dtype=cd), torch.ones(3, dtype=cd)
            z = cpu.coeffs_fwd(x, phi, bias, gates, 1e-6, iters, True)[4]
            want = (x.to(cd).reshape(3, n * c) @ phi.clone()) / x.to(cd).reshape(3, n * c).square().mean(-1, keepdim=True).add(1e-6).sqrt()
            torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-5)
            checked.append((str(dt), n, iters))
print(len(checked))
"""


def test_projection_never_reads_past_phi():
    """The coefficient forward reads phi in place when its K columns fill whole vectors (mHC at n = 4:
    no padded copy per call) and pads a copy otherwise: with phi ending right before a page that may not
    be read, every n (1-8), every tail (Sinkhorn, permutations, identity) and stream dtype run and give
    v @ phi / r (a read past the end would kill the process)."""
    out = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip()) >= 20

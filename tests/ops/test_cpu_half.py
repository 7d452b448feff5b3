"""bfloat16 / float16 streams on the compiled CPU kernels (``mhc_cpu_half.h``).

The half entry points convert the streams to float32, run the float32 code and round each stream
result once. bf16 / fp16 -> fp32 is exact, so a half kernel must give BITWISE what the float32 kernel
gives on the upcast inputs, its stream outputs rounded with PyTorch's ``.to(dtype)``; the layers then
agree with mhckit's PyTorch ops in that dtype to one unit in the last place, and meet the error rule
of DESIGN.md (at most twice the reference's own error in that dtype, against the fp32 result).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from mhckit import functional as F
from mhckit.ops import cpu
from tests.ops.test_cpu_carry import _grads as _run
from tests.ops.test_cpu_carry import _layer

HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the compiled CPU kernels cannot be built")

HALF = [torch.bfloat16, torch.float16]
SHAPES = [(1, 7, 5), (2, 8, 40), (3, 13, 37), (4, 64, 100), (4, 67, 33), (8, 20, 17)]  # n, C, tokens


@pytest.fixture(autouse=True)
def _needs_half_kernels(request):
    st = cpu.status()
    if not st["active"]:
        pytest.skip("compiled CPU kernels unavailable")
    dt = getattr(request.node, "callspec", None) and request.node.callspec.params.get("dt")
    if dt is not None and str(dt) not in st["half_streams"]:  # float16 needs the compiler's _Float16
        pytest.skip(f"this build of the kernels has no {dt} streams")


def _inputs(n, c, t, dt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = 2 * n + n * n

    def r(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen)

    return dict(
        x=r(t, n, c).to(dt), y=r(t, c).to(dt), gu=r(t, c).to(dt), g_out=r(t, n, c).to(dt),
        phi=r(n * c, k, scale=0.3), bias=r(k), gates=torch.rand(3, generator=gen) + 0.5,
        g_pre=r(t, n), g_post=r(t, n), g_res=r(t, n * n),
    )


def _bitwise(half_out, f32_out, dt, what):
    """A stream result of the half kernel vs the float32 kernel's, rounded like PyTorch rounds."""
    assert half_out.dtype == dt, what
    expected = f32_out.to(dt)
    assert torch.equal(half_out.view(torch.int16), expected.view(torch.int16)), (
        f"{what}: {(half_out.float() - expected.float()).abs().max().item()} off"
    )


def _same(a, b, what):
    assert a.dtype == torch.float32 and torch.equal(a, b), what


@pytest.mark.parametrize("dt", HALF)
@pytest.mark.parametrize("n,c,t", SHAPES)
def test_coefficient_kernels_are_the_float_kernels_rounded_once(monkeypatch, dt, n, c, t):
    # 2-byte streams run the matmuls with phi in the kernel at every n: so does the float32 twin here
    # (it would leave them to BLAS for large n, see cpu.PROJECT_MAX_COLUMNS)
    monkeypatch.setattr(cpu, "PROJECT_MAX_COLUMNS", 10**6)
    d = _inputs(n, c, t, dt)
    x32, gu32, go32 = d["x"].float(), d["gu"].float(), d["g_out"].float()
    fh = cpu.coeffs_fwd(d["x"], d["phi"], d["bias"], d["gates"], 1e-6, 20, True)
    f32 = cpu.coeffs_fwd(x32, d["phi"], d["bias"], d["gates"], 1e-6, 20, True)
    for name, a, b in zip(("h_pre", "h_post", "h_res", "r", "z"), fh[:5], f32[:5]):
        _same(a, b, name)
    _bitwise(fh[5], f32[5], dt, "u")
    z, r = f32[4], f32[3]
    bh = cpu.coeffs_bwd(d["x"], d["gu"], z, r, d["phi"], d["bias"], d["gates"], d["g_pre"], d["g_post"], d["g_res"],
                        20, True, True, g_out=d["g_out"])
    b32 = cpu.coeffs_bwd(x32, gu32, z, r, d["phi"], d["bias"], d["gates"], d["g_pre"], d["g_post"], d["g_res"],
                         20, True, True, g_out=go32)
    _bitwise(bh[0], b32[0], dt, "gx")
    for name, a, b in zip(("dphi", "dbias", "dalpha"), bh[1:], b32[1:]):
        _same(a, b, name)
    # without the read's and the write-back's gradients, and without dphi
    bh = cpu.coeffs_bwd(d["x"], None, z, r, d["phi"], d["bias"], d["gates"], None, d["g_post"], d["g_res"], 20,
                        True, False)
    b32 = cpu.coeffs_bwd(x32, None, z, r, d["phi"], d["bias"], d["gates"], None, d["g_post"], d["g_res"], 20,
                         True, False)
    assert bh[1] is None
    _bitwise(bh[0], b32[0], dt, "gx (coefficients only)")


@pytest.mark.parametrize("dt", HALF)
@pytest.mark.parametrize("n,c,t", SHAPES)
def test_read_and_write_back_kernels_are_the_float_kernels_rounded_once(dt, n, c, t):
    d = _inputs(n, c, t, dt, seed=1)
    x, y, gu, g = d["x"], d["y"], d["gu"], d["g_out"]
    h_pre, h_post, h_res = torch.rand(t, n), 2 * torch.rand(t, n), torch.rand(t, n, n)
    _bitwise(cpu.pre_fwd(x, h_pre), cpu.pre_fwd(x.float(), h_pre), dt, "u")
    gx, gh = cpu.pre_bwd(x, h_pre, gu, True, True)
    gx32, gh32 = cpu.pre_bwd(x.float(), h_pre, gu.float(), True, True)
    _bitwise(gx, gx32, dt, "pre gx")
    _same(gh, gh32, "pre gh")
    _bitwise(cpu.post_res_fwd(x, y, h_post, h_res), cpu.post_res_fwd(x.float(), y.float(), h_post, h_res), dt, "out")
    hb = cpu.post_res_bwd(x, y, h_post, h_res, g, (True, True, True, True))
    fb = cpu.post_res_bwd(x.float(), y.float(), h_post, h_res, g.float(), (True, True, True, True))
    _bitwise(hb[0], fb[0], dt, "post_res gx")
    _bitwise(hb[1], fb[1], dt, "post_res gy")
    _same(hb[2], fb[2], "dh_post")
    _same(hb[3], fb[3], "dh_res")
    gy, gp = cpu.post_bwd(y, h_post, g, True, True)
    _bitwise(gy, fb[1], dt, "post_bwd gy")
    _same(gp, fb[2], "post_bwd dh_post")


@pytest.mark.parametrize("dt", HALF)
@pytest.mark.parametrize("n,c,t", SHAPES)
def test_hc_kernels_are_the_float_kernels_rounded_once(dt, n, c, t):
    """Dynamic HC's coefficients with the read (mhc_hc_fwd / _bwd) on half streams: u and dx bitwise the
    float32 kernels' rounded once, the coefficients and every parameter gradient bitwise equal."""
    d = _inputs(n, c, t, dt, seed=2)
    x, gu, g = d["x"], d["gu"], d["g_out"]
    gen = torch.Generator().manual_seed(3)
    params = [0.3 * torch.randn(*shape, generator=gen) for shape in ((c,), (c,), (c, n), (n,), (n,), (n, n))]
    sa, sb = torch.rand((), generator=gen) + 0.5, torch.rand((), generator=gen) + 0.5
    wp, wq, wr, sp, spo, sr = params
    half = cpu.hc_fwd(x, wp, wq, wr, sp, spo, sr, sa, sb, 1e-6)
    full = cpu.hc_fwd(x.float(), wp, wq, wr, sp, spo, sr, sa, sb, 1e-6)
    _bitwise(half[0], full[0], dt, "u")
    for name, a, b in zip(["h_pre", "h_post", "h_res", "z", "r"], half[1:], full[1:]):
        _same(a, b, name)
    g_post = d["g_post"]
    hb = cpu.hc_bwd(x, gu, g, half[4], half[5], wp, wq, wr, sp, sr, sa, sb, None, g_post, None, True)
    fb = cpu.hc_bwd(x.float(), gu.float(), g.float(), full[4], full[5], wp, wq, wr, sp, sr, sa, sb, None, g_post, None,
                    True)
    _bitwise(hb[0], fb[0], dt, "hc gx")
    for name, a, b in zip(["dw_pre", "dw_post", "dw_res", "dsp", "dspo", "dsr", "dsa", "dsb"], hb[1:], fb[1:]):
        _same(a, b, name)


@pytest.mark.parametrize("dt", HALF)
@pytest.mark.parametrize("n,c,t", SHAPES)
def test_read_bwd_kernel_is_the_float_kernel_rounded_once(dt, n, c, t):
    """Static HC's joined read / write-back backward (mhc_read_bwd) on half streams: dx bitwise the
    float32 kernel's rounded once, dh_pre and dh_res bitwise equal; with only one of gu / g too."""
    d = _inputs(n, c, t, dt, seed=4)
    x, gu, g = d["x"], d["gu"], d["g_out"]
    h_pre, h_res = torch.rand(t, n), torch.rand(t, n, n)
    for a_gu, a_g in ((gu, g), (gu, None), (None, g)):
        half = cpu.read_bwd(x, h_pre, h_res, a_gu, a_g, True, True, True)
        full = cpu.read_bwd(x.float(), h_pre, h_res, None if a_gu is None else a_gu.float(),
                            None if a_g is None else a_g.float(), True, True, True)
        _bitwise(half[0], full[0], dt, "read gx")
        for name, a, b in zip(["dh_pre", "dh_res"], half[1:], full[1:]):
            assert (a is None) == (b is None), name
            if a is not None:
                _same(a, b, name)


@pytest.mark.parametrize("dt", HALF)
def test_rounding_ties_overflow_and_nan_as_pytorch_rounds(dt):
    """n = 1, h = 1: out = round(x + y) of two 2-byte values; their float sum often sits exactly half
    way between two 2-byte values (ties to even), and a large sum overflows to inf."""
    gen = torch.Generator().manual_seed(2)
    big = torch.finfo(dt).max
    x = torch.randn(4000, 1, 40, generator=gen).to(dt)
    y = torch.randn(4000, 40, generator=gen).to(dt)
    x[0, 0, :4] = torch.tensor([big, -big, float("nan"), float("inf")]).to(dt)
    y[0, :4] = torch.tensor([big, -big, 1.0, 1.0]).to(dt)
    one = torch.ones(4000, 1)
    out = cpu.post_res_fwd(x, y, one, one.view(4000, 1, 1))
    exact = x.float() + y.float().unsqueeze(-2)  # exact in float32 for these formats
    rounded = (exact != exact.to(dt).float()).sum().item()
    halfway = exact.to(torch.float64)
    lo = exact.to(dt).float().double()  # ties: the sum exactly between two neighbours of the format
    ties = ((halfway - lo).abs() * 2 == torch.finfo(dt).eps * torch.exp2(torch.floor(torch.log2(lo.abs())))).sum()
    assert rounded > 10000 and ties > 100  # the comparison below is not vacuous
    expected = exact.to(dt)
    fin = expected.isfinite()
    assert torch.equal(out[fin].view(torch.int16), expected[fin].view(torch.int16))
    assert out[0, 0, 0] == float("inf") and out[0, 0, 1] == float("-inf") and out[0, 0, 3] == float("inf")
    assert out[0, 0, 2].isnan()


@pytest.mark.parametrize("dt", HALF)
def test_results_do_not_depend_on_the_thread_count(dt):
    d = _inputs(4, 24, 1007, dt, seed=3)
    before, runs = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            fh = cpu.coeffs_fwd(d["x"], d["phi"], d["bias"], d["gates"], 1e-6, 20, True)
            gx = cpu.coeffs_bwd(d["x"], d["gu"], fh[4], fh[3], d["phi"], d["bias"], d["gates"], None, d["g_post"],
                                None, 20, True, False, g_out=d["g_out"])[0]
            runs.append((*fh, gx, cpu.post_res_fwd(d["x"], d["y"], fh[1], fh[2])))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


def _half_calls(kernel_calls):
    return [name for name, dt in kernel_calls if dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("dt", HALF)
@pytest.mark.parametrize("n,c", [(4, 64), (3, 13)])
def test_a_half_layer_runs_on_the_kernels_and_agrees_with_the_torch_ops(dt, n, c, kernel_calls):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 11, n, c, generator=gen).to(dt).requires_grad_()
    g = torch.randn(5, 11, n, c, generator=gen).to(dt)
    hc = _layer(n, c, dt)
    fast = _run(hc, x, g)
    ran = set(_half_calls(kernel_calls))
    assert {"mhc_coeffs_fwd", "mhc_coeffs_bwd", "mhc_post_res_fwd", "mhc_post_res_bwd"} <= ran
    kernel_calls.clear()
    with cpu.disabled():
        slow = _run(hc, x, g)
    assert not kernel_calls
    names = ["out", "x.grad"] + [f"{k}.grad" for k, _ in hc.named_parameters()]
    ulp = torch.finfo(dt).eps
    for name, a, b in zip(names, fast, slow):
        assert a.dtype == b.dtype == dt, name
        # the torch ops round the two stream gradients of a sublayer before autograd adds them: 2 ulp
        torch.testing.assert_close(a.float(), b.float(), rtol=2 * ulp, atol=2 * ulp * b.float().abs().max().item(),
                                   msg=name)


@pytest.mark.parametrize("dt", HALF)
def test_half_layer_error_at_most_twice_the_references(dt, kernel_calls):
    """DESIGN.md's rule on a whole layer, forward and every gradient: against the float32 layer, the
    error of the half layer on the kernels is at most twice that of the half layer on the reference."""
    n, c = 4, 32
    gen = torch.Generator().manual_seed(5)
    x32 = torch.randn(6, 9, n, c, generator=gen)
    g32 = torch.randn(6, 9, n, c, generator=gen)
    gold = _run(_layer(n, c, torch.float32), x32.clone().requires_grad_(), g32)
    xh, gh = x32.to(dt), g32.to(dt)
    fast = _run(_layer(n, c, dt), xh.clone().requires_grad_(), gh)
    assert "mhc_coeffs_bwd" in _half_calls(kernel_calls)  # the half layer ran on the kernels
    ref = _run(_layer(n, c, dt, backend="reference"), xh.clone().requires_grad_(), gh)
    for i, (gd, f, r) in enumerate(zip(gold, fast, ref)):
        err_fast = (f.float() - gd).abs().max().item()
        err_ref = (r.float() - gd).abs().max().item()
        assert err_fast <= 2 * err_ref + 1e-6, f"output {i}: kernels {err_fast} vs reference {err_ref}"


def test_a_wider_branch_output_is_not_rounded_to_the_streams(kernel_calls):
    """bf16 streams with a float32 branch output: the write-back must not round y to bf16 before the
    sum (the PyTorch ops do not); it runs on the PyTorch ops, the read still on the kernels."""
    n, c = 4, 16
    hc = _layer(n, c, torch.bfloat16)
    x = torch.randn(64, n, c).to(torch.bfloat16)
    y = 1.0 + 3e-3 * torch.randn(64, c)  # bf16(y) is mostly 1.0: rounding it first changes some outputs
    u, finish = hc.split(x)
    out = finish(y)
    calls = _half_calls(kernel_calls)
    assert "mhc_coeffs_fwd" in calls and "mhc_post_res_fwd" not in calls
    with cpu.disabled():
        _, finish_ops = hc.split(x)
        expected = finish_ops(y)
    assert torch.equal(out, expected)
    rounded_first = finish(y.to(torch.bfloat16))  # what the kernels would compute
    assert not torch.equal(out, rounded_first)


def test_functional_ops_take_half_streams_with_float_coefficients(kernel_calls):
    """The public ops (not only the layer): bf16 x, float32 h."""
    n, c, t = 3, 24, 50
    x = torch.randn(t, n, c).to(torch.bfloat16).requires_grad_()
    y = torch.randn(t, c).to(torch.bfloat16).requires_grad_()
    h_pre, h_post = torch.rand(t, n, requires_grad=True), torch.rand(t, n, requires_grad=True)
    h_res = torch.rand(t, n, n, requires_grad=True)
    out = F.mhc_post_res(x, y, h_post, h_res) + F.mhc_pre(x, h_pre).unsqueeze(-2)
    out.float().square().sum().backward()
    ran = set(_half_calls(kernel_calls))
    assert {"mhc_pre_fwd", "mhc_pre_bwd", "mhc_post_res_fwd", "mhc_post_res_bwd"} <= ran
    fast = [out.detach(), x.grad, y.grad, h_pre.grad, h_post.grad, h_res.grad]
    for tns in (x, y, h_pre, h_post, h_res):
        tns.grad = None
    with cpu.disabled():
        out = F.mhc_post_res(x, y, h_post, h_res) + F.mhc_pre(x, h_pre).unsqueeze(-2)
        out.float().square().sum().backward()
    slow = [out.detach(), x.grad, y.grad, h_pre.grad, h_post.grad, h_res.grad]
    for name, a, b in zip(("out", "x", "y", "h_pre", "h_post", "h_res"), fast, slow):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-2 * b.float().abs().max().item(),
                                   msg=name)


@pytest.mark.parametrize("y_dtype", [torch.bfloat16, torch.float16])
def test_public_write_back_takes_a_narrower_branch_output_to_the_kernels(kernel_calls, y_dtype):
    """F.mhc_post_res with float32 streams and a bf16 / fp16 y (a half-precision branch next to fp32
    streams): the kernels run, as for the layer's carry pair (they used to require y of x's dtype and
    fell back to the PyTorch ops); same values as the PyTorch ops, y's gradient in y's dtype. A wider y
    next to bf16 streams still goes to the PyTorch ops."""
    n, c, t = 4, 24, 40
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, n, c, generator=g).requires_grad_()
    y = torch.randn(t, c, generator=g).to(y_dtype).requires_grad_()
    h_post, h_res = torch.rand(t, n, generator=g).requires_grad_(), torch.rand(t, n, n, generator=g).requires_grad_()

    def run():
        for tns in (x, y, h_post, h_res):
            tns.grad = None
        out = F.mhc_post_res(x, y, h_post, h_res)
        out.square().sum().backward()
        return [out.detach(), x.grad, y.grad, h_post.grad, h_res.grad]

    fast = run()
    assert {("mhc_post_res_fwd", torch.float32), ("mhc_post_res_bwd", torch.float32)} <= set(kernel_calls)
    with cpu.disabled():
        slow = run()
    for name, a, b in zip(("out", "x", "y", "h_post", "h_res"), fast, slow):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert fast[2].dtype == y_dtype

    kernel_calls.clear()
    F.mhc_post_res(x.detach().to(torch.bfloat16), torch.randn(t, c, generator=g), h_post, h_res)
    assert not [k for k in kernel_calls if k[0] == "mhc_post_res_fwd"]

"""The torch.library ops of mhckit/ops/triton_autograd.py on CPU tensors (no Triton interpreter): the
compiled C kernels where they can run, else the PyTorch mirror. Both give the same results, forward
and every gradient, and the C path passes gradcheck in float64."""

from __future__ import annotations

import shutil

import pytest
import torch

from mhckit.ops import cpu
from mhckit.ops import triton_autograd as T
from tests.conftest import make_mhc_inputs

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler: no compiled CPU kernels"
)


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else CPU tensors would run Triton's interpreter
    if not cpu.status()["active"]:
        pytest.skip("compiled CPU kernels unavailable")


def _sublayer(x, phi, bias, alpha, y):
    h_pre, h_post, h_res = T.mhc_coeffs(x, phi, bias, alpha, iters=20)
    u = T.mhc_pre(x, h_pre)
    out = T.mhc_post_res(x, y + u, h_post, h_res)
    return out, T.sinkhorn(h_res.log(), iters=5)


def _run(args, g):
    for a in args:
        a.grad = None
    out, sk = _sublayer(*args)
    (out.float() * g).sum().add_((sk * sk).sum()).backward()
    return [out.detach(), sk.detach()] + [a.grad.clone() for a in args]


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n,c", [(4, 32), (3, 13), (1, 8)])
def test_c_kernels_and_mirror_agree(dt, n, c, kernel_calls):
    x, phi, bias, alpha = make_mhc_inputs((3, 7), n, c, dtype=dt, seed=1, requires_grad=True)
    y = torch.randn(3, 7, c, dtype=torch.float64).to(dt).requires_grad_()
    g = torch.randn(3, 7, n, c, dtype=torch.float64).to(dt)
    fast = _run((x, phi, bias, alpha, y), g)
    assert {"mhc_coeffs_fwd", "mhc_coeffs_bwd", "mhc_pre_fwd", "mhc_pre_bwd", "mhc_post_res_fwd",
            "mhc_post_res_bwd", "mhc_sinkhorn_fwd", "mhc_sinkhorn_bwd"} <= {name for name, _ in kernel_calls}
    kernel_calls.clear()
    with cpu.disabled():
        mirror = _run((x, phi, bias, alpha, y), g)
    assert not kernel_calls
    tol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dt]
    for name, a, b in zip(("out", "sinkhorn", "x", "phi", "bias", "alpha", "y"), fast, mirror):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), rtol=tol[0], atol=tol[1] * max(1.0, b.abs().max().item()),
                                   msg=name)


def test_gradcheck_through_the_c_kernels(kernel_calls):
    x, phi, bias, alpha = make_mhc_inputs((5,), 3, 4, dtype=torch.float64, seed=2, requires_grad=True)
    y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _sublayer(*a)[0], (x, phi, bias, alpha, y))
    assert {("mhc_coeffs_bwd", torch.float64), ("mhc_post_res_bwd", torch.float64)} <= set(kernel_calls)

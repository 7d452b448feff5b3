"""The reference against the paper's equations, written out token by token (arXiv 2512.24880)."""

from __future__ import annotations

import math

import pytest
import torch

from mhckit import reference as R
from tests.conftest import make_mhc_inputs


def naive_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Eq. 9 literally: M = exp(logits); iters x (columns, then rows). One [n, n] matrix."""
    m = torch.exp(logits)
    for _ in range(iters):
        m = m / m.sum(dim=0, keepdim=True)
        m = m / m.sum(dim=1, keepdim=True)
    return m


def naive_mhc_token(x: torch.Tensor, phi, bias, alpha, iters=20, eps=1e-6):
    """One token's x [n, C] -> (h_pre, h_post, h_res) with explicit loops over the columns."""
    n, c = x.shape
    v = x.reshape(n * c)
    r = math.sqrt(float((v * v).sum()) / (n * c) + eps)
    z = [float(v @ phi[:, i]) / r for i in range(phi.shape[1])]
    sig = lambda t: 1.0 / (1.0 + math.exp(-t))  # noqa: E731
    h_pre = torch.tensor([sig(alpha[0] * z[i] + bias[i]) for i in range(n)], dtype=torch.float64)
    h_post = torch.tensor([2 * sig(alpha[1] * z[n + i] + bias[n + i]) for i in range(n)], dtype=torch.float64)
    logits = torch.tensor(
        [[alpha[2] * z[2 * n + k * n + j] + bias[2 * n + k * n + j] for j in range(n)] for k in range(n)],
        dtype=torch.float64,
    )
    return h_pre, h_post, naive_sinkhorn(logits, iters)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("c", [1, 5, 16])
def test_mhc_coeffs_match_paper_equations(n, c):
    x, phi, bias, alpha = make_mhc_inputs((3,), n, c, seed=n * 100 + c, phi_scale=2.0)
    h_pre, h_post, h_res = R.mhc_coeffs(x, phi, bias, alpha)
    assert h_pre.dtype == h_post.dtype == h_res.dtype == torch.float64
    for t in range(3):
        e_pre, e_post, e_res = naive_mhc_token(x[t], phi, bias, alpha.tolist())
        torch.testing.assert_close(h_pre[t], e_pre, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(h_post[t], e_post, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(h_res[t], e_res, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_pre_and_post_res_match_paper_equations(n):
    c = 7
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, c, generator=g, dtype=torch.float64)
    y = torch.randn(2, c, generator=g, dtype=torch.float64)
    h_pre = torch.rand(2, n, generator=g, dtype=torch.float64)
    h_post = torch.rand(2, n, generator=g, dtype=torch.float64)
    h_res = torch.rand(2, n, n, generator=g, dtype=torch.float64)  # not symmetric: catches a transpose
    u = R.mhc_pre(x, h_pre)
    new = R.mhc_post_res(x, y, h_post, h_res)
    for t in range(2):
        e_u = sum(h_pre[t, j] * x[t, j] for j in range(n))
        torch.testing.assert_close(u[t], e_u, rtol=1e-13, atol=1e-14)
        for k in range(n):
            e = sum(h_res[t, k, j] * x[t, j] for j in range(n)) + h_post[t, k] * y[t]
            torch.testing.assert_close(new[t, k], e, rtol=1e-13, atol=1e-14)


def test_slice_order_pre_post_res():
    """Only the first n columns of phi may move h_pre, the next n h_post, the rest h_res."""
    n, c = 3, 4
    x, phi, bias, alpha = make_mhc_inputs((5,), n, c, seed=1)
    base = R.mhc_coeffs(x, torch.zeros_like(phi), bias, alpha)
    for which, cols in enumerate([slice(0, n), slice(n, 2 * n), slice(2 * n, None)]):
        p = torch.zeros_like(phi)
        p[:, cols] = phi[:, cols]
        out = R.mhc_coeffs(x, p, bias, alpha)
        for i in range(3):
            changed = not torch.allclose(out[i], base[i])
            assert changed == (i == which), f"slice {which} moved output {i}"


def test_res_logits_are_row_major():
    """bias_res[k*n + j] is the logit of h_res[k, j]: a big logit at (0, 2) makes h_res[0, 2] the largest."""
    n, c = 3, 2
    x, phi, bias, alpha = make_mhc_inputs((1,), n, c, seed=2)
    bias = torch.zeros_like(bias)
    bias[2 * n + 0 * n + 2] = 6.0
    h_res = R.mhc_coeffs(x, torch.zeros_like(phi), bias, alpha)[2][0]
    assert h_res.argmax().item() == 0 * n + 2


def test_one_rms_statistic_over_all_streams():
    """z = (v @ phi) / rms(v) with ONE rms over the n*C values of a token, not one per stream."""
    n, c = 4, 8
    x, phi, bias, alpha = make_mhc_inputs((1,), n, c, seed=3)
    x[:, 0] *= 10.0  # streams of very different scale tell the two statistics apart
    ones = torch.ones(3, dtype=torch.float64)
    a_pre, _, _ = R.mhc_logits(x, phi, torch.zeros_like(bias), ones)
    v = x.reshape(1, n * c)
    global_rms = (v @ phi) / torch.sqrt((v**2).mean() + 1e-6)
    per_stream = (x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)).reshape(1, n * c) @ phi
    torch.testing.assert_close(a_pre, global_rms[:, :n])
    assert not torch.allclose(a_pre, per_stream[:, :n], rtol=1e-3)


@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.parametrize("scale", [1.0, 10.0, 30.0])
def test_sinkhorn_rows_exact_fp32(n, scale):
    logits = torch.randn(512, n, n) * scale
    h = R.sinkhorn(logits, 20)
    assert h.dtype == torch.float32
    assert (h >= 0).all()
    torch.testing.assert_close(h.sum(-1), torch.ones(512, n), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
def test_sinkhorn_finite_for_huge_logits(scale):
    logits = torch.randn(256, 4, 4) * scale
    logits[0] = 0.0
    logits[1, 2] = -scale  # one whole row far below the rest
    h = R.sinkhorn(logits, 20)
    assert torch.isfinite(h).all()
    assert (h >= 0).all()


def test_sinkhorn_equals_naive_formula_and_converges():
    logits = torch.randn(4, 4, dtype=torch.float64) * 2
    for iters in (1, 5, 20):
        torch.testing.assert_close(R.sinkhorn(logits, iters), naive_sinkhorn(logits, iters), rtol=1e-13, atol=1e-15)
    h = R.sinkhorn(logits, 2000)  # converged: columns exact too
    torch.testing.assert_close(h.sum(0), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-10)


def test_sinkhorn_truncation_error_is_in_columns():
    h = R.sinkhorn(torch.randn(64, 4, 4, dtype=torch.float64) * 4, 3)
    row_err = (h.sum(-1) - 1).abs().max()
    col_err = (h.sum(-2) - 1).abs().max()
    assert row_err < 1e-14 < 1e-6 < col_err


def test_identity_at_one_stream():
    x, phi, bias, alpha = make_mhc_inputs((6,), 1, 5, seed=4)
    h_res = R.mhc_coeffs(x, phi, bias, alpha)[2]
    assert torch.equal(h_res, torch.ones(6, 1, 1, dtype=torch.float64))


def test_forward_gain_of_products_is_exact():
    """Rows normalised last and x_new = h_res @ x: products of h_res keep unit row sums."""
    mats = R.sinkhorn(torch.randn(30, 4, 4, dtype=torch.float64) * 3, 20)
    p = torch.eye(4, dtype=torch.float64)
    for m in mats:
        p = m @ p
    torch.testing.assert_close(p.sum(-1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_coefficients_fp32_under_half_streams(dtype):
    x, phi, bias, alpha = make_mhc_inputs((2, 3), 4, 8, dtype=dtype, seed=5)
    h_pre, h_post, h_res = R.mhc_coeffs(x, phi, bias, alpha)
    assert h_pre.dtype == h_post.dtype == h_res.dtype == torch.float32
    expect = R.mhc_coeffs(x.float(), phi, bias, alpha)
    for a, b in zip((h_pre, h_post, h_res), expect):
        assert torch.equal(a, b)  # half streams are upcast before anything is computed
    u = R.mhc_pre(x, h_pre)
    assert u.dtype == dtype
    y = torch.randn(2, 3, 8).to(dtype)
    assert R.mhc_post_res(x, y, h_post, h_res).dtype == dtype


def test_hc_coeffs_match_hc_paper_form():
    """HC (arXiv 2409.19606): H' = B^T y + A_r^T H with dynamic tanh terms from the per-stream norm."""
    n, c = 3, 6
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, y = rnd(2, n, c), rnd(2, c)
    sp, so, sr = rnd(n), rnd(n), rnd(n, n)
    wp, wo, wr = rnd(c), rnd(c), rnd(c, n)
    sa, sb = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    h_pre, h_post, h_res = R.hc_coeffs(x, sp, so, sr, wp, wo, wr, sa, sb)
    new = R.mhc_post_res(x, y, h_post, h_res)
    for t in range(2):
        hn = x[t] / torch.sqrt((x[t] ** 2).mean(-1, keepdim=True) + 1e-6)
        a_m = sp + sa * torch.tanh(hn @ wp)
        a_r = sr + sa * torch.tanh(hn @ wr)
        b = so + sb * torch.tanh(hn @ wo)
        torch.testing.assert_close(h_pre[t], a_m)
        expected = b[:, None] * y[t][None, :] + a_r.T @ x[t]
        torch.testing.assert_close(new[t], expected)


def test_permutation_mixture_is_doubly_stochastic():
    import itertools

    n = 4
    eye = torch.eye(n, dtype=torch.float64)
    perms = torch.stack([eye[list(p)] for p in itertools.permutations(range(n))])
    h = R.permutation_mixture(torch.randn(10, 24, dtype=torch.float64) * 5, perms)
    ones = torch.ones(10, n, dtype=torch.float64)
    torch.testing.assert_close(h.sum(-1), ones, rtol=0, atol=1e-14)
    torch.testing.assert_close(h.sum(-2), ones, rtol=0, atol=1e-14)
    assert (h >= 0).all()

"""Gain metrics of composite h_res products (mHC Fig. 3 / 7)."""

from __future__ import annotations

import math

import pytest
import torch

from mhckit import HyperConnection, expand_streams
from mhckit import reference as R
from mhckit.diagnostics import amax_gain, composite_products, gain_report, hres_stats, identity_distance, record_coefficients


def test_doubly_stochastic_products_have_unit_forward_gain():
    h = [R.sinkhorn(torch.randn(32, 4, 4, dtype=torch.float64) * 2, 20) for _ in range(12)]
    rep = gain_report(h)
    torch.testing.assert_close(rep["forward_gain"], torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (rep["backward_gain"] >= 1 - 1e-12).all()  # column sums average to 1, so their max is >= 1
    assert (rep["backward_gain"] < 1.01).all()


def test_gain_grows_geometrically_for_scaled_matrices():
    """HC-like unconstrained mixing: every matrix with row sums 1.5 and column sums 1.5 -> gain 1.5^l."""
    m = torch.full((4, 4), 1.5 / 4, dtype=torch.float64)
    rep = gain_report([m] * 10)
    expected = torch.tensor([1.5 ** (l + 1) for l in range(10)], dtype=torch.float64)
    torch.testing.assert_close(rep["forward_gain"], expected)
    torch.testing.assert_close(rep["backward_gain"], expected)
    torch.testing.assert_close(rep["max_abs_log_colsum"], expected.log())
    torch.testing.assert_close(rep["suffix_forward_gain"], expected.flip(0))


def test_prefix_and_suffix_order():
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    pre = composite_products([a, b], "prefix")
    suf = composite_products([a, b], "suffix")
    torch.testing.assert_close(pre[1][0], b @ a)  # x_2 = H_2 H_1 x_0
    torch.testing.assert_close(suf[0][0], b @ a)
    torch.testing.assert_close(suf[1][0], b)


def test_attenuation_is_visible_in_log_colsum():
    """Column sums of 0.41 and 1.59: Amax says 1.59, max |log colsum| shows the 2.4x attenuation."""
    m = torch.tensor([[0.2, 0.8], [0.21, 0.79]], dtype=torch.float64)
    rep = gain_report([m])
    assert rep["backward_gain"].item() == pytest.approx(1.59)
    assert rep["max_abs_log_colsum"].item() == pytest.approx(abs(math.log(0.41)))


def test_token_mean_vs_token_max():
    h = torch.stack([torch.eye(2, dtype=torch.float64), torch.full((2, 2), 1.0, dtype=torch.float64)])  # [T=2, 2, 2]
    assert amax_gain(h, "mean") == pytest.approx((1.5, 1.5))
    assert amax_gain(h, "max") == pytest.approx((2.0, 2.0))


def test_identity_distance_and_stats():
    eye = torch.eye(3).expand(5, 3, 3)
    assert identity_distance([eye]).item() == 0.0
    s = hres_stats(R.sinkhorn(torch.randn(10, 3, 3), 20))
    assert s["max_row_sum_err"] < 1e-6 and s["min"] >= 0


def test_record_coefficients_in_execution_order():
    hcs = [HyperConnection(8, torch.nn.Linear(8, 8), n_streams=3, layer_index=i) for i in range(3)]
    model = torch.nn.Sequential(*hcs)
    with record_coefficients(model) as records:
        model(expand_streams(torch.randn(2, 5, 8), 3))
    assert [r.name for r in records] == ["0", "1", "2"]
    assert records[0].h_res.shape == (2, 5, 3, 3) and not records[0].h_res.requires_grad
    assert all(hc._capture is None for hc in hcs)
    rep = gain_report([r.h_res for r in records])
    assert rep["forward_gain"].shape == (3,)


def test_bad_lists_are_rejected():
    with pytest.raises(ValueError, match="h_res: got an empty list"):
        gain_report([])
    with pytest.raises(ValueError, match=r"h_res\[1\]\.shape"):
        gain_report([torch.eye(3), torch.eye(4)])
    with pytest.raises(ValueError, match="token_reduce: got 'median'"):
        gain_report([torch.eye(3)], token_reduce="median")

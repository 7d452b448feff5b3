"""Bad input gets a ValueError that names the argument, what was given and what is allowed."""

from __future__ import annotations

import pytest
import torch

import mhckit
from mhckit import functional as F
from mhckit import reference as R
from mhckit.models import GPTConfig
from tests.conftest import make_mhc_inputs

BACKENDS = [R, F]


@pytest.mark.parametrize("mod", BACKENDS)
def test_wrong_stream_shape(mod):
    _, phi, bias, alpha = make_mhc_inputs((2,), 4, 8)
    with pytest.raises(ValueError, match=r"x\.shape: got \(8,\); expected streams of shape \[\.\.\., n, C\]"):
        mod.mhc_coeffs(torch.randn(8), phi, bias, alpha)


@pytest.mark.parametrize("mod", BACKENDS)
def test_phi_bias_mismatch(mod):
    x, phi, bias, alpha = make_mhc_inputs((2,), 4, 8)
    with pytest.raises(ValueError, match=r"phi\.shape: got \(32, 23\); expected \[32, 24\]"):
        mod.mhc_coeffs(x, phi[:, :-1], bias, alpha)
    with pytest.raises(ValueError, match=r"phi\.shape: got \(31, 24\)"):
        mod.mhc_coeffs(x, phi[:-1], bias, alpha)
    with pytest.raises(ValueError, match=r"bias\.shape: got \(23,\); expected \(24,\)"):
        mod.mhc_coeffs(x, phi, bias[:-1], alpha)
    with pytest.raises(ValueError, match=r"alpha\.shape: got \(2,\); expected \(3,\)"):
        mod.mhc_coeffs(x, phi, bias, alpha[:2])


@pytest.mark.parametrize("mod", BACKENDS)
def test_integer_dtypes(mod):
    x, phi, bias, alpha = make_mhc_inputs((2,), 4, 8)
    with pytest.raises(ValueError, match=r"x\.dtype: got torch\.int64; expected a floating dtype"):
        mod.mhc_coeffs(x.long(), phi, bias, alpha)
    with pytest.raises(ValueError, match=r"logits\.dtype: got torch\.int32"):
        mod.sinkhorn(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"h_pre\.dtype: got torch\.int64"):
        mod.mhc_pre(x, torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize("mod", BACKENDS)
def test_coefficient_shapes(mod):
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"h_pre\.shape: got \(2, 3\); expected \(2, 4\)"):
        mod.mhc_pre(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"h_res\.shape: got \(2, 4, 3\); expected \(2, 4, 4\)"):
        mod.mhc_post_res(x, torch.randn(2, 8), torch.ones(2, 4), torch.ones(2, 4, 3))
    with pytest.raises(ValueError, match=r"y\.shape: got \(2, 7\); expected \(2, 8\)"):
        mod.mhc_post_res(x, torch.randn(2, 7), torch.ones(2, 4), torch.ones(2, 4, 4))


@pytest.mark.parametrize("mod", BACKENDS)
def test_sinkhorn_arguments(mod):
    with pytest.raises(ValueError, match=r"logits\.shape: got \(3, 4\); expected \[\.\.\., n, n\]"):
        mod.sinkhorn(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"iters: got 0; expected an int >= 1"):
        mod.sinkhorn(torch.randn(3, 3), 0)


def test_n_streams_below_one_and_empty_streams():
    with pytest.raises(ValueError, match=r"n_streams: got 0; expected an int in \[1, 64\]"):
        mhckit.HyperConnection(8, torch.nn.Identity(), n_streams=0)
    with pytest.raises(ValueError, match=r"n: got -1"):
        mhckit.expand_streams(torch.randn(3, 8), -1)
    with pytest.raises(ValueError, match=r"x\.shape\[-2\] \(n_streams\): got 0"):
        R.mhc_pre(torch.randn(2, 0, 8), torch.ones(2, 0))


def test_unknown_variant_init_and_mode():
    with pytest.raises(ValueError, match=r"variant: got 'mhc2'; expected one of 'residual', 'hc', 'mhc', 'mhc-lite'"):
        mhckit.HyperConnection(8, torch.nn.Identity(), variant="mhc2")
    with pytest.raises(ValueError, match=r"init: got 'zeros'; expected one of 'preserving', 'mean-preserving', 'identity'"):
        mhckit.MHCConfig(init="zeros")
    with pytest.raises(ValueError, match=r"mode: got 'max'; expected one of 'sum', 'mean', 'head'"):
        mhckit.reduce_streams(torch.randn(2, 3, 4), "max")
    with pytest.raises(ValueError, match=r"head: got NoneType"):
        mhckit.reduce_streams(torch.randn(2, 3, 4), "head")


def test_module_input_mismatch():
    hc = mhckit.HyperConnection(8, torch.nn.Identity(), n_streams=4)
    with pytest.raises(ValueError, match=r"x\.shape: got \(2, 3, 8\); expected \[\.\.\., n_streams=4, dim=8\]"):
        hc(torch.randn(2, 3, 8))
    res = mhckit.HyperConnection(8, torch.nn.Identity(), variant="residual")
    with pytest.raises(ValueError, match="a residual carries one stream"):
        res(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"dim: got 0"):
        mhckit.HyperConnection(0, torch.nn.Identity())
    with pytest.raises(ValueError, match=r"branch: got None"):
        mhckit.HyperConnection(8)(torch.randn(2, 4, 8))


def test_config_values():
    with pytest.raises(ValueError, match=r"sinkhorn_iters: got 0; expected a positive int"):
        mhckit.MHCConfig(sinkhorn_iters=0)
    with pytest.raises(ValueError, match=r"pre_home_weight: got 1.5"):
        mhckit.MHCConfig(pre_home_weight=1.5)
    with pytest.raises(ValueError, match=r"backend: got 'cuda'"):
        mhckit.MHCConfig(backend="cuda")
    with pytest.raises(ValueError, match=r"n_streams: got 7; the permutation mixture"):
        mhckit.HyperConnection(8, torch.nn.Identity(), variant="mhc-lite", n_streams=7)
    with pytest.raises(ValueError, match=r"d_model: got 30 with n_head=4"):
        GPTConfig(d_model=30, n_head=4)

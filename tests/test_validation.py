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


# --------------------------------------------------------------------------- the opt-in NaN / Inf check


@pytest.fixture
def finite_check_off():
    """Every test leaves the process-wide switch as it found it (off)."""
    assert not mhckit._validate.finite_check_enabled()
    yield
    mhckit.check_finite(False)


OPS = [
    ("sinkhorn", lambda x, phi, bias, alpha: F.sinkhorn(x), "logits"),
    ("mhc_logits", lambda x, phi, bias, alpha: F.mhc_logits(x, phi, bias, alpha), "x"),
    ("mhc_coeffs", lambda x, phi, bias, alpha: F.mhc_coeffs(x, phi, bias, alpha), "x"),
    ("mhc_coeffs_pre", lambda x, phi, bias, alpha: F.mhc_coeffs_pre(x, phi, bias, alpha), "x"),
    ("mhc_pre", lambda x, phi, bias, alpha: F.mhc_pre(x, torch.ones(2, 4)), "x"),
    ("mhc_post_res", lambda x, phi, bias, alpha: F.mhc_post_res(x, torch.ones(2, 8), torch.ones(2, 4),
                                                                torch.eye(4).expand(2, 4, 4)), "x"),
    ("residual_update", lambda x, phi, bias, alpha: F.residual_update(x, torch.ones(2, 8), torch.ones(2, 4)), "x"),
]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op, call, arg", OPS, ids=[o[0] for o in OPS])
def test_check_finite_names_op_argument_and_count(op, call, arg, bad, finite_check_off):
    x, phi, bias, alpha = make_mhc_inputs((2,), 4, 8, dtype=torch.float32)
    if op == "sinkhorn":  # the op's only tensor: logits [2, 4, 4]
        x = torch.zeros(2, 4, 4)
    x[0, 1, 2] = bad
    x[1, 3, 3] = bad
    call(x, phi, bias, alpha)  # off: no check, no error (the NaN / Inf just flows through)
    kind = "NaN" if bad != bad else "Inf"
    with mhckit.check_finite():
        with pytest.raises(mhckit.NonFiniteError) as err:
            call(x, phi, bias, alpha)
    msg = str(err.value)
    assert msg.startswith(f"{op}: input '{arg}': got 2 non-finite values of {x.numel()} (")
    assert f"2 {kind}" in msg and "expected all finite" in msg
    assert isinstance(err.value, ValueError)
    assert not mhckit._validate.finite_check_enabled()  # the block restored the switch


def test_check_finite_names_parameters_and_outputs(finite_check_off):
    x, phi, bias, alpha = make_mhc_inputs((2,), 4, 8, dtype=torch.float32)
    mhckit.check_finite(True)  # the plain call switches it on for the process
    assert mhckit._validate.finite_check_enabled()
    phi[3, 5] = float("nan")
    with pytest.raises(mhckit.NonFiniteError, match=r"^mhc_coeffs: input 'phi': got 1 non-finite values of 768 \(1 NaN"):
        F.mhc_coeffs(x, phi, bias, alpha)
    phi[3, 5] = 0.0
    # finite inputs, non-finite result: the output is named
    big = torch.full((2, 4, 8), 3e38)
    with pytest.raises(mhckit.NonFiniteError, match=r"^mhc_post_res: output 'x_new': got 64 non-finite"):
        F.mhc_post_res(big, torch.full((2, 8), 3e38), torch.ones(2, 4), torch.full((2, 4, 4), 1.0))
    mhckit.check_finite(False)
    F.mhc_coeffs(x, phi * float("nan"), bias, alpha)


def test_check_finite_covers_the_modules(finite_check_off):
    """A HyperConnection's ops are checked: bad streams, a bad parameter, a bad branch output."""
    x = torch.randn(2, 3, 4, 8)
    hc = mhckit.HyperConnection(8, lambda u: u * float("inf"), n_streams=4)
    with mhckit.check_finite(), pytest.raises(mhckit.NonFiniteError, match=r"^mhc_post_res: input 'y': got 48 "):
        hc(x)
    hc = mhckit.HyperConnection(8, torch.nn.Identity(), n_streams=4)
    with torch.no_grad():
        hc.coeffs.bias[0] = float("nan")
    with mhckit.check_finite(), pytest.raises(mhckit.NonFiniteError, match=r"^mhc_coeffs_pre: input 'bias'"):
        hc(x)
    for variant in ("hc", "mhc-lite", "identity"):
        hc = mhckit.HyperConnection(8, torch.nn.Identity(), n_streams=4, variant=variant)
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        with mhckit.check_finite(), pytest.raises(mhckit.NonFiniteError, match=r"input 'x': got 1 non-finite"):
            hc(bad)
        with mhckit.check_finite():
            assert torch.isfinite(hc(x)).all()  # finite input: no false alarm


def test_check_finite_off_never_looks_at_the_data(monkeypatch, finite_check_off):
    """Off, an op only tests the switch: the finite check itself is never entered."""
    from mhckit import _validate

    def tripwire(*args, **kwargs):
        raise AssertionError("assert_finite was called with the check off")

    monkeypatch.setattr(_validate, "assert_finite", tripwire)
    model = mhckit.HyperConnection(8, torch.nn.Linear(8, 8), n_streams=4)
    x = torch.randn(2, 3, 4, 8)
    x[0, 0, 0, 0] = float("nan")
    model(x).sum().backward()
    F.sinkhorn(torch.randn(3, 3), backend="reference")
    with mhckit.check_finite(), pytest.raises(AssertionError, match="tripwire|called with the check off"):
        F.sinkhorn(torch.randn(3, 3))  # and on, it is (so the tripwire is live)


def test_check_finite_argument_and_env(finite_check_off):
    import os
    import subprocess
    import sys

    with pytest.raises(ValueError, match=r"check_finite\(enabled\): got 'yes'; expected True or False"):
        mhckit.check_finite("yes")
    assert F.check_finite is mhckit.check_finite and F.NonFiniteError is mhckit.NonFiniteError
    with mhckit.check_finite():  # nested blocks restore what they found
        with mhckit.check_finite(False):
            assert not mhckit._validate.finite_check_enabled()
        assert mhckit._validate.finite_check_enabled()
    code = "import mhckit; print(mhckit._validate.finite_check_enabled())"  # MHCKIT_CHECK_FINITE=1: on at import
    env = dict(os.environ, MHCKIT_CHECK_FINITE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_compile_fullgraph_with_check_finite_off(finite_check_off):
    """Off, the switch is a constant to dynamo: a GPT with mHC still compiles as one graph."""
    import torch._dynamo as dynamo

    from mhckit.models import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, seq_len=8, n_layer=1, n_head=2, d_model=16))
    tok = torch.randint(0, 32, (2, 9))
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    _, loss = compiled(tok[:, :-1], tok[:, 1:])
    _, expected = model(tok[:, :-1], tok[:, 1:])
    torch.testing.assert_close(loss, expected)
    dynamo.reset()


# --------------------------------------------------------------------------- training configuration and CLI

# one or more invalid command-line values for EVERY field of TrainConfig (nested model.* and model.hc.*)
BAD_VALUES = {
    "name": ["", "a/b", ".."], "out_dir": [""], "seed": ["-1", "x"], "data": [""], "tokenizer": ["bogus"],
    "cache_dir": [""], "val_fraction": ["0", "0.6", "nan"], "steps": ["0", "-5", "1.5"], "batch_size": ["0"],
    "lr": ["0", "-1", "inf", "nan"], "min_lr_ratio": ["1.5", "-0.1"], "warmup_steps": ["-1"],
    "schedule": ["linear"], "weight_decay": ["-0.1", "inf"], "beta1": ["1", "-0.1"], "beta2": ["1.0"],
    "grad_clip": ["-1", "inf"], "eval_every": ["0", "-1"], "eval_batches": ["0"], "diag_every": ["0"],
    "log_every": ["0"], "ckpt_every": ["-1"], "keep_ckpts": ["0"], "resume": ["maybe"], "device": ["tpu"],
    "precision": ["fp8"], "compile": ["maybe"], "parallel": ["deepspeed"], "threads": ["-1"],
    "progress": ["maybe"], "keep_freed_memory": ["2"], "max_bad_steps": ["0"],
    "model.vocab_size": ["0"], "model.seq_len": ["0", "-1"], "model.n_layer": ["0"], "model.n_head": ["0"],
    "model.d_model": ["0", "30"], "model.mlp_hidden": ["-1"], "model.tie_embeddings": ["maybe"],
    "model.rope_base": ["0", "inf"], "model.norm_eps": ["-1", "nan"], "model.init_std": ["0"],
    "model.reduce": ["max"], "model.recompute": ["-2"],
    "model.hc.variant": ["mhc2"], "model.hc.n_streams": ["0", "65"], "model.hc.init": ["zeros"],
    "model.hc.sinkhorn_iters": ["0", "-3"], "model.hc.alpha_init": ["0", "nan"],
    "model.hc.res_init_strength": ["-1"], "model.hc.pre_home_weight": ["1", "0"], "model.hc.post_spread": ["1"],
    "model.hc.rms_eps": ["0", "inf"], "model.hc.hc_dynamic": ["maybe"], "model.hc.backend": ["cuda"],
}


def _train_fields() -> list[str]:
    from mhckit.train.config import TrainConfig
    from mhckit.train.overrides import flatten_fields

    return [path for path, *_ in flatten_fields(TrainConfig)]


def test_every_training_field_has_a_bad_value_below():
    assert sorted(BAD_VALUES) == sorted(_train_fields()), "a TrainConfig field without a bad value in BAD_VALUES"


def _given(raw: str) -> list[str]:
    """How a message may quote the value ``raw`` (as typed, as its repr, as the parsed number)."""
    out = [raw, repr(raw)]
    for kind in (int, float):
        try:
            out.append(repr(kind(raw)))
        except ValueError:
            pass
    return out


@pytest.mark.parametrize("path, raw", [(p, v) for p, values in BAD_VALUES.items() for v in values])
def test_bad_training_value_names_field_value_and_range(path, raw):
    """Rejected by the CLI's config builder (nothing downloaded or built yet), with the full dotted
    name of the field, the value given and what is allowed."""
    from mhckit.train.cli_train import build_config

    with pytest.raises(ValueError) as err:
        build_config(None, [f"--{path}={raw}"])
    msg = str(err.value)
    assert msg.startswith((f"{path}: got ", f"--{path}: got ")), msg
    assert any(f"got {v}" in msg for v in _given(raw)), msg
    assert "expected" in msg or "allows" in msg, msg


def test_bare_names_and_presets_are_validated_too():
    from mhckit.train.cli_train import build_config
    from mhckit.train.presets import PRESETS

    for preset in PRESETS:  # every preset is a valid configuration
        build_config(preset, [])
        with pytest.raises(ValueError, match=r"^model\.hc\.n_streams: got 0; expected an int in \[1, 64\]"):
            build_config(preset, ["--n_streams=0"])  # bare name, resolved to model.hc.n_streams
    with pytest.raises(ValueError, match=r"^model\.hc\.n_streams: got 7; the permutation mixture \(mhc-lite\) needs"):
        build_config(None, ["--variant=mhc-lite", "--n_streams=7"])
    with pytest.raises(ValueError, match=r"^--nonsense: unknown option"):
        build_config(None, ["--nonsense=1"])
    with pytest.raises(ValueError, match=r"^--preset: got 'nope'"):
        build_config("nope", [])


def test_python_api_rejects_wrong_types_and_unknown_keys():
    from mhckit.train.config import TrainConfig

    cases = [
        (dict(steps="10"), r"^steps: got '10'; expected an int >= 1"),
        (dict(lr=True), r"^lr: got True; expected a finite number > 0"),
        (dict(name=5), r"^name: got 5; expected a non-empty directory name"),
        (dict(resume="yes"), r"^resume: got 'yes'; expected true or false"),
        (dict(model=5), r"^model: got 'int'; expected a GPTConfig"),
        (dict(model={"bogus": 1}), r"^model: got unknown keys \['bogus'\]; expected keys among \['d_model', "),
        (dict(model={"hc": {"n_stream": 4}}), r"^model\.hc: got unknown keys \['n_stream'\]"),
        (dict(model={"hc": "mhc"}), r"^model\.hc: got str; expected a MHCConfig or a dict of its fields"),
        (dict(model={"reduce": "max"}), r"^model\.reduce: got 'max'"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            TrainConfig(**kwargs)
    assert TrainConfig(model={"hc": {"n_streams": 2}}).model.hc.n_streams == 2


def test_mhc_config_rejects_non_finite_and_wrong_types():
    for kwargs, pattern in [
        (dict(alpha_init=float("nan")), r"^alpha_init: got nan; expected a positive finite number"),
        (dict(rms_eps=float("inf")), r"^rms_eps: got inf"),
        (dict(res_init_strength=-1.0), r"^res_init_strength: got -1.0"),
        (dict(post_spread="a"), r"^post_spread: got 'a'; expected a number in \[0.0, 1.0\)"),
        (dict(pre_home_weight=None), r"^pre_home_weight: got None; expected a number in \(0.0, 1.0\)"),
        (dict(hc_dynamic=1), r"^hc_dynamic: got 1; expected True or False"),
        (dict(backend=None), r"^backend: got None; expected a backend name"),
        (dict(sinkhorn_iters=2.0), r"^sinkhorn_iters: got 2.0; expected a positive int"),
        (dict(variant="mhc-lite", n_streams=7), r"^n_streams: got 7; the permutation mixture"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            mhckit.MHCConfig(**kwargs)


def test_invalid_values_stop_before_any_work(monkeypatch, tmp_path, capsys):
    """A bad option ends `mhckit train` with exit code 2 before data is read or a model is built,
    and so does a global batch that the processes cannot share evenly."""
    from mhckit.models import gpt
    from mhckit.train import cli_train
    from mhckit.train import distributed as dist_utils
    from mhckit.train import trainer as T
    from mhckit.train.config import TrainConfig

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the configuration was validated")

    monkeypatch.setattr(T, "load_token_data", no_work)
    monkeypatch.setattr(gpt.GPT, "__init__", no_work)
    with pytest.raises(SystemExit) as e:
        cli_train.main([f"--out_dir={tmp_path}", "--model.hc.sinkhorn_iters=0"])
    assert e.value.code == 2 and "model.hc.sinkhorn_iters: got 0" in capsys.readouterr().err
    monkeypatch.setattr(dist_utils, "setup", lambda cfg: dist_utils.DistInfo(rank=0, world_size=3))
    with pytest.raises(ValueError, match=r"^batch_size: got 4; expected a multiple of world_size=3"):
        T.Trainer(TrainConfig(out_dir=str(tmp_path), batch_size=4))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- GPTConfig's own checks

_MHC_KEYS = r"\['alpha_init', 'backend', 'hc_dynamic', 'init', 'n_streams', 'post_spread', 'pre_home_weight', "
BAD_GPT_VALUES = [  # (field, bad value, how the message quotes it, what it must say is allowed)
    ("mlp_hidden", -1, "-1", r"an int >= 0 \(0 = 8/3 \* d_model"),
    ("mlp_hidden", 2.5, "2.5", r"an int >= 0"),
    ("mlp_hidden", True, "True", r"an int >= 0"),
    *[(name, v, text, "a positive finite number")
      for name in ("rope_base", "norm_eps", "init_std")
      for v, text in ((0, "0"), (-1.0, "-1.0"), (float("nan"), "nan"), (float("inf"), "inf"),
                      (-float("inf"), "-inf"), ("1e-6", "'1e-6'"), (True, "True"))],
    ("reduce", "max", "'max'", r"one of 'sum', 'mean', 'head'"),
    ("reduce", None, "None", r"one of 'sum', 'mean', 'head'"),
    ("tie_embeddings", 1, "1", "True or False"),
    ("tie_embeddings", "false", "'false'", "True or False"),
    ("hc", {"bogus": 1}, r"unknown keys \['bogus'\]", "keys among " + _MHC_KEYS),
    ("hc", "mhc", "str", "an MHCConfig or a dict of its fields"),
    ("hc.n_streams", {"n_streams": 0}, "0", r"an int in \[1, 64\]"),
]


@pytest.mark.parametrize("field, value, given, allowed", BAD_GPT_VALUES,
                         ids=[f"{f}={v!r}" for f, v, *_ in BAD_GPT_VALUES])
def test_gpt_config_names_field_value_and_range(field, value, given, allowed):
    """Every GPTConfig field is checked when the config is built (not when the model is), with a
    ValueError "field: got X; expected Y"; a bad ``hc`` dict names the key, not a TypeError."""
    import re

    key = field.split(".")[0]
    with pytest.raises(ValueError) as err:
        GPTConfig(**{key: value})
    msg = str(err.value)
    assert re.match(rf"{re.escape(field)}: got {given}; expected {allowed}", msg), msg


def test_gpt_config_valid_edge_values_pass():
    cfg = GPTConfig(mlp_hidden=0, rope_base=500, norm_eps=1e-12, init_std=1e-4, reduce="head", tie_embeddings=False,
                    hc={"variant": "hc", "n_streams": 2})
    assert cfg.hidden == 352 and isinstance(cfg.hc, mhckit.MHCConfig) and cfg.hc.n_streams == 2

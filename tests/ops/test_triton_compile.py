"""Every Triton kernel compiles for Hopper (sm_90) with the real compiler: no GPU needed.

The interpreter runs kernels as Python, so code that only the GPU compiler rejects (tl.dot shapes
and dtypes, layouts, constexpr branches) would otherwise surface only on a GPU. A subprocess
(without TRITON_INTERPRET) builds each kernel for ``GPUTarget("cuda", 90, 32)`` with the first
autotune config, n = 4, bf16 and fp32 streams, and fails on any compiler error, or on a stack
frame (register spills) over 256 bytes when the cuobjdump that Triton ships is there to read it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

CHILD = r'''
import os
import re
import subprocess
import sys
import tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
from mhckit.ops.triton import coeffs as CO, next_pow2, post_res as PS, pre as PR, sinkhorn as SK

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
N, NP, K = 4, 4, 24
KP = 32


def build(kernel, types, consts, label):
    cfg = kernel.configs[0] if hasattr(kernel, "configs") else None
    fn, heur = kernel, {}
    while not isinstance(fn, JITFunction):
        heur.update(getattr(fn, "values", {}))
        fn = fn.fn
    consts = dict(consts, **(cfg.kwargs if cfg else {}))
    for name, h in heur.items():
        consts[name] = h(consts)
    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or a in ("D", "C")}
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages) if cfg else {}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    try:
        compiled = triton.compile(src, target=TARGET, options=opts)
    except Exception as e:
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}")
        return
    stack = "?"
    if os.path.exists(CUOBJDUMP):  # registers / stack (spills) of the cubin
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        if m:
            stack = int(m.group(2))
            if stack > 256:
                print(f"FAIL {label}: spills, {m.group(0)}")
                return
    print(f"OK {label} stack={stack}")


for xdt in ("bf16", "fp32"):
    ph = "*bf16" if xdt == "bf16" else "*fp32"
    flags = dict(KP=KP, PREC="tf32x3", BF16=xdt == "bf16")
    build(CO._fwd_dot_kernel, dict(x_ptr="*" + xdt, ph_ptr=ph, acc_ptr="*fp32", ss_ptr="*fp32", T="i32", D="i32",
          chunk16="i32"), flags, "fwd_dot " + xdt)
    for carry in (False, True):  # with the sublayer's other x-gradients added (mhckit/ops/carry.py) or not
        build(CO._bwd_dx_dphi_kernel, dict(x_ptr="*" + xdt, ph_ptr=ph, dzr_ptr="*fp32", coef_ptr="*fp32",
              dx_ptr="*" + xdt, gphi_ptr="*fp32", dxin_ptr="*" + xdt, gu_ptr="*" + xdt, hpre_ptr="*fp32", T="i32",
              D="i32", K="i32", chunk="i32", C="i32"), dict(flags, N=N, DXIN=carry, GU=carry),
              f"bwd_dx_dphi {xdt} carry={carry}")
    build(CO._prep_phi_kernel, dict(phi_ptr="*fp32", out_ptr=ph, D="i32", K="i32"),
          dict(KP=KP, BN=64, SPLIT=xdt == "bf16"), "prep_phi " + xdt)
build(CO._fwd_epilogue_kernel, dict(acc_ptr="*fp32", ss_ptr="*fp32", bias_ptr="*fp32", alpha_ptr="*fp32",
      hpre_ptr="*fp32", hpost_ptr="*fp32", hres_ptr="*fp32", z_ptr="*fp32", r_ptr="*fp32", T="i32", S="i32",
      d_float="fp32", eps="fp32", iters="i32"), dict(N=N, NP=NP, KP=KP), "fwd_epilogue")
build(CO._bwd_token_kernel, dict(z_ptr="*fp32", r_ptr="*fp32", gpre_ptr="*fp32", gpost_ptr="*fp32",
      gres_ptr="*fp32", bias_ptr="*fp32", alpha_ptr="*fp32", dzr_ptr="*fp32", coef_ptr="*fp32", pbias_ptr="*fp32",
      palpha_ptr="*fp32", T="i32", d_float="fp32", iters="i32"), dict(N=N, NP=NP), "bwd_token")
build(SK._sinkhorn_fwd_kernel, dict(l_ptr="*fp32", out_ptr="*fp32", T="i32", iters="i32"), dict(N=N, NP=NP),
      "sinkhorn_fwd")
build(SK._sinkhorn_bwd_kernel, dict(l_ptr="*fp32", g_ptr="*fp32", gl_ptr="*fp32", T="i32", iters="i32"),
      dict(N=N, NP=NP), "sinkhorn_bwd")
s = "*bf16"
build(PR._pre_fwd_kernel, dict(x_ptr=s, h_ptr="*fp32", u_ptr=s, T="i32", C="i32"), dict(N=N), "pre_fwd")
for need_dx in (True, False):
    build(PR._pre_bwd_kernel, dict(x_ptr=s, h_ptr="*fp32", gu_ptr=s, gx_ptr=s, gh_ptr="*fp32", T="i32", C="i32",
          chunk16="i32"), dict(N=N, NP=NP, NEED_DX=need_dx), f"pre_bwd need_dx={need_dx}")
build(PS._post_res_fwd_kernel, dict(x_ptr=s, y_ptr=s, hpost_ptr="*fp32", hres_ptr="*fp32", out_ptr=s, T="i32",
      C="i32"), dict(N=N, NP=NP), "post_res_fwd")
build(PS._post_res_bwd_kernel, dict(x_ptr=s, y_ptr=s, hpost_ptr="*fp32", hres_ptr="*fp32", g_ptr=s, gx_ptr=s,
      gy_ptr=s, ghpost_ptr="*fp32", ghres_ptr="*fp32", T="i32", C="i32", chunk16="i32"), dict(N=N, NP=NP),
      "post_res_bwd")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the other tests compile every kernel for real")
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MHCKIT_TRITON_AUTOTUNE"] = "0"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "OK " not in out and ("ptxas" in out or "backend" in out.lower()):
        pytest.skip(f"no NVIDIA compiler toolchain in this Triton install:\n{out[-2000:]}")
    assert proc.returncode == 0, out[-4000:]
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert not fails, "\n".join(fails)
    assert sum(line.startswith("OK ") for line in out.splitlines()) == 17, out[-4000:]

#!/usr/bin/env bash
# GPU validation of mhckit's Triton backend on one CUDA machine (made for an H200), in one go:
#   (a) the Triton parity tests (tests/ops/test_triton_*.py) on the GPU, one config per kernel
#       (MHCKIT_TRITON_AUTOTUNE=0) to keep compilation short; skipped if pytest is missing
#       (benchmarks/gpu_check.py has its own small parity section);
#   (b) benchmarks/gpu_check.py: parity at small shapes + timings and peak memory vs the torch
#       backend, a plain residual, LigerMHC and the torch.compile'd reference; bf16 streams (the
#       speed issue's shapes; MHCKIT_BENCH_DTYPES=bfloat16,float32 adds fp32, which did not fit in
#       the budget); CSV + markdown + JSON into OUT_DIR;
#   (c) benchmarks/bench_model.py: GPT-124M training steps, residual vs mHC (with and without
#       recomputation, and on separate ops instead of the fused pair), eager:
#       model_<preset>_<device>.{csv,md} in OUT_DIR;
#   (d) benchmarks/profile_model.py: where a residual and an mHC step spend their time (PyTorch
#       profiler, top kernels / ops): profile_<preset>_<device>.txt;
#   (e) the model benchmark compiled (torch.compile; residual and mHC): model_<preset>_<device>_compiled.*.
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]      (default benchmarks/results/)
# Needs python with torch (CUDA) and triton; nothing is installed or downloaded. Each step has a
# time cap, the caps sum to 8 minutes (TEST_TIMEOUT 80 + BENCH_TIMEOUT 140 + MODEL_TIMEOUT 90 +
# PROFILE_TIMEOUT 40 + MODEL_COMPILE_TIMEOUT 130 s); every step is recorded; a failing step does not
# stop the next. Environment: PYTHON (default python3), MHCKIT_COMMIT (commit tag when there is no
# .git), the five timeouts above, PYTEST_WORKERS (default 8), MODEL_PRESET (default gpt124m),
# MODEL_DEVICE (default cuda), MODEL_STEPS (default 8), MODEL_COMPILE=0 skips (e). Without a GPU:
#   MHCKIT_GPU_CHECK_CPU=1 MODEL_DEVICE=cpu MODEL_PRESET=default MODEL_STEPS=2 bash benchmarks/gpu_suite.sh /tmp/s
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-benchmarks/results}"
PY="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-80}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-140}"
MODEL_TIMEOUT="${MODEL_TIMEOUT:-90}"
PROFILE_TIMEOUT="${PROFILE_TIMEOUT:-40}"
MODEL_COMPILE_TIMEOUT="${MODEL_COMPILE_TIMEOUT:-130}"
MODEL_PRESET="${MODEL_PRESET:-gpt124m}"
MODEL_DEVICE="${MODEL_DEVICE:-cuda}"
MODEL_STEPS="${MODEL_STEPS:-8}"
WORKERS="${PYTEST_WORKERS:-8}"
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_suite_summary.txt"
START=$(date +%s)
if git rev-parse --short HEAD >/dev/null 2>&1; then
  export MHCKIT_COMMIT="${MHCKIT_COMMIT:-$(git rev-parse --short HEAD)}"
else
  export MHCKIT_COMMIT="${MHCKIT_COMMIT:-unknown}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export MHCKIT_BENCH_DTYPES="${MHCKIT_BENCH_DTYPES:-bfloat16}"
unset TRITON_INTERPRET || true

{
  echo "== mhckit gpu_suite: $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $MHCKIT_COMMIT"
  "$PY" - <<'EOF' || echo "version probe failed"
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"not importable ({e})"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE"
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tv} | gpu {gpu}")
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
} | tee "$SUMMARY"

# ---------------------------------------------------------------- (a) parity tests on the GPU
tests_status="skipped (pytest not importable)"
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  xdist=()
  if "$PY" -c "import xdist" >/dev/null 2>&1 && [ "$WORKERS" -gt 1 ]; then
    xdist=(-n "$WORKERS")
  fi
  rc=0
  MHCKIT_TRITON_AUTOTUNE=0 timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest tests/ops/test_triton_*.py \
    -q -p no:cacheprovider -o addopts="" ${xdist[@]+"${xdist[@]}"} --durations=10 -rfE \
    >"$OUT/gpu_tests.log" 2>&1 || rc=$?
  tail -n 40 "$OUT/gpu_tests.log"
  last=$(grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 1 || true)
  case "$rc" in
    0) tests_status="PASS: $last" ;;
    124|137) tests_status="TIMEOUT after ${TEST_TIMEOUT}s: $last" ;;
    *) tests_status="FAIL (rc=$rc): $last" ;;
  esac
fi
echo "tests: $tests_status" | tee -a "$SUMMARY"

# ---------------------------------------------------------------- (b) benchmarks
rc=0
MHCKIT_BENCH_BUDGET_S="${MHCKIT_BENCH_BUDGET_S:-$((BENCH_TIMEOUT - 40))}" \
  timeout -k 10 "$BENCH_TIMEOUT" "$PY" benchmarks/gpu_check.py "$OUT" >"$OUT/gpu_check.log" 2>&1 || rc=$?
sed -n '/==== gpu_check summary ====/,$p' "$OUT/gpu_check.log"
case "$rc" in
  0) bench_status="OK" ;;
  1) bench_status="done, with FAIL/ERROR rows (see gpu_check.md)" ;;
  124|137) bench_status="TIMEOUT after ${BENCH_TIMEOUT}s (partial rows in gpu_check.csv)" ;;
  *) bench_status="CRASHED (rc=$rc): $(tail -n 3 "$OUT/gpu_check.log" | tr '\n' ' ')" ;;
esac
echo "gpu_check: $bench_status" | tee -a "$SUMMARY"

# ---------------------------------------------------------------- (c), (d), (e) GPT training steps
# run_model LABEL TIMEOUT STEM [bench_model options...]: one bench_model run, its status in the summary
run_model() {
  local label="$1" limit="$2" stem="$3"
  shift 3
  local rc=0 status
  timeout -k 10 "$limit" "$PY" -m benchmarks.bench_model --preset "$MODEL_PRESET" --device "$MODEL_DEVICE" \
    --steps "$MODEL_STEPS" --warmup 2 --out "$stem" "$@" >"$stem.log" 2>&1 || rc=$?
  grep -E "ms/step|wrote" "$stem.log" || true
  case "$rc" in
    0) status="OK" ;;
    124|137) status="TIMEOUT after ${limit}s (no results: bench_model writes them at the end)" ;;
    *) status="FAILED (rc=$rc): $(tail -n 3 "$stem.log" | tr '\n' ' ')" ;;
  esac
  echo "$label: $status" | tee -a "$SUMMARY"
}
run_model "model (eager)" "$MODEL_TIMEOUT" "$OUT/model_${MODEL_PRESET}_${MODEL_DEVICE}"
prof="$OUT/profile_${MODEL_PRESET}_${MODEL_DEVICE}.txt"
rc=0
timeout -k 10 "$PROFILE_TIMEOUT" "$PY" -m benchmarks.profile_model --preset "$MODEL_PRESET" --device "$MODEL_DEVICE" \
  --variants residual,mhc >"$prof" 2>&1 || rc=$?
case "$rc" in
  0) echo "profile: OK ($prof)" | tee -a "$SUMMARY" ;;
  124|137) echo "profile: TIMEOUT after ${PROFILE_TIMEOUT}s (partial: $prof)" | tee -a "$SUMMARY" ;;
  *) echo "profile: FAILED (rc=$rc): $(tail -n 3 "$prof" | tr '\n' ' ')" | tee -a "$SUMMARY" ;;
esac
if [ "${MODEL_COMPILE:-1}" != "0" ]; then
  run_model "model (compiled)" "$MODEL_COMPILE_TIMEOUT" "$OUT/model_${MODEL_PRESET}_${MODEL_DEVICE}_compiled" \
    --compile --variants residual,mhc
fi

echo "== gpu_suite done in $(( $(date +%s) - START )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$SUMMARY"
exit 0

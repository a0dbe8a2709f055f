#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see shared/design/ENVIRONMENT.md, "A lent GPU").
#
#   OUT=/some/folder bash scripts/device_check.sh        # from anywhere; runs in the repo root
#
# That machine has Python 3.12 with its own torch (2.11, CUDA 13.0), triton 3.6, nvcc 13.0, ninja,
# pybind11 and pytest, and NO package registry: nothing here installs from the network.
# Steps (each under its own timeout, all inside one overall deadline of DEADLINE_S, default 465 s;
# a failed step never stops the next one):
#   env        nvidia-smi, python/torch/triton/nvcc versions               -> $OUT/env.txt
#   build      the extension from source for the GPU's arch + 8.0;9.0a      -> $OUT/build.log
#              (pip install --no-build-isolation --no-deps --no-index -e .; fallback setup.py build_ext --inplace)
#   info       python -m resnet_kernels info                                -> $OUT/info.txt
#   gpu_tests  pytest -m gpu tests/test_gpu_kernels.py                      -> $OUT/pytest.log, $OUT/pytest.xml
#   bench_train  benchmarks/bench_train.py --device cuda --amp bf16 (last: cut first when time runs out)
#   gpu_sm80   the cuda-backend tests again with RESNET_KERNELS_CUDA_FORCE_SM80=1 -> $OUT/pytest_sm80.log
#   fuzz       tests/test_gpu_field_cases.py (A2 B4 D3 on the GPU backends), then RESNET_KERNELS_FUZZ=long
#              pytest tests/test_fuzz.py (random configurations on cuda, triton, torch, auto vs float64,
#              inference and training; seeds past RESNET_KERNELS_FUZZ_SECONDS=60 skip) + the two-stream
#              concurrency test                                              -> $OUT/fuzz.log, $OUT/fuzz.xml
#   sanitizer  compute-sanitizer memcheck on one vector-path and one C=3 call -> $OUT/sanitizer.log
#   bench      benchmarks/bench_cuda_quick.py --quick                       -> $OUT/bench/, $OUT/bench.log
#   blocks     benchmarks/bench_blocks.py --quick --device cuda --batch 256 --compile-shapes 1 (+ 3 whole blocks)
#              (8 ResNet shapes x both memory formats, fp16: eager, conv alone, torch.compile on one shape,
#              each backend and auto's measured choice, % of roofline)  -> $OUT/bench_blocks/, $OUT/bench_blocks.log
# A summary of step statuses goes to stdout and $OUT/summary.txt.
# Optional: RK_GIT_COMMIT=<hash> (recorded by the benchmark when .git is not in the copy),
# PYTHON=<interpreter>, DEADLINE_S=<seconds>.
set -u

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUT=${OUT:-$ROOT/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

unset TRITON_INTERPRET            # the GPU, never the interpreter (conftest sets it only without a GPU)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONDONTWRITEBYTECODE=1

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
PY=${PY:-python3}

START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-465}
SUMMARY=()

log() { echo "[device_check $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

# run_step NAME CAP_SECONDS LOGFILE SIGNAL CMD...: runs CMD under timeout min(CAP, time left), output to
# LOGFILE (and a tail to stdout); records "NAME: ok|FAIL (rc N)|TIMEOUT|skipped (...)  [Ns]".
run_step() {
  local name=$1 cap=$2 logfile=$3 sig=$4; shift 4
  local now left t rc t0 status
  now=$(date +%s); left=$(( DEADLINE_S - (now - START) - 5 ))
  t=$(( cap < left ? cap : left ))
  if [ "$t" -lt 15 ]; then
    SUMMARY+=("$(printf '%-10s skipped (no time left before the %ss deadline)' "$name" "$DEADLINE_S")")
    log "$name: skipped, no time left"
    return 0
  fi
  log "$name: start (timeout ${t}s) -> $logfile"
  t0=$(date +%s)
  timeout --signal="$sig" --kill-after=20 "$t" "$@" >"$logfile" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMEOUT after ${t}s (rc $rc)" ;;
    *) status="FAIL (rc $rc)" ;;
  esac
  SUMMARY+=("$(printf '%-10s %-32s [%ss]' "$name" "$status" "$(( $(date +%s) - t0 ))")")
  log "$name: $status; last lines of $logfile:"
  tail -n 15 "$logfile" | sed 's/^/    /'
  return 0
}

# --- env ----------------------------------------------------------------------------------------------------
env_report() {
  echo "== date"; date -u
  echo "== uname"; uname -a
  echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi failed"
  echo "== nvidia-smi -q (clocks, power, ECC, MIG)"
  nvidia-smi -q -d CLOCK,POWER,ECC,PERFORMANCE 2>&1 | head -120 || true
  echo "== compute capability"; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1
  echo "== nvcc"; command -v nvcc; nvcc --version 2>&1 | tail -n 3
  echo "== python ($PY)"; command -v "$PY"; "$PY" --version
  "$PY" - <<'EOF'
import importlib, sys
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "torchvision", "numpy", "ninja", "pybind11", "pytest", "setuptools", "wheel", "skimage", "timm"):
    try:
        m = importlib.import_module(name)
        print(f"{name:12s}", getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(f"{name:12s} MISSING ({type(e).__name__})")
EOF
  echo "== git"; git rev-parse --short HEAD 2>/dev/null || echo "no .git in this copy (RK_GIT_COMMIT=${RK_GIT_COMMIT:-unset})"
}
log "repo $ROOT, OUT $OUT, python $PY, deadline ${DEADLINE_S}s"
run_step env 45 "$OUT/env.txt" TERM bash -c "$(declare -f env_report); PY='$PY'; env_report"

# --- build --------------------------------------------------------------------------------------------------
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
ARCHS="8.0;9.0a"
case "$CAP" in
  ""|8.0|9.0) ;;
  *) ARCHS="$ARCHS;$CAP" ;;          # e.g. 8.6, 8.9, 10.0: add the GPU's own arch
esac
build() {
  echo "== building for RESNET_KERNELS_CUDA_ARCHS=$ARCHS (GPU compute capability ${CAP:-unknown})"
  rm -f resnet_kernels/_C*.so
  export RESNET_KERNELS_CUDA_ARCHS="$ARCHS" RESNET_KERNELS_BUILD_CUDA=1 MAX_JOBS=16
  if "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . ; then
    echo "== pip install -e . succeeded"
  else
    echo "== pip install -e . FAILED; falling back to setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  ls -la resnet_kernels/_C*.so
  "$PY" -c "import resnet_kernels as rk, torch; print(rk.__file__); print(rk._C_STATUS); print(torch.ops.resnet_kernels.build_info())"
}
run_step build 240 "$OUT/build.log" TERM bash -c "$(declare -f build); PY='$PY'; ARCHS='$ARCHS'; CAP='$CAP'; build"

# --- info ---------------------------------------------------------------------------------------------------
run_step info 60 "$OUT/info.txt" TERM "$PY" -m resnet_kernels info

# --- GPU tests ----------------------------------------------------------------------------------------------
# SIGINT on timeout: pytest then stops cleanly and still writes the junit xml and the summary.
# -v: one line per test as it starts/ends, so a hang or a poisoned CUDA context is attributed to its test.
run_step gpu_tests 230 "$OUT/pytest.log" INT "$PY" -m pytest -m gpu tests/test_gpu_kernels.py tests/test_gpu_train.py -v -rfEs \
  --durations=25 --junitxml="$OUT/pytest.xml" -p no:cacheprovider

# The same cuda-backend tests with sm_90 devices sent to the mma.sync kernels (an H100/H200 would
# otherwise only ever run the wgmma family).
run_step gpu_sm80 90 "$OUT/pytest_sm80.log" INT env RESNET_KERNELS_CUDA_FORCE_SM80=1 "$PY" -m pytest -m gpu \
  tests/test_gpu_kernels.py -q -rfEs -p no:cacheprovider \
  -k "cuda and (plan or resnet_conv_shapes or awkward or residual or misaligned)"

# --- long fuzz tier (tests/test_fuzz.py): larger shapes on every GPU backend, time-boxed --------------------
# A failing seed prints its configuration and `python tests/test_fuzz.py --seed N --device cuda`.
run_step fuzz 100 "$OUT/fuzz.log" INT env RESNET_KERNELS_FUZZ=long RESNET_KERNELS_FUZZ_SEEDS=3000 \
  RESNET_KERNELS_FUZZ_SECONDS=60 "$PY" -m pytest tests/test_gpu_field_cases.py tests/test_fuzz.py \
  tests/test_concurrency.py -q -rfE -k "gpu_field or test_fuzz or cuda_streams" --junitxml="$OUT/fuzz.xml" \
  -p no:cacheprovider

# --- compute-sanitizer --------------------------------------------------------------------------------------
SAN=""
for cand in "$(command -v compute-sanitizer 2>/dev/null)" \
            "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
            "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")/compute-sanitizer" \
            /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
            /usr/local/cuda-13.0/bin/compute-sanitizer; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then SAN=$cand; break; fi
done
if [ -z "$SAN" ]; then
  TOP=$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/.*TOP=//p' | head -n 1 | tr -d '"')
  if [ -n "$TOP" ] && [ -x "$TOP/bin/compute-sanitizer" ]; then SAN="$TOP/bin/compute-sanitizer"; fi
fi
cat >"$OUT/sanitizer_probe.py" <<'EOF'
"""Two cuda-backend calls under compute-sanitizer: the vector path (C % 8 == 0; wgmma on sm_90a) and
the predicated scalar path (C = 3 stem), each compared with the torch backend."""
import sys

import torch

import resnet_kernels as rk

ok = True
for name, (n, c, k, h, r, stride, dtype, res) in {
        "vector c64->k96 3x3 fp16 +res": (2, 64, 96, 13, 3, 1, torch.float16, True),
        "scalar c3->k64 7x7s2 bf16": (2, 3, 64, 23, 7, 2, torch.bfloat16, False)}.items():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, h, generator=g).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(k, c, r, r, generator=g) / (c * r * r) ** 0.5).to("cuda", dtype)
    s, b = torch.randn(k, generator=g).cuda(), torch.randn(k, generator=g).cuda()
    p = (h + 2 * (r // 2) - r) // stride + 1
    rr = torch.randn(n, k, p, p, generator=g).to("cuda", dtype).contiguous(memory_format=torch.channels_last) if res else None
    plan = torch.ops.resnet_kernels.conv_bn_act_cuda_plan(x, w, [stride] * 2, [r // 2] * 2, [1, 1])
    y = rk.fused_conv_bn_act(x, w, s, b, rr, stride=stride, padding=r // 2, backend="cuda")
    want = rk.fused_conv_bn_act(x, w, s, b, rr, stride=stride, padding=r // 2, backend="torch")
    torch.cuda.synchronize()
    d = ((y.float() - want.float()).abs().max() / (want.float().abs().max() + 1e-6)).item()
    good = d < (2e-2 if dtype == torch.bfloat16 else 5e-3)
    ok &= good
    print(f"{name}: plan {plan}, max rel diff to torch backend {d:.2e} {'ok' if good else 'MISMATCH'}", flush=True)
sys.exit(0 if ok else 1)
EOF
if [ -n "$SAN" ]; then
  # No caching allocator: every tensor is its own cudaMalloc, so an out-of-bounds access is caught at
  # the tensor's edge instead of landing silently in a neighbour inside a pooled segment.
  run_step sanitizer 120 "$OUT/sanitizer.log" TERM env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool memcheck --error-exitcode 99 --print-limit 20 --leak-check no "$PY" "$OUT/sanitizer_probe.py"
else
  echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, next to nvcc, /usr/local/cuda*)" >"$OUT/sanitizer.log"
  SUMMARY+=("$(printf '%-10s skipped (compute-sanitizer not found)' sanitizer)")
  log "sanitizer: not found"
fi

# --- quick benchmark ----------------------------------------------------------------------------------------
run_step bench 200 "$OUT/bench.log" TERM "$PY" benchmarks/bench_cuda_quick.py --quick --out "$OUT/bench"
# Per-shape providers side by side, both memory formats, auto's measured choice (cached under $OUT, not ~/.cache).
run_step blocks 180 "$OUT/bench_blocks.log" TERM env RESNET_KERNELS_CACHE_DIR="$OUT/autotune_cache" \
  "$PY" benchmarks/bench_blocks.py --quick --device cuda --batch 256 --compile-shapes 1 --out "$OUT/bench_blocks"
# Training step (resnet50, bf16 AMP, channels_last): eager vs torch.compile vs converted, peak memory.
run_step bench_train 150 "$OUT/bench_train.log" TERM "$PY" benchmarks/bench_train.py --device cuda --amp bf16 \
  --batch 128 --rounds 3 --out "$OUT/bench"

# --- summary ------------------------------------------------------------------------------------------------
{
  echo "device_check summary ($(date -u +%FT%TZ), total $(( $(date +%s) - START ))s, deadline ${DEADLINE_S}s)"
  echo "GPU: $(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)  archs built: $ARCHS"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  if [ -f "$OUT/pytest.log" ]; then
    echo "pytest: $(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$OUT/pytest.log" | tail -n 1)"
  fi
  if [ -f "$OUT/fuzz.log" ]; then
    echo "fuzz: $(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$OUT/fuzz.log" | tail -n 1)"
  fi
  if [ -f "$OUT/sanitizer.log" ]; then
    echo "sanitizer: $(grep -E 'ERROR SUMMARY|not found' "$OUT/sanitizer.log" | tail -n 1)"
  fi
} | tee "$OUT/summary.txt"
exit 0

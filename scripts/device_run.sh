#!/usr/bin/env bash
# One run on the GPU machine (H200, CUDA 13, torch 2.x, Python 3.12, no internet): build absparse
# with the CUDA kernels, then the steps named in STEPS, each logged under $OUT (default
# build/device_out); a summary is printed last and written to $OUT/summary.txt.
#
#   STEPS="quick sanitizer ncu bench" bash scripts/device_run.sh
#
# Steps (in this order; skipped when fewer seconds than they need are left of BUDGET_S):
#   quick      GPU tests, quick tier (tests/test_gpu*.py, tests/test_cuda_validation.py, the GPU
#              tests of other files)                                                      tests.log
#   full       GPU tests, full tier                                                       tests.log
#   sanitizer  compute-sanitizer memcheck (smoke + small decode cases, the prefill key-position
#              and empty-row cases, a set of mask-builder cases) and racecheck (decode smoke, the
#              cached top-k, the decode-step update, two prefill cases, the tensor-core
#              last-block attention)                                                 sanitizer.log
# PYTEST_K: a -k expression for the quick tier (spaces kept); PYTEST_ARGS: more pytest arguments.
#   ncu        Nsight Compute, --set full, one steady launch of each kernel at B8/128K    ncu.txt
#   ncuprefill Nsight Compute, --set full, one launch of each sparse_prefill kernel (fa2, sm90) at
#              8K, every causal block                                                      ncu.txt
#   bench      bench/decode_bench.py (BENCH_ARGS, default --quick)     bench.log, decode_bench.json
#   prefill    bench/prefill_bench.py (PREFILL_ARGS, default --quick)  bench.log, prefill_bench.json
#   masks      bench/prefill_masks_bench.py, FlexPrefill / PBS-Attn mask building beside dense SDPA
#              (MASKS_ARGS, default: 32K and 128K)            bench.log, prefill_masks_bench.json
#   moa        bench/moa_bench.py (MoA window decode, MOA_ARGS)          bench.log, moa_bench.json
#   serve      GPU tests of the decode loop (tests/test_runner.py -k cuda), then bench/e2e_bench.py
#              (E2E_ARGS, default --quick)                        tests.log, bench.log, e2e_bench.json
#   rest       bench/profile_model_step.py: a model step's kernels by kind (REST_ARGS)   bench.log
#   gbench     absparse_bench_gpu (google-benchmark), carried in build/carry     bench.log, bench_gpu.json
# The build log (with the ptxas register / spill report) is build.log: 8 files at most, the
# device tool's limit.
#
# The Hopper prefill kernel (cuda/src/sparse_prefill_sm90.cu) needs the CUTLASS headers of the
# nvidia-cutlass wheel (a build requirement), and this machine reaches no package index: carry the
# wheel with the tree. On the development machine:
#   pip download --no-deps nvidia-cutlass==4.2.0.0 -d build/carry/wheels     (6.4 MB)
# then run this script with carry ["build/carry"]; it installs the wheel (--no-deps: only its
# headers are used) before the build. Without the wheel the kernel is not built (kernel="sm90"
# tests skip, the build log says so). For both prefill kernels side by side:
#   STEPS="quick prefill" PREFILL_ARGS="--quick --kernels fa2,sm90" bash scripts/device_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-560}
STEPS=${STEPS:-quick sanitizer bench}
T0=$(date +%s)
SUMMARY=()

left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
want() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME LOG MIN_SECONDS TIMEOUT COMMAND...: runs COMMAND (stdout+stderr to $OUT/LOG) unless
# fewer than MIN_SECONDS of the budget are left; records rc and duration.
step() {
  local name=$1 log=$2 need=$3 limit=$4
  shift 4
  if [ "$(left)" -lt "$need" ]; then
    SUMMARY+=("$(printf '%-10s SKIPPED (budget: %ss left)' "$name" "$(left)")")
    return 99
  fi
  local start rc
  start=$(date +%s)
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  echo "== $name: $*" >>"$OUT/$log"
  timeout "$limit" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - start ))" "$log")")
  return $rc
}

finish() {
  {
    echo "== absparse device run: $(date -u +%FT%TZ), $(( $(date +%s) - T0 ))s, steps: $STEPS"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
    printf '%s\n' "${SUMMARY[@]}"
    [ -f "$OUT/tests.log" ] && grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)' \
      "$OUT/tests.log"
    [ -f "$OUT/sanitizer.log" ] && grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer.log"
    [ -f "$OUT/build.log" ] && echo "kernels with register spills:" \
      "$(grep -cE ' [1-9][0-9]* bytes spill stores' "$OUT/build.log")"
    [ -f "$OUT/bench.log" ] && sed -n '/^| B\/ctx/,/^times in us/p' "$OUT/bench.log"
    [ -f "$OUT/bench.log" ] && sed -n '/^device .*matmul/,/^$/p' "$OUT/bench.log"
  } | tee "$OUT/summary.txt"
}
trap finish EXIT

export ABSPARSE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export CMAKE_ARGS="${CMAKE_ARGS:-} -DABSPARSE_PTXAS_VERBOSE=ON"
{
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nvcc --version | tail -2
  for wheel in build/carry/wheels/nvidia_cutlass-*.whl; do
    [ -f "$wheel" ] && "$PY" -m pip install --no-deps --no-index "$wheel"
  done
} >"$OUT/build.log" 2>&1
if ! step build build.log 60 400 "$PY" -m pip install --no-build-isolation --no-deps -v . ; then
  tail -40 "$OUT/build.log"
  exit 1
fi
# FIRST_CMD: a diagnostic command run right after the build (first.log), e.g. a scratch script
# carried with the tree.
if [ -n "${FIRST_CMD:-}" ]; then
  PYTHONUNBUFFERED=1 step first first.log 20 300 bash -c "$FIRST_CMD"
fi
step import build.log 10 60 "$PY" -c "import absparse, torch
print(absparse.__version__, 'has_cuda', absparse._C.has_cuda, 'gpu', torch.cuda.is_available(),
      'has_sm90_prefill', absparse._C.has_sm90_prefill)
assert absparse._C.has_cuda and torch.cuda.is_available()" || exit 1

export PYTHONUNBUFFERED=1
if want quick; then
  step quick tests.log 60 330 "$PY" -m pytest tests/test_gpu.py tests/test_cuda_validation.py \
    tests/test_gpu_prefill.py tests/test_gpu_prefill_masks.py tests/test_gpu_model_ops.py \
    tests/test_sparse_prefill.py::test_devices \
    tests/test_moa.py::test_windows_on_the_gpu \
    tests/test_hf_prefill.py::test_bf16_sparse_prefill_on_each_device_matches_masked_float64_attention \
    -q -ra -m "not full" -p no:cacheprovider --durations=10 ${PYTEST_K:+-k "$PYTEST_K"} \
    ${PYTEST_ARGS:-}
fi

if want full; then
  step full tests.log 90 300 "$PY" -m pytest \
    tests/test_gpu.py -q -ra -m full -p no:cacheprovider -x --durations=5
fi
if want sanitizer; then
  SAN=$(command -v compute-sanitizer ||
        ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
  MEMCHECK_K="sanitizer_smoke or (test_attention_matches_cpu and s1000-)"
  MEMCHECK_K+=" or (test_select_blocks_matches_cpu and s1002-) or max-cuboid-int8c"
  MEMCHECK_K+=" or softmax_sum-minmax-int4] or (test_large_selection_with_sampled_floor and 2048)"
  MEMCHECK_K+=" or (test_cached_selection_ties_and_outliers and max)"
  MEMCHECK_K+=" or (test_update_centroids_bitwise and s1000-) or special_keys"
  RACECHECK_K="sanitizer_smoke or (test_cached_selection_ties_and_outliers and random-max)"
  RACECHECK_K+=" or (test_update_centroids_bitwise and s1000-)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck sanitizer.log 60 150 "$SAN" --tool memcheck \
    --error-exitcode 9 --print-limit 40 "$PY" -m pytest tests/test_gpu.py -q -x \
    -p no:cacheprovider -k "$MEMCHECK_K"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck-prefill sanitizer.log 40 120 "$SAN" \
    --tool memcheck --error-exitcode 9 --print-limit 40 "$PY" -m pytest tests/test_gpu_prefill.py \
    -q -x -p no:cacheprovider -k "key_positions or empty_rows"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck-masks sanitizer.log 40 150 "$SAN" \
    --tool memcheck --error-exitcode 9 --print-limit 40 "$PY" -m pytest \
    tests/test_gpu_prefill_masks.py -q -x -p no:cacheprovider -k "coverage_select or block_pool \
    or pooled_block or js_distance or patterns_appear or (pbs_matches_cpu and seg512) \
    or (last_block and bfloat16) or feed_sparse_prefill"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck-model-ops sanitizer.log 30 90 "$SAN" \
    --tool memcheck --error-exitcode 9 --print-limit 40 "$PY" -m pytest \
    tests/test_gpu_model_ops.py -q -x -p no:cacheprovider -k "bad_device_values or 8200"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step racecheck sanitizer.log 60 120 "$SAN" --tool racecheck \
    --error-exitcode 9 --print-limit 40 "$PY" -m pytest tests/test_gpu.py -q -x \
    -p no:cacheprovider -k "$RACECHECK_K"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step racecheck-prefill sanitizer.log 40 120 "$SAN" \
    --tool racecheck --error-exitcode 9 --print-limit 40 "$PY" -m pytest \
    tests/test_gpu_prefill.py -q -x -p no:cacheprovider \
    -k "(key_positions and kv) or (sm90_random_lists and G4-D128-k128)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step racecheck-masks sanitizer.log 40 120 "$SAN" \
    --tool racecheck --error-exitcode 9 --print-limit 40 "$PY" -m pytest \
    tests/test_gpu_prefill_masks.py -q -x -p no:cacheprovider -k "last_block and bfloat16"
fi

if want ncu; then
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  for kernel in select_kernel attention_kernel update_kernel; do
    step "ncu-${kernel%%_*}" ncu.txt 40 120 "$NCU" --clock-control none --set full \
      -k "regex:$kernel" -s 1 -c 1 --page details "$PY" bench/profile_step.py
  done
fi

if want ncuprefill; then
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  for kernel in fa2 sm90; do
    step "ncu-$kernel" ncu.txt 40 120 "$NCU" --clock-control none --set full \
      -k "regex:prefill(_sm90)?_kernel" -s 2 -c 1 --page details "$PY" bench/prefill_bench.py \
      --quick --kernels "$kernel"
  done
fi

if want bench; then
  step bench bench.log 60 300 "$PY" bench/decode_bench.py ${BENCH_ARGS:---quick} \
    --json "$OUT/decode_bench.json"
fi

if want prefill; then
  step prefill bench.log 60 240 "$PY" bench/prefill_bench.py ${PREFILL_ARGS:---quick} \
    --json "$OUT/prefill_bench.json"
fi

if want masks; then
  step masks bench.log 60 300 "$PY" bench/prefill_masks_bench.py ${MASKS_ARGS:-} \
    --json "$OUT/prefill_masks_bench.json"
fi

if want moa; then
  step moa bench.log 40 180 "$PY" bench/moa_bench.py ${MOA_ARGS:-} --json "$OUT/moa_bench.json"
fi

if want serve; then
  step serve-tests tests.log 40 180 "$PY" -m pytest tests/test_runner.py -q -ra -k cuda \
    -p no:cacheprovider
  step e2e bench.log 60 420 "$PY" bench/e2e_bench.py ${E2E_ARGS:---quick} \
    --json "$OUT/e2e_bench.json"
fi

if want rest; then
  step rest bench.log 40 240 "$PY" bench/profile_model_step.py ${REST_ARGS:-}
fi

if want gbench; then
  # Built on the development machine (this image has no google-benchmark) and carried with
  # libbenchmark: build/carry/absparse_bench_gpu, build/carry/lib/.
  export LD_LIBRARY_PATH=$PWD/build/carry/lib:${LD_LIBRARY_PATH:-}
  step gbench bench.log 40 240 build/carry/absparse_bench_gpu \
    --benchmark_repetitions="${GBENCH_REPS:-3}" --benchmark_display_aggregates_only=true \
    --benchmark_min_time="${GBENCH_MIN_TIME:-0.05}" \
    --benchmark_out="$OUT/bench_gpu.json" --benchmark_out_format=json ${GBENCH_ARGS:-}
fi


exit 0

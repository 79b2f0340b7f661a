#!/usr/bin/env bash
# One run on the GPU machine (H100, CUDA 13, torch 2.x, Python 3.12, no internet): build absparse
# with the CUDA kernels, run the GPU tests, compute-sanitizer memcheck on a small subset and
# racecheck on one test. Logs go to $OUT (default build/device_out); a summary is printed last.
#
#   bash scripts/device_run.sh            # ~3-8 minutes; steps are skipped when BUDGET_S runs out
#
# Steps, in priority order: env, build (pip, ABSPARSE_CUDA=ON, ptxas report), quick GPU tests,
# memcheck (test_sanitizer_smoke + 4 small cases), racecheck (test_sanitizer_smoke), full tests.
# Files in $OUT (8, the device tool's limit): summary.txt env.log build.log ptxas.txt
# gpu_quick.log memcheck.log racecheck.log gpu_full.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-470}
T0=$(date +%s)
SUMMARY=()

left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

# step NAME LOG MIN_SECONDS TIMEOUT COMMAND...: runs COMMAND (stdout+stderr to $OUT/LOG) unless
# fewer than MIN_SECONDS of the budget are left; records rc and duration.
step() {
  local name=$1 log=$2 need=$3 limit=$4
  shift 4
  if [ "$(left)" -lt "$need" ]; then
    SUMMARY+=("$(printf '%-12s SKIPPED (budget: %ss left)' "$name" "$(left)")")
    return 99
  fi
  local start rc
  start=$(date +%s)
  timeout "$limit" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  SUMMARY+=("$(printf '%-12s rc=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - start ))" "$log")")
  return $rc
}

finish() {
  {
    echo "== absparse device run: $(date -u +%FT%TZ), $(( $(date +%s) - T0 ))s"
    printf '%s\n' "${SUMMARY[@]}"
    for log in gpu_quick.log gpu_full.log; do
      [ -f "$OUT/$log" ] &&
        echo "$log: $(grep -E '(passed|failed|error|skipped)' "$OUT/$log" | tail -1)"
    done
    for log in memcheck.log racecheck.log; do
      [ -f "$OUT/$log" ] &&
        echo "$log: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$log" | tail -1)"
    done
    [ -f "$OUT/ptxas.txt" ] && echo "kernels with register spills:" \
      "$(grep -cE ' [1-9][0-9]* bytes spill stores' "$OUT/ptxas.txt")"
  } | tee "$OUT/summary.txt"
}
trap finish EXIT

{
  nvidia-smi
  nvcc --version
  command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  "$PY" -m pip list 2>/dev/null |
    grep -i -E "^(torch|pybind11|scikit.build.core|pytest|numpy|ninja|cmake) "
} >"$OUT/env.log" 2>&1

export ABSPARSE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export CMAKE_ARGS="${CMAKE_ARGS:-} -DABSPARSE_PTXAS_VERBOSE=ON"
if ! step build build.log 60 400 "$PY" -m pip install --no-build-isolation --no-deps -v . ; then
  tail -40 "$OUT/build.log"
  exit 1
fi
grep -E "ptxas info *: (Compiling entry|Used)|bytes stack frame" "$OUT/build.log" \
  | sed -E 's/^ +//' >"$OUT/ptxas.txt"
step import build.log 10 60 "$PY" -c "import absparse, torch
print(absparse.__version__, 'has_cuda', absparse._C.has_cuda, 'gpu', torch.cuda.is_available())
assert absparse._C.has_cuda and torch.cuda.is_available()"

export PYTHONUNBUFFERED=1
step gpu_quick gpu_quick.log 60 200 "$PY" -m pytest tests/test_gpu.py -q -ra -m "not full" \
  -p no:cacheprovider --durations=10

SAN=$(command -v compute-sanitizer ||
      ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
# Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
MEMCHECK_K="sanitizer_smoke or (test_attention_matches_cpu and s1000-)"
MEMCHECK_K+=" or (test_select_blocks_matches_cpu and s1002-) or max-cuboid-int8c"
MEMCHECK_K+=" or softmax_sum-minmax-int4]"
step memcheck memcheck.log 60 150 "$SAN" --tool memcheck --error-exitcode 9 --print-limit 40 \
  "$PY" -m pytest tests/test_gpu.py -q -x -p no:cacheprovider -k "$MEMCHECK_K"
step racecheck racecheck.log 60 120 "$SAN" --tool racecheck --error-exitcode 9 --print-limit 40 \
  "$PY" -m pytest tests/test_gpu.py -q -x -p no:cacheprovider -k sanitizer_smoke
unset PYTORCH_NO_CUDA_MEMORY_CACHING

step gpu_full gpu_full.log 90 "$(( $(left) > 30 ? $(left) - 20 : 10 ))" "$PY" -m pytest \
  tests/test_gpu.py -q -ra -m full -p no:cacheprovider -x --durations=5
exit 0

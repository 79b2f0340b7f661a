#!/usr/bin/env bash
# session 12, final call: the decode part of the sanitizer step of scripts/device_run.sh
# (memcheck and racecheck of tests/test_gpu.py with its -k expressions; the prefill, mask and
# model-op parts test files this change does not touch).
cd "$(dirname "$0")/../../.."
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
MEMCHECK_K="sanitizer_smoke or (test_attention_matches_cpu and s1000-)"
MEMCHECK_K+=" or (test_select_blocks_matches_cpu and s1002-) or max-cuboid-int8c"
MEMCHECK_K+=" or softmax_sum-minmax-int4] or (test_large_selection_with_sampled_floor and 2048)"
MEMCHECK_K+=" or (test_cached_selection_ties_and_outliers and max)"
MEMCHECK_K+=" or (test_update_centroids_bitwise and s1000-) or special_keys"
MEMCHECK_K+=" or (test_chunk_reduction and 336 and period64)"
RACECHECK_K="sanitizer_smoke or (test_cached_selection_ties_and_outliers and random-max)"
RACECHECK_K+=" or (test_chunk_reduction and 336 and period64)"
RACECHECK_K+=" or (test_update_centroids_bitwise and s1000-)"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
"$SAN" --tool memcheck --error-exitcode 9 --print-limit 40 python3 -m pytest tests/test_gpu.py -q -x \
  -p no:cacheprovider -k "$MEMCHECK_K" 2>&1 | tail -5
echo "memcheck rc=${PIPESTATUS[0]}"
"$SAN" --tool racecheck --error-exitcode 9 --print-limit 40 python3 -m pytest tests/test_gpu.py -q -x \
  -p no:cacheprovider -k "$RACECHECK_K" 2>&1 | tail -5
echo "racecheck rc=${PIPESTATUS[0]}"

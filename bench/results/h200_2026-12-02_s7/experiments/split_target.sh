#!/usr/bin/env bash
# Experiment: the attention's split target (positions per CTA) at B1 / B4 / B8 / B32.
for t in 512 256 128; do
  echo "== ABSPARSE_EXPERIMENT_SPLIT_POSITIONS=$t"
  ABSPARSE_EXPERIMENT_SPLIT_POSITIONS=$t python3 bench/decode_bench.py --no-flex --reps 20 \
    --shapes 1x32768,1x131072,4x131072,8x131072,32x32768 --layouts mixed-minmax-int4c 2>&1 |
    grep -E "^\| [0-9]+/|copy"
done

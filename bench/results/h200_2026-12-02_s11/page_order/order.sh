#!/usr/bin/env bash
# The decode benchmark with the paged cache's pages in order and shuffled, side by side.
SH=1x32768,1x131072,8x32768,8x131072,32x32768
for order in ordered shuffled; do
  echo "######## --page-order $order"
  python3 bench/decode_bench.py --no-flex --reps 20 --shapes $SH --layouts mixed-minmax-int4c,uniform16-minmax-int4c --page-order $order --json "$OUT/decode_bench_$order.json" 2>&1 | grep -E "^\||copy"
done

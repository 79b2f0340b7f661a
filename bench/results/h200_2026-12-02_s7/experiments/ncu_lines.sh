#!/usr/bin/env bash
# Source-level Nsight Compute profiles of one sparse attention launch (B1/32K) and one select
# launch (B1/128K); the per-line tables go to $OUT.
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)
$NCU --clock-control none --set full --import-source yes -k regex:attention_kernel -s 2 -c 1 \
  -f -o "$OUT/attn_b1_32k" python3 bench/profile_step.py --batch 1 --context 32768
$NCU --clock-control none --set full --import-source yes -k regex:select_kernel -s 1 -c 1 \
  -f -o "$OUT/select_b1_128k" python3 bench/profile_step.py --batch 1 --context 131072
for r in attn_b1_32k select_b1_128k; do
  $NCU -i "$OUT/$r.ncu-rep" --page source --csv --print-source cuda > "$OUT/${r}_cuda.csv" 2>&1 || true
  $NCU -i "$OUT/$r.ncu-rep" --page source --csv --print-source sass > "$OUT/${r}_sass.csv" 2>&1 || true
  head -c 600 "$OUT/${r}_cuda.csv"; echo
done

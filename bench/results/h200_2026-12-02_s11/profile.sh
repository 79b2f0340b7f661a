#!/usr/bin/env bash
# Nsight Compute (--set full, source counters) of one select launch at B8/128K, B32/32K and B1/32K
# and one sparse attention launch at B8/32K and B1/32K (PROFILES picks a subset); details pages in
# ncu_details.txt, per-line CSVs in ncu.tar.gz. A variant of ../h200_2026-12-02_s10/profile.sh.
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)
mkdir -p /tmp/ncu
run() {  # name kernel-regex skip args...
  local name=$1 kernel=$2 skip=$3; shift 3
  $NCU --clock-control none --set full --import-source yes -k "regex:$kernel" -s "$skip" -c 1 \
    -f -o "/tmp/ncu/$name" python3 bench/profile_step.py "$@" > /tmp/ncu/$name.log 2>&1
  echo "######## $name" >> "$OUT/ncu_details.txt"
  $NCU -i "/tmp/ncu/$name.ncu-rep" --page details >> "$OUT/ncu_details.txt" 2>&1
  $NCU -i "/tmp/ncu/$name.ncu-rep" --page source --csv --print-source cuda > "/tmp/ncu/${name}_cuda.csv" 2>&1
  $NCU -i "/tmp/ncu/$name.ncu-rep" --page source --csv --print-source sass > "/tmp/ncu/${name}_sass.csv" 2>&1
}
want() { [[ " ${PROFILES:-select_b8_128k select_b32_32k select_b1_32k attn_b8_32k attn_b1_32k} " == *" $1 "* ]]; }
want select_b8_128k && run select_b8_128k select_kernel 1 --batch 8 --context 131072
want select_b32_32k && run select_b32_32k select_kernel 1 --batch 32 --context 32768
want select_b1_32k && run select_b1_32k select_kernel 1 --batch 1 --context 32768
want attn_b8_32k && run attn_b8_32k attention_kernel 2 --batch 8 --context 32768
want attn_b1_32k && run attn_b1_32k attention_kernel 2 --batch 1 --context 32768
rm -f /tmp/ncu/*.ncu-rep
tar czf "$OUT/ncu.tar.gz" -C /tmp/ncu .
ls -la /tmp/ncu

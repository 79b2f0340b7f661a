#!/usr/bin/env bash
# Nsight Compute (--set full, source counters) of one select launch at B8/128K, B32/32K and B1/32K
# and one sparse attention launch at B8/32K and B1/32K (PROFILES picks a subset); details pages in
# ncu_details.txt, per-line CSVs in ncu.tar.gz. A variant of ../h200_2026-12-02_s10/profile.sh.
mkdir -p /tmp/ncu
run() { bash bench/ncu_kernel.sh "$@"; }  # name kernel-regex skip args...
want() { [[ " ${PROFILES:-select_b8_128k select_b32_32k select_b1_32k attn_b8_32k attn_b1_32k} " == *" $1 "* ]]; }
want select_b8_128k && run select_b8_128k select_kernel 1 --batch 8 --context 131072
want select_b32_32k && run select_b32_32k select_kernel 1 --batch 32 --context 32768
want select_b1_32k && run select_b1_32k select_kernel 1 --batch 1 --context 32768
want attn_b8_32k && run attn_b8_32k attention_kernel 2 --batch 8 --context 32768
want attn_b1_32k && run attn_b1_32k attention_kernel 2 --batch 1 --context 32768
rm -f /tmp/ncu/*.ncu-rep
tar czf "$OUT/ncu.tar.gz" -C /tmp/ncu .
ls -la /tmp/ncu

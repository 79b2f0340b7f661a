#!/usr/bin/env bash
# Nsight Compute (--set full, source counters) of one select launch at B8/128K and B1/128K and one
# sparse attention launch at B1/128K and B8/128K; details pages in ncu_details.txt, per-line CSVs in ncu.tar.gz.
mkdir -p /tmp/ncu
run() { bash bench/ncu_kernel.sh "$@"; }  # name kernel-regex skip args...
want() { [[ " ${PROFILES:-select_b8_128k select_b1_128k attn_b1_128k attn_b8_128k} " == *" $1 "* ]]; }
want select_b8_128k && run select_b8_128k select_kernel 1 --batch 8 --context 131072
want select_b1_128k && run select_b1_128k select_kernel 1 --batch 1 --context 131072
want attn_b1_128k && run attn_b1_128k attention_kernel 2 --batch 1 --context 131072
want attn_b8_128k && run attn_b8_128k attention_kernel 2 --batch 8 --context 131072
rm -f /tmp/ncu/*.ncu-rep
tar czf "$OUT/ncu.tar.gz" -C /tmp/ncu .
ls -la /tmp/ncu

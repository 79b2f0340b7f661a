#!/usr/bin/env bash
# Variants of the launch choices (EXPERIMENT env knobs), one decode_bench each, same shapes.
SH=1x32768,1x131072,8x32768,8x131072,32x32768
for v in "ABS_X_PDL=0" "ABS_X_PDL=1" "ABS_X_PDL=2" "ABS_X_PDL=0 ABS_X_CHUNK=2" "ABS_X_PDL=0 ABS_X_CHUNK=8" \
         "ABS_X_PDL=0 ABS_X_SPLIT=256" "ABS_X_PDL=0 ABS_X_SPLIT=1024" "ABS_X_PDL=0 ABS_X_STAGES=3" "ABS_X_PDL=0 ABS_X_STAGES=2" "ABS_X_PDL=0"; do
  echo "######## $v"
  env $v python3 bench/decode_bench.py --no-flex --reps 20 --shapes $SH --layouts mixed-minmax-int4c 2>&1 | grep -E "^\|" 
done

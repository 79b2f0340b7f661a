#!/usr/bin/env bash
# Nsight Compute (--set full, source counters) of one launch of a decode kernel in
# bench/profile_step.py, on the GPU machine:
#   bash bench/ncu_kernel.sh NAME KERNEL_REGEX SKIP [profile_step.py arguments...]
# e.g. `bash bench/ncu_kernel.sh select_b8_128k select_kernel 1 --batch 8 --context 131072`
# profiles the second select_kernel launch (SKIP launches of the kernel are skipped first).
# Appends the details page to $OUT/ncu_details.txt under "######## NAME" and writes the report's
# per-line source pages (CUDA and SASS, CSV) to $NCU_DIR (default /tmp/ncu)/NAME_{cuda,sass}.csv;
# bench/ncu_lines.py turns the SASS page into a per-source-line table.
set -uo pipefail
name=$1 kernel=$2 skip=$3
shift 3
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)
dir=${NCU_DIR:-/tmp/ncu}
mkdir -p "$dir"
$NCU --clock-control none --set full --import-source yes -k "regex:$kernel" -s "$skip" -c 1 \
  -f -o "$dir/$name" python3 bench/profile_step.py "$@" > "$dir/$name.log" 2>&1
echo "######## $name" >> "$OUT/ncu_details.txt"
$NCU -i "$dir/$name.ncu-rep" --page details >> "$OUT/ncu_details.txt" 2>&1
$NCU -i "$dir/$name.ncu-rep" --page source --csv --print-source cuda > "$dir/${name}_cuda.csv" 2>&1
$NCU -i "$dir/$name.ncu-rep" --page source --csv --print-source sass > "$dir/${name}_sass.csv" 2>&1

#!/usr/bin/env bash
# Native microbenchmarks (google-benchmark) and the Python host-overhead benchmark; results go to
# bench/results/: cpu_ops_<date>.json, host_overhead_<date>.json and README.md (a summary table).
# Extra arguments go to absparse_bench_cpu (e.g. --benchmark_filter=dense).
#
# Environment: PYTHON (python3), BUILD_DIR (build/bench), ABSPARSE_CUDA (OFF), JOBS (2),
# REPETITIONS (3), CALLS (20000, host overhead), DATE (today, UTC, YYYY-MM-DD),
# README_ONLY=1: run nothing, rewrite bench/results/README.md from the JSON files of DATE.
# Needs absparse installed in $PYTHON (pip install --no-build-isolation .) for the host overhead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD_DIR=${BUILD_DIR:-build/bench}
JOBS=${JOBS:-2}
REPETITIONS=${REPETITIONS:-3}
CALLS=${CALLS:-20000}
DATE=${DATE:-$(date -u +%F)}
RESULTS=bench/results
mkdir -p "$RESULTS"

cpu_json="$RESULTS/cpu_ops_$DATE.json"
host_json="$RESULTS/host_overhead_$DATE.json"
bench_cmd=()
if [ "${README_ONLY:-0}" = 1 ]; then
  [ -e "$cpu_json" ] || cpu_json=""
else

generator=()
if command -v ninja >/dev/null && [ ! -e "$BUILD_DIR/CMakeCache.txt" ]; then generator=(-G Ninja); fi
mkdir -p "$BUILD_DIR"
if ! cmake -S . -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DABSPARSE_CUDA="${ABSPARSE_CUDA:-OFF}" -DABSPARSE_BUILD_BENCH=ON -DABSPARSE_BUILD_PYTHON=OFF \
    >"$BUILD_DIR/configure.log" 2>&1; then
  cat "$BUILD_DIR/configure.log" >&2
  exit 1
fi
grep -E "^-- absparse" "$BUILD_DIR/configure.log" || true

if grep -q "google-benchmark not found" "$BUILD_DIR/configure.log"; then
  echo "run_benchmarks: google-benchmark not found by CMake; native benchmarks skipped" >&2
  cpu_json=""
else
  cmake --build "$BUILD_DIR" --target absparse_bench_cpu -j "$JOBS"
  bench_bin=$(find "$BUILD_DIR" -name absparse_bench_cpu -type f -perm -u+x | head -n 1)
  bench_cmd=("$bench_bin" --benchmark_repetitions="$REPETITIONS"
             --benchmark_display_aggregates_only=true
             --benchmark_out="$cpu_json" --benchmark_out_format=json "$@")
  echo "+ ${bench_cmd[*]}"
  "${bench_cmd[@]}"
fi

"$PY" bench/host_overhead.py --calls "$CALLS" --json "$host_json"
fi

# bench/results/README.md: device, date, commands and the medians of both runs.
"$PY" - "$cpu_json" "$host_json" "$RESULTS/README.md" "$REPETITIONS" "${bench_cmd[*]}" <<'EOF'
import json, sys
cpu_path, host_path, readme, reps, bench_cmd = sys.argv[1:6]
host = json.load(open(host_path))
lines = ["# absparse benchmark results", "",
         "Written by `bash scripts/run_benchmarks.sh` (bench/README.md explains the benchmarks and the "
         "byte/FLOP models). Timings on a shared machine: compare only runs on the same device.", ""]
if cpu_path:
    cpu = json.load(open(cpu_path))
    ctx = cpu["context"]
    if not bench_cmd:  # README_ONLY: the default command of this script
        reps = next((r["repetitions"] for r in cpu["benchmarks"] if "repetitions" in r), reps)
        bench_cmd = (f"{ctx['executable']} --benchmark_repetitions={reps} "
                     f"--benchmark_display_aggregates_only=true --benchmark_out={cpu_path} "
                     "--benchmark_out_format=json")
    lines += [f"## CPU reference ops (`{cpu_path.split('/')[-1]}`)", "",
              f"- device: {host['device']}, {ctx['num_cpus']} x {ctx['mhz_per_cpu']} MHz "
              f"(google-benchmark context), load average {[round(x, 2) for x in ctx.get('load_avg', [])]}",
              f"- date: {ctx['date']}",
              f"- command: `{bench_cmd}` (built by this script: Release, `-DABSPARSE_CUDA=OFF`)",
              "- google-benchmark's own library is a Debian build that reports itself as debug; "
              "that affects the harness only (ms-scale ops here)",
              f"- shapes: {ctx.get('absparse_shape', '')}",
              "",
              f"Median of {reps} repetitions, CPU time per call; GB/s from the byte model "
              "(bytes per call / CPU time, 1 GB = 1e9 B); tokens = attended tokens per (sequence, KV head).",
              "",
              "| benchmark | ms | GB/s | GFLOP/s | tokens |",
              "| --- | ---: | ---: | ---: | ---: |"]
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
    runs = [r for r in cpu["benchmarks"] if not r.get("error_occurred")]
    medians = [r for r in runs if r.get("run_type") == "aggregate" and r["aggregate_name"] == "median"]
    for r in medians or runs:
        ms = r["cpu_time"] * scale[r["time_unit"]]
        gbs = r["bytes"] / (ms * 1e-3) / 1e9
        flops = f"{r['FLOP/s'] / 1e9:.2f}" if "FLOP/s" in r else ""
        tokens = f"{r['tokens']:.0f}" if "tokens" in r else ""
        lines.append(f"| `{r['run_name']}` | {ms:.3f} | {gbs:.3f} | {flops} | {tokens} |")
    lines.append("")
lines += [f"## Python host overhead per call (`{host_path.split('/')[-1]}`)", "",
          f"- device: {host['device']}, load average {host['load_average_before']}",
          f"- date: {host['date']}; torch {host['torch']}, python {host['python']}, "
          f"absparse {host['absparse']}",
          f"- command: `{host['command']}`",
          f"- shape: {' '.join(f'{k}={v}' for k, v in host['shape'].items())}, float32 CPU "
          f"tensors; {host['calls']} timed calls per op after {host['warmup']} warm-up, interleaved",
          "", "| op | call | median µs | p10 µs | p90 µs |", "| --- | --- | ---: | ---: | ---: |"]
for r in host["results"]:
    lines.append(f"| `{r['op']}` | {r['what']} | {r['median_us']:.2f} | {r['p10_us']:.2f} | "
                 f"{r['p90_us']:.2f} |")
open(readme, "w").write("\n".join(lines) + "\n")
print(f"wrote {readme}")
EOF

"""Host overhead of one Python call of each absparse op, on tiny CPU tensors.

The work inside each op is negligible at this size (B=1, Hk=1, Hq=1, D=64, L=16, page 16: one
block of 16 tokens), so the time per call is what a decode step pays per layer for the Python
wrapper, argument validation and the binding. Rows:

  dense_decode, sparse_decode, select_blocks, update_centroids   the public wrappers (absparse.*)
  _C.decode_attention (dense)   the bare binding call, no wrapper (output preallocated)
  torch.add                     torch.add(q, q) on the same tiny tensor: a yardstick
  no-op closure                 the timing loop itself (a closure that does nothing): the floor

Each call is timed alone with time.perf_counter_ns (the floor row shows what that adds); the
ops are interleaved in rounds so that a change in machine load affects them alike. The garbage
collector is off while timing.

    python bench/host_overhead.py [--calls 20000] [--warmup 1000] [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import sys
import time

import torch

import absparse

SHAPE = dict(B=1, Hk=1, Hq=1, D=64, L=16, page_size=16)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_ops():
    """(name, what, zero-argument callable) for every measured row."""
    torch.manual_seed(0)
    B, Hk, Hq, D, L, P = (SHAPE[k] for k in ("B", "Hk", "Hq", "D", "L", "page_size"))
    num_pages = 1
    k_cache = torch.randn(num_pages, P, Hk, D)                   # [num_pages, P, Hk, D]
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(B, Hq, D)                                    # [B, Hq, D]
    page_table = torch.zeros(B, 1, dtype=torch.int32)            # [B, max_pages]
    seq_lens = torch.full((B,), L, dtype=torch.int32)            # [B]
    start_pos = torch.zeros(B, dtype=torch.int32)                # [B]
    layout = absparse.LayerLayout([16], page_size=P, summary="minmax", format="int8")
    summaries, scales = layout.new_summary_cache(num_pages, D)
    absparse.update_centroids(k_cache, page_table, seq_lens, start_pos, layout, summaries, scales)
    idx, cnt = absparse.select_blocks(q, summaries, scales, page_table, seq_lens, layout, 16,
                                      sink_tokens=0, local_tokens=0)
    block_sizes = layout.block_sizes
    out = torch.empty_like(q)
    scale = 1.0 / D ** 0.5
    C = absparse._C
    return [
        ("dense_decode", "absparse.dense_decode(q, k, v, pt, L)",
         lambda: absparse.dense_decode(q, k_cache, v_cache, page_table, seq_lens)),
        ("sparse_decode", "absparse.sparse_decode(q, k, v, pt, L, block_sizes, idx, cnt)",
         lambda: absparse.sparse_decode(q, k_cache, v_cache, page_table, seq_lens, block_sizes,
                                        idx, cnt)),
        ("select_blocks", "absparse.select_blocks(q, s, sc, pt, L, layout, 16)",
         lambda: absparse.select_blocks(q, summaries, scales, page_table, seq_lens, layout, 16)),
        ("update_centroids", "absparse.update_centroids(k, pt, L, start, layout, s, sc)",
         lambda: absparse.update_centroids(k_cache, page_table, seq_lens, start_pos, layout,
                                           summaries, scales)),
        ("_C.decode_attention", "bare binding, dense, out preallocated",
         lambda: C.decode_attention(q, k_cache, v_cache, page_table, seq_lens, None, None, None,
                                    scale, out, None)),
        ("torch.add", "torch.add(q, q), yardstick", lambda: torch.add(q, q)),
        ("no-op closure", "timing floor", lambda: None),
    ]


def measure(ops, calls: int, warmup: int, rounds: int):
    """Per-call times in ns for each op: `rounds` interleaved rounds of calls // rounds each."""
    for _, _, fn in ops:
        for _ in range(warmup):
            fn()
    per_round = max(1, calls // rounds)
    times = {name: [] for name, _, _ in ops}
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, _, fn in ops:
                record = times[name].append
                for _ in range(per_round):
                    t0 = clock()
                    fn()
                    record(clock() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def percentile(sorted_values, fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = fraction * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(ops, times):
    rows = []
    for name, what, _ in ops:
        v = sorted(times[name])
        rows.append(dict(op=name, what=what, calls=len(v),
                         median_us=percentile(v, 0.5) / 1e3, p10_us=percentile(v, 0.1) / 1e3,
                         p90_us=percentile(v, 0.9) / 1e3, mean_us=sum(v) / len(v) / 1e3))
    return rows


def markdown_table(rows) -> str:
    lines = ["| op | call | median µs | p10 µs | p90 µs |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| `{r['op']}` | {r['what']} | {r['median_us']:.2f} | {r['p10_us']:.2f} | "
                     f"{r['p90_us']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="timed calls per op")
    parser.add_argument("--warmup", type=int, default=1000, help="untimed calls per op first")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--calls and --rounds must be >= 1, --warmup >= 0")

    ops = make_ops()
    load_before = os.getloadavg()
    times = measure(ops, args.calls, args.warmup, min(args.rounds, args.calls))
    load_after = os.getloadavg()
    rows = summarize(ops, times)
    meta = dict(
        device=f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(
            sys.argv[1:] if argv is None else argv)),
        torch=torch.__version__, torch_threads=torch.get_num_threads(),
        absparse=absparse.__version__, python=platform.python_version(),
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in load_after],
        shape=SHAPE, calls=rows[0]["calls"], warmup=args.warmup,
    )
    shape = " ".join(f"{k}={v}" for k, v in SHAPE.items())
    print(f"# absparse host overhead per call (CPU tensors, float32, {shape})")
    print(f"device: {meta['device']}; date: {meta['date']}; torch {meta['torch']}; "
          f"python {meta['python']}; load average {meta['load_average_before'][0]} -> "
          f"{meta['load_average_after'][0]}")
    print(f"command: {meta['command']}; {meta['calls']} calls per op after {args.warmup} warm-up")
    print()
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta, results=rows), f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

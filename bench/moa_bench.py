"""MoA-window decode on the GPU: per-KV-head windows (sink 64 + the last S_h(L) tokens) through
absparse.sparse_decode, the block lists built on the device by absparse.moa.window_blocks.

Llama-3.1-8B attention (32 query / 8 KV heads, D 128, bfloat16), pages of 64 tokens scattered
over the pool, every sequence at the full context, windows in 64-token blocks. Every op is
captured in a CUDA graph and replayed with the L2 flushed before each replay (decode_bench.Timer);
times are medians of CUDA-event times.

Plans (8 KV heads, spans S = alpha + beta L):
  static2k   alpha = 512, 1024, 1024, 2048, 2048, 2048, 3072, 4608, beta 0 (average 2048 tokens,
             decode_bench's budget)
  elastic    MoA-style: alpha 0 or 1024 and beta 0, 1/8 or 1/4 per head (PLANS): the spans grow
             with the context (average 4608 tokens at 32K, 17.4K at 128K)
Rows: lists (window_blocks), attend (sparse_decode over the lists), step (both, one graph),
dense (dense_decode). Bytes: the attended tokens (sink blocks + window blocks + tail) per
(sequence, KV head) x D x 2 B x 2 (K and V); GB/s and % of the measured device-copy bandwidth.

  python bench/moa_bench.py                 # B 1/8/32 x 32K/128K (H200)
  python bench/moa_bench.py --json out.json
  python bench/moa_bench.py --tiny          # small CPU run of the same code (CI smoke test)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

import absparse as ab
from absparse.moa import max_window_blocks, window_blocks

PLANS = {
    # name: per-head (alpha tokens, beta eighths)
    "static2k": [(512, 0), (1024, 0), (1024, 0), (2048, 0), (2048, 0), (2048, 0), (3072, 0),
                 (4608, 0)],
    "elastic": [(1024, 0), (1024, 0), (0, 1), (0, 1), (1024, 1), (0, 1), (0, 2), (1024, 2)],
}
SHAPES = [(1, 32768), (1, 131072), (8, 32768), (8, 131072), (32, 32768), (32, 131072)]
SINK, BLOCK, P = 64, 64, 64


class Shape:
    """Query and a paged cache of B sequences of length L (pages in shuffled order)."""

    def __init__(self, batch, length, hq, hk, d, dtype, device, gen):
        pages = -(-length // P)
        num_pages = batch * pages + 1
        order = torch.randperm(num_pages, generator=gen)[:batch * pages]
        self.page_table = order.view(batch, pages).to(torch.int32).to(device)
        self.k = torch.randn(num_pages, P, hk, d, generator=gen).to(dtype).to(device)
        self.v = torch.randn(num_pages, P, hk, d, generator=gen).to(dtype).to(device)
        self.seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
        self.q = torch.randn(batch, hq, d, generator=gen).to(dtype).to(device)


def attended_tokens(plan, length: int) -> int:
    """Tokens one sequence attends over all KV heads (sink blocks + window blocks + tail)."""
    nb = length // BLOCK
    total = 0
    for alpha, k in plan:
        span = min(max(alpha + k * length // 8, 0), length)
        sink = min(-(-SINK // BLOCK), nb)
        start = max((length - span) // BLOCK, sink)
        total += (sink + nb - start) * BLOCK + length - nb * BLOCK
    return total


class CpuTimer:
    """Median wall time (--tiny: the CPU path; no graphs, no L2 flush)."""

    def __init__(self, reps):
        self.reps = reps

    def time(self, fn) -> float:
        fn()
        times = []
        for _ in range(self.reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)


def run(shapes, plans, timer, bandwidth, hq, hk, d, dtype, device) -> list:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch, length in shapes:
        s = Shape(batch, length, hq, hk, d, dtype, device, gen)
        out = torch.empty_like(s.q)
        capacity = s.page_table.shape[1] * P
        dense_us = timer.time(lambda: ab.dense_decode(s.q, s.k, s.v, s.page_table, s.seq_lens,
                                                      out=out))
        for name in plans:
            const = torch.tensor([8 * a for a, _ in PLANS[name]], device=device)
            slope = torch.tensor([k for _, k in PLANS[name]], device=device)
            bs = torch.full((hk,), BLOCK, dtype=torch.int64, device=device)
            bs_host = torch.full((hk,), BLOCK, dtype=torch.int32)
            m = max_window_blocks(capacity, const, slope, 8, bs, SINK)
            lists = window_blocks(s.seq_lens, const, slope, 8, bs, SINK, m)

            def build():
                return window_blocks(s.seq_lens, const, slope, 8, bs, SINK, m)

            def attend():
                ab.sparse_decode(s.q, s.k, s.v, s.page_table, s.seq_lens, bs_host, *lists,
                                 out=out)

            def step():
                idx, cnt = build()
                ab.sparse_decode(s.q, s.k, s.v, s.page_table, s.seq_lens, bs_host, idx, cnt,
                                 out=out)

            t_build, t_attend, t_step = timer.time(build), timer.time(attend), timer.time(step)
            tokens = batch * attended_tokens(PLANS[name], length)
            nbytes = tokens * d * 2 * s.k.element_size()  # K and V
            row = dict(batch=batch, context=length, plan=name, lists_us=t_build,
                       attend_us=t_attend, step_us=t_step, dense_us=dense_us,
                       tokens_per_head=tokens / (batch * hk), bytes=nbytes,
                       gbs_attend=nbytes / t_attend / 1e3, gbs_step=nbytes / t_step / 1e3)
            if bandwidth:
                row["pct_attend"] = 100 * nbytes / (t_attend * 1e-6) / bandwidth
                row["pct_step"] = 100 * nbytes / (t_step * 1e-6) / bandwidth
            rows.append(row)
    return rows


def table(rows, bandwidth) -> str:
    cols = ["B/ctx", "plan", "tokens/head", "lists", "attend", "step", "dense", "GB/s step",
            "%bw attend", "%bw step"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        pct = lambda k: f"{r[k]:.0f}" if k in r else "-"
        out.append("| " + " | ".join([
            f"{r['batch']}/{r['context'] / 1024:g}K", r["plan"], f"{r['tokens_per_head']:.0f}",
            f"{r['lists_us']:.1f}", f"{r['attend_us']:.1f}", f"{r['step_us']:.1f}",
            f"{r['dense_us']:.1f}", f"{r['gbs_step']:.0f}", pct("pct_attend"),
            pct("pct_step")]) + " |")
    bw = f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)" if bandwidth else \
        "no bandwidth reference (CPU)"
    out.append(f"\ntimes in us; {bw}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU")
    ap.add_argument("--reps", type=int, default=30, help="timed replays per op (default 30)")
    ap.add_argument("--json", help="write all numbers to this JSON file")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.tiny:
        rows = run([(1, 1536), (2, 4096)], list(PLANS), CpuTimer(min(args.reps, 3)), None,
                   16, 8, 64, torch.float32, "cpu")
        bandwidth, device = None, "cpu"
    else:
        if not torch.cuda.is_available() or not ab._C.has_cuda:
            print("moa_bench: needs a CUDA device and absparse built with its CUDA kernels "
                  "(--tiny runs on the CPU)", file=sys.stderr)
            return 2
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from decode_bench import Timer, copy_bandwidth

        torch.manual_seed(0)
        bandwidth = copy_bandwidth()
        rows = run(SHAPES, list(PLANS), Timer(args.reps), bandwidth, 32, 8, 128, torch.bfloat16,
                   "cuda")
        device = torch.cuda.get_device_name()
    print(table(rows, bandwidth))
    if args.json:
        meta = dict(device=device, date=datetime.date.today().isoformat(),
                    torch=torch.__version__, absparse=ab.__version__,
                    command="python " + " ".join(sys.argv), copy_bandwidth=bandwidth,
                    wall_s=time.time() - t0, plans=PLANS, sink=SINK, block=BLOCK, page_size=P)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

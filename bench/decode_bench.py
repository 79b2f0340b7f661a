"""Decode step on the GPU: absparse against SDPA (flash, cuDNN) and FlexAttention, side by side.

Llama-3.1-8B attention (32 query / 8 KV heads, D 128, bfloat16), pages of 64 tokens scattered over
the pool (in order with --page-order ordered), every sequence of the batch at the full context, a token budget of 2048 per KV head
(sink 16, local 64). Every op is captured in a CUDA graph and replayed with the L2 flushed before
each replay (a 256 MiB write outside the timed region); times are medians of CUDA-event times.

Rows (one shape and summary layout each):
  sdpa_flash, sdpa_cudnn   dense decode, contiguous [B, Hk, L, D] K/V, enable_gqa
  flex                     FlexAttention over the same number of tokens per KV head as the budget,
                           in 128-token blocks (an attempt with BlockMask.from_kv_blocks and 16-token
                           blocks ended in a device-side index assert on the H200, torch 2.11)
  dense                    absparse.dense_decode over the paged cache
  select                   absparse.select_blocks (budget 2048)
  attend                   absparse.sparse_decode over the selected lists
  step                     update_centroids of one appended token + select + attend (one graph)
  full                     sparse_decode over every block (budget >= context), vs dense
  prefill                  update_centroids over the whole context (start 0)
Byte model (what each op must move; GB/s and % of the measured device-copy bandwidth):
  dense / sdpa: B L Hk D 2 B x 2 (K and V); select: the summaries of the candidate blocks;
  attend: the listed blocks + partial tail per (sequence, KV head) x D x 2 B x 2; step: select +
  attend; prefill: the keys read + summaries written. The ideal ratio is dense bytes / step bytes.

  python bench/decode_bench.py                      # every shape and layout (~4 min on an H200)
  python bench/decode_bench.py --quick              # B1/32K, B8/128K, mixed and uniform int4c
  python bench/decode_bench.py --json out.json --no-flex
  python bench/decode_bench.py --shapes 1x32768,8x131072 --layouts mixed-minmax-int4c
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import absparse as ab

HQ, HK, D, P = 32, 8, 128, 64
BUDGET, SINK, LOCAL = 2048, 16, 64
DTYPE = torch.bfloat16
LAYOUTS = {
    # name: (block sizes, summary kind, format)
    "mixed-minmax-int4c": ([8, 8, 16, 16, 16, 32, 32, 64], "minmax", "int4c"),
    "uniform16-minmax-int4c": ([16] * 8, "minmax", "int4c"),
    "mixed-mean-int8": ([8, 8, 16, 16, 16, 32, 32, 64], "mean", "int8"),
    "uniform16-mean-int8": ([16] * 8, "mean", "int8"),
}
SHAPES = [(1, 32768), (1, 131072), (8, 32768), (8, 131072), (32, 32768), (1, 524288)]
QUICK_SHAPES = [(1, 32768), (8, 131072)]
QUICK_LAYOUTS = ["mixed-minmax-int4c", "uniform16-minmax-int4c"]


class Timer:
    """Median CUDA-event time of a graph replay, the L2 flushed before each replay."""

    def __init__(self, reps: int):
        self.reps = reps
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def graph(self, fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: allocations, lazy initialization, compilation
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g

    def time(self, fn) -> float:
        g = self.graph(fn)
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(self.reps + 3):
            self.flush.zero_()
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)  # us
        return statistics.median(times[3:])


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (median of 20)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * src.numel() / statistics.median(times)


class Paged:
    """A paged KV cache of B sequences of length L: pages of one pool in shuffled order, or in
    order (sequence b owns pages [b * pages, (b + 1) * pages), as a serving engine's contiguous
    allocation would give)."""

    def __init__(self, batch: int, length: int, gen: torch.Generator, ordered: bool = False):
        pages = -(-length // P)
        self.num_pages = batch * pages + 1
        order = (torch.arange(batch * pages) if ordered
                 else torch.randperm(self.num_pages, generator=gen)[:batch * pages])
        self.page_table = order.view(batch, pages).to(torch.int32).cuda()
        self.k = torch.randn(self.num_pages, P, HK, D, dtype=DTYPE, device="cuda")
        self.v = torch.randn(self.num_pages, P, HK, D, dtype=DTYPE, device="cuda")
        self.seq_lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        self.q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda")


def layout_for(name: str, cache: Paged) -> ab.LayerLayout:
    sizes, kind, fmt = LAYOUTS[name]
    kw = {}
    if fmt in ("int4c", "int8c"):  # per-channel range of the keys (a sample of the pool)
        sample = cache.k[: min(cache.num_pages, 256)].float().reshape(-1, HK, D)
        lo, hi = sample.amin(0), sample.amax(0)
        levels = 15 if fmt == "int4c" else 255
        kw = dict(channel_scale=((hi - lo) / levels).cpu(), channel_zero=lo.cpu())
    return ab.LayerLayout(sizes, P, summary=kind, format=fmt, **kw)


def summary_bytes_per_block(layout: ab.LayerLayout) -> int:
    width = D // 2 if layout.format in ("int4", "int4c") else D
    elem = {"fp32": 4, "fp16": 2, "bf16": 2}.get(layout.format, 1)
    per_vector = width * elem + (4 if layout.format in ("int8", "int4") else 0)
    return layout.summary_vectors * per_vector


def candidate_blocks(layout: ab.LayerLayout, batch: int, length: int) -> int:
    total = 0
    for bs in layout.block_sizes.tolist():
        n = length // bs
        sink = min(-(-SINK // bs), n)
        local = min(-(-LOCAL // bs), n)
        total += max(n - local, sink) - sink
    return batch * total


def flex_runner(cache: Paged, sdpa_k, sdpa_v, batch: int, length: int, gen: torch.Generator):
    """FlexAttention over BUDGET tokens per KV head: a fixed random choice of 128-token blocks
    (the first and last always), the block mask built by create_block_mask from a table."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block = 128
    nblk, total_blocks = BUDGET // block, length // block
    table = torch.zeros(batch, HK, total_blocks, dtype=torch.bool)
    for b in range(batch):
        for h in range(HK):
            pick = torch.randperm(total_blocks - 2, generator=gen)[: nblk - 2] + 1
            table[b, h, pick] = True
    table[:, :, 0] = table[:, :, -1] = True
    table = table.cuda()
    group = HQ // HK

    def selected(b, h, q_idx, kv_idx):
        return table[b, h // group, kv_idx // block]

    mask = create_block_mask(selected, batch, HQ, 1, length, device="cuda", BLOCK_SIZE=block)
    flex = torch.compile(flex_attention, dynamic=False)
    q4 = cache.q.view(batch, HQ, 1, D)
    fn = lambda: flex(q4, sdpa_k, sdpa_v, block_mask=mask, enable_gqa=True)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    return fn, block


def run_shape(batch: int, length: int, layouts, timer: Timer, bandwidth: float, use_flex: bool,
              gen: torch.Generator, ordered: bool = False) -> list:
    rows = []
    cache = Paged(batch, length, gen, ordered)
    dense_bytes = batch * length * HK * D * 2 * 2
    # SDPA and flex read contiguous [B, Hk, L, D] caches (random values of their own).
    sdpa_k = torch.randn(batch, HK, length, D, dtype=DTYPE, device="cuda")
    sdpa_v = torch.randn_like(sdpa_k)
    q4 = cache.q.view(batch, HQ, 1, D)
    base = {}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def sdpa(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q4, sdpa_k, sdpa_v, enable_gqa=True)
        try:
            base[name] = timer.time(sdpa)
        except RuntimeError as exc:
            print(f"  {name} unavailable: {str(exc).splitlines()[0]}", file=sys.stderr)
    best_sdpa = min(base.values()) if base else float("nan")
    if use_flex:
        try:
            fn, block = flex_runner(cache, sdpa_k, sdpa_v, batch, length, gen)
            base["flex"] = timer.time(fn)
            base["flex_block"] = block
        except Exception as exc:  # report, keep benchmarking absparse
            print(f"  flex unavailable: {exc}", file=sys.stderr)
    del sdpa_k, sdpa_v
    dense_us = timer.time(lambda: ab.dense_decode(cache.q, cache.k, cache.v, cache.page_table,
                                                  cache.seq_lens))

    for name in layouts:
        layout = layout_for(name, cache)
        summaries, scales = layout.new_summary_cache(cache.num_pages, D, device="cuda")
        zero = torch.zeros_like(cache.seq_lens)
        prefill_us = timer.time(lambda: ab.update_centroids(
            cache.k, cache.page_table, cache.seq_lens, zero, layout, summaries, scales))
        sel = dict(sink_tokens=SINK, local_tokens=LOCAL)
        idx, cnt = ab.select_blocks(cache.q, summaries, scales, cache.page_table, cache.seq_lens,
                                    layout, BUDGET, **sel)
        select_us = timer.time(lambda: ab.select_blocks(
            cache.q, summaries, scales, cache.page_table, cache.seq_lens, layout, BUDGET, **sel))
        attend_us = timer.time(lambda: ab.sparse_decode(
            cache.q, cache.k, cache.v, cache.page_table, cache.seq_lens, layout, idx, cnt))
        append_start = cache.seq_lens - 1

        def step():
            ab.update_centroids(cache.k, cache.page_table, cache.seq_lens, append_start, layout,
                                summaries, scales, max_new_tokens=1)
            i, c = ab.select_blocks(cache.q, summaries, scales, cache.page_table, cache.seq_lens,
                                    layout, BUDGET, **sel)
            return ab.sparse_decode(cache.q, cache.k, cache.v, cache.page_table, cache.seq_lens,
                                    layout, i, c)
        step_us = timer.time(step)
        full_idx, full_cnt = ab.select_blocks(cache.q, summaries, scales, cache.page_table,
                                              cache.seq_lens, layout, length, **sel)
        full_us = timer.time(lambda: ab.sparse_decode(
            cache.q, cache.k, cache.v, cache.page_table, cache.seq_lens, layout, full_idx,
            full_cnt))

        sizes = torch.tensor(layout.block_sizes.tolist(), device="cuda")
        tail = (cache.seq_lens[:, None] % sizes[None]).to(torch.int64)
        attended = int((cnt.to(torch.int64) * sizes[None] + tail).sum())
        attend_bytes = attended * D * 2 * 2
        select_bytes = candidate_blocks(layout, batch, length) * summary_bytes_per_block(layout)
        step_bytes = select_bytes + attend_bytes
        summaries_written = sum(batch * (length // bs) for bs in layout.block_sizes.tolist()) \
            * summary_bytes_per_block(layout)
        prefill_bytes = dense_bytes // 2 + summaries_written
        pct = lambda nbytes, us: 100.0 * nbytes / (us * 1e-6) / bandwidth  # noqa: E731
        row = dict(batch=batch, context=length, layout=name, **base, dense=dense_us,
                   select=select_us, attend=attend_us, step=step_us, full=full_us,
                   prefill=prefill_us, dense_bytes=dense_bytes, select_bytes=select_bytes,
                   attend_bytes=attend_bytes, attended_tokens_per_head=attended / (batch * HK),
                   pct_dense=pct(dense_bytes, dense_us), pct_select=pct(select_bytes, select_us),
                   pct_attend=pct(attend_bytes, attend_us), pct_step=pct(step_bytes, step_us),
                   pct_prefill=pct(prefill_bytes, prefill_us),
                   step_vs_sdpa=best_sdpa / step_us, ideal_ratio=dense_bytes / step_bytes,
                   dense_vs_sdpa=dense_us / best_sdpa, full_vs_sdpa=full_us / best_sdpa)
        if "flex" in base:
            row["step_vs_flex"] = base["flex"] / step_us
        rows.append(row)
        print(f"  {name}: step {step_us:.1f} us ({row['step_vs_sdpa']:.1f}x SDPA, ideal "
              f"{row['ideal_ratio']:.1f}x)", file=sys.stderr)
        del summaries, scales
    del cache
    torch.cuda.empty_cache()
    return rows


def table(rows: list, bandwidth: float) -> str:
    cols = ["B/ctx", "layout", "sdpa best", "flex", "dense", "select", "attend", "step",
            "step vs sdpa", "ideal", "full/sdpa", "%bw sel", "%bw att", "%bw step", "prefill"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        best = min(r.get("sdpa_flash", math.inf), r.get("sdpa_cudnn", math.inf))
        flex = f"{r['flex']:.1f} ({r['flex_block']})" if "flex" in r else "-"
        out.append("| " + " | ".join([
            f"{r['batch']}/{r['context'] // 1024}K", r["layout"], f"{best:.1f}", flex,
            f"{r['dense']:.1f}", f"{r['select']:.1f}", f"{r['attend']:.1f}", f"{r['step']:.1f}",
            f"{r['step_vs_sdpa']:.1f}x", f"{r['ideal_ratio']:.1f}x", f"{r['full_vs_sdpa']:.2f}",
            f"{r['pct_select']:.0f}", f"{r['pct_attend']:.0f}", f"{r['pct_step']:.0f}",
            f"{r['prefill']:.0f} ({r['pct_prefill']:.0f}%)"]) + " |")
    out.append(f"\ntimes in us; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, two layouts")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles)")
    ap.add_argument("--reps", type=int, default=30, help="timed replays per op (default 30)")
    ap.add_argument("--json", help="write all numbers to this JSON file")
    ap.add_argument("--shapes", help="BxL,... (e.g. 1x32768,8x131072): these shapes instead")
    ap.add_argument("--layouts", help="names from LAYOUTS, comma-separated: these layouts instead")
    ap.add_argument("--page-order", choices=("shuffled", "ordered"), default="shuffled",
                    help="the paged cache's pages: shuffled over the pool (default) or in order")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not ab._C.has_cuda:
        print("decode_bench: needs a CUDA device and absparse built with its CUDA kernels",
              file=sys.stderr)
        return 2
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    timer = Timer(args.reps)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    layouts = QUICK_LAYOUTS if args.quick else list(LAYOUTS)
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        except ValueError:
            shapes = []
        if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
            ap.error(f"--shapes: expected BxL,... with B, L >= 1, got {args.shapes!r}")
    if args.layouts:
        layouts = args.layouts.split(",")
        unknown = [n for n in layouts if n not in LAYOUTS]
        if unknown:
            ap.error(f"--layouts: unknown {unknown}; choose from {list(LAYOUTS)}")
    rows = []
    for batch, length in shapes:
        print(f"B{batch} / {length // 1024}K", file=sys.stderr)
        rows += run_shape(batch, length, layouts, timer, bandwidth, not args.no_flex, gen,
                          args.page_order == "ordered")
    text = table(rows, bandwidth)
    print(text)
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                    torch=torch.__version__, absparse=ab.__version__,
                    command="python " + " ".join(sys.argv), copy_bandwidth=bandwidth,
                    wall_s=time.time() - t0, budget=BUDGET, sink=SINK, local=LOCAL,
                    heads=[HQ, HK], head_dim=D, page_size=P, dtype=str(DTYPE),
                    page_order=args.page_order)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

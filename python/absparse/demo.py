"""A demo of the decode pipeline on generated data: error vs dense attention and KV bytes read.

    python -m absparse.demo        (or: absparse demo)

Keys have the locality of real ones: runs of 16-128 consecutive tokens share a "topic" direction,
plus per-token noise. Each query points at a few random "needle" tokens, so attention
concentrates on a few spans the way it does in long-context retrieval. Every KV head gets its own
block size; the pipeline runs update_centroids -> select_blocks -> sparse_decode and compares with
dense_decode on the same cache.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from .layout import LayerLayout
from .ops import dense_decode, select_blocks, sparse_decode, update_centroids


def make_batch(seq_lens, num_q_heads, num_kv_heads, head_dim, page_size, dtype, generator,
               needles_per_query=2):
    """A shuffled paged KV cache and queries that attend to a few needle tokens each."""
    batch = len(seq_lens)
    pages_per_seq = [math.ceil(n / page_size) for n in seq_lens]
    max_pages = max(pages_per_seq)
    num_pages = sum(pages_per_seq)
    perm = torch.randperm(num_pages, generator=generator)
    page_table = torch.full((batch, max_pages), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per_seq):
        page_table[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
    # Slots past a sequence's end hold noise, like stale entries of a reused page.
    k_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=generator)
    for b, n in enumerate(seq_lens):
        # Token-ordered keys [n, Hk, D]: topic runs of random length plus per-token noise.
        keys = torch.empty(n, num_kv_heads, head_dim)
        start = 0
        while start < n:
            run = int(torch.randint(16, 129, (1,), generator=generator))
            topic = torch.randn(num_kv_heads, head_dim, generator=generator)
            end = min(n, start + run)
            keys[start:end] = topic + torch.randn(end - start, num_kv_heads, head_dim,
                                                        generator=generator)
            start = end
        for t0 in range(0, n, page_size):
            rows = keys[t0:t0 + page_size]
            k_cache[page_table[b, t0 // page_size], :rows.shape[0]] = rows
    v_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=generator)
    group = num_q_heads // num_kv_heads
    q = torch.zeros(batch, num_q_heads, head_dim)
    for b, n in enumerate(seq_lens):
        for i in range(num_q_heads):
            h = i // group
            for t in torch.randint(0, n, (needles_per_query,), generator=generator).tolist():
                page = page_table[b, t // page_size]
                # Logits: ~16 for the needle, ~8 for its topic run, ~N(0, 2^2) elsewhere.
                q[b, i] += 8.0 / math.sqrt(head_dim) * k_cache[page, t % page_size, h]
    to = lambda x: x.to(dtype)
    return to(q), to(k_cache), to(v_cache), page_table, torch.tensor(seq_lens, dtype=torch.int32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="absparse demo", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--min-len", type=int, default=3000)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--budget", type=int, default=1024, help="token budget per KV head")
    p.add_argument("--summary", default="minmax", choices=["mean", "minmax", "cuboid"])
    p.add_argument("--format", default="int4c",
                   choices=["fp32", "fp16", "bf16", "int8", "int4", "int8c", "int4c"])
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.batch,), generator=gen).tolist()
    q, k, v, page_table, seq_lens = make_batch(lens, args.q_heads, args.kv_heads, args.head_dim,
                                               args.page_size, dtype, gen)
    candidates = [8, 16, 32, 64]
    block_sizes = [candidates[h % len(candidates)] for h in range(args.kv_heads)]
    channel_scale = channel_zero = None
    if args.format in ("int8c", "int4c"):
        # Per-channel range from the keys themselves (a real deployment calibrates it offline).
        flat = k.float().reshape(-1, args.kv_heads, args.head_dim)
        lo, hi = flat.amin(0), flat.amax(0)
        levels = 255 if args.format == "int8c" else 15
        channel_scale = ((hi - lo) / levels).clamp_min(1e-6)
        channel_zero = lo
    layout = LayerLayout(block_sizes, args.page_size, args.summary, args.format,
                         channel_scale, channel_zero)
    summaries, scales = layout.new_summary_cache(k.shape[0], args.head_dim)

    t0 = time.perf_counter()
    update_centroids(k, page_table, seq_lens, torch.zeros_like(seq_lens), layout, summaries, scales)
    idx, cnt = select_blocks(q, summaries, scales, page_table, seq_lens, layout, args.budget)
    out, lse = sparse_decode(q, k, v, page_table, seq_lens, layout, idx, cnt, return_lse=True)
    t_sparse = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref, lse_dense = dense_decode(q, k, v, page_table, seq_lens, return_lse=True)
    t_dense = time.perf_counter() - t0

    err = (out.double() - ref.double()).norm() / ref.double().norm()
    # Share of the exact attention mass inside the attended set: exp(lse_sparse - lse_dense).
    recall = torch.exp(lse.double() - lse_dense.double())
    elem = k.element_size()
    kv_bytes_dense = sum(lens) * args.kv_heads * args.head_dim * 2 * elem
    attended = 0
    summary_bytes = 0
    per_summary = summaries[0, 0].numel() * summaries.element_size() + (
        scales[0, 0].numel() * 4 if scales is not None else 0)
    for b, n in enumerate(lens):
        for h, bs in enumerate(block_sizes):
            attended += int(cnt[b, h]) * bs + n % bs
            summary_bytes += (n // bs) * per_summary
    kv_bytes_sparse = attended * args.head_dim * 2 * elem
    print(f"absparse demo: batch {args.batch}, seq_lens {lens}, {args.q_heads} q / "
          f"{args.kv_heads} KV heads, D {args.head_dim}, {args.dtype}, page {args.page_size}")
    print(f"block sizes per KV head {block_sizes}, summary {args.summary}/{args.format}, "
          f"budget {args.budget} tokens per head")
    print(f"relative L2 error of sparse vs dense attention output: {err:.4f}")
    print(f"attention recall (share of the exact softmax mass attended): mean {recall.mean():.4f}, "
          f"min {recall.min():.4f}")
    print(f"KV bytes read: {kv_bytes_sparse + summary_bytes:,} of {kv_bytes_dense:,} "
          f"({(kv_bytes_sparse + summary_bytes) / kv_bytes_dense:.1%}: attended K/V "
          f"{kv_bytes_sparse / kv_bytes_dense:.1%} + summaries {summary_bytes / kv_bytes_dense:.1%})")
    print(f"CPU reference time: pipeline {t_sparse:.2f} s (incl. summaries of the whole prefix), "
          f"dense {t_dense:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

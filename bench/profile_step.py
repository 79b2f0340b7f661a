"""One decode step of absparse for a profiler: update (one appended token), select, attend, and a
dense decode, at one shape (default B8 / 128K, Llama-3.1-8B heads, mixed block sizes, minmax
int4c, budget 2048). Each kernel runs once after a warm-up, so that `ncu -k <kernel> -s 1 -c 1`
profiles one steady launch of it.

  ncu --clock-control none --set full -k regex:select_kernel -s 1 -c 1 python bench/profile_step.py
"""
import argparse

import torch

import absparse as ab
from decode_bench import BUDGET, LOCAL, SINK, Paged, layout_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--layout", default="mixed-minmax-int4c")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    cache = Paged(args.batch, args.context, gen)
    layout = layout_for(args.layout, cache)
    summaries, scales = layout.new_summary_cache(cache.num_pages, cache.k.shape[-1], device="cuda")
    zero = torch.zeros_like(cache.seq_lens)
    ab.update_centroids(cache.k, cache.page_table, cache.seq_lens, zero, layout, summaries, scales)
    append = cache.seq_lens - 1
    for _ in range(2):  # warm-up, then the profiled run
        ab.update_centroids(cache.k, cache.page_table, cache.seq_lens, append, layout, summaries,
                            scales, max_new_tokens=1)
        idx, cnt = ab.select_blocks(cache.q, summaries, scales, cache.page_table, cache.seq_lens,
                                    layout, BUDGET, sink_tokens=SINK, local_tokens=LOCAL)
        ab.sparse_decode(cache.q, cache.k, cache.v, cache.page_table, cache.seq_lens, layout, idx,
                         cnt)
        ab.dense_decode(cache.q, cache.k, cache.v, cache.page_table, cache.seq_lens)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

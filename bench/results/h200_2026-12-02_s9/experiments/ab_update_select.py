"""A/B of the decode-step update (staged vs register batches) and the top-k (value bins vs radix)
on one build: the experiment build reads ABSPARSE_EXP_UNSTAGED / ABSPARSE_EXP_NO_VALUE_BINS."""
import os, sys
sys.path.insert(0, "bench")
import torch
import absparse as ab
from decode_bench import BUDGET, LOCAL, SINK, Paged, Timer, layout_for

timer = Timer(20)
gen = torch.Generator().manual_seed(0)
for batch, length in ((1, 32768), (1, 131072), (8, 131072), (1, 524288)):
    cache = Paged(batch, length, gen)
    for name in ("mixed-minmax-int4c", "uniform16-minmax-int4c"):
        layout = layout_for(name, cache)
        s, sc = layout.new_summary_cache(cache.num_pages, 128, device="cuda")
        zero = torch.zeros_like(cache.seq_lens)
        ab.update_centroids(cache.k, cache.page_table, cache.seq_lens, zero, layout, s, sc)
        start = cache.seq_lens - 1
        sel = dict(sink_tokens=SINK, local_tokens=LOCAL)
        res = {}
        for var, env in (("new", {}), ("old", {"ABSPARSE_EXP_UNSTAGED": "1", "ABSPARSE_EXP_NO_VALUE_BINS": "1"})):
            for k in ("ABSPARSE_EXP_UNSTAGED", "ABSPARSE_EXP_NO_VALUE_BINS"):
                os.environ.pop(k, None)
            os.environ.update(env)
            upd = timer.time(lambda: ab.update_centroids(cache.k, cache.page_table, cache.seq_lens, start, layout, s, sc, max_new_tokens=1))
            selt = timer.time(lambda: ab.select_blocks(cache.q, s, sc, cache.page_table, cache.seq_lens, layout, BUDGET, **sel))
            idx = ab.select_blocks(cache.q, s, sc, cache.page_table, cache.seq_lens, layout, BUDGET, **sel)
            res[var] = (upd, selt, idx)
            print(f"B{batch} L{length} {name} {var}: update {upd:.1f} us, select {selt:.1f} us", flush=True)
        same = all(torch.equal(a, b) for a, b in zip(res["new"][2], res["old"][2]))
        print(f"  same lists new/old: {same}", flush=True)
    del cache
    torch.cuda.empty_cache()

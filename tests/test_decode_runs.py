"""The decode runs of a batch decoded together over one copy of the prefill
(absparse.eval.decode_runs), against the path the evaluation took before: one stacked copy of the
prefill per run (``AbsparseCache.stack``), decoded run by run.

Cache level (random K/V, no model): every decode step's attention output equal bit for bit, the
same selection statistics, a frozen run left untouched, the base caches unchanged, and no page
written by two runs. Evaluation level (the embedded model): ``evaluate`` gives the records and
statistics of the per-run loop, kept here as the reference.
"""
import pytest
import torch

import absparse
from absparse.eval.models import have_eval_dependencies

_missing = have_eval_dependencies()
pytestmark = pytest.mark.skipif(_missing is not None, reason=f"evaluation stack: {_missing}")

P, HK, G, D = 64, 2, 3, 32                     # page, KV heads, query heads per KV head, head dim


def _layouts(gen):
    """Three two-layer layouts of different kinds (layer 0 dense in the first)."""
    scale = torch.rand(HK, D, generator=gen) * 0.1 + 0.05                   # [Hk, D] > 0
    zero = -torch.rand(HK, D, generator=gen) * 3                            # [Hk, D]
    int4c = absparse.LayerLayout([8, 32], P, "minmax", "int4c", channel_scale=scale,
                                 channel_zero=zero)
    return [absparse.ModelLayout([None, int4c]),
            absparse.ModelLayout([absparse.LayerLayout([16, 16], P, "mean", "bf16")] * 2),
            absparse.ModelLayout([absparse.LayerLayout([64, 8], P, "cuboid", "fp32")] * 2)]


def _bases(lens, gen):
    """One prefilled two-layer AbsparseCache per length (random K/V [1, Hk, n, D])."""
    from absparse.hf import AbsparseCache

    out = []
    for n in lens:
        cache = AbsparseCache(2, None, page_size=P)
        for layer in cache.layers:
            layer.update(torch.randn(1, HK, n, D, generator=gen),
                         torch.randn(1, HK, n, D, generator=gen))
        out.append(cache)
    return out


# Lengths: a full last page (64), partial ones below one page (37) and above (100, 150); 30 steps
# take 37 and 100 across a page boundary and open a page after 64.
LENS = [64, 100, 37, 150]
STEPS = 30


@pytest.mark.parametrize("runs_per_pass", [2, 6])
def test_runs_decode_like_one_stacked_cache_per_run(runs_per_pass):
    """Six runs in passes of 2 (shared summaries kept across passes, private pages reused) or in
    one pass: runs "b" and "b2" share a layout, run "a"'s fp32 comparison summaries are run "f"'s
    own."""
    from absparse.eval.decode_runs import BatchPool, Run
    from absparse.hf import AbsparseCache

    gen = torch.Generator().manual_seed(0)
    bases = _bases(LENS, gen)
    before = [[(l.k_pool.clone(), l.v_pool.clone()) for l in b.layers] for b in bases]
    lay = _layouts(gen)
    fp32 = absparse.ModelLayout([None, absparse.LayerLayout([8, 32], P, "minmax", "fp32")])
    runs = [Run("dense"), Run("a", 48, lay[0], compare_format="fp32"), Run("b", 0.25, lay[1]),
            Run("c", 100, lay[2], compare_format="bf16"), Run("b2", 40, lay[1]),
            Run("f", 48, fp32)]
    pool = BatchPool(bases, runs, STEPS, runs_per_pass, sink_tokens=8, local_tokens=16)
    B = len(LENS)
    done = 0
    for cache in pool.passes():
        refs = [AbsparseCache.stack(bases, r.layout, r.budget, 8, 16,
                                    compare_format=r.compare_format) for r in cache.runs]
        freeze = {1: 11} if done == 0 else {}     # the pass's second run is over after step 11
        for t in range(STEPS):
            for i in range(2):
                k = torch.randn(len(refs) * B, HK, 1, D, generator=gen)      # [R * B, Hk, 1, D]
                v = torch.randn(len(refs) * B, HK, 1, D, generator=gen)
                q = torch.randn(len(refs) * B, HK * G, D, generator=gen)     # [R * B, Hq, D]
                cache.layers[i].update(k, v)
                out = cache.layers[i].attend(q, 0.2)
                for r, ref in enumerate(refs):
                    rows = slice(r * B, (r + 1) * B)
                    if t > freeze.get(r, STEPS):
                        assert (out[rows] == 0).all()                          # frozen
                        continue
                    ref.layers[i].update(k[rows], v[rows])
                    assert torch.equal(out[rows], ref.layers[i].attend(q[rows], 0.2)), \
                        (cache.runs[r].name, t, i)
            for r, last in freeze.items():
                if t == last:
                    cache.freeze(r)
        for r, (run, c, ref) in enumerate(zip(cache.runs, cache.caches, refs)):
            assert c.seq_lens == ref.seq_lens == [n + freeze.get(r, STEPS - 1) + 1 for n in LENS]
            for layer, ref_layer in zip(c.layers, ref.layers):
                assert layer.stats == ref_layer.stats, run.name
            if run.compare_format is not None:
                assert c.selection_disagreement() == ref.selection_disagreement() is not None
        # Every page a run wrote (past the bases' pages) is its own.
        prefix = sum(b.layers[0]._num_used for b in bases)
        for i in range(2):
            owned = [set(c.layers[i].page_table[c.layers[i].page_table >= prefix].tolist())
                     for c in cache.caches]
            assert sum(map(len, owned)) == len(set().union(*owned))
        done += len(cache.runs)
    assert done == len(runs)
    # The bases' pools were copied, not written.
    for b, saved in zip(bases, before):
        for layer, (k, v) in zip(b.layers, saved):
            assert torch.equal(layer.k_pool, k) and torch.equal(layer.v_pool, v)


def test_region_holds_exactly_the_pages_a_run_can_open():
    from absparse.eval.decode_runs import _region

    # P = 64, 8 steps: row 100 copies page 1 (64..99) and ends at 108 inside it; row 128 has no
    # partial page and opens page 2; row 60 copies page 0 and opens page 1 at token 64.
    assert _region([100, 128, 60], 8, 64) == (2, 4)
    assert _region([64], 0, 64) == (0, 0)
    assert _region([1], 200, 64) == (1, 1 + 3)                   # 1 + 200 tokens: pages 1, 2, 3


def test_batch_pool_rejects_a_layout_of_another_page_size():
    from absparse.eval.decode_runs import BatchPool, Run

    gen = torch.Generator().manual_seed(1)
    other = absparse.ModelLayout([absparse.LayerLayout([16, 16], 32, "mean", "bf16")] * 2)
    with pytest.raises(ValueError, match="page_size 32"):
        BatchPool(_bases([40], gen), [Run("x", 16, other)], 4, 1)


# --- the evaluation -------------------------------------------------------------------------------
def _reference_evaluate(model, tok, samples, cal, budgets, methods, batch_size):
    """The evaluation loop before absparse.eval.decode_runs: per batch, every run on its own
    stacked copy of the prefill (records and selection statistics only)."""
    from absparse.eval.evaluation import (_batches, _decode, _prefill, _prompt_ids, parse_method)
    from absparse.eval.model_calibration import budget_key
    from absparse.eval.tasks import score_output
    from absparse.hf import AbsparseCache, use_absparse

    use_absparse(model)
    records, stats = [], {}
    for idx in _batches(samples, batch_size):
        plans, bases, firsts = [], [], []
        for i in idx:
            ids, forced = _prompt_ids(tok, samples[i], 16)
            bases.append(_prefill(model, ids[:, :-1], cal.page_size))
            firsts.append(int(ids[0, -1]))
            plans.append({"forced": forced, "prompt_tokens": ids.shape[1],
                          "steps": len(forced) if forced else samples[i].max_new_tokens})
        runs = [("dense", None, None)] + [(m, b, parse_method(m).layout(cal, b, 32))
                                          for b in budgets for m in methods]
        for name, budget, layout in runs:
            fmt = None if layout is None else next(l.format for l in layout if l is not None)
            compare = "fp32" if fmt is not None and fmt.startswith("int") else None
            cache = AbsparseCache.stack(bases, layout, budget, compare_format=compare)
            gen, nll = _decode(model, cache, torch.tensor(firsts), plans, tok.eos_token_id)
            bkey = None if budget is None else budget_key(budget)
            if compare is not None:
                st = stats.setdefault(name, {}).setdefault(bkey, {"selected": 0, "differ": 0})
                for layer in cache.layers:
                    st["selected"] += layer.stats["selected"]
                    st["differ"] += layer.stats["differ"]
            for j, i in enumerate(idx):
                s = samples[i]
                rec = {"id": s.id, "task": s.task, "length": s.length, "depth": s.depth,
                       "prompt_tokens": plans[j]["prompt_tokens"], "method": name,
                       "budget": bkey}
                if s.task == "ppl":
                    rec.update(nll=nll[j], tokens=len(plans[j]["forced"]))
                else:
                    text = tok.decode(gen[j], skip_special_tokens=True)
                    rec.update(score=score_output(s, text), output=text)
                records.append(rec)
    return records, stats


@pytest.mark.full
def test_evaluate_gives_the_records_of_the_per_run_loop(lm):
    """Two batches of 4 rows (greedy rows, then ppl rows), the 3 runs in passes of 2 and 1 run,
    in one process and in two forked workers: the same records and statistics (a quantized
    format's) as the per-run loop; the calibration's tables too do not depend on the workers.
    Batches have 4 rows or more: there the model's float32 matmuls give a row the same bits
    whatever the batch on one thread (MKL; a batch of 1 to 3 rows rounds differently), so merging
    runs changes nothing."""
    from absparse.eval.evaluation import evaluate
    from absparse.eval.model_calibration import calibrate
    from absparse.eval.tasks import eval_suite

    model, tok = lm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        count = lambda s: len(tok(s, add_special_tokens=False).input_ids)
        cal = calibrate(model, tok, 2, 256, [64], num_probes=8, workers=2)
        alone = calibrate(model, tok, 2, 256, [64], num_probes=8, workers=1)
        assert torch.equal(cal.recall["minmax"]["64"], alone.recall["minmax"]["64"])
        assert torch.equal(cal.ranges["cuboid"], alone.ranges["cuboid"])
        samples = eval_suite(count, [256], tasks=["passkey", "vartrack"], depths=[0.3, 0.7],
                             ppl_samples=4, ppl_length=256)
        methods = ["quest", "ab-quest-int4c"]
        ref_records, ref_stats = _reference_evaluate(model, tok, samples, cal, [64], methods, 4)
        assert {r["task"] for r in ref_records} == {"passkey", "vartrack", "ppl"}
        assert ref_stats["ab-quest-int4c"]["64"]["selected"] > 0
        for workers in (1, 2):
            res = evaluate(model, tok, samples, cal, [64], methods, batch_size=4,
                           rows_per_pass=8, workers=workers)
            assert res.meta["workers"] == workers
            assert res.records == ref_records, workers
            assert res.stats == ref_stats, workers
    finally:
        torch.set_num_threads(threads)
        model.set_attn_implementation("sdpa")

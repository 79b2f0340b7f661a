"""Prefill modes of the transformers integration (absparse.hf.PrefillConfig).

A tiny random Llama (2 layers, 4 query / 2 KV heads, D 16, float32) built from its config: no
weights to load, a forward of two 200-token sequences takes well under a second. Its weights are
drawn with std 0.25 (transformers' default 0.02 gives near-uniform attention). Block size 32 keeps
several blocks per sequence; FlexPrefill's min budget 64, PBS-Attn's 64-token segments and the
coverages below make the lists really sparse (densities 0.57-0.81 measured).

Tolerance of the logits against transformers' SDPA forward: both are float32 forwards of the same
math, the op accumulates in float64 and rounds once, SDPA accumulates in float32. Measured max
difference 1.7e-6 of max|logit|; the bound 1e-5 * max|logit| leaves room for other BLAS builds
while a wrong block or a wrong causal test (an error of the order of the logits) fails it.

The same check in bf16 with D 64 and 64-token blocks (what the CUDA kernels take) runs on the CPU
and, where absparse has its CUDA kernels and a GPU is present, on CUDA tensors: there the mask
builders and the prefill kernel run on the GPU inside transformers' forward.
"""
import importlib.util
import math

import pytest
import torch

import absparse

# Only transformers: the models here are built from configs (no GGUF, no evaluation stack).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="transformers is not installed")

BLOCK = 32
LENGTH = 200                      # not a multiple of the block: a partial last block
# Coverage 0.5: a random model's attention is flat, 0.9 would list (almost) every block.
SPARSE = {"flexprefill": dict(block_size=BLOCK, min_budget=64, gamma=0.5),
          "pbs": dict(block_size=BLOCK, segment_size=64, threshold=0.5)}


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from absparse import hf

    hf.register()
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=1024, initializer_range=0.25)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, LENGTH))
    return model, ids


def _forward(model, ids, cache=None, impl="absparse", **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=cache is not None, **kwargs)
    model.set_attn_implementation("sdpa")
    return out.logits


def _cache(model, mode, **kwargs):
    from absparse.hf import AbsparseCache, PrefillConfig

    return AbsparseCache(model.config, None, page_size=16,
                         prefill=PrefillConfig(mode, **kwargs))


def _close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def _record_prefill(monkeypatch):
    """Every call of PagedLayer.attend_prefill as (layer, query, key, value, scaling, out)."""
    from absparse.hf import PagedLayer

    calls = []
    original = PagedLayer.attend_prefill

    def recording(self, query, key, value, scaling):
        out = original(self, query, key, value, scaling)
        calls.append((self, query.clone(), key.clone(), value.clone(), scaling, out.clone()))
        return out

    monkeypatch.setattr(PagedLayer, "attend_prefill", recording)
    return calls


def _masked_attention64(q, k, v, allowed, scaling):
    """float64 attention of one sequence and head: q [S, D], k, v [S, D] (original order),
    allowed bool [S, S] (query t, key position p) -> [S, D]; rows with nothing allowed give 0."""
    logits = (q.double() @ k.double().T) * scaling                  # [S, S]
    logits = logits.masked_fill(~allowed, -math.inf)
    w = torch.softmax(logits, -1).nan_to_num(0.0)                   # [S, S]
    return w @ v.double()


def _allowed(indices, count, rows_block, block, length):
    """bool [S, S]: query t may see stored key row r iff r's block is listed for t's block;
    ``rows_block`` [S] is the block of each key column (its stored row // block)."""
    width = max(indices.shape[1], -(-length // block)) + 1      # a column per key block (lists
    listed = torch.zeros(indices.shape[0], width, dtype=torch.bool)  # may be narrower than that)
    for i in range(indices.shape[0]):
        listed[i, indices[i, :count[i]].long()] = True
    t_block = torch.arange(length) // block
    return listed[t_block][:, rows_block]                            # [S, S]


def _sparse_prefill_calls(model, ids, mode, config, monkeypatch):
    """A forward of ``ids`` (2 layers) in prefill ``mode``: finite logits, both layers' prefill
    recorded, densities in (0, 1] and some below 1 (the lists really are sparse). Returns the
    recorded calls."""
    calls = _record_prefill(monkeypatch)
    cache = _cache(model, mode, **config)
    logits = _forward(model, ids, cache)
    assert torch.isfinite(logits).all()
    assert len(calls) == 2
    dens = cache.prefill_densities()
    assert all(0 < d <= 1 for d in dens) and min(dens) < 1, dens
    return calls


def _assert_matches_lists(call, mode, block, config, length, tol):
    """One recorded prefill call: the builder run again on the recorded q / k / v (same device,
    same dtype) gives the layer's density, and every output row equals float64 attention of the
    ORIGINAL-order q/k/v under the mask its lists (and, for pbs, the key permutation) expand to."""
    from absparse.moa import band_prefill_blocks
    from absparse.prefill_masks import flexprefill_mask, pbs_mask, pbs_permute

    layer, query, key, value, scaling, out = call
    b, hq, s, d = query.shape
    hk = key.shape[1]
    q = query.transpose(1, 2).reshape(b * s, hq, d)                  # packed [T, Hq, D]
    k = key.transpose(1, 2).reshape(b * s, hk, d)
    v = value.transpose(1, 2).reshape(b * s, hk, d)
    cu = (torch.arange(b + 1, dtype=torch.int32) * s).to(q.device)
    if mode == "flexprefill":
        idx, cnt, info = flexprefill_mask(q, k, cu, block, gamma=config["gamma"],
                                          min_budget=config["min_budget"], scale=scaling)
        pos = None
    elif mode == "window":  # MoA's band at the prompt length, one list per KV head
        w = layer.window
        lens = torch.full((b,), s, dtype=torch.int64)
        idx, cnt = band_prefill_blocks(lens, w.const.cpu(), w.slope.cpu(), w.den, w.sink_tokens,
                                       block, block)
        nq = cnt.shape[2]
        info = {"density": (cnt.sum(2).double() / (nq * (nq + 1) // 2)).float()}
        pos = None
    else:
        seg = config["segment_size"]
        k_perm, _, pos = pbs_permute(q, k, v, cu, block, seg, scale=scaling)
        idx, cnt, info = pbs_mask(q, k_perm, cu, pos, block, seg, threshold=config["threshold"],
                                  scale=scaling)
        pos = pos.cpu()
    assert torch.equal(layer.prefill_density, info["density"])
    idx, cnt, q, k, v, out = (t.cpu() for t in (idx, cnt, q, k, v, out))
    group = hq // idx.shape[1]
    for seq in range(b):
        rows = slice(seq * s, (seq + 1) * s)
        for h in range(hq):
            lh, kh = h // group, h // (hq // hk)
            if pos is None:
                col_block = torch.arange(s) // block                 # key p is stored at row p
            else:                                                    # key p is stored at row r
                inv = torch.argsort(pos[rows, kh].long())            # with pos[r] = p
                col_block = inv // block
            allowed = _allowed(idx[seq, lh], cnt[seq, lh], col_block, block, length)
            allowed &= torch.ones(s, s, dtype=torch.bool).tril()     # causal on positions
            ref = _masked_attention64(q[rows, h], k[rows, kh], v[rows, kh], allowed, scaling)
            err = (out[seq, :, h].double() - ref).abs().max().item()
            assert err <= tol, (seq, h, err)


@pytest.mark.parametrize("mode,kwargs", [("causal", dict(block_size=BLOCK)),
                                         ("causal", dict(block_size=64)),
                                         # min budget >= L: FlexPrefill lists every block
                                         ("flexprefill", dict(block_size=BLOCK,
                                                              min_budget=LENGTH))])
def test_every_causal_block_equals_sdpa_forward(tiny, mode, kwargs):
    model, ids = tiny
    ref = _forward(model, ids, impl="sdpa")
    cache = _cache(model, mode, **kwargs)
    out = _forward(model, ids, cache)
    assert _close(out, ref), (out - ref).abs().max().item()
    assert cache.prefill_densities() == [1.0, 1.0]


def test_dense_mode_records_no_density(tiny):
    model, ids = tiny
    cache = _cache(model, "dense")
    assert torch.equal(_forward(model, ids, cache), _forward(model, ids, impl="sdpa"))
    assert cache.prefill_densities() == [None, None]


@pytest.mark.parametrize("mode", ["flexprefill", "pbs"])
def test_sparse_prefill_matches_masked_float64_attention(tiny, monkeypatch, mode):
    """The layer output equals float64 attention of the ORIGINAL-order q/k/v under the mask
    that the builder's lists (and, for pbs, the key permutation) expand to."""
    model, ids = tiny
    calls = _sparse_prefill_calls(model, ids, mode, SPARSE[mode], monkeypatch)
    _assert_matches_lists(calls[0], mode, BLOCK, SPARSE[mode], LENGTH,
                          tol=1e-5 * max(calls[0][3].abs().max().item(), 1.0))


# bf16, D 64 and 64-token blocks: what the CUDA kernels take (the CPU runs the same case, so the
# check itself is exercised where no GPU is present).
DEVICE_LENGTH = 520               # 9 blocks of 64, the last partial
DEVICE_SPARSE = {"flexprefill": dict(block_size=64, min_budget=64, gamma=0.5),
                 "pbs": dict(block_size=64, segment_size=128, threshold=0.5)}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["flexprefill", "pbs"])
def test_bf16_sparse_prefill_on_each_device_matches_masked_float64_attention(device, mode,
                                                                              monkeypatch):
    """The transformers prefill modes on bf16 tensors of `device` (on CUDA: the mask builders and
    the prefill kernel on the GPU): each layer's output equals float64 attention under the mask
    its lists expand to. Tolerance: the output is rounded to bf16 once (relative 2^-9) after a
    float32 / float64 accumulation; 2^-8 of max|v| leaves a 2x margin, while a wrong block or
    causal test gives errors of the order of |v|."""
    if device == "cuda" and not (torch.cuda.is_available()
                                 and getattr(absparse._C, "has_cuda", False)):
        pytest.skip("needs a CUDA device and absparse's CUDA kernels")
    from transformers import LlamaConfig, LlamaForCausalLM

    from absparse import hf

    hf.register()
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=1024, initializer_range=0.25)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval().to(device, torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, DEVICE_LENGTH)).to(device)
    calls = _sparse_prefill_calls(model, ids, mode, DEVICE_SPARSE[mode], monkeypatch)
    for call in calls:
        _assert_matches_lists(call, mode, 64, DEVICE_SPARSE[mode], DEVICE_LENGTH,
                              tol=2 ** -8 * max(call[3].abs().max().item(), 1.0))


def test_window_prefill_matches_masked_float64_attention(tiny, monkeypatch):
    """Prefill mode 'window' with a MoA plan attached: each layer's output equals float64
    attention under the causal mask of its band lists (sink + span per KV head, in whole blocks),
    its density is the listed share of the causal blocks; without a plan it raises."""
    from absparse.hf import AbsparseCache, PrefillConfig
    from absparse.moa import MoAPlan, attach

    model, ids = tiny
    # Layer 0: 40 tokens / L/4; layer 1: L/8 / 10 tokens; sink 16 (blocks of 32: half a block).
    plan = MoAPlan(torch.tensor([[8 * 40, 0], [0, 8 * 10]]), torch.tensor([[0, 2], [1, 0]]),
                   sink_tokens=16, block=32)
    calls = _record_prefill(monkeypatch)
    cache = AbsparseCache(model.config, None, page_size=64,
                          prefill=PrefillConfig("window", block_size=BLOCK))
    attach(cache, plan)
    assert torch.isfinite(_forward(model, ids, cache)).all()
    assert len(calls) == 2
    dens = cache.prefill_densities()
    assert all(0 < d < 1 for d in dens), dens
    for call in calls:
        _assert_matches_lists(call, "window", BLOCK, {}, LENGTH,
                              tol=1e-5 * max(call[3].abs().max().item(), 1.0))
    bare = AbsparseCache(model.config, None, page_size=64,
                         prefill=PrefillConfig("window", block_size=BLOCK))
    with pytest.raises(ValueError, match="prefill mode 'window' needs MoA windows"):
        _forward(model, ids, bare)


def test_pbs_cache_keeps_original_order(tiny, monkeypatch):
    """After a pbs prefill every layer's paged K/V are the layer's keys/values as the model
    computed them (original order); layer 0's equal the dense prefill's bit for bit."""
    model, ids = tiny
    calls = _record_prefill(monkeypatch)
    cache = _cache(model, "pbs", **SPARSE["pbs"])
    _forward(model, ids, cache)
    for layer, _, key, value, _, _ in calls:
        k, v = layer.dense_kv()
        assert torch.equal(k, key) and torch.equal(v, value)
    dense = _cache(model, "dense")
    _forward(model, ids, dense)
    for got, want in zip(cache.layers[0].dense_kv(), dense.layers[0].dense_kv()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["flexprefill", "pbs"])
def test_decode_after_sparse_prefill(tiny, mode):
    """A dense decode step reads the prefilled pages: the same logits as transformers' SDPA over a
    DynamicCache holding the same K/V; a sparse-decode generation runs after it."""
    from transformers import DynamicCache

    from absparse.hf import AbsparseCache, PrefillConfig

    model, ids = tiny
    cache = _cache(model, mode, **SPARSE[mode])
    _forward(model, ids, cache)
    stock = DynamicCache()
    for i, layer in enumerate(cache.layers):
        stock.update(*layer.dense_kv(), i)
    nxt = torch.tensor([[5], [7]])
    pos = torch.full((2, 1), LENGTH)
    ours = _forward(model, nxt, cache, position_ids=pos)
    ref = _forward(model, nxt, stock, impl="sdpa", position_ids=pos)
    assert _close(ours, ref), (ours - ref).abs().max().item()

    hk = model.config.num_key_value_heads
    layout = absparse.ModelLayout([absparse.LayerLayout([16] * hk, 16, "minmax", "fp32")] * 2)
    cache = AbsparseCache(model.config, layout, token_budget=64,
                          prefill=PrefillConfig(mode, **SPARSE[mode]))
    model.set_attn_implementation("absparse")
    with torch.no_grad():
        gen = model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False,
                             min_new_tokens=4)
    model.set_attn_implementation("sdpa")
    assert gen.shape == (2, LENGTH + 4)
    assert cache.seq_lens == [LENGTH + 3] * 2
    assert all(0 < d < 1 for d in cache.prefill_densities())


@pytest.mark.parametrize("kwargs,name", [
    (dict(mode="flex"), "mode"), (dict(mode="flexprefill", block_size=0), "block_size"),
    (dict(mode="pbs", gamma=0.0), "gamma"), (dict(mode="pbs", gamma=1.5), "gamma"),
    (dict(mode="flexprefill", tau=-0.1), "tau"), (dict(mode="flexprefill", tau=math.nan), "tau"),
    (dict(mode="flexprefill", min_budget=-1), "min_budget"),
    (dict(mode="flexprefill", min_budget=2.5), "min_budget"),
    (dict(mode="flexprefill", max_budget=512), "max_budget"),
    (dict(mode="pbs", segment_size=100), "segment_size"),
    (dict(mode="pbs", threshold=0), "threshold"), (dict(mode="pbs", threshold=True), "threshold")])
def test_bad_prefill_config_raises(kwargs, name):
    from absparse.hf import PrefillConfig

    with pytest.raises(ValueError, match=f"PrefillConfig: {name}: expected"):
        PrefillConfig(**kwargs)


def test_prefill_attended_elsewhere_leaves_no_pending_sparse_prefill(tiny):
    """A sparse-mode prefill attended by SDPA (another implementation) must not make the next
    multi-token step, attended by absparse, run the sparse prefill on the gathered K/V."""
    model, ids = tiny
    cache = _cache(model, "pbs", **SPARSE["pbs"])
    _forward(model, ids[:, :150], cache, impl="sdpa")
    ours = _forward(model, ids[:, 150:], cache,
                    position_ids=torch.arange(150, LENGTH).expand(2, -1))
    ref = _forward(model, ids, impl="sdpa")[:, 150:]
    assert _close(ours, ref), (ours - ref).abs().max().item()

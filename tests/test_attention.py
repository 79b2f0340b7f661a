"""sparse_decode and dense_decode against the float64 reference (tolerances: see conftest.py).

Every case poisons the cache outside tokens [0, L_b) with NaN (unused pool pages and the rest of
each sequence's last page), and unused page-table entries hold -1 or garbage, so an
implementation that reads them produces NaN (caught by the NaN-position check) or crashes.
"""
import math

import pytest
import torch

import reference as ref
from cases import (QUICK_CASES, Case, case_params, default_max_blocks, make_inputs,
                   random_block_lists, strided_copy)
from conftest import (assert_bitwise_equal, assert_lse_close, assert_out_close, lib_layout,
                      round_once, value_max)


def _block_sizes(case):
    return torch.tensor(case.block_sizes, dtype=torch.int32)


def _sparse(ab, inp, case, idx, cnt, **kw):
    return ab.sparse_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens,
                            _block_sizes(case), idx, cnt, **kw)


# ------------------------------------------------------------------------------------------------
# Reference self-checks (no library needed)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", case_params(QUICK_CASES[:8]))
def test_reference_sparse_all_blocks_is_dense(case):
    inp = make_inputs(case)
    M = default_max_blocks(inp.page_table.shape[1], case.page_size, case.block_sizes)
    idx, cnt = random_block_lists(case, 0, M, fill="all")
    out_s, lse_s = ref.sparse_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                     inp.seq_lens, case.block_sizes, idx, cnt)
    out_d, lse_d = ref.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens)
    assert torch.equal(out_s, out_d) and torch.equal(lse_s, lse_d)
    assert not torch.isnan(out_d).any()


@pytest.mark.parametrize("case", case_params(QUICK_CASES[8:14]))
def test_reference_two_formulations_agree(case):
    """Expanded-sequence mask vs direct per-block gather from the pages."""
    inp = make_inputs(case)
    M = default_max_blocks(inp.page_table.shape[1], case.page_size, case.block_sizes)
    idx, cnt = random_block_lists(case, 1, M)
    a = ref.sparse_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens,
                          case.block_sizes, idx, cnt)
    b = ref.sparse_decode_blockwise(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens,
                                    case.block_sizes, idx, cnt)
    assert torch.equal(torch.isinf(a[1]), torch.isinf(b[1]))
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    fin = torch.isfinite(a[1])
    torch.testing.assert_close(a[1][fin], b[1][fin], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Library vs reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", case_params())
def test_sparse_matches_reference(ab, case):
    inp = make_inputs(case)
    M = default_max_blocks(inp.page_table.shape[1], case.page_size, case.block_sizes) + 2
    idx, cnt = random_block_lists(case, case.seed, M)
    if case.noncontig:
        idx, cnt = strided_copy(idx), strided_copy(cnt)
    out, lse = _sparse(ab, inp, case, idx, cnt, return_lse=True)   # library first, then reference
    again = _sparse(ab, inp, case, idx, cnt, return_lse=True)
    assert_bitwise_equal(again[0], out, "rerun out")
    assert_bitwise_equal(again[1], lse, "rerun lse")
    vmax = value_max(inp.v_cache)
    r_out, r_lse = ref.sparse_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                     inp.seq_lens, case.block_sizes, idx, cnt)
    assert_out_close(out, r_out, case.dtype, vmax, "out vs reference")
    assert_lse_close(lse, r_lse, "lse vs reference")
    # Dense attention over the explicitly gathered attended tokens (second formulation).
    d_out, d_lse = ref.sparse_decode_blockwise(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                               inp.seq_lens, case.block_sizes, idx, cnt)
    assert_out_close(out, d_out, case.dtype, vmax, "out vs dense on the attended tokens")
    assert_lse_close(lse, d_lse, "lse vs dense on the attended tokens")


@pytest.mark.parametrize("case", case_params())
def test_dense_matches_reference_and_full_sparse(ab, case):
    inp = make_inputs(case)
    out, lse = ab.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens,
                               return_lse=True)
    M = default_max_blocks(inp.page_table.shape[1], case.page_size, case.block_sizes)
    idx, cnt = random_block_lists(case, 0, M, fill="all")
    s_out, s_lse = _sparse(ab, inp, case, idx, cnt, return_lse=True)
    vmax = value_max(inp.v_cache)
    r_out, r_lse = ref.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens)
    assert_out_close(out, r_out, case.dtype, vmax, "dense out")
    assert_lse_close(lse, r_lse, "dense lse")
    assert_out_close(s_out, r_out, case.dtype, vmax, "sparse(all blocks) out")
    assert_lse_close(s_lse, r_lse, "sparse(all blocks) lse")


@pytest.mark.parametrize("case", case_params(QUICK_CASES[::2]))
def test_pipeline_end_to_end(ab, case):
    """Library update -> select -> sparse vs the reference pipeline; budget >= L equals dense."""
    inp = make_inputs(case)
    layout = lib_layout(ab, inp.ref_layout)
    s, sc = layout.new_summary_cache(inp.num_pages, case.head_dim)
    zero = torch.zeros(len(case.seq_lens), dtype=torch.int32)
    ab.update_centroids(inp.k_cache, inp.page_table, inp.seq_lens, zero, layout, s, sc)
    kw = dict(sink_tokens=case.sink, local_tokens=case.local, group_reduce=case.group_reduce)
    idx, cnt = ab.select_blocks(inp.q, s, sc, inp.page_table, inp.seq_lens, layout, case.budget,
                                **kw)
    out, lse = ab.sparse_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens,
                                layout, idx, cnt, return_lse=True)
    rs, rsc = ref.update_centroids(inp.k_cache, inp.page_table, inp.seq_lens, zero,
                                   inp.ref_layout, torch.zeros_like(s),
                                   None if sc is None else torch.zeros_like(sc))
    ridx, rcnt = ref.select_blocks(inp.q, rs, rsc, inp.page_table, inp.seq_lens, inp.ref_layout,
                                   case.budget, **kw)
    assert torch.equal(idx, ridx) and torch.equal(cnt, rcnt)
    r_out, r_lse = ref.sparse_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                     inp.seq_lens, case.block_sizes, ridx, rcnt)
    vmax = value_max(inp.v_cache)
    assert_out_close(out, r_out, case.dtype, vmax, "pipeline out")
    assert_lse_close(lse, r_lse, "pipeline lse")
    # budget >= every L: the same as dense attention
    idx, cnt = ab.select_blocks(inp.q, s, sc, inp.page_table, inp.seq_lens, layout, 1 << 30, **kw)
    full = ab.sparse_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens,
                            layout, idx, cnt)
    dense = ab.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens)
    d_out, _ = ref.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens)
    assert_out_close(full, d_out, case.dtype, vmax, "budget >= L out")
    assert_out_close(dense, d_out, case.dtype, vmax, "dense out")


# ------------------------------------------------------------------------------------------------
# out=, lse, edge cases
# ------------------------------------------------------------------------------------------------

def _edge_case(**kw):
    base = dict(seed=31, dtype=torch.float16, head_dim=64, group=2, block_sizes=(16, 8),
                page_size=32, seq_lens=(0, 1, 16, 31, 32, 33, 100), summary="mean", format="fp32")
    base.update(kw)
    return Case(**base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_out_argument(ab, dtype):
    case = _edge_case(dtype=dtype)
    inp = make_inputs(case)
    M = default_max_blocks(inp.page_table.shape[1], case.page_size, case.block_sizes)
    idx, cnt = random_block_lists(case, 5, M)
    expect = _sparse(ab, inp, case, idx, cnt)
    assert isinstance(expect, torch.Tensor) and expect.shape == inp.q.shape
    out = torch.full_like(inp.q, float("nan"))
    got = _sparse(ab, inp, case, idx, cnt, out=out)
    assert got is out
    assert_bitwise_equal(out, expect, "sparse out=")
    # strided out (contiguous last dim): [B, Hq, D] view of a [Hq, B, D + 8] buffer
    B, Hq, D = inp.q.shape
    buf = torch.full((Hq, B, D + 8), 5.0, dtype=dtype)
    view = buf[:, :, :D].transpose(0, 1)
    got, lse = _sparse(ab, inp, case, idx, cnt, out=view, return_lse=True)
    assert got is view
    assert_bitwise_equal(view.contiguous(), expect, "sparse strided out=")
    assert (buf[:, :, D:] == 5.0).all()                          # padding untouched
    dense = ab.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens)
    out = torch.empty_like(inp.q)
    got = ab.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens, out=out)
    assert got is out
    assert_bitwise_equal(out, dense, "dense out=")


def test_zero_length_sequences(ab):
    """L = 0: out 0 and lse -inf, for sparse and dense; L = 1 attends its single token."""
    case = _edge_case(seq_lens=(0, 1, 0))
    inp = make_inputs(case)
    idx = torch.full((3, 2, 4), -1, dtype=torch.int32)
    cnt = torch.zeros(3, 2, dtype=torch.int32)
    for out, lse in (_sparse(ab, inp, case, idx, cnt, return_lse=True),
                     ab.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                     inp.seq_lens, return_lse=True)):
        assert (out[0] == 0).all() and (out[2] == 0).all()
        assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[2]).all()
        # L = 1: softmax over one token is 1 -> out = v of that token (rounded once), lse = logit
        page = int(inp.page_table[1, 0])
        v0 = inp.v_cache[page, 0]                                # [Hk, D]
        assert torch.equal(out[1], v0.repeat_interleave(2, dim=0))
        k0 = inp.k_cache[page, 0].to(torch.float64).repeat_interleave(2, dim=0)  # [Hq, D]
        logit = (inp.q[1].to(torch.float64) * k0).sum(-1) / 8.0  # s = 1/sqrt(64) exactly
        torch.testing.assert_close(lse[1].to(torch.float64), logit, rtol=0, atol=1e-5)


def test_empty_attended_set(ab):
    """L > 0 but no listed block and no partial tail: out 0, lse -inf."""
    case = _edge_case(seq_lens=(32, 64), block_sizes=(16, 32))
    inp = make_inputs(case)
    idx = torch.full((2, 2, 4), -1, dtype=torch.int32)
    cnt = torch.zeros(2, 2, dtype=torch.int32)
    out, lse = _sparse(ab, inp, case, idx, cnt, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_empty_batch(ab):
    q = torch.randn(0, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 16, 2, 64, dtype=torch.bfloat16)
    pt = torch.zeros(0, 3, dtype=torch.int32)
    L = torch.zeros(0, dtype=torch.int32)
    out, lse = ab.sparse_decode(q, k, k, pt, L, torch.tensor([16, 8], dtype=torch.int32),
                                torch.zeros(0, 2, 6, dtype=torch.int32),
                                torch.zeros(0, 2, dtype=torch.int32), return_lse=True)
    assert out.shape == (0, 4, 64) and out.dtype == torch.bfloat16 and lse.shape == (0, 4)
    out, lse = ab.dense_decode(q, k, k, pt, L, return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


def test_unattended_tokens_are_never_read(ab):
    """NaN in every key/value of the blocks not listed: the output stays finite and correct."""
    case = _edge_case(dtype=torch.bfloat16, seq_lens=(100, 257, 64), page_size=64,
                      block_sizes=(16, 64), group=3)
    inp = make_inputs(case)
    M = 20
    idx, cnt = random_block_lists(case, 9, M)
    masks = ref.sparse_masks(inp.seq_lens, case.block_sizes, idx, cnt)
    P = case.page_size
    r_out, r_lse = ref.sparse_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                     inp.seq_lens, case.block_sizes, idx, cnt)
    for b, L in enumerate(case.seq_lens):
        for h in range(case.num_kv_heads):
            for t in torch.nonzero(~masks[b][h]).flatten().tolist():
                page = int(inp.page_table[b, t // P])
                inp.k_cache[page, t % P, h] = float("nan")
                inp.v_cache[page, t % P, h] = float("nan")
    out, lse = _sparse(ab, inp, case, idx, cnt, return_lse=True)
    assert_out_close(out, r_out, case.dtype, value_max(inp.v_cache))
    assert_lse_close(lse, r_lse)


def test_entries_past_count_are_ignored(ab):
    """Only the first block_counts[b, h] entries of a list are read (decode.h): garbage after
    them changes nothing."""
    case = _edge_case(seq_lens=(100, 257), page_size=64, block_sizes=(16, 64))
    inp = make_inputs(case)
    idx, cnt = random_block_lists(case, 4, 20)
    clean = _sparse(ab, inp, case, idx, cnt)
    dirty = idx.clone()
    for b in range(2):
        for h in range(2):
            dirty[b, h, int(cnt[b, h]):] = torch.tensor([999, -5, 3, 3] * 5)[: 20 - int(cnt[b, h])]
    assert_bitwise_equal(_sparse(ab, inp, case, dirty, cnt), clean, "garbage past count")


def test_explicit_scale_and_block_sizes_from_layout(ab):
    case = _edge_case(dtype=torch.float32, seq_lens=(77, 300), page_size=64, block_sizes=(8, 32))
    inp = make_inputs(case)
    idx, cnt = random_block_lists(case, 2, 40)
    layout = ab.LayerLayout(list(case.block_sizes), case.page_size)
    for scale in (0.5, 0.01, 2.0):
        out, lse = ab.sparse_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens,
                                    layout, idx, cnt, scale=scale, return_lse=True)
        r_out, r_lse = ref.sparse_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                         inp.seq_lens, case.block_sizes, idx, cnt, scale=scale)
        assert_out_close(out, r_out, case.dtype, value_max(inp.v_cache))
        assert_lse_close(lse, r_lse)
        d_out, d_lse = ab.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                       inp.seq_lens, scale=scale, return_lse=True)
        r_out, r_lse = ref.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                        inp.seq_lens, scale=scale)
        assert_out_close(d_out, r_out, case.dtype, value_max(inp.v_cache))
        assert_lse_close(d_lse, r_lse)


def test_awkward_sizes(ab):
    """Batch 37 of lengths 0..1013 with D = 40, G = 3, fp16."""
    lens = tuple(int(x) for x in torch.linspace(0, 1013, 37).round())
    case = _edge_case(seq_lens=lens, head_dim=40, group=3, page_size=128, block_sizes=(128, 8, 32))
    inp = make_inputs(case)
    idx, cnt = random_block_lists(case, 3, 127)
    out, lse = _sparse(ab, inp, case, idx, cnt, return_lse=True)
    r_out, r_lse = ref.sparse_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                     inp.seq_lens, case.block_sizes, idx, cnt)
    assert_out_close(out, r_out, case.dtype, value_max(inp.v_cache))
    assert_lse_close(lse, r_lse)


def test_large_logits_are_stable(ab):
    """Keys scaled so that logits reach ~1e3: no overflow (max-subtracted softmax), lse exact-ish."""
    case = _edge_case(dtype=torch.float32, seq_lens=(50, 130), page_size=64, block_sizes=(16, 16))
    inp = make_inputs(case)
    inp.k_cache.mul_(150.0)
    out, lse = ab.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens,
                               return_lse=True)
    r_out, r_lse = ref.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens)
    assert float(r_lse.abs().max()) > 100
    assert_out_close(out, r_out, case.dtype, value_max(inp.v_cache))
    fin = torch.isfinite(r_lse)
    err = (lse.to(torch.float64)[fin] - r_lse[fin]).abs()
    assert float((err / r_lse[fin].abs().clamp(min=1)).max()) <= 2 * 2.0**-23 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_is_rounded_once(ab, dtype):
    """docs/decode.md: the CPU reference attends in float64 and rounds once to the output dtype
    (lse: once to float32). 64 x 8 x 128 outputs: every one that is not within float64 noise of a
    rounding midpoint must equal the correctly rounded float64 reference, bit for bit."""
    g = torch.Generator().manual_seed(0)
    B, H, D, P, L = 64, 8, 128, 64, 64
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, P, H, D, generator=g).to(dtype)
    v = torch.randn(B, P, H, D, generator=g).to(dtype)
    pt = torch.arange(B, dtype=torch.int32)[:, None]
    sl = torch.full((B,), L, dtype=torch.int32)
    out, lse = ab.dense_decode(q, k, v, pt, sl, return_lse=True)
    r_out, r_lse = ref.dense_decode(q, k, v, pt, sl)
    want, ambiguous = round_once(r_out, dtype)
    wrong = (out != want) & ~ambiguous
    assert int(wrong.sum()) == 0, (
        f"{int(wrong.sum())} of {out.numel()} outputs are not the float64 result rounded once "
        f"(e.g. index {torch.nonzero(wrong)[0].tolist()}: float64 "
        f"{float(r_out[wrong][0])!r} -> got {float(out[wrong][0])!r}, "
        f"want {float(want[wrong][0])!r})")
    want, ambiguous = round_once(r_lse, torch.float32)
    assert int(((lse != want) & ~ambiguous).sum()) == 0


def test_shared_prefix_pages(ab):
    """Sequences that share prefix pages (same page ids in several rows of the page table)."""
    case = _edge_case(dtype=torch.bfloat16, seq_lens=(100, 140, 64, 0), page_size=32,
                      block_sizes=(16, 8), group=4)
    inp = make_inputs(case, poison=False)
    pt = inp.page_table.clone()
    pt[1, :2] = pt[0, :2]                                        # sequences 0, 1, 2 share pages 0-1
    pt[2, :2] = pt[0, :2]
    inp.page_table = pt
    idx, cnt = random_block_lists(case, 6, 20)
    out, lse = _sparse(ab, inp, case, idx, cnt, return_lse=True)
    r_out, r_lse = ref.sparse_decode(inp.q, inp.k_cache, inp.v_cache, pt, inp.seq_lens,
                                     case.block_sizes, idx, cnt)
    assert_out_close(out, r_out, case.dtype, value_max(inp.v_cache))
    assert_lse_close(lse, r_lse)
    layout = ab.LayerLayout(list(case.block_sizes), case.page_size, "cuboid", "bf16")
    s, sc = layout.new_summary_cache(inp.num_pages, case.head_dim)
    zero = torch.zeros(4, dtype=torch.int32)
    ab.update_centroids(inp.k_cache, pt, inp.seq_lens, zero, layout, s, sc)
    rs, _ = ref.update_centroids(inp.k_cache, pt, inp.seq_lens, zero,
                                 ref.RefLayout(list(case.block_sizes), case.page_size, "cuboid",
                                               "bf16"), torch.zeros_like(s))
    assert_bitwise_equal(s, rs, "summaries of shared pages")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_inputs_propagate_per_ieee(ab, value):
    """docs/decode.md ("NaN and ±inf"): a non-finite value in q, k or v reaches exactly the
    outputs of the query heads that meet it, as in the float64 max-subtracted softmax of the
    reference (positions of NaN/±inf must match, finite values within tolerance).
    Sequence 0: one element of query head 1; 1: one key element (KV head 1); 2: one value element
    (KV head 0); 3: channel 0 of every key of KV head 0, met by positive queries (all logits of
    heads 0-1 non-finite: NaN, +inf, or all -inf)."""
    case = _edge_case(dtype=torch.float32, seq_lens=(90, 90, 90, 90), page_size=32,
                      block_sizes=(16, 16))
    inp = make_inputs(case)
    P = case.page_size
    at = lambda b, t: (int(inp.page_table[b, t // P]), t % P)    # (page, offset) of token t
    inp.q[0, 1, 5] = value
    inp.k_cache[at(1, 37)][1, 3] = value
    inp.v_cache[at(2, 50)][0, 7] = value
    inp.q[3, 0:2, 0] = 1.0
    for t in range(90):
        inp.k_cache[at(3, t)][0, 0] = value
    idx, cnt = random_block_lists(case, 0, 8, fill="all")        # every token is attended
    vmax = value_max(inp.v_cache)
    r_out, r_lse = ref.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens)
    for out, lse in (ab.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                     inp.seq_lens, return_lse=True),
                     _sparse(ab, inp, case, idx, cnt, return_lse=True)):
        assert_out_close(out, r_out, case.dtype, vmax)
        assert_lse_close(lse, r_lse)
        bad = ~torch.isfinite(out)                               # [B, Hq, D]
        # Only the heads that meet the value: q head 1 of sequence 0 (its whole row), the heads
        # of KV head 1 in sequence 1 when their logit is not -inf, column 7 of KV head 0's heads in
        # sequence 2, and heads 0-1 of sequence 3 (whole rows, lse NaN).
        assert bad[0, 1].all() and torch.isnan(lse[0, 1]) and not bad[0, [0, 2, 3]].any()
        assert not bad[1, :2].any()
        assert bad[2, :2, 7].all() and not bad[2, :2, :7].any() and not bad[2, 2:].any()
        assert bad[3, :2].all() and torch.isnan(lse[3, :2]).all() and not bad[3, 2:].any()
        assert torch.isfinite(lse[2]).all()

"""update_centroids against the reference, bit for bit.

Basis for exact equality (every format, float ones included): docs/decode.md fixes the summary as
"keys converted to float32, reduced in float64, rounded once to float32, then quantized with the
fixed float32 arithmetic". Sums of <= 128 float32 keys are exact in float64 for these data (the
keys span far fewer than 53 - 24 - 7 binary orders of magnitude), so the reduction order does not
matter and any implementation of the documented rule gives the same bits. Untouched slots are
checked by filling the cache with sentinels first: the expected cache is the sentinel cache with
exactly the blocks completing in [start_pos, L) rewritten.
"""
import pytest
import torch

import reference as ref
from cases import (QUICK_CASES, case_params, make_inputs, sentinel_summary_cache, start_positions,
                   strided_summary_cache)
from conftest import assert_bitwise_equal, lib_layout


def _run_both(ab, case, inp, start_pos, summaries, scales):
    """Library and reference update from the same initial cache -> ((lib s, sc), (ref s, sc))."""
    layout = lib_layout(ab, inp.ref_layout)
    if case.noncontig:
        s_lib, sc_lib = strided_summary_cache(summaries, scales)
    else:
        s_lib = summaries.clone()
        sc_lib = None if scales is None else scales.clone()
    ab.update_centroids(inp.k_cache, inp.page_table, inp.seq_lens, start_pos, layout, s_lib, sc_lib)
    s_ref, sc_ref = ref.update_centroids(inp.k_cache, inp.page_table, inp.seq_lens, start_pos,
                                         inp.ref_layout, summaries, scales)
    return (s_lib, sc_lib), (s_ref, sc_ref)


def _assert_caches_equal(lib, expect, what):
    assert_bitwise_equal(lib[0], expect[0], f"{what}: summaries")
    if expect[1] is None:
        assert lib[1] is None
    else:
        assert_bitwise_equal(lib[1], expect[1], f"{what}: scales")


@pytest.mark.parametrize("case", case_params())
@pytest.mark.parametrize("mode", ["zero", "last", "random", "full"])
def test_update_matches_reference(ab, case, mode):
    inp = make_inputs(case)
    start = start_positions(case, mode)
    if case.noncontig:
        start = torch.stack([start, start + 1000], dim=1)[:, 0]  # [B] stride 2
    init = sentinel_summary_cache(inp.ref_layout, inp.num_pages, case.head_dim)
    lib, expect = _run_both(ab, case, inp, start, *init)
    _assert_caches_equal(lib, expect, case.id)
    if mode == "full":                                           # start = L: nothing written
        _assert_caches_equal(lib, init, "start_pos == seq_lens")


@pytest.mark.parametrize("case", case_params(QUICK_CASES[::3]))
def test_incremental_decode_equals_prefill(ab, case):
    """Prefill to L - 5, then append tokens one at a time (start = L_prev): same cache as one
    update from 0 (every block written exactly when it completes)."""
    inp = make_inputs(case)
    layout = lib_layout(ab, inp.ref_layout)
    s, sc = sentinel_summary_cache(inp.ref_layout, inp.num_pages, case.head_dim)
    full_lens = inp.seq_lens.clone()
    lens = (full_lens - 5).clamp(min=0)
    ab.update_centroids(inp.k_cache, inp.page_table, lens, torch.zeros_like(lens), layout, s, sc)
    for _ in range(5):
        nxt = torch.minimum(lens + 1, full_lens)
        ab.update_centroids(inp.k_cache, inp.page_table, nxt, lens, layout, s, sc)
        lens = nxt
    expect = ref.update_centroids(inp.k_cache, inp.page_table, full_lens,
                                  torch.zeros_like(full_lens), inp.ref_layout,
                                  *sentinel_summary_cache(inp.ref_layout, inp.num_pages,
                                                          case.head_dim))
    _assert_caches_equal((s, sc), expect, case.id)


def test_hand_example_minmax_fp32(ab):
    """P = 16, bs = [16, 8], sequence of 40 tokens in pages [2, 0, 1]: head 0 blocks 0, 1 live
    in pages 2, 0 slot 0; head 1 blocks 0..4 in pages 2, 2, 0, 0, 1 at slots 1, 2, 1, 2, 1."""
    g = torch.Generator().manual_seed(4)
    k = torch.randn(3, 16, 2, 64, generator=g)                   # [3 pages, P, Hk, D]
    layout = ab.LayerLayout([16, 8], 16, "minmax", "fp32")
    s, sc = layout.new_summary_cache(3, 64)
    s.fill_(7.0)
    pt = torch.tensor([[2, 0, 1, -1]], dtype=torch.int32)
    ab.update_centroids(k, pt, torch.tensor([40], dtype=torch.int32),
                        torch.tensor([0], dtype=torch.int32), layout, s, sc)
    assert sc is None
    seq = torch.cat([k[2], k[0], k[1]])                          # [48, Hk, D] in sequence order
    expect = torch.full_like(s, 7.0)
    for j, (page, slot) in enumerate([(2, 0), (0, 0)]):
        expect[page, slot, 0] = seq[16 * j:16 * (j + 1), 0].amax(0)
        expect[page, slot, 1] = seq[16 * j:16 * (j + 1), 0].amin(0)
    for j, (page, slot) in enumerate([(2, 1), (2, 2), (0, 1), (0, 2), (1, 1)]):
        expect[page, slot, 0] = seq[8 * j:8 * (j + 1), 1].amax(0)
        expect[page, slot, 1] = seq[8 * j:8 * (j + 1), 1].amin(0)
    assert torch.equal(s, expect)                                # page 1 slots 0 and 2 untouched


def test_cuboid_constant_block_has_zero_radius(ab):
    """All keys of a block equal -> m = key, r = 0, hi = lo = key; mean = key."""
    k = torch.randn(1, 1, 1, 64).expand(1, 32, 1, 64).contiguous()  # [1, 32, 1, 64] constant
    pt = torch.tensor([[0]], dtype=torch.int32)
    L, start = torch.tensor([32], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    for summary in ("cuboid", "minmax", "mean"):
        layout = ab.LayerLayout([32], 32, summary, "fp32")
        s, _ = layout.new_summary_cache(1, 64)
        ab.update_centroids(k, pt, L, start, layout, s, None)
        for r in range(s.shape[2]):
            assert torch.equal(s[0, 0, r], k[0, 0, 0])


def test_cuboid_values(ab):
    """Cuboid of a 2-token block: m = (a + b)/2, r = |a - b|/2, hi = max, lo = min."""
    a = torch.tensor([1.0, -2.0, 0.25, 3.0] * 2)
    b = torch.tensor([-1.0, 4.0, 0.25, 0.0] * 2)
    k = torch.stack([a, b] * 4)[None, :, None, :]                # [1, 8, 1, 8] tokens a, b, a, b...
    layout = ab.LayerLayout([8], 8, "cuboid", "fp32")
    s, _ = layout.new_summary_cache(1, 8)
    ab.update_centroids(k, torch.tensor([[0]], dtype=torch.int32), torch.tensor([8], dtype=torch.int32),
                        torch.tensor([0], dtype=torch.int32), layout, s, None)
    assert s[0, 0, 0].tolist() == torch.maximum(a, b).tolist()
    assert s[0, 0, 1].tolist() == torch.minimum(a, b).tolist()


def test_empty_batch_and_zero_lengths(ab):
    layout = ab.LayerLayout([8], 16, "mean", "int8")
    s, sc = layout.new_summary_cache(2, 64)
    s.fill_(3)
    sc.fill_(5.0)
    k = torch.randn(2, 16, 1, 64)
    empty = torch.zeros(0, dtype=torch.int32)
    ab.update_centroids(k, torch.zeros(0, 2, dtype=torch.int32), empty, empty, layout, s, sc)
    zero = torch.zeros(2, dtype=torch.int32)
    ab.update_centroids(k, torch.full((2, 2), -1, dtype=torch.int32), zero, zero, layout, s, sc)
    assert (s == 3).all() and (sc == 5.0).all()

"""The default capacity of select_blocks' lists (docs/decode.md, "max_blocks").

select_blocks sizes block_indices without reading seq_lens: max over heads of
min(C // bs, max(ceil(sink / bs) + ceil(local / bs), T // bs)) with C = max_pages * P and T the
budget in tokens (ceil(f C) for a fraction f). It must hold every length the page table allows
(checked by brute force over every L <= C), equal the independent reference's formula, and be the
capacity select_blocks allocates by default on the CPU (and accepts at least on the GPU).
"""
import random

import pytest
import torch

import reference as ref


def _brute_force(block_sizes, page_size, max_pages, budget, sink, local):
    """The most blocks any (length <= capacity, head) keeps: plan_selection of the reference."""
    most = 0
    for L in range(max_pages * page_size + 1):
        for bs in block_sizes:
            plan = ref.plan_selection(L, bs, budget, sink, local)
            most = max(most, len(plan.kept) + plan.num_selected)
    return most


def _random_settings(rng):
    page = rng.choice([16, 32, 64])
    sizes = [rng.choice([s for s in (8, 16, 32, 64) if s <= page]) for _ in range(rng.randint(1, 4))]
    budget = rng.choice([0, 1, 7, 33, 100, 256, 4096, rng.random() * 0.9 + 0.01])
    return sizes, page, rng.randint(0, 9), budget, rng.choice([0, 5, 16]), rng.choice([0, 7, 64])


@pytest.mark.parametrize("seed", range(40))
def test_bound_holds_every_length_and_matches_the_library(ab, seed):
    rng = random.Random(seed)
    sizes, page, max_pages, budget, sink, local = _random_settings(rng)
    layout = ab.LayerLayout(sizes, page, summary="mean", format="fp32")
    pt = torch.zeros(1, max_pages, dtype=torch.int32)
    got = ab.default_max_blocks(pt, layout, budget, sink, local)
    expect = ref.max_blocks_bound(ref.RefLayout(sizes, page, "mean", "fp32"), max_pages, budget,
                                  sink, local)
    assert got == expect
    assert got >= _brute_force(sizes, page, max_pages, budget, sink, local)
    # Without a budget: every block of the capacity (the bound's ceiling).
    assert ab.default_max_blocks(pt, layout) == -(-max_pages * page // min(sizes))
    assert got <= ab.default_max_blocks(pt, layout)


def test_bound_is_tight_for_the_usual_budgets(ab):
    """Budget 2048 over a 128K page table: 2048 / 8 = 256 entries for 8-token blocks (not the
    16384 of the full capacity), which some length reaches."""
    layout = ab.LayerLayout([8, 64], 64, summary="minmax", format="int4c",
                            channel_scale=torch.ones(2, 64), channel_zero=torch.zeros(2, 64))
    pt = torch.zeros(1, 2048, dtype=torch.int32)
    assert ab.default_max_blocks(pt, layout, 2048) == 256
    plan = ref.plan_selection(131072, 8, 2048, 16, 64)
    assert len(plan.kept) + plan.num_selected == 256


def test_select_blocks_allocates_the_bound(ab):
    layout = ab.LayerLayout([8, 32], 32, summary="mean", format="fp32")
    s, sc = layout.new_summary_cache(8, 64)
    pt = torch.arange(8, dtype=torch.int32).view(2, 4)
    sl = torch.tensor([128, 77], dtype=torch.int32)
    q = torch.randn(2, 4, 64)
    ab.update_centroids(torch.randn(8, 32, 2, 64), pt, sl, torch.zeros(2, dtype=torch.int32),
                        layout, s, sc)
    for budget, sink, local in ((48, 16, 64), (0.3, 0, 8), (10**6, 8, 8)):
        idx, cnt = ab.select_blocks(q, s, sc, pt, sl, layout, budget, sink_tokens=sink,
                                    local_tokens=local)
        assert idx.shape[2] == ab.default_max_blocks(pt, layout, budget, sink, local)
        assert int(cnt.max()) <= idx.shape[2]

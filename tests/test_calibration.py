"""Calibration: head_recall against a float64 expanded-mask reference, allocate_block_sizes against
brute force, layout helpers, validation, and the docstring examples.

Shapes: N probes, Hq query heads, Hk KV heads (G = Hq // Hk), D head dim, T keys, C candidates.

Tolerance basis for head_recall: the library and the reference both compute the softmax and the
masked sums in float64 from the same float32 inputs; they differ only by float64 summation order
(~1e-16 per term, a few hundred terms), so 1e-12 absolute is ~100x that noise. The selected blocks
must be the same (a near-tie within 1e-15 of a block logit would be needed to flip one).
"""
import doctest
import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

import absparse
import absparse.allocation

RECALL_ATOL = 1e-12

# ------------------------------------------------------------------------------------------------
# float64 reference of head_recall (independent of absparse)
# ------------------------------------------------------------------------------------------------


def ref_summaries(keys, bs, summary):
    """keys [T, D] float32 -> float32 [T // bs, R, D] (float64 reductions, rounded once)."""
    nb = keys.shape[0] // bs
    x = keys[: nb * bs].double().view(nb, bs, -1)                 # [nb, bs, D]
    if summary == "mean":
        return x.mean(1, keepdim=True).float()                    # [nb, 1, D]
    hi, lo = x.max(1).values, x.min(1).values                     # [nb, D]
    if summary == "cuboid":
        centre = (hi + lo) / 2                                    # [nb, D]
        radius = (x - centre[:, None]).abs().mean(1)              # [nb, D]
        hi, lo = centre + radius, centre - radius
    return torch.stack([hi, lo], 1).float()                       # [nb, 2, D]


def ref_block_logits(qg, vectors, summary, scale):
    """qg [G, D] float64, vectors [M, R, D] float32 -> block logits [G, M] float64."""
    v = vectors.double()
    if summary == "mean":
        return scale * (qg @ v[:, 0].T)                           # [G, M]
    hi = qg[:, None, :] * v[None, :, 0]                           # [G, M, D]
    lo = qg[:, None, :] * v[None, :, 1]                           # [G, M, D]
    return scale * torch.maximum(hi, lo).sum(-1)                  # [G, M]


def ref_attended_mask(L, bs, qg, summaries, budget, sink, local, summary, group_reduce, scale):
    """Boolean [L]: the tokens select_blocks + sparse_decode attend (docs/decode.md)."""
    n = L // bs
    sink_blocks = min(-(-sink // bs), n)
    local_begin = max(n - min(-(-local // bs), n), sink_blocks)
    cands = local_begin - sink_blocks
    tokens = math.ceil(budget * L) if isinstance(budget, float) else budget
    if tokens >= L:
        k = cands
    else:
        kept, tail = n - cands, L - n * bs
        k = min(max((tokens - bs * kept - tail) // bs, 0), cands)
    mask = torch.zeros(L, dtype=torch.bool)
    mask[: sink_blocks * bs] = True
    mask[local_begin * bs:] = True                                # local blocks and the tail
    if 0 < k < cands:
        logits = ref_block_logits(qg, summaries[sink_blocks:local_begin], summary, scale)  # [G, M]
        if group_reduce == "max":
            score = logits.max(0).values                          # [M]
        else:
            score = torch.softmax(logits, -1).sum(0)              # [M]
        order = torch.sort(score, descending=True, stable=True).indices[:k]  # ties: lower index
        for j in (order + sink_blocks).tolist():
            mask[j * bs:(j + 1) * bs] = True
    elif k == cands:
        mask[:] = True
    return mask


def ref_head_recall(q, k, positions, budget, candidates, sink, local, summary, group_reduce,
                    scale=None):
    """float64 [Hk, C]: mean over probes and group heads of the softmax mass of the mask."""
    N, Hq, D = q.shape
    T, Hk, _ = k.shape
    G = Hq // Hk
    scale = 1 / math.sqrt(D) if scale is None else scale
    q32, k32 = q.float(), k.float()
    out = torch.zeros(Hk, len(candidates), dtype=torch.float64)
    for h in range(Hk):
        for c, bs in enumerate(candidates):
            summaries = ref_summaries(k32[:, h], bs, summary)    # [T // bs, R, D]
            for n in range(N):
                L = int(positions[n]) + 1
                qg = q32[n, h * G:(h + 1) * G].double()           # [G, D]
                p = torch.softmax(scale * (qg @ k32[:L, h].double().T), -1)  # [G, L]
                mask = ref_attended_mask(L, bs, qg, summaries, budget, sink, local, summary,
                                         group_reduce, scale)
                out[h, c] += (p * mask).sum()                     # sum over G and tokens
    return out / (N * G)


def make_inputs(seed, N, Hq, Hk, D, T, positions=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, Hq, D, generator=g)
    k = torch.randn(T, Hk, D, generator=g)
    k[: T // 3] += 0.5 * torch.randn(D, generator=g)             # some structure in the keys
    if positions is None:
        positions = torch.randint(0, T, (N,), generator=g, dtype=torch.int32)
    return q, k, torch.as_tensor(positions, dtype=torch.int32)


# ------------------------------------------------------------------------------------------------
# head_recall
# ------------------------------------------------------------------------------------------------

# (summary, group_reduce, Hq, Hk): every summary x reduction, GQA group sizes 1, 2 and 4.
RECALL_CASES = [(s, r, hq, hk) for s in ("mean", "minmax", "cuboid") for r in ("max", "softmax_sum")
                for hq, hk in ((2, 2), (4, 2), (8, 2))]


@pytest.mark.parametrize("seed,summary,group_reduce,hq,hk",
                         [(100 + i,) + c for i, c in enumerate(RECALL_CASES)])
def test_head_recall_matches_reference(seed, summary, group_reduce, hq, hk):
    T, D = 333, 32
    # Lengths not multiples of the block sizes, one shorter than the largest block, one = T.
    positions = [332, 200, 96, 40, 12, 150]
    q, k, pos = make_inputs(seed, len(positions), hq, hk, D, T, positions)   # fixed seed per case
    cands = [4, 8, 16, 32]
    out = absparse.head_recall(q, k, pos, 64, cands, sink_tokens=8, local_tokens=24,
                               summary=summary, group_reduce=group_reduce)
    ref = ref_head_recall(q, k, pos, 64, cands, 8, 24, summary, group_reduce)
    assert out.dtype == torch.float64 and out.shape == (hk, len(cands))
    assert torch.allclose(out, ref, rtol=0, atol=RECALL_ATOL), (out - ref).abs().max()
    assert bool(((out > 0) & (out <= 1)).all())


@pytest.mark.parametrize("budget", [0.1, 0.3, 0, 1])
def test_head_recall_fraction_and_tiny_budgets(budget):
    q, k, pos = make_inputs(7, 5, 4, 2, 16, 257)
    out = absparse.head_recall(q, k, pos, budget, [8, 16, 64], sink_tokens=0, local_tokens=8,
                               summary="minmax")
    ref = ref_head_recall(q, k, pos, budget, [8, 16, 64], 0, 8, "minmax", "max")
    assert torch.allclose(out, ref, rtol=0, atol=RECALL_ATOL), (out - ref).abs().max()


def test_head_recall_budget_at_least_length_is_one():
    q, k, pos = make_inputs(1, 4, 4, 2, 16, 300, positions=[299, 10, 150, 0])
    for budget in (300, 10_000):
        out = absparse.head_recall(q, k, pos, budget, [8, 32, 256], summary="cuboid")
        assert torch.equal(out, torch.ones(2, 3, dtype=torch.float64))
    # A fraction in (0, 1) never covers L by itself, but sink + local windows over the whole
    # sequence do: every candidate block is kept.
    out = absparse.head_recall(q, k, pos, 0.01, [8, 32], sink_tokens=0, local_tokens=10**6)
    assert torch.equal(out, torch.ones(2, 2, dtype=torch.float64))


def test_head_recall_sink_and_local_larger_than_sequence():
    q, k, pos = make_inputs(3, 3, 4, 1, 16, 90, positions=[89, 30, 5])
    out = absparse.head_recall(q, k, pos, 16, [4, 16], sink_tokens=500, local_tokens=700)
    assert torch.equal(out, torch.ones(1, 2, dtype=torch.float64))
    # A sink window longer than two of the three sequences.
    out = absparse.head_recall(q, k, pos, 16, [4, 16], sink_tokens=40, local_tokens=0)
    ref = ref_head_recall(q, k, pos, 16, [4, 16], 40, 0, "minmax", "max")
    assert torch.allclose(out, ref, rtol=0, atol=RECALL_ATOL)


def test_head_recall_no_sink_no_local_and_scale():
    q, k, pos = make_inputs(5, 4, 8, 2, 16, 200)
    out = absparse.head_recall(q, k, pos, 40, [8, 16], sink_tokens=0, local_tokens=0,
                               summary="mean", group_reduce="softmax_sum", scale=0.7)
    ref = ref_head_recall(q, k, pos, 40, [8, 16], 0, 0, "mean", "softmax_sum", scale=0.7)
    assert torch.allclose(out, ref, rtol=0, atol=RECALL_ATOL)


def test_head_recall_ties_go_to_lower_block():
    # Every block has the same mean m (tokens m +- a_j u, exact on a 1/8 grid) but a different
    # spread a_j, so all block scores tie while the attended mass depends on which blocks win.
    T, D, bs = 128, 16, 8
    g = torch.Generator().manual_seed(0)
    m = torch.randint(-4, 5, (D,), generator=g) / 8               # [D]
    u = torch.randint(-2, 3, (bs // 2, D), generator=g) / 8       # [bs/2, D]
    blocks = []
    for j in range(T // bs):
        a = (j % 5 + 1) / 2
        blocks.append(torch.stack([m + a * u, m - a * u], 1).reshape(bs, D))  # [bs, D]
    k = torch.cat(blocks)[:, None, :]                             # [T, 1, D]
    q = torch.randn(2, 2, D, generator=g)
    pos = torch.tensor([127, 100], dtype=torch.int32)
    for reduce_ in ("max", "softmax_sum"):
        out = absparse.head_recall(q, k, pos, 40, [bs], 0, 8, "mean", reduce_)
        ref = ref_head_recall(q, k, pos, 40, [bs], 0, 8, "mean", reduce_)
        assert torch.allclose(out, ref, rtol=0, atol=RECALL_ATOL)
    # The test discriminates: for the probe at 127 (4 of the 15 candidates selected), the lowest
    # tied blocks 0-3 and the highest 11-14 hold different mass.
    p = torch.softmax(q[0].double() @ k[:, 0].double().T / math.sqrt(D), -1)  # [G, T]
    low, high = p[:, :4 * bs].sum(), p[:, 11 * bs:15 * bs].sum()
    assert abs(float(low - high)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_recall_half_inputs(dtype):
    q, k, pos = make_inputs(11, 3, 4, 2, 16, 150)
    q, k = q.to(dtype), k.to(dtype)
    out = absparse.head_recall(q, k, pos, 48, [8, 16], sink_tokens=4, local_tokens=8)
    ref = ref_head_recall(q, k, pos, 48, [8, 16], 4, 8, "minmax", "max")  # on the same values
    assert torch.allclose(out, ref, rtol=0, atol=RECALL_ATOL)


def test_head_recall_strided_inputs_and_determinism():
    q, k, pos = make_inputs(13, 4, 8, 2, 32, 260)
    base = absparse.head_recall(q, k, pos, 64, [8, 32])
    q_strided = torch.zeros(4, 16, 32)[:, ::2]                    # head stride 64
    q_strided.copy_(q)
    k_strided = torch.zeros(2, 260, 32).transpose(0, 1)           # [T, Hk, D], token stride 32
    k_strided.copy_(k)
    pos_strided = torch.zeros(8, dtype=torch.int32)[::2]
    pos_strided.copy_(pos)
    again = absparse.head_recall(q_strided, k_strided, pos_strided, 64, [8, 32])
    assert torch.equal(base, again)
    assert torch.equal(base, absparse.head_recall(q, k, pos.tolist(), 64, (8, 32)))


@pytest.mark.parametrize("summary", ["minmax", "mean"])
def test_head_recall_matches_decode_pipeline(summary):
    """The attended set is what update_centroids -> select_blocks (fp32 summaries) select."""
    T, D, Hq, Hk, P = 512, 64, 8, 2, 64
    positions = [511, 400, 333, 260, 129]
    q, k, pos = make_inputs(17, len(positions), Hq, Hk, D, T, positions)
    budget, sink, local, reduce_ = 96, 16, 32, "softmax_sum"
    cands = [8, 16, 64]
    recall = absparse.head_recall(q, k, pos, budget, cands, sink, local, summary, reduce_)
    G, B = Hq // Hk, len(positions)
    k_cache = k.view(T // P, P, Hk, D)                            # pages in order
    page_table = torch.arange(T // P, dtype=torch.int32)[None].repeat(B, 1)  # [B, pages]
    seq_lens = pos + 1                                            # [B]
    for c, bs in enumerate(cands):
        layout = absparse.LayerLayout([bs] * Hk, P, summary, "fp32")
        summaries, scales = layout.new_summary_cache(T // P, D)
        absparse.update_centroids(k_cache, page_table[:1], torch.tensor([T], dtype=torch.int32),
                                  torch.zeros(1, dtype=torch.int32), layout, summaries, scales)
        idx, cnt = absparse.select_blocks(q, summaries, scales, page_table, seq_lens, layout,
                                          budget, sink, local, reduce_)
        for h in range(Hk):
            total = 0.0
            for b in range(B):
                L = int(seq_lens[b])
                mask = torch.zeros(L, dtype=torch.bool)
                for j in idx[b, h, : cnt[b, h]].tolist():
                    mask[j * bs:(j + 1) * bs] = True
                mask[(L // bs) * bs:] = True                      # partial tail
                qg = q[b, h * G:(h + 1) * G].double()             # [G, D]
                p = torch.softmax((qg @ k[:L, h].double().T) / math.sqrt(D), -1)  # [G, L]
                total += float((p * mask).sum())
            assert abs(recall[h, c].item() - total / (B * G)) <= RECALL_ATOL


def test_head_recall_recall_grows_with_budget():
    q, k, pos = make_inputs(19, 4, 4, 2, 32, 700)
    small = absparse.head_recall(q, k, pos, 64, [8, 16, 32])
    large = absparse.head_recall(q, k, pos, 256, [8, 16, 32])
    assert bool((large >= small - 1e-15).all())


def _recall_args():
    q, k, pos = make_inputs(0, 3, 4, 2, 16, 64)
    return dict(q=q, k=k, positions=pos, token_budget=16)


@pytest.mark.parametrize("change,match", [
    (dict(q=torch.zeros(4, 16)), "q: expected 3 dimensions"),
    (dict(k=torch.zeros(64, 2, 8)), r"k.shape\[2\]: expected 16"),
    (dict(positions=torch.zeros(2, dtype=torch.int32)), r"positions.shape\[0\]: expected 3"),
    (dict(positions=torch.zeros(3, dtype=torch.int64)), "positions: .*int32"),
    (dict(positions=torch.tensor([0, 64, 3], dtype=torch.int32)),
     r"positions\[1\]: expected in \[0, T\)"),
    (dict(positions=torch.tensor([0, -1, 3], dtype=torch.int32)), r"positions\[1\]"),
    (dict(q=torch.zeros(3, 3, 16)), "q: expected a number of query heads"),
    (dict(k=torch.zeros(64, 2, 16, dtype=torch.float16)), "k: expected dtype float32"),
    (dict(q=torch.zeros(3, 4, 16, dtype=torch.float64)), "q: unsupported dtype"),
    (dict(q=torch.zeros(3, 4, 32)[..., ::2]), "q: expected a contiguous last dimension"),
    (dict(q=torch.full((3, 4, 16), math.nan)), "q: expected finite values"),
    (dict(k=torch.full((64, 2, 16), math.inf)), "k: expected finite values"),
    (dict(q=torch.zeros(0, 4, 16), positions=torch.zeros(0, dtype=torch.int32)),
     "at least one probe"),
    (dict(candidates=[8, 12]), r"candidates\[1\]: expected a power of two"),
    (dict(candidates=[8, 8]), "candidates: expected distinct"),
    (dict(candidates=[]), "candidates: expected between 1 and 64"),
    (dict(token_budget=1.5), "token_budget"),
    (dict(token_budget=-1), "token_budget"),
    (dict(token_budget=True), "token_budget"),
    (dict(summary="max"), "summary"),
    (dict(group_reduce="sum"), "group_reduce"),
    (dict(scale=math.inf), "scale"),
    (dict(sink_tokens=-1), "sink_tokens"),
    (dict(local_tokens=2.0), "local_tokens"),
    (dict(q=[[1.0]]), "q: expected a torch.Tensor"),
])
def test_head_recall_validation(change, match):
    args = _recall_args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        absparse.head_recall(**args)


# ------------------------------------------------------------------------------------------------
# allocate_block_sizes against brute force
# ------------------------------------------------------------------------------------------------


def grid(v):
    """The documented exact grid: round half away from zero of v * 2^40."""
    x = Fraction(v) * 2**40
    r = math.floor(abs(x) + Fraction(1, 2))
    return r if x >= 0 else -r


def brute_force(recall, cands, avg, constraint):
    """(sizes, float objective) by enumeration with the documented objective and tie rule."""
    N, C = len(recall), len(cands)
    mx, mn = max(cands), min(cands)
    g = [[grid(v) for v in row] for row in recall]
    best = None
    for choice in itertools.product(range(C), repeat=N):
        sizes = [cands[c] for c in choice]
        if constraint == "count":
            feasible = sum(Fraction(1, s) for s in sizes) <= Fraction(N, avg)
        else:
            feasible = sum(sizes) >= N * avg
        if not feasible:
            continue
        # Larger key wins: grid objective, then fewer summaries, then larger sizes in head order.
        key = (sum(g[n][c] for n, c in enumerate(choice)), -sum(mx // s for s in sizes), sizes)
        if best is None or key > best[0]:
            best = (key, sizes)
    assert best is not None
    sizes = best[1]
    return sizes, sum(recall[n][cands.index(s)] for n, s in enumerate(sizes))


def random_instance(rng):
    N = rng.randint(1, 7)
    C = rng.randint(2, 4)
    if C ** N > 4 ** 6:                                           # keep enumeration small
        N = 6
    cands = rng.sample([1, 2, 4, 8, 16, 32, 64, 128], C)
    kind = rng.choice(["float", "grid", "flat_rows", "dup_rows"])
    if kind == "float":
        recall = [[rng.random() for _ in range(C)] for _ in range(N)]
    elif kind == "grid":                                          # many exact ties
        recall = [[rng.randint(0, 4) / 8 for _ in range(C)] for _ in range(N)]
    elif kind == "flat_rows":                                     # recall independent of size
        recall = [[rng.choice([0.5, 0.75])] * C for _ in range(N)]
    else:                                                         # identical heads
        row = [rng.randint(0, 8) / 8 for _ in range(C)]
        recall = [list(row) for _ in range(N)]
    avg = rng.choice([min(cands), max(cands), rng.randint(1, max(cands)),
                      rng.randint(min(cands), max(cands))])
    return recall, cands, avg


@pytest.mark.parametrize("constraint", ["count", "mean"])
def test_allocation_matches_brute_force(constraint):
    rng = random.Random(1234 if constraint == "count" else 4321)
    for _ in range(150):
        recall, cands, avg = random_instance(rng)
        out = absparse.allocate_block_sizes(torch.tensor(recall, dtype=torch.float64), cands, avg,
                                            constraint)
        sizes, objective = brute_force(recall, cands, avg, constraint)
        assert out.dtype == torch.int32
        assert out.tolist() == sizes, (recall, cands, avg, constraint)
        got = sum(recall[n][cands.index(s)] for n, s in enumerate(out.tolist()))
        assert got == objective


@pytest.mark.parametrize("constraint", ["count", "mean"])
def test_allocation_infeasible_budget(constraint):
    recall = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="avg_block_size: infeasible"):
        absparse.allocate_block_sizes(recall, [8, 16, 32], 33, constraint)
    with pytest.raises(ValueError, match="avg_block_size: infeasible"):
        absparse.allocate_block_sizes(recall, [8, 16, 32], 64, constraint)
    # avg = the largest candidate is feasible, and only by putting every head there.
    assert absparse.allocate_block_sizes(recall, [8, 16, 32], 32, constraint).tolist() == [32] * 5


def test_allocation_slack_budget_takes_best_per_head():
    recall = torch.tensor([[0.9, 0.8, 0.7], [0.5, 0.6, 0.6], [0.1, 0.1, 0.1]], dtype=torch.float64)
    for constraint in ("count", "mean"):
        out = absparse.allocate_block_sizes(recall, [8, 16, 32], 4, constraint)
        assert out.tolist() == [8, 32, 32]                      # ties -> the larger block


def test_allocation_flat_recall_is_uniform():
    # Recall independent of the block size: every allocation ties, the fewest summaries win.
    flat = torch.full((12, 4), 0.8, dtype=torch.float64)
    for constraint in ("count", "mean"):
        out = absparse.allocate_block_sizes(flat, [8, 16, 32, 64], 32, constraint)
        assert torch.equal(out, absparse.uniform_block_sizes(12, 64))
    # Every head alike, recall concave in the summary budget: the uniform column is optimal.
    same = torch.tensor([[0.95, 0.93, 0.92, 0.50]], dtype=torch.float64).repeat(12, 1)
    out = absparse.allocate_block_sizes(same, [8, 16, 32, 64], 32, "count")
    assert torch.equal(out, absparse.uniform_block_sizes(12, 32))


def test_allocation_sensitive_heads_get_small_blocks():
    g = torch.Generator().manual_seed(3)
    n = 64
    sensitivity = torch.rand(n, generator=g, dtype=torch.float64)  # [N]
    cands = torch.tensor([8, 16, 32, 64])
    recall = 1 - sensitivity[:, None] * torch.log2(cands.double() / 8)[None] / 3  # [N, C]
    out = absparse.allocate_block_sizes(recall, cands, 32, "count")
    assert (1 / out.double()).sum() <= n / 32 + 1e-12
    uniform = recall[:, 2].sum()
    assert recall.gather(1, torch.log2(out.double() / 8).long()[:, None]).sum() >= uniform
    order = torch.argsort(sensitivity)
    assert out[order[0]] >= out[order[-1]]


def test_allocation_tie_rule_order():
    # Identical heads: one head at 16 and two at 64 (cost 4 + 1 + 1 = 6 = 3 * 64 / 32) beat the
    # uniform 32s; the three placements tie in recall and summaries, larger blocks go first.
    same = torch.tensor([[0.9, 0.6, 0.5]], dtype=torch.float64).repeat(3, 1)
    assert absparse.allocate_block_sizes(same, [16, 32, 64], 32).tolist() == [64, 64, 16]
    # Equal recall sums on the grid, different summary counts: fewer summaries win.
    r = torch.tensor([[0.5, 0.25], [0.25, 0.5]], dtype=torch.float64)  # columns: 8, 64
    assert absparse.allocate_block_sizes(r, [8, 64], 4, "mean").tolist() == [8, 64]
    r2 = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    assert absparse.allocate_block_sizes(r2, [8, 64], 4, "mean").tolist() == [64, 64]


def test_allocation_large_problem_is_fast():
    g = torch.Generator().manual_seed(0)
    recall = torch.rand(32 * 8, 5, generator=g, dtype=torch.float64).sort(1, descending=True).values
    for constraint in ("count", "mean"):
        out = absparse.allocate_block_sizes(recall, [8, 16, 32, 64, 128], 32, constraint)
        if constraint == "count":
            assert sum(Fraction(1, s) for s in out.tolist()) <= Fraction(256, 32)
        else:
            assert int(out.sum()) >= 256 * 32


def test_allocation_empty_and_dtypes():
    out = absparse.allocate_block_sizes(torch.zeros(0, 3), [8, 16, 32], 16)
    assert out.dtype == torch.int32 and out.shape == (0,)
    # "mean" 12: sizes must sum to >= 24, so (16, 8) beats (8, 16) and (16, 16).
    as_list = absparse.allocate_block_sizes([[0.1, 0.2], [0.3, 0.1]], (8, 16), 12, "mean")
    as_f32 = absparse.allocate_block_sizes(torch.tensor([[0.1, 0.2], [0.3, 0.1]]), [8, 16], 12.0,
                                           "mean")
    assert as_list.tolist() == [16, 8] and as_f32.tolist() == [16, 8]


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(3), [8, 16], 8), "recall: expected 2 dimensions"),
    ((torch.zeros(3, 3), [8, 16], 8), r"recall.shape\[1\]: expected 2"),
    ((torch.tensor([[0.1, math.nan]]), [8, 16], 8), "recall: expected finite"),
    ((torch.tensor([[1e12, 0.0]]), [8, 16], 8), "recall: expected N \\* max\\|recall\\|"),
    ((torch.zeros(2, 2), [8, 24], 8), r"candidates\[1\]: expected a power of two"),
    ((torch.zeros(2, 2), [8, 8], 8), "candidates: expected distinct"),
    ((torch.zeros(2, 0), [], 8), "candidates: expected between 1 and 64"),
    ((torch.zeros(2, 2), [8, 16], 0), "avg_block_size: expected > 0"),
    ((torch.zeros(2, 2), [8, 16], 12.5), "avg_block_size: expected a positive int"),
    ((torch.zeros(2, 2), [8, 16], 8, "sum"), "constraint"),
    (("abc", [8, 16], 8), "recall"),
])
def test_allocation_validation(args, match):
    with pytest.raises(ValueError, match=match):
        absparse.allocate_block_sizes(*args)


# ------------------------------------------------------------------------------------------------
# Layout helpers
# ------------------------------------------------------------------------------------------------


def test_uniform_block_sizes():
    assert absparse.uniform_block_sizes(4, 16).tolist() == [16] * 4
    assert absparse.uniform_block_sizes(0, 16).shape == (0,)
    for bad in [(3, 24), (3, 0), (-1, 16), (2.0, 16)]:
        with pytest.raises(ValueError):
            absparse.uniform_block_sizes(*bad)


def test_layout_from_allocation(tmp_path):
    sizes = torch.tensor([8, 16, 32, 64, 64, 64], dtype=torch.int32)
    m = absparse.layout_from_allocation(sizes, 3, 64, summary="cuboid", format="int4",
                                        dense_layers=[1], meta={"budget": 0.04})
    assert len(m) == 3 and m[1] is None and m.meta == {"budget": 0.04}
    assert m[0].block_sizes.tolist() == [8, 16] and m[2].block_sizes.tolist() == [64, 64]
    assert m[0].summary == "cuboid" and m[2].format == "int4" and m[2].page_size == 64
    same = absparse.layout_from_allocation(sizes.view(3, 2).tolist(), 3, 64, "cuboid", "int4",
                                           dense_layers=(1,), meta={"budget": 0.04})
    assert same == m
    m.save(tmp_path / "layout.json")
    assert absparse.ModelLayout.load(tmp_path / "layout.json") == m


def test_layout_from_allocation_channel_params():
    sizes = [16, 32, 32, 16]
    shared = torch.full((2, 8), 0.5)
    m = absparse.layout_from_allocation(sizes, 2, 32, format="int8c", channel_scale=shared,
                                        channel_zero=torch.zeros(2, 8))
    assert torch.equal(m[1].channel_scale, shared)
    per_layer = torch.stack([torch.full((2, 8), 0.25), torch.full((2, 8), 0.75)])
    m = absparse.layout_from_allocation(sizes, 2, 32, format="int4c", channel_scale=per_layer,
                                        channel_zero=torch.zeros(2, 2, 8))
    assert float(m[0].channel_scale[0, 0]) == 0.25 and float(m[1].channel_scale[0, 0]) == 0.75


@pytest.mark.parametrize("kwargs,match", [
    (dict(sizes=[8, 16, 32], num_layers=2), "sizes: expected num_layers"),
    (dict(sizes=[[8, 16]], num_layers=2), "sizes: expected"),
    (dict(sizes=[8.0, 16.0], num_layers=1), "sizes: expected integer"),
    (dict(sizes=[8, 16], num_layers=0), "num_layers"),
    (dict(sizes=[8, 16], num_layers=2, dense_layers=[2]), "dense_layers"),
    (dict(sizes=[8, 128], num_layers=2), "LayerLayout"),     # 128 does not divide the page size
])
def test_layout_from_allocation_validation(kwargs, match):
    kwargs.setdefault("page_size", 64)
    with pytest.raises(ValueError, match=match):
        absparse.layout_from_allocation(**kwargs)


def test_describe_layout():
    m = absparse.layout_from_allocation([8, 64, 32, 32, 16, 16], 3, 64, dense_layers=[2])
    text = absparse.describe_layout(m)
    lines = text.splitlines()
    assert lines[0].startswith("layer") and len(lines) == 5
    assert lines[1].split() == ["0", "8", "64", "144"]           # 1024/8 + 1024/64
    assert lines[2].split() == ["1", "32", "32", "64"]
    assert lines[3].split() == ["2", "dense", "-"]
    assert lines[4].split()[:4] == ["total", "4", "heads", "208"]
    assert "(uniform equivalent: 19.7)" in lines[4]
    with pytest.raises(ValueError, match="model_layout"):
        absparse.describe_layout([8, 16])


def test_docstring_examples():
    globs = {"torch": torch, **{n: getattr(absparse, n) for n in absparse.__all__}}
    result = doctest.testmod(absparse.allocation, extraglobs=globs, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

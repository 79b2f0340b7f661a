"""Prefill mask builders (FlexPrefill, PBS-Attn) and their primitives against the float64 reference
of tests/prefill_masks_reference.py.

Exactness basis: absparse computes in float64 and rounds float outputs once to float32, like the
reference; two float64 evaluations differ by ~1e-16 relative (summation order), so float outputs
are compared to 2 ulp of float32 and block lists exactly. A list could only differ through a near
tie (two scores within ~1e-15, or a running sum within ~1e-15 of gamma) that random data does not
produce; tie rules are tested on constructed exact ties.
"""
import doctest
import math

import pytest
import torch

import prefill_masks_reference as ref

F32_RTOL = 2.0**-22  # 2 ulp of float32


def make_batch(lens, hq, hk, d=32, dtype=torch.float32, seed=0, peaky=2.0):
    """Packed q [T, Hq, D], k, v [T, Hk, D] and cu_seqlens; q is scaled by `peaky` so that the
    attention is not uniform."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = (peaky * torch.randn(T, hq, d, generator=gen)).to(dtype)
    k = torch.randn(T, hk, d, generator=gen).to(dtype)
    v = torch.randn(T, hk, d, generator=gen).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    return q, k, v, cu


def structured_batch(lens, seed=5):
    """8 query heads on 2 KV heads with the two patterns FlexPrefill tells apart: KV head 0's
    queries lean towards a direction that every 97th key shares (vertical stripes), KV head 1's
    keys resemble the queries at their own position (local, slash)."""
    q, k, v, cu = make_batch(lens, 8, 2, seed=seed, peaky=1.0)
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(1)),
                                      dim=0)
    q[:, :4] += 4 * u
    k[::97, 0] += 4 * u
    k[:, 1] += 0.8 * q[:, 4:].mean(1)
    return q, k, v, cu


def assert_f32_close(got, want, what):
    assert got.dtype == torch.float32 and got.shape == want.shape, (what, got.shape, want.shape)
    torch.testing.assert_close(got.double(), want, rtol=F32_RTOL, atol=1e-30, msg=what)


def as_sets(idx, cnt):
    """Lists as sets, after checking the format: ascending, -1 padding, counts in range."""
    B, H, nq, m = idx.shape
    assert cnt.shape == (B, H, nq) and idx.dtype == cnt.dtype == torch.int32
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                c = int(cnt[b, h, i])
                row = idx[b, h, i]
                assert 0 <= c <= m and (row[c:] == -1).all()
                assert (row[1:c] > row[:max(c - 1, 0)]).all(), f"row ({b}, {h}, {i}) not ascending"
    return ref.lists_as_sets(idx, cnt)


# varlen: partial blocks, shorter than a block, empty, length 1, exactly one segment
LENS = [700, 37, 0, 1, 520, 256]


# ---- primitives -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
def test_last_block_attention(ab, dtype, group):
    q, k, _, cu = make_batch(LENS, 2 * group, 2, dtype=dtype, seed=group)
    bs, scale = 64, 0.2
    for group_mean in (False, True):
        P = ab.last_block_attention(q, k, cu, block_size=bs, scale=scale, group_mean=group_mean)
        H = 2 if group_mean else 2 * group
        want = torch.zeros(len(LENS), H, bs, max(LENS), dtype=torch.float64)
        for b, L in enumerate(LENS):
            s, n = int(cu[b]), min(bs, L)
            for h in range(H):
                heads = range(h * group, (h + 1) * group) if group_mean else [h]
                hk = h if group_mean else h // group
                for g in heads:
                    want[b, h, :n, :L] += ref.last_block_probs(
                        q[s:s + L, g].double(), k[s:s + L, hk].double(), bs, scale) / len(heads)
        assert_f32_close(P, want, f"probs group_mean={group_mean}")


def test_vertical_slash_sums(ab):
    q, k, _, cu = make_batch(LENS, 4, 2, seed=1)
    P = ab.last_block_attention(q, k, cu, block_size=64)
    vertical, slash = ab.vertical_slash_sums(P, cu)
    for b, L in enumerate(LENS):
        for h in range(4):
            v_ref, s_ref = ref.vertical_slash(P[b, h, :min(64, L), :L].double(), L)
            assert_f32_close(vertical[b, h, :L], v_ref, "vertical")
            assert_f32_close(slash[b, h, :L], s_ref, "slash")
            assert (vertical[b, h, L:] == 0).all() and (slash[b, h, L:] == 0).all()
    # Each row is a distribution, so both means sum to 1 per non-empty sequence.
    sums = vertical.double().sum(-1)
    assert torch.allclose(sums[torch.tensor(LENS) > 0], torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_pool(ab, dtype):
    _, k, _, cu = make_batch(LENS, 2, 2, dtype=dtype, seed=2)
    pooled = ab.block_pool(k, cu, block_size=64)
    assert pooled.shape == (len(LENS), 2, -(-max(LENS) // 64), 32)
    for b, L in enumerate(LENS):
        s, nb = int(cu[b]), -(-L // 64)
        for h in range(2):
            if L:
                assert_f32_close(pooled[b, h, :nb], ref.block_means(k[s:s + L, h].double(), 64),
                                 "pooled")
            assert (pooled[b, h, nb:] == 0).all()


@pytest.mark.parametrize("segment,group_mean", [(0, False), (0, True), (128, True), (256, False)])
def test_pooled_block_scores(ab, segment, group_mean):
    q, k, _, cu = make_batch(LENS, 4, 2, seed=3)
    bs, scale = 64, 0.3
    A = ab.pooled_block_scores(q, k, cu, block_size=bs, segment_size=segment, scale=scale,
                               group_mean=group_mean)
    H, G = (2, 2) if group_mean else (4, 1)
    for b, L in enumerate(LENS):
        s, nb = int(cu[b]), -(-L // bs)
        for h in range(H):
            heads = range(h * G, (h + 1) * G) if group_mean else [h]
            kbar = ref.block_means(k[s:s + L, h if group_mean else h // 2].double(), bs)
            want = torch.zeros(A.shape[2], A.shape[3], dtype=torch.float64)
            for g in heads:
                want[:nb, :nb] += ref.pooled_softmax(ref.block_means(q[s:s + L, g].double(), bs),
                                                     kbar, scale, segment // bs) / len(heads)
            assert_f32_close(A[b, h], want, f"scores b={b} h={h}")


def test_js_distance(ab):
    gen = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(5, 9, generator=gen), -1)
    q = torch.softmax(torch.randn(5, 9, generator=gen), -1)
    p[1, 3] = 0.0                                     # zero entries contribute 0, not NaN
    q[2, :4] = 0.0
    lengths = torch.tensor([9, 9, 9, 4, 0], dtype=torch.int32)
    got = ab.js_distance(p, q, lengths)
    want = torch.tensor([ref.js_distance(p[r, :n].double(), q[r, :n].double())
                         for r, n in enumerate(lengths.tolist())], dtype=torch.float64)
    assert_f32_close(got, want, "js")
    # Identical rows are at distance 0; disjoint ones at sqrt(ln 2), the maximum.
    same = ab.js_distance(p[:1], p[:1].clone())
    apart = ab.js_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert same.item() == 0.0 and apart.item() == pytest.approx(math.sqrt(math.log(2)), rel=1e-7)


def test_coverage_select_matches_reference(ab):
    gen = torch.Generator().manual_seed(5)
    scores = torch.softmax(3 * torch.randn(40, 33, generator=gen), -1)
    lengths = torch.randint(0, 34, (40,), generator=gen, dtype=torch.int32)
    forced = torch.rand(40, 33, generator=gen) < 0.05
    for gamma in (0.3, 0.9, 0.999):
        idx, cnt = ab.coverage_select(scores, gamma, lengths, forced)
        for r in range(40):
            n = int(lengths[r])
            want = set(ref.coverage(scores[r, :n], gamma).tolist())
            want |= set(torch.nonzero(forced[r, :n]).flatten().tolist())
            assert int(cnt[r]) == len(want)
            assert idx[r, :cnt[r]].tolist() == sorted(want)
            assert (idx[r, cnt[r]:] == -1).all()


def test_coverage_select_exactness_and_ties(ab):
    sel = lambda s, g, **kw: ab.coverage_select(torch.tensor([s], dtype=torch.float32), g, **kw)
    # A running sum equal to gamma is enough (>=): binary fractions, so the sums are exact.
    assert sel([0.25, 0.5, 0.25], 0.75)[1].tolist() == [2]
    # The smallest representable overshoot needs one more entry.
    assert sel([0.25, 0.5, 0.25], math.nextafter(0.75, 1))[1].tolist() == [3]
    # Ties go to the lower index, also among the entries past the first.
    assert sel([0.2, 0.3, 0.2, 0.3], 0.5)[0].tolist() == [[1, 3, -1, -1]]
    assert sel([0.2, 0.3, 0.2, 0.3], 0.7)[0].tolist() == [[0, 1, 3, -1]]
    # A total below gamma keeps everything; gamma <= 0 keeps nothing but the forced entries.
    assert sel([0.1, 0.2], 0.9)[1].tolist() == [2]
    forced = torch.tensor([[False, True, False]])
    assert sel([0.5, 0.1, 0.4], 0.0, forced=forced)[0].tolist() == [[1, -1, -1]]
    # Forced entries do not count toward gamma: 0.5 is still needed on top of forced 0.4.
    assert sel([0.5, 0.1, 0.4], 0.5, forced=torch.tensor([[False, False, True]]))[0].tolist() \
        == [[0, 2, -1]]
    # NaN ranks last and weighs 0.
    assert sel([float("nan"), 0.6, 0.4], 0.8)[0].tolist() == [[1, 2, -1]]
    # Rows shorter than n: entries past the length are never selected.
    idx, cnt = ab.coverage_select(torch.tensor([[0.1, 0.1, 0.8]]), 0.9,
                                  lengths=torch.tensor([2], dtype=torch.int32))
    assert idx.tolist() == [[0, 1, -1]] and cnt.tolist() == [2]


# ---- FlexPrefill ------------------------------------------------------------------------------

FLEX_CASES = [  # (lens, Hq, Hk, block, gamma, tau, min_budget, max_budget, dtype)
    (LENS, 4, 4, 64, 0.9, 0.1, 128, None, torch.float32),
    (LENS, 8, 2, 64, 0.95, 1.0, 64, None, torch.bfloat16),     # tau 1: every head query-aware
    (LENS, 4, 1, 64, 0.9, 0.0, 0, 256, torch.float16),          # tau 0: none; max budget binds
    ([900, 150, 333], 4, 1, 32, 0.8, 0.25, 100, None, torch.float32),
    # structured_batch: both patterns in one sequence, vertical budgets between min and nb
    ([1500, 700, 37], 8, 2, 64, 0.9, 0.085, 128, None, "structured"),
]


def flex_id(c):
    data = str(c[8]).replace("torch.", "")
    return f"G{c[1] // c[2]}-bs{c[3]}-g{c[4]}-tau{c[5]}-min{c[6]}-max{c[7]}-{data}"


def flex_inputs(case):
    lens, hq, hk, bs, dtype = case[0], case[1], case[2], case[3], case[8]
    if dtype == "structured":
        return structured_batch(lens)
    return make_batch(lens, hq, hk, dtype=dtype, seed=hq + bs)


@pytest.mark.parametrize("case", FLEX_CASES, ids=flex_id)
def test_flexprefill_matches_reference(ab, case):
    lens, hq, hk, bs, gamma, tau, min_budget, max_budget, _ = case
    q, k, _, cu = flex_inputs(case)
    idx, cnt, info = ab.flexprefill_mask(q, k, cu, block_size=bs, gamma=gamma, tau=tau,
                                         min_budget=min_budget, max_budget=max_budget)
    nq = -(-max(lens) // bs)
    assert idx.shape == (len(lens), hq, nq, nq)
    got = as_sets(idx, cnt)
    want = ref.flexprefill(q, k, cu, bs, gamma, tau, min_budget,
                           2**62 if max_budget is None else max_budget, 1 / math.sqrt(32))
    for b, L in enumerate(lens):
        nb = -(-L // bs)
        for h in range(hq):
            rows, pattern, nv, ns = want[b][h]
            assert got[b][h][:nb] == rows, f"lists differ at b={b}, h={h}"
            assert all(len(r) == 0 for r in got[b][h][nb:])
            assert (info["pattern"][b, h], info["vertical_blocks"][b, h],
                    info["slash_blocks"][b, h]) == (pattern, nv, ns), (b, h)
            causal = nb * (nb + 1) // 2
            listed = sum(len(r) for r in rows)
            assert info["density"][b, h].item() == pytest.approx(
                listed / causal if causal else 1.0, rel=1e-7)
            # Every list is causal, holds the first block and the diagonal block.
            for i, r in enumerate(got[b][h][:nb]):
                assert max(r) <= i and {0, i} <= r
    patterns = set(info["pattern"][torch.tensor(lens) > max(2 * bs, -(-min_budget // bs) * bs)]
                   .flatten().tolist())
    assert patterns == {1} if tau == 1.0 else patterns <= {0, 1}
    if tau == 0.0:
        assert patterns == {0}
    if case[8] == "structured":
        assert info["pattern"][0].tolist() == [0] * 4 + [1] * 4 or \
            info["pattern"][1].tolist() == [0] * 4 + [1] * 4
        assert 2 < info["vertical_blocks"][0, 0] < -(-lens[0] // bs)


def test_flexprefill_budget_uses_the_real_block_size(ab):
    """The vertical budget is tokens // block_size + 1 (the original divides by 128): with block
    32 and a head whose vertical mass needs many tokens, the budget exceeds what // 128 gives."""
    q, k, _, cu = make_batch([2048], 1, 1, seed=9, peaky=0.0)      # q = 0: uniform attention
    _, _, info = ab.flexprefill_mask(q, k, cu, block_size=32, gamma=0.9, tau=0.0, min_budget=0)
    # Uniform over the last 32 queries' causal windows: >= 90 % of 2048 columns are needed.
    tokens_needed = 0.9 * 2016
    assert info["vertical_blocks"].item() >= tokens_needed // 32
    assert info["vertical_blocks"].item() > tokens_needed // 128 + 1


def test_flexprefill_short_sequences_are_dense(ab):
    q, k, _, cu = make_batch([256, 257, 1024, 1025], 2, 1, seed=6)
    idx, cnt, info = ab.flexprefill_mask(q, k, cu, block_size=128, min_budget=1024)
    # Dense up to max(2 * 128, 1024) tokens: every causal block, pattern 2, NaN distance.
    assert info["pattern"][:3].tolist() == [[2, 2]] * 3 and info["pattern"][3].tolist() != [2, 2]
    assert torch.isnan(info["js_distance"][:3]).all() and (info["density"][:3] == 1).all()
    for b, L in enumerate([256, 257, 1024]):
        nb = -(-L // 128)
        assert cnt[b, 0, :nb].tolist() == list(range(1, nb + 1))


# ---- PBS-Attn ---------------------------------------------------------------------------------

PBS_LENS = [1000, 37, 0, 256, 512, 300, 700]   # tail, shorter than a segment, exactly 1 / 2 segs


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pbs_permute(ab, group, dtype):
    q, k, v, cu = make_batch(PBS_LENS, 2 * group, 2, dtype=dtype, seed=group)
    bs, seg = 64, 256
    k_perm, v_perm, pos = ab.pbs_permute(q, k, v, cu, block_size=bs, segment_size=seg)
    assert pos.dtype == torch.int32 and k_perm.dtype == dtype and pos.shape == (sum(PBS_LENS), 2)
    for b, L in enumerate(PBS_LENS):
        s = int(cu[b])
        for h in range(2):
            p = pos[s:s + L, h].long()
            # Rows copied bit for bit from the positions they claim.
            assert torch.equal(k_perm[s:s + L, h], k[s + p, h])
            assert torch.equal(v_perm[s:s + L, h], v[s + p, h])
            complete = L // seg
            for c in range(complete):   # a permutation within each complete segment
                segment = range(c * seg, (c + 1) * seg)
                assert sorted(p[segment].tolist()) == list(segment)
            assert p[complete * seg:].tolist() == list(range(complete * seg, L))   # tail stays
            if complete == 0 or L == seg:   # nothing to gain: identity
                assert p.tolist() == list(range(L))
    assert torch.equal(pos.long(), ref.pbs_positions(q, k, cu, bs, seg, 1 / math.sqrt(32)))


PBS_CASES = [  # (Hq, Hk, block, segment, threshold, force_first, dtype)
    (4, 4, 64, 256, 0.9, True, torch.float32),
    (8, 2, 64, 128, 0.8, True, torch.bfloat16),
    (4, 1, 32, 128, 0.95, False, torch.float16),
    (2, 2, 64, 64, 0.5, True, torch.float32),       # segment = one block
]


@pytest.mark.parametrize("case", PBS_CASES, ids=lambda c: f"G{c[0] // c[1]}-bs{c[2]}-S{c[3]}-"
                         f"t{c[4]}-first{int(c[5])}-{str(c[6]).replace('torch.', '')}")
def test_pbs_mask_matches_reference(ab, case):
    hq, hk, bs, seg, threshold, force_first, dtype = case
    q, k, v, cu = make_batch(PBS_LENS, hq, hk, dtype=dtype, seed=bs + seg)
    k_perm, _, pos = ab.pbs_permute(q, k, v, cu, block_size=bs, segment_size=seg)
    idx, cnt, info = ab.pbs_mask(q, k_perm, cu, pos, block_size=bs, segment_size=seg,
                                 threshold=threshold, force_first=force_first)
    nq = -(-max(PBS_LENS) // bs)
    assert idx.shape == (len(PBS_LENS), hk, nq, nq)
    got = as_sets(idx, cnt)
    want = ref.pbs_mask(q, k_perm, cu, pos, bs, seg, threshold, force_first, 1 / math.sqrt(32))
    for b, L in enumerate(PBS_LENS):
        nb = -(-L // bs)
        for h in range(hk):
            assert got[b][h][:nb] == want[b][h], f"lists differ at b={b}, h={h}"
            assert all(len(r) == 0 for r in got[b][h][nb:])
            p = pos[int(cu[b]):int(cu[b]) + L, h]
            causal = sum(int(p[j * bs:(j + 1) * bs].min()) <= min((i + 1) * bs, L) - 1
                         for i in range(nb) for j in range(nb))
            listed = sum(len(r) for r in want[b][h])
            assert info["density"][b, h].item() == pytest.approx(
                listed / causal if causal else 1.0, rel=1e-7)
    # A sparse selection happened somewhere (the test data is not all-dense).
    assert (info["density"][torch.tensor(PBS_LENS) > 2 * seg] < 1).any()


def test_pbs_mask_causality_by_original_position(ab):
    """Hand-made key positions (block 2, segment 4 = 2 blocks, one KV head): a diagonal-segment
    block is listed when its smallest original position is <= the query block's last position,
    also when that block lies after the query block in storage, and not listed when every key in
    it is in the future. threshold 1 keeps every off-diagonal block."""
    q, k, _, cu = make_batch([8], 1, 1, seed=15)
    pos = torch.tensor([[0], [3], [1], [2], [7], [6], [5], [4]], dtype=torch.int32)
    # block min positions: 0, 1 | 6, 4; query blocks' last positions: 1, 3 | 5, 7
    idx, cnt, info = ab.pbs_mask(q, k, cu, pos, block_size=2, segment_size=4, threshold=1.0)
    assert as_sets(idx, cnt)[0][0] == [{0, 1}, {0, 1}, {0, 1, 3}, {0, 1, 2, 3}]
    assert info["density"].tolist() == [[1.0]]
    # Without force_first and with a tiny threshold: one off-diagonal block per row of segment 1.
    idx, cnt, _ = ab.pbs_mask(q, k, cu, pos, block_size=2, segment_size=4, threshold=1e-9,
                              force_first=False)
    assert cnt[0, 0].tolist() == [2, 2, 2, 3]


def test_pbs_lists_and_positions_give_the_original_masked_attention(ab):
    """Attention over k_perm / v_perm with the lists and key_positions (causal by original
    position) equals attention in the original key order under the same mask mapped back; the
    diagonal segment is complete; a single-segment sequence is dense causal attention."""
    lens, hq, hk, bs, seg = [700, 256, 90, 1], 4, 2, 64, 128
    q, k, v, cu = make_batch(lens, hq, hk, seed=11)
    scale = 1 / math.sqrt(32)
    k_perm, v_perm, pos = ab.pbs_permute(q, k, v, cu, block_size=bs, segment_size=seg)
    idx, cnt, _ = ab.pbs_mask(q, k_perm, cu, pos, block_size=bs, segment_size=seg)
    out_perm = ref.masked_attention(q, k_perm, v_perm, cu, idx, cnt, bs, scale, key_positions=pos)
    G = hq // hk
    for b, L in enumerate(lens):
        s = int(cu[b])
        for h in range(hq):
            p = pos[s:s + L, h // G].long()
            allowed = ref.token_mask(idx[b, h // G], cnt[b, h // G], L, bs)   # [t, stored row]
            visible = allowed & (p[None, :] <= torch.arange(L)[:, None])
            original = torch.zeros(L, L, dtype=torch.bool)
            original[:, p] = visible                                        # [t, position]
            # Every key of the query's own segment at or before it is visible.
            same_segment = (torch.arange(L)[None, :] // seg) == (torch.arange(L)[:, None] // seg)
            causal = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
            assert (original | ~(same_segment & causal)).all()
            logits = scale * q[s:s + L, h].double() @ k[s:s + L, h // G].double().T
            w = torch.softmax(logits.masked_fill(~original, -math.inf), -1).nan_to_num(0.0)
            want = w @ v[s:s + L, h // G].double()
            torch.testing.assert_close(out_perm[s:s + L, h], want, rtol=1e-12, atol=1e-12)
            if L <= seg:   # one segment: dense causal attention
                assert torch.equal(original, causal)


def test_flexprefill_lists_give_masked_attention_of_their_blocks(ab):
    """FlexPrefill lists (H = Hq) expanded to a token mask: a short (dense) sequence gets causal
    attention; a long one at gamma 0.5 skips blocks, yet every query keeps its own block and the
    first one, so no row is left without keys."""
    lens, hq, hk, bs = [1200, 100], 4, 2, 64
    q, k, v, cu = make_batch(lens, hq, hk, seed=12, peaky=4.0)
    scale = 1 / math.sqrt(32)
    idx, cnt, info = ab.flexprefill_mask(q, k, cu, block_size=bs, gamma=0.5, min_budget=128)
    out = ref.masked_attention(q, k, v, cu, idx, cnt, bs, scale)
    s, L = int(cu[1]), 100
    causal = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
    for h in range(hq):
        logits = scale * q[s:s + L, h].double() @ k[s:s + L, h // 2].double().T
        w = torch.softmax(logits.masked_fill(~causal, -math.inf), -1)
        torch.testing.assert_close(out[s:s + L, h], w @ v[s:s + L, h // 2].double(), rtol=1e-12,
                                   atol=1e-12)
        mask = ref.token_mask(idx[0, h], cnt[0, h], 1200, bs)
        assert mask[torch.arange(1200), torch.arange(1200)].all() and mask[:, 0].all()
    assert (info["density"][0] < 1).all() and (info["density"][1] == 1).all()


@pytest.mark.skipif(not hasattr(__import__("absparse"), "sparse_prefill"),
                    reason="absparse.sparse_prefill (issue 7's prefill op) is not in this build")
def test_lists_feed_sparse_prefill(ab):
    """The builders' outputs go straight into sparse_prefill, which must give the float64 masked
    attention of the lists (float32 inputs; basis: float64 accumulation rounded once to float32,
    so 2 ulp of float32 plus float64 summation noise)."""
    lens, hq, hk, bs, seg = [700, 90, 0, 300], 4, 2, 64, 128
    q, k, v, cu = make_batch(lens, hq, hk, seed=16)
    scale = 1 / math.sqrt(32)
    idx, cnt, _ = ab.flexprefill_mask(q, k, cu, block_size=bs, min_budget=128)
    out = ab.sparse_prefill(q, k, v, cu, idx, cnt, q_block=bs, k_block=bs)
    want = ref.masked_attention(q, k, v, cu, idx, cnt, bs, scale)
    torch.testing.assert_close(out.double(), want, rtol=F32_RTOL, atol=1e-6)
    k_perm, v_perm, pos = ab.pbs_permute(q, k, v, cu, block_size=bs, segment_size=seg)
    idx, cnt, _ = ab.pbs_mask(q, k_perm, cu, pos, block_size=bs, segment_size=seg)
    out = ab.sparse_prefill(q, k_perm, v_perm, cu, idx, cnt, q_block=bs, k_block=bs,
                            key_positions=pos)
    want = ref.masked_attention(q, k_perm, v_perm, cu, idx, cnt, bs, scale, key_positions=pos)
    torch.testing.assert_close(out.double(), want, rtol=F32_RTOL, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_raise_value_error(ab):
    """No CUDA kernel for the builders yet: CUDA inputs are rejected, naming the argument."""
    q, k, v, cu = (x.cuda() for x in make_batch([300], 4, 2))
    with pytest.raises(ValueError, match="expected a CPU tensor"):
        ab.flexprefill_mask(q, k, cu)
    with pytest.raises(ValueError, match="expected a CPU tensor"):
        ab.pbs_permute(q, k, v, cu)


# ---- inputs -----------------------------------------------------------------------------------

def test_strided_inputs_give_the_same_results(ab):
    q, k, v, cu = make_batch([500, 300], 4, 2, seed=13)
    wide_q = torch.zeros(q.shape[0], 2 * q.shape[1], 48)
    wide_q[:, ::2, 8:40] = q
    wide_k = torch.zeros(k.shape[0], k.shape[1], 64)
    wide_k[:, :, 16:48] = k
    sq, sk = wide_q[:, ::2, 8:40], wide_k[:, :, 16:48]
    assert not sq.is_contiguous() and not sk.is_contiguous()
    for x, y in zip(ab.flexprefill_mask(q, k, cu, block_size=64, min_budget=64)[:2],
                    ab.flexprefill_mask(sq, sk, cu, block_size=64, min_budget=64)[:2]):
        assert torch.equal(x, y)
    perm, perm_s = ab.pbs_permute(q, k, v, cu, 64, 128), ab.pbs_permute(sq, sk, v, cu, 64, 128)
    assert all(torch.equal(x, y) for x, y in zip(perm, perm_s))
    assert torch.equal(ab.pbs_mask(q, perm[0], cu, perm[2], 64, 128)[0],
                       ab.pbs_mask(sq, perm[0], cu, perm[2].t().contiguous().t(), 64, 128)[0])
    assert torch.equal(ab.block_pool(k, cu, 64), ab.block_pool(sk, cu, 64))


@pytest.mark.parametrize("lens", [[], [0, 0]], ids=["B0", "all-empty"])
def test_empty_batches(ab, lens):
    q, k, v, cu = make_batch(lens, 4, 2)
    idx, cnt, info = ab.flexprefill_mask(q, k, cu)
    assert idx.shape == (len(lens), 4, 0, 0) and cnt.shape == (len(lens), 4, 0)
    assert (info["density"] == 1).all() and (info["pattern"] == 2).all()
    k_perm, v_perm, pos = ab.pbs_permute(q, k, v, cu)
    assert k_perm.shape == k.shape and pos.shape == (0, 2)
    idx, cnt, info = ab.pbs_mask(q, k_perm, cu, pos)
    assert idx.shape == (len(lens), 2, 0, 0) and (info["density"] == 1).all()
    assert ab.last_block_attention(q, k, cu).shape == (len(lens), 4, 128, 0)
    assert ab.pooled_block_scores(q, k, cu).shape == (len(lens), 4, 0, 0)


def test_non_finite_inputs_give_well_formed_lists(ab):
    """NaN or inf in q (docs: a softmax row with a non-finite logit is NaN; NaN ranks last and
    weighs 0): the lists stay ascending and keep the forced blocks; other heads are unaffected."""
    q, k, v, cu = make_batch([700, 300], 4, 2, seed=17)
    q_bad = q.clone()
    q_bad[650, 0, 3] = float("nan")
    q_bad[200, 1, 0] = float("inf")
    idx, cnt, info = ab.flexprefill_mask(q_bad, k, cu, block_size=64, min_budget=64)
    rows = as_sets(idx, cnt)
    assert all({0, i} <= rows[0][h][i] for h in range(2) for i in range(11))
    good_idx, good_cnt, _ = ab.flexprefill_mask(q, k, cu, block_size=64, min_budget=64)
    assert torch.equal(idx[:, 2:], good_idx[:, 2:]) and torch.equal(cnt[:, 2:], good_cnt[:, 2:])
    k_perm, v_perm, pos = ab.pbs_permute(q_bad, k, v, cu, block_size=64, segment_size=128)
    idx, cnt, _ = ab.pbs_mask(q_bad, k_perm, cu, pos, block_size=64, segment_size=128)
    as_sets(idx, cnt)
    assert sorted(pos[:640, 0].tolist()) == list(range(640))


def _q_k_cu():
    q, k, v, cu = make_batch([300, 200], 4, 2, seed=14)
    return q, k, v, cu


@pytest.mark.parametrize("call,match", [
    (lambda ab, q, k, v, cu:
        ab.flexprefill_mask(q, k, torch.tensor([0, 300, 200], dtype=torch.int32)),
     r"cu_seqlens\[2\]: expected >= cu_seqlens\[1\] = 300"),
    (lambda ab, q, k, v, cu:
        ab.flexprefill_mask(q, k, torch.tensor([0, 300, 499], dtype=torch.int32)),
     r"cu_seqlens\[2\]: expected T = 500"),
    (lambda ab, q, k, v, cu:
        ab.flexprefill_mask(q, k, torch.tensor([1, 300, 500], dtype=torch.int32)),
     r"cu_seqlens\[0\]: expected 0, got 1"),
    (lambda ab, q, k, v, cu: ab.flexprefill_mask(q, k, cu.long()),
     r"cu_seqlens: unsupported dtype torch.int64"),
    (lambda ab, q, k, v, cu: ab.flexprefill_mask(q, k[:, :, :16], cu),
     r"k.shape\[2\]: expected 32 \(D, the head dim of q\), got 16"),
    (lambda ab, q, k, v, cu: ab.flexprefill_mask(q[:, :3], k, cu),
     r"q.shape\[1\]: expected a multiple of Hk = 2"),
    (lambda ab, q, k, v, cu: ab.flexprefill_mask(q, k.half(), cu),
     r"k: expected the dtype of q \(float32\), got float16"),
    (lambda ab, q, k, v, cu: ab.flexprefill_mask(q.int(), k, cu), r"q: expected dtype float16"),
    (lambda ab, q, k, v, cu: ab.flexprefill_mask(q[0], k, cu), r"q: expected 3 dimensions"),
    (lambda ab, q, k, v, cu:
        ab.flexprefill_mask(q.transpose(1, 2).contiguous().transpose(1, 2), k, cu),
     r"q: expected a contiguous last dimension"),
    (lambda ab, q, k, v, cu:
        ab.flexprefill_mask(q, k, cu, block_size=0), r"block_size: expected an int"),
    (lambda ab, q, k, v, cu:
        ab.flexprefill_mask(q, k, cu, gamma=1.5), r"gamma: expected a value in \(0, 1\], got 1.5"),
    (lambda ab, q, k, v, cu:
        ab.flexprefill_mask(q, k, cu, tau=-0.1), r"tau: expected a finite value >= 0"),
    (lambda ab, q, k, v, cu: ab.flexprefill_mask(q, k, cu, min_budget=1024, max_budget=512),
     r"max_budget: expected >= max\(min_budget, 1\) = 1024 tokens, got 512"),
    (lambda ab, q, k, v, cu:
        ab.flexprefill_mask(q, k, cu, scale=float("nan")), r"scale: expected a finite float"),
    (lambda ab, q, k, v, cu: ab.pbs_permute(q, k, v, cu, block_size=64, segment_size=96),
     r"segment_size: expected a positive multiple of block_size 64, got 96"),
    (lambda ab, q, k, v, cu: ab.pbs_permute(q, k, v[:, :1], cu), r"v.shape\[1\]: expected 2"),
    (lambda ab, q, k, v, cu: ab.pbs_mask(q, k, cu, torch.zeros(500, 2, dtype=torch.int32)),
     r"key_positions\[1, 0\]: expected a position in \[0, 256\) not used before"),
    (lambda ab, q, k, v, cu: ab.pbs_mask(q, k, cu, _swap(_identity(cu, 2), 10, 260)),
     r"key_positions\[10, 0\]: expected a position in \[0, 256\) .* got 260"),
    (lambda ab, q, k, v, cu: ab.pbs_mask(q, k, cu, _identity(cu, 2) - 1),
     r"key_positions\[0, 0\]: expected a position in \[0, 256\) .* got -1"),
    (lambda ab, q, k, v, cu: ab.pbs_mask(q, k, cu, _identity(cu, 2).long()),
     r"key_positions: unsupported dtype torch.int64"),
    (lambda ab, q, k, v, cu: ab.pbs_mask(q, k, cu, _identity(cu, 2), threshold=0.0),
     r"threshold: expected a value in \(0, 1\], got 0"),
    (lambda ab, q, k, v, cu:
        ab.coverage_select(torch.rand(2, 3), 0.5, torch.tensor([1, 4], dtype=torch.int32)),
     r"lengths\[1\]: expected a value in \[0, 3\], got 4"),
    (lambda ab, q, k, v, cu: ab.coverage_select(torch.rand(2, 3).double(), 0.5),
     r"scores: unsupported dtype torch.float64"),
    (lambda ab, q, k, v, cu: ab.pooled_block_scores(q, k, cu, block_size=64, segment_size=100),
     r"segment_size: expected a positive multiple of block_size 64 \(or 0\), got 100"),
])
def test_invalid_arguments_raise_value_error(ab, call, match):
    q, k, v, cu = _q_k_cu()
    with pytest.raises(ValueError, match=match):
        call(ab, q, k, v, cu)


def _identity(cu, hk):
    lens = ref.lengths(cu)
    return torch.cat([torch.arange(L, dtype=torch.int32) for L in lens])[:, None].repeat(1, hk)


def _swap(pos, a, b):
    pos = pos.clone()
    pos[[a, b]] = pos[[b, a]]
    return pos


def test_docstring_examples(ab):
    import absparse.prefill_masks as module

    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

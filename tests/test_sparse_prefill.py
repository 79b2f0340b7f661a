"""sparse_prefill (docs/prefill.md) against an independent float64 reference.

The reference below is dense attention over an explicit token mask, one sequence at a time: the
block lists are expanded to a [Hq, L, L] boolean mask (listed block AND causal by original
position), and out / lse come from a masked softmax in float64. Nothing in it imports absparse.

Tolerances: the CPU op attends in float64 and rounds once to the output dtype, like the reference;
conftest.assert_out_close allows eps * |out| (twice the final rounding) + 1e-9 * max|v| for the
float64 summation order, and lse (float32 of a float64 value) 1e-5. -inf / NaN positions must
match exactly.
"""
import math

import pytest
import torch

from conftest import assert_bitwise_equal, assert_lse_close, assert_out_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------------------------------
# Reference (float64, dense over the expanded mask)
# ------------------------------------------------------------------------------------------------

def listed_blocks(block_indices, block_counts, b, L, q_block, k_block):
    """bool [H, ceil(L / q_block), ceil(L / k_block)]: key block j listed for query block i."""
    H = block_indices.shape[1]
    nq, nk = -(-L // q_block), -(-L // k_block)
    listed = torch.zeros(H, nq, nk, dtype=torch.bool)
    for h in range(H):
        for i in range(nq):
            c = int(block_counts[b, h, i])
            listed[h, i, block_indices[b, h, i, :c].long()] = True
    return listed


def token_mask(listed, L, q_block, k_block, positions):
    """bool [H, L, L]: query t sees stored key row r. positions [H, L]: original position of row r."""
    t = torch.arange(L)
    mask = listed[:, t // q_block][:, :, t // k_block]           # [H, L (t), L (r)] listed block
    return mask & (positions[:, None, :] <= t[None, :, None])   # causal by original position


def masked_attention(q, k, v, mask, scale):
    """q [L, Hq, D], k/v [L, Hq, D] (float64), mask bool [Hq, L, L] -> out [L, Hq, D], lse [L, Hq]."""
    logits = scale * torch.einsum("thd,rhd->htr", q, k)          # [Hq, L, L]
    logits = logits.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)                        # [Hq, L], -inf for empty rows
    w = torch.where(mask, torch.exp(logits - lse[..., None]), 0.0)   # [Hq, L, L]
    out = torch.einsum("htr,rhd->thd", w, v)                     # [L, Hq, D], 0 for empty rows
    return out, lse.T


def reference_prefill(q, k, v, cu_seqlens, block_indices, block_counts, q_block, k_block,
                      key_positions=None, scale=None):
    """float64 out [T, Hq, D] and lse [T, Hq] of sparse_prefill's definition."""
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    per_q_head = block_indices.shape[1] == Hq
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    lse = torch.full((T, Hq), -math.inf, dtype=torch.float64)
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        L = e - s
        if L == 0:
            continue
        listed = listed_blocks(block_indices, block_counts, b, L, q_block, k_block)
        if not per_q_head:
            listed = listed.repeat_interleave(G, 0)              # [Hq, nq, nk]
        if key_positions is None:
            positions = torch.arange(L).expand(Hq, L)            # [Hq, L]
        else:
            positions = key_positions[s:e].long().T.repeat_interleave(G, 0)
        mask = token_mask(listed, L, q_block, k_block, positions)
        kk = k[s:e].double().repeat_interleave(G, 1)             # [L, Hq, D]
        vv = v[s:e].double().repeat_interleave(G, 1)
        out[s:e], lse[s:e] = masked_attention(q[s:e].double(), kk, vv, mask, scale)
    return out, lse


def dense_causal(q, k, v, cu_seqlens):
    """Plain causal attention per sequence (float64), for the every-causal-block property."""
    G = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
    cu = cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        L = e - s
        causal = torch.ones(L, L, dtype=torch.bool).tril().expand(q.shape[1], L, L)
        kk = k[s:e].double().repeat_interleave(G, 1)
        vv = v[s:e].double().repeat_interleave(G, 1)
        out[s:e], lse[s:e] = masked_attention(q[s:e].double(), kk, vv, causal, q.shape[2] ** -0.5)
    return out, lse


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def make_batch(lens, hq, hk, dim, dtype, gen):
    """q [T, Hq, D], k, v [T, Hk, D] (standard normal, rounded to dtype), cu_seqlens int32 [B+1]."""
    T = sum(lens)
    q = torch.randn(T, hq, dim, generator=gen).to(dtype)
    k = torch.randn(T, hk, dim, generator=gen).to(dtype)
    v = torch.randn(T, hk, dim, generator=gen).to(dtype)
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return q, k, v, cu


def random_lists(lens, H, q_block, k_block, density, gen, extra_rows=0):
    """Random strictly ascending lists: each key block of the sequence (causal or not) is kept with
    probability `density`. Padding is garbage on purpose (never read): -5 past the count, and
    count 10^6 in rows of query blocks past the end of a sequence."""
    max_len = max(lens, default=0)
    nq = -(-max_len // q_block) + extra_rows
    m = max(1, -(-max_len // k_block))
    idx = torch.full((len(lens), H, nq, m), -5, dtype=torch.int32)
    cnt = torch.full((len(lens), H, nq), 10 ** 6, dtype=torch.int32)
    for b, L in enumerate(lens):
        nk = -(-L // k_block)
        for h in range(H):
            for i in range(-(-L // q_block)):
                keep = (torch.rand(nk, generator=gen) < density).nonzero().flatten()
                cnt[b, h, i] = keep.numel()
                idx[b, h, i, :keep.numel()] = keep.to(torch.int32)
    return idx, cnt


def segment_permutation(L, segment, gen):
    """int32 [L]: original position of each stored row when every `segment` consecutive positions
    (the last segment partial) are shuffled among themselves (PBS-Attn's within-segment sort)."""
    perm = torch.empty(L, dtype=torch.int64)
    for s in range(0, L, segment):
        n = min(segment, L - s)
        perm[s:s + n] = s + torch.randperm(n, generator=gen)
    return perm.to(torch.int32)


# ------------------------------------------------------------------------------------------------
# Correctness
# ------------------------------------------------------------------------------------------------

LENS = [0, 1, 63, 64, 65, 200, 257]   # empty, single token, partial and exact blocks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_block,k_block", [(64, 64), (128, 128), (64, 128), (128, 64)])
def test_every_causal_block_is_dense_causal_attention(ab, dtype, q_block, k_block):
    gen = torch.Generator().manual_seed(q_block + k_block)
    q, k, v, cu = make_batch(LENS, 4, 2, 64, dtype, gen)
    idx, cnt = ab.dense_causal_block_lists(cu, q_block, k_block, num_heads=2)
    out, lse = ab.sparse_prefill(q, k, v, cu, idx, cnt, q_block, k_block, return_lse=True)
    ref, ref_lse = dense_causal(q, k, v, cu)
    assert_out_close(out, ref, dtype, float(v.abs().max()))
    assert_lse_close(lse, ref_lse)


# (H, Hq, Hk, D, q_block, k_block, dtype, density): GQA 1-16, lists per query or KV head, D 64 /
# 128 / odd, both block-size orders.
CASES = [
    ("q", 2, 2, 64, 64, 64, torch.float32, 0.5),
    ("kv", 4, 2, 128, 64, 128, torch.bfloat16, 0.4),
    ("q", 4, 1, 37, 128, 64, torch.float16, 0.6),
    ("kv", 8, 1, 64, 128, 128, torch.float32, 0.3),
    ("q", 16, 1, 64, 64, 64, torch.bfloat16, 0.5),
    ("kv", 16, 1, 128, 128, 64, torch.float32, 0.5),
    ("q", 3, 3, 24, 64, 32, torch.float32, 0.7),
]
FULL_CASES = [
    (H, hq, hk, d, qb, kb, dt, dens)
    for H in ("q", "kv") for hq, hk in [(1, 1), (2, 1), (4, 2), (8, 2), (16, 1)]
    for d, qb, kb, dt, dens in [(64, 64, 128, torch.float16, 0.5), (128, 128, 64, torch.float32, 0.3),
                                (33, 48, 80, torch.bfloat16, 0.6)]
]


def check_random_lists(ab, H, hq, hk, dim, q_block, k_block, dtype, density, seed):
    gen = torch.Generator().manual_seed(seed)
    lens = [1, 0, 130, 300, 64]
    q, k, v, cu = make_batch(lens, hq, hk, dim, dtype, gen)
    idx, cnt = random_lists(lens, hq if H == "q" else hk, q_block, k_block, density, gen,
                            extra_rows=1)
    out, lse = ab.sparse_prefill(q, k, v, cu, idx, cnt, q_block, k_block, return_lse=True)
    ref, ref_lse = reference_prefill(q, k, v, cu, idx, cnt, q_block, k_block)
    assert_out_close(out, ref, dtype, float(v.abs().max()))
    assert_lse_close(lse, ref_lse)
    again = ab.sparse_prefill(q, k, v, cu, idx, cnt, q_block, k_block)
    assert_bitwise_equal(again, out, "re-run")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-G{c[1] // c[2]}-D{c[3]}-q{c[4]}k{c[5]}")
def test_random_lists_match_reference(ab, case):
    check_random_lists(ab, *case, seed=7)


@pytest.mark.full
@pytest.mark.parametrize("case", FULL_CASES, ids=str)
def test_random_lists_sweep(ab, case):
    check_random_lists(ab, *case, seed=11)


@pytest.mark.parametrize("H", ["q", "kv"])
def test_key_positions_equal_unpermuted_attention(ab, H):
    """Keys and values permuted within segments (per KV head, like PBS-Attn) with key_positions:
    the result equals attention over the original order with the stored-space token mask mapped
    back (mask_orig[t, pos(r)] = mask_perm[t, r])."""
    gen = torch.Generator().manual_seed(3)
    lens, hq, hk, q_block, k_block = [300, 0, 77, 1, 200], 4, 2, 64, 64
    q, k, v, cu = make_batch(lens, hq, hk, 64, torch.float32, gen)
    idx, cnt = random_lists(lens, hq if H == "q" else hk, q_block, k_block, 0.5, gen)
    # Per sequence and KV head: segments of 128 (PBS) for some, one whole-sequence shuffle for others.
    positions = torch.cat([
        torch.stack([segment_permutation(L, 128 if h == 0 else max(L, 1), gen) for h in range(hk)], 1)
        for L in lens])                                          # [T, Hk] original position of row r
    k_perm, v_perm = torch.empty_like(k), torch.empty_like(v)   # stored row r holds original key pos(r)
    for b, L in enumerate(lens):
        s = int(cu[b])
        for h in range(hk):
            k_perm[s:s + L, h] = k[s + positions[s:s + L, h].long(), h]
            v_perm[s:s + L, h] = v[s + positions[s:s + L, h].long(), h]
    out, lse = ab.sparse_prefill(q, k_perm, v_perm, cu, idx, cnt, q_block, k_block,
                                 key_positions=positions, return_lse=True)

    G = hq // hk
    ref = torch.zeros(q.shape, dtype=torch.float64)
    ref_lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
    for b, L in enumerate(lens):
        s = int(cu[b])
        if L == 0:
            continue
        listed = listed_blocks(idx, cnt, b, L, q_block, k_block)
        if H == "kv":
            listed = listed.repeat_interleave(G, 0)
        pos = positions[s:s + L].long().T.repeat_interleave(G, 0)   # [Hq, L]
        mask_perm = token_mask(listed, L, q_block, k_block, pos)   # [Hq, L, L] stored order
        mask = torch.zeros_like(mask_perm)
        mask.scatter_(2, pos[:, None, :].expand(-1, L, -1), mask_perm)  # original order
        kk = k[s:s + L].double().repeat_interleave(G, 1)
        vv = v[s:s + L].double().repeat_interleave(G, 1)
        ref[s:s + L], ref_lse[s:s + L] = masked_attention(q[s:s + L].double(), kk, vv, mask, 0.125)
    assert_out_close(out, ref, torch.float32, float(v.abs().max()))
    assert_lse_close(lse, ref_lse)
    # The identity permutation is the same as no key_positions, bit for bit.
    identity = torch.cat([torch.arange(L, dtype=torch.int32)[:, None].expand(L, hk) for L in lens])
    assert_bitwise_equal(ab.sparse_prefill(q, k, v, cu, idx, cnt, q_block, k_block,
                                           key_positions=identity),
                         ab.sparse_prefill(q, k, v, cu, idx, cnt, q_block, k_block), "identity")


def test_empty_rows_give_zero_and_minus_inf(ab):
    """Rows that see nothing: count 0, only future blocks listed, or (permuted) listed keys whose
    original positions all lie after the query."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, cu = make_batch([256], 2, 1, 64, torch.bfloat16, gen)
    idx = torch.full((1, 1, 4, 2), -1, dtype=torch.int32)
    cnt = torch.tensor([[[0, 2, 1, 1]]], dtype=torch.int32)
    idx[0, 0, 1] = torch.tensor([2, 3])        # query block 1 lists only future blocks
    idx[0, 0, 2, 0] = 2                         # its own block: causal inside
    idx[0, 0, 3, 0] = 0
    out, lse = ab.sparse_prefill(q, k, v, cu, idx, cnt, 64, 64, return_lse=True)
    assert (out[:128] == 0).all() and (lse[:128] == -math.inf).all()
    assert torch.isfinite(lse[128:]).all()
    ref, ref_lse = reference_prefill(q, k, v, cu, idx, cnt, 64, 64)
    assert_out_close(out, ref, torch.bfloat16, float(v.abs().max()))
    assert_lse_close(lse, ref_lse)
    # Reversed positions: stored block 0 holds original positions 255..192, all after every query
    # of query block 0 (positions 0..63), which lists only that block: all rows empty.
    positions = torch.arange(255, -1, -1, dtype=torch.int32)[:, None]
    cnt = torch.tensor([[[1, 0, 0, 0]]], dtype=torch.int32)
    idx[0, 0, 0, 0] = 0
    out, lse = ab.sparse_prefill(q, k, v, cu, idx, cnt, 64, 64, key_positions=positions,
                                 return_lse=True)
    assert (out == 0).all() and (lse == -math.inf).all()


def test_empty_batches(ab):
    for lens in ([], [0, 0, 0]):
        q, k, v, cu = make_batch(lens, 4, 2, 64, torch.float16, torch.Generator())
        idx, cnt = ab.dense_causal_block_lists(cu, 128, 128, 4)
        out, lse = ab.sparse_prefill(q, k, v, cu, idx, cnt, return_lse=True)
        assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


def test_non_contiguous_inputs_and_outputs(ab):
    """Strided views of every tensor (float rows keep a contiguous last dimension) give the
    contiguous result bit for bit, and out= / lse buffers are written in place."""
    gen = torch.Generator().manual_seed(9)
    lens, hq, hk = [100, 0, 190], 4, 2
    q, k, v, cu = make_batch(lens, hq, hk, 64, torch.float16, gen)
    idx, cnt = random_lists(lens, hk, 64, 128, 0.6, gen)
    positions = torch.cat([torch.stack([segment_permutation(L, 128, gen) for _ in range(hk)], 1)
                           for L in lens])
    expected, expected_lse = ab.sparse_prefill(q, k, v, cu, idx, cnt, 64, 128,
                                               key_positions=positions, return_lse=True)

    def strided(x, dim):    # same values, stride doubled along `dim`
        big = torch.zeros(*x.shape[:dim], 2 * x.shape[dim], *x.shape[dim + 1:], dtype=x.dtype)
        view = big[(slice(None),) * dim + (slice(None, None, 2),)]
        view.copy_(x)
        return view

    qs, ks, vs = strided(q, 1), strided(k, 0), strided(v, 1)
    cus = strided(cu, 0)
    idxs = idx.transpose(2, 3).contiguous().transpose(2, 3)       # slot stride != 1
    cnts = cnt.transpose(0, 2).contiguous().transpose(0, 2)
    pos_s = positions.T.contiguous().T                             # [T, Hk] with token stride 1
    out = torch.full((sum(lens), 2 * hq, 64), 3.0, dtype=torch.float16)[:, ::2]
    lse = torch.full((hq, sum(lens)), 3.0).T
    got = ab.sparse_prefill(qs, ks, vs, cus, idxs, cnts, 64, 128, key_positions=pos_s, out=out)
    assert got is out
    assert_bitwise_equal(out, expected, "strided inputs, strided out")
    # lse into a strided buffer through the native layer (the wrapper allocates it otherwise).
    ab._C.sparse_prefill(qs, ks, vs, cus, idxs, cnts, 64, 128, pos_s, 0.125, out, lse)
    assert_bitwise_equal(lse, expected_lse, "strided lse")


def test_scale(ab):
    gen = torch.Generator().manual_seed(2)
    q, k, v, cu = make_batch([150], 2, 2, 64, torch.float32, gen)
    idx, cnt = ab.dense_causal_block_lists(cu, 64, 64, 2)
    out, lse = ab.sparse_prefill(q, k, v, cu, idx, cnt, 64, 64, scale=0.3, return_lse=True)
    ref, ref_lse = reference_prefill(q, k, v, cu, idx, cnt, 64, 64, scale=0.3)
    assert_out_close(out, ref, torch.float32, float(v.abs().max()))
    assert_lse_close(lse, ref_lse)


def test_dense_causal_block_lists(ab):
    """Row i lists exactly the blocks holding a key at or before the query block's last
    position: block j with j * k_block <= min((i + 1) * q_block, L) - 1."""
    cu = torch.tensor([0, 1, 1, 129, 329], dtype=torch.int32)      # lengths 1, 0, 128, 200
    for q_block, k_block in [(64, 128), (128, 64), (48, 80)]:
        idx, cnt = ab.dense_causal_block_lists(cu, q_block, k_block, 3)
        lens = (cu[1:] - cu[:-1]).tolist()
        assert idx.shape == (4, 3, -(-200 // q_block), -(-200 // k_block))
        for b, L in enumerate(lens):
            for i in range(idx.shape[2]):
                want = ([j for j in range(idx.shape[3])
                         if j * k_block <= min((i + 1) * q_block, L) - 1] if i * q_block < L else [])
                for h in range(3):
                    c = int(cnt[b, h, i])
                    assert idx[b, h, i, :c].tolist() == want
                    assert (idx[b, h, i, c:] == -1).all()
    for bad in [dict(cu_seqlens=torch.tensor([0, 5, 3], dtype=torch.int32)),
                dict(cu_seqlens=torch.tensor([0, 5])),
                dict(q_block=0), dict(k_block=True), dict(num_heads=0)]:
        args = {**dict(cu_seqlens=cu, q_block=64, k_block=64, num_heads=1), **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            ab.dense_causal_block_lists(**args)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

def _base():
    """A valid call: 2 sequences (100, 200), Hq 4, Hk 2, D 64, lists per KV head, blocks of 64."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, cu = make_batch([100, 200], 4, 2, 64, torch.float16, gen)
    a = dict(q=q, k=k, v=v, cu_seqlens=cu)
    idx = torch.full((2, 2, 4, 4), -1, dtype=torch.int32)
    cnt = torch.zeros(2, 2, 4, dtype=torch.int32)
    for i in range(4):      # the lists of dense causal attention
        idx[:, :, i, :i + 1] = torch.arange(i + 1, dtype=torch.int32)
        cnt[:, :, i] = i + 1
    a.update(block_indices=idx, block_counts=cnt, q_block=64, k_block=64,
             key_positions=torch.cat([torch.arange(100), torch.arange(200)]).to(torch.int32)[:, None]
             .expand(300, 2).contiguous())
    return a


def _edit(a, name, index, value):
    a[name] = a[name].clone()
    a[name][index] = value


BAD_VALUES = [
    # (argument, index, value, message regex)
    ("block_indices", (1, 0, 2, slice(0, 3)), torch.tensor([0, 2, 1]), r"block_indices\[1, 0, 2, 2\].*\[3, 4\)"),
    ("block_indices", (1, 1, 3, slice(0, 4)), torch.tensor([0, 1, 1, 3]), r"block_indices\[1, 1, 3, 2\]"),
    ("block_indices", (0, 0, 1, 1), 2, r"block_indices\[0, 0, 1, 1\].*\[1, 2\).*100 keys"),
    ("block_indices", (1, 0, 3, 3), 4, r"block_indices\[1, 0, 3, 3\].*got 4"),
    ("block_indices", (0, 1, 0, 0), -1, r"block_indices\[0, 1, 0, 0\].*got -1"),
    ("block_counts", (1, 1, 3), 5, r"block_counts\[1, 1, 3\].*\[0, M = block_indices.shape\[3\] = 4\], got 5"),
    ("block_counts", (0, 0, 0), -1, r"block_counts\[0, 0, 0\].*got -1"),
    ("cu_seqlens", 1, 301, r"cu_seqlens\[2\].*>= cu_seqlens\[1\] = 301, got 300"),
    ("cu_seqlens", 0, 1, r"cu_seqlens\[0\]: expected 0, got 1"),
    ("cu_seqlens", 2, 299, r"cu_seqlens\[2\]: expected the token count T .* 300, got 299"),
    ("cu_seqlens", 1, 40, r"block_indices.shape\[2\]: expected Nq >= .*ceil\(260 / 64\) = 5, got 4"),
    ("key_positions", (150, 1), 200, r"key_positions\[150, 1\].*\[0, 200\).*got 200"),
    ("key_positions", (170, 0), 3, r"key_positions\[170, 0\].*permutation.*position 3 already appears at row 103"),
    ("key_positions", (5, 0), -1, r"key_positions\[5, 0\].*got -1"),
]


@pytest.mark.parametrize("arg,index,value,regex", BAD_VALUES, ids=lambda x: None)
def test_rejects_bad_values(ab, arg, index, value, regex):
    a = _base()
    _edit(a, arg, index, value)
    out = torch.full_like(a["q"], 7.0)
    with pytest.raises(ValueError, match=regex):
        ab.sparse_prefill(**a, out=out)
    assert (out == 7.0).all(), "the output was written before validation failed"


def test_garbage_in_unused_entries_is_accepted(ab):
    """Entries past a count and rows of query blocks past the end of a sequence are not read."""
    a = _base()
    a["block_indices"] = a["block_indices"].clone()
    a["block_counts"] = a["block_counts"].clone()
    a["block_indices"][:, :, 0, 1:] = 12345
    a["block_counts"][0, :, 2:] = -3            # sequence 0 has 2 query blocks
    ab.sparse_prefill(**a)


def _shape_cases():
    t = lambda *s, dt=torch.float16: torch.zeros(*s, dtype=dt)
    i32 = lambda *s: torch.zeros(*s, dtype=torch.int32)
    return [
        ("q", t(300, 4 * 64), r"q: expected 3 dimensions"),
        ("k", t(299, 2, 64), r"k.shape\[0\]: expected 300"),
        ("k", t(300, 2, 32), r"k.shape\[2\]: expected 64"),
        ("v", t(300, 2, 65), r"v: expected the shape of k"),
        ("cu_seqlens", i32(3, 1), r"cu_seqlens: expected 1 dimensions"),
        ("cu_seqlens", i32(0), r"cu_seqlens: expected B \+ 1 >= 1"),
        ("cu_seqlens", torch.tensor([0, 100, 300]), r"cu_seqlens: unsupported dtype torch.int64"),
        ("block_indices", i32(3, 2, 4, 4), r"block_indices.shape\[0\]: expected 2"),
        ("block_indices", i32(2, 3, 4, 4), r"block_counts.shape\[1\]: expected 3"),
        ("block_indices", i32(2, 2, 4, 4).float(), r"block_indices: expected dtype int32, got float32"),
        ("block_counts", i32(2, 2, 3), r"block_counts.shape\[2\]: expected 4"),
        ("block_counts", i32(2, 2), r"block_counts: expected 3 dimensions"),
        ("key_positions", i32(300, 4), r"key_positions.shape\[1\]: expected 2"),
        ("key_positions", i32(300, 2).to(torch.uint8), r"key_positions: expected dtype int32"),
        ("q", t(300, 4, 64, dt=torch.float32), r"k: expected dtype float32, got float16"),
        ("q", i32(300, 4, 64), r"q: expected dtype float16, bfloat16 or float32, got int32"),
        ("v", t(300, 2, 64, dt=torch.bfloat16), r"v: expected dtype float16, got bfloat16"),
        ("q", t(300, 4, 128)[:, :, ::2], r"q: expected a contiguous last dimension"),
        ("k", [[0.0]], r"k: expected a torch.Tensor, got list"),
        ("q_block", 0, r"q_block: expected an int in \[1, 2\^31\), got 0"),
        ("k_block", 2.0, r"k_block: expected an int"),
        ("q_block", True, r"q_block: expected an int"),
        ("scale", float("nan"), r"scale: expected a finite float"),
    ]


@pytest.mark.parametrize("arg,value,regex", _shape_cases(), ids=lambda x: None)
def test_rejects_bad_arguments(ab, arg, value, regex):
    a = _base()
    a[arg] = value
    with pytest.raises(ValueError, match=regex):
        ab.sparse_prefill(**a)


def test_rejects_bad_head_counts_and_short_rows(ab):
    a = _base()
    a.update(k=torch.zeros(300, 3, 64, dtype=torch.float16), v=torch.zeros(300, 3, 64, dtype=torch.float16),
             key_positions=None)
    with pytest.raises(ValueError, match=r"q: expected a number of query heads that is a positive "
                                         r"multiple of the 3 KV heads, got 4"):
        ab.sparse_prefill(**a)
    a = _base()
    a["block_indices"] = torch.zeros(2, 3, 4, 4, dtype=torch.int32)
    a["block_counts"] = torch.zeros(2, 3, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_indices.shape\[1\]: expected Hq = 4 .* or Hk = 2"):
        ab.sparse_prefill(**a)
    a = _base()
    a["block_indices"], a["block_counts"] = a["block_indices"][:, :, :3], a["block_counts"][:, :, :3]
    with pytest.raises(ValueError, match=r"Nq >= ceil\(max_len / q_block\) = ceil\(200 / 64\) = 4, got 3"):
        ab.sparse_prefill(**a)


def test_out_argument_checks(ab):
    a = _base()
    for out, regex in [(torch.zeros(300, 4, 64), r"out: expected dtype float16, got float32"),
                       (torch.zeros(300, 4, 63, dtype=torch.float16), r"out.shape\[2\]: expected 64"),
                       (torch.zeros(300, 4, 128, dtype=torch.float16)[:, :, ::2],
                        r"out: expected a contiguous last dimension")]:
        with pytest.raises(ValueError, match=regex):
            ab.sparse_prefill(**a, out=out)
    args = [a[n] for n in ("q", "k", "v", "cu_seqlens", "block_indices", "block_counts")]
    out = torch.empty_like(a["q"])
    for lse, regex in [(torch.zeros(300, 4, dtype=torch.float16), r"lse: expected dtype float32"),
                       (torch.zeros(300, 2), r"lse.shape\[1\]: expected 4")]:
        with pytest.raises(ValueError, match=regex):
            ab._C.sparse_prefill(*args, 64, 64, None, 0.125, out, lse)


def test_kernel_argument(ab):
    """`kernel` picks a CUDA kernel: any other name is an error, and so is a CUDA kernel's name
    for CPU tensors (they run the reference)."""
    a = _base()
    with pytest.raises(ValueError, match=r"kernel: expected 'auto', 'fa2' or 'sm90', got 'fa3'"):
        ab.sparse_prefill(**a, kernel="fa3")
    with pytest.raises(ValueError, match=r"kernel: expected 'auto', 'fa2' or 'sm90', got 3"):
        ab.sparse_prefill(**a, kernel=3)
    for name in ("fa2", "sm90"):
        with pytest.raises(ValueError, match=rf"kernel: '{name}' names a CUDA kernel, but q is on "
                                             r"the CPU"):
            ab.sparse_prefill(**a, kernel=name)
    assert torch.equal(ab.sparse_prefill(**a, kernel="auto"), ab.sparse_prefill(**a))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device errors need a CUDA device")
def test_devices(ab):
    a = _base()
    a["k"] = a["k"].cuda()
    with pytest.raises(ValueError, match=r"k: expected the device of q \(cpu\), got cuda:0"):
        ab.sparse_prefill(**a)
    # All on the GPU: the kernel runs (tests/test_gpu_prefill.py) and equals the CPU result.
    a = {n: x.cuda() if isinstance(x, torch.Tensor) else x for n, x in _base().items()}
    out = ab.sparse_prefill(**a).cpu().float()
    expect = ab.sparse_prefill(**_base()).float()
    assert float((out - expect).abs().max()) <= 2.0 ** -10 * (1 + float(expect.abs().max()))

"""sparse_prefill on CUDA tensors (absparse/prefill_cuda.h) against the float64 reference of
test_sparse_prefill.py. Skipped without a CUDA device (CI has none). The tests before the sm90
section run kernel="auto" (the Hopper kernel where it applies, when built); the sm90 section
selects each kernel explicitly (kernel="sm90" / "fa2") and is skipped in builds without the
Hopper kernel (absparse._C.has_sm90_prefill False: no CUTLASS headers at configure time).

Tolerances: the kernel accumulates q.k and p.v in float32 on tensor cores but rounds the softmax
weights p to the input dtype before p.v (as FlashAttention does), a relative error of at most
eps_in / 2 per weight (2^-9 bfloat16, 2^-12 float16); over a convex combination of values that is
at most eps_in / 2 * max|v| in out, plus the final rounding of out (eps_in * |out|). We allow
eps_in * max|v| + eps_in * |out|. lse is float32 of float32 sums of exactly rounded products:
1e-4 absolute (|lse| < 30 here). -inf positions (rows that attend nothing) must match exactly.
"""
import pytest
import torch

import absparse

from test_sparse_prefill import (make_batch, random_lists, reference_prefill,
                                 segment_permutation)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _cuda(x):
    return x.cuda() if isinstance(x, torch.Tensor) else x


def check(ab, q, k, v, cu, idx, cnt, q_block, k_block, key_positions=None, note="",
          kernel="auto"):
    out, lse = ab.sparse_prefill(*map(_cuda, (q, k, v, cu, idx, cnt)), q_block=q_block,
                                 k_block=k_block, key_positions=_cuda(key_positions),
                                 return_lse=True, kernel=kernel)
    ref, ref_lse = reference_prefill(q, k, v, cu, idx, cnt, q_block, k_block, key_positions)
    eps = EPS[q.dtype]
    got = out.cpu().double()
    err = (got - ref).abs()
    bound = eps * float(v.abs().max()) + eps * ref.abs()
    assert bool((err <= bound).all()), f"{note}: max out error {float(err.max()):.3g}"
    got_lse = lse.cpu().double()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(got_lse), empty), f"{note}: rows attending nothing differ"
    assert bool((got[empty] == 0).all()), f"{note}: a row attending nothing is not 0"
    d = (got_lse[~empty] - ref_lse[~empty]).abs()
    assert d.numel() == 0 or float(d.max()) <= 1e-4, f"{note}: max lse error {float(d.max()):.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("q_block,k_block", [(64, 64), (128, 128), (64, 128), (128, 64),
                                             (128, 256)])
def test_every_causal_block_equals_dense_causal(ab, dtype, q_block, k_block):
    gen = torch.Generator().manual_seed(1)
    lens = [0, 1, 63, 64, 65, 200, 257, 700]
    q, k, v, cu = make_batch(lens, 8, 2, 128, dtype, gen)
    idx, cnt = ab.dense_causal_block_lists(cu, q_block, k_block, 2)
    check(ab, q, k, v, cu, idx, cnt, q_block, k_block, note="dense")


CASES = [  # (H, Hq, Hk, D, q_block, k_block, density, dtype)
    ("q", 4, 4, 64, 64, 64, 0.5, torch.bfloat16),
    ("kv", 8, 2, 128, 128, 128, 0.3, torch.bfloat16),
    ("kv", 16, 1, 64, 64, 128, 0.6, torch.float16),
    ("q", 8, 1, 128, 128, 64, 0.2, torch.float16),
    ("kv", 32, 8, 128, 128, 128, 0.1, torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-G{c[1] // c[2]}-D{c[3]}-q{c[4]}k{c[5]}")
def test_random_lists_match_reference(ab, case):
    H, hq, hk, dim, q_block, k_block, density, dtype = case
    gen = torch.Generator().manual_seed(hq * 100 + dim)
    lens = [513, 0, 1, 130, 1000]
    q, k, v, cu = make_batch(lens, hq, hk, dim, dtype, gen)
    idx, cnt = random_lists(lens, hq if H == "q" else hk, q_block, k_block, density, gen,
                            extra_rows=1)
    check(ab, q, k, v, cu, idx, cnt, q_block, k_block, note=str(case))


@pytest.mark.parametrize("H", ["q", "kv"])
def test_key_positions(ab, H):
    """Keys permuted within 256-key segments per KV head (PBS-Attn) and within whole sequences."""
    gen = torch.Generator().manual_seed(3)
    lens, hq, hk = [600, 0, 77, 1, 300], 4, 2
    q, k, v, cu = make_batch(lens, hq, hk, 64, torch.bfloat16, gen)
    idx, cnt = random_lists(lens, hq if H == "q" else hk, 64, 128, 0.5, gen)
    positions = torch.cat([
        torch.stack([segment_permutation(L, 256 if h == 0 else max(L, 1), gen)
                     for h in range(hk)], 1) for L in lens])
    check(ab, q, k, v, cu, idx, cnt, 64, 128, key_positions=positions, note="key_positions")


def test_empty_rows_and_strided_inputs(ab):
    """Count 0 and future-only lists give 0 / -inf; q, k, v as views of wider tensors."""
    gen = torch.Generator().manual_seed(5)
    T, hq, hk, dim = 256, 2, 1, 64
    wide = torch.randn(T, hq + 2 * hk + 1, dim, generator=gen).bfloat16()
    q, k, v = wide[:, :hq], wide[:, hq:hq + hk], wide[:, hq + hk:hq + 2 * hk]
    cu = torch.tensor([0, T], dtype=torch.int32)
    idx = torch.full((1, 1, 4, 2), -1, dtype=torch.int32)
    cnt = torch.tensor([[[0, 2, 1, 1]]], dtype=torch.int32)
    idx[0, 0, 1] = torch.tensor([2, 3])
    idx[0, 0, 2, 0] = 0
    idx[0, 0, 3, 0] = 3
    check(ab, q, k, v, cu, idx, cnt, 64, 64, note="empty rows")


def test_unsupported_arguments_raise(ab):
    gen = torch.Generator().manual_seed(0)
    q, k, v, cu = make_batch([100], 2, 1, 96, torch.bfloat16, gen)
    idx, cnt = ab.dense_causal_block_lists(cu, 64, 64, 1)
    args = [_cuda(x) for x in (q, k, v, cu, idx, cnt)]
    with pytest.raises(ValueError, match=r"head_dim 96 is not supported on the GPU"):
        ab.sparse_prefill(*args, q_block=64, k_block=64)
    q, k, v, cu = make_batch([100], 2, 1, 64, torch.bfloat16, gen)
    args = [_cuda(x) for x in (q, k, v, cu, idx, cnt)]
    with pytest.raises(ValueError, match=r"q_block: 32 is not supported on the GPU"):
        ab.sparse_prefill(*args[:4], *[_cuda(x) for x in ab.dense_causal_block_lists(cu, 32, 64, 1)],
                          q_block=32, k_block=64)
    with pytest.raises(ValueError, match=r"dtype float32 is not supported on the GPU"):
        ab.sparse_prefill(*[a.float() for a in args[:3]], *args[3:], q_block=64, k_block=64)


def test_cuda_graph_capture(ab):
    """One launch on the current stream, no host sync: capturable and replayable."""
    gen = torch.Generator().manual_seed(9)
    q, k, v, cu = make_batch([300, 500], 4, 2, 128, torch.bfloat16, gen)
    idx, cnt = ab.dense_causal_block_lists(cu, 128, 128, 2)
    q, k, v, cu, idx, cnt = map(_cuda, (q, k, v, cu, idx, cnt))
    out = torch.empty_like(q)
    eager = ab.sparse_prefill(q, k, v, cu, idx, cnt)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ab.sparse_prefill(q, k, v, cu, idx, cnt, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


# ------------------------------------------------------------------------------------------------
# The Hopper kernel (kernel="sm90": cuda/src/sparse_prefill_sm90.cu), same reference and bounds.
# It runs q_block 128 with k_block 128 or 256: 128-key tiles, 128 query rows per CTA (two
# consumer warpgroups of 64), a producer warp that drops tiles wholly after the CTA's last query.
# ------------------------------------------------------------------------------------------------

sm90 = pytest.mark.skipif(not getattr(absparse._C, "has_sm90_prefill", False),
                          reason="built without the sm90 kernel (no CUTLASS headers: "
                                 "ABSPARSE_CUTLASS, docs/prefill.md)")

# Lengths around the 128-row tiles (a partial first tile, exact tiles, one row past, several
# tiles, the pipeline's stages wrapping many times) and an empty sequence.
SM90_LENS = [0, 1, 127, 128, 129, 200, 257, 384, 700, 1500]


@sm90
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k_block", [128, 256])
def test_sm90_every_causal_block_equals_dense_causal(ab, k_block, dtype, dim):
    gen = torch.Generator().manual_seed(11)
    q, k, v, cu = make_batch(SM90_LENS, 8, 2, dim, dtype, gen)
    idx, cnt = ab.dense_causal_block_lists(cu, 128, k_block, 2)
    check(ab, q, k, v, cu, idx, cnt, 128, k_block, note="sm90 dense", kernel="sm90")


SM90_CASES = [  # (H, Hq, Hk, D, k_block, density, dtype)
    ("q", 4, 4, 128, 128, 0.5, torch.bfloat16),    # MHA, a list per query head
    ("kv", 8, 2, 128, 128, 0.3, torch.bfloat16),   # GQA 4, lists shared by a KV head's group
    ("kv", 32, 8, 128, 128, 0.1, torch.bfloat16),  # Llama-3.1-8B's heads
    ("q", 8, 1, 128, 256, 0.4, torch.float16),     # GQA 8, two tiles per listed block
    ("kv", 16, 1, 64, 128, 0.6, torch.float16),    # GQA 16, D 64
    ("q", 6, 2, 64, 256, 0.9, torch.bfloat16),
]


@sm90
@pytest.mark.parametrize("case", SM90_CASES,
                         ids=lambda c: f"{c[0]}-G{c[1] // c[2]}-D{c[3]}-k{c[4]}-{c[6]}")
def test_sm90_random_lists_match_reference(ab, case):
    H, hq, hk, dim, k_block, density, dtype = case
    gen = torch.Generator().manual_seed(hq * 100 + dim + k_block)
    lens = [513, 0, 1, 130, 1000, 128]
    q, k, v, cu = make_batch(lens, hq, hk, dim, dtype, gen)
    idx, cnt = random_lists(lens, hq if H == "q" else hk, 128, k_block, density, gen,
                            extra_rows=1)
    check(ab, q, k, v, cu, idx, cnt, 128, k_block, note=str(case), kernel="sm90")


@sm90
@pytest.mark.parametrize("k_block", [128, 256])
@pytest.mark.parametrize("H", ["q", "kv"])
def test_sm90_key_positions(ab, H, k_block):
    """Keys permuted within 256-key segments per KV head (PBS-Attn) and within whole sequences:
    the kernel masks every tile by position and cannot drop future tiles by their index."""
    gen = torch.Generator().manual_seed(13)
    lens, hq, hk = [600, 0, 77, 1, 300, 1100], 4, 2
    q, k, v, cu = make_batch(lens, hq, hk, 128, torch.bfloat16, gen)
    idx, cnt = random_lists(lens, hq if H == "q" else hk, 128, k_block, 0.5, gen)
    positions = torch.cat([
        torch.stack([segment_permutation(L, 256 if h == 0 else max(L, 1), gen)
                     for h in range(hk)], 1) for L in lens])
    check(ab, q, k, v, cu, idx, cnt, 128, k_block, key_positions=positions,
          note="sm90 key_positions", kernel="sm90")


@sm90
def test_sm90_empty_rows_and_strided_inputs(ab):
    """Count 0, future-only lists and invalid-only lists give 0 / -inf; q, k, v as views of one
    wider tensor (head strides that are not D)."""
    gen = torch.Generator().manual_seed(15)
    T, hq, hk, dim = 512, 2, 1, 128
    wide = torch.randn(T, hq + 2 * hk + 1, dim, generator=gen).bfloat16()
    q, k, v = wide[:, :hq], wide[:, hq:hq + hk], wide[:, hq + hk:hq + 2 * hk]
    cu = torch.tensor([0, T], dtype=torch.int32)
    idx = torch.full((1, 1, 4, 2), -1, dtype=torch.int32)
    cnt = torch.tensor([[[0, 2, 1, 1]]], dtype=torch.int32)
    idx[0, 0, 1] = torch.tensor([2, 3])  # wholly after query block 1: nothing attended
    idx[0, 0, 2, 0] = 0
    idx[0, 0, 3, 0] = 3                  # the diagonal block alone
    check(ab, q, k, v, cu, idx, cnt, 128, 128, note="sm90 empty rows", kernel="sm90")


@sm90
def test_sm90_long_sequence_matches_fa2_and_is_deterministic(ab):
    """8K tokens, Llama-3.1-8B heads, 30 % of the causal blocks: the two kernels agree (each is
    within the bound of `check` of the exact result, so within twice it of each other) and the
    sm90 kernel gives bitwise-equal results when run again."""
    gen = torch.Generator(device="cuda").manual_seed(17)
    L, hq, hk, dim = 8192, 32, 8, 128
    q = torch.randn(L, hq, dim, device="cuda", generator=gen).bfloat16()
    k = torch.randn(L, hk, dim, device="cuda", generator=gen).bfloat16()
    v = torch.randn(L, hk, dim, device="cuda", generator=gen).bfloat16()
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    nq = L // 128
    j = torch.arange(nq, device="cuda")
    keep = (j[None, :] <= j[:, None]) & ((torch.rand(hk, nq, nq, device="cuda", generator=gen)
                                         < 0.3) | (j[None, :] == j[:, None]))
    idx = torch.where(keep, j, nq).sort(-1).values.to(torch.int32)[None].contiguous()
    cnt = keep.sum(-1).to(torch.int32)[None].contiguous()
    out, lse = ab.sparse_prefill(q, k, v, cu, idx, cnt, return_lse=True, kernel="sm90")
    again, lse_again = ab.sparse_prefill(q, k, v, cu, idx, cnt, return_lse=True, kernel="sm90")
    ref, ref_lse = ab.sparse_prefill(q, k, v, cu, idx, cnt, return_lse=True, kernel="fa2")
    assert torch.equal(out, again) and torch.equal(lse, lse_again), "sm90 is not deterministic"
    eps = EPS[torch.bfloat16]
    bound = 2 * (eps * float(v.abs().max()) + eps * ref.float().abs())
    err = (out.float() - ref.float()).abs()
    assert bool((err <= bound).all()), f"max sm90 - fa2 difference {float(err.max()):.3g}"
    assert float((lse - ref_lse).abs().max()) <= 2e-4


@sm90
def test_sm90_auto_selection(ab):
    """kernel="auto" runs sm90 for q_block 128 / k_block 128 (bitwise equal to it) and the
    mma.sync kernel for q_block 64 and for a zero head stride (broadcast K), which the TMA
    descriptors do not take."""
    gen = torch.Generator().manual_seed(19)
    q, k, v, cu = map(_cuda, make_batch([300, 500], 4, 2, 128, torch.bfloat16, gen))
    idx, cnt = map(_cuda, ab.dense_causal_block_lists(cu, 128, 128, 2))
    assert torch.equal(ab.sparse_prefill(q, k, v, cu, idx, cnt),
                       ab.sparse_prefill(q, k, v, cu, idx, cnt, kernel="sm90"))
    idx64, cnt64 = map(_cuda, ab.dense_causal_block_lists(cu, 64, 64, 2))
    assert torch.equal(ab.sparse_prefill(q, k, v, cu, idx64, cnt64, 64, 64),
                       ab.sparse_prefill(q, k, v, cu, idx64, cnt64, 64, 64, kernel="fa2"))
    kb = k[:, :1].expand(-1, 2, -1)  # head stride 0
    assert torch.equal(ab.sparse_prefill(q, kb, v, cu, idx, cnt),
                       ab.sparse_prefill(q, kb, v, cu, idx, cnt, kernel="fa2"))


@sm90
def test_sm90_unsupported_arguments_raise(ab):
    gen = torch.Generator().manual_seed(21)
    q, k, v, cu = map(_cuda, make_batch([300], 4, 2, 128, torch.bfloat16, gen))
    idx, cnt = map(_cuda, ab.dense_causal_block_lists(cu, 64, 64, 2))
    with pytest.raises(ValueError, match=r"q_block: 64 is not supported by the sm90 kernel"):
        ab.sparse_prefill(q, k, v, cu, idx, cnt, 64, 64, kernel="sm90")
    idx, cnt = map(_cuda, ab.dense_causal_block_lists(cu, 128, 64, 2))
    with pytest.raises(ValueError, match=r"k_block: 64 is not supported by the sm90 kernel"):
        ab.sparse_prefill(q, k, v, cu, idx, cnt, 128, 64, kernel="sm90")
    idx, cnt = map(_cuda, ab.dense_causal_block_lists(cu, 128, 128, 2))
    with pytest.raises(ValueError, match=r"k: strides \(256, 0\) are not supported by the sm90"):
        ab.sparse_prefill(q, k[:, :1].expand(-1, 2, -1), v, cu, idx, cnt, kernel="sm90")


@sm90
def test_sm90_cuda_graph_capture(ab):
    gen = torch.Generator().manual_seed(23)
    q, k, v, cu = map(_cuda, make_batch([300, 500], 4, 2, 128, torch.bfloat16, gen))
    idx, cnt = map(_cuda, ab.dense_causal_block_lists(cu, 128, 128, 2))
    out = torch.empty_like(q)
    eager = ab.sparse_prefill(q, k, v, cu, idx, cnt, kernel="sm90")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ab.sparse_prefill(q, k, v, cu, idx, cnt, out=out, kernel="sm90")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)

"""sparse_prefill on CUDA tensors (absparse/prefill_cuda.h) against the float64 reference of
test_sparse_prefill.py. Skipped without a CUDA device (CI has none).

Tolerances: the kernel accumulates q.k and p.v in float32 on tensor cores but rounds the softmax
weights p to the input dtype before p.v (as FlashAttention does), a relative error of at most
eps_in / 2 per weight (2^-9 bfloat16, 2^-12 float16); over a convex combination of values that is
at most eps_in / 2 * max|v| in out, plus the final rounding of out (eps_in * |out|). We allow
eps_in * max|v| + eps_in * |out|. lse is float32 of float32 sums of exactly rounded products:
1e-4 absolute (|lse| < 30 here). -inf positions (rows that attend nothing) must match exactly.
"""
import math

import pytest
import torch

from test_sparse_prefill import (make_batch, random_lists, reference_prefill,
                                 segment_permutation)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _cuda(x):
    return x.cuda() if isinstance(x, torch.Tensor) else x


def check(ab, q, k, v, cu, idx, cnt, q_block, k_block, key_positions=None, note=""):
    out, lse = ab.sparse_prefill(*map(_cuda, (q, k, v, cu, idx, cnt)), q_block=q_block,
                                 k_block=k_block, key_positions=_cuda(key_positions),
                                 return_lse=True)
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

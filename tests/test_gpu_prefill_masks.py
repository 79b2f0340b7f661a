"""The prefill mask builders and primitives on CUDA tensors (absparse/prefill_masks_cuda.h) against
the float64 CPU reference of the same ops. Skipped without a CUDA device (CI has none).

Tolerance basis (docs/prefill_masks.md, "CUDA path"):
- block_pool and vertical_slash_sums do the CPU's float64 operations in the same order: equal.
- last_block_attention: q.k accumulated in float32 (float32 FMAs, or tensor cores for float16 /
  bfloat16: D <= 128 products of exactly representable inputs, exact in float32, summed with a
  rounding of at most ~1 ulp per MMA step; scale log2(e) sum |q_d k_d| <= ~25 here), softmax with
  exp2f: a probability p carries a relative error of a few float32 ulps times that magnitude,
  ~1e-5 relative at worst; we allow 1e-4 * p + 1e-7.
- pooled_block_scores: block means rounded to float32 (2^-24 relative), float32 dots and exp2f:
  the same bound, 1e-4 * a + 1e-7.
- js_distance: float64 of the same float32 inputs, summed in another order: 1e-6 relative.
- Selections (coverage_select, the builders' lists, pbs_permute's order, the pattern and budgets):
  equal to the CPU's. The GPU orders its float32 scores with the CPU's rules, so a list could only
  differ through a near-tie (two scores, or a running sum and the threshold, within ~1e-6
  relative: the float32 / float64 gap); the inputs are random with a fixed seed, and none of
  those occur in them (a failure here that shows such a tie is a test-data problem, not a bug:
  the message prints the first differing row).
"""
import pytest
import torch

import absparse as ab

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def make_batch(lens, hq, hk, d, dtype, seed, peaky=2.0):
    """Packed q [T, Hq, D], k, v [T, Hk, D], cu_seqlens on the CPU; q scaled by `peaky`."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = (peaky * torch.randn(T, hq, d, generator=gen)).to(dtype)
    k = torch.randn(T, hk, d, generator=gen).to(dtype)
    v = torch.randn(T, hk, d, generator=gen).to(dtype)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu


def structured(lens, hq, hk, d, dtype, seed):
    """Half of the KV heads with vertical stripes (queries lean towards a direction every 97th key
    shares), the other half local (keys resemble the queries at their position): both FlexPrefill
    patterns appear."""
    q, k, v, cu = make_batch(lens, hq, hk, d, torch.float32, seed, peaky=1.0)
    g = hq // hk
    u = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(1)),
                                      dim=0)
    for h in range(hk):
        if h % 2 == 0:
            q[:, h * g:(h + 1) * g] += 4 * u
            k[::97, h] += 4 * u
        else:
            k[:, h] += 0.8 * q[:, h * g:(h + 1) * g].mean(1)
    return q.to(dtype), k.to(dtype), v.to(dtype), cu


def separated(lens, hq, hk, d, dtype, seg, seed):
    """Keys whose last-block scores are well separated within every segment: only channel 0 is
    non-zero, q = 8 there, and key p of each window of `seg` keys has k = (a permutation of
    0 .. seg - 1) / 16 (exact in every dtype for seg <= 256, in float32 up to 2^24): the logits
    are exact products; scores within a segment differ by >= 3e-5 relative in these cases
    (checked on the CPU when written; the GPU's float32 scores are within ~1e-6)."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = torch.zeros(T, hq, d)
    q[:, :, 0] = 8.0
    k = torch.zeros(T, hk, d)
    for h in range(hk):  # each sequence's segments from its own start
        ranks = [torch.randperm(seg, generator=gen)[:min(seg, L - s)]
                 for L in lens for s in range(0, L, seg)]
        k[:, h, 0] = torch.cat(ranks + [torch.zeros(0)]).float() / 16
    v = torch.randn(T, hk, d, generator=gen)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return q.to(dtype), k.to(dtype), v.to(dtype), cu


def cuda(*xs):
    return [x.cuda() if isinstance(x, torch.Tensor) else x for x in xs]


def max_len(cu):
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def assert_lists_equal(got_idx, got_cnt, idx, cnt, what):
    got_idx, got_cnt = got_idx.cpu(), got_cnt.cpu()
    assert got_idx.shape == idx.shape and got_cnt.shape == cnt.shape, what
    if not torch.equal(got_cnt, cnt) or not torch.equal(got_idx, idx):
        rows = ((got_cnt != cnt) | (got_idx != idx).any(-1)).nonzero()
        b, h, i = rows[0].tolist()
        pytest.fail(f"{what}: {len(rows)} rows differ, first (b={b}, h={h}, i={i}): "
                    f"gpu {got_idx[b, h, i, :got_cnt[b, h, i]].tolist()} "
                    f"cpu {idx[b, h, i, :cnt[b, h, i]].tolist()}")


def close(got, want, rel, abs_, what):
    got = got.cpu().double()
    want = want.double()
    err = (got - want).abs()
    bound = rel * want.abs() + abs_
    assert bool((err <= bound).all()), f"{what}: max error {float(err.max()):.3g}"


# ---- primitives ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 4, 64, 64), (8, 2, 128, 128), (16, 1, 64, 32),
                                        (6, 3, 128, 100)])
def test_last_block_attention_and_vertical_slash(dtype, hq, hk, d, bs):
    lens = [0, 1, 77, 129, 1100, 2500]
    q, k, _, cu = make_batch(lens, hq, hk, d, dtype, seed=hq + d)
    for group_mean in (False, True):
        want = ab.last_block_attention(q, k, cu, bs, group_mean=group_mean)
        got = ab.last_block_attention(*cuda(q, k, cu), bs, group_mean=group_mean,
                                      max_len=max_len(cu))
        close(got, want, 1e-4, 1e-7, f"probs group_mean={group_mean}")
        # vertical / slash from the same probs: the CPU's float64 operations, same order.
        v_cpu, s_cpu = ab.vertical_slash_sums(got.cpu(), cu)
        v_gpu, s_gpu = ab.vertical_slash_sums(got, cu.cuda())
        assert torch.equal(v_gpu.cpu(), v_cpu) and torch.equal(s_gpu.cpu(), s_cpu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_pool_equal(dtype):
    q, k, _, cu = make_batch([0, 1, 63, 64, 65, 700], 4, 2, 128, dtype, seed=3)
    for bs in (16, 64, 128):
        want = ab.block_pool(q, cu, bs)
        got = ab.block_pool(*cuda(q, cu), bs, max_len=max_len(cu))
        assert torch.equal(got.cpu(), want)
        strided = k.transpose(0, 1).contiguous().transpose(0, 1)  # token stride Hk * D -> D
        assert torch.equal(ab.block_pool(*cuda(strided, cu), bs, max_len=max_len(cu)).cpu(),
                           ab.block_pool(k, cu, bs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("segment", [0, 256])
@pytest.mark.parametrize("group_mean", [False, True])
def test_pooled_block_scores(dtype, segment, group_mean):
    q, k, _, cu = make_batch([0, 1, 300, 1000, 2049], 8, 2, 64, dtype, seed=4)
    want = ab.pooled_block_scores(q, k, cu, 64, segment, group_mean=group_mean)
    got = ab.pooled_block_scores(*cuda(q, k, cu), 64, segment, group_mean=group_mean,
                                 max_len=max_len(cu))
    close(got, want, 1e-4, 1e-7, "pooled scores")


def test_js_distance():
    gen = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(7, 300, generator=gen), -1)
    q = torch.softmax(torch.randn(7, 300, generator=gen), -1)
    p[0, :10] = 0  # zero entries contribute 0
    lengths = torch.tensor([300, 0, 1, 150, 299, 300, 2], dtype=torch.int32)
    for lens in (None, lengths):
        want = ab.js_distance(p, q, lens)
        got = ab.js_distance(*cuda(p, q, lens))
        close(got, want, 1e-6, 1e-12, "js")


@pytest.mark.parametrize("n", [1, 17, 1000, 40000])
def test_coverage_select(n):
    gen = torch.Generator().manual_seed(n)
    rows = 6
    scores = torch.rand(rows, n, generator=gen) ** 4
    scores /= scores.sum(-1, keepdim=True)
    lengths = torch.tensor([n, 0, 1, n // 2, max(n - 1, 0), n], dtype=torch.int32)
    forced = torch.rand(rows, n, generator=gen) < 0.01
    for gamma in (0.9, 0.5, 1.5, 0.0):
        for lens, f in ((None, None), (lengths, forced)):
            want = ab.coverage_select(scores, gamma, lens, f)
            got = ab.coverage_select(*cuda(scores), gamma, *cuda(lens, f))
            assert torch.equal(got[1].cpu(), want[1]), (gamma, lens is None)
            assert torch.equal(got[0].cpu(), want[0]), (gamma, lens is None)


def test_coverage_select_exact_ties_and_nan():
    """Exact ties go to the lower index; NaN ranks last and weighs 0; negatives never count."""
    scores = torch.tensor([[0.1, 0.2, 0.2, 0.2, 0.3, float("nan"), -0.5, 0.0],
                           [0.25] * 8])
    for gamma in (0.3, 0.5, 0.55, 0.7, 0.9, 1.2):
        want = ab.coverage_select(scores, gamma)
        got = ab.coverage_select(scores.cuda(), gamma)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), gamma


# ---- builders -----------------------------------------------------------------------------------

FLEX_CASES = [  # (lens, Hq, Hk, D, bs, dtype, min_budget, max_budget)
    ([0, 1, 127, 300, 1500, 2222], 8, 2, 64, 64, torch.bfloat16, 128, None),
    ([700, 2100], 16, 1, 128, 128, torch.float16, 256, None),
    ([1, 1999], 4, 4, 128, 64, torch.float32, 0, 640),
    ([2600], 32, 8, 128, 128, torch.bfloat16, 1024, None),
    ([900, 0, 1300], 6, 2, 64, 32, torch.bfloat16, 64, 512),
]


@pytest.mark.parametrize("case", FLEX_CASES,
                         ids=lambda c: f"G{c[1] // c[2]}-D{c[3]}-bs{c[4]}-{str(c[5])[6:]}")
def test_flexprefill_mask_matches_cpu(case):
    lens, hq, hk, d, bs, dtype, lo, hi = case
    q, k, v, cu = structured(lens, hq, hk, d, dtype, seed=len(lens) + hq)
    for gamma, tau in ((0.9, 0.1), (0.95, 0.3)):
        idx, cnt, info = ab.flexprefill_mask(q, k, cu, bs, gamma, tau, lo, hi)
        g_idx, g_cnt, g_info = ab.flexprefill_mask(*cuda(q, k, cu), bs, gamma, tau, lo, hi,
                                                   max_len=max_len(cu))
        what = f"gamma={gamma} tau={tau}"
        assert torch.equal(g_info["pattern"].cpu(), info["pattern"]), what
        assert torch.equal(g_info["vertical_blocks"].cpu(), info["vertical_blocks"]), what
        assert torch.equal(g_info["slash_blocks"].cpu(), info["slash_blocks"]), what
        js, g_js = info["js_distance"], g_info["js_distance"].cpu()
        assert torch.equal(torch.isnan(g_js), torch.isnan(js)), what
        close(g_js[~torch.isnan(js)], js[~torch.isnan(js)], 1e-4, 1e-6, what + " js")
        assert_lists_equal(g_idx, g_cnt, idx, cnt, what)
        assert torch.equal(g_info["density"].cpu(), info["density"]), what


def test_flexprefill_patterns_appear():
    """The first case's data has all three patterns (dense, vertical-slash, query-aware), so
    every GPU path runs in test_flexprefill_mask_matches_cpu (checked on the CPU when written)."""
    lens, hq, hk, d, bs, dtype, lo, hi = FLEX_CASES[0]
    q, k, _, cu = structured(lens, hq, hk, d, dtype, seed=len(lens) + hq)
    _, _, info = ab.flexprefill_mask(*cuda(q, k, cu), bs, 0.9, 0.1, lo, hi, max_len=max_len(cu))
    assert set(info["pattern"].flatten().tolist()) == {0, 1, 2}, info["pattern"]


PBS_CASES = [  # (lens, Hq, Hk, D, bs, segment, dtype)
    ([0, 1, 255, 256, 300, 1500, 2222], 8, 2, 64, 64, 256, torch.bfloat16),
    ([512, 2100], 16, 1, 128, 128, 256, torch.float16),
    ([1999], 4, 4, 128, 64, 512, torch.float32),   # seg 512: float32 keeps k exact
    ([2600], 32, 8, 128, 128, 256, torch.bfloat16),
]


@pytest.mark.parametrize("case", PBS_CASES,
                         ids=lambda c: f"G{c[1] // c[2]}-D{c[3]}-bs{c[4]}-seg{c[5]}")
def test_pbs_matches_cpu(case):
    lens, hq, hk, d, bs, seg, dtype = case
    # The permutation on well-separated scores (random ones have float32 near-ties in a segment).
    q, k, v, cu = separated(lens, hq, hk, d, dtype, seg, seed=hq * 3 + d)
    kp, vp, pos = ab.pbs_permute(q, k, v, cu, bs, seg)
    g_kp, g_vp, g_pos = ab.pbs_permute(*cuda(q, k, v, cu), bs, seg, max_len=max_len(cu))
    assert torch.equal(g_pos.cpu(), pos)
    assert torch.equal(g_kp.cpu(), kp) and torch.equal(g_vp.cpu(), vp)
    # without max_len (grid bound T)
    assert torch.equal(ab.pbs_permute(*cuda(q, k, v, cu), bs, seg)[2].cpu(), pos)
    # The mask on random data, over the CPU's permutation.
    q, k, v, cu = make_batch(lens, hq, hk, d, dtype, seed=hq * 3 + d)
    kp, vp, pos = ab.pbs_permute(q, k, v, cu, bs, seg)
    for threshold, force in ((0.9, True), (0.5, False), (1.0, True)):
        idx, cnt, info = ab.pbs_mask(q, kp, cu, pos, bs, seg, threshold, force)
        g_idx, g_cnt, g_info = ab.pbs_mask(*cuda(q, kp, cu, pos), bs, seg, threshold, force,
                                           max_len=max_len(cu))
        assert_lists_equal(g_idx, g_cnt, idx, cnt, f"threshold={threshold}")
        assert torch.equal(g_info["density"].cpu(), info["density"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_builders_feed_sparse_prefill_on_gpu(dtype):
    """The CUDA lists go straight into sparse_prefill: the same output as the CPU-built lists."""
    lens = [1, 700, 2100]
    q, k, v, cu = structured(lens, 8, 2, 128, dtype, seed=11)
    qc, kc, vc, cuc = cuda(q, k, v, cu)
    m = max_len(cu)
    idx, cnt, _ = ab.flexprefill_mask(qc, kc, cuc, 128, min_budget=256, max_len=m)
    ref_idx, ref_cnt, _ = ab.flexprefill_mask(q, k, cu, 128, min_budget=256)
    out = ab.sparse_prefill(qc, kc, vc, cuc, idx, cnt, 128, 128)
    ref = ab.sparse_prefill(qc, kc, vc, cuc, ref_idx.cuda(), ref_cnt.cuda(), 128, 128)
    assert torch.equal(out, ref)
    kp, vp, pos = ab.pbs_permute(qc, kc, vc, cuc, 128, 256, max_len=m)
    idx, cnt, _ = ab.pbs_mask(qc, kp, cuc, pos, 128, 256, max_len=m)
    out = ab.sparse_prefill(qc, kp, vp, cuc, idx, cnt, 128, 128, key_positions=pos)
    kp_c, vp_c, pos_c = ab.pbs_permute(q, k, v, cu, 128, 256)
    ref_idx, ref_cnt, _ = ab.pbs_mask(q, kp_c, cu, pos_c, 128, 256)
    ref = ab.sparse_prefill(qc, kp_c.cuda(), vp_c.cuda(), cuc, ref_idx.cuda(), ref_cnt.cuda(),
                            128, 128, key_positions=pos_c.cuda())
    assert torch.equal(out, ref)


def test_builders_capture_in_a_cuda_graph():
    """With max_len given, the builders make no host synchronisation (capture would fail)."""
    q, k, v, cu = cuda(*make_batch([1500, 700], 8, 2, 128, torch.bfloat16, seed=12))
    args = dict(max_len=1500)
    ab.flexprefill_mask(q, k, cu, 128, min_budget=256, **args)  # warm-up (kernel attributes)
    ab.pbs_mask(q, k, cu, ab.pbs_permute(q, k, v, cu, 128, 256, **args)[2], 128, 256, **args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, cnt, _ = ab.flexprefill_mask(q, k, cu, 128, min_budget=256, **args)
        kp, vp, pos = ab.pbs_permute(q, k, v, cu, 128, 256, **args)
        p_idx, p_cnt, _ = ab.pbs_mask(q, kp, cu, pos, 128, 256, **args)
    graph.replay()
    torch.cuda.synchronize()
    want = ab.flexprefill_mask(q.cpu(), k.cpu(), cu.cpu(), 128, min_budget=256)
    assert_lists_equal(idx, cnt, want[0], want[1], "graph flexprefill")


# ---- arguments ----------------------------------------------------------------------------------

def test_device_mix_raises_naming_the_argument():
    q, k, v, cu = make_batch([300], 4, 2, 64, torch.bfloat16, seed=0)
    qc, kc, vc, cuc = cuda(q, k, v, cu)
    with pytest.raises(ValueError, match=r"flexprefill_mask: cu_seqlens: expected the device of q"):
        ab.flexprefill_mask(qc, kc, cu, 64, max_len=300)
    with pytest.raises(ValueError, match=r"flexprefill_mask: k: expected the device of q"):
        ab.flexprefill_mask(qc, k, cuc, 64, max_len=300)
    with pytest.raises(ValueError, match=r"pbs_permute: v: expected the device of q"):
        ab.pbs_permute(qc, kc, v, cuc, 64, 256)
    pos = torch.zeros(300, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"pbs_mask: key_positions: expected the device of q"):
        ab.pbs_mask(qc, kc, cuc, pos, 64, 256, max_len=300)
    with pytest.raises(ValueError, match=r"coverage_select: lengths: expected the device of "
                                          r"scores"):
        ab.coverage_select(torch.rand(2, 5).cuda(), 0.5, torch.tensor([5, 5], dtype=torch.int32))


def test_unsupported_arguments_raise():
    q, k, v, cu = cuda(*make_batch([300], 4, 2, 96, torch.bfloat16, seed=0))
    with pytest.raises(ValueError, match=r"head_dim 96 is not supported on the GPU"):
        ab.flexprefill_mask(q, k, cu, 64, max_len=300)
    q, k, v, cu = cuda(*make_batch([300], 4, 2, 64, torch.bfloat16, seed=0))
    with pytest.raises(ValueError, match=r"block_size: 256 is not supported on the GPU"):
        ab.pbs_permute(q, k, v, cu, 256, 256)
    with pytest.raises(ValueError, match=r"max_len: expected an int"):
        ab.flexprefill_mask(q, k, cu, 64, max_len=-1)

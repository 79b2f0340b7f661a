"""The model ops on CUDA tensors (absparse/model_ops_cuda.h) against the same torch references as
the CPU tests (tests/test_model_ops.py) and against the CPU entry points. Skipped without a CUDA
device (CI has none).

Tolerance basis (docs/model_ops.md, "CUDA"):
- rope_append rounds as the CPU does (every product and the sum one float32 operation, no FMA):
  q_out, the K rows and the V rows bitwise equal to the CPU op's and to torch's formula; every
  other cache row untouched.
- rms_norm sums the squares in float32 in a fixed order per row (the CPU in float64, torch in
  float32 in its own order): 1/rms differs from torch's by a few float32 ulps, so n = T(h * inv)
  is within one ulp of torch's n and out = T(weight * n') for such an n' (the CPU tests' property,
  basis there); the residual x + residual is bitwise torch's.
- silu_mul uses CUDA's expf (2 float32 ulps): T(silu) within one ulp of torch's F.silu, out =
  T(s' * up) for such an s'.
- Both: at most 1 % of the elements may differ from torch at all.
Device values (positions, page-table entries) are not validated on CUDA but made harmless: no
K / V row is written for a sequence whose position or page is out of range.
"""
import pytest
import torch

import absparse as ab
from test_model_ops import (assert_bitwise, boundary_positions, check_rms, check_silu,
                            make_rope_case, rms_inputs, rope_reference, silu_inputs, ulp_dist)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

HALF = [torch.bfloat16, torch.float16]


def cuda(a):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


def rope_on(a, q_out=None):
    return ab.rope_append(a["qkv"], a["cos"], a["sin"], a["k_cache"], a["v_cache"],
                          a["page_table"], a["positions"], a["num_q_heads"], q_out=q_out)


# ---- rms_norm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("N,H", [(1, 4096), (16, 4096), (3, 7), (5, 33), (2, 5000), (4, 8200)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_cuda(dtype, N, H, with_residual):
    """Llama's hidden size and odd sizes (no 16-byte vector per row): torch's property, and within
    one ulp of the CPU op's n."""
    x, residual, weight = rms_inputs(N, H, dtype, seed=N + H)
    res = residual.cuda() if with_residual else None
    out = ab.rms_norm(x.cuda(), weight.cuda(), 1e-5, residual=res)
    assert out.is_cuda
    check_rms(out.cpu(), x, weight, 1e-5, residual if with_residual else None,
              res.cpu() if with_residual else None, f"N={N} H={H}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rms_norm_cuda_unit_weight_vs_cpu(dtype):
    x, residual, _ = rms_inputs(32, 4096, dtype, seed=3, scale=3.0)
    weight = torch.ones(4096, dtype=dtype)
    res_c, res_g = residual.clone(), residual.cuda()
    want = ab.rms_norm(x, weight, 1e-5, residual=res_c)
    got = ab.rms_norm(x.cuda(), weight.cuda(), 1e-5, residual=res_g).cpu()
    assert int(ulp_dist(got, want).max()) <= 1
    assert_bitwise(res_g.cpu(), res_c, "residual")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rms_norm_cuda_strided_and_aliased(dtype):
    """Column slices of wider buffers (row stride > H) and out = x give the contiguous result;
    padding untouched."""
    N, H = 6, 4096
    x, residual, weight = rms_inputs(N, H, dtype, seed=9)
    want = ab.rms_norm(x.cuda(), weight.cuda(), 1e-6, residual=residual.cuda()).cpu()
    xw = torch.randn(N, H + 8, dtype=dtype, device="cuda")
    rw = torch.randn(N, H + 3, dtype=dtype, device="cuda")
    xw[:, 8:] = x.cuda()
    rw[:, :H] = residual.cuda()
    xw0, rw0 = xw.clone(), rw.clone()
    got = ab.rms_norm(xw[:, 8:], weight.cuda(), 1e-6, residual=rw[:, :H], out=xw[:, 8:])
    assert got.data_ptr() == xw[:, 8:].data_ptr()
    assert_bitwise(got.cpu(), want, "strided, out aliasing x")
    assert_bitwise(rw[:, :H].cpu(), (x + residual), "residual")
    assert_bitwise(xw[:, :8].cpu(), xw0[:, :8].cpu(), "x padding")
    assert_bitwise(rw[:, H:].cpu(), rw0[:, H:].cpu(), "residual padding")


# ---- silu_mul -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("N,I", [(1, 14336), (16, 14336), (1, 1), (5, 33), (3, 11009)])
def test_silu_mul_cuda(dtype, N, I):
    gate_up = silu_inputs(N, I, dtype, seed=N + I)
    out = ab.silu_mul(gate_up.cuda())
    check_silu(out.cpu(), gate_up, f"N={N} I={I}")
    want = ab.silu_mul(gate_up)
    assert int(ulp_dist(out.cpu(), want).max()) <= 2


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_silu_mul_cuda_strided(dtype):
    N, I = 4, 14336
    gate_up = silu_inputs(N, I, dtype, seed=5)
    gw = torch.randn(N, 2 * I + 8, dtype=dtype, device="cuda")
    gw[:, 8:] = gate_up.cuda()
    ow = torch.randn(N, I + 8, dtype=dtype, device="cuda")
    ow0 = ow.clone()
    out = ab.silu_mul(gw[:, 8:], out=ow[:, 8:])
    assert_bitwise(out.cpu(), ab.silu_mul(gate_up.cuda()).cpu(), "strided vs contiguous")
    assert_bitwise(ow[:, :8].cpu(), ow0[:, :8].cpu(), "out padding")


def test_zero_rows_cuda():
    x = torch.empty(0, 4096, dtype=torch.bfloat16, device="cuda")
    assert ab.rms_norm(x, torch.ones(4096, dtype=torch.bfloat16, device="cuda"), 1e-5).shape == (0, 4096)
    assert ab.silu_mul(torch.empty(0, 10, dtype=torch.float16, device="cuda")).shape == (0, 5)


# ---- rope_append --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("hq,hk,d,P", [(32, 8, 128, 64), (16, 1, 128, 16), (8, 8, 64, 64),
                                       (6, 2, 64, 1), (12, 4, 128, 7)])
def test_rope_append_cuda_bitwise(dtype, hq, hk, d, P):
    """GQA 1 / 4 / 16, D 64 / 128, pages of 64, 16, 7 and 1 token, positions on page boundaries:
    q_out, K and V bitwise the CPU op's and torch's."""
    B = 9
    a = make_rope_case(B, hq, hk, d, P, boundary_positions(P, B, seed=P + d), dtype, seed=hq + P)
    q_ref, k_ref, v_ref = rope_reference(a["qkv"], a["cos"], a["sin"], a["k_cache"],
                                         a["v_cache"], a["page_table"], a["positions"], hq)
    g = cuda(a)
    q = rope_on(g)
    assert_bitwise(q.cpu(), q_ref, "q_out")
    assert_bitwise(g["k_cache"].cpu(), k_ref, "k_cache")
    assert_bitwise(g["v_cache"].cpu(), v_ref, "v_cache")


@pytest.mark.parametrize("bad", ["pos-negative", "pos-capacity", "pos-huge", "page-negative",
                                 "page-num_pages"])
def test_rope_append_cuda_bad_device_values_write_no_kv(bad):
    """A bad position or page of one sequence (not read on the host: no exception) writes no K / V
    row for it; the other sequences are appended as usual; nothing is read or written out of
    bounds (memcheck runs this test)."""
    P, max_pages = 8, 2
    a = make_rope_case(3, 4, 2, 64, P, [3, 9, 12], torch.bfloat16, seed=4, max_pages=max_pages,
                       num_positions=20)
    good = dict(a)
    good["positions"] = a["positions"].clone()
    good["page_table"] = a["page_table"].clone()
    if bad == "pos-negative":
        a["positions"][1] = -1
    elif bad == "pos-capacity":
        a["positions"][1] = max_pages * P
    elif bad == "pos-huge":  # past the capacity and the rope tables
        a["positions"][1] = 10**6
    else:
        a["page_table"][1, 9 // P] = -1 if bad == "page-negative" else a["k_cache"].shape[0]
    # expected caches: the CPU reference of sequences 0 and 2 only
    keep = torch.tensor([0, 2])
    _, k_ref, v_ref = rope_reference(a["qkv"][keep], a["cos"], a["sin"], a["k_cache"],
                                     a["v_cache"], good["page_table"][keep],
                                     good["positions"][keep], 4)
    g = cuda(a)
    q = rope_on(g)
    torch.cuda.synchronize()
    assert_bitwise(g["k_cache"].cpu(), k_ref, "k_cache")
    assert_bitwise(g["v_cache"].cpu(), v_ref, "v_cache")
    q_ref, _, _ = rope_reference(a["qkv"][keep], a["cos"], a["sin"], a["k_cache"], a["v_cache"],
                                 good["page_table"][keep], good["positions"][keep], 4)
    assert_bitwise(q.cpu()[keep], q_ref, "q_out of the valid sequences")


def test_rope_append_cuda_float32_raises():
    a = cuda(make_rope_case(1, 4, 2, 64, 8, [0], torch.float32, seed=1))
    with pytest.raises(ValueError, match="rope_append"):
        rope_on(a)
    with pytest.raises(ValueError, match="rms_norm"):
        ab.rms_norm(torch.ones(1, 8, device="cuda"), torch.ones(8, device="cuda"), 1e-5)


def test_rope_append_cuda_mixed_devices_raise():
    a = make_rope_case(1, 4, 2, 64, 8, [0], torch.bfloat16, seed=1)
    g = cuda(a)
    g["positions"] = a["positions"]  # left on the CPU
    with pytest.raises(ValueError, match="positions"):
        rope_on(g)


def test_model_ops_in_one_cuda_graph():
    """rms_norm (with residual), silu_mul and rope_append captured in one graph, replayed after
    in-place changes of the inputs and the positions: each replay equals eager calls."""
    dtype, B, H, I = torch.bfloat16, 4, 4096, 14336
    hq, hk, d, P = 32, 8, 128, 16
    a = cuda(make_rope_case(B, hq, hk, d, P, [0, 15, 16, 40], dtype, seed=2, max_pages=6,
                            num_positions=96))
    x = torch.randn(B, H, dtype=dtype, device="cuda")
    res = torch.randn(B, H, dtype=dtype, device="cuda")
    w = torch.randn(H, dtype=dtype, device="cuda")
    gu = torch.randn(B, 2 * I, dtype=dtype, device="cuda")
    normed = torch.empty_like(x)
    act = torch.empty(B, I, dtype=dtype, device="cuda")
    q_out = torch.empty(B, hq, d, dtype=dtype, device="cuda")

    def step():
        ab.rms_norm(x, w, 1e-5, residual=res, out=normed)
        ab.silu_mul(gu, out=act)
        rope_on(a, q_out=q_out)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for rep in range(2):
        x.copy_(torch.randn_like(x))
        gu.copy_(torch.randn_like(gu))
        a["qkv"].copy_(torch.randn_like(a["qkv"]))
        a["positions"].add_(1)
        res_before = res.clone()
        k_before, v_before = a["k_cache"].clone(), a["v_cache"].clone()
        graph.replay()
        torch.cuda.synchronize()
        res_eager = res_before.clone()
        assert_bitwise(normed.cpu(), ab.rms_norm(x, w, 1e-5, residual=res_eager).cpu(),
                       f"replay {rep}: rms_norm")
        assert_bitwise(res.cpu(), res_eager.cpu(), f"replay {rep}: residual")
        assert_bitwise(act.cpu(), ab.silu_mul(gu).cpu(), f"replay {rep}: silu_mul")
        eager = dict(a, k_cache=k_before, v_cache=v_before)
        assert_bitwise(q_out.cpu(), rope_on(eager).cpu(), f"replay {rep}: q_out")
        assert_bitwise(a["k_cache"].cpu(), k_before.cpu(), f"replay {rep}: k_cache")
        assert_bitwise(a["v_cache"].cpu(), v_before.cpu(), f"replay {rep}: v_cache")

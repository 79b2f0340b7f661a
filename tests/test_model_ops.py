"""The model ops (absparse.rms_norm, silu_mul, rope_append; absparse/model_ops.h) on the CPU against
independent torch references written here: transformers' LlamaRMSNorm, ``F.silu(gate) * up`` and
``x * cos + rotate_half(x) * sin``, each evaluated by torch in the tensors' dtype, plus float64
references for float32.

Tolerance basis (u = 2^-24 for float32, the unit roundoff; "ulp" = unit in the last place of T):
- rope_append: the header documents every product and the sum as one float32 operation rounded to
  T, no FMA: that is what torch's eager ``x * cos + rotate_half(x) * sin`` does in T (a mul kernel,
  a mul kernel, an add kernel; fp16 / bf16 through float32). q_out and the written K rows must be
  bitwise equal, V rows copies, every other cache row (random data written beforehand) untouched.
  With real (cos, sin) tables we also check the result against a float64 rotation: each output is
  |a c| + |b s| rounded three times, and the tables carry one rounding each, so the error is at most
  3 u_T (|a| + |b|); we allow 2 EPS_T (|a| + |b|) = 4 u_T (|a| + |b|).
- rms_norm, float16 / bfloat16: the op's mean of squares is float64, torch's float32, so the two
  1/rms differ by a few float32 ulps (2^-23 relative); n = T(h * inv) can then differ from torch's
  only when h * inv lies within ~2^-22 relative of a rounding midpoint of T: by at most one ulp of T,
  in a fraction of ~2^-14 of the elements. out = T(weight * n) multiplies exactly in float32 (8 x 8
  or 11 x 11 significant bits) and rounds once, so the op's out must equal T(weight * n') for some n'
  within one ulp of torch's n (out itself may then be 2 ulps away when n sits low in its binade and
  weight * n high in its own, which is why we do not compare out with a plain 1-ulp bound). With
  weight = 1 this is "within one ulp of torch's n". Also: at most 1% of the elements may differ
  from torch at all (a missing intermediate rounding shows up in ~10-50% of them).
- rms_norm, float32: against float64 (the float32-rounded eps, as the op and torch use it): the
  op rounds inv, h * inv and weight * n once each (float64 mean: exact enough): <= 3 u relative;
  we allow 4 u = 2^-22 relative + the smallest subnormal.
- silu_mul, float16 / bfloat16: as rms_norm's n and out: torch's silu (a vectorized exp) and the
  op's std::exp agree within a few float32 ulps, so T(silu) differs by at most one ulp of T, rarely;
  out must equal T(s' * up) for some s' within one ulp of torch's T(silu(gate)), and at most 1% of
  the elements may differ from torch.
- silu_mul, float32: against float64: exp within 1 ulp (2u), 1 + e, the division and the product
  rounded once each (u each), silu's relative sensitivity to exp's error <= 1: <= 5 u; we allow
  8 u = 2^-21 relative + the smallest subnormal.
- The residual written by rms_norm must equal torch's ``x + residual`` in T bitwise.
Validation: every bad argument raises ValueError whose message names the function and the argument.
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import absparse as ab

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
TINY = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_SIGN = {torch.float32: -(2**31), torch.float16: -(2**15), torch.bfloat16: -(2**15)}
MISMATCH_FRACTION = 0.01


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- bit-level helpers --------------------------------------------------------------------------

def bits(t):
    return t.contiguous().view(_INT[t.dtype])


def bits_equal(a, b):
    """Elementwise: same encoding (so -0 != +0, NaN == NaN of the same payload)."""
    return bits(a) == bits(b)


def assert_bitwise(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{what}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}")
    eq = bits_equal(got, want)
    if not bool(eq.all()):
        idx = (~eq).nonzero()[0].tolist()
        pytest.fail(f"{what}: {int((~eq).sum())} of {eq.numel()} elements differ; first at {idx}: "
                    f"got {float(got[tuple(idx)])!r}, want {float(want[tuple(idx)])!r}")


def _keys(t):
    """int64 keys monotone in the float value, adjacent encodings 1 apart (+0 and -0 both 0)."""
    i = bits(t).to(torch.int64)
    return torch.where(i >= 0, i, _SIGN[t.dtype] - i)


def _from_keys(k, dtype):
    i = torch.where(k >= 0, k, _SIGN[dtype] - k)
    return i.to(_INT[dtype]).view(dtype)


def ulp_dist(a, b):
    assert a.dtype == b.dtype
    return (_keys(a) - _keys(b)).abs()


def neighbours(t):
    """t and its two adjacent values in t's dtype (one ulp down, one ulp up)."""
    k = _keys(t)
    return [_from_keys(k - 1, t.dtype), t, _from_keys(k + 1, t.dtype)]


def assert_product_of_neighbour(got, factor, base, what):
    """got == T(factor * b') elementwise for some b' within one ulp of base (torch multiplies in T:
    exact float32 product of the two T values, rounded once)."""
    ok = torch.zeros(got.shape, dtype=torch.bool)
    for b in neighbours(base):
        ok |= bits_equal(got, factor * b)
    if not bool(ok.all()):
        idx = tuple((~ok).nonzero()[0].tolist())
        pytest.fail(f"{what}: {int((~ok).sum())} of {ok.numel()} elements are not T(factor * b') "
                    f"for b' within 1 ulp of the reference; first at {list(idx)}: got "
                    f"{float(got[idx])!r}, reference {float((factor * base)[idx])!r}")


def assert_mostly_equal(got, want, what):
    diff = int((~bits_equal(got, want)).sum())
    assert diff <= MISMATCH_FRACTION * max(got.numel(), 1), (
        f"{what}: {diff} of {got.numel()} elements differ from torch (more than rounding noise)")


def assert_rel_close64(got, ref64, rel, what):
    assert torch.isfinite(ref64).all()
    err = (got.double() - ref64).abs()
    tol = rel * ref64.abs() + TINY[got.dtype]
    if not bool((err <= tol).all()):
        worst = int(torch.argmax(err / tol))
        pytest.fail(f"{what}: {int((err > tol).sum())} of {err.numel()} over tolerance; worst "
                    f"err/tol {float((err / tol).flatten()[worst]):.2f}")


def assert_value_error(call, fn, name):
    """call() raises ValueError whose message names the function and (as a word) the argument."""
    with pytest.raises(ValueError) as exc:
        call()
    msg = str(exc.value)
    assert fn in msg, f"message does not name {fn}: {msg}"
    assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", msg), (
        f"message does not name {name}: {msg}")


def f32(x):
    """x rounded to float32 (as the op's float eps and torch's float32 add use it)."""
    return float(torch.tensor(x, dtype=torch.float32))


# ---- references -------------------------------------------------------------------------------

def llama_rms_norm(x, weight, eps, residual=None):
    """transformers' LlamaRMSNorm (with the decoder layer's residual add in front): (h, n, out)."""
    h = x if residual is None else x + residual
    x32 = h.float()
    n = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h, n, weight * n


def rms_norm64(h, weight, eps):
    h64 = h.double()
    inv = 1.0 / torch.sqrt(h64.pow(2).mean(-1, keepdim=True) + f32(eps))
    return weight.double() * (h64 * inv)


def silu64(g):
    g = g.double()
    return g / (1.0 + torch.exp(-g))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(qkv, cos, sin, k_cache, v_cache, page_table, positions, hq):
    """(q_out, k_cache', v_cache'): transformers' apply_rotary_pos_emb in the dtype, then the
    append at row p % P of page page_table[b, p // P] (on clones of the caches)."""
    B = qkv.shape[0]
    P, hk, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    x = qkv.reshape(B, hq + 2 * hk, d)
    pos = positions.long()
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    q, k, v = x[:, :hq], x[:, hq:hq + hk], x[:, hq + hk:]
    q_rot = q * c + rotate_half(q) * s
    k_rot = k * c + rotate_half(k) * s
    kc, vc = k_cache.clone(), v_cache.clone()
    for b in range(B):
        p = int(pos[b])
        page = int(page_table[b, p // P])
        kc[page, p % P] = k_rot[b]
        vc[page, p % P] = v[b]
    return q_rot, kc, vc


def rope_tables(num_positions, d, dtype, base=10000.0):
    """LlamaRotaryEmbedding's tables (cat(freqs, freqs)) in float64, and rounded to dtype."""
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(num_positions, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin(), emb.cos().to(dtype), emb.sin().to(dtype)


def make_rope_case(B, hq, hk, d, P, positions, dtype, seed, num_positions=None, max_pages=None,
                   tables=None):
    """Valid rope_append arguments: every sequence's pages distinct (a random permutation of the
    pool), random qkv, random caches, random cos / sin (every column and row distinct, so a wrong
    column or row index changes the result) unless `tables` is given."""
    g = gen(seed)
    assert len(positions) == B
    top = max(positions, default=0)
    if max_pages is None:
        max_pages = top // P + 2
    if num_positions is None:
        num_positions = max(top + 3, 1)
    num_pages = B * max_pages + 3
    perm = torch.randperm(num_pages, generator=g)[: B * max_pages]
    page_table = perm.reshape(B, max_pages).to(torch.int32)
    qkv = torch.randn(B, (hq + 2 * hk) * d, generator=g).to(dtype)
    if tables is None:
        cos = (2 * torch.rand(num_positions, d, generator=g) - 1).to(dtype)
        sin = (2 * torch.rand(num_positions, d, generator=g) - 1).to(dtype)
    else:
        cos, sin = tables
    k_cache = torch.randn(num_pages, P, hk, d, generator=g).to(dtype)
    v_cache = torch.randn(num_pages, P, hk, d, generator=g).to(dtype)
    return dict(qkv=qkv, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache,
                page_table=page_table, positions=torch.tensor(positions, dtype=torch.int32),
                num_q_heads=hq)


def boundary_positions(P, B, seed):
    """Positions on page boundaries (p % P == 0 and P - 1), position 0, and random ones."""
    g = gen(seed)
    fixed = [0, P - 1, P, 2 * P - 1, 3 * P, 1]
    out = fixed[:B]
    while len(out) < B:
        out.append(int(torch.randint(0, 5 * P, (1,), generator=g)))
    return out


def run_rope(a, q_out=None):
    return ab.rope_append(a["qkv"], a["cos"], a["sin"], a["k_cache"], a["v_cache"],
                          a["page_table"], a["positions"], a["num_q_heads"], q_out=q_out)


def check_rope(a, q_out=None):
    q_ref, k_ref, v_ref = rope_reference(a["qkv"], a["cos"], a["sin"], a["k_cache"], a["v_cache"],
                                         a["page_table"], a["positions"], a["num_q_heads"])
    q = run_rope(a, q_out=q_out)
    if q_out is not None:
        assert q is q_out
    assert_bitwise(q, q_ref, "q_out")
    assert_bitwise(a["k_cache"], k_ref, "k_cache")
    assert_bitwise(a["v_cache"], v_ref, "v_cache")
    return q


# ---- rms_norm ---------------------------------------------------------------------------------

def rms_inputs(N, H, dtype, seed, scale=1.0):
    g = gen(seed)
    x = (scale * torch.randn(N, H, generator=g)).to(dtype)
    residual = (scale * torch.randn(N, H, generator=g)).to(dtype)
    weight = (1.0 + 0.5 * torch.randn(H, generator=g)).to(dtype)
    return x, residual, weight


def check_rms(out, x, weight, eps, residual_before, residual_after, what):
    """out (and the updated residual) against the references of the module docstring."""
    dtype = x.dtype
    h, n_ref, out_ref = llama_rms_norm(x, weight, eps, residual_before)
    if residual_before is not None:
        assert_bitwise(residual_after, h, f"{what}: residual (x + residual)")
    assert out.shape == x.shape and out.dtype == dtype
    if dtype == torch.float32:
        assert_rel_close64(out, rms_norm64(h, weight, eps), 4 * 2.0**-24, f"{what}: out")
    else:
        assert_product_of_neighbour(out, weight, n_ref, f"{what}: out")
        assert_mostly_equal(out, out_ref, f"{what}: out")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H", [(1, 7), (5, 33), (16, 256), (3, 4096)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_llama(dtype, N, H, with_residual):
    x, residual, weight = rms_inputs(N, H, dtype, seed=N * H)
    x0 = x.clone()
    res = residual.clone() if with_residual else None
    out = ab.rms_norm(x, weight, 1e-6, residual=res)
    assert_bitwise(x, x0, "x (must not be written)")
    check_rms(out, x0, weight, 1e-6, residual if with_residual else None, res, f"N={N} H={H}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_unit_weight_within_one_ulp(dtype, with_residual):
    """weight = 1: out is n itself, within one ulp of torch's n (and mostly equal)."""
    x, residual, _ = rms_inputs(64, 257, dtype, seed=7, scale=3.0)
    weight = torch.ones(257, dtype=dtype)
    res = residual.clone() if with_residual else None
    out = ab.rms_norm(x, weight, 1e-5, residual=res)
    _, n_ref, _ = llama_rms_norm(x, weight, 1e-5, residual if with_residual else None)
    d = ulp_dist(out, n_ref)
    assert int(d.max()) <= 1, f"n differs by {int(d.max())} ulps"
    assert_mostly_equal(out, n_ref, "n")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-2, 1.0])
def test_rms_norm_eps(dtype, eps):
    """Small rows (rms ~ 0.03), so eps dominates the denominator: ignoring eps, adding it outside
    the square root or to the rms instead of the mean square changes the result."""
    x, residual, weight = rms_inputs(4, 33, dtype, seed=11, scale=0.03)
    res = residual.clone()
    out = ab.rms_norm(x, weight, eps, residual=res)
    check_rms(out, x, weight, eps, residual, res, f"eps={eps}")
    if eps > 0:
        # sanity of the data: the same call without eps would be far off
        _, _, no_eps = llama_rms_norm(x, weight, 0.0, residual)
        assert not torch.allclose(out.float(), no_eps.float(), rtol=0.05)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_strided_rows(dtype):
    """x, residual and out are column slices of wider buffers (row stride > H, last dim
    contiguous): each row is read / written at its own stride, the padding stays untouched."""
    N, H = 6, 33
    x, residual, weight = rms_inputs(N, H, dtype, seed=3)
    g = gen(4)
    xw = torch.randn(N, H + 5, generator=g).to(dtype)
    rw = torch.randn(N, H + 9, generator=g).to(dtype)
    ow = torch.randn(N, H + 2, generator=g).to(dtype)
    xw[:, 2:2 + H] = x
    rw[:, :H] = residual
    xw0, rw0, ow0 = xw.clone(), rw.clone(), ow.clone()
    xs, rs, os_ = xw[:, 2:2 + H], rw[:, :H], ow[:, 1:1 + H]
    assert xs.stride() == (H + 5, 1) and not xs.is_contiguous()
    out = ab.rms_norm(xs, weight, 1e-5, residual=rs, out=os_)
    assert out.data_ptr() == os_.data_ptr()
    check_rms(out, x, weight, 1e-5, residual, rs, "strided")
    # bitwise the same as the contiguous call
    res_c = residual.clone()
    assert_bitwise(out, ab.rms_norm(x, weight, 1e-5, residual=res_c), "strided vs contiguous")
    assert_bitwise(xw, xw0, "x buffer")
    assert_bitwise(rw[:, H:], rw0[:, H:], "residual padding")
    assert_bitwise(ow[:, :1], ow0[:, :1], "out padding (left)")
    assert_bitwise(ow[:, 1 + H:], ow0[:, 1 + H:], "out padding (right)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_out_aliases_x(dtype, with_residual):
    """out = x (documented): every element read before it is written -> the same result."""
    x, residual, weight = rms_inputs(5, 129, dtype, seed=21)
    want = ab.rms_norm(x, weight, 1e-6, residual=residual.clone() if with_residual else None)
    xa = x.clone()
    res = residual.clone() if with_residual else None
    got = ab.rms_norm(xa, weight, 1e-6, residual=res, out=xa)
    assert got.data_ptr() == xa.data_ptr()
    assert_bitwise(got, want, "out aliasing x")
    if with_residual:
        assert_bitwise(res, x + residual, "residual with out aliasing x")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_zero_rows(dtype):
    x = torch.empty(0, 33, dtype=dtype)
    res = torch.empty(0, 33, dtype=dtype)
    out = ab.rms_norm(x, torch.ones(33, dtype=dtype), 1e-6, residual=res)
    assert out.shape == (0, 33) and out.dtype == dtype


def test_rms_norm_rows_are_independent():
    """Each row is normalized by its own rms (not the tensor's, not the first row's)."""
    x, _, weight = rms_inputs(3, 16, torch.float32, seed=5)
    x[1] *= 100.0
    out = ab.rms_norm(x, weight, 0.0)
    for r in range(3):
        assert_bitwise(out[r:r + 1], ab.rms_norm(x[r:r + 1].clone(), weight, 0.0), f"row {r}")
    assert_rel_close64(out, rms_norm64(x, weight, 0.0), 4 * 2.0**-24, "out")


# ---- silu_mul ---------------------------------------------------------------------------------

def silu_inputs(N, I, dtype, seed):
    g = gen(seed)
    gate = 3.0 * torch.randn(N, I, generator=g)
    if N > 0 and I >= 8:  # the tails: saturation to 0 and to the identity
        gate[0, :8] = torch.tensor([-30.0, -12.0, -5.0, -0.5, 0.0, 0.5, 5.0, 12.0])
    up = torch.randn(N, I, generator=g)
    return torch.cat([gate, up], dim=1).to(dtype)


def check_silu(out, gate_up, what):
    dtype = gate_up.dtype
    I = gate_up.shape[1] // 2
    gate, up = gate_up[:, :I], gate_up[:, I:]
    assert out.shape == (gate_up.shape[0], I) and out.dtype == dtype
    if dtype == torch.float32:
        assert_rel_close64(out, silu64(gate) * up.double(), 8 * 2.0**-24, what)
    else:
        s_ref = F.silu(gate)
        assert_product_of_neighbour(out, up, s_ref, what)
        assert_mostly_equal(out, s_ref * up, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,I", [(1, 1), (1, 7), (5, 33), (16, 256), (2, 11008)])
def test_silu_mul_matches_reference(dtype, N, I):
    """silu of the first half times the second half (gate / up not swapped, the halves split at
    column I even for odd I), rounded like F.silu(gate) * up."""
    gate_up = silu_inputs(N, I, dtype, seed=N + I)
    g0 = gate_up.clone()
    out = ab.silu_mul(gate_up)
    assert_bitwise(gate_up, g0, "gate_up (must not be written)")
    check_silu(out, gate_up, f"N={N} I={I}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_silu_mul_unit_up_within_one_ulp(dtype):
    """up = 1: out is T(silu(gate)), within one ulp of torch's F.silu (and mostly equal)."""
    gate = (4.0 * torch.randn(32, 301, generator=gen(9))).to(dtype)
    out = ab.silu_mul(torch.cat([gate, torch.ones_like(gate)], dim=1))
    s_ref = F.silu(gate)
    d = ulp_dist(out, s_ref)
    assert int(d.max()) <= 1, f"silu differs by {int(d.max())} ulps"
    assert_mostly_equal(out, s_ref, "silu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_strided(dtype):
    N, I = 5, 7
    gate_up = silu_inputs(N, I, dtype, seed=1)
    g = gen(2)
    gw = torch.randn(N, 2 * I + 6, generator=g).to(dtype)
    gw[:, 3:3 + 2 * I] = gate_up
    ow = torch.randn(N, I + 4, generator=g).to(dtype)
    gw0, ow0 = gw.clone(), ow.clone()
    gs, os_ = gw[:, 3:3 + 2 * I], ow[:, 2:2 + I]
    out = ab.silu_mul(gs, out=os_)
    assert out.data_ptr() == os_.data_ptr()
    check_silu(out, gate_up, "strided")
    assert_bitwise(out, ab.silu_mul(gate_up), "strided vs contiguous")
    assert_bitwise(gw, gw0, "gate_up buffer")
    assert_bitwise(ow[:, :2], ow0[:, :2], "out padding (left)")
    assert_bitwise(ow[:, 2 + I:], ow0[:, 2 + I:], "out padding (right)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_zero_rows(dtype):
    out = ab.silu_mul(torch.empty(0, 14, dtype=dtype))
    assert out.shape == (0, 7) and out.dtype == dtype


# ---- rope_append ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio", range(1, 9))
def test_rope_append_gqa_ratios(dtype, ratio):
    """Hq = ratio * Hk for ratios 1..8: q heads, then k heads, then v heads of each row; q to q_out,
    k rotated and v copied into their own cache at (page_table[b, p // P], p % P)."""
    hk, d, P = 2, 64, 16
    B = 6
    a = make_rope_case(B, ratio * hk, hk, d, P, boundary_positions(P, B, ratio), dtype, seed=ratio)
    check_rope(a)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hk,d,P", [(32, 8, 128, 64), (4, 4, 128, 16), (8, 1, 6, 7),
                                       (3, 1, 2, 1), (6, 2, 6, 3)])
def test_rope_append_head_dims_and_pages(dtype, hq, hk, d, P):
    """head_dim 128 / 64 / 6 / 2 and page sizes 64, 16, odd 7 and 3, and 1 (a page per token);
    positions on page boundaries and the table's last row."""
    B = 7
    pos = boundary_positions(P, B - 1, seed=d + P)
    pos.append(max(pos) + 1)  # the last row of the rope tables below
    a = make_rope_case(B, hq, hk, d, P, pos, dtype, seed=hq + d, num_positions=max(pos) + 1)
    check_rope(a)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_append_last_row_of_the_page_table(dtype):
    """Position max_pages * P - 1 (the last row of the last page a sequence has) is valid."""
    P, max_pages = 8, 3
    pos = [max_pages * P - 1, (max_pages - 1) * P, 0]
    a = make_rope_case(3, 4, 2, 64, P, pos, dtype, seed=5, max_pages=max_pages,
                       num_positions=64)
    check_rope(a)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_append_real_tables_rotate_pairs(dtype):
    """With LlamaRotaryEmbedding's tables, q_out is the rotation of the pairs (i, i + D/2) by the
    angle p * inv_freq_i (checked in float64), and bitwise the torch formula."""
    hq, hk, d, P = 4, 2, 64, 16
    pos = [0, 1, 15, 16, 100, 1000]
    cos64, sin64, cos, sin = rope_tables(1024, d, dtype)
    a = make_rope_case(len(pos), hq, hk, d, P, pos, dtype, seed=8, tables=(cos, sin))
    q = check_rope(a)
    x = a["qkv"].reshape(len(pos), hq + 2 * hk, d)[:, :hq].double()
    pl = a["positions"].long()
    c, s = cos64[pl][:, None, :], sin64[pl][:, None, :]
    half = d // 2
    want = x * c + torch.cat([-x[..., half:], x[..., :half]], -1) * s
    mag = x.abs() + torch.cat([x[..., half:], x[..., :half]], -1).abs()
    err = (q.double() - want).abs()
    assert bool((err <= 2 * EPS[dtype] * mag + TINY[dtype]).all()), (
        f"max err {float(err.max()):.3g} vs a float64 rotation")
    # position 0 is the identity rotation
    assert_bitwise(q[0], a["qkv"][0, : hq * d].reshape(hq, d), "position 0")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_append_strided_everything(dtype):
    """Every tensor a view with non-trivial strides (last dim contiguous where required): qkv a
    column slice, cos / sin row-strided, K and V interleaved in one pool [pages, 2, P, Hk, D] with
    padded heads, positions stride 2, a transposed page table, q_out a slice of a padded buffer.
    Results equal the contiguous call's; nothing outside the views changes."""
    B, hq, hk, d, P = 5, 6, 2, 6, 4
    pos = [0, P - 1, P, 3 * P - 1, 2 * P + 1]
    base = make_rope_case(B, hq, hk, d, P, pos, dtype, seed=13)
    g = gen(14)
    width = (hq + 2 * hk) * d
    qkv_w = torch.randn(B, width + 5, generator=g).to(dtype)
    qkv_w[:, 3:3 + width] = base["qkv"]
    npos = base["cos"].shape[0]
    cos_w = torch.randn(npos, d + 3, generator=g).to(dtype)
    sin_w = torch.randn(npos, d + 1, generator=g).to(dtype)
    cos_w[:, :d], sin_w[:, 1:1 + d] = base["cos"], base["sin"]
    num_pages = base["k_cache"].shape[0]
    pool = torch.randn(num_pages, 2, P, hk, d + 2, generator=g).to(dtype)
    pool[:, 0, ..., :d], pool[:, 1, ..., :d] = base["k_cache"], base["v_cache"]
    pos_w = torch.full((2 * B,), 10**6, dtype=torch.int32)
    pos_w[::2] = base["positions"]
    table_t = base["page_table"].t().contiguous()  # [max_pages, B]
    q_w = torch.randn(B, hq + 2, d + 4, generator=g).to(dtype)
    snap = {k: v.clone() for k, v in dict(qkv=qkv_w, cos=cos_w, sin=sin_w, pool=pool,
                                           q=q_w).items()}
    a = dict(qkv=qkv_w[:, 3:3 + width], cos=cos_w[:, :d], sin=sin_w[:, 1:1 + d],
             k_cache=pool[:, 0, ..., :d], v_cache=pool[:, 1, ..., :d], page_table=table_t.t(),
             positions=pos_w[::2], num_q_heads=hq)
    assert a["k_cache"].stride(2) == d + 2 and a["page_table"].stride() == (1, B)
    q_out = q_w[:, 1:1 + hq, :d]
    q = check_rope(a, q_out=q_out)
    check_rope(base)  # the contiguous call, on its own caches
    assert_bitwise(q, run_rope({**base, "k_cache": base["k_cache"].clone(),
                                "v_cache": base["v_cache"].clone()}), "strided vs contiguous")
    assert_bitwise(pool[:, 0, ..., :d], base["k_cache"], "k (strided vs contiguous)")
    assert_bitwise(pool[:, 1, ..., :d], base["v_cache"], "v (strided vs contiguous)")
    assert_bitwise(qkv_w, snap["qkv"], "qkv buffer")
    assert_bitwise(cos_w, snap["cos"], "cos buffer")
    assert_bitwise(sin_w, snap["sin"], "sin buffer")
    assert_bitwise(pool[..., d:], snap["pool"][..., d:], "cache head padding")
    untouched_q = torch.ones(B, hq + 2, d + 4, dtype=torch.bool)
    untouched_q[:, 1:1 + hq, :d] = False
    assert_bitwise(q_w[untouched_q], snap["q"][untouched_q], "q_out padding")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_append_unused_page_table_entries_ignored(dtype):
    """Only the written page's entry is read: -1 padding (and garbage) in other entries is fine."""
    P = 8
    a = make_rope_case(3, 4, 1, 64, P, [3, P + 2, 2 * P], dtype, seed=2, max_pages=5)
    t = a["page_table"]
    t[0, 1:] = -1
    t[1, 2:] = -1
    t[1, 0] = 10**6   # a page the sequence's token does not touch
    t[2, 3:] = -7
    check_rope(a)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_append_empty_batch(dtype):
    a = make_rope_case(0, 4, 2, 64, 16, [], dtype, seed=0, max_pages=2, num_positions=8)
    k0, v0 = a["k_cache"].clone(), a["v_cache"].clone()
    q = run_rope(a)
    assert q.shape == (0, 4, 64) and q.dtype == dtype
    assert_bitwise(a["k_cache"], k0, "k_cache")
    assert_bitwise(a["v_cache"], v0, "v_cache")


@pytest.mark.parametrize("bad", ["pos-negative", "pos-num_positions", "pos-capacity",
                                 "page-negative", "page-num_pages"])
def test_rope_append_bad_values_write_nothing(bad):
    """A bad position or page in any sequence raises ValueError before anything is written: the
    valid sequence before it leaves its caches and q_out untouched too."""
    P, max_pages = 8, 2
    a = make_rope_case(2, 4, 2, 64, P, [3, 9], torch.bfloat16, seed=4, max_pages=max_pages,
                       num_positions=40)
    name = "positions"
    if bad == "pos-negative":
        a["positions"][1] = -1
    elif bad == "pos-num_positions":
        a["cos"], a["sin"] = a["cos"][:12], a["sin"][:12]
        a["positions"][1] = 12
    elif bad == "pos-capacity":
        a["positions"][1] = max_pages * P      # < num_positions = 40
    else:
        name = "page_table"
        a["page_table"][1, 9 // P] = -1 if bad == "page-negative" else a["k_cache"].shape[0]
    snap = {k: a[k].clone() for k in ("k_cache", "v_cache", "qkv")}
    q_out = torch.full((2, 4, 64), 7.0, dtype=torch.bfloat16)
    assert_value_error(lambda: run_rope(a, q_out=q_out), "rope_append", name)
    for k, v in snap.items():
        assert_bitwise(a[k], v, k)
    assert bool((q_out == 7.0).all()), "q_out written before the error"


# ---- validation -------------------------------------------------------------------------------

def _strided_last(t):
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def _rms_base():
    x, res, w = rms_inputs(3, 8, torch.float16, seed=0)
    return dict(x=x, weight=w, eps=1e-6, residual=res, out=torch.empty_like(x))


def _rms_call(a):
    return lambda: ab.rms_norm(a["x"], a["weight"], a["eps"], residual=a["residual"],
                               out=a["out"])


RMS_CASES = [
    ("x-1d", "x", lambda a: a.update(x=a["x"][0])),
    ("x-3d", "x", lambda a: a.update(x=a["x"][None])),
    ("x-float64", "x", lambda a: a.update(x=a["x"].double(), weight=a["weight"].double(),
                                          residual=a["residual"].double(),
                                          out=a["out"].double())),
    ("x-int", "x", lambda a: a.update(x=a["x"].to(torch.int16), weight=a["weight"].to(torch.int16),
                                      residual=None, out=a["out"].to(torch.int16))),
    ("x-not-tensor", "x", lambda a: a.update(x=a["x"].tolist())),
    ("x-strided-last", "x", lambda a: a.update(x=_strided_last(a["x"]))),
    ("weight-length", "weight", lambda a: a.update(weight=a["weight"][:-1])),
    ("weight-2d", "weight", lambda a: a.update(weight=a["weight"][None])),
    ("weight-dtype", "weight", lambda a: a.update(weight=a["weight"].bfloat16())),
    ("weight-strided", "weight", lambda a: a.update(weight=_strided_last(a["weight"]))),
    ("residual-shape", "residual", lambda a: a.update(residual=a["residual"][:2])),
    ("residual-dtype", "residual", lambda a: a.update(residual=a["residual"].float())),
    ("residual-strided", "residual", lambda a: a.update(residual=_strided_last(a["residual"]))),
    ("out-shape", "out", lambda a: a.update(out=a["out"][:, :7])),
    ("out-dtype", "out", lambda a: a.update(out=a["out"].bfloat16())),
    ("out-strided", "out", lambda a: a.update(out=_strided_last(a["out"]))),
    ("out-overlapping-rows", "out", lambda a: a.update(
        out=torch.empty(8, dtype=torch.float16).expand(3, 8))),
    ("eps-negative", "eps", lambda a: a.update(eps=-1e-6)),
    ("eps-nan", "eps", lambda a: a.update(eps=math.nan)),
    ("eps-inf", "eps", lambda a: a.update(eps=math.inf)),
]


@pytest.mark.parametrize("case", RMS_CASES, ids=[c[0] for c in RMS_CASES])
def test_rms_norm_validation(case):
    _, name, edit = case
    a = _rms_base()
    _rms_call(a)()  # the base call is valid
    a = _rms_base()
    snap = a["residual"].clone()
    edit(a)
    assert_value_error(_rms_call(a), "rms_norm", name)
    if isinstance(a["residual"], torch.Tensor) and a["residual"].shape == snap.shape and \
            a["residual"].dtype == snap.dtype:
        assert_bitwise(a["residual"], snap, "residual written before the error")


SILU_CASES = [
    ("gate_up-odd-columns", "gate_up", lambda a: a.update(gate_up=a["gate_up"][:, :-1], out=None)),
    ("gate_up-odd-columns-out", "gate_up", lambda a: a.update(gate_up=a["gate_up"][:, :-1])),
    ("gate_up-no-columns", "gate_up", lambda a: a.update(gate_up=a["gate_up"][:, :0], out=None)),
    ("gate_up-1d", "gate_up", lambda a: a.update(gate_up=a["gate_up"][0], out=None)),
    ("gate_up-float64", "gate_up", lambda a: a.update(gate_up=a["gate_up"].double(),
                                                      out=a["out"].double())),
    ("gate_up-strided-last", "gate_up", lambda a: a.update(gate_up=_strided_last(a["gate_up"]))),
    ("gate_up-not-tensor", "gate_up", lambda a: a.update(gate_up=3.0)),
    ("out-rows", "out", lambda a: a.update(out=a["out"][:2])),
    ("out-columns", "out", lambda a: a.update(out=torch.empty(3, 8, dtype=torch.bfloat16))),
    ("out-dtype", "out", lambda a: a.update(out=a["out"].half())),
    ("out-strided-last", "out", lambda a: a.update(out=_strided_last(a["out"]))),
    ("out-overlapping-rows", "out", lambda a: a.update(
        out=torch.empty(5, dtype=torch.bfloat16).expand(3, 5))),
]


@pytest.mark.parametrize("case", SILU_CASES, ids=[c[0] for c in SILU_CASES])
def test_silu_mul_validation(case):
    _, name, edit = case
    mk = lambda: dict(gate_up=silu_inputs(3, 5, torch.bfloat16, 0),
                      out=torch.empty(3, 5, dtype=torch.bfloat16))
    a = mk()
    ab.silu_mul(a["gate_up"], out=a["out"])
    a = mk()
    edit(a)
    assert_value_error(lambda: ab.silu_mul(a["gate_up"], out=a["out"]), "silu_mul", name)


def _rope_base():
    a = make_rope_case(2, 4, 2, 8, 4, [3, 5], torch.float16, seed=0, max_pages=3, num_positions=10)
    a["q_out"] = torch.empty(2, 4, 8, dtype=torch.float16)
    return a


def _rope_call(a):
    return lambda: ab.rope_append(a["qkv"], a["cos"], a["sin"], a["k_cache"], a["v_cache"],
                                  a["page_table"], a["positions"], a["num_q_heads"],
                                  q_out=a["q_out"])


def _odd_head_dim(a):
    """D = 7 everywhere (the shapes agree, only D's parity is wrong)."""
    d = 7
    a["qkv"] = torch.zeros(2, (4 + 4) * d, dtype=torch.float16)
    a["cos"] = torch.zeros(10, d, dtype=torch.float16)
    a["sin"] = torch.zeros(10, d, dtype=torch.float16)
    a["k_cache"] = torch.zeros(9, 4, 2, d, dtype=torch.float16)
    a["v_cache"] = torch.zeros(9, 4, 2, d, dtype=torch.float16)
    a["q_out"] = torch.zeros(2, 4, d, dtype=torch.float16)


ROPE_CASES = [
    ("head_dim-odd", "k_cache", _odd_head_dim),
    ("qkv-columns", "qkv", lambda a: a.update(qkv=a["qkv"][:, :-8])),
    ("qkv-1d", "qkv", lambda a: a.update(qkv=a["qkv"][0])),
    ("qkv-float64", "qkv", lambda a: a.update(**{k: a[k].double() for k in (
        "qkv", "cos", "sin", "k_cache", "v_cache", "q_out")})),
    ("qkv-strided-last", "qkv", lambda a: a.update(qkv=_strided_last(a["qkv"]))),
    ("num_q_heads-zero", "num_q_heads", lambda a: a.update(num_q_heads=0)),
    ("num_q_heads-negative", "num_q_heads", lambda a: a.update(num_q_heads=-4)),
    ("num_q_heads-float", "num_q_heads", lambda a: a.update(num_q_heads=4.0)),
    ("num_q_heads-wrong", "qkv", lambda a: a.update(num_q_heads=3, q_out=None)),
    ("cos-head_dim", "cos", lambda a: a.update(cos=a["cos"][:, :6])),
    ("cos-dtype", "cos", lambda a: a.update(cos=a["cos"].bfloat16())),
    ("cos-strided-last", "cos", lambda a: a.update(cos=_strided_last(a["cos"]))),
    ("sin-rows", "sin", lambda a: a.update(sin=a["sin"][:9])),
    ("sin-dtype", "sin", lambda a: a.update(sin=a["sin"].float())),
    ("k_cache-3d", "k_cache", lambda a: a.update(k_cache=a["k_cache"][0])),
    ("k_cache-dtype", "k_cache", lambda a: a.update(k_cache=a["k_cache"].bfloat16())),
    ("k_cache-strided-last", "k_cache", lambda a: a.update(k_cache=_strided_last(a["k_cache"]))),
    ("v_cache-shape", "v_cache", lambda a: a.update(v_cache=a["v_cache"][:, :3])),
    ("v_cache-dtype", "v_cache", lambda a: a.update(v_cache=a["v_cache"].float())),
    ("v_cache-strided-last", "v_cache", lambda a: a.update(v_cache=_strided_last(a["v_cache"]))),
    ("page_table-int64", "page_table", lambda a: a.update(page_table=a["page_table"].long())),
    ("page_table-1d", "page_table", lambda a: a.update(page_table=a["page_table"][0])),
    ("page_table-batch", "page_table", lambda a: a.update(page_table=a["page_table"][:1])),
    ("positions-int64", "positions", lambda a: a.update(positions=a["positions"].long())),
    ("positions-2d", "positions", lambda a: a.update(positions=a["positions"][None])),
    ("positions-batch", "positions", lambda a: a.update(positions=a["positions"][:1])),
    ("q_out-shape", "q_out", lambda a: a.update(q_out=a["q_out"][:, :3])),
    ("q_out-dtype", "q_out", lambda a: a.update(q_out=a["q_out"].float())),
    ("q_out-strided-last", "q_out", lambda a: a.update(q_out=_strided_last(a["q_out"]))),
    # values (CPU only: checked before anything is written)
    ("positions-negative", "positions", lambda a: a["positions"].__setitem__(0, -1)),
    ("positions-num_positions", "positions", lambda a: a["positions"].__setitem__(1, 10)),
    ("positions-capacity", "positions", lambda a: a.update(
        page_table=a["page_table"][:, :1])),  # max_pages * P = 4 <= positions 5
    ("page_table-negative", "page_table", lambda a: a["page_table"].__setitem__((0, 0), -1)),
    ("page_table-num_pages", "page_table", lambda a: a["page_table"].__setitem__(
        (1, 1), a["k_cache"].shape[0])),
]


@pytest.mark.parametrize("case", ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_rope_append_validation(case):
    _, name, edit = case
    a = _rope_base()
    _rope_call(a)()  # the base call is valid
    a = _rope_base()
    edit(a)
    assert_value_error(_rope_call(a), "rope_append", name)


def test_exported():
    for name in ("rms_norm", "silu_mul", "rope_append"):
        assert getattr(ab, name) is getattr(ab.model_ops, name)
        assert name in ab.__all__

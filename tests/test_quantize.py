"""absparse.quantize / dequantize: bit-exact against the float32 arithmetic of the spec."""
import pytest
import torch

import reference as ref
from conftest import assert_bitwise_equal

FORMATS = ref.FORMATS
PER_CHANNEL = ("int8c", "int4c")


def _awkward_rows(d: int, seed: int) -> torch.Tensor:
    """float32 [9, d]: random rows of several magnitudes, an all-zero row, a one-hot row, a row of
    exact .5 quotients for scale 1 (x = k + 0.5 with max 127), negatives and tiny values."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.randn(d, generator=g),                             # [d] N(0, 1)
        torch.randn(d, generator=g) * 1e3,                       # [d] large
        torch.randn(d, generator=g) * 1e-4,                      # [d] small
        torch.zeros(d),                                          # [d] all zero: scale 0, codes 0
        torch.nn.functional.one_hot(torch.tensor(d // 3), d).float() * -5.0,  # [d] one-hot
        (torch.arange(d) % 20 - 10).float() + 0.5,               # [d] half-integers
        torch.full((d,), 2.0),                                   # [d] constant
        -torch.rand(d, generator=g),                             # [d] all negative
        torch.randn(d, generator=g) * 3.0 + 1.0,                 # [d] shifted
    ]
    x = torch.stack(rows).to(torch.float32)                      # [9, d]
    x[5, 0] = 127.0                                              # max |x| = 127 -> int8 scale 1.0
    return x


def _channel_params(d: int, seed: int, fmt: str):
    """float32 [d] scale > 0 and zero covering roughly [-3, 3] so that codes saturate sometimes."""
    g = torch.Generator().manual_seed(seed + 1)
    qmax = ref.QMAX[fmt]
    scale = ((4.0 + 2.0 * torch.rand(d, generator=g)) / qmax).to(torch.float32)  # [d]
    zero = (-3.0 + torch.randn(d, generator=g) * 0.1).to(torch.float32)           # [d]
    return scale, zero


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d", [8, 40, 64, 128, 256])
def test_quantize_dequantize_bit_exact(ab, fmt, d):
    x = _awkward_rows(d, seed=d)                                 # [9, d]
    cs = cz = None
    if fmt in PER_CHANNEL:
        cs, cz = _channel_params(d, d, fmt)                      # [d], [d]
    codes, scales = ab.quantize(x, fmt, cs, cz)
    ref_codes, ref_scales = ref.quantize(x, fmt, cs, cz)
    assert_bitwise_equal(codes, ref_codes, f"{fmt} codes")
    if ref_scales is None:
        assert scales is None
    else:
        assert_bitwise_equal(scales, ref_scales, f"{fmt} scales")
    deq = ab.dequantize(codes, fmt, scales, cs, cz)
    ref_deq = ref.dequantize(ref_codes, fmt, ref_scales, cs, cz)
    assert_bitwise_equal(deq, ref_deq, f"{fmt} dequantized")


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_leading_dims_and_channel_rows(ab, fmt):
    """x [2, 3, D] keeps its leading dims; per-channel params given per row [2, 3, D]."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, generator=g)                       # [2, 3, 64]
    cs = cz = None
    if fmt in PER_CHANNEL:
        s, z = _channel_params(64, 5, fmt)
        cs = s * (1 + torch.rand(2, 3, 64, generator=g))         # [2, 3, 64]
        cz = z + torch.randn(2, 3, 64, generator=g) * 0.1        # [2, 3, 64]
    codes, scales = ab.quantize(x, fmt, cs, cz)
    ref_codes, ref_scales = ref.quantize(x, fmt, cs, cz)
    assert codes.shape == (2, 3, ref.summary_width(fmt, 64))
    assert_bitwise_equal(codes, ref_codes, "codes")
    if ref_scales is not None:
        assert scales.shape == (2, 3)
        assert_bitwise_equal(scales, ref_scales, "scales")
    deq = ab.dequantize(codes, fmt, scales, cs, cz)
    assert deq.shape == (2, 3, 64) and deq.dtype == torch.float32
    assert_bitwise_equal(deq, ref.dequantize(ref_codes, fmt, ref_scales, cs, cz), "dequantized")


def test_int8_round_half_even_and_scale(ab):
    # max |x| = 127 -> scale = 127 / 127 = 1 exactly; x / 1 = x, so halves round to even.
    x = torch.tensor([[127.0, 63.5, -0.5, 0.5, 1.5, -2.5, 2.5, -127.0]])
    codes, scales = ab.quantize(x, "int8")
    assert scales.tolist() == [1.0]
    assert codes.tolist() == [[127, 64, 0, 0, 2, -2, 2, -127]]


def test_int4_packing_and_twos_complement(ab):
    # max |x| = 7 -> scale 1; codes [1, -1, 7, -7, 0, 2] -> nibbles [1, 0xF, 7, 9, 0, 2]
    x = torch.tensor([[1.0, -1.0, 7.0, -7.0, 0.0, 2.0]])
    codes, scales = ab.quantize(x, "int4")
    assert scales.tolist() == [1.0]
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[0xF1, 0x97, 0x20]]                # low nibble = element 2i
    deq = ab.dequantize(codes, "int4", scales)
    assert deq.tolist() == x.tolist()
    # unsigned nibbles for int4c: byte 0x9F -> [15, 9]
    one = torch.ones(1, 2)
    assert ab.dequantize(torch.tensor([[0x9F]], dtype=torch.uint8), "int4c", None, one,
                         torch.zeros(1, 2)).tolist() == [[15.0, 9.0]]


def test_all_zero_vector(ab):
    x = torch.zeros(2, 16)
    for fmt in ("int8", "int4"):
        codes, scales = ab.quantize(x, fmt)
        assert scales.tolist() == [0.0, 0.0]
        assert (codes == 0).all()
        assert (ab.dequantize(codes, fmt, scales) == 0).all()


@pytest.mark.parametrize("fmt", PER_CHANNEL)
def test_per_channel_saturation_and_halves(ab, fmt):
    qmax = ref.QMAX[fmt]
    vals = [0.5, 1.5, 2.5, -0.5, -100.0, qmax - 0.5, qmax + 0.5, 1e9]
    x = torch.tensor([vals])                                     # [1, 8]
    one, zero = torch.ones(8), torch.zeros(8)
    codes, scales = ab.quantize(x, fmt, one, zero)
    assert scales is None
    deq = ab.dequantize(codes, fmt, None, one, zero)
    expect = [0, 2, 2, 0, 0, qmax - 1, qmax, qmax]  # qmax is odd: qmax - 0.5 rounds to qmax - 1
    assert deq.tolist() == [[float(e) for e in expect]]


def test_float_formats_round_like_torch(ab):
    """fp16 / bf16 storage rounds to nearest even, overflows to inf and keeps subnormals."""
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(64, generator=g) * 10,
                   torch.tensor([65504.0, 65520.0, 70000.0, -1e6, 3e-8, 6e-8, 1e-5, -2.0**-25,
                                 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 3.0e38])])
    x = x[None]                                                  # [1, 76]
    for fmt, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        codes, scales = ab.quantize(x, fmt)
        assert scales is None
        assert_bitwise_equal(codes, x.to(dtype), fmt)
        assert_bitwise_equal(ab.dequantize(codes, fmt), x.to(dtype).to(torch.float32), fmt)


@pytest.mark.parametrize("fmt", ("int8", "int4"))
def test_symmetric_round_trip_error_bound(ab, fmt):
    """|dequantize(quantize(x)) - x| <= scale / 2 (+ float32 rounding of the product)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 128, generator=g) * torch.rand(50, 1, generator=g) * 10
    codes, scales = ab.quantize(x, fmt)
    err = (ab.dequantize(codes, fmt, scales) - x).abs()
    bound = scales[:, None] * (0.5 + 1e-5) + 1e-30
    assert bool((err <= bound).all())


def _near_halves(step: torch.Tensor, k: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """float32 values within one ulp of (k + 0.5) * step: where x / step and x * (1 / step) can
    round to different codes."""
    x = ((k.to(torch.float64) + 0.5) * step.to(torch.float64)).to(torch.float32)
    nudge = torch.randint(-1, 2, x.shape, generator=g)
    x = torch.where(nudge > 0, torch.nextafter(x, torch.full_like(x, float("inf"))), x)
    return torch.where(nudge < 0, torch.nextafter(x, torch.full_like(x, -float("inf"))), x)


@pytest.mark.parametrize("fmt", ("int8", "int4", "int8c", "int4c"))
def test_quotient_is_a_true_division(ab, fmt):
    """Codes come from the float32 quotient x / scale (not x * (1 / scale), not float64): values
    within an ulp of half-integer quotients, where those differ, must match the reference."""
    g = torch.Generator().manual_seed(8)
    qmax = ref.QMAX[fmt]
    rows, d = 512, 64
    if fmt in PER_CHANNEL:
        scale = (0.01 + 0.09 * torch.rand(d, generator=g)).to(torch.float32)      # [d]
        zero = torch.zeros(d)                                                    # [d]
        k = torch.randint(0, qmax, (rows, d), generator=g)                       # [rows, d]
        x = _near_halves(scale.expand(rows, d), k, g)                            # [rows, d]
        step = scale.expand(rows, d)
    else:
        amax = (1.0 + torch.rand(rows, 1, generator=g)).to(torch.float32)        # [rows, 1]
        step = (amax / torch.full_like(amax, float(qmax))).expand(rows, d)       # float32 scale
        k = torch.randint(-qmax + 1, qmax - 1, (rows, d), generator=g)
        x = _near_halves(step, k, g)                                             # [rows, d]
        x[:, 0] = amax[:, 0]                                                     # max |x| = amax
        scale = zero = None
    differs = torch.round(x / step) != torch.round(x * (1.0 / step))
    assert bool(differs.any()), "test data does not separate the two quotients"
    codes, scales = ab.quantize(x, fmt, scale, zero)
    ref_codes, ref_scales = ref.quantize(x, fmt, scale, zero)
    assert_bitwise_equal(codes, ref_codes, f"{fmt} codes")
    if ref_scales is not None:
        assert_bitwise_equal(scales, ref_scales, f"{fmt} scales")


@pytest.mark.parametrize("fmt,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_float_format_bit_pattern_sweep(ab, fmt, dtype):
    """~1M float32 bit patterns spread over the whole range (normals, subnormals, overflow):
    fp16 / bf16 storage equals torch's round-to-nearest-even conversion bit for bit."""
    bits = torch.arange(0, 2**32, 4099, dtype=torch.int64)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[~torch.isnan(x)]
    x = x[: x.numel() // 64 * 64].reshape(-1, 64)               # [rows, 64]
    codes, _ = ab.quantize(x, fmt)
    assert_bitwise_equal(codes, x.to(dtype), fmt)


@pytest.mark.parametrize("fmt", ("int8", "int4", "int8c", "int4c"))
def test_nonfinite_inputs(ab, fmt):
    """docs/decode.md ("NaN and ±inf"): a NaN takes the largest code and is left out of the
    per-vector amax; ±inf saturate (int8/int4: an infinite amax gives an infinite scale, under
    which finite values quantize to 0 and ±inf to NaN quotients, i.e. +qmax). Bit-exact against
    the reference; rows: one NaN, one +inf, one -inf, NaN and inf, all NaN."""
    d = 16
    x = _awkward_rows(d, seed=5)[:5].clone()                     # [5, d]
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 0] = -float("inf")
    x[3, 1], x[3, 2] = float("nan"), float("inf")
    x[4] = float("nan")
    cs = cz = None
    if fmt in PER_CHANNEL:
        cs, cz = _channel_params(d, 5, fmt)
    codes, scales = ab.quantize(x, fmt, cs, cz)
    ref_codes, ref_scales = ref.quantize(x, fmt, cs, cz)
    assert_bitwise_equal(codes, ref_codes, f"{fmt} codes")
    deq = ab.dequantize(codes, fmt, scales, cs, cz)
    qmax = ref.QMAX[fmt]
    if fmt in PER_CHANNEL:
        assert scales is None and torch.isfinite(deq).all()     # always finite codes
        top = ref.dequantize(torch.full_like(codes, 0xFF), fmt, None, cs, cz)  # [5, d] all +qmax
        assert deq[0, 3] == top[0, 3] and deq[1, 7] == top[1, 7] and deq[4].equal(top[4])
        assert deq[2, 0] == cz[0]                                # -inf -> code 0
    else:
        assert_bitwise_equal(scales, ref_scales, f"{fmt} scales")
        finite_amax = x[0].nan_to_num(0.0).abs().max() / qmax
        assert scales[0] == finite_amax and scales[4] == 0       # NaN left out of the amax
        assert torch.isinf(scales[1:4]).all()                    # ±inf: infinite scale
        assert not torch.isfinite(deq[1:4]).any()                # ... every value non-finite
        assert ref.dequantize(codes, fmt, scales)[0, 3] == qmax * scales[0]

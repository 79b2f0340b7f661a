"""Fused non-attention steps of a Llama decoder layer for the decode loop (``absparse.runner``).

A decode step of a Llama model written with framework ops runs ~34 small kernels per layer
besides its four matrix products (the norms, RoPE, the K / V append, SwiGLU's product, the
residual adds); at batch 1-16 each costs a launch's worth of time, more than the work. These
three ops do the same work in three kernels per layer, rounding where transformers' modules round
(``docs/model_ops.md``):

- ``rms_norm``: RMSNorm, with the residual add fused in front of it;
- ``silu_mul``: SwiGLU's ``silu(gate) * up``;
- ``rope_append``: RoPE of q and k at each sequence's position and the K / V append into the
  paged cache.

CPU tensors run the C++ reference, CUDA tensors (builds with the kernels) one kernel each on the
current stream (capturable in a CUDA graph). Arguments are validated in the native layer
(``ValueError`` naming the argument, the expected and the actual value); on CUDA, device values
(positions, page-table entries) are not checked but made harmless (``absparse/model_ops_cuda.h``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _C
from .ops import _cuda_stream, _is_cuda, _tensor

__all__ = ["rms_norm", "silu_mul", "rope_append"]


def _stream(t: torch.Tensor) -> int:
    return _cuda_stream(t) if _is_cuda(t) else 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Llama's RMSNorm of each row, with an optional residual add in front of it.

    ``h = x`` or, with ``residual``, ``h = x + residual`` rounded to the dtype and stored into
    ``residual`` (in place: the residual stream advances); then
    ``out = weight * T(h / sqrt(mean(h^2) + eps))`` with the mean over the row, as transformers'
    ``LlamaRMSNorm`` rounds.

    Parameters
    ----------
    x : [N, H] float32 / float16 / bfloat16, last dimension contiguous
    weight : [H], same dtype and device
    eps : float >= 0
    residual : optional [N, H], same dtype and device (updated in place)
    out : optional [N, H] output (may be ``x`` itself); allocated when None

    Returns
    -------
    out : [N, H]

    Example
    -------
    >>> x, res = torch.randn(2, 8), torch.randn(2, 8)
    >>> y = absparse.rms_norm(x, torch.ones(8), 1e-5, residual=res)   # res is now x + res
    """
    fn = "rms_norm"
    x, weight = _tensor(x, fn, "x"), _tensor(weight, fn, "weight")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (
            math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps: expected a finite float >= 0, got {eps!r}")
    if residual is not None:
        residual = _tensor(residual, fn, "residual")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _C.rms_norm(x, weight, float(eps), residual, _tensor(out, fn, "out"), _stream(x))
    return out


def silu_mul(gate_up: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SwiGLU's product: ``out = silu(gate) * up`` with ``gate, up = gate_up.chunk(2, -1)``,
    rounded to the dtype after the silu and after the product (as ``F.silu(gate) * up``).

    Parameters
    ----------
    gate_up : [N, 2 I] float32 / float16 / bfloat16, last dimension contiguous
    out : optional [N, I] output; allocated when None

    Returns
    -------
    out : [N, I]

    Example
    -------
    >>> absparse.silu_mul(torch.randn(3, 10)).shape
    torch.Size([3, 5])
    """
    fn = "silu_mul"
    gate_up = _tensor(gate_up, fn, "gate_up")
    if out is None:
        if gate_up.dim() != 2 or gate_up.shape[1] % 2:
            raise ValueError(f"{fn}: gate_up: expected [N, 2 I] (an even number of columns), "
                             f"got {list(gate_up.shape)}")
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype,
                          device=gate_up.device)
    _C.silu_mul(gate_up, _tensor(out, fn, "out"), _stream(gate_up))
    return out


def rope_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                positions: torch.Tensor, num_q_heads: int,
                q_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RoPE of one decode token per sequence and its K / V append into the paged cache.

    Row b of ``qkv`` holds the token's q heads, then its k heads, then its v heads (the fused
    projection's output). At ``p = positions[b]``, q and k are rotated with the tables' row p
    (transformers' ``rotate_half`` convention and rounding: ``T(T(x * cos) + T(rotate_half(x) *
    sin))``); q goes to ``q_out``, k and v to row ``p % P`` of page ``page_table[b, p // P]`` of
    ``k_cache`` / ``v_cache``.

    Parameters
    ----------
    qkv : [B, (Hq + 2 Hk) D] float32 / float16 / bfloat16, last dimension contiguous
    cos, sin : [num_positions, D], same dtype (e.g. transformers' rotary tables, rounded)
    k_cache, v_cache : [num_pages, P, Hk, D], same dtype
    page_table : int32 [B, max_pages], entries of the written pages in [0, num_pages)
    positions : int32 [B], each in [0, min(num_positions, max_pages * P))
    num_q_heads : Hq (Hk and D come from the caches)
    q_out : optional [B, Hq, D] output; allocated when None

    Returns
    -------
    q_out : [B, Hq, D], the rotated queries

    Example
    -------
    >>> q = absparse.rope_append(qkv, cos, sin, k_pool, v_pool, page_table, seq_lens - 1, 32)
    """
    fn = "rope_append"
    qkv = _tensor(qkv, fn, "qkv")
    if isinstance(num_q_heads, bool) or not isinstance(num_q_heads, int) or num_q_heads <= 0:
        raise ValueError(f"{fn}: num_q_heads: expected an int > 0, got {num_q_heads!r}")
    k_cache = _tensor(k_cache, fn, "k_cache")
    if q_out is None:
        if k_cache.dim() != 4 or qkv.dim() != 2:
            raise ValueError(f"{fn}: k_cache, qkv: expected [num_pages, P, Hk, D] and "
                             f"[B, (Hq + 2 Hk) D], got {list(k_cache.shape)} and "
                             f"{list(qkv.shape)}")
        q_out = torch.empty(qkv.shape[0], num_q_heads, k_cache.shape[3], dtype=qkv.dtype,
                            device=qkv.device)
    _C.rope_append(qkv, _tensor(cos, fn, "cos"), _tensor(sin, fn, "sin"), k_cache,
                   _tensor(v_cache, fn, "v_cache"), _tensor(page_table, fn, "page_table"),
                   _tensor(positions, fn, "positions"), num_q_heads, _tensor(q_out, fn, "q_out"),
                   _stream(qkv))
    return q_out

"""The decode pipeline ops: update_centroids -> select_blocks -> sparse_decode, and dense_decode.

Each function validates its arguments in the native layer (``ValueError`` naming the argument, the
expected and the actual value), allocates outputs here, and runs on the tensors' device. The exact
semantics are in ``docs/decode.md``.

On CUDA tensors (when ``absparse._C.has_cuda``) the kernels of ``absparse/decode_cuda.h`` run on
the current stream (select_blocks with a workspace allocated here). There the native layer checks
everything it can without reading device memory (shapes, dtypes, devices, layouts, the supported
GPU configurations) and raises ``ValueError`` before any device work; values such as ``seq_lens``
or block lists stay on the device (reading them would synchronize), and the kernels clamp or skip
bad ones instead of raising.

Every function is also a torch.library custom op (``torch_ops.py``: ``absparse::update_centroids``
and the others). While torch.compile traces a function, it calls that op, so compiled code
(``fullgraph=True`` included) keeps the op in its graph; in eager mode it calls the binding
directly (the same kernels, without the dispatcher's overhead).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from . import _C
from . import torch_ops
from .layout import LayerLayout

__all__ = ["update_centroids", "select_blocks", "sparse_decode", "dense_decode", "quantize",
           "dequantize", "default_max_blocks"]

_CODE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                "int8": torch.int8, "int4": torch.uint8, "int8c": torch.uint8, "int4c": torch.uint8}


# Counts above this are "unbounded": every sequence length fits in int32, so clamping keeps the
# meaning while staying far from int64 overflow in the native layer.
_UNBOUNDED = 2 ** 62


def _tensor(x, fn: str, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: {name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _check_layout(layout, fn: str) -> LayerLayout:
    if not isinstance(layout, LayerLayout):
        raise ValueError(f"{fn}: layout: expected an absparse.LayerLayout, got {type(layout).__name__}")
    return layout


def _default_scale(q: torch.Tensor, scale: Optional[float], fn: str) -> float:
    if scale is None:
        if q.dim() < 1 or q.shape[-1] <= 0:
            raise ValueError(f"{fn}: q: expected a non-empty last dimension, got shape {list(q.shape)}")
        return 1.0 / math.sqrt(q.shape[-1])
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"{fn}: scale: expected a finite float, got {scale!r}")
    return float(scale)


def _budget(token_budget) -> Tuple[int, float]:
    """(token count, fraction): an int is a token count, a float in (0, 1) a fraction of L."""
    if isinstance(token_budget, bool) or not isinstance(token_budget, numbers.Real):
        raise ValueError(f"select_blocks: token_budget: expected an int token count or a float in "
                         f"(0, 1), got {token_budget!r}")
    if isinstance(token_budget, numbers.Integral):
        if token_budget < 0:
            raise ValueError(f"select_blocks: token_budget: expected a token count >= 0, got "
                             f"{token_budget}")
        return min(int(token_budget), _UNBOUNDED), 0.0
    if not 0.0 < token_budget < 1.0:
        raise ValueError(f"select_blocks: token_budget: a float budget is a fraction of the context "
                         f"and must lie in (0, 1) (pass an int for a token count), got {token_budget!r}")
    return 0, float(token_budget)


def _non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"select_blocks: {name}: expected an int >= 0, got {value!r}")
    return min(int(value), _UNBOUNDED)


def _is_cuda(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_cuda


def _cuda_stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, as the integer handle the kernels launch on."""
    return torch.cuda.current_stream(t.device).cuda_stream


def _compiling() -> bool:
    """True while torch.compile traces the caller: call the custom op, not the binding."""
    return torch.compiler.is_compiling()


def _layout_fields(layout: LayerLayout) -> tuple:
    """(block_sizes list, page_size, summary, format): the layout as custom-op arguments."""
    sizes, page_size, summary, format = layout._fields
    return list(sizes), page_size, summary, format


@torch.compiler.assume_constant_result
def _max_blocks_bound(fields: tuple, max_pages: int, budget_tokens: int, budget_fraction: float,
                      sink_tokens: int, local_tokens: int) -> int:
    """C++ max_blocks_bound of the layout with these fields (a constant to torch.compile)."""
    return _C.max_blocks_bound(torch_ops.native_layout(*fields), max_pages, budget_tokens,
                               budget_fraction, sink_tokens, local_tokens)


def default_max_blocks(page_table: torch.Tensor, layout: LayerLayout,
                       token_budget: Union[int, float, None] = None, sink_tokens: int = 16,
                       local_tokens: int = 64) -> int:
    """Capacity of the block lists that fits any length the page table can hold.

    Without ``token_budget``: every block, ``ceil(max_pages * P / min bs)``. With it (what
    ``select_blocks`` uses by default): the most blocks one (sequence, head) can keep under that
    budget and these windows, ``max_h min(max_pages * P / bs_h, max(ceil(sink / bs_h) +
    ceil(local / bs_h), T / bs_h))`` with T the budget in tokens (a fraction of ``max_pages * P``
    for a float budget); no sequence length is read.

    >>> layout = LayerLayout([8, 64], page_size=64)
    >>> pt = torch.zeros(1, 2048, dtype=torch.int32)            # 128K tokens of capacity
    >>> default_max_blocks(pt, layout), default_max_blocks(pt, layout, 2048)
    (16384, 256)
    """
    max_pages = page_table.shape[-1]
    if token_budget is None:
        return -(-max_pages * layout.page_size // layout.min_block_size)
    budget_tokens, budget_fraction = _budget(token_budget)
    return _max_blocks_bound(layout._fields, max_pages, budget_tokens, budget_fraction,
                             _non_negative_int(sink_tokens, "sink_tokens"),
                             _non_negative_int(local_tokens, "local_tokens"))


def update_centroids(k_cache: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor,
                     start_pos: torch.Tensor, layout: LayerLayout, summaries: torch.Tensor,
                     scales: Optional[torch.Tensor] = None,
                     max_new_tokens: Optional[int] = None) -> None:
    """Write the summaries of the blocks that become complete in tokens ``[start_pos, seq_lens)``.

    Parameters
    ----------
    k_cache : [num_pages, P, Hk, D] float16 / bfloat16 / float32, paged keys (after RoPE)
    page_table : int32 [B, max_pages]; entries past a sequence's last page are never read
    seq_lens : int32 [B]
    start_pos : int32 [B], ``0 <= start_pos <= seq_lens`` (0 after prefill, L-1 after one append)
    layout : LayerLayout of this layer
    summaries, scales : the summary cache from ``layout.new_summary_cache`` (updated in place)
    max_new_tokens : on CUDA tensors, a hint that no sequence has more than this many new tokens
        (``seq_lens - start_pos``), e.g. 1 in a decode step: it sizes the launch. A wrong hint
        costs speed, never correctness. Ignored on the CPU.

    Example
    -------
    >>> layout = LayerLayout([16], page_size=16, summary="minmax", format="fp32")
    >>> k = torch.randn(2, 16, 1, 64); pt = torch.tensor([[1, 0]], dtype=torch.int32)
    >>> s, sc = layout.new_summary_cache(2, 64)
    >>> update_centroids(k, pt, torch.tensor([32], dtype=torch.int32),
    ...                  torch.tensor([0], dtype=torch.int32), layout, s, sc)
    >>> torch.equal(s[1, 0, 0], k[1, :, 0].max(0).values)   # block 0 lives in page 1
    True
    """
    layout = _check_layout(layout, "update_centroids")
    _tensor(summaries, "update_centroids", "summaries")
    channel_scale, channel_zero = layout.channel_params(summaries.device)
    if max_new_tokens is None:
        max_new_tokens = 0
    elif (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral)
          or max_new_tokens < 1):
        raise ValueError(f"update_centroids: max_new_tokens: expected an int >= 1 or None, got "
                         f"{max_new_tokens!r}")
    max_new_tokens = min(int(max_new_tokens), _UNBOUNDED)
    if _compiling():
        torch.ops.absparse.update_centroids(k_cache, page_table, seq_lens, start_pos,
                                            *_layout_fields(layout), summaries, scales,
                                            channel_scale, channel_zero, max_new_tokens)
        return
    cuda = {"stream": _cuda_stream(k_cache)} if _is_cuda(k_cache) else {}
    _C.update_centroids(k_cache, page_table, seq_lens, start_pos, layout._native, summaries,
                        scales, channel_scale, channel_zero, max_new_tokens=max_new_tokens,
                        **cuda)


def select_blocks(q: torch.Tensor, summaries: torch.Tensor, scales: Optional[torch.Tensor],
                  page_table: torch.Tensor, seq_lens: torch.Tensor, layout: LayerLayout,
                  token_budget: Union[int, float], sink_tokens: int = 16, local_tokens: int = 64,
                  group_reduce: str = "max", max_blocks: Optional[int] = None,
                  scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Choose the blocks every (sequence, KV head) attends within a token budget.

    Parameters
    ----------
    q : [B, Hq, D] float16 / bfloat16 / float32, the new query of each sequence
    summaries, scales : the layer's summary cache (see ``LayerLayout.new_summary_cache``)
    page_table : int32 [B, max_pages]; seq_lens : int32 [B]
    layout : LayerLayout
    token_budget : int tokens, or float in (0, 1) = ``ceil(fraction * L_b)`` tokens per sequence
    sink_tokens, local_tokens : always-kept first / last tokens (rounded up to whole blocks)
    group_reduce : "max" (max block logit over the group's query heads) or "softmax_sum"
    max_blocks : capacity of the output lists (default: ``default_max_blocks(page_table,
        layout, token_budget, sink_tokens, local_tokens)``, the most any length can need)
    scale : logit scale, default ``1/sqrt(D)``

    Returns
    -------
    block_indices : int32 [B, Hk, max_blocks], sink ∪ selected ∪ local ascending, padded with -1
    block_counts : int32 [B, Hk]

    Example
    -------
    >>> layout = LayerLayout([16, 32], page_size=32, summary="minmax", format="int8")
    >>> s, sc = layout.new_summary_cache(4, 64)
    >>> idx, cnt = select_blocks(torch.randn(1, 4, 64), s, sc,
    ...                          torch.arange(4, dtype=torch.int32)[None],
    ...                          torch.tensor([128], dtype=torch.int32), layout, 64,
    ...                          sink_tokens=0, local_tokens=0)
    >>> cnt.tolist()
    [[4, 2]]
    """
    layout = _check_layout(layout, "select_blocks")
    _tensor(q, "select_blocks", "q")
    _tensor(page_table, "select_blocks", "page_table")
    budget_tokens, budget_fraction = _budget(token_budget)
    sink_tokens = _non_negative_int(sink_tokens, "sink_tokens")
    local_tokens = _non_negative_int(local_tokens, "local_tokens")
    if group_reduce not in ("max", "softmax_sum"):
        raise ValueError(f"select_blocks: group_reduce: expected 'max' or 'softmax_sum', got "
                         f"{group_reduce!r}")
    if max_blocks is None:
        max_blocks = (default_max_blocks(page_table, layout, token_budget, sink_tokens,
                                         local_tokens) if page_table.dim() == 2 else 0)
    elif (isinstance(max_blocks, bool) or not isinstance(max_blocks, numbers.Integral)
          or not 0 <= max_blocks < 2 ** 31):
        raise ValueError(f"select_blocks: max_blocks: expected an int in [0, 2^31), got "
                         f"{max_blocks!r}")
    scale = _default_scale(q, scale, "select_blocks")
    channel_scale, channel_zero = layout.channel_params(q.device)
    if _compiling():
        return torch.ops.absparse.select_blocks(
            q, summaries, scales, page_table, seq_lens, *_layout_fields(layout), channel_scale,
            channel_zero, budget_tokens, budget_fraction, sink_tokens, local_tokens,
            group_reduce, scale, int(max_blocks))
    block_indices, block_counts = torch_ops.select_outputs(q, layout.num_kv_heads,
                                                           int(max_blocks))
    torch_ops.run_select_blocks(q, summaries, scales, page_table, seq_lens, layout._native,
                                channel_scale, channel_zero, budget_tokens, budget_fraction,
                                sink_tokens, local_tokens, group_reduce, scale, block_indices,
                                block_counts)
    return block_indices, block_counts


def _attention_cuda(q) -> dict:
    """The stream argument of _C.decode_attention for CUDA tensors ({} otherwise)."""
    return {"stream": _cuda_stream(q)} if _is_cuda(q) else {}


def _attention_out(q: torch.Tensor, out: Optional[torch.Tensor], return_lse: bool):
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = None
    if return_lse:
        shape = tuple(q.shape[:2]) if q.dim() == 3 else (0, 0)
        lse = torch.empty(shape, dtype=torch.float32, device=q.device)
    return out, lse


def _compiled_attention(result, out: Optional[torch.Tensor], return_lse: bool):
    """The public return value from a custom op's (out, lse), copied into ``out`` if given."""
    res, lse = result
    if out is not None:
        out.copy_(res)
        res = out
    return (res, lse) if return_lse else res


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  page_table: torch.Tensor, seq_lens: torch.Tensor,
                  block_sizes: Union[torch.Tensor, LayerLayout], block_indices: torch.Tensor,
                  block_counts: torch.Tensor, scale: Optional[float] = None,
                  out: Optional[torch.Tensor] = None, return_lse: bool = False):
    """Attention of each sequence's query over its listed blocks plus the partial tail.

    Parameters
    ----------
    q : [B, Hq, D]; k_cache, v_cache : [num_pages, P, Hk, D] (same dtype: fp16 / bf16 / fp32)
    page_table : int32 [B, max_pages]; seq_lens : int32 [B]
    block_sizes : int32 [Hk] (CPU), or a LayerLayout (its block sizes are used)
    block_indices : int32 [B, Hk, max_blocks], the first ``block_counts[b, h]`` entries in
        ``[0, L_b // bs_h)``, strictly ascending (any such list, not only select_blocks' output)
    block_counts : int32 [B, Hk]
    scale : default ``1/sqrt(D)``; out : optional [B, Hq, D] output (returned)
    return_lse : also return lse float32 [B, Hq] (natural log; -inf when nothing is attended)

    Example
    -------
    >>> k = torch.randn(2, 16, 1, 64); v = torch.randn_like(k); q = torch.randn(1, 2, 64)
    >>> pt = torch.tensor([[0, 1]], dtype=torch.int32); L = torch.tensor([20], dtype=torch.int32)
    >>> idx = torch.tensor([[[0]]], dtype=torch.int32); cnt = torch.tensor([[1]], dtype=torch.int32)
    >>> out = sparse_decode(q, k, v, pt, L, torch.tensor([16], dtype=torch.int32), idx, cnt)
    >>> torch.allclose(out, dense_decode(q, k, v, pt, L), atol=1e-6)   # blocks 0 + tail = all
    True
    """
    _tensor(q, "sparse_decode", "q")
    if isinstance(block_sizes, LayerLayout):
        block_sizes = block_sizes.block_sizes
    if not isinstance(block_sizes, torch.Tensor):
        raise ValueError(f"sparse_decode: block_sizes: expected an int32 tensor [Hk] or a "
                         f"LayerLayout, got {type(block_sizes).__name__}")
    scale = _default_scale(q, scale, "sparse_decode")
    if _compiling():
        return _compiled_attention(torch.ops.absparse.sparse_decode(
            q, k_cache, v_cache, page_table, seq_lens, block_sizes, block_indices, block_counts,
            scale, bool(return_lse)), out, return_lse)
    out, lse = _attention_out(q, out, return_lse)
    cuda = _attention_cuda(q)
    _C.decode_attention(q, k_cache, v_cache, page_table, seq_lens, block_sizes, block_indices,
                        block_counts, scale, out, lse, **cuda)
    return (out, lse) if return_lse else out


def dense_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 page_table: torch.Tensor, seq_lens: torch.Tensor, scale: Optional[float] = None,
                 out: Optional[torch.Tensor] = None, return_lse: bool = False):
    """Full attention of each sequence's query over its ``seq_lens[b]`` cached tokens.

    Same arguments and outputs as :func:`sparse_decode` without the block lists.

    Example
    -------
    >>> k = torch.randn(1, 16, 1, 64); v = torch.randn_like(k); q = torch.randn(1, 1, 64)
    >>> out, lse = dense_decode(q, k, v, torch.zeros(1, 1, dtype=torch.int32),
    ...                         torch.tensor([3], dtype=torch.int32), return_lse=True)
    >>> ref = torch.softmax(q[0] @ k[0, :3, 0].T / 8, -1) @ v[0, :3, 0]
    >>> torch.allclose(out[0], ref, atol=1e-5)
    True
    """
    _tensor(q, "dense_decode", "q")
    scale = _default_scale(q, scale, "dense_decode")
    if _compiling():
        return _compiled_attention(torch.ops.absparse.dense_decode(
            q, k_cache, v_cache, page_table, seq_lens, scale, bool(return_lse)), out, return_lse)
    out, lse = _attention_out(q, out, return_lse)
    cuda = _attention_cuda(q)
    _C.decode_attention(q, k_cache, v_cache, page_table, seq_lens, None, None, None, scale, out,
                        lse, **cuda)
    return (out, lse) if return_lse else out


def _check_format(format: str, fn: str) -> str:
    if format not in _CODE_DTYPES:
        raise ValueError(f"{fn}: format: expected one of {list(_CODE_DTYPES)}, got {format!r}")
    return format


def _channel_rows(value, x_shape, name: str, fn: str) -> torch.Tensor:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32)
    try:
        t = torch.broadcast_to(t, x_shape)
    except RuntimeError:
        raise ValueError(f"{fn}: {name}: expected a shape broadcastable to {list(x_shape)}, got "
                         f"{list(t.shape)}") from None
    return t.reshape(-1, x_shape[-1]).contiguous()


def quantize(x: torch.Tensor, format: str, channel_scale=None, channel_zero=None):
    """Quantize float32 vectors ``x [..., D]`` to a summary storage format.

    Returns ``(codes [..., W], scales [...] or None)``. W = D (D/2 for int4/int4c). ``scales`` is
    returned for "int8"/"int4" (symmetric per vector); "int8c"/"int4c" need ``channel_scale`` and
    ``channel_zero`` broadcastable to ``x``. Arithmetic: see ``docs/decode.md``.

    Example
    -------
    >>> codes, scales = quantize(torch.tensor([[1.0, -2.0, 0.5, 0.0]]), "int4")
    >>> scales.tolist(), dequantize(codes, "int4", scales).tolist()
    ([0.2857142984867096], [[0.8571429252624512, -2.0, 0.5714285969734192, 0.0]])
    """
    fn = "quantize"
    _check_format(format, fn)
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{fn}: x: expected a float32 tensor [..., D], got {x!r:.60}")
    if x.dtype != torch.float32:
        raise ValueError(f"{fn}: x: expected dtype float32, got {x.dtype}")
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)
    width = dim // 2 if format in ("int4", "int4c") else dim
    codes = torch.empty((rows.shape[0], width), dtype=_CODE_DTYPES[format], device=x.device)
    scales = (torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
              if format in ("int8", "int4") else None)
    _C.quantize(rows, format, _channel_rows(channel_scale, x.shape, "channel_scale", fn),
                _channel_rows(channel_zero, x.shape, "channel_zero", fn), codes, scales)
    codes = codes.reshape(*x.shape[:-1], width)
    return codes, (scales.reshape(x.shape[:-1]) if scales is not None else None)


def dequantize(codes: torch.Tensor, format: str, scales=None, channel_scale=None,
               channel_zero=None) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``codes [..., W]`` -> float32 ``[..., D]``."""
    fn = "dequantize"
    _check_format(format, fn)
    if not isinstance(codes, torch.Tensor) or codes.dim() < 1:
        raise ValueError(f"{fn}: codes: expected a tensor [..., W], got {codes!r:.60}")
    width = codes.shape[-1]
    dim = width * 2 if format in ("int4", "int4c") else width
    lead = tuple(codes.shape[:-1])
    out = torch.empty((int(math.prod(lead)), dim), dtype=torch.float32, device=codes.device)
    scale_rows = None
    if scales is not None:
        if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != lead:
            raise ValueError(f"{fn}: scales: expected a float32 tensor of shape {list(lead)}, got "
                             f"{getattr(scales, 'shape', scales)}")
        scale_rows = scales.reshape(-1)
    _C.dequantize(codes.reshape(-1, width), format, scale_rows,
                  _channel_rows(channel_scale, lead + (dim,), "channel_scale", fn),
                  _channel_rows(channel_zero, lead + (dim,), "channel_zero", fn), out)
    return out.reshape(*lead, dim)

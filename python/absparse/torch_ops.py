"""The decode ops as torch.library custom ops, so that torch.compile and CUDA graphs see them.

Registered when ``absparse`` is imported (the pybind11 binding ``absparse._C`` stays torch-free):

    absparse::update_centroids(Tensor k_cache, Tensor page_table, Tensor seq_lens,
        Tensor start_pos, int[] block_sizes, int page_size, str summary, str format,
        Tensor(a!) summaries, Tensor(b!)? scales, Tensor? channel_scale, Tensor? channel_zero,
        int max_new_tokens) -> ()
    absparse::select_blocks(Tensor q, Tensor summaries, Tensor? scales, Tensor page_table,
        Tensor seq_lens, int[] block_sizes, int page_size, str summary, str format,
        Tensor? channel_scale, Tensor? channel_zero, int budget_tokens, float budget_fraction,
        int sink_tokens, int local_tokens, str group_reduce, float scale, int max_blocks)
        -> (Tensor block_indices, Tensor block_counts)
    absparse::sparse_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table,
        Tensor seq_lens, Tensor block_sizes, Tensor block_indices, Tensor block_counts,
        float scale, bool return_lse) -> (Tensor out, Tensor lse)
    absparse::dense_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table,
        Tensor seq_lens, float scale, bool return_lse) -> (Tensor out, Tensor lse)

A ``LayerLayout`` is not a tensor: the ops take its fields (block sizes, page size, summary kind,
storage format as ints and strings, the per-channel parameters as tensors) and rebuild the native
layout (cached per distinct field tuple). Every argument is explicit (no defaults): the public
functions of ``absparse`` (``ops.py``) validate the Python arguments, fill the defaults
(``max_blocks``, ``scale``, ``max_new_tokens`` 0 = no hint) and call these ops while
torch.compile traces them; in eager mode they call the binding directly, which runs the same
code without the dispatcher's few microseconds. Tensor validation (``ValueError``) happens in the
binding when an op runs on real tensors; the fake implementations only compute output shapes:

    select_blocks  -> block_indices int32 [B, Hk, max_blocks], block_counts int32 [B, Hk]
    sparse_decode, dense_decode -> out [B, Hq, D] (q's dtype, contiguous),
                                   lse float32 [B, Hq] (return_lse) or [0] (not computed)

with B, Hq, D from ``q [B, Hq, D]`` and Hk = len(block_sizes).

Example
-------
>>> k = torch.randn(1, 16, 1, 64); v = torch.randn_like(k); q = torch.randn(1, 2, 64)
>>> pt = torch.zeros(1, 1, dtype=torch.int32); L = torch.tensor([9], dtype=torch.int32)
>>> out, lse = torch.ops.absparse.dense_decode(q, k, v, pt, L, 0.125, True)
>>> torch.equal(out, dense_decode(q, k, v, pt, L)), lse.shape
(True, torch.Size([1, 2]))
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _C

__all__ = ["native_layout"]


@functools.lru_cache(maxsize=None)
def native_layout(block_sizes: Tuple[int, ...], page_size: int, summary: str,
                  format: str) -> "_C.LayerLayout":
    """The native layout of these fields (one object per distinct tuple, built once)."""
    return _C.LayerLayout(list(block_sizes), page_size, summary, format)


def _stream(t: Tensor) -> dict:
    """The CUDA stream argument of the binding for CUDA tensors ({} otherwise)."""
    if isinstance(t, Tensor) and t.is_cuda:
        return {"stream": torch.cuda.current_stream(t.device).cuda_stream}
    return {}


def _batch_heads(q: Tensor) -> Tuple[int, int]:
    """(B, Hq) of q [B, Hq, D]; (0, 0) for a q of another rank, which the binding rejects."""
    return (q.shape[0], q.shape[1]) if q.dim() == 3 else (0, 0)


# --- update_centroids ----------------------------------------------------------------------------
@torch.library.custom_op("absparse::update_centroids", mutates_args=("summaries", "scales"))
def update_centroids(k_cache: Tensor, page_table: Tensor, seq_lens: Tensor, start_pos: Tensor,
                     block_sizes: List[int], page_size: int, summary: str, format: str,
                     summaries: Tensor, scales: Optional[Tensor], channel_scale: Optional[Tensor],
                     channel_zero: Optional[Tensor], max_new_tokens: int) -> None:
    layout = native_layout(tuple(block_sizes), page_size, summary, format)
    _C.update_centroids(k_cache, page_table, seq_lens, start_pos, layout, summaries, scales,
                        channel_scale, channel_zero, max_new_tokens=max_new_tokens,
                        **_stream(k_cache))


@update_centroids.register_fake
def _(k_cache, page_table, seq_lens, start_pos, block_sizes, page_size, summary, format,
      summaries, scales, channel_scale, channel_zero, max_new_tokens) -> None:
    return None


# --- select_blocks -------------------------------------------------------------------------------
def select_outputs(q: Tensor, num_kv_heads: int, max_blocks: int) -> Tuple[Tensor, Tensor]:
    """Empty (block_indices int32 [B, Hk, max_blocks], block_counts int32 [B, Hk]) on q's device."""
    batch, _ = _batch_heads(q)
    return (q.new_empty((batch, num_kv_heads, max_blocks), dtype=torch.int32),
            q.new_empty((batch, num_kv_heads), dtype=torch.int32))


def run_select_blocks(q, summaries, scales, page_table, seq_lens, layout, channel_scale,
                      channel_zero, budget_tokens, budget_fraction, sink_tokens, local_tokens,
                      group_reduce, scale, block_indices, block_counts) -> None:
    """The binding call of select_blocks into given outputs (with a workspace on CUDA)."""
    cuda = {}
    if q.is_cuda:
        nbytes = (_C.select_blocks_workspace_size(q.shape[0], q.shape[1], layout,
                                                  page_table.shape[1], group_reduce)
                  if q.dim() == 3 and page_table.dim() == 2 else 0)
        workspace = (torch.empty(nbytes, dtype=torch.uint8, device=q.device) if nbytes > 0
                     else None)
        cuda = {"workspace": workspace, **_stream(q)}
    _C.select_blocks(q, summaries, scales, page_table, seq_lens, layout, channel_scale,
                     channel_zero, budget_tokens, budget_fraction, sink_tokens, local_tokens,
                     group_reduce, scale, block_indices, block_counts, **cuda)


@torch.library.custom_op("absparse::select_blocks", mutates_args=())
def select_blocks(q: Tensor, summaries: Tensor, scales: Optional[Tensor], page_table: Tensor,
                  seq_lens: Tensor, block_sizes: List[int], page_size: int, summary: str,
                  format: str, channel_scale: Optional[Tensor], channel_zero: Optional[Tensor],
                  budget_tokens: int, budget_fraction: float, sink_tokens: int, local_tokens: int,
                  group_reduce: str, scale: float, max_blocks: int) -> Tuple[Tensor, Tensor]:
    layout = native_layout(tuple(block_sizes), page_size, summary, format)
    block_indices, block_counts = select_outputs(q, len(block_sizes), max_blocks)
    run_select_blocks(q, summaries, scales, page_table, seq_lens, layout, channel_scale,
                      channel_zero, budget_tokens, budget_fraction, sink_tokens, local_tokens,
                      group_reduce, scale, block_indices, block_counts)
    return block_indices, block_counts


@select_blocks.register_fake
def _(q, summaries, scales, page_table, seq_lens, block_sizes, page_size, summary, format,
      channel_scale, channel_zero, budget_tokens, budget_fraction, sink_tokens, local_tokens,
      group_reduce, scale, max_blocks):
    return select_outputs(q, len(block_sizes), max_blocks)


# --- sparse_decode, dense_decode -----------------------------------------------------------------
def attention_outputs(q: Tensor, return_lse: bool) -> Tuple[Tensor, Tensor]:
    """Empty (out like q, contiguous; lse float32 [B, Hq], or [0] without return_lse)."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    shape = _batch_heads(q) if return_lse else (0,)
    return out, q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("absparse::sparse_decode", mutates_args=())
def sparse_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor,
                  seq_lens: Tensor, block_sizes: Tensor, block_indices: Tensor,
                  block_counts: Tensor, scale: float, return_lse: bool) -> Tuple[Tensor, Tensor]:
    out, lse = attention_outputs(q, return_lse)
    _C.decode_attention(q, k_cache, v_cache, page_table, seq_lens, block_sizes, block_indices,
                        block_counts, scale, out, lse if return_lse else None, **_stream(q))
    return out, lse


@sparse_decode.register_fake
def _(q, k_cache, v_cache, page_table, seq_lens, block_sizes, block_indices, block_counts, scale,
      return_lse):
    return attention_outputs(q, return_lse)


@torch.library.custom_op("absparse::dense_decode", mutates_args=())
def dense_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor,
                 seq_lens: Tensor, scale: float, return_lse: bool) -> Tuple[Tensor, Tensor]:
    out, lse = attention_outputs(q, return_lse)
    _C.decode_attention(q, k_cache, v_cache, page_table, seq_lens, None, None, None, scale, out,
                        lse if return_lse else None, **_stream(q))
    return out, lse


@dense_decode.register_fake
def _(q, k_cache, v_cache, page_table, seq_lens, scale, return_lse):
    return attention_outputs(q, return_lse)

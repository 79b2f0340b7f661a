"""Serving MoA windows through ``sparse_decode``: per-KV-head block lists built on the device.

A head with span ``S = S_h(L)`` attends, at context length ``L`` and block size ``bs``:

* the sink: complete blocks ``j < ceil(sink / bs)``;
* the window: every complete block that holds one of the last ``S`` tokens, i.e. blocks
  ``j >= floor((L - S) / bs)`` (at most ``S + bs - 1`` tokens);
* the partial tail ``[floor(L / bs) * bs, L)``, which ``sparse_decode`` always attends.

The lists are a few integer tensor ops on the device of ``seq_lens`` (no host synchronisation,
no top-k, no summaries), so a decode step with windows is capturable in a CUDA graph. The KV cache
keeps every token (see ``docs/moa.md``: only sink + span would be needed).
"""
from __future__ import annotations

from typing import Optional

import torch

from .plan import MoAPlan

__all__ = ["window_blocks", "max_window_blocks", "band_prefill_blocks", "LayerWindows", "attach"]


def _span(seq_lens: torch.Tensor, const: torch.Tensor, slope: torch.Tensor, den: int):
    """int64 [B, Hk]: clamp(floor((const + slope L) / den), 0, L)."""
    L = seq_lens.to(torch.int64)[:, None]                                  # [B, 1]
    s = torch.div(const[None, :] + slope[None, :] * L, den, rounding_mode="floor")
    return torch.minimum(torch.clamp(s, min=0), L)


def max_window_blocks(capacity: int, const, slope, den: int, block_sizes,
                      sink_tokens: int) -> int:
    """The most list entries any length ``<= capacity`` tokens needs (host integers only):
    ``max_h min(capacity / bs_h, ceil(sink / bs_h) + ceil(S_h(capacity) / bs_h))``: spans never
    shrink with L (slope >= 0), and ``nb - floor((L - S) / bs) <= ceil(S / bs)`` complete blocks
    hold the last S tokens."""
    if not (torch.as_tensor(const).numel() == torch.as_tensor(slope).numel() ==
            torch.as_tensor(block_sizes).numel()):
        raise ValueError(f"max_window_blocks: const, slope, block_sizes: expected one entry per "
                         f"KV head each, got {torch.as_tensor(const).numel()}, "
                         f"{torch.as_tensor(slope).numel()}, {torch.as_tensor(block_sizes).numel()}")
    cap = torch.tensor([int(capacity)])
    s = _span(cap, torch.as_tensor(const).cpu(), torch.as_tensor(slope).cpu(), den)[0]
    bs = torch.as_tensor(block_sizes).cpu().to(torch.int64)
    need = -(-sink_tokens // bs) + -(-s // bs)
    return int(torch.minimum(need, cap // bs).max()) if bs.numel() else 0


def window_blocks(seq_lens: torch.Tensor, const: torch.Tensor, slope: torch.Tensor, den: int,
                  block_sizes: torch.Tensor, sink_tokens: int, max_blocks: int):
    """Block lists of the sink + window of every (sequence, KV head), for ``sparse_decode``.

    Parameters
    ----------
    seq_lens : int32 [B] (any device; the lists are built there)
    const, slope : int64 [Hk] on that device; ``den`` int > 0: ``S = floor((const + slope L)/den)``
        clamped to ``[0, L]``
    block_sizes : int64 [Hk] on that device, powers of two dividing the page size
    sink_tokens : int >= 0
    max_blocks : list capacity, e.g. :func:`max_window_blocks` of the page table's capacity

    Returns
    -------
    block_indices : int32 [B, Hk, max_blocks], ascending, padded with -1
    block_counts : int32 [B, Hk]

    Example
    -------
    >>> L = torch.tensor([1000], dtype=torch.int32)
    >>> one = torch.ones(1, dtype=torch.int64)
    >>> idx, cnt = window_blocks(L, 200 * one, 0 * one, 1, 64 * one, 64, 8)
    >>> idx.tolist(), cnt.tolist()    # sink block 0, blocks 12-14 hold tokens 800..959, tail 960+
    ([[[0, 12, 13, 14, -1, -1, -1, -1]]], [[4]])
    """
    L = seq_lens.to(torch.int64)[:, None]                                  # [B, 1]
    bs = block_sizes[None, :]                                              # [1, Hk]
    span = _span(seq_lens, const, slope, den)                              # [B, Hk]
    nb = torch.div(L, bs, rounding_mode="floor")                           # complete blocks
    nsink = torch.minimum(torch.div(sink_tokens + bs - 1, bs, rounding_mode="floor"), nb)
    start = torch.maximum(torch.div(L - span, bs, rounding_mode="floor"), nsink)
    count = nsink + (nb - start)                                           # [B, Hk]
    j = torch.arange(max_blocks, device=seq_lens.device, dtype=torch.int64)  # [M]
    idx = torch.where(j < nsink[..., None], j, start[..., None] + j - nsink[..., None])
    idx = torch.where(j < count[..., None], idx, -1)
    return idx.to(torch.int32), count.to(torch.int32)


def band_prefill_blocks(seq_lens: torch.Tensor, const: torch.Tensor, slope: torch.Tensor,
                        den: int, sink_tokens: int, q_block: int, k_block: int):
    """Block lists of MoA's band mask for ``absparse.sparse_prefill`` (one list per KV head).

    The query at position t of a prompt of L tokens attends, in KV head h with span
    ``S = max(S_h(L), 1)``, the sink keys ``k < sink_tokens`` and the window ``t - S < k <= t``.
    Query block i (positions ``[i q_block, min((i + 1) q_block, L))``) lists every key block that
    holds such a key for one of its queries: the sink blocks, then the blocks of keys
    ``(i q_block - S, min((i + 1) q_block, L) - 1]``, ascending. ``sparse_prefill`` applies the
    causal rule inside the listed blocks, so a query also sees the rest of its blocks: the band
    rounded out to whole key blocks (at most ``k_block - 1`` keys beyond the span), as in MoA's
    block-sparse kernel.

    Parameters
    ----------
    seq_lens : int [B] prompt lengths (any device; the lists are built there)
    const, slope : int64 [Hk] on that device, ``den`` int > 0: ``S_h(L) = floor((const + slope
        L) / den)`` clamped to ``[0, L]`` (a :class:`~absparse.moa.MoAPlan` layer's rule)
    sink_tokens : int >= 0; q_block, k_block : block sizes of the prefill, > 0

    Returns
    -------
    block_indices : int32 [B, Hk, Nq, M] with ``Nq = ceil(max L / q_block)``, padded with -1
    block_counts : int32 [B, Hk, Nq] (0 for query blocks past a sequence's end)

    Example
    -------
    >>> L = torch.tensor([512], dtype=torch.int32)
    >>> one = torch.ones(1, dtype=torch.int64)
    >>> idx, cnt = band_prefill_blocks(L, 100 * one, 0 * one, 1, 64, 128, 64)
    >>> cnt.tolist()
    [[[2, 4, 5, 5]]]
    >>> idx[0, 0, 2].tolist()  # query block 2 (256..383): sink block 0, keys 157..383 = blocks 2-5
    [0, 2, 3, 4, 5]
    """
    for name, x in (("den", den), ("q_block", q_block), ("k_block", k_block)):
        if int(x) <= 0:
            raise ValueError(f"band_prefill_blocks: {name}: expected > 0, got {x}")
    if sink_tokens < 0:
        raise ValueError(f"band_prefill_blocks: sink_tokens: expected >= 0, got {sink_tokens}")
    dev = seq_lens.device
    L = seq_lens.to(torch.int64)                                           # [B]
    span = torch.clamp(_span(seq_lens, const, slope, den), min=1)          # [B, Hk]
    nq = -(-int(L.max()) // q_block) if L.numel() else 0
    i = torch.arange(nq, device=dev, dtype=torch.int64)                    # [Nq]
    t_first = i * q_block                                                  # [Nq]
    t_last = torch.minimum((i[None] + 1) * q_block, L[:, None]) - 1        # [B, Nq]
    valid = t_first[None] < L[:, None]                                     # [B, Nq]
    last_block = torch.div(t_last, k_block, rounding_mode="floor")[:, None]  # [B, 1, Nq]
    nsink = torch.minimum(torch.full_like(last_block, -(-sink_tokens // k_block)), last_block + 1)
    lo_key = torch.clamp(t_first[None, None] - span[..., None] + 1, min=0)  # [B, Hk, Nq]
    start = torch.maximum(torch.div(lo_key, k_block, rounding_mode="floor"), nsink)
    count = nsink + torch.clamp(last_block - start + 1, min=0)             # [B, Hk, Nq]
    count = torch.where(valid[:, None], count, 0)
    width = int(count.max()) if count.numel() else 0
    j = torch.arange(width, device=dev, dtype=torch.int64)                 # [M]
    idx = torch.where(j < nsink[..., None], j, start[..., None] + j - nsink[..., None])
    idx = torch.where(j < count[..., None], idx, -1)
    return idx.to(torch.int32), count.to(torch.int32)


class LayerWindows:
    """One layer's span rules, on a device, ready for :func:`window_blocks` every decode step."""

    def __init__(self, const, slope, den: int, block_sizes, sink_tokens: int, device):
        self.const = torch.as_tensor(const, dtype=torch.int64).to(device)
        self.slope = torch.as_tensor(slope, dtype=torch.int64).to(device)
        self.den = int(den)
        self.block_sizes_cpu = torch.as_tensor(block_sizes, dtype=torch.int32).cpu()
        self.block_sizes = self.block_sizes_cpu.to(torch.int64).to(device)
        self.sink_tokens = int(sink_tokens)
        self._max_blocks = {}

    def max_blocks(self, capacity: int) -> int:
        if capacity not in self._max_blocks:
            self._max_blocks[capacity] = max_window_blocks(
                capacity, self.const, self.slope, self.den, self.block_sizes_cpu, self.sink_tokens)
        return self._max_blocks[capacity]

    def blocks(self, seq_lens: torch.Tensor, capacity: int):
        """(block_indices, block_counts) for a page table of ``capacity`` tokens per sequence."""
        return window_blocks(seq_lens, self.const, self.slope, self.den, self.block_sizes,
                             self.sink_tokens, self.max_blocks(capacity))


def attach(cache, plan: Optional[MoAPlan]) -> None:
    """Make every layer of an ``absparse.hf.AbsparseCache`` decode with ``plan``'s windows
    (``None`` removes them). The cache's own layout should be dense (``None``): windows need no
    summaries."""
    for i, layer in enumerate(cache.layers):
        if plan is None:
            layer.window = None
            continue
        if plan.num_layers != len(cache.layers):
            raise ValueError(f"attach: plan: expected {len(cache.layers)} layers (the cache's), "
                             f"got {plan.num_layers}")
        if layer.page_size % plan.block:
            raise ValueError(f"attach: plan: block {plan.block} must divide the page size "
                             f"{layer.page_size}")
        device = layer.device if layer.is_initialized else "cpu"
        layer.window = LayerWindows(plan.const[i], plan.slope[i], plan.den,
                                    [plan.block] * plan.num_kv_heads, plan.sink_tokens, device)

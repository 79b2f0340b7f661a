"""Hugging Face transformers integration: absparse as an attention implementation, a paged cache.

    import absparse.hf as abhf
    abhf.register()                                   # attn_implementation "absparse"
    model.set_attn_implementation("absparse")
    cache = abhf.AbsparseCache(model.config, layout, token_budget=512)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=16, do_sample=False)

How a forward pass goes through it:

- The model's attention layer calls ``cache.update(k, v, layer_idx)``. :class:`PagedLayer` writes
  the new tokens into its page pool (NHD ``[num_pages, P, Hk, D]``, pages handed out on demand, so
  the sequences of a batch interleave) and runs ``absparse.update_centroids`` with ``start_pos`` =
  the old length, which writes the summaries of the blocks the append completed.
- It returns the keys/values to attend with a reference to itself attached (``_absparse_layer``).
  A prefill into an empty cache returns the new K/V unchanged; it is attended by transformers' own
  SDPA code (prefill mode ``dense``, the same math as stock transformers) or by
  ``absparse.sparse_prefill`` over block lists (the other modes of :class:`PrefillConfig`). A
  later multi-token step gathers the dense K/V from the pages. A single-token decode step returns
  only the new token: :func:`absparse_attention` then runs ``select_blocks`` -> ``sparse_decode``
  on the pages (``dense_decode`` for the dense layers of the :class:`~absparse.ModelLayout`, or
  everywhere when the budget is ``None``).
- Nothing here is device specific: the pools live on the device of the model's keys and the ops
  run wherever their tensors are.

Prefill modes (``AbsparseCache(..., prefill=PrefillConfig(mode, ...))``; decode is the same in
every mode). The batch ``[B, Hq, S, D]`` is packed to the varlen format ``q [B*S, Hq, D]``,
``k, v [B*S, Hk, D]`` with ``cu_seqlens = [0, S, 2S, ...]`` (batches are unpadded):

- ``dense`` (default): transformers' SDPA, as above;
- ``causal``: ``sparse_prefill`` over every causal block (``dense_causal_block_lists``): dense
  attention through the block-sparse op, a check of the path;
- ``flexprefill``: ``flexprefill_mask`` (gamma 0.9, tau 0.1, block 128, min budget 1024 tokens by
  default) -> ``sparse_prefill``, one list per query head;
- ``pbs``: ``pbs_permute`` (segments of 256) -> ``pbs_mask`` (threshold 0.9, first block forced)
  -> ``sparse_prefill`` over the permuted copy with ``key_positions``; the cache keeps the keys and
  values in their original order (it was written before the attention runs);
- ``window``: MoA's band mask (``absparse.moa.band_prefill_blocks``: the sink and each KV head's
  span ``S_h(S)`` at the prompt length, rounded out to whole blocks) -> ``sparse_prefill``; needs
  the MoA plan attached to the cache (``absparse.moa.attach``), one list per KV head.

Every non-dense prefill records per layer the attained block density (listed / causal blocks, per
sequence and list head): ``PagedLayer.prefill_density``, averaged by
:meth:`AbsparseCache.prefill_densities`. The mask builders run on the tensors' device: for CUDA
tensors the whole prefill (lists, permutation, attention) stays on the GPU with no host round
trip (the density stays there too until ``prefill_densities`` reads it).

The cache needs the "absparse" attention implementation: a decode step hands the attention
function only the new token (the rest is in the pages), so ``update`` raises if the previous decode
step was attended by anything else.

Limits: batches must not be padded (sequences are kept unpadded in pages; use
:meth:`AbsparseCache.stack` to batch sequences of different lengths, passing explicit
``position_ids``); beam search and cache cropping are not supported.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from .layout import LayerLayout, ModelLayout
from .moa.serve import band_prefill_blocks
from .ops import dense_decode, select_blocks, sparse_decode, update_centroids
from .prefill import dense_causal_block_lists, sparse_prefill
from .prefill_masks import flexprefill_mask, pbs_mask, pbs_permute

try:  # transformers is optional for absparse itself, required by this module
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("absparse.hf needs transformers (pip install -r requirements-eval.txt)") \
        from e

__all__ = ["ATTN_IMPLEMENTATION", "DecodeConfig", "PrefillConfig", "PREFILL_MODES", "PagedLayer",
           "AbsparseCache", "register", "absparse_attention", "use_absparse"]

ATTN_IMPLEMENTATION = "absparse"
DEFAULT_PAGE_SIZE = 64


@dataclass(frozen=True)
class DecodeConfig:
    """Selection settings of a decode step (see ``absparse.select_blocks``).

    ``token_budget`` None attends densely (``dense_decode``) in every layer.
    """
    token_budget: Union[int, float, None] = None
    sink_tokens: int = 16
    local_tokens: int = 64
    group_reduce: str = "max"


PREFILL_MODES = ("dense", "causal", "flexprefill", "pbs", "window")


@dataclass(frozen=True)
class PrefillConfig:
    """How a prefill into an empty cache is attended (see the module docstring).

    ``mode``: one of :data:`PREFILL_MODES`. ``block_size``: the query and key block of the lists
    (64 or 128 for the CUDA kernel). FlexPrefill: ``gamma`` coverage in (0, 1], ``tau`` >= 0 the
    pattern threshold, ``min_budget`` / ``max_budget`` tokens (None: unbounded). PBS-Attn:
    ``segment_size`` a multiple of ``block_size``, ``threshold`` the block coverage in (0, 1].
    Bad values raise ``ValueError`` naming the field.
    """
    mode: str = "dense"
    block_size: int = 128
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1024
    max_budget: Optional[int] = None
    segment_size: int = 256
    threshold: float = 0.9

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"PrefillConfig: {name}: expected {expected}, got "
                             f"{getattr(self, name)!r}")

        def is_int(x):
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        def is_real(x):
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

        if self.mode not in PREFILL_MODES:
            bad("mode", f"one of {', '.join(PREFILL_MODES)}")
        if not is_int(self.block_size) or self.block_size < 1:
            bad("block_size", "an int >= 1")
        if not is_real(self.gamma) or not 0 < self.gamma <= 1:
            bad("gamma", "a float in (0, 1]")
        if not is_real(self.tau) or self.tau < 0:
            bad("tau", "a finite float >= 0")
        if not is_int(self.min_budget) or self.min_budget < 0:
            bad("min_budget", "an int >= 0")
        if self.max_budget is not None and (not is_int(self.max_budget) or
                                            self.max_budget < max(self.min_budget, 1)):
            bad("max_budget", f"None or an int >= max(min_budget, 1) = {max(self.min_budget, 1)}")
        if not is_int(self.segment_size) or self.segment_size < 1 or \
                self.segment_size % self.block_size:
            bad("segment_size", f"a positive multiple of block_size {self.block_size}")
        if not is_real(self.threshold) or not 0 < self.threshold <= 1:
            bad("threshold", "a float in (0, 1]")


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register :func:`absparse_attention` and its mask (transformers' SDPA mask) under ``name``.

    Without the mask entry transformers would hand the function ``attention_mask=None`` during
    prefill (the causal mask silently dropped). Idempotent; returns ``name``.
    """
    AttentionInterface.register(name, absparse_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def use_absparse(model) -> None:
    """Register the implementation and switch ``model`` to it."""
    model.set_attn_implementation(register())


def _marked(t: torch.Tensor, layer: "PagedLayer") -> torch.Tensor:
    """A view of ``t`` that carries its cache layer to :func:`absparse_attention`."""
    v = t.view(t.shape)
    v._absparse_layer = layer
    return v


def absparse_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                       dropout: float = 0.0, **kwargs):
    """transformers attention function: the cache's prefill mode for a prefill into an empty
    cache (dense SDPA by default), dense SDPA for other multi-token steps, absparse for
    single-token decode.

    query ``[B, Hq, S, D]``, key/value ``[B, Hk, S_kv, D]`` -> (``[B, S, Hq, D]``, None). Keys that
    do not come from an :class:`AbsparseCache` (no ``_absparse_layer``) are attended densely with
    SDPA, so the implementation also works with transformers' own caches.
    """
    layer = getattr(key, "_absparse_layer", None)
    if layer is not None and query.shape[2] > 1:
        _check_unpadded(attention_mask)
        if layer._sparse_prefill_pending:
            return layer.attend_prefill(query, key, value, scaling), None
    if layer is None or query.shape[2] > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return layer.attend(query[:, :, 0, :], scaling)[:, None], None


def _check_unpadded(attention_mask: Optional[torch.Tensor]) -> None:
    """Reject a prefill mask whose last query row hides some keys (a padded batch)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return
    last = attention_mask[:, :, -1, :]
    padded = (~last).any() if last.dtype == torch.bool else (last != 0).any()
    if bool(padded):
        raise NotImplementedError("absparse_attention: padded batches are not supported by "
                                  "AbsparseCache; run sequences unpadded, or prefill them one by "
                                  "one and batch them with AbsparseCache.stack")


class PagedLayer(CacheLayerMixin):
    """One layer's paged K/V pool, page table, lengths and block summaries.

    State (all on the device of the keys):
      k_pool, v_pool : [num_pages, P, Hk, D] (the model's dtype)
      page_table     : int32 [B, max_pages], -1 past a sequence's last page
      seq_lens       : int32 [B]
      summaries, scales : ``layout.new_summary_cache(num_pages, D)`` (sparse layers only)
    ``compare_format`` keeps a second summary cache in that format (same block sizes and summary
    kind) and counts, at every decode step, how many selected blocks differ from it.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, layout: Optional[LayerLayout], decode: DecodeConfig,
                 page_size: int = DEFAULT_PAGE_SIZE, layer_idx: int = 0,
                 compare_format: Optional[str] = None, prefill: Optional[PrefillConfig] = None):
        super().__init__()
        self.prefill = prefill or PrefillConfig()
        # Attained density of the last non-dense prefill: float32 [B, H] (H = Hq for
        # flexprefill, Hk for causal / pbs), listed / causal blocks; None until one ran.
        self.prefill_density: Optional[torch.Tensor] = None
        self._sparse_prefill_pending = False  # update() returned a prefill for attend_prefill
        if layout is not None and layout.page_size != page_size:
            page_size = layout.page_size
        self.layout = layout
        self.decode = decode
        self.page_size = int(page_size)
        self.layer_idx = layer_idx
        self.compare_layout = None
        if compare_format is not None and layout is not None and compare_format != layout.format:
            self.compare_layout = LayerLayout(layout.block_sizes, layout.page_size, layout.summary,
                                              compare_format)
        self.k_pool = self.v_pool = None
        self.page_table: Optional[torch.Tensor] = None
        self.seq_lens: Optional[torch.Tensor] = None
        self._lens: List[int] = []          # host copy of seq_lens
        self._num_used = 0                  # pages handed out so far
        self.summaries = self.scales = None
        self.cmp_summaries = self.cmp_scales = None
        self.stats = {"steps": 0, "selected": 0, "differ": 0}
        self.observer: Optional[Callable] = None
        self._awaiting_attend = False       # a decode step returned only its new token
        self.window = None                  # absparse.moa.LayerWindows: MoA / window decode

    # --- CacheLayerMixin ---------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, hk, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.k_pool = torch.zeros((0, self.page_size, hk, d), dtype=self.dtype, device=self.device)
        self.v_pool = torch.zeros_like(self.k_pool)
        self.page_table = torch.full((batch, 0), -1, dtype=torch.int32, device=self.device)
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self._lens = [0] * batch
        self._new_summary_caches(0)
        self.keys, self.values = self.k_pool, self.v_pool
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hk, S, D]`` keys/values; return what the attention function needs."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, steps, _ = key_states.shape
        if batch != len(self._lens):
            raise ValueError(f"PagedLayer.update: key_states: expected batch {len(self._lens)}, "
                             f"got {batch}")
        if self._awaiting_attend:
            # Another attention implementation would have attended the new token alone.
            raise RuntimeError("PagedLayer.update: the previous decode step was not attended by "
                               "absparse_attention; AbsparseCache needs the 'absparse' attention "
                               "implementation (absparse.hf.use_absparse(model))")
        old = list(self._lens)
        start = self.seq_lens.clone()
        self._sparse_prefill_pending = False
        self._append(key_states, value_states)
        if self.layout is not None:
            update_centroids(self.k_pool, self.page_table, self.seq_lens, start, self.layout,
                             self.summaries, self.scales)
        if self.compare_layout is not None:
            update_centroids(self.k_pool, self.page_table, self.seq_lens, start,
                             self.compare_layout, self.cmp_summaries, self.cmp_scales)
        if steps == 1 and max(old) > 0:
            self._awaiting_attend = True
            return _marked(key_states, self), value_states
        if max(old) == 0:
            # Prefill into an empty cache: attended by SDPA (exactly what stock transformers
            # would do) or, in a sparse prefill mode, by attend_prefill.
            self._sparse_prefill_pending = self.prefill.mode != "dense" and steps > 1
            return _marked(key_states, self), value_states
        keys, values = self.dense_kv()
        return _marked(keys, self), values

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return max(self._lens) if self._lens else 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        window = self.window
        self.__init__(self.layout, self.decode, self.page_size, self.layer_idx,
                      None if self.compare_layout is None else self.compare_layout.format,
                      self.prefill)
        self.window = window

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("AbsparseCache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("AbsparseCache does not support num_return_sequences > 1")

    # --- paging --------------------------------------------------------------------------------
    def _new_summary_caches(self, num_pages: int) -> None:
        d = self.k_pool.shape[-1]
        if self.layout is not None:
            self.summaries, self.scales = self.layout.new_summary_cache(num_pages, d, self.device)
        if self.compare_layout is not None:
            self.cmp_summaries, self.cmp_scales = self.compare_layout.new_summary_cache(
                num_pages, d, self.device)

    def _grow_pool(self, need: int, exact: bool = False) -> None:
        """Make room for ``need`` pages in the pools and summary caches (capacity doubles unless
        ``exact``)."""
        cap = self.k_pool.shape[0]
        if need <= cap:
            return
        new_cap = need if exact else max(need, 2 * cap, 4)
        extra = new_cap - cap

        def grow(t, fill=0):
            if t is None:
                return None
            pad = torch.full((extra,) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            return torch.cat([t, pad])

        self.k_pool, self.v_pool = grow(self.k_pool), grow(self.v_pool)
        self.summaries, self.scales = grow(self.summaries), grow(self.scales)
        self.cmp_summaries, self.cmp_scales = grow(self.cmp_summaries), grow(self.cmp_scales)
        self.keys, self.values = self.k_pool, self.v_pool

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write [B, Hk, S, D] at positions [L_b, L_b + S) of every sequence, paging on demand."""
        batch, hk, steps, d = key_states.shape
        P = self.page_size
        new_lens = [n + steps for n in self._lens]
        pages_needed = [-(-n // P) for n in new_lens]
        width = max(pages_needed)
        if width > self.page_table.shape[1]:
            pad = torch.full((batch, max(width, 2 * self.page_table.shape[1]) -
                              self.page_table.shape[1]), -1, dtype=torch.int32, device=self.device)
            self.page_table = torch.cat([self.page_table, pad], dim=1)
        # Hand out new pages in step order across the batch (the pools interleave sequences).
        table_host = self.page_table.cpu()
        fresh = []
        for b in range(batch):
            for j in range(-(-self._lens[b] // P), pages_needed[b]):
                fresh.append((b, j, self._num_used))
                self._num_used += 1
        if fresh:
            self._grow_pool(self._num_used)
            for b, j, page in fresh:
                table_host[b, j] = page
            self.page_table = table_host.to(self.device)
        # Flat slot of every new token: page * P + offset.
        pos = torch.tensor(self._lens, dtype=torch.int64)[:, None] + torch.arange(steps)[None]
        rows = torch.arange(batch)[:, None].expand(batch, steps)
        slots = (table_host[rows, pos // P].to(torch.int64) * P + pos % P).reshape(-1)
        slots = slots.to(self.device)
        # [B, Hk, S, D] -> [B*S, Hk, D] in (b, s) order, matching ``slots``.
        k = key_states.transpose(1, 2).reshape(batch * steps, hk, d).to(self.dtype)
        v = value_states.transpose(1, 2).reshape(batch * steps, hk, d).to(self.dtype)
        self.k_pool.view(-1, hk, d).index_copy_(0, slots, k)
        self.v_pool.view(-1, hk, d).index_copy_(0, slots, v)
        self._lens = new_lens
        self.seq_lens = torch.tensor(new_lens, dtype=torch.int32, device=self.device)

    def dense_kv(self):
        """Gathered keys/values ``[B, Hk, L, D]`` (all sequences must have the same length)."""
        if len(set(self._lens)) != 1:
            raise NotImplementedError("PagedLayer.dense_kv: a multi-token step over sequences of "
                                      f"different lengths {self._lens} is not supported")
        n = self._lens[0]
        P = self.page_size
        pages = self.page_table[:, :-(-n // P)].to(torch.int64)            # [B, n_pages]
        hk, d = self.k_pool.shape[2:]
        k = self.k_pool[pages].reshape(len(self._lens), -1, hk, d)[:, :n]   # [B, L, Hk, D]
        v = self.v_pool[pages].reshape(len(self._lens), -1, hk, d)[:, :n]
        return k.transpose(1, 2), v.transpose(1, 2)

    # --- prefill -------------------------------------------------------------------------------
    def attend_prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       scaling: Optional[float]) -> torch.Tensor:
        """A prefill of every sequence through ``sparse_prefill`` in this layer's prefill mode.

        query ``[B, Hq, S, D]``, key/value ``[B, Hk, S, D]`` (the new tokens, original order)
        -> ``[B, S, Hq, D]``; records :attr:`prefill_density`.
        """
        self._sparse_prefill_pending = False
        if self.prefill.mode == "window" and self.window is None:
            raise ValueError("PagedLayer.attend_prefill: prefill mode 'window' needs MoA windows: "
                             "attach a plan with absparse.moa.attach(cache, plan)")
        out, self.prefill_density = _block_sparse_prefill(query, key, value, scaling,
                                                          self.prefill, self.window)
        return out

    # --- decode --------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, scaling: Optional[float]) -> torch.Tensor:
        """One decode step of every sequence: q ``[B, Hq, D]`` -> ``[B, Hq, D]``."""
        self._awaiting_attend = False
        if self.window is not None:
            # Static per-head windows (absparse.moa): block lists from the lengths, no selection.
            idx, cnt = self.window.blocks(self.seq_lens, self.page_table.shape[1] * self.page_size)
            return sparse_decode(q, self.k_pool, self.v_pool, self.page_table, self.seq_lens,
                                 self.window.block_sizes_cpu, idx, cnt, scale=scaling)
        budget = self.decode.token_budget
        if self.layout is None or budget is None:
            return dense_decode(q, self.k_pool, self.v_pool, self.page_table, self.seq_lens,
                                scale=scaling)
        cfg = self.decode
        idx, cnt = select_blocks(q, self.summaries, self.scales, self.page_table, self.seq_lens,
                                 self.layout, budget, sink_tokens=cfg.sink_tokens,
                                 local_tokens=cfg.local_tokens, group_reduce=cfg.group_reduce,
                                 scale=scaling)
        if self.compare_layout is not None:
            ref_idx, ref_cnt = select_blocks(q, self.cmp_summaries, self.cmp_scales,
                                             self.page_table, self.seq_lens, self.compare_layout,
                                             budget, sink_tokens=cfg.sink_tokens,
                                             local_tokens=cfg.local_tokens,
                                             group_reduce=cfg.group_reduce, scale=scaling)
            self._count_differences(idx, cnt, ref_idx, ref_cnt)
        if self.observer is not None:
            self.observer(self, idx, cnt)
        return sparse_decode(q, self.k_pool, self.v_pool, self.page_table, self.seq_lens,
                             self.layout, idx, cnt, scale=scaling)

    def _count_differences(self, idx, cnt, ref_idx, ref_cnt) -> None:
        """Blocks selected from ``compare_format`` summaries but not from the layer's own."""
        a, r = idx.cpu().long(), ref_idx.cpu().long()                     # [B, Hk, K], -1 padded
        width = max(int(t.max()) if t.numel() else -1 for t in (a, r)) + 2
        # mark[b, h, j + 1] = block j is in the layer's own list (slot 0 absorbs the padding).
        mark = torch.zeros(a.shape[:2] + (width,), dtype=torch.bool)
        mark.scatter_(2, a + 1, True)
        hit = mark.gather(2, r + 1) & (r >= 0)
        total = int(ref_cnt.sum())
        self.stats["steps"] += 1
        self.stats["selected"] += total
        self.stats["differ"] += total - int(hit.sum())

    # --- copies ----------------------------------------------------------------------------------
    def relayout(self, layout: Optional[LayerLayout], decode: DecodeConfig,
                 compare_format: Optional[str] = None, reserve_tokens: int = 64) -> "PagedLayer":
        """A copy of this layer's K/V under another layout, summaries recomputed from the keys,
        with free pages for ``reserve_tokens`` more tokens per sequence."""
        out = PagedLayer(layout, decode, self.page_size, self.layer_idx, compare_format)
        if layout is not None and layout.page_size != self.page_size:
            raise ValueError(f"PagedLayer.relayout: layout: expected page_size {self.page_size} "
                             f"(the cache's), got {layout.page_size}")
        if not self.is_initialized:
            return out
        out.dtype, out.device = self.dtype, self.device
        used = self._num_used
        out.k_pool = self.k_pool[:used].clone()
        out.v_pool = self.v_pool[:used].clone()
        out.page_table = self.page_table.clone()
        out.seq_lens = self.seq_lens.clone()
        out._lens = list(self._lens)
        out._num_used = used
        out._new_summary_caches(used)
        out._reserve(reserve_tokens)
        out.keys, out.values = out.k_pool, out.v_pool
        out.is_initialized = True
        out._summarize_all()
        return out

    def _reserve(self, tokens: int) -> None:
        """Grow the pools now so that ``tokens`` appends per sequence need no reallocation."""
        if tokens > 0:
            self._grow_pool(self._num_used + len(self._lens) * (-(-tokens // self.page_size) + 1),
                            exact=True)

    def _summarize_all(self) -> None:
        zero = torch.zeros_like(self.seq_lens)
        if self.layout is not None:
            update_centroids(self.k_pool, self.page_table, self.seq_lens, zero, self.layout,
                             self.summaries, self.scales)
        if self.compare_layout is not None:
            update_centroids(self.k_pool, self.page_table, self.seq_lens, zero,
                             self.compare_layout, self.cmp_summaries, self.cmp_scales)

    @staticmethod
    def stack(parts: Sequence["PagedLayer"], layout: Optional[LayerLayout], decode: DecodeConfig,
              compare_format: Optional[str] = None, reserve_tokens: int = 64) -> "PagedLayer":
        """One batched layer from several layers' sequences (lengths may differ), with free
        pages for ``reserve_tokens`` more tokens per sequence."""
        first = parts[0]
        out = PagedLayer(layout, decode, first.page_size, first.layer_idx, compare_format)
        if layout is not None and layout.page_size != first.page_size:
            raise ValueError(f"PagedLayer.stack: layout: expected page_size {first.page_size}, got "
                             f"{layout.page_size}")
        out.dtype, out.device = first.dtype, first.device
        pools_k, pools_v, tables, lens = [], [], [], []
        offset = 0
        for p in parts:
            if p.page_size != first.page_size:
                raise ValueError("PagedLayer.stack: every part needs the same page size")
            pools_k.append(p.k_pool[:p._num_used])
            pools_v.append(p.v_pool[:p._num_used])
            t = p.page_table.clone()
            tables.append(torch.where(t >= 0, t + offset, t))
            lens += p._lens
            offset += p._num_used
        width = max(t.shape[1] for t in tables)
        tables = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in tables]
        out.k_pool, out.v_pool = torch.cat(pools_k), torch.cat(pools_v)
        out.page_table = torch.cat(tables).contiguous()
        out._lens = lens
        out.seq_lens = torch.tensor(lens, dtype=torch.int32, device=out.device)
        out._num_used = offset
        out._new_summary_caches(offset)
        out._reserve(reserve_tokens)
        out.keys, out.values = out.k_pool, out.v_pool
        out.is_initialized = True
        out._summarize_all()
        return out


def _packed(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D]`` -> the varlen layout ``[B * S, H, D]`` (sequence b at rows b*S ..)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, h, d)


def _block_sparse_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          scaling: Optional[float], cfg: PrefillConfig, window=None):
    """Causal prefill attention over the block lists of ``cfg.mode`` (not ``dense``); ``window``:
    the layer's MoA windows (``absparse.moa.LayerWindows``, mode ``window``).

    query ``[B, Hq, S, D]``, key/value ``[B, Hk, S, D]`` -> (out ``[B, S, Hq, D]`` in query's
    dtype, density float32 ``[B, H]`` on query's device). The CPU reference computes in float32
    inputs (float64 inside): other dtypes are converted there and the output converted back.
    """
    batch, _, steps, _ = query.shape
    dtype, device = query.dtype, query.device
    work = dtype if query.is_cuda else torch.float32
    q, k, v = (_packed(x).to(work).contiguous() for x in (query, key, value))
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * steps   # [B + 1]
    bs = cfg.block_size
    positions = None
    if cfg.mode == "causal":
        idx, cnt = dense_causal_block_lists(cu, bs, bs, k.shape[1])
        density = torch.ones(cnt.shape[:2], device=device)
    elif cfg.mode == "window":
        lens = torch.full((batch,), steps, dtype=torch.int64, device=device)
        idx, cnt = band_prefill_blocks(lens, window.const.to(device), window.slope.to(device),
                                       window.den, window.sink_tokens, bs, bs)
        nq = cnt.shape[2]
        density = (cnt.sum(dim=2).double() / (nq * (nq + 1) // 2)).float()  # of causal blocks
    else:
        # The mask builders run where the tensors are (CUDA: on the current stream, no host
        # round trip; every sequence has `steps` tokens, so max_len is known).
        if cfg.mode == "flexprefill":
            idx, cnt, info = flexprefill_mask(q, k, cu, bs, cfg.gamma, cfg.tau, cfg.min_budget,
                                              cfg.max_budget, scaling, max_len=steps)
        else:  # pbs: attention over a permuted copy; the cache keeps the original order
            k, v, positions = pbs_permute(q, k, v, cu, bs, cfg.segment_size, scaling,
                                          max_len=steps)
            idx, cnt, info = pbs_mask(q, k, cu, positions, bs, cfg.segment_size, cfg.threshold,
                                      True, scaling, max_len=steps)
        density = info["density"]
    out = sparse_prefill(q, k, v, cu, idx, cnt, bs, bs, key_positions=positions, scale=scaling)
    return out.reshape(batch, steps, *out.shape[1:]).to(dtype), density


def _num_layers(config_or_layers) -> int:
    if isinstance(config_or_layers, int):
        return config_or_layers
    cfg = getattr(config_or_layers, "config", config_or_layers)
    return int(cfg.num_hidden_layers)


def _layer_layouts(layout: Optional[ModelLayout], n: int) -> List[Optional[LayerLayout]]:
    if layout is None:
        return [None] * n
    if len(layout) != n:
        raise ValueError(f"AbsparseCache: layout: expected {n} layers (the model's), got "
                         f"{len(layout)}")
    return list(layout.layers)


class AbsparseCache(Cache):
    """A transformers ``Cache`` of :class:`PagedLayer` s.

    Parameters
    ----------
    config : the model (or its config, or a layer count)
    layout : ModelLayout (``None`` layers are dense) or None (every layer dense)
    token_budget : int tokens, float fraction in (0, 1), or None (dense decode everywhere)
    sink_tokens, local_tokens, group_reduce : as in ``absparse.select_blocks``
    page_size : tokens per page of the dense layers (sparse layers use their layout's)
    compare_format : also keep summaries in this format and count selection differences
        (``selection_disagreement()``), e.g. "fp32" while the layout stores "int4c"
    prefill : PrefillConfig of a prefill into the empty cache (None: dense, SDPA); copies made
        by ``clone`` and ``stack`` attend densely (they are made after the prefill)
    """

    def __init__(self, config, layout: Optional[ModelLayout] = None,
                 token_budget: Union[int, float, None] = None, sink_tokens: int = 16,
                 local_tokens: int = 64, group_reduce: str = "max",
                 page_size: Optional[int] = None, compare_format: Optional[str] = None,
                 prefill: Optional[PrefillConfig] = None,
                 _layers: Optional[List[PagedLayer]] = None):
        self.model_layout = layout
        self.decode = DecodeConfig(token_budget, sink_tokens, local_tokens, group_reduce)
        self.compare_format = compare_format
        if _layers is None:
            n = _num_layers(config)
            layouts = _layer_layouts(layout, n)
            if page_size is None:
                page_size = next((l.page_size for l in layouts if l is not None), DEFAULT_PAGE_SIZE)
            _layers = [PagedLayer(l, self.decode, page_size, i, compare_format, prefill)
                       for i, l in enumerate(layouts)]
        self.page_size = _layers[0].page_size if _layers else page_size
        super().__init__(layers=_layers)

    @property
    def seq_lens(self) -> List[int]:
        return list(self.layers[0]._lens)

    def clone(self, layout: Optional[ModelLayout] = None,
              token_budget: Union[int, float, None] = None, sink_tokens: Optional[int] = None,
              local_tokens: Optional[int] = None, group_reduce: Optional[str] = None,
              compare_format: Optional[str] = None) -> "AbsparseCache":
        """A copy of the K/V for another layout/budget (summaries recomputed; self unchanged)."""
        decode = DecodeConfig(token_budget,
                              self.decode.sink_tokens if sink_tokens is None else sink_tokens,
                              self.decode.local_tokens if local_tokens is None else local_tokens,
                              group_reduce or self.decode.group_reduce)
        layouts = _layer_layouts(layout, len(self.layers))
        layers = [l.relayout(lay, decode, compare_format) for l, lay in zip(self.layers, layouts)]
        return AbsparseCache(len(layers), layout, decode.token_budget, decode.sink_tokens,
                             decode.local_tokens, decode.group_reduce, self.page_size,
                             compare_format, _layers=layers)

    @classmethod
    def stack(cls, caches: Sequence["AbsparseCache"], layout: Optional[ModelLayout] = None,
              token_budget: Union[int, float, None] = None, sink_tokens: int = 16,
              local_tokens: int = 64, group_reduce: str = "max",
              compare_format: Optional[str] = None) -> "AbsparseCache":
        """One batch of every sequence of ``caches`` (lengths may differ: pass explicit
        ``position_ids`` ``[B, 1]`` to the model for decode steps)."""
        if not caches:
            raise ValueError("AbsparseCache.stack: caches: expected at least one cache")
        n = len(caches[0].layers)
        layouts = _layer_layouts(layout, n)
        decode = DecodeConfig(token_budget, sink_tokens, local_tokens, group_reduce)
        layers = [PagedLayer.stack([c.layers[i] for c in caches], layouts[i], decode,
                                   compare_format) for i in range(n)]
        return cls(n, layout, token_budget, sink_tokens, local_tokens, group_reduce,
                   caches[0].page_size, compare_format, _layers=layers)

    def prefill_densities(self) -> List[Optional[float]]:
        """Per layer, the attained block density of the last sparse prefill (listed / causal
        blocks, mean over sequences and list heads); None for layers prefilled densely."""
        return [None if l.prefill_density is None else float(l.prefill_density.mean())
                for l in self.layers]

    def selection_disagreement(self) -> Optional[float]:
        """Share of the blocks selected from ``compare_format`` summaries that this cache's own
        summaries did not select, over every decode step so far (None without compare_format)."""
        sel = sum(l.stats["selected"] for l in self.layers)
        if self.compare_format is None or sel == 0:
            return None
        return sum(l.stats["differ"] for l in self.layers) / sel

    def summary_bytes(self) -> int:
        """Bytes of the summary caches (own format) of the pages in use."""
        total = 0
        for l in self.layers:
            for t in (l.summaries, l.scales):
                if t is not None:
                    total += t[:l._num_used].numel() * t.element_size()
        return total

"""Readable float64 PyTorch reference of the absparse decode pipeline (docs/decode.md).

Independent of absparse: nothing here imports the library. Every op is written the slow, obvious
way, one sequence and one KV head at a time, so that it can be read against the spec line by line.

Shapes: B sequences, Hq query heads, Hk KV heads, G = Hq // Hk, head dim D, page size P,
R summary vectors per block (1 for mean, 2 for minmax/cuboid), W stored width (D or D/2).
Float32 arithmetic is used exactly where the spec fixes it (quantization); everything else is
float64 and rounded once at the end.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "int8c", "int4c")
SUMMARIES = ("mean", "minmax", "cuboid")
FLOAT_FORMAT_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QMAX = {"int8": 127, "int4": 7, "int8c": 255, "int4c": 15}


@dataclass
class RefLayout:
    """What the reference needs to know about one layer (mirrors absparse.LayerLayout)."""

    block_sizes: List[int]                       # [Hk] powers of two dividing page_size
    page_size: int                               # P
    summary: str = "minmax"                      # "mean" | "minmax" | "cuboid"
    format: str = "int8"                         # one of FORMATS
    channel_scale: Optional[torch.Tensor] = None  # [Hk, D] float32, int8c/int4c only
    channel_zero: Optional[torch.Tensor] = None   # [Hk, D] float32, int8c/int4c only

    @property
    def num_kv_heads(self) -> int:
        return len(self.block_sizes)

    @property
    def summary_vectors(self) -> int:
        return 1 if self.summary == "mean" else 2

    @property
    def slot_offsets(self) -> List[int]:
        # slot_offset_h = sum_{h' < h} P / bs_h'
        offsets, acc = [], 0
        for bs in self.block_sizes:
            offsets.append(acc)
            acc += self.page_size // bs
        return offsets

    @property
    def slots_per_page(self) -> int:
        return sum(self.page_size // bs for bs in self.block_sizes)


def summary_width(fmt: str, head_dim: int) -> int:
    return head_dim // 2 if fmt in ("int4", "int4c") else head_dim


def summary_storage_dtype(fmt: str) -> torch.dtype:
    if fmt in FLOAT_FORMAT_DTYPE:
        return FLOAT_FORMAT_DTYPE[fmt]
    return torch.int8 if fmt == "int8" else torch.uint8


def default_scale(head_dim: int) -> float:
    # s = 1/sqrt(D) as a float64 (the C++ params carry `double scale`).
    return 1.0 / math.sqrt(head_dim)


# ------------------------------------------------------------------------------------------------
# Quantization (float32 arithmetic exactly as the spec fixes it)
# ------------------------------------------------------------------------------------------------

def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes int32 [..., D] in [-8, 15] -> uint8 [..., D/2]; element 2i low nibble, 2i+1 high."""
    nib = (codes & 0xF).to(torch.uint8)                          # [..., D] two's complement nibbles
    return nib[..., 0::2] | (nib[..., 1::2] << 4)                # [..., D/2]


def _unpack_nibbles(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 [..., D/2] -> int32 [..., D] (sign-extended when signed)."""
    p = packed.to(torch.int32)                                   # [..., D/2]
    lo, hi = p & 0xF, p >> 4                                     # [..., D/2] each
    codes = torch.stack([lo, hi], dim=-1).flatten(-2)            # [..., D] element order 0, 1, 2, ...
    if signed:
        codes = torch.where(codes >= 8, codes - 16, codes)       # [..., D] in [-8, 7]
    return codes


def quantize(x: torch.Tensor, fmt: str, channel_scale=None, channel_zero=None):
    """x float32 [..., D] -> (codes [..., W] storage dtype, scales float32 [...] or None).

    channel_scale / channel_zero: float32 broadcastable to x (int8c/int4c only).
    NaN inputs (docs/decode.md, "Summaries"): a NaN takes the largest code (+qmax) and is left out
    of the per-vector amax, so the integer formats store NaN keys as finite codes.
    """
    x = x.to(torch.float32)                                      # [..., D]
    if fmt in FLOAT_FORMAT_DTYPE:
        return x.to(FLOAT_FORMAT_DTYPE[fmt]), None               # [..., D] round to nearest even
    qmax = QMAX[fmt]
    if fmt in ("int8", "int4"):
        mag = x.abs()                                            # [..., D]
        amax = torch.where(mag.isnan(), 0.0, mag).amax(dim=-1)   # [...] float32, exact, NaN left out
        scale = amax / torch.full_like(amax, float(qmax))        # [...] one float32 division
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # [...] avoid 0/0
        q = torch.round(x / safe.unsqueeze(-1))                  # [..., D] float32 quotient, half-even
        q = q.clamp(-qmax, qmax)                                 # [..., D]
        q = torch.where(q.isnan(), float(qmax), q)               # [..., D] NaN (also inf/inf) -> +qmax
        q = torch.where((scale == 0).unsqueeze(-1), torch.zeros_like(q), q)  # all-zero vector
        codes = q.to(torch.int32)                                # [..., D]
        if fmt == "int8":
            return codes.to(torch.int8), scale                   # [..., D], [...]
        return _pack_nibbles(codes), scale                       # [..., D/2], [...]
    cs = channel_scale.to(torch.float32)                         # [..., D] broadcastable
    cz = channel_zero.to(torch.float32)                          # [..., D] broadcastable
    diff = x - cz                                                # [..., D] float32 subtraction
    q = torch.round(diff / cs).clamp(0, qmax)                    # [..., D] float32 division, half-even
    q = torch.where(q.isnan(), float(qmax), q)                   # [..., D] NaN -> largest code
    codes = q.to(torch.int32)                                    # [..., D]
    if fmt == "int8c":
        return codes.to(torch.uint8), None                       # [..., D]
    return _pack_nibbles(codes), None                            # [..., D/2]


def dequantize(codes: torch.Tensor, fmt: str, scales=None, channel_scale=None, channel_zero=None):
    """codes [..., W] -> float32 [..., D] (value = code * scale [+ zero], float32 arithmetic)."""
    if fmt in FLOAT_FORMAT_DTYPE:
        return codes.to(torch.float32)                           # [..., D] exact widening
    if fmt == "int8":
        c = codes.to(torch.int32)                                # [..., D]
    elif fmt == "int8c":
        c = codes.to(torch.int32)                                # [..., D] in [0, 255]
    else:
        c = _unpack_nibbles(codes, signed=(fmt == "int4"))       # [..., D]
    cf = c.to(torch.float32)                                     # [..., D] exact
    if fmt in ("int8", "int4"):
        return cf * scales.to(torch.float32).unsqueeze(-1)       # [..., D] one float32 product
    scaled = cf * channel_scale.to(torch.float32)                # [..., D] float32 product
    return scaled + channel_zero.to(torch.float32)               # [..., D] then float32 sum (no fma)


# ------------------------------------------------------------------------------------------------
# Paged cache helpers
# ------------------------------------------------------------------------------------------------

def used_pages(seq_len: int, page_size: int) -> int:
    return (seq_len + page_size - 1) // page_size


def expand_cache(cache: torch.Tensor, page_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """cache [num_pages, P, Hk, D], page_table_row [max_pages] -> tokens [L, Hk, D] (same dtype).

    Only the pages that hold tokens [0, L) are gathered; later entries are never read.
    """
    P = cache.shape[1]
    n_used = used_pages(seq_len, P)
    pages = page_table_row[:n_used].to(torch.long)               # [n_used]
    tokens = cache[pages]                                        # [n_used, P, Hk, D]
    tokens = tokens.reshape(n_used * P, *cache.shape[2:])        # [n_used * P, Hk, D]
    return tokens[:seq_len]                                      # [L, Hk, D]


def block_location(layout: RefLayout, page_table_row: torch.Tensor, head: int, block: int):
    """(page, slot) that hold block `block` of KV head `head` for one sequence."""
    bs, P = layout.block_sizes[head], layout.page_size
    page = int(page_table_row[(block * bs) // P])
    slot = layout.slot_offsets[head] + (block * bs % P) // bs
    return page, slot


def block_locations(layout: RefLayout, page_table_row: torch.Tensor, head: int, blocks):
    """(pages, slots) long [n] of blocks `blocks` (a range or list) of KV head `head`: the same
    arithmetic as block_location, elementwise."""
    bs, P = layout.block_sizes[head], layout.page_size
    j = torch.tensor(list(blocks), dtype=torch.long)             # [n] block indices
    pages = page_table_row.to(torch.long)[(j * bs) // P]         # [n]
    slots = layout.slot_offsets[head] + (j * bs % P) // bs       # [n]
    return pages, slots


# ------------------------------------------------------------------------------------------------
# Block summaries and update_centroids
# ------------------------------------------------------------------------------------------------

def block_summary(keys: torch.Tensor, kind: str) -> torch.Tensor:
    """keys [..., bs, D] (cache dtype) -> float32 [..., R, D]: reduced in float64, rounded once.

    NaN and +-inf keys follow torch's float64 reductions (amax/amin propagate NaN).
    """
    k = keys.to(torch.float32).to(torch.float64)                 # [..., bs, D] exact
    if kind == "mean":
        vecs = k.mean(dim=-2, keepdim=True)                      # [..., 1, D]
    elif kind == "minmax":
        vecs = torch.stack([k.amax(dim=-2), k.amin(dim=-2)], dim=-2)  # [..., 2, D] hi, lo
    elif kind == "cuboid":
        m = (k.amax(dim=-2) + k.amin(dim=-2)) / 2                # [..., D] centre
        r = (k - m.unsqueeze(-2)).abs().mean(dim=-2)             # [..., D] mean |k - m|
        vecs = torch.stack([m + r, m - r], dim=-2)               # [..., 2, D] hi, lo
    else:
        raise ValueError(kind)
    return vecs.to(torch.float32)                                # [..., R, D] one rounding


def store_summary(vecs: torch.Tensor, layout: RefLayout, head: int):
    """float32 [..., R, D] -> (codes [..., R, W], scales float32 [..., R] or None) in the layout's
    format."""
    cs = cz = None
    if layout.format in ("int8c", "int4c"):
        cs = layout.channel_scale[head]                          # [D]
        cz = layout.channel_zero[head]                           # [D]
    return quantize(vecs, layout.format, cs, cz)


def update_centroids(k_cache, page_table, seq_lens, start_pos, layout: RefLayout,
                     summaries, scales=None):
    """Returns updated copies of (summaries [num_pages, S, R, W], scales [num_pages, S, R] | None).

    Writes the blocks j in [floor(start_b / bs), floor(L_b / bs)) of every head (the blocks that
    become complete in tokens [start_b, L_b)); every other element keeps its old bits.
    """
    summaries = summaries.clone()                                # [num_pages, S, R, W]
    scales = None if scales is None else scales.clone()          # [num_pages, S, R]
    for b in range(page_table.shape[0]):
        L, start = int(seq_lens[b]), int(start_pos[b])
        keys = expand_cache(k_cache, page_table[b], L)           # [L, Hk, D]
        for h, bs in enumerate(layout.block_sizes):
            first, end = start // bs, L // bs                    # blocks [first, end) complete now
            if first >= end:
                continue
            blocks = keys[first * bs:end * bs, h].reshape(end - first, bs, -1)  # [m, bs, D]
            codes, sc = store_summary(block_summary(blocks, layout.summary), layout, h)
            pages, slots = block_locations(layout, page_table[b], h, range(first, end))
            summaries[pages, slots] = codes                      # [m, R, W]
            if sc is not None:
                scales[pages, slots] = sc                        # [m, R]
    return summaries, scales


def read_summaries(summaries, scales, page_table_row, layout: RefLayout, head: int, n: int):
    """Dequantized float32 summaries [n, R, D] of blocks 0..n-1 of one (sequence, head)."""
    if n == 0:
        width = summaries.shape[-1] * (2 if layout.format in ("int4", "int4c") else 1)
        return torch.zeros(0, layout.summary_vectors, width)     # [0, R, D]
    pages, slots = block_locations(layout, page_table_row, head, range(n))
    codes = summaries[pages, slots]                              # [n, R, W]
    sc = None if scales is None else scales[pages, slots]        # [n, R]
    cs = cz = None
    if layout.format in ("int8c", "int4c"):
        cs, cz = layout.channel_scale[head], layout.channel_zero[head]  # [D], [D]
    return dequantize(codes, layout.format, sc, cs, cz)          # [n, R, D]


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    num_blocks: int        # n = L // bs
    kept: List[int]        # sink ∪ local, ascending, within [0, n)
    candidates: List[int]  # the other complete blocks, ascending
    num_selected: int      # k


def budget_tokens(token_budget, seq_len: int) -> int:
    """An int is a token count; a float f in (0, 1) means ceil(f * L)."""
    if isinstance(token_budget, float):
        return math.ceil(token_budget * seq_len)
    return int(token_budget)


def plan_selection(seq_len: int, bs: int, token_budget, sink_tokens: int, local_tokens: int) -> Plan:
    L = seq_len
    n = L // bs
    budget = budget_tokens(token_budget, L)
    sink = set(range(min(n, -(-sink_tokens // bs))))
    local = set(range(max(0, n - (-(-local_tokens // bs))), n))
    kept = sorted(sink | local)
    candidates = [j for j in range(n) if j not in sink and j not in local]
    if budget >= L:
        k = len(candidates)
    else:
        k = (budget - bs * len(kept) - (L - n * bs)) // bs       # floor division, may be negative
        k = max(0, min(k, len(candidates)))
    return Plan(n, kept, candidates, k)


def _exp_consistent(x: torch.Tensor) -> torch.Tensor:
    """exp elementwise, equal inputs giving bit-equal outputs wherever they sit in the tensor.

    (torch's vectorized exp and its scalar tail loop may round differently; exact-tie tests need
    identical inputs to stay identical.)
    """
    uniq, inverse = torch.unique(x, return_inverse=True)         # [u], [x.shape]
    return torch.exp(uniq)[inverse]                              # [x.shape]


def block_logits(q: torch.Tensor, vecs: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """q float64 [G, D], vecs float64 [n, R, D] -> logits float64 [G, n].

    Summed over d in order (a running sum, as a scan) so that equal summaries give bit-equal
    logits (a GEMM may round its edge tiles differently). docs/decode.md ("Choices"): the logit of
    query head i and block j is NaN when q_i or the block's summary holds any NaN or +-inf.
    """
    qe = q[:, None, :]                                           # [G, 1, D]
    if kind == "mean":
        terms = qe * vecs[None, :, 0, :]                         # [G, n, D] q_d c_d
    else:
        terms = torch.maximum(qe * vecs[None, :, 0, :],          # [G, n, D] max(q_d hi_d, q_d lo_d)
                              qe * vecs[None, :, 1, :])
    acc = terms.cumsum(dim=-1)[..., -1]                          # [G, n] sum over d = 0, 1, ...
    q_ok = torch.isfinite(q).all(dim=1)                          # [G]
    block_ok = torch.isfinite(vecs).flatten(1).all(dim=1)        # [n]
    ok = q_ok[:, None] & block_ok[None, :]                       # [G, n]
    return torch.where(ok, acc * scale, math.nan)                # [G, n]


def group_scores(logits: torch.Tensor, group_reduce: str) -> torch.Tensor:
    """logits float64 [G, c] over the candidates (finite or NaN) -> group score float64 [c].

    NaN logits rank below every number: "max" treats them as -inf (a candidate whose logits are
    all NaN scores -inf); in "softmax_sum" they weigh 0 and a head without a finite logit adds
    nothing.
    """
    nan = torch.isnan(logits)                                    # [G, c]
    if group_reduce == "max":
        ranked = torch.where(nan, -math.inf, logits)             # [G, c]
        out = ranked[0]                                          # [c]
        for i in range(1, ranked.shape[0]):
            out = torch.maximum(out, ranked[i])                  # [c] max over query heads
        return out
    if group_reduce == "softmax_sum":
        out = torch.zeros(logits.shape[1], dtype=torch.float64)  # [c]
        for i in range(logits.shape[0]):
            if nan[i].all():
                continue                                         # no finite logit: adds nothing
            row = logits[i][~nan[i]]                             # [c_i] the finite logits
            e = torch.zeros_like(logits[i])                      # [c] NaN logits weigh 0
            e[~nan[i]] = _exp_consistent(row - row.max())        # [c_i] stable exponentials
            out = out + e / e.sum()                              # [c] softmax of head i over candidates
        return out
    raise ValueError(group_reduce)


def top_k_lower_index(scores: torch.Tensor, k: int) -> List[int]:
    """Positions of the k highest scores; equal scores (several -inf included) prefer the lower
    position."""
    order = torch.sort(scores, descending=True, stable=True).indices  # [c] stable: ties keep order
    return sorted(order[:k].tolist())


def max_blocks_bound(layout: RefLayout, max_pages: int, token_budget, sink_tokens: int,
                     local_tokens: int) -> int:
    """Default capacity of select_blocks (docs/decode.md), without reading any length: with
    C = max_pages * P and T the budget in tokens (ceil(f * C) for a fraction f),
    max over heads of min(C // bs, max(ceil(sink / bs) + ceil(local / bs), T // bs))."""
    C = max_pages * layout.page_size
    T = math.ceil(token_budget * C) if isinstance(token_budget, float) else token_budget
    return max(min(C // bs, max(-(-sink_tokens // bs) + -(-local_tokens // bs), T // bs))
               for bs in layout.block_sizes)


def select_blocks(q, summaries, scales, page_table, seq_lens, layout: RefLayout, token_budget,
                  sink_tokens=16, local_tokens=64, group_reduce="max", max_blocks=None,
                  scale=None):
    """-> (block_indices int32 [B, Hk, max_blocks] ascending padded -1, block_counts int32 [B, Hk]).

    Also returns the per-(b, h) list of selected candidates for diagnostics as a third value.
    """
    B, Hq, D = q.shape
    Hk = layout.num_kv_heads
    G = Hq // Hk
    s = default_scale(D) if scale is None else scale
    if max_blocks is None:
        max_blocks = max_blocks_bound(layout, page_table.shape[1], token_budget, sink_tokens,
                                      local_tokens)
    indices = torch.full((B, Hk, max_blocks), -1, dtype=torch.int32)  # [B, Hk, max_blocks]
    counts = torch.zeros(B, Hk, dtype=torch.int32)               # [B, Hk]
    for b in range(B):
        L = int(seq_lens[b])
        for h, bs in enumerate(layout.block_sizes):
            plan = plan_selection(L, bs, token_budget, sink_tokens, local_tokens)
            chosen = list(plan.kept)
            if plan.num_selected > 0:
                vecs = read_summaries(summaries, scales, page_table[b], layout, h,
                                      plan.num_blocks).to(torch.float64)  # [n, R, D]
                cand = torch.tensor(plan.candidates, dtype=torch.long)    # [c]
                qg = q[b, h * G:(h + 1) * G].to(torch.float64)   # [G, D]
                logits = block_logits(qg, vecs[cand], layout.summary, s)  # [G, c]
                score = group_scores(logits, group_reduce)       # [c]
                picked = top_k_lower_index(score, plan.num_selected)
                chosen += [plan.candidates[p] for p in picked]
            chosen = sorted(chosen)
            if len(chosen) > max_blocks:
                raise ValueError("max_blocks too small")
            counts[b, h] = len(chosen)
            indices[b, h, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return indices, counts


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------

def attended_mask(seq_len: int, bs: int, blocks: Sequence[int]) -> torch.Tensor:
    """bool [L]: the listed blocks [j*bs, (j+1)*bs) plus the partial tail [n*bs, L)."""
    n = seq_len // bs
    mask = torch.zeros(seq_len, dtype=torch.bool)                # [L]
    for j in blocks:
        mask[j * bs:(j + 1) * bs] = True
    mask[n * bs:] = True                                         # partial tail, always attended
    return mask


def attention_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """q [G, D], k/v [T, D] (any float dtype) -> (out float64 [G, D], lse float64 [G])."""
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))    # exact widening
    G, D = q64.shape
    if k64.shape[0] == 0:
        return torch.zeros(G, D, dtype=torch.float64), torch.full((G,), -math.inf, dtype=torch.float64)
    logits = scale * (q64 @ k64.T)                               # [G, T]
    # Max-subtracted softmax written out, so that NaN and +-inf follow IEEE arithmetic
    # (docs/decode.md, "Choices"): a NaN or +inf logit, or logits all -inf, give NaN out and lse.
    peak = logits.amax(dim=-1, keepdim=True)                     # [G, 1] NaN if any logit is NaN
    w = torch.exp(logits - peak)                                 # [G, T] unnormalised weights
    total = w.sum(dim=-1)                                        # [G]
    lse = peak[:, 0] + torch.log(total)                          # [G] natural log
    return (w @ v64) / total[:, None], lse                       # [G, D], [G]


def masked_attention(q, k_cache, v_cache, page_table, seq_lens, masks, scale=None):
    """Attention over explicit token masks.

    q [B, Hq, D]; caches [num_pages, P, Hk, D]; masks[b][h]: bool [L_b] or None for all tokens.
    -> (out float64 [B, Hq, D], lse float64 [B, Hq]).
    """
    B, Hq, D = q.shape
    Hk = k_cache.shape[2]
    G = Hq // Hk
    s = default_scale(D) if scale is None else scale
    out = torch.zeros(B, Hq, D, dtype=torch.float64)            # [B, Hq, D]
    lse = torch.zeros(B, Hq, dtype=torch.float64)               # [B, Hq]
    for b in range(B):
        L = int(seq_lens[b])
        keys = expand_cache(k_cache, page_table[b], L)           # [L, Hk, D]
        vals = expand_cache(v_cache, page_table[b], L)           # [L, Hk, D]
        for h in range(Hk):
            m = masks[b][h] if masks is not None else None
            kh = keys[:, h] if m is None else keys[m, h]         # [T, D]
            vh = vals[:, h] if m is None else vals[m, h]         # [T, D]
            o, l = attention_one(q[b, h * G:(h + 1) * G], kh, vh, s)  # [G, D], [G]
            out[b, h * G:(h + 1) * G] = o
            lse[b, h * G:(h + 1) * G] = l
    return out, lse


def block_lists(block_indices, block_counts):
    """int32 [B, Hk, M], [B, Hk] -> python lists lists[b][h] of the first count entries."""
    B, Hk = block_counts.shape
    return [[block_indices[b, h, :int(block_counts[b, h])].tolist() for h in range(Hk)]
            for b in range(B)]


def sparse_masks(seq_lens, block_sizes, block_indices, block_counts):
    """Token masks masks[b][h] bool [L_b] of the attended set of sparse_decode."""
    lists = block_lists(block_indices, block_counts)
    return [[attended_mask(int(seq_lens[b]), int(bs), lists[b][h])
             for h, bs in enumerate(block_sizes)] for b in range(len(lists))]


def sparse_decode(q, k_cache, v_cache, page_table, seq_lens, block_sizes, block_indices,
                  block_counts, scale=None):
    """Reference sparse attention -> (out float64 [B, Hq, D], lse float64 [B, Hq])."""
    masks = sparse_masks(seq_lens, block_sizes, block_indices, block_counts)
    return masked_attention(q, k_cache, v_cache, page_table, seq_lens, masks, scale)


def sparse_decode_blockwise(q, k_cache, v_cache, page_table, seq_lens, block_sizes, block_indices,
                            block_counts, scale=None):
    """Second formulation of sparse attention: gather the listed blocks' keys directly from the
    pages (no expanded sequence) and the tail, then attend. Used to cross-check the reference."""
    B, Hq, D = q.shape
    Hk = k_cache.shape[2]
    G, P = Hq // Hk, k_cache.shape[1]
    s = default_scale(D) if scale is None else scale
    out = torch.zeros(B, Hq, D, dtype=torch.float64)            # [B, Hq, D]
    lse = torch.zeros(B, Hq, dtype=torch.float64)               # [B, Hq]
    lists = block_lists(block_indices, block_counts)
    for b in range(B):
        L = int(seq_lens[b])
        for h in range(Hk):
            bs = int(block_sizes[h])
            n = L // bs
            tokens = [t for j in lists[b][h] for t in range(j * bs, (j + 1) * bs)]
            tokens += list(range(n * bs, L))                     # partial tail
            t = torch.tensor(tokens, dtype=torch.long)           # [T] token positions
            pages = page_table[b].to(torch.long)[t // P]         # [T] page of every token
            kh = k_cache[pages, t % P, h]                        # [T, D]
            vh = v_cache[pages, t % P, h]                        # [T, D]
            o, l = attention_one(q[b, h * G:(h + 1) * G], kh, vh, s)  # [G, D], [G]
            out[b, h * G:(h + 1) * G] = o
            lse[b, h * G:(h + 1) * G] = l
    return out, lse


def dense_decode(q, k_cache, v_cache, page_table, seq_lens, scale=None):
    """Reference dense attention over all L_b tokens -> (out float64 [B, Hq, D], lse [B, Hq])."""
    return masked_attention(q, k_cache, v_cache, page_table, seq_lens, None, scale)

"""Block lists for sparse prefill: the FlexPrefill and PBS-Attn builders and their primitives.

The builders write the block-list format of ``absparse.sparse_prefill``: ``block_indices`` int32
``[B, H, Nq, M]`` and ``block_counts`` int32 ``[B, H, Nq]`` with ``Nq = M = ceil(max_len /
block_size)``; row ``(b, h, i)`` lists, ascending and padded with -1, the key blocks that query
block ``i`` of sequence ``b`` attends (``q_block = k_block = block_size``); rows past a sequence's
last block have count 0. Inputs are packed variable-length batches (FlashAttention's varlen
layout): ``q [T, Hq, D]``, ``k, v [T, Hk, D]``, ``cu_seqlens`` int32 ``[B + 1]``.

Algorithms, the deviations from the original systems and the defaults: ``docs/prefill_masks.md``.
Every function validates its arguments in the native layer (``ValueError`` naming the argument,
the expected and the actual value). CPU tensors run the float64 reference; CUDA tensors (builds
with the kernels) run the CUDA implementations on the current stream, with outputs allocated on
the inputs' device and no host synchronisation, except where noted: the output shapes of the
block-list builders and of ``last_block_attention`` / ``block_pool`` / ``pooled_block_scores``
depend on ``max_len``, which a CUDA caller should pass (it is read from ``cu_seqlens`` otherwise:
one device-to-host copy). The CUDA rules and where they differ from the reference:
``docs/prefill_masks.md`` ("CUDA path").
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch

from . import _C
from .ops import _cuda_stream

__all__ = ["last_block_attention", "vertical_slash_sums", "block_pool", "pooled_block_scores",
           "js_distance", "coverage_select", "flexprefill_mask", "pbs_permute", "pbs_mask"]

# Token budgets above this are "unbounded" (every sequence length fits in int32).
_UNBOUNDED = 2 ** 62


def _positive_int(value, fn: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < value < 2**31:
        raise ValueError(f"{fn}: {name}: expected an int in [1, 2^31), got {value!r}")
    return int(value)


def _non_negative_int(value, fn: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{fn}: {name}: expected an int >= 0, got {value!r}")
    return min(int(value), _UNBOUNDED)


def _real(value, fn: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{fn}: {name}: expected a finite float, got {value!r}")
    return float(value)


def _tensor(x, fn: str, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: {name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _scale(q: torch.Tensor, scale: Optional[float], fn: str) -> float:
    if scale is None:
        if q.dim() < 1 or q.shape[-1] <= 0:
            raise ValueError(f"{fn}: q: expected a non-empty last dimension, got shape "
                             f"{list(q.shape)}")
        return 1.0 / math.sqrt(q.shape[-1])
    return _real(scale, fn, "scale")


def _max_len(cu_seqlens, fn: str, max_len: Optional[int] = None) -> int:
    """The caller's max_len, else max_b L_b read from cu_seqlens (its values are validated by
    the native layer on the CPU; for a CUDA tensor this copies to the host, which synchronizes).
    On the GPU a max_len below the true maximum truncates the longer sequences (no
    out-of-bounds access); on the CPU it raises."""
    if max_len is not None:
        if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) \
                or not 0 <= max_len < 2 ** 31:
            raise ValueError(f"{fn}: max_len: expected an int in [0, 2^31), got {max_len!r}")
        return int(max_len)
    cu = _tensor(cu_seqlens, fn, "cu_seqlens")
    if cu.dim() != 1 or cu.shape[0] < 2 or cu.dtype != torch.int32:
        return 0  # the native layer names what is wrong
    return max(int((cu[1:].to(torch.int64) - cu[:-1].to(torch.int64)).max()), 0)


def _device(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _stream(x) -> int:
    """The current CUDA stream of x's device (0 for CPU tensors)."""
    return _cuda_stream(x) if isinstance(x, torch.Tensor) and x.is_cuda else 0


def _batch(cu_seqlens) -> int:
    return max(cu_seqlens.shape[0] - 1, 0) if cu_seqlens.dim() == 1 else 0


def _heads(x: torch.Tensor, dim: int) -> int:
    return x.shape[dim] if x.dim() > dim else 0


def _lists(cu_seqlens, heads: int, block_size: int, fn: str, max_len: Optional[int],
           device: torch.device):
    nq = -(-_max_len(cu_seqlens, fn, max_len) // block_size)
    b = _batch(cu_seqlens)
    return (torch.empty(b, heads, nq, nq, dtype=torch.int32, device=device),
            torch.empty(b, heads, nq, dtype=torch.int32, device=device),
            torch.empty(b, heads, device=device))


def last_block_attention(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor,
                         block_size: int = 128, scale: Optional[float] = None,
                         group_mean: bool = False, max_len: Optional[int] = None) -> torch.Tensor:
    """Exact causal attention probabilities of the last ``block_size`` queries of each sequence.

    Row ``r < n_b = min(block_size, L_b)`` is the query at position ``t = L_b - n_b + r``:
    ``probs[b, h, r, p] = softmax_{p <= t}(scale * q_t . k_p)``; other entries are 0.

    Parameters
    ----------
    q : [T, Hq, D] float32 / float16 / bfloat16; k : [T, Hk, D] same dtype
    cu_seqlens : int32 [B + 1], 0 = cu[0] <= ... <= cu[B] = T
    group_mean : False: one row set per query head (H = Hq); True: the mean over each KV head's
        G = Hq / Hk query heads (H = Hk)
    max_len : the width of probs (>= max_b L_b); default: read from cu_seqlens

    Returns
    -------
    probs : float32 [B, H, block_size, max_len]

    Example
    -------
    >>> q, k = torch.randn(10, 4, 16), torch.randn(10, 2, 16)
    >>> cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    >>> P = last_block_attention(q, k, cu, block_size=4, group_mean=True)
    >>> P.shape, P[0, :, :3].sum(-1).tolist() == [[1.0] * 3] * 2, P[0, :, 3].abs().sum().item()
    (torch.Size([2, 2, 4, 7]), True, 0.0)
    """
    fn = "last_block_attention"
    block_size = _positive_int(block_size, fn, "block_size")
    heads = _heads(k, 1) if group_mean else _heads(q, 1)
    probs = torch.empty(_batch(cu_seqlens), heads, block_size,
                        _max_len(cu_seqlens, fn, max_len), device=_device(q))
    _C.last_block_attention(q, k, cu_seqlens, block_size, _scale(q, scale, fn), bool(group_mean),
                            probs, _stream(q))
    return probs


def vertical_slash_sums(probs: torch.Tensor,
                        cu_seqlens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash (diagonal) means of last-block probabilities.

    With ``n_b = min(block_size, L_b)`` rows and row ``r`` the query at ``t_r = L_b - n_b + r``:
    ``vertical[b, h, p] = mean_r probs[b, h, r, p]`` and ``slash[b, h, d] = mean_r probs[b, h, r,
    t_r - d]`` (the mass at distance ``d`` behind the query). Entries past ``L_b`` are 0.

    Parameters
    ----------
    probs : float32 [B, H, block_size, max_len], contiguous (``last_block_attention``'s output)
    cu_seqlens : int32 [B + 1]

    Returns
    -------
    vertical, slash : float32 [B, H, max_len]

    Example
    -------
    >>> q, k = torch.randn(6, 1, 8), torch.randn(6, 1, 8)
    >>> cu = torch.tensor([0, 6], dtype=torch.int32)
    >>> v, s = vertical_slash_sums(last_block_attention(q, k, cu, block_size=2), cu)
    >>> round(v.sum().item(), 5), round(s.sum().item(), 5)
    (1.0, 1.0)
    """
    probs = _tensor(probs, "vertical_slash_sums", "probs")
    vertical = torch.empty(probs.shape[0], probs.shape[1], probs.shape[-1], device=probs.device) \
        if probs.dim() == 4 else torch.empty(0, device=probs.device)
    slash = torch.empty_like(vertical)
    _C.vertical_slash_sums(probs, cu_seqlens, vertical, slash, _stream(probs))
    return vertical, slash


def block_pool(x: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int = 128,
               max_len: Optional[int] = None) -> torch.Tensor:
    """Mean of each block of ``block_size`` rows of every sequence (a partial last block: the
    mean of its actual rows).

    Parameters
    ----------
    x : [T, H, D] float32 / float16 / bfloat16; cu_seqlens : int32 [B + 1]
    max_len : >= max_b L_b (sets Nb); default: read from cu_seqlens

    Returns
    -------
    pooled : float32 [B, H, ceil(max_len / block_size), D]; blocks past a sequence's end are 0

    Example
    -------
    >>> x = torch.arange(5.).view(5, 1, 1)
    >>> block_pool(x, torch.tensor([0, 5], dtype=torch.int32), block_size=2).flatten().tolist()
    [0.5, 2.5, 4.0]
    """
    fn = "block_pool"
    block_size = _positive_int(block_size, fn, "block_size")
    nb = -(-_max_len(cu_seqlens, fn, max_len) // block_size)
    x = _tensor(x, fn, "x")
    pooled = torch.empty(_batch(cu_seqlens), _heads(x, 1), nb, x.shape[-1] if x.dim() else 0,
                         device=x.device)
    _C.block_pool(x, cu_seqlens, block_size, pooled, _stream(x))
    return pooled


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor,
                        block_size: int = 128, segment_size: int = 0,
                        scale: Optional[float] = None, group_mean: bool = False,
                        max_len: Optional[int] = None) -> torch.Tensor:
    """Softmax over key blocks of the pooled logits ``scale * mean(Q_i) . mean(K_j)``.

    The softmax of query block ``i`` runs over the allowed key blocks ``j``: ``j <= i``
    (``segment_size=0``, FlexPrefill's causal block map) or the blocks of earlier segments,
    ``j // (segment_size / block_size) < i // (segment_size / block_size)`` (PBS-Attn's
    off-diagonal segments). Rows without an allowed block and entries outside are 0.

    Parameters
    ----------
    q : [T, Hq, D]; k : [T, Hk, D]; cu_seqlens : int32 [B + 1]
    segment_size : 0 or a positive multiple of block_size
    group_mean : False: H = Hq; True: H = Hk, each row the mean of the group's softmax rows
    max_len : >= max_b L_b (sets Nb); default: read from cu_seqlens

    Returns
    -------
    scores : float32 [B, H, Nb, Nb], Nb = ceil(max_len / block_size)

    Example
    -------
    >>> q, k = torch.randn(9, 2, 8), torch.randn(9, 1, 8)
    >>> A = pooled_block_scores(q, k, torch.tensor([0, 9], dtype=torch.int32), block_size=4)
    >>> A.shape, [round(x, 5) for x in A[0, 0].sum(-1).tolist()], A[0, 0, 0, 1].item()
    (torch.Size([1, 2, 3, 3]), [1.0, 1.0, 1.0], 0.0)
    """
    fn = "pooled_block_scores"
    block_size = _positive_int(block_size, fn, "block_size")
    segment_size = _non_negative_int(segment_size, fn, "segment_size")
    nb = -(-_max_len(cu_seqlens, fn, max_len) // block_size)
    heads = _heads(k, 1) if group_mean else _heads(q, 1)
    scores = torch.empty(_batch(cu_seqlens), heads, nb, nb, device=_device(q))
    _C.pooled_block_scores(q, k, cu_seqlens, block_size, min(segment_size, 2**31 - 1),
                           _scale(q, scale, fn), bool(group_mean), scores, _stream(q))
    return scores


def js_distance(p: torch.Tensor, q: torch.Tensor,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Square-root Jensen-Shannon divergence (natural log) of each row pair.

    ``sqrt(1/2 sum p log(p/m) + 1/2 sum q log(q/m))``, ``m = (p + q) / 2``, over the first
    ``lengths[r]`` entries of row ``r`` (all when None); a zero entry contributes 0. FlexPrefill's
    pattern test: a head is query-aware when the distance between the pooled estimate and the
    block-pooled vertical is below ``tau``.

    Parameters
    ----------
    p, q : float32 [rows, n], contiguous; lengths : int32 [rows] or None

    Returns
    -------
    float32 [rows]

    Example
    -------
    >>> js_distance(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    tensor([0.0000, 0.8326])
    """
    p = _tensor(p, "js_distance", "p")
    out = torch.empty(p.shape[0] if p.dim() else 0, device=p.device)
    _C.js_distance(p, q, lengths, out, _stream(p))
    return out


def coverage_select(scores: torch.Tensor, gamma: float, lengths: Optional[torch.Tensor] = None,
                    forced: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cumulative-coverage selection per row: the fewest top entries whose mass reaches gamma.

    Row ``r`` (its first ``lengths[r]`` entries): entries ordered by score, descending, ties to the
    lower index (NaN last, weighing 0); keep the shortest prefix whose float64 running sum is
    ``>= gamma`` (all of them when the total stays below gamma, none when ``gamma <= 0``); then add
    the ``forced`` entries (they do not count toward gamma).

    Parameters
    ----------
    scores : float32 [rows, n], contiguous; gamma : float (an absolute threshold)
    lengths : int32 [rows] or None; forced : bool / uint8 [rows, n] or None

    Returns
    -------
    indices : int32 [rows, n], the kept entries ascending, padded with -1
    counts : int32 [rows]

    Example
    -------
    >>> idx, cnt = coverage_select(torch.tensor([[0.1, 0.4, 0.4, 0.1]]), 0.5)
    >>> idx.tolist(), cnt.tolist()     # the tie 0.4 / 0.4 goes to index 1 first
    ([[1, 2, -1, -1]], [2])
    """
    scores = _tensor(scores, "coverage_select", "scores")
    gamma = _real(gamma, "coverage_select", "gamma")
    if isinstance(forced, torch.Tensor) and forced.dtype == torch.bool:
        forced = forced.to(torch.uint8)
    rows, n = (scores.shape[0], scores.shape[1]) if scores.dim() == 2 else (0, 0)
    indices = torch.empty(rows, n, dtype=torch.int32, device=scores.device)
    counts = torch.empty(rows, dtype=torch.int32, device=scores.device)
    _C.coverage_select(scores, gamma, lengths, forced, indices, counts, _stream(scores))
    return indices, counts


def flexprefill_mask(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor,
                     block_size: int = 128, gamma: float = 0.9, tau: float = 0.1,
                     min_budget: int = 1024, max_budget: Optional[int] = None,
                     scale: Optional[float] = None, max_len: Optional[int] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """FlexPrefill's block lists, per sequence and query head (H = Hq).

    From the last block's exact attention: the head is query-aware when the square-root JS
    distance between ``softmax(mean(last queries) . pooled K)`` and the block-pooled vertical is
    below ``tau``, else vertical-slash. Vertical-slash heads list the top key-block columns and
    diagonal bands, as many as cover ``gamma`` of the vertical / slash mass in tokens, converted to
    blocks as ``tokens // block_size + 1`` and clamped to ``[ceil(min_budget / block_size),
    ceil(max_budget / block_size)]`` (first column and main diagonal forced). Query-aware heads list
    ``ceil(min_budget / block_size)`` columns and bands plus the pooled causal block map's entries
    covering ``gamma * nb`` of its mass (global over the rows). Sequences with ``L <= max(2 *
    block_size, min budget rounded up to blocks)`` are listed densely. Details and the deviations
    from the original: ``docs/prefill_masks.md``.

    Parameters
    ----------
    q : [T, Hq, D] float32 / float16 / bfloat16; k : [T, Hk, D] same dtype
    cu_seqlens : int32 [B + 1]
    block_size : query and key block (the prefill op's q_block = k_block)
    gamma : coverage in (0, 1]; tau : pattern threshold >= 0
    min_budget, max_budget : tokens (max_budget None = unbounded; else >= max(min_budget, 1))
    scale : logit scale, default 1/sqrt(D)
    max_len : >= max_b L_b (sets Nq); default: read from cu_seqlens (a host copy for CUDA)

    Returns
    -------
    block_indices : int32 [B, Hq, Nq, Nq]; block_counts : int32 [B, Hq, Nq]
    info : dict of [B, Hq] tensors: ``pattern`` int32 (0 vertical-slash, 1 query-aware, 2 dense),
        ``density`` float32 (listed / causal blocks), ``js_distance`` float32 (NaN when dense),
        ``vertical_blocks`` and ``slash_blocks`` int32 (the budgets used; 0 when dense)

    Example
    -------
    >>> torch.manual_seed(0); T = 1000
    <torch._C.Generator object at ...>
    >>> q, k = torch.randn(T, 4, 64), torch.randn(T, 1, 64)
    >>> cu = torch.tensor([0, 100, T], dtype=torch.int32)        # lengths 100 and 900
    >>> idx, cnt, info = flexprefill_mask(q, k, cu, block_size=64, min_budget=128)
    >>> idx.shape, info["pattern"][0].tolist(), cnt[0, 0].tolist()[:3]
    (torch.Size([2, 4, 15, 15]), [2, 2, 2, 2], [1, 2, 0])
    >>> bool((info["density"][1] < 1).all())
    True
    """
    fn = "flexprefill_mask"
    block_size = _positive_int(block_size, fn, "block_size")
    gamma, tau = _real(gamma, fn, "gamma"), _real(tau, fn, "tau")
    min_budget = _non_negative_int(min_budget, fn, "min_budget")
    max_budget = _UNBOUNDED if max_budget is None else _non_negative_int(max_budget, fn,
                                                                          "max_budget")
    heads = _heads(_tensor(q, fn, "q"), 1)
    dev = q.device
    indices, counts, density = _lists(cu_seqlens, heads, block_size, fn, max_len, dev)
    b = _batch(cu_seqlens)
    info = {"pattern": torch.empty(b, heads, dtype=torch.int32, device=dev), "density": density,
            "js_distance": torch.empty(b, heads, device=dev),
            "vertical_blocks": torch.empty(b, heads, dtype=torch.int32, device=dev),
            "slash_blocks": torch.empty(b, heads, dtype=torch.int32, device=dev)}
    _C.flexprefill_mask(q, k, cu_seqlens, block_size, gamma, tau, min_budget, max_budget,
                        _scale(q, scale, fn), indices, counts, density, info["pattern"],
                        info["js_distance"], info["vertical_blocks"], info["slash_blocks"],
                        _stream(q))
    return indices, counts, info


def pbs_permute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                block_size: int = 128, segment_size: int = 256, scale: Optional[float] = None,
                max_len: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PBS-Attn's key permutation, per sequence and KV head.

    Each complete segment of ``segment_size`` keys is sorted by the keys' attention from the last
    ``block_size`` queries (exact causal softmax, mean over those queries and over the KV head's
    query heads), descending, ties to the lower position; the ``L mod segment_size`` tail stays.
    Nothing moves in a sequence without a complete segment or of exactly one segment. Values follow
    their keys. Feed ``k_perm``, ``v_perm`` and ``key_positions`` to ``pbs_mask`` and the prefill
    attention.

    Parameters
    ----------
    q : [T, Hq, D]; k, v : [T, Hk, D] (one float dtype); cu_seqlens : int32 [B + 1]
    segment_size : a positive multiple of block_size
    max_len : CUDA only, optional: a bound of every L_b that sizes the launch grids (default T;
        never read from cu_seqlens, so no host synchronisation)

    Returns
    -------
    k_perm, v_perm : [T, Hk, D] in the dtype of k (rows copied bit for bit)
    key_positions : int32 [T, Hk], the original in-sequence position of each stored row

    Example
    -------
    >>> q, k, v = torch.randn(600, 2, 16), torch.randn(600, 1, 16), torch.randn(600, 1, 16)
    >>> cu = torch.tensor([0, 600], dtype=torch.int32)
    >>> k_perm, v_perm, pos = pbs_permute(q, k, v, cu, block_size=64, segment_size=256)
    >>> torch.equal(k_perm[:, 0], k[pos[:, 0].long(), 0])     # rows gathered from key_positions
    True
    >>> pos[512:, 0].tolist() == list(range(512, 600))         # the tail stays
    True
    >>> sorted(pos[:256, 0].tolist()) == list(range(256))
    True
    """
    fn = "pbs_permute"
    block_size = _positive_int(block_size, fn, "block_size")
    segment_size = _positive_int(segment_size, fn, "segment_size")
    k = _tensor(k, fn, "k")
    bound = 0 if max_len is None else _max_len(cu_seqlens, fn, max_len)
    k_perm = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    v_perm = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    positions = torch.empty(k.shape[:2] if k.dim() >= 2 else (0, 0), dtype=torch.int32,
                            device=k.device)
    _C.pbs_permute(q, k, v, cu_seqlens, block_size, segment_size, _scale(q, scale, fn), k_perm,
                   v_perm, positions, bound, _stream(q))
    return k_perm, v_perm, positions


def pbs_mask(q: torch.Tensor, k_perm: torch.Tensor, cu_seqlens: torch.Tensor,
             key_positions: torch.Tensor, block_size: int = 128, segment_size: int = 256,
             threshold: float = 0.9, force_first: bool = True, scale: Optional[float] = None,
             max_len: Optional[int] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """PBS-Attn's block lists over permuted keys, per sequence and KV head (H = Hk).

    Query blocks (original order) against key blocks of ``k_perm``. Listed: (1) every key block of
    the query block's own segment that holds a key the block's last query may see (by
    ``key_positions``); (2) from earlier segments, per query block, the fewest blocks covering
    ``threshold`` of the group-mean pooled block attention (``pooled_block_scores`` with
    ``segment_size`` and ``group_mean=True``); (3) with ``force_first``, the key block holding
    original position 0. Attention over these lists needs ``key_positions`` for the causal test.

    Parameters
    ----------
    q : [T, Hq, D]; k_perm : [T, Hk, D] (``pbs_permute``'s), same dtype
    cu_seqlens : int32 [B + 1]
    key_positions : int32 [T, Hk]; per (sequence, KV head) a permutation of each segment
    segment_size : a positive multiple of block_size; threshold : in (0, 1]
    max_len : >= max_b L_b (sets Nq); default: read from cu_seqlens (a host copy for CUDA)

    Returns
    -------
    block_indices : int32 [B, Hk, Nq, Nq]; block_counts : int32 [B, Hk, Nq]
    info : dict with ``density`` float32 [B, Hk] (listed blocks / blocks holding a causal pair)

    Example
    -------
    >>> q, k, v = torch.randn(600, 2, 16), torch.randn(600, 1, 16), torch.randn(600, 1, 16)
    >>> cu = torch.tensor([0, 600], dtype=torch.int32)
    >>> k_perm, v_perm, pos = pbs_permute(q, k, v, cu, block_size=64, segment_size=256)
    >>> idx, cnt, info = pbs_mask(q, k_perm, cu, pos, block_size=64, segment_size=256)
    >>> idx.shape, idx[0, 0, 8, :cnt[0, 0, 8]].tolist()[-1]   # the unpermuted tail: 8, 9
    (torch.Size([1, 1, 10, 10]), 8)
    """
    fn = "pbs_mask"
    block_size = _positive_int(block_size, fn, "block_size")
    segment_size = _positive_int(segment_size, fn, "segment_size")
    threshold = _real(threshold, fn, "threshold")
    k_perm = _tensor(k_perm, fn, "k_perm")
    indices, counts, density = _lists(cu_seqlens, _heads(k_perm, 1), block_size, fn, max_len,
                                      _device(q))
    _C.pbs_mask(q, k_perm, cu_seqlens, key_positions, block_size, segment_size, threshold,
                bool(force_first), _scale(q, scale, fn), indices, counts, density, _stream(q))
    return indices, counts, {"density": density}

"""Block-sparse causal prefill attention over packed variable-length batches.

``sparse_prefill`` is the one format every prefill mask builder (FlexPrefill, PBS-Attn) speaks:
per sequence, per head and per query block, an ascending list of key blocks to attend.
``dense_causal_block_lists`` builds the lists of every causal block (dense causal attention in
that format). The exact semantics are in ``docs/prefill.md``; the arguments are validated in the
native layer (``ValueError`` naming the argument, the expected and the actual value).

CPU tensors run the float64 reference; CUDA tensors (builds with the kernels) run one tensor-core
kernel on the current stream, with the limits and rules of ``absparse/prefill_cuda.h``.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from . import _C
from .ops import _attention_out, _cuda_stream, _default_scale, _is_cuda, _tensor

__all__ = ["sparse_prefill", "dense_causal_block_lists"]


def _positive_int(value, fn: str, name: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or not 0 < value < 2 ** 31):
        raise ValueError(f"{fn}: {name}: expected an int in [1, 2^31), got {value!r}")
    return int(value)


def sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   block_indices: torch.Tensor, block_counts: torch.Tensor, q_block: int = 128,
                   k_block: int = 128, key_positions: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
                   return_lse: bool = False, kernel: str = "auto"):
    """Causal attention of every prompt token over the key blocks listed for its query block.

    Sequence b of the packed batch owns rows ``[cu_seqlens[b], cu_seqlens[b + 1])`` of q, k, v
    and out. Its query block i is positions ``[i * q_block, (i + 1) * q_block)``, its key block j
    the stored key rows ``[j * k_block, (j + 1) * k_block)`` (the last ones may be partial). The
    query at position t attends the keys r of its sequence that lie in a block listed for
    ``(b, head, t // q_block)`` and whose original position is ``<= t`` (the position is r, or
    ``key_positions[cu_seqlens[b] + r, kv_head]`` when given). A row that attends nothing gets
    out 0 and lse -inf. With every causal block listed (``dense_causal_block_lists``) this is
    dense causal attention.

    Parameters
    ----------
    q : [T, Hq, D] float16 / bfloat16 / float32, queries of all sequences (packed)
    k, v : [T, Hk, D], same dtype; Hq a multiple of Hk (G = Hq / Hk query heads per KV head)
    cu_seqlens : int32 [B + 1], ``0 = cu[0] <= cu[1] <= ... <= cu[B] = T`` (empty sequences allowed)
    block_indices : int32 [B, H, Nq, M], ``H`` = Hq (a list per query head) or Hk (one list per KV
        head, shared by its G query heads), ``Nq >= ceil(max_len / q_block)``. Row ``(b, h, i)``
        holds ``block_counts[b, h, i]`` key blocks of sequence b in ``[0, ceil(L_b / k_block))``,
        strictly ascending; later entries (padding) and rows of query blocks past the end of a
        sequence are not read.
    block_counts : int32 [B, H, Nq], each in ``[0, M]``
    q_block, k_block : block sizes in tokens (any positive int on the CPU; 64 and 128 are tested)
    key_positions : optional int32 [T, Hk]: the original position in its sequence of each stored
        key (and value) row, when keys were permuted within a sequence (PBS-Attn); per sequence
        and KV head a permutation of ``0 .. L_b - 1``. It drives the causal test only: blocks are
        still stored rows.
    scale : logit scale, default ``1 / sqrt(D)``
    out : optional [T, Hq, D] output in q's dtype (written and returned)
    return_lse : also return lse float32 [T, Hq], ``ln sum exp(scale * q . k)`` over the
        attended keys (-inf for a row that attends nothing)
    kernel : which CUDA kernel runs (a hook for tests and benchmarks; CPU tensors take only
        ``"auto"``): ``"auto"`` (default) the Hopper warpgroup-MMA/TMA kernel when this build has it
        (``absparse._C.has_sm90_prefill``) and it runs the arguments (q_block 128, k_block 128 or
        256, strides its TMA descriptors accept), else the mma.sync kernel; ``"fa2"`` the mma.sync
        kernel; ``"sm90"`` the Hopper kernel, ``ValueError`` naming the argument it cannot run

    Non-contiguous tensors are accepted, except that q, k, v and out need a contiguous last
    dimension. The CPU reference accumulates in float64 and rounds once to the output dtype.
    CUDA tensors (float16 / bfloat16, D 64 or 128, q_block 64 or 128, k_block a multiple of 64 up
    to 256, 16-byte aligned rows) run on the current stream: float32 accumulation with the
    softmax weights rounded to the input dtype for P.V (as FlashAttention does); values in device
    memory (cu_seqlens, lists, counts, key_positions) are not validated there but clamped or
    skipped (``docs/prefill.md``).

    Returns
    -------
    out [T, Hq, D], or ``(out, lse)`` with ``return_lse=True``

    Example
    -------
    Two sequences (100 and 200 tokens); every causal block gives SDPA's causal attention:

    >>> cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    >>> q = torch.randn(300, 4, 64); k = torch.randn(300, 2, 64); v = torch.randn_like(k)
    >>> idx, cnt = dense_causal_block_lists(cu, 64, 64, num_heads=2)   # one list per KV head
    >>> idx.shape, cnt[1, 0].tolist()                                  # [B, Hk, Nq, M]
    (torch.Size([2, 2, 4, 4]), [1, 2, 3, 4])
    >>> out = sparse_prefill(q, k, v, cu, idx, cnt, q_block=64, k_block=64)
    >>> s = slice(100, 300)                                            # the second sequence
    >>> ref = torch.nn.functional.scaled_dot_product_attention(
    ...     q[s].transpose(0, 1), k[s].transpose(0, 1).repeat_interleave(2, 0),
    ...     v[s].transpose(0, 1).repeat_interleave(2, 0), is_causal=True).transpose(0, 1)
    >>> torch.allclose(out[s], ref, atol=1e-5)
    True

    A sparse pattern: each query block attends the first key block and its own diagonal block;
    a query of the last block then keeps a share ``exp(lse - lse_dense)`` of its softmax mass:

    >>> idx[:, :, 2:, :2] = torch.tensor([0, 2], dtype=torch.int32)[None, None, None]
    >>> idx[:, :, 3, 1] = 3
    >>> cnt[:, :, 2:] = 2
    >>> _, lse = sparse_prefill(q, k, v, cu, idx, cnt, q_block=64, k_block=64, return_lse=True)
    >>> _, lse_dense = sparse_prefill(q, k, v, cu, *dense_causal_block_lists(cu, 64, 64, 2),
    ...                               q_block=64, k_block=64, return_lse=True)
    >>> bool((lse <= lse_dense + 1e-6).all()), bool((lse[:100] == lse_dense[:100]).all())
    (True, True)
    """
    fn = "sparse_prefill"
    _tensor(q, fn, "q")
    q_block = _positive_int(q_block, fn, "q_block")
    k_block = _positive_int(k_block, fn, "k_block")
    scale = _default_scale(q, scale, fn)
    if not isinstance(kernel, str):
        raise ValueError(f"{fn}: kernel: expected 'auto', 'fa2' or 'sm90', got {kernel!r}")
    out, lse = _attention_out(q, out, return_lse)  # [T, Hq, D] and [T, Hq], as for decode
    stream = _cuda_stream(q) if _is_cuda(q) else 0
    _C.sparse_prefill(q, k, v, cu_seqlens, block_indices, block_counts, q_block, k_block,
                      key_positions, scale, out, lse, stream, kernel)
    return (out, lse) if return_lse else out


def dense_causal_block_lists(cu_seqlens: torch.Tensor, q_block: int, k_block: int,
                             num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block lists of dense causal attention, in ``sparse_prefill``'s format.

    Query block i of sequence b (length L) lists key blocks ``0 .. (min((i + 1) * q_block, L) - 1)
    // k_block``: every block holding a key at or before the block's last query. Keys in stored
    order (no ``key_positions``); the lists are the same for every head.

    Parameters
    ----------
    cu_seqlens : int32 [B + 1], as for ``sparse_prefill`` (read on the host: a CUDA tensor is
        copied, which synchronizes)
    q_block, k_block : block sizes in tokens
    num_heads : H of the lists (Hq or Hk)

    Returns
    -------
    block_indices : int32 [B, H, Nq, M] with ``Nq = ceil(max_len / q_block)`` and ``M =
        ceil(max_len / k_block)``, padded with -1, on cu_seqlens' device
    block_counts : int32 [B, H, Nq] (0 for query blocks past the end of a sequence)

    Example
    -------
    >>> idx, cnt = dense_causal_block_lists(torch.tensor([0, 200], dtype=torch.int32), 128, 64, 1)
    >>> cnt.tolist(), idx[0, 0].tolist()
    ([[[2, 4]]], [[0, 1, -1, -1], [0, 1, 2, 3]])
    """
    fn = "dense_causal_block_lists"
    cu_seqlens = _tensor(cu_seqlens, fn, "cu_seqlens")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{fn}: cu_seqlens: expected an int32 tensor [B + 1], got "
                         f"{cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}")
    q_block = _positive_int(q_block, fn, "q_block")
    k_block = _positive_int(k_block, fn, "k_block")
    num_heads = _positive_int(num_heads, fn, "num_heads")
    cu = cu_seqlens.to("cpu", torch.int64)                            # [B + 1]
    lens = cu[1:] - cu[:-1]                                           # [B]
    if int(cu[0]) != 0 or bool((lens < 0).any()):
        raise ValueError(f"{fn}: cu_seqlens: expected non-decreasing offsets from 0, got "
                         f"{cu.tolist()}")
    max_len = int(lens.max()) if lens.numel() else 0
    nq, m = -(-max_len // q_block), -(-max_len // k_block)
    first = torch.arange(nq) * q_block                                # [Nq] first query position
    last = torch.minimum(first + q_block, lens[:, None]) - 1          # [B, Nq] last position
    counts = torch.where(first < lens[:, None], last // k_block + 1, 0)   # [B, Nq]
    j = torch.arange(m)                                               # [M]
    indices = torch.where(j < counts[..., None], j, -1)               # [B, Nq, M]
    shape = (lens.numel(), num_heads)
    indices = indices[:, None].expand(*shape, nq, m)                  # [B, H, Nq, M]
    counts = counts[:, None].expand(*shape, nq)                       # [B, H, Nq]
    return (indices.to(cu_seqlens.device, torch.int32).contiguous(),
            counts.to(cu_seqlens.device, torch.int32).contiguous())

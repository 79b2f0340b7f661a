"""Calibration of AB-Sparse's per-head block sizes.

``head_recall`` measures, for one calibration sample, how much attention mass the decode pipeline
keeps for every KV head and every candidate block size; ``allocate_block_sizes`` picks one block
size per head (all layers together) to maximise the total recall within the summary budget of a
uniform layout; ``layout_from_allocation`` turns the result into a :class:`ModelLayout` and
``describe_layout`` prints it. The C++ core is ``cpp/include/absparse/calibration.h``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from . import _C
from .layout import LayerLayout, ModelLayout

__all__ = ["head_recall", "allocate_block_sizes", "uniform_block_sizes", "layout_from_allocation",
           "describe_layout"]

DEFAULT_CANDIDATES = (8, 16, 32, 64)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _candidates(candidates, fn: str) -> list:
    if isinstance(candidates, torch.Tensor):
        candidates = candidates.tolist()
    try:
        values = list(candidates)
    except TypeError:
        raise ValueError(f"{fn}: candidates: expected a sequence of block sizes, got "
                         f"{candidates!r}") from None
    for i, c in enumerate(values):
        if not _is_int(c) or c < 1 or c > 2**30 or c & (c - 1):
            raise ValueError(f"{fn}: candidates[{i}]: expected a power of two in [1, 2^30], "
                             f"got {c!r}")
    return [int(c) for c in values]


def _budget(token_budget, fn: str):
    """(token count, fraction): an int is a token count, a float in (0, 1) a fraction of L."""
    if isinstance(token_budget, bool) or not isinstance(token_budget, numbers.Real):
        raise ValueError(f"{fn}: token_budget: expected an int token count or a float in (0, 1), "
                         f"got {token_budget!r}")
    if isinstance(token_budget, numbers.Integral):
        if token_budget < 0:
            raise ValueError(f"{fn}: token_budget: expected a token count >= 0, got {token_budget}")
        return int(token_budget), 0.0
    if not 0.0 < token_budget < 1.0:
        raise ValueError(f"{fn}: token_budget: a float budget is a fraction of the context and "
                         f"must lie in (0, 1) (pass an int for a token count), got "
                         f"{token_budget!r}")
    return 0, float(token_budget)


def _non_negative_int(value, name: str, fn: str) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{fn}: {name}: expected an int >= 0, got {value!r}")
    return int(value)


def head_recall(q: torch.Tensor, k: torch.Tensor, positions, token_budget: Union[int, float],
                candidates: Sequence[int] = DEFAULT_CANDIDATES, sink_tokens: int = 16,
                local_tokens: int = 64, summary: str = "minmax", group_reduce: str = "max",
                scale: Optional[float] = None) -> torch.Tensor:
    """Attention recall of every KV head for every candidate block size (one sample).

    Probe ``n`` is a decode-like query at position ``positions[n]``: it attends keys
    ``[0, L)``, ``L = positions[n] + 1``. For KV head ``h`` and block size ``bs`` the attended set
    ``A`` is exactly what ``update_centroids`` -> ``select_blocks`` -> ``sparse_decode`` would
    attend with that block size (sink and local blocks, the top-k candidate blocks by the group
    score of unquantized float32 summaries, ties to the lower block index, and the partial tail),
    and the recall is the exact softmax mass of ``A``, averaged over probes and the ``G`` query
    heads of the group. An ``A`` that covers ``[0, L)`` (e.g. a budget ``>= L``) gives exactly 1.

    Parameters
    ----------
    q : [N, Hq, D] float32 / float16 / bfloat16
        Probe queries (post-RoPE), ``Hq`` a multiple of ``Hk``; finite.
    k : [T, Hk, D], dtype of q
        Keys of the sample in token order (post-RoPE, not paged); finite.
    positions : int32 [N] tensor (or a sequence of ints)
        ``0 <= positions[n] < T``.
    token_budget : int tokens, or float in (0, 1) = ``ceil(fraction * L)`` tokens per probe
    candidates : sequence of distinct powers of two, default ``(8, 16, 32, 64)``
    sink_tokens, local_tokens : as in ``select_blocks`` (default 16 and 64)
    summary : {"mean", "minmax", "cuboid"}
    group_reduce : {"max", "softmax_sum"}
    scale : logit scale, default ``1/sqrt(D)``

    Returns
    -------
    recall : float64 [Hk, C], ``recall[h, c]`` for block size ``candidates[c]``

    Example
    -------
    >>> g = torch.Generator().manual_seed(0)
    >>> k = torch.randn(512, 2, 64, generator=g)
    >>> q = torch.randn(4, 4, 64, generator=g)
    >>> positions = torch.tensor([255, 300, 450, 511], dtype=torch.int32)
    >>> r = head_recall(q, k, positions, token_budget=128, candidates=[8, 32])
    >>> r.shape, r.dtype
    (torch.Size([2, 2]), torch.float64)
    >>> r.round(decimals=3).tolist()   # random keys: about the attended share of the tokens
    [[0.385, 0.331], [0.372, 0.335]]
    >>> head_recall(q, k, positions, token_budget=512, candidates=[8, 32]).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    fn = "head_recall"
    budget_tokens, budget_fraction = _budget(token_budget, fn)
    cand = _candidates(candidates, fn)
    sink_tokens = _non_negative_int(sink_tokens, "sink_tokens", fn)
    local_tokens = _non_negative_int(local_tokens, "local_tokens", fn)
    if summary not in ("mean", "minmax", "cuboid"):
        raise ValueError(f"{fn}: summary: expected 'mean', 'minmax' or 'cuboid', got {summary!r}")
    if group_reduce not in ("max", "softmax_sum"):
        raise ValueError(f"{fn}: group_reduce: expected 'max' or 'softmax_sum', got "
                         f"{group_reduce!r}")
    if isinstance(positions, (list, tuple, range)):
        positions = torch.tensor(list(positions), dtype=torch.int32)
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"{fn}: q: expected a torch.Tensor, got {type(q).__name__}")
    if not isinstance(k, torch.Tensor):
        raise ValueError(f"{fn}: k: expected a torch.Tensor, got {type(k).__name__}")
    if scale is None:
        if q.dim() != 3 or q.shape[-1] <= 0:
            raise ValueError(f"{fn}: q: expected 3 dimensions [N, Hq, D] with D > 0, got shape "
                             f"{list(q.shape)}")
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"{fn}: scale: expected a finite float, got {scale!r}")
    flat = _C.head_recall(q, k, positions, cand, budget_tokens, budget_fraction, sink_tokens,
                          local_tokens, summary, group_reduce, float(scale))
    return torch.tensor(flat, dtype=torch.float64).view(k.shape[1], len(cand))  # [Hk, C]


def allocate_block_sizes(recall, candidates: Sequence[int], avg_block_size: int,
                         constraint: str = "count") -> torch.Tensor:
    """One block size per head maximising the total recall within a summary budget (exact).

    Solves ``max sum_n recall[n, c_n]`` over one candidate ``c_n`` per head subject to

    * ``"count"`` (summary-memory parity): ``sum_n 1 / size_n <= N / avg_block_size``, i.e. no
      more block summaries than the uniform layout ``avg_block_size`` everywhere;
    * ``"mean"`` (arithmetic mean): ``sum_n size_n >= N * avg_block_size``.

    Exact dynamic program over integer costs (``max_size / size`` for "count", with capacity
    ``floor(N * max_size / avg_block_size)``; ``size / min_size`` for "mean", with requirement
    ``ceil(N * avg_block_size / min_size)``). Recall values are summed exactly on a fixed
    ``2^-40`` grid (``round(v * 2^40)``), so objectives that agree to ~1e-12 are ties. Tie rule,
    in order: (1) fewest summaries (smallest ``sum_n max_size / size_n``); (2) larger blocks first
    in head order (the lexicographically largest size vector). Cost ``O(N * S * C)`` with
    ``S <= N * max_size / min_size`` states.

    Parameters
    ----------
    recall : float [N, C] (tensor, array or nested sequence)
        One row per KV head of every layer (e.g. ``torch.cat`` of ``head_recall`` results),
        finite; ``N`` may be 0.
    candidates : C distinct powers of two, the block size of each column
    avg_block_size : int > 0
        Budget as an average block size; above the largest candidate it is infeasible
        (``ValueError``), below the smallest the constraint does not bind.
    constraint : {"count", "mean"}

    Returns
    -------
    block_sizes : int32 [N]

    Example
    -------
    >>> recall = torch.tensor([[0.99, 0.98, 0.97, 0.96],    # two insensitive heads
    ...                        [0.99, 0.98, 0.97, 0.96],
    ...                        [0.99, 0.95, 0.70, 0.50]])   # a sensitive head
    >>> allocate_block_sizes(recall, [8, 16, 32, 64], 32).tolist()   # 1/64+1/64+1/16 <= 3/32
    [64, 64, 16]
    >>> allocate_block_sizes(recall, [8, 16, 32, 64], 32, constraint="mean").tolist()
    [64, 32, 8]
    """
    fn = "allocate_block_sizes"
    cand = _candidates(candidates, fn)
    if not _is_int(avg_block_size):
        if isinstance(avg_block_size, float) and avg_block_size.is_integer():
            avg_block_size = int(avg_block_size)
        else:
            raise ValueError(f"{fn}: avg_block_size: expected a positive int, got "
                             f"{avg_block_size!r}")
    if constraint not in ("count", "mean"):
        raise ValueError(f"{fn}: constraint: expected 'count' or 'mean', got {constraint!r}")
    try:
        values = torch.as_tensor(recall).detach().to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{fn}: recall: expected a float tensor [N, C], got "
                         f"{type(recall).__name__} ({e})") from None
    if values.dim() != 2:
        raise ValueError(f"{fn}: recall: expected 2 dimensions [N, C], got {values.dim()} with "
                         f"shape {list(values.shape)}")
    sizes = _C.allocate_block_sizes(values.contiguous().numpy(), cand, int(avg_block_size),
                                    constraint)
    return torch.tensor(sizes, dtype=torch.int32)


def uniform_block_sizes(num_heads: int, size: int) -> torch.Tensor:
    """The uniform baseline: ``size`` for every one of ``num_heads`` heads (int32 [num_heads]).

    Example
    -------
    >>> uniform_block_sizes(3, 32).tolist()
    [32, 32, 32]
    """
    if not _is_int(num_heads) or num_heads < 0:
        raise ValueError(f"uniform_block_sizes: num_heads: expected an int >= 0, got {num_heads!r}")
    if not _is_int(size) or size < 1 or size > 2**30 or size & (size - 1):
        raise ValueError(f"uniform_block_sizes: size: expected a power of two in [1, 2^30], got "
                         f"{size!r}")
    return torch.full((int(num_heads),), int(size), dtype=torch.int32)


def _layer_channels(value, name: str, num_layers: int, layer: int):
    """The [Hk, D] channel parameter of one layer: shared [Hk, D], per layer [L, Hk, D], or a
    per-layer sequence."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() == 2:
            return value
        if value.dim() == 3 and value.shape[0] == num_layers:
            return value[layer]
        raise ValueError(f"layout_from_allocation: {name}: expected [Hk, D] (all layers) or "
                         f"[num_layers={num_layers}, Hk, D], got shape {list(value.shape)}")
    if len(value) != num_layers:
        raise ValueError(f"layout_from_allocation: {name}: expected one entry per layer "
                         f"({num_layers}), got {len(value)}")
    return value[layer]


def layout_from_allocation(sizes, num_layers: int, page_size: int, summary: str = "minmax",
                           format: str = "int8", dense_layers: Sequence[int] = (),
                           channel_scale=None, channel_zero=None,
                           meta: Optional[dict] = None) -> ModelLayout:
    """Turn a flat allocation (all KV heads of all layers) into a :class:`ModelLayout`.

    Parameters
    ----------
    sizes : int [num_layers * Hk] (layer-major, as ``allocate_block_sizes`` returns for rows
        ordered layer by layer) or [num_layers, Hk]; rows of dense layers are ignored
    num_layers : int >= 1
    page_size : int, a power of two that every block size divides
    summary, format : as in :class:`LayerLayout`
    dense_layers : layer indices kept dense (``None`` in the model layout)
    channel_scale, channel_zero : per-channel parameters for "int8c"/"int4c": [Hk, D] shared by
        every layer, [num_layers, Hk, D], or a sequence with one entry per layer
    meta : metadata stored with the layout

    Returns
    -------
    ModelLayout

    Example
    -------
    >>> m = layout_from_allocation(torch.tensor([16, 64, 32, 32], dtype=torch.int32),
    ...                            num_layers=2, page_size=64, dense_layers=[0])
    >>> m[0] is None, m[1].block_sizes.tolist()
    (True, [32, 32])
    """
    fn = "layout_from_allocation"
    if not _is_int(num_layers) or num_layers < 1:
        raise ValueError(f"{fn}: num_layers: expected an int >= 1, got {num_layers!r}")
    t = torch.as_tensor(sizes)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{fn}: sizes: expected integer block sizes, got dtype {t.dtype}")
    if t.dim() == 1:
        if t.numel() == 0 or t.numel() % num_layers:
            raise ValueError(f"{fn}: sizes: expected num_layers * Hk = {num_layers} * Hk entries "
                             f"(Hk >= 1), got {t.numel()}")
        t = t.view(num_layers, -1)
    elif t.dim() != 2 or t.shape[0] != num_layers or t.shape[1] == 0:
        raise ValueError(f"{fn}: sizes: expected [num_layers * Hk] or [num_layers={num_layers}, "
                         f"Hk >= 1], got shape {list(t.shape)}")
    dense = set()
    for i in dense_layers:
        if not _is_int(i) or not 0 <= i < num_layers:
            raise ValueError(f"{fn}: dense_layers: expected layer indices in [0, {num_layers}), "
                             f"got {i!r}")
        dense.add(int(i))
    layers = []
    for layer in range(num_layers):
        if layer in dense:
            layers.append(None)
            continue
        scale = _layer_channels(channel_scale, "channel_scale", num_layers, layer)
        zero = _layer_channels(channel_zero, "channel_zero", num_layers, layer)
        layers.append(LayerLayout(t[layer].tolist(), page_size, summary, format, scale, zero))
    return ModelLayout(layers, meta)


def describe_layout(model_layout: ModelLayout) -> str:
    """A per-layer text table: block sizes per KV head and block summaries per 1K tokens.

    "summaries / 1K" counts ``sum_h 1024 / bs_h`` summaries of a layer (each holds R vectors);
    the last line totals the sparse layers and gives the equivalent uniform block size (the
    harmonic mean ``N * 1024 / total``).

    Example
    -------
    >>> m = ModelLayout([None, LayerLayout([16, 64], 64), LayerLayout([32, 32], 64)])
    >>> print(describe_layout(m))
    layer  block sizes  summaries / 1K
        0  dense                     -
        1  16 64                    80
        2  32 32                    64
    total  4 heads                 144  (uniform equivalent: 28.4)
    """
    if not isinstance(model_layout, ModelLayout):
        raise ValueError(f"describe_layout: model_layout: expected an absparse.ModelLayout, got "
                         f"{type(model_layout).__name__}")
    rows = []
    total, heads = 0.0, 0
    for i, layer in enumerate(model_layout.layers):
        if layer is None:
            rows.append((str(i), "dense", "-"))
            continue
        sizes = layer.block_sizes.tolist()
        per_1k = sum(1024 / b for b in sizes)
        total += per_1k
        heads += len(sizes)
        rows.append((str(i), " ".join(str(b) for b in sizes), f"{per_1k:g}"))
    width = max([len("block sizes")] + [len(r[1]) for r in rows]) + 2
    lines = [f"layer  {'block sizes':<{width}}summaries / 1K"]
    lines += [f"{a:>5}  {b:<{width}}{c:>14}" for a, b, c in rows]
    if heads:
        lines.append(f"{'total':>5}  {f'{heads} heads':<{width}}{total:>14g}  "
                     f"(uniform equivalent: {heads * 1024 / total:.1f})")
    return "\n".join(lines)

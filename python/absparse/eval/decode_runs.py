"""The decode runs of one batch of prefilled samples, decoded together over one copy of the prefill.

:func:`absparse.eval.evaluation.evaluate` decodes every batch of prefilled samples once per run
(dense, every method x budget, every window plan). The runs attend differently, but all start from
the same prefilled keys and values. Stacking a private copy of them per run
(``AbsparseCache.stack``) copied the batch's K/V pools and recomputed every block summary once per
run, and each run's forward passes carried only the batch's rows (10 by default), so the model's
per-pass cost was paid once per run and step.

Here (:class:`BatchPool`) the runs of a batch share one pool per layer, made once a batch::

    pool [pages, P, Hk, D] = | prefix: every page of every sample's prefill                 |
                             | run 0 of a pass: private copies of its rows' partial last     |
                             |   pages, then the free pages its rows can open in ``steps``   |
                             | run 1 of the pass: ...                                        |

and are decoded in *passes* of several runs. In a pass, each run of a layer is an
:class:`absparse.hf.PagedLayer` over that pool, in the state ``PagedLayer.stack`` leaves a stacked
copy in: its own page table (the shared prefix pages, then its private copy of the partial last
page, which its appends write into), lengths, selection statistics and window plan. It hands out
pages only from its own region, so runs never write the same page. Block summaries are shared in
the same way: one summary cache per distinct layer layout, its prefix pages computed once a batch
(every complete block of every prefill, as ``stack`` computes them), each run adding the blocks of
its private pages. A forward pass carries the rows of every run of the pass, run-major (row
``r * B + j`` = run ``r``, sample ``j``): the model's layers see one batch, and each layer's
attention (:class:`RunsLayer`) hands every run its own rows.

So the ops see the tensors of the per-run path (the same keys, summaries and block lists, at other
page numbers), and a run whose rows are all done is frozen (:meth:`RunsCache.freeze`: its rows
still pass through the model, but append, select and attend nothing and count no statistics), as
the per-run loop stopped there. Rows are independent in every op; ``tests/test_decode_runs.py``
checks every step's attention output and the statistics against one stacked cache per run, and
the evaluation's records against the per-run loop on the embedded model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..hf import AbsparseCache, DecodeConfig, PagedLayer, _marked
from ..layout import LayerLayout, ModelLayout
from ..ops import update_centroids

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # pragma: no cover - absparse.hf above already needs transformers
    raise ImportError("absparse.eval.decode_runs needs transformers") from e

__all__ = ["Run", "RunsLayer", "RunsCache", "BatchPool"]


@dataclass(frozen=True)
class Run:
    """One decode run: ``layout`` None with ``budget`` None is dense; ``plan`` (a
    ``absparse.moa.MoAPlan``) serves static windows on a dense layout (``budget`` then only names
    the run's budget); ``compare_format`` keeps a second summary cache in that format and counts
    the selected blocks that differ from it."""
    name: str
    budget: Union[int, float, None] = None
    layout: Optional[ModelLayout] = None
    plan: object = None
    compare_format: Optional[str] = None


class RunsLayer(CacheLayerMixin):
    """One model layer of a :class:`RunsCache`: ``runs[r]`` holds rows ``[r * B, (r + 1) * B)``.

    Only single-token decode steps are supported (the prefill is in the runs' pages already).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, runs: Sequence[PagedLayer], rows_per_run: int):
        super().__init__()
        self.runs = list(runs)
        self.rows = rows_per_run
        self.frozen = [False] * len(self.runs)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        raise NotImplementedError("RunsLayer: the runs' pages are set up by BatchPool")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append one token per row ``[R * B, Hk, 1, D]`` to every run that is not frozen."""
        if key_states.shape[2] != 1 or key_states.shape[0] != self.rows * len(self.runs):
            raise ValueError(f"RunsLayer.update: expected one token for each of "
                             f"{self.rows * len(self.runs)} rows, got shape "
                             f"{list(key_states.shape)}")
        for r, run in enumerate(self.runs):
            if not self.frozen[r]:
                rows = slice(r * self.rows, (r + 1) * self.rows)
                run.update(key_states[rows], value_states[rows])
        return _marked(key_states, self), value_states

    def attend(self, q: torch.Tensor, scaling: Optional[float]) -> torch.Tensor:
        """q ``[R * B, Hq, D]`` -> ``[R * B, Hq, D]``; a frozen run's rows get zeros (nobody reads
        them)."""
        out = torch.zeros_like(q)
        for r, run in enumerate(self.runs):
            if not self.frozen[r]:
                rows = slice(r * self.rows, (r + 1) * self.rows)
                out[rows] = run.attend(q[rows], scaling)
        return out

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return max(run.get_seq_length() for run in self.runs)

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("RunsCache does not support beam search")


class RunsCache(Cache):
    """A transformers ``Cache`` of :class:`RunsLayer` s for ``runs``; ``caches[r]`` is run ``r``
    as an :class:`~absparse.hf.AbsparseCache` over its :class:`~absparse.hf.PagedLayer` s
    (statistics, window plans)."""

    def __init__(self, layers: Sequence[RunsLayer], runs: Sequence[Run],
                 caches: Sequence[AbsparseCache]):
        super().__init__(layers=list(layers))
        self.runs = list(runs)
        self.caches = list(caches)

    @property
    def seq_lens(self) -> List[int]:
        """Length of every row, run-major."""
        return [n for c in self.caches for n in c.seq_lens]

    def freeze(self, run: int) -> None:
        """Run ``run`` is over: its rows stop appending, selecting and attending."""
        for layer in self.layers:
            layer.frozen[run] = True


def _budget(run: Run):
    """The token budget the run's layers select with (a window plan selects nothing)."""
    return None if run.plan is not None else run.budget


def _pages(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def _region(lens: Sequence[int], steps: int, page_size: int) -> Tuple[int, int]:
    """(partial last pages, whole region) of one run, in pages: a private copy of every row's
    partial last page (its appends write into it) plus the new pages ``steps`` appends can open.

    Example: P = 64, lengths [100, 128], 8 steps: row 0 copies its page 1 (tokens 64..99) and ends
    at 108 tokens, inside it; row 1 has no partial page and opens page 2 -> (1, 2)."""
    partial = sum(1 for n in lens if n % page_size)
    fresh = sum(_pages(n + steps, page_size) - _pages(n, page_size) for n in lens)
    return partial, partial + fresh


def _key(layout: LayerLayout) -> tuple:
    """A hashable identity of a layer layout: equal keys, equal summaries of equal keys."""
    channels = tuple(None if t is None else t.numpy().tobytes()
                     for t in (layout.channel_scale, layout.channel_zero))
    return (tuple(layout.block_sizes.tolist()), layout.page_size, layout.summary,
            layout.format) + channels


def _layer_layouts(run: Run, i: int) -> List[LayerLayout]:
    """The layouts whose summaries run ``run`` keeps in layer ``i``: its own, then the compare
    format's (``PagedLayer.compare_layout``, made by the same rule)."""
    lay = run.layout[i] if run.layout is not None else None
    if lay is None:
        return []
    out = [lay]
    if run.compare_format is not None and run.compare_format != lay.format:
        out.append(LayerLayout(lay.block_sizes, lay.page_size, lay.summary, run.compare_format))
    return out


class BatchPool:
    """The prefill of one batch (``bases``: one prefilled cache per sample, as
    ``evaluation._prefill`` makes them) in one pool per layer, decoded by ``runs`` in passes of
    ``runs_per_pass`` runs with room for ``steps`` decode steps per row (see the module
    docstring).

    Summaries are shared as well: the runs of a pass whose layer layouts are equal (the uniform
    methods at every budget, the fp32 comparison summaries of int8c and int4c) use one summary
    cache, whose prefix pages are computed once a batch; a run computes only its private pages.
    """

    def __init__(self, bases: Sequence[AbsparseCache], runs: Sequence[Run], steps: int,
                 runs_per_pass: int, sink_tokens: int = 16, local_tokens: int = 64,
                 group_reduce: str = "max"):
        if not bases or not runs:
            raise ValueError("BatchPool: expected at least one base cache and one run")
        self.page_size = page_size = bases[0].page_size
        for run in runs:
            for lay in (run.layout.layers if run.layout is not None else ()):
                if lay is not None and lay.page_size != page_size:
                    raise ValueError(f"BatchPool: run {run.name}: layout page_size "
                                     f"{lay.page_size}, expected the prefill's {page_size}")
        self.runs = list(runs)
        self.per_pass = max(1, runs_per_pass)
        self.settings = (sink_tokens, local_tokens, group_reduce)
        self.num_layers = len(bases[0].layers)
        self.lens = [n for b in bases for n in b.seq_lens]
        self.partial, self.region = _region(self.lens, steps, page_size)
        # Runs still to come per (layer, layout key): a shared summary cache is dropped after its
        # last user's pass.
        self.users: Dict[Tuple[int, tuple], int] = {}
        for run in self.runs:
            for i in range(self.num_layers):
                for lay in _layer_layouts(run, i):
                    self.users[(i, _key(lay))] = self.users.get((i, _key(lay)), 0) + 1
        self.summaries: Dict[Tuple[int, tuple], tuple] = {}
        self.pools, self.tables = [], []
        for i in range(self.num_layers):
            parts = [b.layers[i] for b in bases]
            self.prefix = sum(p._num_used for p in parts)
            first = parts[0]
            pages = self.prefix + min(self.per_pass, len(self.runs)) * self.region
            k_pool = first.k_pool.new_empty((pages,) + tuple(first.k_pool.shape[1:]))
            v_pool = torch.empty_like(k_pool)
            # The samples' pages one after the other; their page tables shifted to match.
            tables, offset = [], 0
            for p in parts:
                k_pool[offset:offset + p._num_used] = p.k_pool[:p._num_used]
                v_pool[offset:offset + p._num_used] = p.v_pool[:p._num_used]
                tables.append(torch.where(p.page_table >= 0, p.page_table + offset,
                                          p.page_table))
                offset += p._num_used
            width = max(t.shape[1] for t in tables)
            self.pools.append((k_pool, v_pool))
            self.tables.append(torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]),
                                                                  value=-1)
                                          for t in tables]))                     # [B, width]

    def passes(self) -> Iterator[RunsCache]:
        """The :class:`RunsCache` of every pass, in run order; a pass's cache is valid until the
        next one is made (they reuse the pool's private pages)."""
        for c in range(0, len(self.runs), self.per_pass):
            yield self._cache(self.runs[c:c + self.per_pass])

    def _cache(self, runs: Sequence[Run]) -> RunsCache:
        from ..moa import attach

        sink, local, reduce = self.settings
        B, P = len(self.lens), self.page_size
        layers, per_run = [], [[] for _ in runs]
        for i in range(self.num_layers):
            k_pool, v_pool = self.pools[i]
            lens = torch.tensor(self.lens, dtype=torch.int32, device=k_pool.device)   # [B]
            page_start = (lens // P) * P                 # [B] first token of the partial page
            shared = self.tables[i].tolist()             # [B][width] prefix pages
            group = []
            for r, run in enumerate(runs):
                start = self.prefix + r * self.region
                own = [list(row) for row in shared]
                page = start
                for j, n in enumerate(self.lens):
                    if n % P:
                        k_pool[page] = k_pool[own[j][n // P]]
                        v_pool[page] = v_pool[own[j][n // P]]
                        own[j][n // P] = page
                        page += 1
                table = torch.tensor(own, dtype=torch.int32, device=k_pool.device)
                layout = run.layout[i] if run.layout is not None else None
                out = PagedLayer(layout, DecodeConfig(_budget(run), sink, local, reduce), P, i,
                                 run.compare_format)
                out.dtype, out.device = k_pool.dtype, k_pool.device
                out.k_pool, out.v_pool = k_pool, v_pool
                out.keys, out.values = k_pool, v_pool
                out.page_table = table
                out._lens = list(self.lens)
                out.seq_lens = lens
                out._num_used = start + self.partial             # its free pages come next
                out.is_initialized = True
                for lay, attr in ((out.layout, ""), (out.compare_layout, "cmp_")):
                    if lay is None:
                        continue
                    summaries, scales = self._summaries(i, lay)
                    setattr(out, attr + "summaries", summaries)
                    setattr(out, attr + "scales", scales)
                    # The blocks of its private copies of the partial pages.
                    update_centroids(k_pool, table, out.seq_lens, page_start, lay, summaries,
                                     scales)
                group.append(out)
                per_run[r].append(out)
            layers.append(RunsLayer(group, B))
        for run in runs:
            for i in range(self.num_layers):
                for lay in _layer_layouts(run, i):
                    self.users[(i, _key(lay))] -= 1
        self.summaries = {k: v for k, v in self.summaries.items() if self.users[k] > 0}
        caches = []
        for run, run_layers in zip(runs, per_run):
            cache = AbsparseCache(self.num_layers, run.layout, _budget(run), sink, local, reduce,
                                  P, run.compare_format, _layers=run_layers)
            if run.plan is not None:
                attach(cache, run.plan)
            caches.append(cache)
        return RunsCache(layers, runs, caches)

    def _summaries(self, i: int, layout: LayerLayout) -> tuple:
        """The summary cache of ``layout`` in layer ``i`` (over the whole pool), its prefix pages
        computed: every complete block of every sample's prefill."""
        key = (i, _key(layout))
        if key not in self.summaries:
            k_pool = self.pools[i][0]
            summaries, scales = layout.new_summary_cache(k_pool.shape[0], k_pool.shape[-1],
                                                         k_pool.device)
            lens = torch.tensor(self.lens, dtype=torch.int32, device=k_pool.device)
            update_centroids(k_pool, self.tables[i], lens, torch.zeros_like(lens), layout,
                             summaries, scales)
            self.summaries[key] = (summaries, scales)
        return self.summaries[key]

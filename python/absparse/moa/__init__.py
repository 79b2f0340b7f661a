"""MoA (Mixture of Attention Spans) on absparse: per-KV-head elastic windows ``S(L) = a + b L``.

- :mod:`.plan`: the (alpha, beta) grid, the exact multiple-choice knapsack (``solve_spans``),
  :class:`MoAPlan` (saved with the model layout) and :func:`moa_plan`;
- :mod:`.profile`: block-pooled gradient influence (or the attention-mass proxy) of a model;
- :mod:`.serve`: device-side block lists for ``sparse_decode`` and the hf cache hook.

See ``docs/moa.md``.
"""
from .plan import BLOCK, SINK_TOKENS, MoAPlan, moa_plan, outside_influence, solve_spans, span_grid
from .serve import LayerWindows, attach, band_prefill_blocks, max_window_blocks, window_blocks

__all__ = ["BLOCK", "SINK_TOKENS", "MoAPlan", "moa_plan", "outside_influence", "solve_spans",
           "span_grid", "LayerWindows", "attach", "band_prefill_blocks", "max_window_blocks",
           "window_blocks"]

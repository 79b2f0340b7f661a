"""absparse: adaptive block-sparse attention for long-context LLM decoding.

The decode pipeline (``docs/decode.md``): ``update_centroids`` -> ``select_blocks`` ->
``sparse_decode``; ``dense_decode`` is the full-attention baseline. ``LayerLayout`` / ``ModelLayout``
describe per-head block sizes and summary storage. Prefill (``docs/prefill.md``): ``sparse_prefill``,
block-sparse causal attention over packed variable-length batches. ``moa_plan`` / ``MoAPlan``: MoA's
per-head elastic windows (``absparse.moa``, ``docs/moa.md``).
"""
from pathlib import Path as _Path

from . import _C
from . import torch_ops  # registers the absparse:: custom ops
from .allocation import (allocate_block_sizes, describe_layout, head_recall,
                          layout_from_allocation, uniform_block_sizes)
from .layout import LayerLayout, ModelLayout
from .model_ops import rms_norm, rope_append, silu_mul
from .moa import MoAPlan, moa_plan
from .ops import (default_max_blocks, dense_decode, dequantize, quantize, select_blocks,
                  sparse_decode, update_centroids)
from .prefill import dense_causal_block_lists, sparse_prefill
from .prefill_masks import (block_pool, coverage_select, flexprefill_mask, js_distance,
                            last_block_attention, pbs_mask, pbs_permute, pooled_block_scores,
                            vertical_slash_sums)

__version__ = _C.__version__

#: Prefix for CMake's ``find_package(absparse)``: ``-DCMAKE_PREFIX_PATH=<absparse.cmake_prefix_path>``.
#: The CMake package is installed beside the extension (right for editable installs too).
cmake_prefix_path = str(_Path(_C.__file__).resolve().parent)

__all__ = ["LayerLayout", "ModelLayout", "update_centroids", "select_blocks", "sparse_decode",
           "dense_decode", "quantize", "dequantize", "default_max_blocks", "cmake_prefix_path",
           "head_recall", "allocate_block_sizes", "uniform_block_sizes", "layout_from_allocation",
           "describe_layout", "sparse_prefill", "dense_causal_block_lists", "flexprefill_mask",
           "pbs_permute", "pbs_mask", "last_block_attention", "vertical_slash_sums", "block_pool",
           "pooled_block_scores", "js_distance", "coverage_select", "MoAPlan", "moa_plan",
           "rms_norm", "silu_mul", "rope_append"]

"""absparse: adaptive block-sparse attention for long-context LLM decoding.

The decode pipeline (``docs/decode.md``): ``update_centroids`` -> ``select_blocks`` ->
``sparse_decode``; ``dense_decode`` is the full-attention baseline. ``LayerLayout`` / ``ModelLayout``
describe per-head block sizes and summary storage. ``moa_plan`` / ``MoAPlan``: MoA's per-head
elastic windows (``absparse.moa``, ``docs/moa.md``).
"""
from pathlib import Path as _Path

from . import _C
from .allocation import (allocate_block_sizes, describe_layout, head_recall,
                          layout_from_allocation, uniform_block_sizes)
from .layout import LayerLayout, ModelLayout
from .moa import MoAPlan, moa_plan
from .ops import (default_max_blocks, dense_decode, dequantize, quantize, select_blocks,
                  sparse_decode, update_centroids)

__version__ = _C.__version__

#: Prefix for CMake's ``find_package(absparse)``: ``-DCMAKE_PREFIX_PATH=<absparse.cmake_prefix_path>``.
#: The CMake package is installed beside the extension (right for editable installs too).
cmake_prefix_path = str(_Path(_C.__file__).resolve().parent)

__all__ = ["LayerLayout", "ModelLayout", "update_centroids", "select_blocks", "sparse_decode",
           "dense_decode", "quantize", "dequantize", "default_max_blocks", "cmake_prefix_path",
           "head_recall", "allocate_block_sizes", "uniform_block_sizes", "layout_from_allocation",
           "describe_layout", "MoAPlan", "moa_plan"]

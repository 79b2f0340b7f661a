"""Head layouts: per-KV-head block sizes, page size and summary storage, per layer and per model."""
from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from . import _C

__all__ = ["LayerLayout", "ModelLayout"]

_SUMMARY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "int8": torch.int8, "uint8": torch.uint8}


def _int32(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            -2 ** 31 <= value < 2 ** 31):
        raise ValueError(f"LayerLayout: {name}: expected an int32 integer, got {value!r}")
    return int(value)


def _channel_tensor(value, name: str, num_kv_heads: int) -> Optional[torch.Tensor]:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32).contiguous()
    if t.dim() != 2 or t.shape[0] != num_kv_heads:
        raise ValueError(f"LayerLayout: {name}: expected a float32 tensor [Hk={num_kv_heads}, D], "
                         f"got shape {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"LayerLayout: {name}: expected finite values, got non-finite entries")
    if name == "channel_scale" and not (t > 0).all():
        raise ValueError(f"LayerLayout: {name}: expected every scale > 0, got min {t.min().item()}")
    return t


class LayerLayout:
    """The layout of one attention layer.

    Parameters
    ----------
    block_sizes : sequence of int, length Hk
        Block size of every KV head: a power of two that divides ``page_size``.
    page_size : int
        Tokens per KV page (a power of two).
    summary : {"mean", "minmax", "cuboid"}
        Block summary kind (mean of keys; Quest's per-channel max/min; ArkVale's cuboid).
    format : {"fp32", "fp16", "bf16", "int8", "int4", "int8c", "int4c"}
        Storage format of the summaries.
    channel_scale, channel_zero : float32 [Hk, D], optional
        Per-channel quantization parameters; required by "int8c" / "int4c" (scale > 0).

    Example
    -------
    >>> layout = LayerLayout([16, 64], page_size=64, summary="minmax", format="int8")
    >>> layout.slots_per_page, layout.slot_offsets.tolist()
    (5, [0, 4])
    """

    def __init__(self, block_sizes: Union[Sequence[int], torch.Tensor], page_size: int,
                 summary: str = "minmax", format: str = "int8", channel_scale=None,
                 channel_zero=None):
        if isinstance(block_sizes, torch.Tensor):
            block_sizes = block_sizes.tolist()
        sizes = [_int32(b, f"block_sizes[{i}]") for i, b in enumerate(block_sizes)]
        self._native = _C.LayerLayout(sizes, _int32(page_size, "page_size"), str(summary),
                                      str(format))
        self.block_sizes = torch.tensor(sizes, dtype=torch.int32)
        self.min_block_size = min(sizes)
        self.slot_offsets = torch.tensor(self._native.slot_offsets, dtype=torch.int32)
        self.channel_scale = _channel_tensor(channel_scale, "channel_scale", len(sizes))
        self.channel_zero = _channel_tensor(channel_zero, "channel_zero", len(sizes))
        if (self.channel_scale is None) != (self.channel_zero is None):
            raise ValueError("LayerLayout: channel_scale and channel_zero: expected both or neither")
        if self.channel_scale is not None and self.channel_scale.shape != self.channel_zero.shape:
            raise ValueError(f"LayerLayout: channel_zero: expected the shape of channel_scale "
                             f"{list(self.channel_scale.shape)}, got {list(self.channel_zero.shape)}")
        if self.format in ("int8c", "int4c") and self.channel_scale is None:
            raise ValueError(f"LayerLayout: channel_scale: format '{self.format}' needs per-channel "
                             "channel_scale and channel_zero [Hk, D], got None")
        self._device_channels = {}
        # The layout as plain Python values (the custom ops' arguments, read by torch.compile).
        self._fields = (tuple(sizes), self.page_size, self.summary, self.format)

    page_size = property(lambda self: self._native.page_size)
    summary = property(lambda self: self._native.summary)
    format = property(lambda self: self._native.format)
    num_kv_heads = property(lambda self: self._native.num_kv_heads)
    slots_per_page = property(lambda self: self._native.slots_per_page)
    summary_vectors = property(lambda self: self._native.summary_vectors)

    def channel_params(self, device) -> tuple:
        """(channel_scale, channel_zero) on ``device`` (cached), or (None, None)."""
        if self.channel_scale is None:
            return None, None
        device = torch.device(device)
        if device.type == "cpu":
            return self.channel_scale, self.channel_zero
        if device not in self._device_channels:
            self._device_channels[device] = (self.channel_scale.to(device),
                                             self.channel_zero.to(device))
        return self._device_channels[device]

    def new_summary_cache(self, num_pages: int, head_dim: int, device="cpu"):
        """Allocate a zeroed summary cache.

        Returns ``(summaries, scales)``: summaries ``[num_pages, slots_per_page, R, W]`` in the
        format's dtype (W = D, or D/2 for the 4-bit formats) and, for "int8"/"int4", scales
        float32 ``[num_pages, slots_per_page, R]`` (``None`` for every other format).
        """
        width = self._native.summary_width(int(head_dim))
        if self.channel_scale is not None and self.channel_scale.shape[1] != head_dim:
            raise ValueError(f"new_summary_cache: head_dim: expected the D of channel_scale "
                             f"({self.channel_scale.shape[1]}), got {head_dim}")
        shape = (int(num_pages), self.slots_per_page, self.summary_vectors)
        summaries = torch.zeros(shape + (width,), dtype=_SUMMARY_DTYPES[self._native.summary_dtype],
                                device=device)
        scales = None
        if self.format in ("int8", "int4"):
            scales = torch.zeros(shape, dtype=torch.float32, device=device)
        return summaries, scales

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"block_sizes": self.block_sizes.tolist(), "page_size": self.page_size,
                             "summary": self.summary, "format": self.format}
        if self.channel_scale is not None:
            d["channel_scale"] = self.channel_scale.tolist()
            d["channel_zero"] = self.channel_zero.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerLayout":
        return cls(d["block_sizes"], d["page_size"], d.get("summary", "minmax"),
                   d.get("format", "int8"), d.get("channel_scale"), d.get("channel_zero"))

    def __eq__(self, other) -> bool:
        if not isinstance(other, LayerLayout):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (f"LayerLayout(block_sizes={self.block_sizes.tolist()}, page_size={self.page_size}, "
                f"summary={self.summary!r}, format={self.format!r})")


class ModelLayout:
    """One :class:`LayerLayout` per layer (``None`` = a dense layer) plus metadata.

    Saved as JSON; float32 channel parameters round-trip exactly (float32 -> float64 is exact and
    JSON keeps float64 exactly).

    Example
    -------
    >>> m = ModelLayout([None, LayerLayout([16, 32], 64)], meta={"model": "demo"})
    >>> m.save("layout.json"); ModelLayout.load("layout.json") == m
    True
    """

    VERSION = 1

    def __init__(self, layers: Iterable[Optional[LayerLayout]], meta: Optional[dict] = None):
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            if layer is not None and not isinstance(layer, LayerLayout):
                raise ValueError(f"ModelLayout: layers[{i}]: expected a LayerLayout or None, "
                                 f"got {type(layer).__name__}")
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Optional[LayerLayout]:
        return self.layers[i]

    def to_dict(self) -> dict:
        return {"version": self.VERSION, "meta": self.meta,
                "layers": [None if l is None else l.to_dict() for l in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelLayout":
        if d.get("version") != cls.VERSION:
            raise ValueError(f"ModelLayout: version: expected {cls.VERSION}, got {d.get('version')}")
        return cls([None if l is None else LayerLayout.from_dict(l) for l in d["layers"]],
                   d.get("meta", {}))

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ModelLayout":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __eq__(self, other) -> bool:
        if not isinstance(other, ModelLayout):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        dense = sum(l is None for l in self.layers)
        return f"ModelLayout({len(self.layers)} layers, {dense} dense, meta={self.meta})"

"""AB-Sparse calibration on a real model: per-head block sizes and per-channel summary ranges.

1. Capture: each calibration sample runs once densely through the model with a capture attention
   implementation that records the post-RoPE keys ``[T, Hk, D]`` of every layer and the queries
   ``[N, Hq, D]`` at ``N`` probe positions (decode-like: the last tokens and a spread over the
   second half of the sample).
2. Recall: ``absparse.head_recall`` per layer, per summary kind and per budget, averaged over the
   samples -> ``recall[summary][budget]`` float64 ``[num_layers, Hk, C]``.
3. Summary ranges: the block summaries of every candidate block size,
   their per-channel min and max over all blocks and samples -> ``ranges[summary]``
   ``[num_layers, Hk, C, 2, D]``.
4. Layouts: ``absparse.allocate_block_sizes`` over every KV head of every sparse layer, then
   ``absparse.layout_from_allocation``; int8c/int4c get asymmetric per-channel parameters from the
   ranges of each head's chosen block size: ``zero = min``, ``scale = (max - min) / (2^bits - 1)``
   (a constant channel gets a tiny positive scale).

Calibration text comes from :func:`absparse.eval.tasks.calibration_texts` (chronicle filler and seeds
disjoint from every evaluation sample).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..allocation import (allocate_block_sizes, describe_layout, head_recall,
                          layout_from_allocation, uniform_block_sizes)
from ..layout import ModelLayout

__all__ = ["Calibration", "capture_qk", "capture_qkv", "probe_positions", "calibrate", "budget_key",
           "parse_budget", "SUMMARIES", "FORMAT_BITS"]

SUMMARIES = ("minmax", "cuboid", "mean")
FORMAT_BITS = {"int8c": 8, "int4c": 4}
_CAPTURE = "absparse_capture"
_recorder: Optional[dict] = None


def parse_budget(text: Union[str, int, float]) -> Union[int, float]:
    """"256" -> 256 tokens; "4%" or "0.04" -> 0.04 (a fraction of each sequence's length)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    s = str(text).strip()
    if s.endswith("%"):
        return float(s[:-1]) / 100.0
    return float(s) if "." in s else int(s)


def budget_key(budget: Union[int, float]) -> str:
    return f"{budget * 100:g}%" if isinstance(budget, float) else str(int(budget))


def probe_positions(length: int, num_probes: int) -> torch.Tensor:
    """Half the probes on the last tokens, half spread evenly over [length/2, length)."""
    last = num_probes // 2
    spread = num_probes - last
    pos = set(range(max(0, length - last), length))
    pos |= {int(length // 2 + i * (length - length // 2) / max(1, spread)) for i in range(spread)}
    return torch.tensor(sorted(p for p in pos if 0 <= p < length), dtype=torch.int32)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = _recorder
    if rec is not None:
        probes = rec["positions"].to(query.device, torch.int64)
        # query [1, Hq, T, D] -> [N, Hq, D]; key / value [1, Hk, T, D] -> [T, Hk, D]
        rec["q"][module.layer_idx] = query[0, :, probes].transpose(0, 1).float().cpu().contiguous()
        rec["k"][module.layer_idx] = key[0].transpose(0, 1).float().cpu().contiguous()
        if "v" in rec:
            rec["v"][module.layer_idx] = value[0].transpose(0, 1).float().cpu().contiguous()
        rec["scale"][module.layer_idx] = scaling
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


@contextlib.contextmanager
def _attn_implementation(model, name: str):
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def _capture(model, input_ids: torch.Tensor, positions: torch.Tensor, values: bool) -> dict:
    """One dense forward of ``input_ids [1, T]`` recording, per layer index, the probe queries,
    the keys (and the values) and the attention scale (see capture_qk / capture_qkv)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    global _recorder
    AttentionInterface.register(_CAPTURE, _capture_attention)
    AttentionMaskInterface.register(_CAPTURE, sdpa_mask)
    _recorder = {"positions": positions, "q": {}, "k": {}, "scale": {}}
    if values:
        _recorder["v"] = {}
    try:
        with _attn_implementation(model, _CAPTURE), torch.no_grad():
            model(input_ids=input_ids.to(model.device), use_cache=False, logits_to_keep=1)
        return _recorder
    finally:
        _recorder = None


def capture_qk(model, input_ids: torch.Tensor, positions: torch.Tensor):
    """Run ``input_ids [1, T]`` densely; return per layer ``(q [N, Hq, D], k [T, Hk, D])`` float32
    on the CPU and the attention scale of each layer."""
    rec = _capture(model, input_ids, positions, values=False)
    n = len(rec["k"])
    return [(rec["q"][i], rec["k"][i]) for i in range(n)], [rec["scale"][i] for i in range(n)]


def capture_qkv(model, input_ids: torch.Tensor, positions: torch.Tensor):
    """Run ``input_ids [1, T]`` densely; per layer ``(q [N, Hq, D], k [T, Hk, D], v [T, Hk, D],
    scale)``, float32 on the CPU."""
    rec = _capture(model, input_ids, positions, values=True)
    return [(rec["q"][i], rec["k"][i], rec["v"][i], rec["scale"][i]) for i in range(len(rec["k"]))]


def _summary_ranges(k: torch.Tensor, candidates: Sequence[int], summary: str) -> torch.Tensor:
    """Per-channel (min, max) of the block summaries of ``k [T, Hk, D]`` for every candidate block
    size, over complete blocks -> [Hk, C, 2, D].

    The summaries follow docs/decode.md (minmax: max and min vectors; cuboid: m +- r with
    m = (max + min) / 2 and r = mean |k - m|; mean: the mean key), computed in float64.
    """
    T, hk, d = k.shape
    out = torch.empty(hk, len(candidates), 2, d)
    for c, bs in enumerate(candidates):
        n = T // bs
        if n == 0:
            raise ValueError(f"calibrate: a calibration sample of {T} tokens is shorter than one "
                             f"block of {bs}")
        kb = k[:n * bs].double().view(n, bs, hk, d)                       # [n, bs, Hk, D]
        hi, lo = kb.amax(1), kb.amin(1)                                   # [n, Hk, D]
        if summary == "cuboid":
            m = (hi + lo) / 2
            r = (kb - m[:, None]).abs().mean(1)
            hi, lo = m + r, m - r
        elif summary == "mean":
            hi = lo = kb.mean(1)
        out[:, c, 0] = lo.amin(0).float()
        out[:, c, 1] = hi.amax(0).float()
    return out


@dataclass
class Calibration:
    """Recall tables and summary ranges of one calibration run, and the layouts built from them.

    recall[summary][budget_key] : float64 [num_layers, Hk, C]
    ranges[summary]             : float32 [num_layers, Hk, C, 2, D] (per-channel min, max)
    """
    candidates: List[int]
    budgets: List[Union[int, float]]
    recall: Dict[str, Dict[str, torch.Tensor]]
    ranges: Dict[str, torch.Tensor]
    page_size: int
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return next(iter(self.ranges.values())).shape[0]

    @property
    def num_kv_heads(self) -> int:
        return next(iter(self.ranges.values())).shape[1]

    def nearest_budget(self, budget: Union[int, float], length: int = 4096) -> str:
        """The calibrated budget closest to ``budget`` (as tokens at ``length``)."""
        key = budget_key(budget)
        if key in next(iter(self.recall.values())):
            return key
        tokens = lambda b: b * length if isinstance(b, float) else b
        best = min(self.budgets, key=lambda b: abs(math.log(tokens(b) / max(1, tokens(budget)))))
        return budget_key(best)

    def allocate(self, summary: str, budget: Union[int, float], avg_block_size: int,
                 constraint: str = "mean", dense_layers: Sequence[int] = ()) -> torch.Tensor:
        """Block sizes int32 [num_layers, Hk] (dense layers' rows hold ``avg_block_size``)."""
        rec = self.recall[summary][self.nearest_budget(budget)]
        L, hk, _ = rec.shape
        sparse = [i for i in range(L) if i not in set(dense_layers)]
        sizes = torch.full((L, hk), avg_block_size, dtype=torch.int32)
        if sparse:
            flat = allocate_block_sizes(rec[sparse].reshape(-1, rec.shape[-1]), self.candidates,
                                        avg_block_size, constraint)
            sizes[sparse] = flat.view(len(sparse), hk)
        return sizes

    def channel_params(self, summary: str, sizes: torch.Tensor, format: str):
        """Per-channel (scale, zero) [num_layers, Hk, D] of ``format`` for these block sizes."""
        bits = FORMAT_BITS[format]
        rng = self.ranges[summary]                                   # [L, Hk, C, 2, D]
        col = torch.tensor([[self.candidates.index(int(b)) for b in row] for row in sizes.tolist()])
        pick = rng.gather(2, col[:, :, None, None, None].expand(-1, -1, 1, 2, rng.shape[-1]))
        lo, hi = pick[:, :, 0, 0], pick[:, :, 0, 1]                   # [L, Hk, D]
        scale = (hi - lo) / (2 ** bits - 1)
        # Guard: a constant (or degenerate) channel still needs scale > 0.
        tiny = 1e-6 * torch.clamp(torch.maximum(lo.abs(), hi.abs()), min=1.0)
        scale = torch.where(torch.isfinite(scale) & (scale > tiny), scale, tiny)
        return scale.float().contiguous(), lo.float().contiguous()

    def layout(self, summary: str = "minmax", format: str = "bf16",
               budget: Union[int, float, None] = None, avg_block_size: int = 32,
               constraint: str = "mean", dense_layers: Sequence[int] = (),
               adaptive: bool = True) -> ModelLayout:
        """The ModelLayout of AB-Sparse (``adaptive``) or of the uniform baseline."""
        budget = self.budgets[0] if budget is None else budget
        if adaptive:
            sizes = self.allocate(summary, budget, avg_block_size, constraint, dense_layers)
        else:
            sizes = uniform_block_sizes(self.num_layers * self.num_kv_heads,
                                        avg_block_size).view(self.num_layers, -1)
        scale = zero = None
        if format in FORMAT_BITS:
            scale, zero = self.channel_params(summary, sizes, format)
        meta = dict(self.meta, summary=summary, format=format, adaptive=adaptive,
                    avg_block_size=avg_block_size, constraint=constraint if adaptive else None,
                    dense_layers=list(dense_layers),
                    calibration_budget=self.nearest_budget(budget) if adaptive else None)
        if adaptive:
            rec = self.recall[summary][self.nearest_budget(budget)]
            meta["predicted_recall"] = _mean_recall(rec, sizes, self.candidates, dense_layers)
            meta["uniform_recall"] = _mean_recall(
                rec, torch.full_like(sizes, avg_block_size), self.candidates, dense_layers) \
                if avg_block_size in self.candidates else None
        return layout_from_allocation(sizes, self.num_layers, self.page_size, summary, format,
                                      dense_layers, scale, zero, meta)

    def save(self, path: Union[str, Path]) -> None:
        torch.save({"candidates": self.candidates, "budgets": self.budgets, "recall": self.recall,
                    "ranges": self.ranges, "page_size": self.page_size, "meta": self.meta}, path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Calibration":
        d = torch.load(path, weights_only=True)
        return cls(d["candidates"], d["budgets"], d["recall"], d["ranges"], d["page_size"],
                   d["meta"])

    def report(self, layout: Optional[ModelLayout] = None) -> str:
        """Markdown: mean recall per candidate block size and budget, and the layout table."""
        lines = ["| summary | budget | " + " | ".join(f"bs {c}" for c in self.candidates) + " |",
                 "|---|---|" + "---|" * len(self.candidates)]
        for s, per in self.recall.items():
            for b, rec in per.items():
                means = rec.mean(dim=(0, 1)).tolist()
                lines.append(f"| {s} | {b} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
        text = "Mean attention recall of the calibration probes (all heads):\n\n" + "\n".join(lines)
        if layout is not None:
            text += "\n\n```\n" + describe_layout(layout) + "\n```\n"
        return text


def _mean_recall(rec: torch.Tensor, sizes: torch.Tensor, candidates, dense_layers) -> float:
    rows = [i for i in range(rec.shape[0]) if i not in set(dense_layers)]
    if not rows:
        return 1.0
    col = torch.tensor([[candidates.index(int(b)) for b in sizes[i].tolist()] for i in rows])
    return float(rec[rows].gather(2, col[..., None]).mean())


def calibrate(model, tokenizer, num_samples: int = 8, length: int = 2048,
              budgets: Sequence[Union[int, float]] = (256,),
              candidates: Sequence[int] = (8, 16, 32, 64), summaries: Sequence[str] = SUMMARIES,
              num_probes: int = 32, sink_tokens: int = 16, local_tokens: int = 64,
              group_reduce: str = "max", page_size: int = 64, seed: int = 0,
              progress=None, workers: Optional[int] = 1) -> Calibration:
    """Calibrate on ``num_samples`` generated texts of ``length`` tokens (see module docstring).

    ``progress`` is an optional tqdm-like object updated once per sample. ``workers``: processes
    the samples are spread over (:func:`absparse.eval.workers.resolve_workers`; None: one per CPU
    core); the result does not depend on it (the samples' tables are combined in sample order).
    """
    from .tasks import calibration_texts
    from .workers import map_items, resolve_workers

    candidates = sorted(int(c) for c in candidates)
    if page_size % max(candidates):
        raise ValueError(f"calibrate: page_size: expected a multiple of the largest candidate "
                         f"{max(candidates)}, got {page_size}")
    count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)
    samples = calibration_texts(count, num_samples, length, seed)

    def tables(sample, tick):
        """One sample -> ({summary: ranges [L, Hk, C, 2, D]}, {summary: {budget key: recall
        [L, Hk, C]}})."""
        ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False).input_ids
        ids = ids[:, :length]
        positions = probe_positions(ids.shape[1], num_probes)
        layers, scales = capture_qk(model, ids, positions)
        ranges = {s: torch.stack([_summary_ranges(k, candidates, s) for _, k in layers])
                  for s in summaries}
        recall = {s: {budget_key(b): torch.stack([
            head_recall(q, k, positions, b, candidates, sink_tokens, local_tokens, s,
                        group_reduce, sc) for (q, k), sc in zip(layers, scales)])
            for b in budgets} for s in summaries}
        if tick is not None:
            tick.advance("samples", 1)
        return ranges, recall

    class _Tick:  # map_items reports advance(kind, n); the bar counts samples
        def advance(self, kind, n):
            progress.update(n)

    recall: Dict[str, Dict[str, torch.Tensor]] = {s: {} for s in summaries}
    ranges: Dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    workers = resolve_workers(workers, len(samples), model.device)
    for per_ranges, per_recall in map_items(tables, samples, workers,
                                            None if progress is None else _Tick()):
        for s in summaries:
            per_layer = per_ranges[s]
            if s in ranges:
                ranges[s][:, :, :, 0] = torch.minimum(ranges[s][:, :, :, 0], per_layer[:, :, :, 0])
                ranges[s][:, :, :, 1] = torch.maximum(ranges[s][:, :, :, 1], per_layer[:, :, :, 1])
            else:
                ranges[s] = per_layer
            for key, r in per_recall[s].items():
                recall[s][key] = recall[s].get(key, 0) + r / len(samples)
    meta = {"calibration_samples": num_samples, "calibration_length": length,
            "calibration_seed": seed, "probes": num_probes, "sink_tokens": sink_tokens,
            "local_tokens": local_tokens, "group_reduce": group_reduce,
            "calibration_seconds": round(time.perf_counter() - t0, 1)}
    return Calibration(candidates, list(budgets), recall, ranges, page_size, meta)

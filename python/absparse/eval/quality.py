"""Selection quality measured directly: attention recall, output error and format agreement.

Task accuracy moves in steps of one sample; this study measures what the selection does to every
attention step instead. For each document the model runs once densely while a capture attention
implementation records, per layer, the post-RoPE keys and values ``[T, Hk, D]`` and the queries
``[N, Hq, D]`` at ``N`` probe positions (decode-like: probe ``n`` at position ``p_n`` attends keys
``[0, p_n]``). Then, per layer, budget and method, the shipped ops run on those tensors with the
``N`` probes as the batch of one call (every batch row points at the same pages, with its own
``seq_lens = p_n + 1``):

    update_centroids (the document's keys, once per layout) -> select_blocks -> sparse_decode

and the result is compared with dense attention:

- **recall**: the share of the dense softmax mass (float64, per query head) that falls on the
  tokens ``sparse_decode`` attends (selected blocks + the partial tail);
- **l2**: ``||sparse_decode - dense_decode|| / ||dense_decode||`` per query head;
- **jaccard**: ``|A ∩ B| / |A ∪ B|`` of the attended token sets of a quantized method (int8c /
  int4c) and the bf16 method with the same block sizes, per KV head.

Every measure is averaged over the probes and heads of a document (per layer), so a document is
one cluster: intervals are bootstrapped over documents (:mod:`absparse.eval.stats`), since the
probes of one document are correlated.

Documents are generated locally (nothing is downloaded): the evaluation fillers ``essay`` and
``noise`` (fresh seeds), ``prose`` (English docstrings of Python's standard library) and ``code``
(its source files). None of them shares text or seeds with the calibration (``chronicle``).
"""
from __future__ import annotations

import inspect
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ..layout import LayerLayout
from ..ops import dense_decode, select_blocks, sparse_decode, update_centroids
from .model_calibration import budget_key, capture_qkv, parse_budget
from .stats import bootstrap_ci, paired_bootstrap

__all__ = ["DOC_KINDS", "QUALITY_METHODS", "quality_documents", "quality_probe_positions",
           "capture_qkv", "layer_quality", "quality_pairs", "QualityResult", "measure_quality",
           "write_quality_report", "plot_recall"]

DOC_KINDS = ("essay", "noise", "prose", "code")
QUALITY_METHODS = ("quest", "quest-int8c", "quest-int4c", "ab-quest", "ab-quest-int8c",
                   "ab-quest-int4c", "ab-quest-int8c-mem", "ab-quest-int4c-mem",
                   "arkvale", "ab-arkvale", "ab-arkvale-int8c", "ab-arkvale-int4c",
                   "mean", "ab-mean", "ab-mean-int8c", "ab-mean-int4c")
QUALITY_SEED_BASE = 3_000_000         # disjoint from EVAL_SEED_BASE and CALIB_SEED_BASE streams
METRICS = ("recall", "l2", "jaccard")

# Standard-library modules whose docstrings / source make the "prose" / "code" documents.
_STDLIB = ("argparse", "asyncio.events", "calendar", "collections", "concurrent.futures._base",
           "contextlib", "csv", "dataclasses", "decimal", "difflib", "email.message", "enum",
           "fractions", "functools", "gettext", "heapq", "http.client", "inspect", "json.decoder",
           "logging", "mailbox", "os", "pathlib", "pickle", "pydoc", "random", "shutil",
           "smtplib", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
           "tokenize", "unittest.case", "urllib.parse", "uuid", "zipfile")


# --- documents -----------------------------------------------------------------------------------
def _stdlib_texts(kind: str) -> List[str]:
    import importlib

    out = []
    for name in _STDLIB:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if kind == "code":
            try:
                out.append(inspect.getsource(mod))
            except (OSError, TypeError):
                continue
        else:
            docs = [inspect.getdoc(mod) or ""]
            for _, obj in sorted(vars(mod).items()):
                if (inspect.isclass(obj) or inspect.isfunction(obj)) and \
                        getattr(obj, "__module__", None) == mod.__name__:
                    docs.append(inspect.getdoc(obj) or "")
            out.append("\n\n".join(d for d in docs if len(d) > 80))
    return [t for t in out if t]


def quality_documents(tokenizer, kinds: Sequence[str], per_kind: int, length: int,
                      seed: int = 0) -> List[dict]:
    """``per_kind`` documents of each kind, each exactly ``length`` tokens:
    ``[{"kind", "seed", "ids": int64 [1, length]}]``. A document is a pure function of
    (kind, seed, index, length) and the tokenizer (prose / code: and the Python version)."""
    from .tasks import essay_sentences, noise_sentences

    docs = []
    for kind in kinds:
        if kind not in DOC_KINDS:
            raise ValueError(f"quality_documents: kinds: expected kinds from {DOC_KINDS}, got "
                             f"{kind!r}")
        pool = _stdlib_texts(kind) if kind in ("prose", "code") else None
        for i in range(per_kind):
            rng = random.Random(QUALITY_SEED_BASE + 1000 * seed + 97 * i + DOC_KINDS.index(kind))
            ids: List[int] = []
            while len(ids) < length:
                if pool is None:
                    gen = essay_sentences if kind == "essay" else noise_sentences
                    text = " ".join(gen(rng, 64))
                else:
                    text = pool[rng.randrange(len(pool))]
                ids += tokenizer(text + "\n\n", add_special_tokens=False).input_ids
            docs.append({"kind": kind, "seed": i, "ids": torch.tensor([ids[:length]])})
    return docs


def quality_probe_positions(length: int, num_probes: int, start: float = 0.25) -> torch.Tensor:
    """``num_probes`` distinct decode positions spread evenly over ``[start * length, length)``,
    always including the last token. int32 [N]."""
    lo = int(start * length)
    pos = torch.linspace(length - 1, lo, num_probes).round().to(torch.int64).flip(0)
    return torch.unique(pos).to(torch.int32)


# --- one layer -----------------------------------------------------------------------------------
def _paged(x: torch.Tensor, page_size: int) -> torch.Tensor:
    """``[T, Hk, D]`` -> pages ``[ceil(T / P), P, Hk, D]`` (zero padded)."""
    T, hk, d = x.shape
    pages = -(-T // page_size)
    out = x.new_zeros(pages * page_size, hk, d)
    out[:T] = x
    return out.view(pages, page_size, hk, d)


def _attended(idx: torch.Tensor, cnt: torch.Tensor, sizes: torch.Tensor, lens: torch.Tensor,
              T: int) -> torch.Tensor:
    """Token mask bool [N, Hk, T] of what ``sparse_decode`` attends: the listed blocks of each
    (probe, KV head) plus the partial tail ``[(L // bs) * bs, L)``."""
    n, hk, _ = idx.shape
    t = torch.arange(T)
    out = torch.zeros(n, hk, T, dtype=torch.bool)
    L = lens.to(torch.int64)[:, None]                                    # [N, 1]
    for h in range(hk):
        bs = int(sizes[h])
        nb = -(-T // bs)
        mark = torch.zeros(n, nb + 1, dtype=torch.bool)                  # slot nb absorbs -1
        col = idx[:, h].to(torch.int64)
        col = torch.where((col >= 0) & (torch.arange(col.shape[1]) < cnt[:, h, None]), col, nb)
        mark.scatter_(1, col, True)
        listed = mark[:, :nb].repeat_interleave(bs, 1)[:, :T]            # [N, T]
        tail = (t[None] >= (L // bs) * bs) & (t[None] < L)
        out[:, h] = listed | tail
    return out


def _dense_probs(q: torch.Tensor, k: torch.Tensor, lens: torch.Tensor, scale: float):
    """Softmax weights float64 [N, Hq, T] of probe ``n`` over keys ``[0, lens[n])``."""
    T, hk, _ = k.shape
    group = q.shape[1] // hk
    kk = k.double().repeat_interleave(group, 1)                          # [T, Hq, D]
    logits = torch.einsum("nhd,thd->nht", q.double(), kk) * scale        # [N, Hq, T]
    logits.masked_fill_(torch.arange(T)[None, None] >= lens[:, None, None].to(torch.int64),
                        -math.inf)
    return torch.softmax(logits, -1)


def layer_quality(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  layouts: Dict[str, LayerLayout], budget: Union[int, float],
                  pairs: Optional[Dict[str, str]] = None, sink_tokens: int = 16,
                  local_tokens: int = 64,
                  group_reduce: str = "max", scale: Optional[float] = None,
                  dense=None) -> Dict[str, Dict[str, torch.Tensor]]:
    """Selection quality of every layout on one layer of one document.

    Parameters
    ----------
    q : float32 [N, Hq, D], probe queries; k, v : float32 [T, Hk, D] (post-RoPE keys)
    positions : int32 [N], probe ``n`` attends keys ``[0, positions[n]]``
    layouts : name -> LayerLayout (all with one page size)
    budget : token budget of ``select_blocks`` (int tokens or a fraction in (0, 1))
    pairs : name -> reference name: the Jaccard of their attended token sets is reported under
        ``name`` (both layouts need the same block sizes)
    dense : optional ``(probs [N, Hq, T] float64, out [N, Hq, D])`` from an earlier call with the
        same q/k/v/positions (returned under ``"_dense"``), to skip recomputing them

    Returns
    -------
    name -> {"recall": float64 [N, Hq], "l2": float64 [N, Hq], "jaccard": float64 [N, Hk] (names
    in ``pairs`` only)}, plus ``"_dense"``.
    """
    if not layouts:
        raise ValueError("layer_quality: layouts: expected at least one layout, got none")
    P = next(iter(layouts.values())).page_size
    T, hk, d = k.shape
    n = q.shape[0]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kp, vp = _paged(k, P), _paged(v, P)                                  # [pages, P, Hk, D]
    pages = kp.shape[0]
    table = torch.arange(pages, dtype=torch.int32)[None].expand(n, pages).contiguous()
    lens = (positions.to(torch.int64) + 1).to(torch.int32)               # [N]
    if dense is None:
        probs = _dense_probs(q, k, lens, scale)
        out_dense = dense_decode(q, kp, vp, table, lens, scale=scale)   # [N, Hq, D]
    else:
        probs, out_dense = dense
    norm = out_dense.double().norm(dim=-1).clamp_min(1e-30)              # [N, Hq]
    one = torch.ones(1, dtype=torch.int32)
    group = q.shape[1] // hk
    results: Dict[str, Dict[str, torch.Tensor]] = {"_dense": (probs, out_dense)}
    masks = {}
    for name, lay in layouts.items():
        summaries, scales = lay.new_summary_cache(pages, d)
        update_centroids(kp, table[:1], torch.tensor([T], dtype=torch.int32), 0 * one, lay,
                         summaries, scales)
        idx, cnt = select_blocks(q, summaries, scales, table, lens, lay, budget,
                                 sink_tokens=sink_tokens, local_tokens=local_tokens,
                                 group_reduce=group_reduce, scale=scale)
        out = sparse_decode(q, kp, vp, table, lens, lay, idx, cnt, scale=scale)
        mask = _attended(idx, cnt, lay.block_sizes, lens, T)             # [N, Hk, T]
        masks[name] = mask
        qmask = mask.repeat_interleave(group, 1)                         # [N, Hq, T]
        recall = (probs * qmask).sum(-1)
        l2 = (out.double() - out_dense.double()).norm(dim=-1) / norm
        results[name] = {"recall": recall, "l2": l2}
    for name, ref in (pairs or {}).items():
        if name in masks and ref in masks:
            a, b = masks[name], masks[ref]
            results[name]["jaccard"] = ((a & b).sum(-1).double() /
                                        (a | b).sum(-1).clamp_min(1).double())
    return results


# --- the study -----------------------------------------------------------------------------------
@dataclass
class QualityResult:
    """Per-document, per-layer means of every measure.

    values[method][budget_key][metric] : float64 [num_docs, num_layers] (NaN where a layer is
    dense in that method's layout, or a metric does not apply)
    """
    methods: List[str]
    budgets: List[Union[int, float]]
    docs: List[dict]
    values: Dict[str, Dict[str, Dict[str, torch.Tensor]]]
    pairs: Dict[str, Dict[str, str]]
    meta: Dict[str, object] = field(default_factory=dict)

    def doc_means(self, method: str, budget: str, metric: str,
                  layer: Optional[int] = None) -> torch.Tensor:
        """One value per document: the mean over (sparse) layers, or one layer's value."""
        x = self.values[method][budget][metric]
        return x[:, layer] if layer is not None else x.nanmean(1)

    def ci(self, method: str, budget: str, metric: str = "recall",
           layer: Optional[int] = None) -> dict:
        return bootstrap_ci(self.doc_means(method, budget, metric, layer))

    def diff(self, method: str, reference: str, budget: str, metric: str = "recall") -> dict:
        return paired_bootstrap(self.doc_means(method, budget, metric),
                                self.doc_means(reference, budget, metric))

    @classmethod
    def from_json(cls, d: dict) -> "QualityResult":
        """Inverse of :meth:`to_json` (documents without their token ids)."""

        values = {m: {b: {k: torch.tensor(v, dtype=torch.float64) for k, v in per.items()}
                      for b, per in by_b.items()} for m, by_b in d["values"].items()}
        budgets = [parse_budget(b) for b in d["budgets"]]
        return cls(d["methods"], budgets, d["docs"], values, d["pairs"], d["meta"])

    def to_json(self) -> dict:
        return {"methods": self.methods, "budgets": [str(b) for b in self.budgets],
                "docs": [{"kind": d["kind"], "seed": d["seed"]} for d in self.docs],
                "pairs": self.pairs, "meta": self.meta,
                "values": {m: {b: {k: v.tolist() for k, v in per.items()}
                               for b, per in by_b.items()} for m, by_b in self.values.items()}}


def quality_pairs(methods: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """The comparisons of the study, ``{kind: {method: reference}}``:

    - ``format``: int8c / int4c summaries vs bf16 of the same allocation (same block sizes);
    - ``adaptive``: bf16 AB-Sparse vs its uniform base (same average block size);
    - ``memory``: ``-mem`` AB-Sparse vs the bf16 uniform base (same summary memory).
    """
    from .evaluation import parse_method

    out: Dict[str, Dict[str, str]] = {"format": {}, "adaptive": {}, "memory": {}}
    present = set(methods)
    for m in methods:
        s = parse_method(m)
        if s.dense_first:
            continue
        if s.format in ("int8c", "int4c") and not s.memory_matched:
            ref = m.replace("-" + s.format, "")
            if ref in present:
                out["format"][m] = ref
        if s.adaptive and s.format == "bf16" and s.base in present:
            out["adaptive"][m] = s.base
        if s.memory_matched and s.base in present:
            out["memory"][m] = s.base
    return out


def measure_quality(model, tokenizer, calibration, docs: Sequence[dict], budgets: Sequence,
                    methods: Sequence[str] = QUALITY_METHODS, num_probes: int = 64,
                    avg_block_size: int = 32, sink_tokens: int = 16, local_tokens: int = 64,
                    group_reduce: str = "max", progress: Optional[Callable[[int], None]] = None,
                    workers: Optional[int] = 1) -> QualityResult:
    """Run the study (see the module docstring). Layouts are built exactly as ``absparse eval``
    builds them (:meth:`MethodSpec.layout` on ``calibration``); ``progress(1)`` after each
    document. ``workers``: processes the documents are spread over
    (:func:`absparse.eval.workers.resolve_workers`; None: one per CPU core); the values do not
    depend on it."""
    from .evaluation import parse_method
    from .workers import map_items, resolve_workers

    specs = [parse_method(m) for m in methods]
    pairs = quality_pairs(methods)
    jac_pairs = pairs["format"]
    layouts = {(s.name, budget_key(b)): s.layout(calibration, b, avg_block_size)
               for b in budgets for s in specs}
    num_layers = calibration.num_layers
    bkeys = [budget_key(b) for b in budgets]

    def document(doc, tick):
        """One document -> ({(method, budget key, metric, layer): mean}, probes)."""
        T = doc["ids"].shape[1]
        positions = quality_probe_positions(T, num_probes)
        out = {}
        layers = capture_qkv(model, doc["ids"], positions)
        for li, (q, k, v, sc) in enumerate(layers):
            dense = None
            for b, bk in zip(budgets, bkeys):
                lays = {m: layouts[(m, bk)][li] for m in methods
                        if layouts[(m, bk)][li] is not None}
                if not lays:
                    continue
                res = layer_quality(q, k, v, positions, lays, b, jac_pairs, sink_tokens,
                                    local_tokens, group_reduce, sc, dense)
                dense = res.pop("_dense")
                for m, r in res.items():
                    for metric, x in r.items():
                        out[(m, bk, metric, li)] = float(x.mean())
        if tick is not None:
            tick.advance("documents", 1)
        return out, positions.numel()

    class _Tick:  # map_items reports advance(kind, n); the caller counts documents
        def advance(self, kind, n):
            progress(n)

    nan = lambda: torch.full((len(docs), num_layers), math.nan, dtype=torch.float64)
    values = {m: {b: {k: nan() for k in METRICS} for b in bkeys} for m in methods}
    t0 = time.perf_counter()
    probes_total = 0
    workers = resolve_workers(workers, len(docs), model.device)
    for di, (out, probes) in enumerate(map_items(document, docs, workers,
                                                 None if progress is None else _Tick())):
        probes_total += probes
        for (m, bk, metric, li), x in out.items():
            values[m][bk][metric][di, li] = x
    meta = {"seconds": round(time.perf_counter() - t0, 1), "num_docs": len(docs),
            "probes_per_doc": num_probes, "probes_total": probes_total, "workers": workers,
            "doc_length": int(docs[0]["ids"].shape[1]) if docs else 0,
            "avg_block_size": avg_block_size, "sink_tokens": sink_tokens,
            "local_tokens": local_tokens, "group_reduce": group_reduce,
            "page_size": calibration.page_size, "num_layers": num_layers}
    return QualityResult(list(methods), list(budgets), list(docs), values, pairs, meta)


# --- report --------------------------------------------------------------------------------------
def _ci_text(c: dict, pct: bool = True, signed: bool = False) -> str:
    f = 100.0 if pct else 1.0
    sign = "+" if signed else ""
    return f"{c.get('mean', c.get('delta')) * f:{sign}.2f} [{c['lo'] * f:{sign}.2f}, " \
           f"{c['hi'] * f:{sign}.2f}]"


def write_quality_report(result: QualityResult, path: Union[str, Path], header: str = "") -> str:
    """Markdown: recall / l2 / Jaccard per method and budget with 95 % intervals, the paired
    differences, and recall per layer; also writes ``quality.json`` next to ``path``."""

    bk = [budget_key(b) for b in result.budgets]
    m = result.meta
    lines = [header] if header else []
    lines += [f"Documents: {m['num_docs']} x {m['doc_length']} tokens "
              f"({', '.join(sorted({d['kind'] for d in result.docs}))}), {m['probes_per_doc']} "
              f"probes each ({m['probes_total']} probes per layer and KV head in all), "
              f"{m['num_layers']} layers. Values in %; [95 % interval]: percentile bootstrap over "
              f"documents of the per-document mean (probes within a document are correlated, so "
              f"documents are resampled).", ""]
    for metric, title in (("recall", "Attention recall (% of the dense softmax mass attended)"),
                          ("l2", "Relative L2 error of the attention output vs dense (%)")):
        lines += [f"## {title}", "", "| method | " + " | ".join(f"budget {b}" for b in bk) + " |",
                  "|---|" + "---|" * len(bk)]
        for meth in result.methods:
            lines.append(f"| {meth} | " + " | ".join(_ci_text(result.ci(meth, b, metric))
                                                     for b in bk) + " |")
        lines.append("")
    titles = {"format": "quantized - bf16 summaries (same block sizes)",
              "adaptive": "AB-Sparse bf16 - uniform base (same average block size)",
              "memory": "AB-Sparse -mem - uniform bf16 base (same summary memory)"}
    lines += ["## Paired differences of attention recall (points of %, 95 % interval)", "",
              "| comparison | kind | " + " | ".join(f"budget {b}" for b in bk) + " |",
              "|---|---|" + "---|" * len(bk)]
    for kind, per in result.pairs.items():
        for meth, ref in per.items():
            lines.append(f"| {meth} - {ref} | {titles[kind]} | " +
                         " | ".join(_ci_text(result.diff(meth, ref, b), signed=True)
                                    for b in bk) + " |")
    if result.pairs["format"]:
        lines += ["", "## Selection agreement: Jaccard of attended token sets vs bf16 (%)", "",
                  "| method | " + " | ".join(f"budget {b}" for b in bk) + " |",
                  "|---|" + "---|" * len(bk)]
        for meth in result.pairs["format"]:
            lines.append(f"| {meth} | " + " | ".join(_ci_text(result.ci(meth, b, "jaccard"))
                                                     for b in bk) + " |")
    lines += ["", f"## Attention recall per layer at budget {bk[0]} (%)", "",
              "| layer | " + " | ".join(result.methods) + " |",
              "|---|" + "---|" * len(result.methods)]
    for li in range(m["num_layers"]):
        cells = []
        for meth in result.methods:
            x = result.doc_means(meth, bk[0], "recall", li)
            cells.append("-" if torch.isnan(x).all() else f"{100 * float(x.mean()):.1f}")
        lines.append(f"| {li} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    path = Path(path)
    path.write_text(text)
    summary = {meth: {b: {metric: result.ci(meth, b, metric) for metric in ("recall", "l2")}
                      for b in bk} for meth in result.methods}
    diffs = {kind: {f"{meth} - {ref}": {b: result.diff(meth, ref, b) for b in bk}
                    for meth, ref in per.items()} for kind, per in result.pairs.items()}
    (path.parent / "quality.json").write_text(json.dumps(
        {"summary": summary, "differences": diffs, **result.to_json()}, indent=1))
    return text


def plot_recall(result: QualityResult, path: Union[str, Path]) -> Dict[str, tuple]:
    """Left: attention recall vs budget per method, 95 % interval bands. Right: the paired
    recall differences of the study (quantized - bf16, AB-Sparse - uniform) with their 95 %
    intervals, on a scale where 0.1 points are visible, offset sideways so that coinciding
    series stay distinguishable. A colour per series (method, or comparison), marker = format,
    line = uniform / AB-Sparse / -mem (left), format / adaptive / memory comparison (right).
    Returns the colour of each series drawn (method, or "method - reference")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluation import parse_method

    bk = [budget_key(b) for b in result.budgets]
    x = list(range(len(bk)))
    palette = plt.get_cmap("tab10").colors
    markers = {"bf16": "o", "int8c": "s", "int4c": "^"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6))
    drawn = {}
    for n, meth in enumerate(result.methods):
        s = parse_method(meth)
        color = drawn[meth] = palette[n % len(palette)]
        cis = [result.ci(meth, b) for b in bk]
        style = (0, (5, 1)) if s.memory_matched else ("-" if s.adaptive else ":")
        left.plot(x, [100 * c["mean"] for c in cis], linestyle=style, color=color,
                  marker="D" if s.memory_matched else markers.get(s.format, "x"), label=meth,
                  alpha=0.9)
        left.fill_between(x, [100 * c["lo"] for c in cis], [100 * c["hi"] for c in cis],
                          color=color, alpha=0.08)
    left.set_xticks(x, bk)
    left.set_xlabel("budget (tokens, or % of the context)")
    left.set_ylabel("attention recall (% of the dense softmax mass), 95 % band")
    left.set_title("recall per method (dotted: uniform, solid: AB-Sparse, dashed: -mem)",
                   fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=7, ncol=2)
    comps = [(m, r, kind) for kind, per in result.pairs.items() for m, r in per.items()]
    styles = {"format": "-", "adaptive": "--", "memory": "-."}
    for i, (meth, ref, kind) in enumerate(comps):
        s = parse_method(meth)
        ds = [result.diff(meth, ref, b) for b in bk]
        xs = [v + 0.4 * (i / max(1, len(comps) - 1) - 0.5) for v in x]
        mean = [100 * d["delta"] for d in ds]
        err = [[100 * (d["delta"] - d["lo"]) for d in ds], [100 * (d["hi"] - d["delta"])
                                                          for d in ds]]
        drawn[f"{meth} - {ref}"] = palette[i % len(palette)]
        right.errorbar(xs, mean, yerr=err, linestyle=styles[kind], color=palette[i % len(palette)],
                       marker="D" if s.memory_matched else markers.get(s.format, "x"),
                       capsize=3, label=f"{meth} - {ref}", alpha=0.9)
    right.axhline(0, color="black", lw=0.8)
    right.set_yscale("symlog", linthresh=0.5)
    right.set_xticks(x, bk)
    right.set_xlabel("budget (tokens, or % of the context)")
    right.set_ylabel("recall difference (points of %), 95 % interval; linear within +-0.5")
    right.set_title("paired differences (solid: format vs bf16, dashed: AB-Sparse vs uniform, "
                    "dash-dot: same memory)", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(result.meta.get("title", "attention recall vs budget"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


# --- command line --------------------------------------------------------------------------------
def _parser():
    from .arguments import ArgumentParser, _calib_args, _common

    p = ArgumentParser(prog="absparse quality",
                       description="Selection quality measured directly (attention recall, "
                                   "output error, format agreement) on long documents; writes "
                                   "quality.md, quality.json and recall_vs_budget.png.")
    _common(p)
    _calib_args(p)
    p.set_defaults(budgets="128,256,512,4%,8%,12.5%")
    g = p.add_argument_group("documents")
    g.add_argument("--kinds", default=",".join(DOC_KINDS),
                   help=f"document kinds, comma separated, from {', '.join(DOC_KINDS)}")
    g.add_argument("--docs-per-kind", type=int, default=2, help="documents of each kind")
    g.add_argument("--length", type=int, default=2048, help="tokens per document")
    g.add_argument("--quality-probes", type=int, default=64,
                   help="decode positions per document (spread over its last three quarters)")
    g.add_argument("--methods", default=",".join(QUALITY_METHODS),
                   help="methods, comma separated, [ab-]{quest|arkvale|mean}[-FORMAT][-mem]")
    p.add_argument("--calibration", default=None,
                   help="directory written by 'absparse calibrate' (default: calibrate here, on "
                        "the calibration documents, at --budgets)")
    p.add_argument("--out", default="absparse-quality", help="output directory")
    return p


def _check(args) -> None:
    from .arguments import CliError, _items, check_args
    from .evaluation import parse_method

    args.cmd = "calibrate"                    # the calibration checks of check_args
    check_args(args)
    args.kinds_list = _items(args.kinds)
    if not args.kinds_list or any(k not in DOC_KINDS for k in args.kinds_list):
        raise CliError(f"--kinds: expected kinds from {', '.join(DOC_KINDS)}, got {args.kinds!r}")
    args.methods_list = _items(args.methods)
    if not args.methods_list:
        raise CliError("--methods: expected at least one method")
    for m in args.methods_list:
        try:
            spec = parse_method(m)
        except ValueError as e:
            raise CliError(f"--methods: {e}") from None
        if spec.dense_first:
            raise CliError(f"--methods: {m}: dense layers (+dN) are not measured here (their "
                           f"recall is 1 by definition)")
    for name, minimum in (("docs_per_kind", 1), ("quality_probes", 1)):
        if getattr(args, name) < minimum:
            raise CliError(f"--{name.replace('_', '-')}: expected an integer >= {minimum}, got "
                           f"{getattr(args, name)}")
    if args.length < 2 * args.page_size:
        raise CliError(f"--length: expected at least two pages ({2 * args.page_size} tokens), "
                       f"got {args.length}")
    if args.calibration is not None and not (Path(args.calibration) / "calibration.pt").is_file():
        raise CliError(f"--calibration {args.calibration}: holds no calibration.pt (written by "
                       f"'absparse calibrate')")


def _run(args, argv) -> int:
    import datetime
    import shlex

    from .arguments import check_environment, check_layouts, load_calibration, make_out
    from .arguments import placeholder_calibration
    from .cli import _device_description, _load

    _check(args)
    cal = load_calibration(Path(args.calibration)) if args.calibration else None
    args.dense_layers_list = []
    check_layouts(args, cal or placeholder_calibration(args))
    check_environment(args)
    out = Path(args.out)
    make_out(out)
    started = time.perf_counter()
    model, tok, src = _load(args)
    if cal is None:
        from .cli import _calibrate

        cal = _calibrate(args, model, tok, src, out)
    docs = quality_documents(tok, args.kinds_list, args.docs_per_kind, args.length)
    done = [0]

    def progress(n):
        done[0] += n
        if not args.no_progress:
            print(f"quality: document {done[0]}/{len(docs)} ({time.perf_counter() - started:.0f} "
                  f"s)", flush=True)

    res = measure_quality(model, tok, cal, docs, args.budgets_list, args.methods_list,
                          args.quality_probes, args.avg_block_size, args.sink_tokens,
                          args.local_tokens, args.group_reduce, progress, args.workers)
    res.meta["title"] = f"{src.name}: attention recall vs budget"
    header = "\n".join([
        f"# absparse selection quality: {src.name}", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {_device_description(str(model.device))}",
        f"- command: `absparse quality {' '.join(shlex.quote(a) for a in argv)}`",
        f"- wall time: {time.perf_counter() - started:.0f} s (measurement {res.meta['seconds']} s "
        f"in {res.meta['workers']} worker process(es))",
        f"- calibration: {cal.meta.get('calibration_samples')} x "
        f"{cal.meta.get('calibration_length')} tokens of chronicle text (seeds and text disjoint "
        f"from these documents), budgets {', '.join(budget_key(b) for b in cal.budgets)}",
        f"- selection: average block size {args.avg_block_size}, sink {args.sink_tokens}, local "
        f"{args.local_tokens}, group reduce {args.group_reduce}", ""])
    text = write_quality_report(res, out / "quality.md", header)
    plot_recall(res, out / "recall_vs_budget.png")
    print(text)
    print(f"wrote {out / 'quality.md'}, {out / 'quality.json'}, {out / 'recall_vs_budget.png'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``absparse quality [options]`` (``python -m absparse.eval.quality``)."""
    import sys

    from .arguments import report_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return report_errors("absparse quality", _run, args, argv)


if __name__ == "__main__":
    raise SystemExit(main())

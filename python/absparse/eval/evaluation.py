"""Accuracy of AB-Sparse against dense attention and the uniform Quest/ArkVale baselines.

Every sample is prefilled ONCE densely (all prompt tokens but the last, into a dense
:class:`~absparse.hf.AbsparseCache`). Each (budget, method) is a decode run of the batch's
prefilled sequences with that method's layout (block summaries computed from the prefilled keys),
and every step from the last prompt token on goes through the decode pipeline: the answer tokens
are generated greedily (RULER string match), or, for ``ppl`` samples, teacher forced to measure the
continuation's NLL. So even the first answer token depends on the sparse selection. The runs of a
batch share one copy of its prefill and are decoded together, several per forward pass
(:mod:`absparse.eval.decode_runs`); each gives the records a cache of its own would give.

Methods are named ``[ab-]BASE[-FORMAT][-mem][+dN]``:

- BASE: ``quest`` (minmax summaries), ``arkvale`` (cuboid), ``mean`` (mean of keys);
- ``ab-``: AB-Sparse block sizes from calibration (else every head uses ``avg_block_size``);
- FORMAT: summary storage, default ``bf16`` (``fp32``, ``fp16``, ``int8c``, ``int4c``);
- ``-mem``: the allocation keeps the summary *memory* of the bf16 uniform baseline instead of its
  average block size ("count" constraint at ``avg_block_size * bits / 16``; quantized formats only);
- ``+dN``: the first N layers stay dense (Quest's default is N = 2).

``dense`` (``dense_decode`` in every layer) is always evaluated. ``window_plans`` adds methods
served with static per-head windows (``absparse.moa``: ``moa`` and the uniform ``window``), one
:class:`~absparse.moa.MoAPlan` per budget. The report's paired differences with 95 % intervals
come from :mod:`absparse.eval.stats`.

Sparse prefill (``prefill`` modes other than ``dense``, :class:`absparse.hf.PrefillConfig`): each
sample is prefilled once more per mode, into a cache whose prefill runs FlexPrefill / PBS-Attn
through ``sparse_prefill``, and decoded densely (method ``MODE+dense``) and with one AB-Sparse
method at the first budget (``MODE+METHOD``, ``prefill_decode``). Their records carry the attained
block density of the prefill (mean over layers, sequences and list heads).
"""
from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..layout import ModelLayout
from .model_calibration import Calibration, budget_key
from .stats import paired_bootstrap, paired_report
from .tasks import Sample, score_output

if TYPE_CHECKING:  # absparse.hf imports transformers: loaded only when a model runs
    from ..hf import AbsparseCache

__all__ = ["MethodSpec", "parse_method", "DEFAULT_METHODS", "summary_kib_per_1k", "evaluate",
           "eval_work", "EvalResult", "write_report", "plot_accuracy", "plot_block_sizes"]

BASES = {"quest": "minmax", "arkvale": "cuboid", "mean": "mean"}
PREFILL_NAMES = ("causal", "flexprefill", "pbs")  # sparse prefill modes (absparse.hf)
_PREFILL_FIELDS = {"causal": ("block_size",),       # the PrefillConfig fields each mode reads
                   "flexprefill": ("block_size", "gamma", "tau", "min_budget", "max_budget"),
                   "pbs": ("block_size", "segment_size", "threshold")}
FORMATS = ("fp32", "fp16", "bf16", "int8c", "int4c")
_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8c": 8, "int4c": 4}
_METHOD_RE = re.compile(r"^(ab-)?(quest|arkvale|mean)(?:-(fp32|fp16|bf16|int8c|int4c))?(-mem)?"
                        r"(?:\+d(\d+))?$")

# Rows per decode forward pass (the runs of a batch are decoded together, see decode_runs). More
# rows amortize the model's per-pass cost; the pool grows by ~1.5 pages per row. Measured on a
# 2-core AMD EPYC (2026-12-01), 10 samples with the main job's 40 runs: at 1024 tokens 124 s with
# 10 rows (one run) per pass, 85 s with 120, 81 s with 400; at 2048 tokens 114 s with 128 and
# 124 s with 512 (peak memory 4.6 vs 6.6 GB).
ROWS_PER_PASS = 128

DEFAULT_METHODS = ("quest", "arkvale", "mean", "ab-quest", "ab-quest-int8c", "ab-quest-int4c",
                   "ab-arkvale", "ab-arkvale-int8c", "ab-arkvale-int4c", "ab-mean",
                   "ab-quest-int8c-mem", "quest+d2", "ab-quest+d2")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    base: str
    summary: str
    format: str
    adaptive: bool
    memory_matched: bool
    dense_first: int

    @property
    def uniform_base(self) -> str:
        """The uniform bf16 method this one is compared with."""
        return self.base + (f"+d{self.dense_first}" if self.dense_first else "")

    def layout(self, cal: Calibration, budget, avg_block_size: int) -> ModelLayout:
        dense = tuple(range(self.dense_first))
        if self.memory_matched:
            avg = max(min(cal.candidates), avg_block_size * _BITS[self.format] // 16)
            return cal.layout(self.summary, self.format, budget, avg, "count", dense, True)
        return cal.layout(self.summary, self.format, budget, avg_block_size, "mean", dense,
                          self.adaptive)


def parse_method(name: str) -> MethodSpec:
    """``"ab-quest-int4c+d2"`` -> MethodSpec (see the module docstring for the grammar)."""
    m = _METHOD_RE.match(name.strip())
    if not m:
        raise ValueError(f"method: expected [ab-]{{quest|arkvale|mean}}[-FORMAT][-mem][+dN] with "
                         f"FORMAT in {FORMATS}, got {name!r}")
    ab, base, fmt, mem, dense = m.groups()
    fmt = fmt or "bf16"
    if mem and (not ab or _BITS[fmt] >= 16):
        raise ValueError(f"method {name!r}: '-mem' needs an adaptive ('ab-') method with a "
                         f"quantized format (int8c / int4c)")
    return MethodSpec(name.strip(), base, BASES[base], fmt, bool(ab), bool(mem), int(dense or 0))


def _vector_bytes(format: str, d: int) -> float:
    return {"fp32": 4 * d, "fp16": 2 * d, "bf16": 2 * d, "int8": d + 4, "int4": d / 2 + 4,
            "int8c": d, "int4c": d / 2}[format]


def summary_kib_per_1k(layout: Optional[ModelLayout], head_dim: int) -> float:
    """Summary storage of all layers, KiB per 1K tokens of context (0 for dense)."""
    if layout is None:
        return 0.0
    total = 0.0
    for l in layout.layers:
        if l is None:
            continue
        per_vec = _vector_bytes(l.format, head_dim) * l.summary_vectors
        total += sum(1024 / b for b in l.block_sizes.tolist()) * per_vec
    return total / 1024


@dataclass
class EvalResult:
    records: List[dict]
    methods: List[str]
    budgets: List[Union[int, float]]
    layouts: Dict[str, ModelLayout]
    stats: Dict[str, Dict[str, dict]]          # method -> budget key -> {selected, differ}
    meta: Dict[str, object] = field(default_factory=dict)

    # --- aggregation ---------------------------------------------------------------------------
    def _cells(self, method: str, budget: Optional[str]):
        return [r for r in self.records if r["method"] == method and
                (method == "dense" or r["budget"] == budget)]

    def task_names(self) -> List[str]:
        return sorted({r["task"] for r in self.records if r["task"] != "ppl"})

    def accuracy(self, method: str, budget: Optional[str], task: Optional[str] = None) -> float:
        """Mean score (0..100) of one task, or the macro average over tasks (task None)."""
        rows = [r for r in self._cells(method, budget) if r["task"] != "ppl"]
        if task is not None:
            rows = [r for r in rows if r["task"] == task]
            return 100.0 * sum(r["score"] for r in rows) / len(rows) if rows else float("nan")
        per = [self.accuracy(method, budget, t) for t in self.task_names()]
        per = [p for p in per if not math.isnan(p)]
        return sum(per) / len(per) if per else float("nan")

    def nll(self, method: str, budget: Optional[str]) -> float:
        rows = [r for r in self._cells(method, budget) if r["task"] == "ppl"]
        tokens = sum(r["tokens"] for r in rows)
        return sum(r["nll"] for r in rows) / tokens if tokens else float("nan")

    def disagreement(self, method: str, budget: str) -> Optional[float]:
        s = self.stats.get(method, {}).get(budget)
        if not s or not s["selected"]:
            return None
        return s["differ"] / s["selected"]

    def pairs(self) -> List[tuple]:
        """(method, reference, kind) comparisons of the issue's targets: "adaptive" (bf16 AB-Sparse
        vs its uniform base) and "int4c" (int4c vs bf16 summaries of the same allocation)."""
        out = []
        for m in self.methods:
            if m in self.meta.get("window_methods", ()):
                continue
            spec = parse_method(m)
            if spec.adaptive and spec.format == "bf16" and spec.uniform_base in self.methods:
                out.append((m, spec.uniform_base, "adaptive"))
            ref = m.replace("-int4c", "")
            if spec.adaptive and spec.format == "int4c" and not spec.memory_matched \
                    and ref in self.methods:
                out.append((m, ref, "int4c"))
        return out

    def compare(self, method: str, reference: str, budget: str) -> dict:
        """Accuracy difference (points) and per-sample wins / losses of ``method``."""
        ref = {(r["id"]): r["score"] for r in self._cells(reference, budget) if r["task"] != "ppl"}
        wins = losses = 0
        for r in self._cells(method, budget):
            if r["task"] != "ppl" and r["id"] in ref:
                wins += r["score"] > ref[r["id"]]
                losses += r["score"] < ref[r["id"]]
        return {"delta": self.accuracy(method, budget) - self.accuracy(reference, budget),
                "wins": wins, "losses": losses}

    def goal(self) -> dict:
        """The issue's targets at the tightest budget evaluated (the first)."""
        b = self.budget_keys()[0]
        return {"budget": b, "dense": self.accuracy("dense", None),
                "pairs": [(m, r, k, self.compare(m, r, b)) for m, r, k in self.pairs()]}

    def budget_keys(self) -> List[str]:
        return [budget_key(b) for b in self.budgets]

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text("\n".join(json.dumps(r) for r in self.records) + "\n")


def _prefill(model, ids: torch.Tensor, page_size: int, prefill=None) -> AbsparseCache:
    """Prefill of ``ids [1, T]`` into a fresh dense AbsparseCache (dense attention, or the
    ``absparse.hf.PrefillConfig`` ``prefill``)."""
    from ..hf import AbsparseCache

    cache = AbsparseCache(model.config, None, page_size=page_size, prefill=prefill)
    with torch.no_grad():
        model(input_ids=ids.to(model.device), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    return cache


def _decode(model, cache: AbsparseCache, first: torch.Tensor, plans: List[dict],
            eos: Optional[int], run_rows: Optional[int] = None):
    """Run every row from its last prompt token: greedy rows generate ``max_new`` tokens, forced
    rows feed ``forced`` and accumulate its NLL. Returns per-row (token ids, nll sum).

    ``run_rows``: the rows are runs of this many rows each (a
    :class:`~absparse.eval.decode_runs.RunsCache`); a run whose rows are all done is frozen, as a
    cache of that run alone would have stopped there."""
    batch = len(plans)
    live = list(range(batch // run_rows)) if run_rows else []
    lens = torch.tensor(cache.seq_lens, dtype=torch.int64)
    steps = max(p["steps"] for p in plans)
    nxt = first.clone()
    gen: List[List[int]] = [[] for _ in range(batch)]
    nll = [0.0] * batch
    done = [False] * batch
    for t in range(steps):
        pos = (lens + t)[:, None]
        with torch.no_grad():
            out = model(input_ids=nxt[:, None].to(model.device), position_ids=pos.to(model.device),
                        past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float().cpu()
        best = logits.argmax(-1)
        logp = None
        for b, p in enumerate(plans):
            if done[b]:
                continue
            if p["forced"] is not None:
                if logp is None:
                    logp = torch.log_softmax(logits, -1)
                gold = p["forced"][t]
                nll[b] -= float(logp[b, gold])
                nxt[b] = gold
            else:
                tok = int(best[b])
                gen[b].append(tok)
                nxt[b] = tok
                if eos is not None and tok == eos:
                    done[b] = True
            if t + 1 >= p["steps"]:
                done[b] = True
        if all(done):
            break
        for r in [r for r in live if all(done[r * run_rows:(r + 1) * run_rows])]:
            cache.freeze(r)
            live.remove(r)
    return gen, nll


def _batches(samples: Sequence[Sample], batch_size: int) -> List[List[int]]:
    """Sample indices per batch: samples that need the same number of decode steps together (a
    batch runs its longest row)."""
    order = sorted(range(len(samples)), key=lambda i: (samples[i].task == "ppl",
                                                       samples[i].max_new_tokens,
                                                       samples[i].length))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _prompt_ids(tokenizer, sample: Sample, ppl_tokens: int):
    """(prompt ids [1, T], teacher-forced answer ids or None) of one sample."""
    ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    forced = None
    if sample.task == "ppl":
        forced = tokenizer(sample.answers[0], add_special_tokens=False).input_ids[:ppl_tokens]
    return ids, forced


def eval_work(tokenizer, samples: Sequence[Sample], budgets: Sequence, methods: Sequence[str],
              batch_size: int, ppl_tokens: int = 16, prefill: Sequence[str] = ("dense",)
              ) -> Dict[str, int]:
    """The work of :func:`evaluate` with these arguments in tokens, for
    :class:`absparse.eval.progress.WorkProgress`: ``prefill`` = prompt tokens prefilled (all but the
    last of each prompt, once per sample); ``decode`` = rows x steps of every run (dense and each
    budget x method, per batch; a run stops early when every row has generated EOS); each sparse
    ``prefill`` mode adds a prefill of every sample and two runs."""
    sparse = sum(m != "dense" for m in prefill)
    num_runs = 1 + len(budgets) * len(methods) + 2 * sparse
    work = {"prefill": 0, "decode": 0}
    for idx in _batches(samples, batch_size):
        steps = 0
        for i in idx:
            ids, forced = _prompt_ids(tokenizer, samples[i], ppl_tokens)
            work["prefill"] += (1 + sparse) * (ids.shape[1] - 1)
            steps = max(steps, len(forced) if forced is not None else samples[i].max_new_tokens)
        work["decode"] += num_runs * len(idx) * steps
    return work


def evaluate(model, tokenizer, samples: Sequence[Sample], calibration: Calibration,
             budgets: Sequence[Union[int, float]], methods: Sequence[str] = DEFAULT_METHODS,
             avg_block_size: int = 32, sink_tokens: int = 16, local_tokens: int = 64,
             group_reduce: str = "max", batch_size: int = 8, page_size: Optional[int] = None,
             ppl_tokens: int = 16, progress=None,
             window_plans: Optional[Dict[str, Dict[str, object]]] = None,
             prefill: Sequence[str] = ("dense",), prefill_options: Optional[dict] = None,
             prefill_decode: str = "ab-mean", rows_per_pass: int = ROWS_PER_PASS,
             workers: Optional[int] = 1) -> EvalResult:
    """Evaluate ``dense`` and ``methods`` at every budget on ``samples`` (see module docstring).

    ``prefill``: prefill modes; the sparse ones (not ``dense``) are evaluated as ``MODE+dense``
    and ``MODE+prefill_decode`` (at ``budgets[0]``), with ``PrefillConfig(mode,
    **prefill_options)``.

    ``ppl_tokens``: teacher-forced tokens of each ppl continuation (its first ones).
    ``progress``: optional :class:`absparse.eval.progress.WorkProgress` (any object with
    ``advance(kind, tokens)``), told the tokens of every prefill and of every decode run, as
    counted by :func:`eval_work`.
    ``window_plans``: ``{method: {budget_key: MoAPlan}}``, decoded through ``absparse.moa.attach``
    on a dense-layout cache (no summaries); their records carry ``kv_tokens_read`` (mean keys
    attended per KV head at the prompt length).
    ``rows_per_pass``: rows per decode forward pass: the runs of a batch are decoded together,
    ``max(1, rows_per_pass // batch rows)`` at a time (:mod:`absparse.eval.decode_runs`).
    ``workers``: processes the batches are spread over (:func:`absparse.eval.workers.
    resolve_workers`; None: one per CPU core). The records do not depend on it.
    """
    from ..hf import PrefillConfig, register
    from .decode_runs import Run
    from .workers import map_items, resolve_workers

    register()
    model.set_attn_implementation("absparse")
    page_size = page_size or calibration.page_size
    specs = [parse_method(m) for m in methods]
    for m, per_budget in (window_plans or {}).items():
        missing = [budget_key(b) for b in budgets if budget_key(b) not in per_budget]
        if missing:
            raise ValueError(f"evaluate: window_plans[{m!r}]: expected a plan for every budget, "
                             f"missing {missing}")
    head_dim = getattr(model.config, "head_dim", None) or \
        model.config.hidden_size // model.config.num_attention_heads
    layouts: Dict[str, ModelLayout] = {}
    for b in budgets:
        for s in specs:
            layouts[f"{s.name}@{budget_key(b)}"] = s.layout(calibration, b, avg_block_size)
    sparse_prefills = [PrefillConfig(m, **(prefill_options or {})) for m in prefill
                       if m != "dense"]
    combo = (prefill_decode, budgets[0],
             parse_method(prefill_decode).layout(calibration, budgets[0], avg_block_size)) \
        if sparse_prefills else None  # only sparse prefills decode with it
    eos = tokenizer.eos_token_id
    runs = [_run("dense", None, None)] + [_run(s.name, b, layouts[f"{s.name}@{budget_key(b)}"])
                                          for b in budgets for s in specs]
    runs += [Run(m, b, plan=window_plans[m][budget_key(b)])
             for b in budgets for m in window_plans or {}]

    def batch(idx: List[int], progress):
        """One batch -> (records, selection statistics, seconds per context length)."""
        records: List[dict] = []
        stats: Dict[str, Dict[str, dict]] = defaultdict(dict)
        # Seconds per context length: dense prefills, and the decode runs (a batch's time shared
        # equally by its rows).
        timing: Dict[int, Dict[str, float]] = defaultdict(
            lambda: {"samples": 0, "prefill_s": 0.0, "decode_s": 0.0})
        plans, bases, firsts = [], [], []
        for i in idx:
            s = samples[i]
            ids, forced = _prompt_ids(tokenizer, s, ppl_tokens)
            t = time.perf_counter()
            bases.append(_prefill(model, ids[:, :-1], page_size))
            timing[s.length]["samples"] += 1
            timing[s.length]["prefill_s"] += time.perf_counter() - t
            firsts.append(int(ids[0, -1]))
            plans.append({"forced": forced, "prompt_tokens": ids.shape[1],
                          "steps": len(forced) if forced is not None else s.max_new_tokens})
        if progress is not None:
            progress.advance("prefill", sum(p["prompt_tokens"] - 1 for p in plans))
        first = torch.tensor(firsts)
        t = time.perf_counter()
        records += _decode_runs(model, tokenizer, samples, idx, bases, first, plans, eos, runs,
                                sink_tokens, local_tokens, group_reduce, stats, progress,
                                rows_per_pass)
        for i in idx:
            timing[samples[i].length]["decode_s"] += (time.perf_counter() - t) / len(idx)
        for cfg in sparse_prefills:
            ids_list = [_prompt_ids(tokenizer, samples[i], ppl_tokens)[0] for i in idx]
            sparse_bases = [_prefill(model, ids[:, :-1], page_size, cfg) for ids in ids_list]
            density = [_mean([d for d in c.prefill_densities() if d is not None])
                       for c in sparse_bases]
            if progress is not None:
                progress.advance("prefill", sum(p["prompt_tokens"] - 1 for p in plans))
            recs = _decode_runs(model, tokenizer, samples, idx, sparse_bases, first, plans, eos,
                                [_run(f"{cfg.mode}+dense", None, None),
                                 _run(f"{cfg.mode}+{combo[0]}", *combo[1:])], sink_tokens,
                                local_tokens, group_reduce, stats, progress, rows_per_pass)
            for n, rec in enumerate(recs):
                rec.update(prefill=cfg.mode, prefill_density=density[n % len(idx)])
            records += recs
        return records, dict(stats), dict(timing)

    t0 = time.perf_counter()
    batches = _batches(samples, batch_size)
    workers = resolve_workers(workers, len(batches), model.device)
    records: List[dict] = []
    stats: Dict[str, Dict[str, dict]] = defaultdict(dict)
    timing: Dict[int, Dict[str, float]] = {}
    for recs, st, tm in map_items(batch, batches, workers, progress):
        records += recs
        for name, per in st.items():
            for bkey, counts in per.items():
                acc = stats[name].setdefault(bkey, {"selected": 0, "differ": 0})
                acc["selected"] += counts["selected"]
                acc["differ"] += counts["differ"]
        for n, t in tm.items():
            acc = timing.setdefault(n, {"samples": 0, "prefill_s": 0.0, "decode_s": 0.0})
            for k, v in t.items():
                acc[k] += v
    layouts_by_method = {s.name: layouts[f"{s.name}@{budget_key(budgets[0])}"] for s in specs}
    meta = {"eval_seconds": round(time.perf_counter() - t0, 1), "samples": len(samples),
            "decode_runs": len(runs), "workers": workers,
            "timing": {n: {k: round(v, 1) for k, v in t.items()} for n, t in timing.items()},
            "avg_block_size": avg_block_size, "sink_tokens": sink_tokens,
            "local_tokens": local_tokens, "group_reduce": group_reduce, "page_size": page_size,
            "summary_kib_per_1k": {k: summary_kib_per_1k(v, head_dim) for k, v in layouts.items()},
            "head_dim": head_dim, "window_methods": list(window_plans or {}),
            "prefill_runs": [f"{c.mode}+{d}" for c in sparse_prefills
                             for d in ("dense", combo[0])],
            "prefill_budget": budget_key(budgets[0]),
            "prefill_config": {c.mode: {k: getattr(c, k) for k in _PREFILL_FIELDS[c.mode]}
                               for c in sparse_prefills}}
    return EvalResult(records, list(methods) + list(window_plans or {}), list(budgets),
                      layouts_by_method, dict(stats), meta)


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def _run(name: str, budget, layout: Optional[ModelLayout]):
    """The :class:`~absparse.eval.decode_runs.Run` of a method (``layout`` None: dense).
    Selection disagreement is measured for the integer summary formats, against fp32 summaries
    of the same layout."""
    from .decode_runs import Run

    fmt = None if layout is None else next(l.format for l in layout.layers if l is not None)
    return Run(name, budget, layout,
               compare_format="fp32" if fmt is not None and fmt.startswith("int") else None)


def _decode_runs(model, tokenizer, samples, idx, bases, first, plans, eos, runs, sink_tokens,
                 local_tokens, group_reduce, stats, progress, rows_per_pass: int) -> List[dict]:
    """Every run of a batch (``bases``: its prefilled caches) -> their records, run by run. The
    runs are decoded together, as many per forward pass as fit in ``rows_per_pass`` rows (at
    least one), over one copy of the prefill (:mod:`absparse.eval.decode_runs`)."""
    from .decode_runs import BatchPool

    rows = len(idx)
    steps = max(p["steps"] for p in plans)
    pool = BatchPool(bases, runs, steps, rows_per_pass // rows, sink_tokens, local_tokens,
                     group_reduce)
    records = []
    for cache in pool.passes():
        n = len(cache.runs)
        gen, nll = _decode(model, cache, first.repeat(n), plans * n, eos, run_rows=rows)
        for r, (run, run_cache) in enumerate(zip(cache.runs, cache.caches)):
            bkey = None if run.budget is None else budget_key(run.budget)
            if run.compare_format is not None:
                st = stats[run.name].setdefault(bkey, {"selected": 0, "differ": 0})
                for layer in run_cache.layers:
                    st["selected"] += layer.stats["selected"]
                    st["differ"] += layer.stats["differ"]
            for j, i in enumerate(idx):
                s = samples[i]
                rec = {"id": s.id, "task": s.task, "length": s.length, "depth": s.depth,
                       "prompt_tokens": plans[j]["prompt_tokens"], "method": run.name,
                       "budget": bkey}
                if run.plan is not None:
                    rec["kv_tokens_read"] = run.plan.tokens_read(plans[j]["prompt_tokens"])
                if s.task == "ppl":
                    rec.update(nll=nll[r * rows + j], tokens=len(plans[j]["forced"]))
                else:
                    text = tokenizer.decode(gen[r * rows + j], skip_special_tokens=True)
                    rec.update(score=score_output(s, text), output=text)
                records.append(rec)
            if progress is not None:
                progress.advance("decode", rows * steps)
    return records


# --- report --------------------------------------------------------------------------------------
def _fmt(x: Optional[float], digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def write_report(result: EvalResult, path: Union[str, Path], header: str = "") -> str:
    """Markdown tables: average accuracy per method and budget, per-task accuracy, NLL of the
    ppl documents, selection disagreement vs fp32 summaries, summary memory, the goal check, and
    the paired differences with intervals (:func:`absparse.eval.stats.paired_report`, also
    written as ``paired.json`` next to ``path``)."""
    bk = result.budget_keys()
    tasks = result.task_names()
    kib = result.meta.get("summary_kib_per_1k", {})
    lines = [header] if header else []
    lines += ["## Average task accuracy (%, macro over " + ", ".join(tasks) + ")", "",
              "| method | summary KiB / 1K tok | " + " | ".join(f"budget {b}" for b in bk) + " |",
              "|---|---|" + "---|" * len(bk)]
    dense = result.accuracy("dense", None)
    lines.append("| dense | 0 | " + " | ".join(_fmt(dense) for _ in bk) + " |")
    for m in result.methods:
        mem = kib.get(f"{m}@{bk[0]}")
        lines.append(f"| {m} | {_fmt(mem)} | " +
                     " | ".join(_fmt(result.accuracy(m, b)) for b in bk) + " |")
    lines += ["", "## Accuracy per task (%)", "",
              "| method | budget | " + " | ".join(tasks) + " | ppl NLL / token |",
              "|---|---|" + "---|" * (len(tasks) + 1)]
    lines.append("| dense | - | " + " | ".join(_fmt(result.accuracy("dense", None, t))
                                               for t in tasks) +
                 f" | {_fmt(result.nll('dense', None), 3)} |")
    for b in bk:
        for m in result.methods:
            lines.append(f"| {m} | {b} | " + " | ".join(_fmt(result.accuracy(m, b, t))
                                                        for t in tasks) +
                         f" | {_fmt(result.nll(m, b), 3)} |")
    lines += ["", "## Selection disagreement with fp32 summaries", "",
              "Share (%) of the blocks that fp32 summaries of the same layout select, for the same "
              "query at every decode step, which the quantized summaries do not select.", "",
              "| method | " + " | ".join(f"budget {b}" for b in bk) + " |",
              "|---|" + "---|" * len(bk)]
    for m in result.methods:
        rates = [result.disagreement(m, b) for b in bk]
        if any(r is not None for r in rates):
            lines.append(f"| {m} | " + " | ".join(_fmt(None if r is None else 100 * r, 2)
                                                  for r in rates) + " |")
    g = result.goal()
    lines += ["", f"## Goal check (tightest budget: {g['budget']}; dense accuracy "
              f"{_fmt(g['dense'])}%)", "",
              "Targets: AB-Sparse >= +3.0 points over its uniform base; int4c summaries within "
              "0.5 points of bf16. (w/l) = samples the first method scores higher / lower on.", ""]
    for m, ref, kind, c in g["pairs"]:
        ok = c["delta"] >= 3.0 if kind == "adaptive" else abs(c["delta"]) < 0.5
        lines.append(f"- {m} vs {ref}: {c['delta']:+.1f} points ({c['wins']}/{c['losses']}): "
                     f"{'met' if ok else 'not met'}")
    lines += ["", "| comparison | " + " | ".join(f"budget {b}" for b in bk) + " |",
              "|---|" + "---|" * len(bk)]
    for m, ref, _ in result.pairs():
        cells = []
        for b in bk:
            c = result.compare(m, ref, b)
            cells.append(f"{c['delta']:+.1f} ({c['wins']}/{c['losses']})")
        lines.append(f"| {m} - {ref} | " + " | ".join(cells) + " |")
    paired_lines, paired_data = paired_report(result)
    lines += paired_lines
    lines += _prefill_section(result)
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    Path(path).with_name("paired.json").write_text(json.dumps(paired_data, indent=1))
    return text


def _prefill_section(result: EvalResult) -> List[str]:
    """Sparse-prefill runs beside dense: accuracy, per task, NLL and attained block density."""
    runs = result.meta.get("prefill_runs") or []
    if not runs:
        return []
    b = result.meta["prefill_budget"]
    tasks = result.task_names()
    lengths = sorted({r["length"] for r in result.records if r.get("prefill")})
    lines = ["", "## Sparse prefill", "",
             "Prefill (all prompt tokens but the last) through `sparse_prefill` with the block "
             "lists of FlexPrefill or PBS-Attn, then decode dense or with one AB-Sparse method "
             f"(budget {b}). Density: listed / causal blocks of the prefill, mean over layers, "
             "heads and samples. Settings: " + "; ".join(
                 f"{m}: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "mode")
                 for m, c in result.meta.get("prefill_config", {}).items()), "",
             "| prefill + decode | accuracy | " + " | ".join(tasks) + " | ppl NLL / token | " +
             " | ".join(f"density @{n}" for n in lengths) + " |",
             "|---|---|" + "---|" * (len(tasks) + 1 + len(lengths))]
    rows = [("dense + dense", "dense", None)]
    decode = {r.split("+", 1)[1] for r in runs} - {"dense"}
    rows += [(f"dense + {m}", m, b) for m in sorted(decode) if m in result.methods]
    rows += [(r.replace("+", " + ", 1), r, None if r.endswith("+dense") else b) for r in runs]
    for label, m, bk in rows:
        cells = [result.accuracy(m, bk)] + [result.accuracy(m, bk, t) for t in tasks]
        dens = []
        for n in lengths:
            d = [r["prefill_density"] for r in result._cells(m, bk) if r["length"] == n
                 and r.get("prefill_density") is not None]
            dens.append(_mean(d))
        lines.append(f"| {label} | " + " | ".join(_fmt(c) for c in cells) +
                     f" | {_fmt(result.nll(m, bk), 3)} | " +
                     " | ".join("1 (SDPA)" if not m.count("+") or m.split("+")[0] not in
                                PREFILL_NAMES else _fmt(d, 3) for d in dens) + " |")
    return lines


def accuracy_interval(result: EvalResult, method: str, budget: Optional[str]) -> Dict[str, float]:
    """Average task accuracy (points) with a 95 % bootstrap interval: samples resampled within
    each task, the macro average over tasks (as ``EvalResult.accuracy``). ``{"acc", "lo", "hi",
    "n"}``; NaN without samples."""
    rows = [r for r in result._cells(method, budget) if r["task"] != "ppl"]
    if not rows:
        return {"acc": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    scores = [r["score"] for r in rows]
    ci = paired_bootstrap(scores, [0.0] * len(scores), strata=[r["task"] for r in rows])
    return {"acc": 100 * ci["delta"], "lo": 100 * ci["lo"], "hi": 100 * ci["hi"],
            "n": len(rows)}


def plot_accuracy(result: EvalResult, path: Union[str, Path]) -> Dict[str, list]:
    """Average task accuracy vs budget with 95 % intervals (:func:`accuracy_interval`), one
    series per method in a color of its own (line: dotted uniform blocks, solid AB-Sparse,
    dash-dot with a sparse prefill; marker: summary format, D: memory-matched), dense as a
    horizontal line with its interval as a band. Returns the series drawn: method -> [(budget,
    acc, lo, hi)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bk = result.budget_keys()
    x = list(range(len(bk)))
    markers = {"fp32": "P", "fp16": "X", "bf16": "o", "int8c": "s", "int4c": "^"}
    palette = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(9, 5.5))
    dense = accuracy_interval(result, "dense", None)
    ax.axhline(dense["acc"], color="black", ls="--", label="dense")
    if dense["n"]:
        ax.axhspan(dense["lo"], dense["hi"], color="black", alpha=0.08)
    width = 0.25                                   # series are spread over +-width/2 per budget
    drawn = {}
    for n, m in enumerate(result.methods):
        spec = parse_method(m)
        style = ("-" if spec.adaptive else ":") if not spec.dense_first else \
            ("-." if spec.adaptive else (0, (1, 3)))
        shift = width * (n / max(1, len(result.methods) - 1) - 0.5)
        cis = [accuracy_interval(result, m, b) for b in bk]
        acc = [c["acc"] for c in cis]
        err = [[c["acc"] - c["lo"] for c in cis], [c["hi"] - c["acc"] for c in cis]]
        ax.errorbar([i + shift for i in x], acc, yerr=err, linestyle=style, capsize=3,
                    color=palette[n % len(palette)], marker="D" if spec.memory_matched else
                    markers[spec.format], alpha=0.9, label=m)
        drawn[m] = [(b, c["acc"], c["lo"], c["hi"]) for b, c in zip(bk, cis)]
    ax.set_xticks(x, [f"budget {b}" for b in bk])
    ax.set_ylabel("average task accuracy (%), 95 % interval")
    ax.set_xlabel("token budget (line: dotted uniform blocks, solid AB-Sparse, dash-dot +dN;\n"
                  "marker: summary format, D: -mem; series offset sideways)", fontsize=9)
    ax.set_title(result.meta.get("title", "accuracy vs token budget"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_paired_differences(stats: Sequence[dict], path: Union[str, Path], title: str,
                            goals: Optional[Dict[str, Tuple[float, float]]] = None) -> list:
    """The paired differences of :func:`absparse.eval.stats.paired_task_stats` at a glance: one
    panel per kind ("vs uniform", "vs bf16"), a row per comparison and budget with its estimate
    and 95 % interval (points of accuracy), a color per budget, 0 marked; ``goals`` shades the
    band a kind's goal asks for (default: >= +3 vs uniform, within +-1 vs bf16). Comparisons where
    no sample differs (every method failing a too-tight budget) are left out. Returns the rows
    drawn, ``(kind, label, budget, delta, lo, hi)``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goals = goals if goals is not None else {"vs uniform": (3.0, math.inf),
                                             "vs bf16": (-1.0, 1.0)}
    kinds = [k for k in ("vs uniform", "vs bf16") if any(s["kind"] == k for s in stats)]
    budgets = []
    for s in stats:
        if s["budget"] not in budgets:
            budgets.append(s["budget"])
    colors = dict(zip(budgets, plt.get_cmap("tab10").colors))
    drawn = []
    fig, axes = plt.subplots(len(kinds), 1, squeeze=False,
                             figsize=(9, 1.2 + 0.45 * max(1, len(stats))))
    for ax, kind in zip(axes[:, 0], kinds):
        rows = [s for s in stats if s["kind"] == kind and (s["wins"] or s["losses"])]
        labels = []
        for y, s in enumerate(rows):
            label = f"{s['method']} - {s['reference']}"
            ax.errorbar([s["delta"]], [y], xerr=[[s["delta"] - s["lo"]], [s["hi"] - s["delta"]]],
                        fmt="o", color=colors[s["budget"]], capsize=4)
            labels.append(f"{label} @ {s['budget']} (n {s['n']})")
            drawn.append((kind, label, s["budget"], s["delta"], s["lo"], s["hi"]))
        lo, hi = goals.get(kind, (None, None))
        ends = [0.0] + [s["lo"] for s in rows] + [s["hi"] for s in rows] + \
            [g for g in (lo, hi) if g is not None and math.isfinite(g)]
        margin = 0.05 * (max(ends) - min(ends)) + 0.5
        left, right = min(ends) - margin, max(ends) + margin
        ax.set_xlim(left, right)
        if lo is not None:
            ax.axvspan(max(lo, left), min(hi, right), color="tab:green", alpha=0.12)
        ax.axvline(0.0, color="black", lw=1)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{title}: {kind}", fontsize=10)
        ax.set_xlabel("paired difference, points of accuracy (95 % interval)")
        ax.grid(alpha=0.3, axis="x")
        handles = [plt.Line2D([], [], color=colors[b], marker="o", ls="", label=f"budget {b}")
                   for b in budgets if any(s["budget"] == b for s in rows)]
        if lo is not None:
            handles.append(plt.Rectangle((0, 0), 1, 1, color="tab:green", alpha=0.12,
                                         label="goal"))
        ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_block_sizes(layouts: Dict[str, ModelLayout], path: Union[str, Path],
                     budget: Optional[str] = None) -> None:
    """Map of the block size of every layer x KV head, one panel per layout: one discrete colour
    per block size (legend), "D" for dense layers; ``budget`` (the calibrated budget the
    allocation was made for) goes into the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    names = list(layouts)
    sizes = sorted({int(b) for lay in layouts.values() for l in lay.layers if l is not None
                    for b in l.block_sizes.tolist()})
    palette = plt.get_cmap("viridis", max(2, len(sizes)))
    cmap = ListedColormap([palette(i) for i in range(len(sizes))]).with_extremes(bad="lightgrey")
    norm = BoundaryNorm([i - 0.5 for i in range(len(sizes) + 1)], len(sizes))
    fig, axes = plt.subplots(1, len(names), figsize=(max(5.5, 2.4 + 1.8 * len(names)), 7),
                             squeeze=False, sharey=True, layout="constrained")
    for n, (ax, name) in enumerate(zip(axes[0], names)):
        lay = layouts[name]
        hk = next(l.num_kv_heads for l in lay.layers if l is not None)
        grid = torch.full((len(lay), hk), float("nan"))                  # index into ``sizes``
        for i, l in enumerate(lay.layers):
            if l is not None:
                grid[i] = torch.tensor([sizes.index(int(b)) for b in l.block_sizes.tolist()],
                                       dtype=torch.float32)
        ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        for i, l in enumerate(lay.layers):
            for h in range(hk):
                label = "D" if l is None else str(int(l.block_sizes[h]))
                light = l is None or sizes.index(int(l.block_sizes[h])) >= len(sizes) / 2
                ax.text(h, i, label, ha="center", va="center", fontsize=6,
                        color="black" if light else "white")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("KV head")
        ax.set_xticks(range(hk))
        if n == 0:
            ax.set_ylabel("layer")
    handles = [Patch(color=cmap(i), label=f"block {b}") for i, b in enumerate(sizes)]
    if any(l is None for lay in layouts.values() for l in lay.layers):
        handles.append(Patch(color="lightgrey", label="dense layer (D)"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8, title="block size")
    fig.suptitle("block size per layer and KV head" +
                 (f"\nallocated at budget {budget}" if budget else ""), fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Confidence intervals and paired comparisons for the evaluation and the selection-quality study.

Which interval, and why:

- :func:`bootstrap_ci`: percentile bootstrap of a mean over *clusters* (documents, task samples).
  Observations inside one cluster are correlated (the probes of one document share its text), so
  the cluster, not the observation, is what gets resampled: each cluster contributes its mean.
- :func:`paired_bootstrap`: the same over the per-cluster *differences* of two methods measured on
  the same clusters; optional strata (tasks) are resampled separately and combined by their macro
  average, which is how the evaluation's headline accuracy is defined.
- :func:`mcnemar`: exact McNemar (two-sided binomial test on the discordant pairs) for paired
  0/1 outcomes; with fractional scores it is the sign test on wins vs losses.
- :func:`t_interval`: Student-t interval of a mean, for comparison with the bootstrap.

Everything is float64 and seeded (a fixed ``seed`` gives the same interval every run).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["bootstrap_ci", "paired_bootstrap", "mcnemar", "t_interval", "DEFAULT_RESAMPLES",
           "decidable_cells", "comparisons", "paired_task_stats", "paired_report", "PooledRuns",
           "samples_for_half_width"]

DEFAULT_RESAMPLES = 4000


def _vector(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name}: expected at least one value, got none")
    if not torch.isfinite(t).all():
        bad = t[~torch.isfinite(t)][:3].tolist()
        raise ValueError(f"{name}: expected finite values, got {bad}")
    return t


def _percentile(boot: torch.Tensor, level: float) -> Tuple[float, float]:
    alpha = (1.0 - level) / 2
    lo, hi = torch.quantile(boot, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return lo, hi


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level!r}")


def bootstrap_ci(values, level: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0) -> Dict[str, float]:
    """Mean of ``values`` (one per cluster, e.g. a document's mean recall) with a percentile
    bootstrap interval: ``{"mean", "lo", "hi", "n"}``.

    >>> r = bootstrap_ci([0.5, 0.5, 0.5])                 # a constant: a zero-width interval
    >>> (r["mean"], r["lo"], r["hi"])
    (0.5, 0.5, 0.5)
    """
    _check_level(level)
    x = _vector(values, "bootstrap_ci: values")
    n = x.numel()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)              # [R, n]
    boot = x[idx].mean(1)                                                # [R]
    lo, hi = _percentile(boot, level)
    mean = float(x.mean())
    # Guard against rounding of identical values (quantile of a constant is that constant).
    return {"mean": mean, "lo": min(lo, mean), "hi": max(hi, mean), "n": n}


def paired_bootstrap(a, b, strata: Optional[Sequence] = None, level: float = 0.95,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Dict[str, float]:
    """Difference ``mean(a) - mean(b)`` of paired measurements (``a[i]``, ``b[i]`` on the same
    cluster ``i``) with a percentile bootstrap interval over clusters.

    ``strata`` (one label per pair, e.g. the task): the estimate is the macro average over strata
    of the per-stratum mean difference, and each stratum is resampled within itself.
    Returns ``{"delta", "lo", "hi", "n"}``.

    >>> paired_bootstrap([1, 1, 0, 1], [1, 0, 0, 1])["delta"]
    0.25
    """
    _check_level(level)
    x, y = _vector(a, "paired_bootstrap: a"), _vector(b, "paired_bootstrap: b")
    if x.numel() != y.numel():
        raise ValueError(f"paired_bootstrap: b: expected {x.numel()} values (one per value of a), "
                         f"got {y.numel()}")
    d = x - y
    labels = [0] * d.numel() if strata is None else list(strata)
    if len(labels) != d.numel():
        raise ValueError(f"paired_bootstrap: strata: expected {d.numel()} labels, got "
                         f"{len(labels)}")
    g = torch.Generator().manual_seed(seed)
    groups = [d[[i for i, s in enumerate(labels) if s == key]] for key in dict.fromkeys(labels)]
    boot = torch.zeros(resamples, dtype=torch.float64)
    for grp in groups:                                                   # macro average
        idx = torch.randint(0, grp.numel(), (resamples, grp.numel()), generator=g)
        boot += grp[idx].mean(1) / len(groups)
    delta = float(sum(grp.mean() for grp in groups) / len(groups))
    lo, hi = _percentile(boot, level)
    return {"delta": delta, "lo": min(lo, delta), "hi": max(hi, delta), "n": d.numel()}


def mcnemar(a, b) -> Dict[str, float]:
    """Exact McNemar test of paired outcomes: ``wins`` = pairs with ``a > b``, ``losses`` =
    ``a < b``; p = two-sided binomial probability of a split at least this uneven under
    Binomial(wins + losses, 1/2) (1.0 without discordant pairs).

    >>> mcnemar([1, 1, 1, 0, 1], [0, 0, 0, 0, 1])      # 3 wins, 0 losses: p = 2 / 2^3
    {'wins': 3, 'losses': 0, 'p': 0.25}
    """
    x, y = _vector(a, "mcnemar: a"), _vector(b, "mcnemar: b")
    if x.numel() != y.numel():
        raise ValueError(f"mcnemar: b: expected {x.numel()} values, got {y.numel()}")
    wins, losses = int((x > y).sum()), int((x < y).sum())
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return {"wins": 0, "losses": 0, "p": 1.0}
    # Exact integers: 2.0 ** n overflows a float above 1023 discordant pairs; int / int rounds
    # the quotient once (to 0.0 when it is below the smallest float).
    tail = sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)
    return {"wins": wins, "losses": losses, "p": min(1.0, 2 * tail)}


def t_interval(values, level: float = 0.95) -> Dict[str, float]:
    """Mean with a Student-t interval (``n - 1`` degrees of freedom); n = 1 gives an infinite
    interval."""
    from scipy.stats import t as student_t

    _check_level(level)
    x = _vector(values, "t_interval: values")
    n, mean = x.numel(), float(x.mean())
    if n == 1:
        return {"mean": mean, "lo": -math.inf, "hi": math.inf, "n": 1}
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * float(x.std(unbiased=True)) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


# --- paired task statistics of the evaluation (absparse.eval.evaluation.EvalResult) ------------
# A (task, length) cell decides a comparison only where dense scores at least this (%).
DECIDABLE_DENSE = 80.0


def decidable_cells(result) -> Dict[tuple, float]:
    """Dense accuracy (%) of every (task, length) cell of ``result`` (ppl excluded)."""
    acc: Dict[tuple, list] = {}
    for r in result.records:
        if r["method"] == "dense" and r["task"] != "ppl":
            acc.setdefault((r["task"], r.get("length")), []).append(r["score"])
    return {c: 100.0 * sum(v) / len(v) for c, v in sorted(acc.items())}


def comparisons(methods: Sequence[str]) -> list:
    """``(method, reference, kind)``: every method against its uniform bf16 base (kind
    "vs uniform") and every int8c / int4c method against the bf16 method of the same allocation
    (kind "vs bf16"), where the reference was evaluated."""
    from .evaluation import parse_method

    present, out = set(methods), []
    for m in methods:
        s = parse_method(m)
        if m != s.uniform_base and s.uniform_base in present:
            out.append((m, s.uniform_base, "vs uniform"))
        ref = m.replace("-" + s.format, "")
        if s.format in ("int8c", "int4c") and not s.memory_matched and ref in present:
            out.append((m, ref, "vs bf16"))
    return out


def paired_task_stats(result, decidable_only: bool = False) -> list:
    """Paired accuracy differences (points) of :func:`comparisons` at every budget: the macro
    average over tasks of the per-sample score differences, a 95 % paired bootstrap interval
    (samples resampled within each task) and the exact McNemar / sign test on wins vs losses.
    ``decidable_only``: only samples of (task, length) cells where dense scores >= 80 %."""
    cells = decidable_cells(result)
    keep = {c for c, a in cells.items() if a >= DECIDABLE_DENSE or not decidable_only}
    out = []
    for budget in result.budget_keys():
        rows = {}
        for r in result.records:
            if r["task"] != "ppl" and r["budget"] == budget and \
                    (r["task"], r.get("length")) in keep:
                rows[(r["method"], r["id"])] = r
        for m, ref, kind in comparisons(result.methods):
            ids = sorted(i for (mm, i) in rows if mm == m and (ref, i) in rows)
            if not ids:
                continue
            a = [rows[(m, i)]["score"] for i in ids]
            b = [rows[(ref, i)]["score"] for i in ids]
            boot = paired_bootstrap(a, b, strata=[rows[(m, i)]["task"] for i in ids])
            test = mcnemar(a, b)
            out.append({"method": m, "reference": ref, "kind": kind, "budget": budget,
                        "delta": 100 * boot["delta"], "lo": 100 * boot["lo"],
                        "hi": 100 * boot["hi"], "n": len(ids), "wins": test["wins"],
                        "losses": test["losses"], "p": test["p"]})
    return out


def paired_report(result) -> Tuple[List[str], dict]:
    """Markdown lines (appended to results.md) and the JSON object (paired.json) of the paired
    statistics: dense accuracy per (task, length) with the < 80 % flag, then the differences on
    all samples and on the decidable cells only."""
    cells = decidable_cells(result)
    lines = ["", "## Paired differences with 95 % intervals", "",
             "Points of accuracy, method - reference, on the same samples. Interval: percentile "
             "paired bootstrap (4000 resamples, samples resampled within each task, macro average "
             "over tasks); p: exact McNemar test on the samples one method wins and the other "
             "loses (the sign test for vartrack's fractional scores).", "",
             "Dense accuracy per cell (cells below 80 % are flagged: a method cannot recover what "
             "dense misses, so they dilute every difference):", "",
             "| task | length | dense % | decides |", "|---|---|---|---|"]
    for (task, length), acc in cells.items():
        flag = "ok" if acc >= DECIDABLE_DENSE else "**below 80 %**"
        lines.append(f"| {task} | {length} | {acc:.1f} | {flag} |")
    data = {"dense_cells": [{"task": t, "length": n, "dense": a} for (t, n), a in cells.items()]}
    for scope, only in (("all samples", False), ("decidable cells (dense >= 80 %)", True)):
        stats = paired_task_stats(result, only)
        data["decidable" if only else "all"] = stats
        lines += ["", f"### {scope}", ""]
        if not stats:
            lines.append("(no samples)")
            continue
        lines += ["| comparison | kind | budget | delta [95 % CI] | n | w/l | p |",
                  "|---|---|---|---|---|---|---|"]
        for s in stats:
            lines.append(f"| {s['method']} - {s['reference']} | {s['kind']} | {s['budget']} | "
                         f"{s['delta']:+.1f} [{s['lo']:+.1f}, {s['hi']:+.1f}] | {s['n']} | "
                         f"{s['wins']}/{s['losses']} | {s['p']:.3f} |")
    return lines, data


def samples_for_half_width(wins: int, losses: int, n: int, half_width: float = 2.0,
                           z: float = 1.96) -> Tuple[float, int]:
    """Precision of a paired accuracy difference from ``wins`` / ``losses`` of ``n`` pairs (0/1
    scores): the per-pair difference has variance ``w + l - (w - l)^2`` (shares), so a
    normal-approximation interval has half-width ``z sqrt(var / n)``. Returns (that half-width in
    points, the pairs a +-``half_width``-point interval needs: ``ceil(var (100 z /
    half_width)^2)``, 0 when no pair differs)."""
    if n <= 0 or wins < 0 or losses < 0 or wins + losses > n:
        raise ValueError(f"samples_for_half_width: expected 0 <= wins, losses and wins + losses "
                         f"<= n > 0, got wins {wins}, losses {losses}, n {n}")
    w, l = wins / n, losses / n
    var = w + l - (w - l) ** 2
    return 100 * z * math.sqrt(var / n), math.ceil(var * (100 * z / half_width) ** 2)


class PooledRuns:
    """The records of several evaluation runs (their ``results.jsonl`` lines) as one result for
    :func:`paired_report`: runs over disjoint samples (e.g. ``--first-seed``) with the same
    methods and budgets. A (method, budget, sample) seen twice, or runs whose methods or budgets
    differ, raise ``ValueError`` (pooling them would count a sample twice or pair unlike runs)."""

    def __init__(self, runs: Sequence[Sequence[dict]]):
        if len(runs) < 1:
            raise ValueError("PooledRuns: runs: expected at least one run, got none")
        shapes = []
        for run in runs:
            methods = []
            for r in run:
                if r["method"] not in methods:
                    methods.append(r["method"])
            budgets = sorted({r["budget"] for r in run if r["budget"] is not None})
            shapes.append((methods, budgets))
        for i, shape in enumerate(shapes[1:], 1):
            if sorted(shape[0]) != sorted(shapes[0][0]) or shape[1] != shapes[0][1]:
                raise ValueError(f"PooledRuns: run {i}: expected the methods and budgets of run 0 "
                                 f"{shapes[0]}, got {shape}")
        seen = set()
        self.records = []
        for i, run in enumerate(runs):
            for r in run:
                key = (r["method"], r["budget"], r["id"])
                if key in seen:
                    raise ValueError(f"PooledRuns: run {i}: sample {r['id']!r} of {r['method']} at "
                                     f"budget {r['budget']} is already in an earlier run")
                seen.add(key)
                self.records.append(r)
        self.methods = [m for m in shapes[0][0] if m != "dense"]
        # Budget keys in the order of the runs' records ("4%", "8%", "12.5%", or token counts).
        order = []
        for r in runs[0]:
            if r["budget"] is not None and r["budget"] not in order:
                order.append(r["budget"])
        self._budgets = order

    def budget_keys(self) -> List[str]:
        return list(self._budgets)

    def samples(self) -> int:
        """Task samples (ppl documents excluded), counted by dense's records."""
        return sum(1 for r in self.records if r["method"] == "dense" and r["task"] != "ppl")

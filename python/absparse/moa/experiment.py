"""MoA vs the uniform window on the embedded model: profile, plan, evaluate, report.

    python -m absparse.moa.experiment --out bench/results/moa_<date>

1. Profile the gradient influence at the profiled lengths (and the attention-mass proxy at the
   first one, for the rank-correlation comparison) on calibration text.
2. For every token budget ``b`` (tokens read per KV head, sink included, as AB-Sparse's budget):
   ``moa`` = :func:`absparse.moa.moa_plan` with average span ``b - 64`` at every profiled length;
   ``window`` = its uniform twin (the same average span at every length).
3. ``absparse.eval.evaluation.evaluate`` with those plans (dense prefill, windowed decode), then
   accuracy, KV bytes read per step and a paired bootstrap of MoA - window on the retrieval tasks.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .plan import SINK_TOKENS, MoAPlan, moa_plan, outside_influence
from ..eval.tasks import CALIBRATION_TASKS, check_calibration_tasks
from .profile import compare_profiles, profile_influence

__all__ = ["paired_bootstrap", "main"]

RETRIEVAL = ("passkey", "multikey", "vartrack")


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Mean of ``a - b`` over paired samples and its percentile bootstrap interval.

    Example
    -------
    >>> r = paired_bootstrap([1, 1, 1, 0], [0, 0, 1, 0])
    >>> r["mean"], r["low"] >= 0.0, r["high"] <= 1.0
    (0.5, True, True)
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap: a, b: expected equal non-zero lengths, got "
                         f"{len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    rng = random.Random(seed)
    n = len(d)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return {"mean": sum(d) / n, "low": lo, "high": hi, "n": n}


def _plan_table(plan: MoAPlan) -> str:
    """alpha + beta L per layer x KV head (MoA's (alpha, beta) when den == 8)."""
    lines = ["| layer | " + " | ".join(f"head {h}" for h in range(plan.num_kv_heads)) + " |",
             "|---|" + "---|" * plan.num_kv_heads]
    for i in range(plan.num_layers):
        cells = [f"{int(c) // plan.den} + {int(s)}/{plan.den} L"
                 for c, s in zip(plan.const[i].tolist(), plan.slope[i].tolist())]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--profile-lengths", default="1024,2048")
    p.add_argument("--profile-samples", type=int, default=1)
    p.add_argument("--calibration-tasks", default=",".join(CALIBRATION_TASKS),
                   help="calibration tasks of the profile, cycled (subset of "
                        f"{','.join(CALIBRATION_TASKS)})")
    p.add_argument("--budgets", default="384,512", help="tokens read per KV head (sink included)")
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0,
                   help="first evaluation seed (disjoint runs: the previous run's first + seeds)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None,
                   help="evaluation processes (default: one per CPU core; results do not depend "
                        "on it)")
    args = p.parse_args(argv)
    try:  # checked before the model loads
        cal_tasks = check_calibration_tasks(args.calibration_tasks.split(","))
    except ValueError as e:
        p.error(f"--calibration-tasks: {e}")
    torch.set_num_threads(1)
    from ..eval.evaluation import evaluate
    from ..eval.models import load_model
    from ..eval.tasks import eval_suite

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, tok, src = load_model(device="cpu")
    lengths = [int(x) for x in args.profile_lengths.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    log = lambda *a: print(f"[{time.perf_counter() - started:7.1f} s]", *a, flush=True)

    grad, gmeta = profile_influence(model, tok, lengths, args.profile_samples, "gradient",
                                    progress=lambda n, s: log(f"profiled {s.id} at {n}"),
                                    tasks=cal_tasks)
    log("gradient profile", gmeta)
    mass, mmeta = profile_influence(model, tok, lengths[:1], args.profile_samples, "mass",
                                    tasks=cal_tasks)
    log("mass profile", mmeta)
    corr = compare_profiles(grad[lengths[0]], mass[lengths[0]])
    log("spearman gradient vs mass", corr)
    torch.save({"gradient": grad, "mass": mass, "gradient_meta": gmeta, "mass_meta": mmeta},
               out / "profile.pt")

    plans: Dict[str, Dict[str, MoAPlan]] = {"moa": {}, "window": {}}
    proxy_check = {}
    for b in budgets:
        span = {n: b - SINK_TOKENS for n in lengths}
        plan = moa_plan(grad, span, meta={"profile": "gradient", "token_budget": b})
        plans["moa"][str(b)] = plan
        plans["window"][str(b)] = plan.uniform()
        plan.save(out / f"moa_plan_{b}.json")
        # The proxy's plan at the first length, scored by the gradient influence.
        g1 = {lengths[0]: grad[lengths[0]]}
        pg = moa_plan(g1, {lengths[0]: b - SINK_TOKENS})
        pm = moa_plan({lengths[0]: mass[lengths[0]]}, {lengths[0]: b - SINK_TOKENS})
        same = float(((pg.const == pm.const) & (pg.slope == pm.slope)).double().mean())
        proxy_check[b] = {"same_rule_share": same,
                          "gradient_plan_loss": pg.meta["predicted_loss"],
                          "mass_plan_loss": _loss_under(pm, grad[lengths[0]], lengths[0])}
        log(f"budget {b}: plan loss {plan.meta['predicted_loss']:.4g}", proxy_check[b])

    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)
    samples = eval_suite(count, [int(x) for x in args.lengths.split(",")],
                         tasks=list(RETRIEVAL), depths=[float(x) for x in args.depths.split(",")],
                         seeds_per_cell=args.seeds, ppl_samples=0, first_seed=args.first_seed)
    res = evaluate(model, tok, samples, _NoCalibration(), budgets, methods=[],
                   batch_size=args.batch_size, page_size=64, window_plans=plans,
                   workers=args.workers)
    res.save(out / "results.jsonl")
    elapsed = time.perf_counter() - started
    report = _report(res, budgets, corr, proxy_check, gmeta, mmeta, plans, src, elapsed, argv)
    (out / "results.md").write_text(report)
    print(report)
    return 0


def _loss_under(plan: MoAPlan, influence: torch.Tensor, length: int) -> float:
    """Influence left outside ``plan``'s windows at ``length``."""
    spans = plan.spans(length).flatten().tolist()
    flat = influence.reshape(-1, *influence.shape[-2:])
    return float(sum(outside_influence(flat[h], s, plan.block, plan.sink_tokens)
                     for h, s in enumerate(spans)))


class _NoCalibration:
    """evaluate() needs a calibration only for AB-Sparse methods; none are run here."""
    page_size = 64


def _report(res, budgets, corr, proxy_check, gmeta, mmeta, plans, src, elapsed, argv) -> str:
    import transformers

    from .. import __version__

    lines = [f"# MoA vs uniform window: {src.name}", "",
             f"- date: {datetime.date.today().isoformat()}",
             f"- device: CPU {platform.processor() or platform.machine()}, torch threads 1",
             "- command: `python -m absparse.moa.experiment " + " ".join(
                 shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])) + "`",
             f"- wall time: {elapsed:.0f} s (gradient profile {gmeta['seconds']} s, peak RSS "
             f"{gmeta['peak_rss_mib']} MiB; mass profile {mmeta['seconds']} s; evaluation "
             f"{res.meta['eval_seconds']} s)",
             f"- versions: absparse {__version__}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}",
             f"- profile: {gmeta['samples']} calibration sample(s) per length "
             f"{gmeta['lengths']} (tasks {', '.join(gmeta['tasks'])}; "
             f"chronicle filler, calibration seeds), loss on the dense "
             f"model's own greedy answer ({gmeta['max_new_tokens']} tokens max)",
             f"- evaluation: {res.meta['samples']} samples; dense prefill, every step from the "
             f"last prompt token on with the windows (sink {SINK_TOKENS} + span, blocks of 64)",
             "", "## Gradient influence vs attention-mass proxy", "",
             f"Spearman rank correlation per KV head over the droppable blocks at "
             f"{gmeta['lengths'][0]} tokens: mean {corr['mean']:.3f}, min {corr['min']:.3f}, "
             f"max {corr['max']:.3f} ({corr['heads']} heads).", "",
             "| budget | heads with the same rule | influence lost: gradient plan | mass plan |",
             "|---|---|---|---|"]
    for b, c in proxy_check.items():
        lines.append(f"| {b} | {100 * c['same_rule_share']:.0f}% | {c['gradient_plan_loss']:.4g}"
                     f" | {c['mass_plan_loss']:.4g} |")
    hk = plans["moa"][str(budgets[0])].num_kv_heads
    nl = plans["moa"][str(budgets[0])].num_layers
    d = res.meta["head_dim"]
    per_token = nl * hk * d * 2 * 2            # K and V, bf16, every layer and KV head
    lines += ["", "## Accuracy and KV read per decode step", "",
              f"KV bytes read per step = tokens attended per KV head x {nl} layers x {hk} KV "
              f"heads x D {d} x 2 (K, V) x 2 B (bf16), at the prompt length, mean over samples.",
              "", "| method | budget | " + " | ".join(RETRIEVAL) + " | mean | tokens read / head "
              "| KiB read / step |", "|---|---|" + "---|" * (len(RETRIEVAL) + 3)]
    dense_tokens = [r["prompt_tokens"] for r in res.records if r["method"] == "dense"]
    dt = sum(dense_tokens) / len(dense_tokens)
    lines.append("| dense | - | " + " | ".join(f"{res.accuracy('dense', None, t):.1f}"
                                               for t in RETRIEVAL) +
                 f" | {res.accuracy('dense', None):.1f} | {dt:.0f} | {dt * per_token / 1024:.0f} |")
    for b in budgets:
        for m in ("window", "moa"):
            rows = [r for r in res.records if r["method"] == m and r["budget"] == str(b)]
            tr = sum(r["kv_tokens_read"] for r in rows) / len(rows)
            lines.append(f"| {m} | {b} | " + " | ".join(f"{res.accuracy(m, str(b), t):.1f}"
                                                       for t in RETRIEVAL) +
                         f" | {res.accuracy(m, str(b)):.1f} | {tr:.0f} | "
                         f"{tr * per_token / 1024:.0f} |")
    lines += ["", "## Paired comparison: MoA - window (retrieval tasks)", "",
              "Per-sample score difference (points), mean and paired bootstrap 95 % interval "
              "(10000 resamples, seed 0); w/l = samples MoA scores higher / lower on.", "",
              "| budget | mean | 95 % interval | w/l | excludes 0 |", "|---|---|---|---|---|"]
    for b in budgets:
        moa = {r["id"]: r["score"] for r in res.records if r["method"] == "moa" and
               r["budget"] == str(b)}
        win = {r["id"]: r["score"] for r in res.records if r["method"] == "window" and
               r["budget"] == str(b)}
        ids = sorted(moa)
        bs = paired_bootstrap([100 * moa[i] for i in ids], [100 * win[i] for i in ids])
        w = sum(moa[i] > win[i] for i in ids)
        l = sum(moa[i] < win[i] for i in ids)
        lines.append(f"| {b} | {bs['mean']:+.1f} | [{bs['low']:+.1f}, {bs['high']:+.1f}] | "
                     f"{w}/{l} | {'yes' if bs['low'] > 0 or bs['high'] < 0 else 'no'} |")
    for b in budgets:
        lines += ["", f"## MoA plan at budget {b} (span S(L) per layer x KV head)", "",
                  _plan_table(plans["moa"][str(b)])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

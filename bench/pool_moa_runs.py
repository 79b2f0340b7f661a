"""Pool several MoA experiment runs over disjoint evaluation samples into one paired comparison
(issue 11): the per-sample MoA - uniform window score differences on the retrieval tasks, per
budget, with a paired bootstrap 95 % interval (`absparse.moa.experiment.paired_bootstrap`).

The runs must share their span rules (the same calibration: `python -m absparse.moa.experiment
... --first-seed N` with different N) and their budgets; each run's `results.jsonl` is read and
every sample must have both a `moa` and a `window` score. Markdown goes to stdout.

    python bench/pool_moa_runs.py bench/results/moa_2026-12-02_retrieval_profile \\
        bench/results/moa_2026-12-02_retrieval_profile_seeds5-9 > pooled.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from absparse.moa.experiment import paired_bootstrap


def pooled_scores(runs: list, budget: str) -> tuple:
    """(moa, window): {(run name, sample id): score} of every run at `budget`."""
    moa, win = {}, {}
    for run in runs:
        for line in open(run / "results.jsonl"):
            r = json.loads(line)
            key = (run.name, r["id"])
            if r["method"] == "moa" and r["budget"] == budget:
                moa[key] = r["score"]
            elif r["method"] == "window" and r["budget"] == budget:
                win[key] = r["score"]
    return moa, win


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="directories written by the experiment")
    ap.add_argument("--budgets", default="384,512", help="budgets to compare (default 384,512)")
    args = ap.parse_args(argv)
    for run in args.runs:
        if not (run / "results.jsonl").is_file():
            ap.error(f"{run}: holds no results.jsonl")
    rows = []
    total = None
    for budget in args.budgets.split(","):
        moa, win = pooled_scores(args.runs, budget)
        ids = sorted(moa)
        if not ids or ids != sorted(win):
            ap.error(f"budget {budget}: MoA and window samples do not pair up "
                     f"({len(moa)} vs {len(win)})")
        total = len(ids)
        bs = paired_bootstrap([100 * moa[i] for i in ids], [100 * win[i] for i in ids])
        w = sum(moa[i] > win[i] for i in ids)
        l = sum(moa[i] < win[i] for i in ids)
        ex = "yes" if bs["low"] > 0 or bs["high"] < 0 else "no"
        rows.append(f"| {budget} | {bs['mean']:+.1f} | [{bs['low']:+.1f}, {bs['high']:+.1f}] | "
                    f"{w}/{l} | {len(ids)} | {ex} |")
    print(f"# MoA - window, {len(args.runs)} runs pooled ({total} samples)\n")
    print("Command: `python bench/pool_moa_runs.py " + " ".join(str(r) for r in args.runs)
          + " > pooled.md`\n")
    print("| budget | mean | 95 % interval | w/l | n | excludes 0 |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

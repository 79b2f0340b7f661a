"""Pool several `absparse eval` runs over disjoint samples into one paired analysis (issue 9).

A long evaluation can be run in parts: `absparse eval ... --seeds 30`, later `absparse eval ...
--seeds 60 --first-seed 30` with the same calibration, methods and budgets. This reads each run's
`results.jsonl`, checks that no (method, budget, sample) appears twice and that the runs agree on
methods and budgets, and writes `results.md` (accuracy per method and budget, the paired
differences with 95 % intervals of `absparse.eval.stats.paired_report`, and the samples a +-2 point
interval would need), `paired.json`, `paired_differences.png` (the decidable cells' differences
with their intervals and the goals' bands) and `accuracy_vs_budget.png` (accuracy per method with
95 % intervals) into --out.

    python bench/pool_eval_runs.py --out bench/results/accuracy_2026-12-02_pooled \\
        bench/results/accuracy_2026-12-01_decidable/eval \\
        bench/results/accuracy_2026-12-02_pooled/eval_seeds30-89
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from absparse.eval.evaluation import EvalResult, plot_accuracy, plot_paired_differences
from absparse.eval.stats import PooledRuns, paired_report, samples_for_half_width


def load_run(run_dir: Path) -> list:
    path = run_dir / "results.jsonl"
    if not path.is_file():
        raise SystemExit(f"pool_eval_runs: {run_dir}: holds no results.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def budget_of(key: str):
    """A budget key of the records ("8%", "2048") back to the budget it was made from."""
    return float(key[:-1]) / 100 if key.endswith("%") else int(key)


def accuracy_lines(pooled: PooledRuns) -> list:
    """Accuracy (%) per method and budget over the pooled task samples."""
    keys = pooled.budget_keys()
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for method in ["dense"] + pooled.methods:
        cells = []
        for key in keys:
            rows = [r["score"] for r in pooled.records if r["method"] == method and
                    r["task"] != "ppl" and (method == "dense" or r["budget"] == key)]
            cells.append(f"{100 * sum(rows) / len(rows):.1f} (n {len(rows)})" if rows else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def needed_lines(stats: list) -> list:
    """Samples a 95 % paired interval of +-2 points needs (stats.samples_for_half_width)."""
    lines = ["| comparison | budget | w/l of n | half-width now (normal approx.) "
             "| samples for +-2 |", "|---|---|---|---|---|"]
    for s in stats:
        now, need = samples_for_half_width(s["wins"], s["losses"], s["n"])
        lines.append(f"| {s['method']} - {s['reference']} | {s['budget']} | "
                     f"{s['wins']}/{s['losses']} of {s['n']} | {now:.1f} | "
                     f"{need if need else '- (no pair differs)'} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="evaluation output directories")
    ap.add_argument("--out", type=Path, required=True, help="where results.md / paired.json go")
    args = ap.parse_args(argv)
    try:
        pooled = PooledRuns([load_run(d) for d in args.runs])
    except ValueError as e:
        print(f"pool_eval_runs: {e}", file=sys.stderr)
        return 2
    report, data = paired_report(pooled)
    data["runs"] = [str(d) for d in args.runs]
    data["samples"] = pooled.samples()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# Pooled evaluation runs", "",
             f"Runs (disjoint samples): {', '.join(f'`{d}`' for d in args.runs)}; "
             f"{pooled.samples()} task samples in all.", "",
             "Command: `python bench/pool_eval_runs.py --out " + str(args.out) + " " +
             " ".join(str(d) for d in args.runs) + "`", "", "## Accuracy (%)", ""]
    lines += accuracy_lines(pooled)
    lines += report
    lines += ["", "## Samples for a +-2 point interval (decidable cells)", ""]
    lines += needed_lines(data["decidable"])
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "paired.json").write_text(json.dumps(data, indent=1) + "\n")
    plot_paired_differences(data["decidable"], args.out / "paired_differences.png",
                            f"{pooled.samples()} paired samples")
    result = EvalResult(pooled.records, pooled.methods, [budget_of(k) for k in pooled.budget_keys()],
                        {}, {}, {"title": f"accuracy vs budget, {pooled.samples()} pooled samples"})
    plot_accuracy(result, args.out / "accuracy_vs_budget.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

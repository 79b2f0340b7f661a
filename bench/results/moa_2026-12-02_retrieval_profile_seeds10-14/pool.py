"""Pools the per-sample MoA - window differences of the three retrieval-profile runs (the same
span rules: evaluation seeds 0-4, 5-9 and 10-14): python pool.py > pooled.md"""
import json
from pathlib import Path

from absparse.moa.experiment import paired_bootstrap

here = Path(__file__).resolve().parent
runs = [here.parent / "moa_2026-12-02_retrieval_profile",
        here.parent / "moa_2026-12-02_retrieval_profile_seeds5-9", here]
print("# MoA - window, retrieval profile, three runs pooled (450 samples)\n")
print(f"Command: `python {Path(*here.parts[-3:]) / 'pool.py'} > pooled.md`; runs: "
      + ", ".join(f"`{r.name}`" for r in runs) + "\n")
print("| budget | mean | 95 % interval | w/l | n | excludes 0 |\n|---|---|---|---|---|---|")
for budget in ("384", "512"):
    moa, win = {}, {}
    for run in runs:
        for line in open(run / "results.jsonl"):
            r = json.loads(line)
            key = (run.name, r["id"])
            if r["method"] == "moa" and r["budget"] == budget:
                moa[key] = r["score"]
            elif r["method"] == "window" and r["budget"] == budget:
                win[key] = r["score"]
    ids = sorted(moa)
    assert ids == sorted(win), "unpaired samples"
    bs = paired_bootstrap([100 * moa[i] for i in ids], [100 * win[i] for i in ids])
    w = sum(moa[i] > win[i] for i in ids)
    l = sum(moa[i] < win[i] for i in ids)
    ex = "yes" if bs["low"] > 0 or bs["high"] < 0 else "no"
    print(f"| {budget} | {bs['mean']:+.1f} | [{bs['low']:+.1f}, {bs['high']:+.1f}] | {w}/{l} | "
          f"{len(ids)} | {ex} |")

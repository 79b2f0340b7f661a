"""absparse.eval.stats: intervals on known cases, coverage on simulated samples, McNemar on a
hand-made table, and the paired task statistics on hand-written evaluation records."""
import pytest
import torch

from absparse.eval.stats import (PooledRuns, bootstrap_ci, comparisons, decidable_cells,
                                 mcnemar, paired_bootstrap, paired_task_stats,
                                 samples_for_half_width, t_interval)


def test_constant_sample_has_a_zero_width_interval():
    r = bootstrap_ci([0.731] * 7)
    assert r["lo"] == r["mean"] == r["hi"] == pytest.approx(0.731, abs=1e-15)
    d = paired_bootstrap([1.0, 0.5, 0.25], [0.5, 0.0, -0.25])          # every difference 0.5
    assert d["lo"] == d["delta"] == d["hi"] == pytest.approx(0.5, abs=1e-15)


def test_interval_is_seeded_and_contains_the_mean():
    x = [0.1, 0.4, 0.35, 0.8, 0.2]
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    r = bootstrap_ci(x)
    assert r["mean"] == pytest.approx(0.37) and r["lo"] < r["mean"] < r["hi"]
    assert min(x) <= r["lo"] and r["hi"] <= max(x)                    # a mean of resamples


def test_mcnemar_hand_table():
    # 7 pairs won by a (1 vs 0), 2 lost (0 vs 1), 5 ties: p = 2 * P(X <= 2), X ~ Bin(9, 1/2)
    # = 2 * (1 + 9 + 36) / 512 = 0.1796875
    a = [1] * 7 + [0] * 2 + [1] * 3 + [0] * 2
    b = [0] * 7 + [1] * 2 + [1] * 3 + [0] * 2
    assert mcnemar(a, b) == {"wins": 7, "losses": 2, "p": pytest.approx(0.1796875, abs=1e-15)}
    assert mcnemar(b, a)["p"] == mcnemar(a, b)["p"]                    # two sided
    assert mcnemar([1, 0], [1, 0]) == {"wins": 0, "losses": 0, "p": 1.0}
    assert mcnemar([1] * 5, [0] * 5)["p"] == pytest.approx(2 / 32)    # p capped at 1 elsewhere
    assert mcnemar([1, 0], [0, 1])["p"] == 1.0
    # more than 1023 discordant pairs (2.0 ** n would overflow): 600 / 600 gives p = min(1,
    # 2 P(X <= 600)) = 1; 1100 / 0 gives p = 2 / 2^1100, below the smallest float: 0.0
    assert mcnemar([1] * 600 + [0] * 600, [0] * 600 + [1] * 600)["p"] == 1.0
    assert mcnemar([1] * 1100, [0] * 1100) == {"wins": 1100, "losses": 0, "p": 0.0}
    # 560 / 540 of 1100: p = 2 P(X <= 540), X ~ Bin(1100, 1/2); normal approximation with
    # continuity correction: z = (550 - 540.5) / sqrt(275) = 0.5729, p = 0.567
    assert mcnemar([1] * 560 + [0] * 540, [0] * 560 + [1] * 540)["p"] == pytest.approx(0.567,
                                                                                         abs=2e-3)


def test_coverage_on_simulated_samples():
    """95 % intervals of the mean of 40 normal draws cover the true mean in about 95 % of 400
    repetitions. Binomial sd of the coverage is sqrt(.95 * .05 / 400) = 1.1 %; the percentile
    bootstrap under-covers by ~1 % at n = 40, so [0.90, 0.985] catches a wrong quantile (a 90 %
    or 99 % interval) but not sampling noise."""
    g = torch.Generator().manual_seed(1)
    hits_b = hits_t = 0
    reps = 400
    for i in range(reps):
        x = (2.0 + 3.0 * torch.randn(40, generator=g, dtype=torch.float64)).tolist()
        b = bootstrap_ci(x, resamples=1000, seed=i)
        t = t_interval(x)
        hits_b += b["lo"] <= 2.0 <= b["hi"]
        hits_t += t["lo"] <= 2.0 <= t["hi"]
    assert 0.90 <= hits_b / reps <= 0.985, hits_b / reps
    assert 0.92 <= hits_t / reps <= 0.985, hits_t / reps


def test_paired_bootstrap_is_a_macro_average_over_strata():
    # task A: differences 1, 1, 1, 1 (mean 1); task B: 0, 0 (mean 0) -> macro 0.5, not 4/6
    a = [1, 1, 1, 1, 0, 1]
    b = [0, 0, 0, 0, 0, 1]
    d = paired_bootstrap(a, b, strata=["A"] * 4 + ["B"] * 2)
    assert d["delta"] == pytest.approx(0.5) and d["lo"] == d["hi"] == pytest.approx(0.5)
    assert paired_bootstrap(a, b)["delta"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="b: expected 6 values"):
        paired_bootstrap(a, b[:5])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(a, level=95)


class _Result:
    """The parts of EvalResult that the paired statistics read."""

    def __init__(self, records, methods, budgets):
        self.records, self.methods, self._b = records, methods, budgets

    def budget_keys(self):
        return self._b


def _records():
    rows = []
    # passkey @1024: dense 4/4 (decidable); vartrack @1024: dense 1/4 (flagged)
    for i in range(4):
        rows.append({"method": "dense", "budget": None, "task": "passkey", "length": 1024,
                     "id": f"p{i}", "score": 1.0})
        rows.append({"method": "dense", "budget": None, "task": "vartrack", "length": 1024,
                     "id": f"v{i}", "score": float(i == 0)})
    for m, pk, vt in (("quest", [1, 0, 0, 0], [0, 0, 0, 0]),
                      ("ab-quest", [1, 1, 1, 0], [0, 0, 0, 1]),
                      ("ab-quest-int4c", [1, 1, 0, 0], [0, 0, 0, 1])):
        for i in range(4):
            rows.append({"method": m, "budget": "4%", "task": "passkey", "length": 1024,
                         "id": f"p{i}", "score": float(pk[i])})
            rows.append({"method": m, "budget": "4%", "task": "vartrack", "length": 1024,
                         "id": f"v{i}", "score": float(vt[i])})
    return rows


def test_paired_task_stats_by_hand():
    methods = ["quest", "ab-quest", "ab-quest-int4c"]
    assert comparisons(methods) == [("ab-quest", "quest", "vs uniform"),
                                    ("ab-quest-int4c", "quest", "vs uniform"),
                                    ("ab-quest-int4c", "ab-quest", "vs bf16")]
    res = _Result(_records(), methods, ["4%"])
    assert decidable_cells(res) == {("passkey", 1024): 100.0, ("vartrack", 1024): 25.0}
    every = {(s["method"], s["reference"]): s for s in paired_task_stats(res)}
    # ab-quest - quest: passkey (3 - 1) / 4 = +50, vartrack (1 - 0) / 4 = +25 -> macro +37.5;
    # wins p1, p2, v3, no loss -> p = 2 / 2^3
    s = every[("ab-quest", "quest")]
    assert (s["delta"], s["n"], s["wins"], s["losses"]) == (pytest.approx(37.5), 8, 3, 0)
    assert s["p"] == pytest.approx(0.25) and s["lo"] <= 37.5 <= s["hi"]
    # int4c - bf16: passkey (2 - 3) / 4 = -25, vartrack 0 -> -12.5; one loss (p2)
    s = every[("ab-quest-int4c", "ab-quest")]
    assert (s["delta"], s["wins"], s["losses"], s["p"]) == (pytest.approx(-12.5), 0, 1, 1.0)
    # decidable cells only: passkey alone -> int4c - bf16 = -25 over 4 samples
    dec = {(s["method"], s["reference"]): s for s in paired_task_stats(res, True)}
    assert dec[("ab-quest-int4c", "ab-quest")]["delta"] == pytest.approx(-25.0)
    assert dec[("ab-quest-int4c", "ab-quest")]["n"] == 4


def test_pooled_runs_equal_one_run_of_all_samples():
    """Two runs over disjoint samples pooled give the statistics of one run holding them all;
    a sample in both runs, or runs of other methods, raise."""
    rows = _records()
    first = [r for r in rows if r["id"] in ("p0", "p1", "v0", "v1")]
    second = [r for r in rows if r["id"] in ("p2", "p3", "v2", "v3")]
    pooled = PooledRuns([first, second])
    assert pooled.methods == ["quest", "ab-quest", "ab-quest-int4c"]
    assert pooled.budget_keys() == ["4%"] and pooled.samples() == 8
    whole = paired_task_stats(_Result(rows, pooled.methods, ["4%"]))
    assert paired_task_stats(pooled) == whole
    with pytest.raises(ValueError, match="run 1: sample 'p0' of dense"):
        PooledRuns([first, first])
    with pytest.raises(ValueError, match="run 1: expected the methods and budgets of run 0"):
        PooledRuns([first, [r for r in second if r["method"] != "ab-quest"]])
    with pytest.raises(ValueError, match="at least one run"):
        PooledRuns([])


def test_samples_for_half_width_by_hand():
    """10 wins, 20 losses of 300: var = 0.1 - (1/30)^2 = 0.09889; half-width 1.96 sqrt(var / 300)
    = 3.56 points; +-2 needs ceil(0.09889 x 98^2) = 950 pairs. No differing pair: 0, 0."""
    now, need = samples_for_half_width(10, 20, 300)
    assert now == pytest.approx(3.5586, abs=1e-3) and need == 950
    assert samples_for_half_width(0, 0, 300) == (0.0, 0)
    with pytest.raises(ValueError, match="wins 200, losses 200, n 300"):
        samples_for_half_width(200, 200, 300)

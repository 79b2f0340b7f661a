"""EvalResult (accuracy, nll, disagreement, compare, pairs, goal) and the report on hand-written
records, where every expected figure is worked out by hand in the comments. No model needed."""
import math

import pytest

from absparse.eval.models import have_eval_dependencies

_missing = have_eval_dependencies()
pytestmark = pytest.mark.skipif(_missing is not None, reason=f"evaluation stack: {_missing}")

METHODS = ["quest", "ab-quest", "ab-quest-int4c"]
BUDGETS = [128, 0.5]                                             # keys "128" and "50%"


def _rows(method, budget, passkey, vartrack, ppl=((6.0, 4), (2.0, 12))):
    """Records of one (method, budget): passkey samples p0, p1, vartrack v0 (scores), ppl
    documents d0, d1 ((nll sum, tokens))."""
    rows = [{"id": f"p{i}", "task": "passkey", "score": s} for i, s in enumerate(passkey)]
    rows += [{"id": f"v{i}", "task": "vartrack", "score": s} for i, s in enumerate(vartrack)]
    rows += [{"id": f"d{i}", "task": "ppl", "nll": n, "tokens": t} for i, (n, t) in enumerate(ppl)]
    for r in rows:
        r.update(method=method, budget=budget)
    return rows


@pytest.fixture()
def result():
    from absparse.eval.evaluation import EvalResult

    records = (_rows("dense", None, [1.0, 1.0], [0.5])
               + _rows("quest", "128", [1.0, 0.0], [0.0], ppl=((8.0, 4), (8.0, 12)))
               + _rows("ab-quest", "128", [1.0, 1.0], [1.0])
               + _rows("ab-quest-int4c", "128", [0.0, 1.0], [0.5])
               + _rows("quest", "50%", [1.0, 1.0], [0.5])
               + _rows("ab-quest", "50%", [1.0, 1.0], [0.5])
               # no vartrack row at 50%: its macro average is over passkey alone
               + [r for r in _rows("ab-quest-int4c", "50%", [0.0, 0.0], []) if r["task"] != "ppl"])
    stats = {"ab-quest-int4c": {"128": {"selected": 200, "differ": 30},
                                "50%": {"selected": 0, "differ": 0}}}
    return EvalResult(records, METHODS, BUDGETS, {}, stats)


def test_accuracy_and_nll(result):
    assert result.task_names() == ["passkey", "vartrack"]           # ppl is not a task score
    assert result.budget_keys() == ["128", "50%"]
    # dense: passkey 100, vartrack 50 -> macro 75 (the dense rows match every budget)
    assert result.accuracy("dense", None, "passkey") == 100.0
    assert result.accuracy("dense", None, "vartrack") == 50.0
    assert result.accuracy("dense", None) == 75.0
    # quest@128: passkey (1 + 0) / 2 = 50, vartrack 0 -> 25; ab-quest@128: 100; int4c@128: 50
    assert result.accuracy("quest", "128") == 25.0
    assert result.accuracy("ab-quest", "128") == 100.0
    assert result.accuracy("ab-quest-int4c", "128", "passkey") == 50.0
    assert result.accuracy("ab-quest-int4c", "128") == 50.0
    # a task without rows is NaN and left out of the macro average: int4c@50% = passkey 0
    assert math.isnan(result.accuracy("ab-quest-int4c", "50%", "vartrack"))
    assert result.accuracy("ab-quest-int4c", "50%") == 0.0
    assert math.isnan(result.accuracy("quest", "25%"))              # no rows at all
    # NLL per token over all ppl documents: (6 + 2) / (4 + 12) = 0.5 (not the mean of 1.5, 1/6)
    assert result.nll("dense", None) == 0.5
    assert result.nll("quest", "128") == 1.0                         # (8 + 8) / 16
    assert math.isnan(result.nll("ab-quest-int4c", "50%"))          # no ppl rows


def test_disagreement(result):
    assert result.disagreement("ab-quest-int4c", "128") == 0.15     # 30 / 200
    assert result.disagreement("ab-quest-int4c", "50%") is None     # nothing selected
    assert result.disagreement("quest", "128") is None              # not measured


def test_compare_pairs_and_goal(result):
    # ab-quest vs quest @128: 100 - 25 = +75 points; p1 (1 > 0) and v0 (1 > 0) win, none lose
    assert result.compare("ab-quest", "quest", "128") == {"delta": 75.0, "wins": 2, "losses": 0}
    # int4c vs ab-quest @128: 50 - 100; p0 (0 < 1) and v0 (0.5 < 1) lose
    assert result.compare("ab-quest-int4c", "ab-quest", "128") == {"delta": -50.0, "wins": 0,
                                                                  "losses": 2}
    # @50%: 0 - 75 = -75; p0, p1 lose; v0 has no int4c row and is not compared
    assert result.compare("ab-quest-int4c", "ab-quest", "50%") == {"delta": -75.0, "wins": 0,
                                                                  "losses": 2}
    pairs = [("ab-quest", "quest", "adaptive"), ("ab-quest-int4c", "ab-quest", "int4c")]
    assert result.pairs() == pairs
    goal = result.goal()                                             # at the first budget, 128
    assert goal["budget"] == "128" and goal["dense"] == 75.0
    assert goal["pairs"] == [p + (result.compare(p[0], p[1], "128"),) for p in pairs]


def test_paired_differences_plot(result, tmp_path):
    """One row per comparison and budget where some sample differs, with the statistics' estimate
    and interval; a comparison no sample separates is left out."""
    from absparse.eval.evaluation import plot_paired_differences
    from absparse.eval.stats import paired_task_stats

    stats = paired_task_stats(result)
    drawn = plot_paired_differences(stats, tmp_path / "paired.png", "test")
    assert (tmp_path / "paired.png").stat().st_size > 0
    expect = [(s["kind"], f"{s['method']} - {s['reference']}", s["budget"], s["delta"], s["lo"],
               s["hi"]) for k in ("vs uniform", "vs bf16") for s in stats
              if s["kind"] == k and (s["wins"] or s["losses"])]
    assert drawn == expect
    # ab-quest vs quest at 50%: the same scores on every sample -> no row; at 128 it differs
    labels = {(d[1], d[2]) for d in drawn}
    assert ("ab-quest - quest", "50%") not in labels and ("ab-quest - quest", "128") in labels
    assert all(lo <= delta <= hi for _, _, _, delta, lo, hi in drawn)


def test_accuracy_plot_intervals(result, tmp_path):
    """Each series point is EvalResult.accuracy with a 95 % interval around it; a method whose
    samples all agree has a zero-width interval."""
    from absparse.eval.evaluation import accuracy_interval, plot_accuracy

    drawn = plot_accuracy(result, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 0
    assert list(drawn) == METHODS
    for m, series in drawn.items():
        assert [b for b, *_ in series] == ["128", "50%"]
        for b, acc, lo, hi in series:
            assert acc == pytest.approx(result.accuracy(m, b)) and lo <= acc <= hi
    # ab-quest at 50%: passkey 1, 1 and vartrack 0.5 -> every resample 75, no spread
    assert accuracy_interval(result, "ab-quest", "50%") == {"acc": 75.0, "lo": 75.0, "hi": 75.0,
                                                            "n": 3}
    dense = accuracy_interval(result, "dense", None)
    assert dense["acc"] == pytest.approx(75.0) and dense["n"] == 3


def test_report_figures(result, tmp_path):
    from absparse.eval.evaluation import write_report

    text = write_report(result, tmp_path / "results.md")
    assert text == (tmp_path / "results.md").read_text()
    lines = text.splitlines()
    assert "| dense | 0 | 75.0 | 75.0 |" in lines
    assert "| quest | - | 25.0 | 75.0 |" in lines                    # 50%: (100 + 50) / 2
    assert "| ab-quest-int4c | 128 | 50.0 | 50.0 | 0.500 |" in lines
    assert "| ab-quest-int4c | 50% | 0.0 | - | - |" in lines         # no rows: "-"
    assert "| ab-quest-int4c | 15.00 | - |" in lines                  # disagreement in %
    assert "| quest |" not in text.split("## Selection disagreement")[1].split("## Goal")[0]
    assert "- ab-quest vs quest: +75.0 points (2/0): met" in lines
    assert "- ab-quest-int4c vs ab-quest: -50.0 points (0/2): not met" in lines
    # paired statistics (absparse.eval.stats): ab-quest - quest @128 = macro of passkey
    # (1 + 1 - 1 - 0) / 2 = +50 and vartrack +100 -> +75, wins p1 and v0 -> McNemar p = 2 / 4
    paired = text.split("## Paired differences")[1]
    assert "| passkey | None | 100.0 | ok |" in paired
    assert "| vartrack | None | 50.0 | **below 80 %** |" in paired
    row = next(l for l in paired.splitlines()
               if l.startswith("| ab-quest - quest | vs uniform | 128"))
    assert "| +75.0 [" in row and row.endswith("| 3 | 2/0 | 0.500 |"), row
    assert (tmp_path / "paired.json").is_file()

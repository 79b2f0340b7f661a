"""Generated evaluation tasks: deterministic per seed, answers in the prompts, calibration text
disjoint from evaluation text. Token counts use a whitespace counter (no tokenizer needed)."""
import re

import pytest

from absparse.eval import tasks

count = lambda s: len(s.split())          # stands in for a tokenizer's length
EVAL_TASKS = ("passkey", "multikey", "vartrack")


def _sentences(text: str) -> set:
    return {s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()}


@pytest.mark.parametrize("task", tasks.TASKS)
def test_deterministic_per_seed(task):
    a = tasks.make_sample(task, 600, 0.3, 7, count)
    b = tasks.make_sample(task, 600, 0.3, 7, count)
    c = tasks.make_sample(task, 600, 0.3, 8, count)
    assert a == b and a.prompt == b.prompt and a.answers == b.answers
    assert c.prompt != a.prompt


@pytest.mark.parametrize("task", EVAL_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_answers_present_and_length(task, depth):
    s = tasks.make_sample(task, 800, depth, 3, count)
    for a in s.answers:
        assert a in s.prompt, (task, a)
    # The generated text is sized to the target (whitespace tokens here).
    assert 700 <= count(s.prompt) <= 820, count(s.prompt)
    assert s.max_new_tokens > 0 and s.split == "eval" and s.filler == "essay"


def test_needle_depth_is_respected():
    shallow = tasks.make_sample("passkey", 1000, 0.1, 1, count)
    deep = tasks.make_sample("passkey", 1000, 0.9, 1, count)
    pos = lambda s: s.prompt.index(f"The pass key is {s.answers[0]}") / len(s.prompt)
    assert pos(shallow) < 0.25 and pos(deep) > 0.75


def test_vartrack_chain_and_decoy():
    s = tasks.make_sample("vartrack", 800, 0.2, 5, count)
    value = s.meta["value"]
    assert f"VAR {s.answers[0]} = {value}." in s.prompt
    assert f"VAR {s.answers[1]} = VAR {s.answers[0]}." in s.prompt
    assert not set(s.answers) & set(s.meta["decoy"])
    assert tasks.score_output(s, f" {s.answers[0]} and {s.answers[1]}") == 1.0
    assert tasks.score_output(s, f" {s.answers[0]}") == 0.5


def test_ppl_continuation_repeats_an_earlier_paragraph():
    s = tasks.make_sample("ppl", 900, 0.5, 2, count)
    assert s.answers[0] in s.prompt                       # the far copy is in the context
    assert not s.prompt.rstrip().endswith(s.answers[0])   # ... and not as the last paragraph
    with pytest.raises(ValueError):
        tasks.score_output(s, "x")


def test_calibration_and_evaluation_are_disjoint():
    ev = tasks.eval_suite(count, [600, 900], depths=(0.1, 0.5, 0.9), seeds_per_cell=2,
                          ppl_samples=3, fillers=("essay", "noise"))
    cal = tasks.calibration_texts(count, 9, 900)
    assert all(s.split == "eval" for s in ev) and all(s.split == "calib" for s in cal)
    ev_sent = set().union(*(_sentences(s.prompt) for s in ev))
    cal_sent = set().union(*(_sentences(s.prompt) for s in cal))
    # Instruction lines are shared by design (same task wording); the text itself never is.
    shared = {x for x in ev_sent & cal_sent if not x.startswith(tuple(_INSTRUCTIONS))}
    assert not shared, sorted(shared)[:5]
    assert not {a for s in ev for a in s.answers} & {a for s in cal for a in s.answers}
    assert {s.prompt for s in ev}.isdisjoint({s.prompt for s in cal})


_INSTRUCTIONS = ("There is an important info", "Find it and memorize it", "I will quiz",
                 "Some special magic numbers", "Make sure to memorize", "I will quiz you",
                 "What is the", "Remember it", "The pass key is")


def test_suite_size_and_split_checks():
    ev = tasks.eval_suite(count, [500], tasks=EVAL_TASKS, depths=(0.2, 0.8), seeds_per_cell=2,
                          ppl_samples=1)
    assert len(ev) == 3 * 2 * 2 + 1
    assert len({s.id for s in ev}) == len(ev)
    with pytest.raises(ValueError, match="filler"):
        tasks.make_sample("passkey", 500, 0.5, 0, count, split="calib", filler="essay")
    with pytest.raises(ValueError, match="task"):
        tasks.make_sample("qa", 500, 0.5, 0, count)
    with pytest.raises(ValueError, match="depth"):
        tasks.make_sample("passkey", 500, 1.5, 0, count)


def test_first_seed_continues_a_run_with_new_samples():
    """--first-seed N draws the seeds after a run of N: seeds 0-1 then 2-3 give the samples of
    seeds 0-3, with no sample twice."""
    kw = dict(tasks=["passkey"], depths=(0.3, 0.7))
    first = tasks.eval_suite(count, [400], seeds_per_cell=2, **kw)
    later = tasks.eval_suite(count, [400], seeds_per_cell=2, first_seed=2, **kw)
    whole = tasks.eval_suite(count, [400], seeds_per_cell=4, **kw)
    assert {s.id for s in first}.isdisjoint({s.id for s in later})
    assert sorted(s.id for s in first + later) == sorted(s.id for s in whole)
    by_id = {s.id: s.prompt for s in whole}
    assert all(by_id[s.id] == s.prompt for s in first + later)


def test_score_output_string_match():
    s = tasks.make_sample("passkey", 400, 0.5, 0, count)
    assert tasks.score_output(s, f" {s.answers[0]}.") == 1.0
    assert tasks.score_output(s, " 12") == 0.0


def test_calibration_tasks_cycle_and_reject_unknown_names():
    """calibration_texts cycles through the tasks it is given (the MoA profile's
    --calibration-tasks); the default keeps the order passkey, multikey, ppl; a task outside
    CALIBRATION_TASKS (vartrack is evaluation-only) or an empty list raises ValueError."""
    default = tasks.calibration_texts(count, 4, 600)
    assert [s.task for s in default] == ["passkey", "multikey", "ppl", "passkey"]
    only = tasks.calibration_texts(count, 3, 600, tasks=("multikey", "passkey"))
    assert [s.task for s in only] == ["multikey", "passkey", "multikey"]
    assert all(s.split == "calib" for s in only)
    for bad in [("vartrack",), (), ("passkey", "essay")]:
        with pytest.raises(ValueError, match="calibration_texts: tasks"):
            tasks.calibration_texts(count, 2, 600, tasks=bad)

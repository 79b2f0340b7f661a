"""Where the non-attention time of a decode step goes: kernels of one LlamaRunner step by kind.

The Llama-3.1-8B-shaped model of bench/e2e_bench.py (random bf16 weights, random KV at the full
context, SDPA attention as the e2e benchmark's dense baseline), per shape:
  - the step as a CUDA graph (median of replays) and its attention alone (second graph);
  - one eager step under torch.profiler: every kernel's duration, summed by kind (matrix products,
    attention, everything else), with the kernel count per kind. In a graph the kernels run back
    to back, so step - sum of kernel times is the cost of the gaps between them.

  python bench/profile_model_step.py                 # B1 and B8 at 32K
  python bench/profile_model_step.py --shapes 1x32768 4x131072
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from e2e_bench import LLAMA_31_8B, PAGE, Timer, capture, sdpa_attention, weight_bytes  # noqa: E402

from absparse.runner import LlamaRunner  # noqa: E402

# Kernel names of the matrix products (cuBLAS / cuBLASLt / CUTLASS) and of the attention.
GEMM_HINTS = ("gemm", "gemv", "xmma", "nvjet", "cutlass", "splitk", "splitK")
ATTENTION_HINTS = ("flash", "fmha", "attention", "select_kernel", "update_kernel", "merge")


def kind(name: str) -> str:
    if any(h in name for h in ATTENTION_HINTS):
        return "attention"
    if any(h in name for h in GEMM_HINTS):
        return "matmul"
    return "other"


def profile_shape(batch: int, context: int, reps: int) -> None:
    device = torch.device("cuda")
    runner = LlamaRunner.from_config(LLAMA_31_8B, torch.bfloat16, device, seed=0,
                                     batch_size=batch, max_context=context + PAGE, mode="dense",
                                     page_size=PAGE)
    runner.attend_layer = sdpa_attention(runner, context + 1)
    runner.tokens.random_(0, LLAMA_31_8B["vocab_size"])
    timer = Timer(device, reps)
    reset = lambda: runner.seq_lens.fill_(context)  # noqa: E731
    reset()
    step_us = timer.time(capture(device, runner.decode_step), reset)
    q = torch.randn(batch, LLAMA_31_8B["num_attention_heads"], LLAMA_31_8B["head_dim"],
                    device=device, dtype=torch.bfloat16)
    runner.seq_lens.fill_(context + 1)
    layers = LLAMA_31_8B["num_hidden_layers"]
    attn_us = timer.time(capture(device, lambda: [runner.attend_layer(i, q, runner.attn_out)
                                                  for i in range(layers)]))

    reset()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.decode_step()
        torch.cuda.synchronize()
    total = collections.defaultdict(float)
    count = collections.Counter()
    by_name = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        k = kind(e.name)
        total[k] += e.device_time
        count[k] += 1
        by_name[(k, e.name[:90])] += e.device_time
    kernels_us = sum(total.values())
    w_gb = weight_bytes(runner) / 1e9
    print(f"\n== B{batch}/{context // 1024}K: graph step {step_us:.0f} us, attention alone "
          f"{attn_us:.0f} us, rest {step_us - attn_us:.0f} us; weights {w_gb:.2f} GB")
    print("| kind | kernels | sum of kernel times us | per kernel us |")
    print("|---|---|---|---|")
    for k in ("matmul", "attention", "other"):
        print(f"| {k} | {count[k]} | {total[k]:.0f} | {total[k] / max(count[k], 1):.2f} |")
    print(f"| all | {sum(count.values())} | {kernels_us:.0f} | |")
    print(f"matmul kernels: {w_gb / (total['matmul'] * 1e-6):.0f} GB/s of weights; graph step - "
          f"kernel sum = {step_us - kernels_us:.0f} us")
    print("top kernels by time:")
    for (k, name), us in sorted(by_name.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {us:8.0f} us  {k:9s} {name}")
    del runner
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=["1x32768", "8x32768"],
                   help="BATCHxCONTEXT entries")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for shape in args.shapes:
        b, c = (int(x) for x in shape.split("x"))
        profile_shape(b, c, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

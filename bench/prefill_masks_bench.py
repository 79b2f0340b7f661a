"""Mask building (FlexPrefill, PBS-Attn) on the GPU against dense causal attention, same run.

Llama-3.1-8B attention (32 query / 8 KV heads, D 128, bf16), batch 1, prompts of 32K and 128K
tokens, blocks of 128, the builders' defaults (FlexPrefill gamma 0.9, tau 0.1, min budget 1024;
PBS-Attn segments of 256, threshold 0.9), max_len passed (no host synchronisation). Rows:
flexprefill_mask; pbs_permute + pbs_mask (one call sequence); dense = the faster of SDPA's flash
and cuDNN backends, causal, on the same tensors in [1, H, L, D] form. Each time is the median of
CUDA-event timings of single calls after a warm-up; ratio = builder / dense (issue 7's target:
<= 10 % at 128K).

  python bench/prefill_masks_bench.py [--quick] [--reps N] [--json out.json]
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

import absparse as ab

# The shapes and the timer of the prefill benchmark (same directory, same run conditions).
from prefill_bench import BLOCK, DTYPE, HK, HQ, D, timed  # noqa: E402


def dense_ms(q, k, v, reps: int):
    """Fastest of flash / cuDNN causal SDPA: (ms, backend name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))   # [1, H, L, D]
    best = None
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                ms = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                                   enable_gqa=True), reps)
        except RuntimeError as err:  # backend not available for these arguments
            print(f"  {backend.name}: unavailable ({str(err).splitlines()[0][:80]})",
                  file=sys.stderr)
            continue
        if best is None or ms < best[0]:
            best = (ms, backend.name.lower())
    return best


def run(length: int, reps: int):
    gen = torch.Generator(device="cuda").manual_seed(length)
    q = torch.randn(length, HQ, D, generator=gen, device="cuda", dtype=DTYPE)
    k = torch.randn(length, HK, D, generator=gen, device="cuda", dtype=DTYPE)
    v = torch.randn(length, HK, D, generator=gen, device="cuda", dtype=DTYPE)
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    flex = timed(lambda: ab.flexprefill_mask(q, k, cu, BLOCK, max_len=length), reps)

    def pbs():
        kp, vp, pos = ab.pbs_permute(q, k, v, cu, BLOCK, 256, max_len=length)
        return ab.pbs_mask(q, kp, cu, pos, BLOCK, 256, max_len=length)

    pbs_ms = timed(pbs, reps)
    permute = timed(lambda: ab.pbs_permute(q, k, v, cu, BLOCK, 256, max_len=length), reps)
    # Where FlexPrefill's time goes: its two primitives called alone (the rest: the pattern test
    # and the coverage selections).
    last_block = timed(lambda: ab.last_block_attention(q, k, cu, BLOCK, max_len=length), reps)
    pooled = timed(lambda: ab.pooled_block_scores(q, k, cu, BLOCK, max_len=length), reps)
    dense = dense_ms(q, k, v, reps)
    _, _, info = ab.flexprefill_mask(q, k, cu, BLOCK, max_len=length)
    _, _, pinfo = pbs()
    return {"length": length, "dense_ms": dense[0], "dense_backend": dense[1],
            "flexprefill_ms": flex, "pbs_ms": pbs_ms, "pbs_permute_ms": permute,
            "last_block_attention_ms": last_block, "pooled_block_scores_ms": pooled,
            "flexprefill_ratio": flex / dense[0], "pbs_ratio": pbs_ms / dense[0],
            "flexprefill_density": float(info["density"].mean()),
            "flexprefill_query_aware": int((info["pattern"] == 1).sum()),
            "pbs_density": float(pinfo["density"].mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32K only")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per row (median)")
    parser.add_argument("--json", help="write the rows and the device here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("prefill_masks_bench: needs a CUDA device")
    device = torch.cuda.get_device_name()
    rows = [run(n, args.reps) for n in ([32768] if args.quick else [32768, 131072])]
    print(f"device: {device}; Hq {HQ}, Hk {HK}, D {D}, {str(DTYPE)[6:]}, batch 1, block {BLOCK}; "
          f"median of {args.reps} (ms)")
    print("| L | dense (backend) | flexprefill_mask | ratio | pbs_permute + pbs_mask "
          "(permute) | ratio | density flex / pbs (query-aware heads) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['length'] // 1024}K | {r['dense_ms']:.2f} ({r['dense_backend']}) | "
              f"{r['flexprefill_ms']:.2f} | {100 * r['flexprefill_ratio']:.1f} % | "
              f"{r['pbs_ms']:.2f} ({r['pbs_permute_ms']:.2f}) | {100 * r['pbs_ratio']:.1f} % | "
              f"{r['flexprefill_density']:.3f} / {r['pbs_density']:.3f} "
              f"({r['flexprefill_query_aware']}) |")
    print()
    print("FlexPrefill's primitives alone (ms): " + "; ".join(
        f"{r['length'] // 1024}K last_block_attention {r['last_block_attention_ms']:.2f}, "
        f"pooled_block_scores {r['pooled_block_scores_ms']:.2f}" for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "reps": args.reps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""Block-sparse prefill (absparse.sparse_prefill on CUDA) against dense causal SDPA on one GPU.

Llama-3.1-8B attention (32 query / 8 KV heads, D 128, bf16), batch 1, prompts of 32K and 128K
tokens, blocks of 128 (one list per KV head): every causal block (the kernel as dense causal
attention), then 30 % and 10 % of the causal blocks (each query block keeps block 0, its diagonal
block and a random share of the others). SDPA = the faster of the flash and cuDNN backends,
causal, on the same tensors in [1, H, L, D] form. Each time is the median of CUDA-event timings
of single launches (compute-bound: no L2 flush needed). TFLOP/s counts the attended (query, key)
pairs: 4 D per pair and query head (QK and PV). The dense bf16 rate of the device is measured
beside it (an 8192^3 matmul). --kernels times several CUDA kernels of the op side by side
(`kernel` argument of sparse_prefill: auto, fa2 = mma.sync, sm90 = warpgroup MMA + TMA), one row
per kernel on the same lists.

  python bench/prefill_bench.py [--quick] [--kernels fa2,sm90] [--json out.json]
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

import absparse as ab

HQ, HK, D, BLOCK = 32, 8, 128, 128
DTYPE = torch.bfloat16


def timed(fn, reps: int) -> float:
    """Median milliseconds of `reps` launches after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def matmul_tflops(reps: int) -> float:
    n = 8192
    a = torch.randn(n, n, dtype=DTYPE, device="cuda")
    b = torch.randn(n, n, dtype=DTYPE, device="cuda")
    ms = timed(lambda: a @ b, reps)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def block_lists(length: int, density: float, gen: torch.Generator):
    """int32 [1, Hk, Nq, Nq] lists and [1, Hk, Nq] counts: per query block i, block 0, block i and
    each other causal block with probability ~density (so that the row keeps ~density of i + 1)."""
    nq = -(-length // BLOCK)
    j = torch.arange(nq, device="cuda")
    causal = j[None, :] <= j[:, None]                                      # [Nq, Nk]
    forced = (j[None, :] == 0) | (j[None, :] == j[:, None])
    row = (j + 1).float()[:, None]
    p = ((density * row - 2).clamp(min=0) / (row - 2).clamp(min=1)).expand(nq, nq)
    rand = torch.rand(HK, nq, nq, generator=gen, device="cuda")
    keep = causal & (forced | (rand < p))
    key = torch.where(keep, j.expand(HK, nq, nq), torch.full_like(rand, nq, dtype=torch.int64))
    idx = key.sort(-1).values.to(torch.int32)
    cnt = keep.sum(-1).to(torch.int32)
    return idx[None].contiguous(), cnt[None].contiguous()


def attended_pairs(idx: torch.Tensor, cnt: torch.Tensor, length: int) -> int:
    """(query, key) pairs attended per KV-head list, summed over heads: for query block i and
    listed key block j < i all 128 x 128 pairs, for j == i the causal triangle (partial blocks
    clipped)."""
    nq = idx.shape[2]
    i = torch.arange(nq, device="cuda")[None, :, None]
    slot = torch.arange(idx.shape[3], device="cuda")[None, None, :]
    valid = slot < cnt[0][..., None]
    jj = idx[0].long()
    q_rows = (torch.clamp(length - i * BLOCK, max=BLOCK)).clamp(min=0)
    k_rows = (torch.clamp(length - jj * BLOCK, max=BLOCK)).clamp(min=0)
    full = q_rows * k_rows
    diag = q_rows * (q_rows + 1) // 2
    pairs = torch.where(jj == i, diag, full) * valid
    return int(pairs.sum())


def run(length: int, reps: int, peak: float, gen: torch.Generator, kernels: list) -> list:
    q = torch.randn(length, HQ, D, dtype=DTYPE, device="cuda")
    k = torch.randn(length, HK, D, dtype=DTYPE, device="cuda")
    v = torch.randn(length, HK, D, dtype=DTYPE, device="cuda")
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    qs, ks, vs = (x.transpose(0, 1)[None] for x in (q, k, v))             # [1, H, L, D] views
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def f(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        try:
            sdpa[name] = timed(f, reps)
        except RuntimeError as exc:
            print(f"  sdpa {name} unavailable: {str(exc).splitlines()[0]}", file=sys.stderr)
    best = min(sdpa.values())
    dense_pairs = HK * length * (length + 1) // 2
    rows = []
    for density in (1.0, 0.3, 0.1):
        if density == 1.0:
            idx, cnt = ab.dense_causal_block_lists(cu, BLOCK, BLOCK, HK)
            idx, cnt = idx.cuda(), cnt.cuda()
        else:
            idx, cnt = block_lists(length, density, gen)
        pairs = attended_pairs(idx, cnt, length)
        for kernel in kernels:
            ms = timed(lambda: ab.sparse_prefill(q, k, v, cu, idx, cnt, BLOCK, BLOCK, out=out,
                                                 kernel=kernel), reps)
            tflops = 4 * D * pairs * (HQ // HK) / (ms * 1e-3) / 1e12
            rows.append(dict(context=length, density=pairs / dense_pairs, kernel=kernel,
                             absparse_ms=ms, sdpa_flash_ms=sdpa.get("flash"),
                             sdpa_cudnn_ms=sdpa.get("cudnn"), speedup_vs_best_sdpa=best / ms,
                             tflops=tflops, tflops_pct_of_matmul=100 * tflops / peak,
                             sdpa_tflops=4 * D * dense_pairs * (HQ // HK) / (best * 1e-3) / 1e12))
            r = rows[-1]
            print(f"  {length // 1024}K density {r['density']:.2f} {kernel}: {ms:.2f} ms, "
                  f"{r['speedup_vs_best_sdpa']:.2f}x best SDPA ({best:.2f} ms), "
                  f"{tflops:.0f} TFLOP/s", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8K only, fewer repetitions")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--kernels", default="auto",
                    help="comma-separated CUDA kernels to time: auto, fa2, sm90 (default auto)")
    ap.add_argument("--json", help="write the rows to this JSON file")
    args = ap.parse_args(argv)
    kernels = args.kernels.split(",")
    bad = [x for x in kernels if x not in ("auto", "fa2", "sm90")]
    if bad:
        ap.error(f"--kernels: unknown kernel {bad[0]!r} (auto, fa2, sm90)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    reps = 3 if args.quick else args.reps
    peak = matmul_tflops(reps)
    lengths = [8192] if args.quick else [32768, 131072]
    rows = [r for length in lengths for r in run(length, reps, peak, gen, kernels)]
    print(f"device {torch.cuda.get_device_name()}, dense bf16 matmul {peak:.0f} TFLOP/s")
    print("| context | density | kernel | absparse ms | SDPA flash ms | SDPA cuDNN ms | "
          "vs best SDPA | TFLOP/s | % of matmul |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        print(f"| {r['context'] // 1024}K | {100 * r['density']:.0f} % | {r['kernel']} | "
              f"{r['absparse_ms']:.2f} | "
              f"{fmt(r['sdpa_flash_ms'])} | {fmt(r['sdpa_cudnn_ms'])} | "
              f"{r['speedup_vs_best_sdpa']:.2f}x | {r['tflops']:.0f} | "
              f"{r['tflops_pct_of_matmul']:.0f} % |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), matmul_tflops=peak, rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

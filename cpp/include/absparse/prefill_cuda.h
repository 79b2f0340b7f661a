// CUDA implementation of sparse_prefill (absparse/prefill.h, docs/prefill.md) for Hopper (sm_90a,
// the target of absparse_cuda). Plain C++17: no CUDA headers. Link absparse::absparse_cuda.
//
// Two kernels (PrefillKernel below): kFa2, mma.sync tensor cores in FlashAttention-2's style, runs
// every supported configuration; kSm90, warpgroup MMA with TMA loads and a producer / consumer
// pipeline in FlashAttention-3's style, runs the common one (q_block 128, k_block 128 or 256) and
// exists only in builds that found the CUTLASS headers (CMake option ABSPARSE_CUTLASS). kAuto, the
// default, takes kSm90 whenever it can run the arguments. Both give the same result up to float32
// summation order (same rounding points).
//
// Same params struct as the CPU reference; every tensor pointer is a device pointer and `stream`
// is a cudaStream_t. Nothing synchronizes the host, nothing allocates, results are deterministic
// (no atomics). Launches go to the current device (absparse::CudaDeviceGuard).
//
// Supported (else InvalidArgument naming the argument and the supported set, raised by
// check_sparse_prefill_cuda before any CUDA call): dtype float16 / bfloat16; head_dim 64 or 128;
// q_block 64 or 128; k_block a multiple of 64; q, k, v and out rows 16-byte aligned (data pointer
// and the token / head strides multiples of 8 elements).
//
// Host-side checks only: values in device memory (cu_seqlens, block lists and counts, key
// positions) are not validated (that would synchronize) but made harmless: a count clamps to
// [0, M], a listed block outside [0, ceil(L_b / k_block)) is skipped, a length clamps to
// [0, T - cu_seqlens[b]]; an unsorted list is attended as listed, a repeated block counts twice,
// key positions are compared as given. Valid inputs give the CPU reference's result to within the
// arithmetic below.
//
// kSm90 additionally needs: q_block 128; k_block 128 or 256; q, k and v token and head strides in
// [8, 2^39) elements (its TMA descriptors take neither zero strides nor 2^40 bytes); else
// InvalidArgument when asked for explicitly, the kFa2 kernel under kAuto.
//
// Arithmetic: q.k and p.v on tensor cores with float32 accumulation; the softmax weights p are
// rounded once to the input type for p.v (as FlashAttention does: ~2^-9 relative per weight for
// bfloat16, 2^-12 for float16); lse in float32. Keys are processed in tiles of 64 rows of the
// listed blocks: a key of such a tile that a row does not attend (a later position) gets weight 0,
// so a NaN or infinite value in its row of v still reaches the row (0 * NaN), unlike on the CPU,
// which never reads it. Blocks that are not listed are never read. kSm90 works in 128-key tiles
// and its tiles are cut at T, not at the sequence's end: the last tile of a sequence may also
// read (and weight by 0) rows of the next sequence.
#pragma once

#include "absparse/prefill.h"

namespace absparse {

enum class PrefillKernel {
  kAuto,  // kSm90 when this build has it and it can run the arguments, else kFa2
  kFa2,   // FlashAttention-2 style (mma.sync): grid (ceil(Nq q_block / 64), Hq, B)
  kSm90,  // FlashAttention-3 style (wgmma, TMA, warp specialization): grid (Nq, Hq, B)
};

// Whether this build contains the kSm90 kernel (it was configured with the CUTLASS headers).
bool sparse_prefill_sm90_built();

// "Can the CUDA kernel run these arguments?" check_sparse_prefill_args (same messages), then the
// supported configurations above, for kSm90 also its own (and that it is built). kAuto checks
// what kFa2 checks. Reads no device memory and calls no CUDA function.
void check_sparse_prefill_cuda(const SparsePrefillParams& p,
                               PrefillKernel kernel = PrefillKernel::kAuto);

// The kernel kAuto runs for p (kSm90 or kFa2), from host fields alone; p must pass
// check_sparse_prefill_cuda(p).
PrefillKernel select_sparse_prefill_kernel(const SparsePrefillParams& p);

// sparse_prefill on the GPU: one launch of the selected kernel.
void sparse_prefill_cuda(const SparsePrefillParams& p,
                         PrefillKernel kernel = PrefillKernel::kAuto);

}  // namespace absparse

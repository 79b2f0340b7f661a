// CUDA implementation of sparse_prefill (absparse/prefill.h, docs/prefill.md) for Hopper (sm_90a,
// the target of absparse_cuda). Plain C++17: no CUDA headers. Link absparse::absparse_cuda.
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
// Arithmetic: q.k and p.v on tensor cores with float32 accumulation; the softmax weights p are
// rounded once to the input type for p.v (as FlashAttention does: ~2^-9 relative per weight for
// bfloat16, 2^-12 for float16); lse in float32. Keys are processed in tiles of 64 rows of the
// listed blocks: a key of such a tile that a row does not attend (a later position) gets weight 0,
// so a NaN or infinite value in its row of v still reaches the row (0 * NaN), unlike on the CPU,
// which never reads it. Blocks that are not listed are never read.
#pragma once

#include "absparse/prefill.h"

namespace absparse {

// "Can the CUDA kernel run these arguments?" check_sparse_prefill_args (same messages), then the
// supported configurations above. Reads no device memory and calls no CUDA function.
void check_sparse_prefill_cuda(const SparsePrefillParams& p);

// sparse_prefill on the GPU: one launch, grid (ceil(Nq q_block / 64), Hq, B).
void sparse_prefill_cuda(const SparsePrefillParams& p);

}  // namespace absparse

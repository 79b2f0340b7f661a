// CUDA implementations of the prefill mask builders and their primitives (absparse/prefill_masks.h,
// docs/prefill_masks.md, "CUDA path"), for Hopper (sm_90a, the target of absparse_cuda). Plain
// C++17: no CUDA headers. Link absparse::absparse_cuda.
//
// Same params structs as the CPU reference; every tensor pointer is a device pointer. Each entry
// point takes a MaskCudaCall: the stream (a cudaStream_t), and for the ops that need scratch
// memory a device workspace of at least *_cuda_workspace_bytes(...) bytes, 256-byte aligned, that
// the caller allocates (the binding takes it from torch's caching allocator on the same stream).
// Nothing synchronizes the host, nothing allocates, results are deterministic (no floating-point
// atomics: every sum has a fixed order). Launches go to the current device
// (absparse::CudaDeviceGuard).
//
// Sizes come from host fields only: the output shapes bound every sequence length (L_b is
// clamped on the device to Nq * block_size for the block-list builders, to the width of probs /
// vertical for last_block_attention / vertical_slash_sums, to Nb * block_size for block_pool and
// pooled_block_scores, to MaskCudaCall::max_len for pbs_permute), so a caller that under-sizes
// the outputs gets the results of truncated sequences, never an out-of-bounds access.
//
// Host-side checks only (check_*_cuda, before any CUDA call; InvalidArgument naming the argument):
// the checks of the CPU entry points that read no tensor value, then the supported set: dtype
// float32, float16 or bfloat16; head_dim 64 or 128 (ops that read q / k); block_size <= 128 for
// the ops that run last-block attention (flexprefill_mask, pbs_permute, last_block_attention);
// at most 65535 sequences and heads. Values in device memory are not validated (that would
// synchronize) but made harmless: cu_seqlens offsets clamp to [0, T] and lengths to the bound
// above; key_positions of pbs_mask are compared as given (a non-permutation gives unspecified
// lists, in range); lengths of js_distance / coverage_select clamp to [0, n].
//
// Arithmetic (where results may differ from the float64 CPU reference, docs/prefill_masks.md):
// q.k dot products and softmax in float32 (exp2 of log2-scaled logits); block means, vertical /
// slash sums from probs, coverage running sums and JS distance in float64. block_pool and
// vertical_slash_sums reproduce the CPU's float64 operations in the same order (bit-identical
// outputs). Selections follow the CPU's rules exactly on the GPU's scores (order by score
// descending, ties to the lower index, NaN last; shortest prefix whose float64 sum reaches the
// threshold), so lists differ from the CPU's only at near-ties: two scores whose float32 (GPU)
// and float64 (CPU) evaluations order differently, or a running sum within ~1e-12 relative of
// the threshold (the GPU sums by value bands, not in sorted order).
#pragma once

#include <cstdint>

#include "absparse/prefill_masks.h"

namespace absparse {

struct MaskCudaCall {
  void* stream = nullptr;       // cudaStream_t
  void* workspace = nullptr;    // device scratch, 256-byte aligned (ops with *_workspace_bytes)
  int64_t workspace_bytes = 0;
  int32_t max_len = 0;          // pbs_permute only: a bound of every L_b (0: T)
};

// Scratch bytes of each op that needs some, from host fields alone (the same p as the call).
int64_t last_block_attention_cuda_workspace_bytes(const LastBlockAttentionParams& p);
int64_t pooled_block_scores_cuda_workspace_bytes(const PooledBlockScoresParams& p);
int64_t flexprefill_mask_cuda_workspace_bytes(const FlexPrefillMaskParams& p);
int64_t pbs_permute_cuda_workspace_bytes(const PbsPermuteParams& p, int32_t max_len);
int64_t pbs_mask_cuda_workspace_bytes(const PbsMaskParams& p);

// Host-side validation (above); the *_cuda entry points run it first.
void check_last_block_attention_cuda(const LastBlockAttentionParams& p);
void check_vertical_slash_cuda(const VerticalSlashParams& p);
void check_block_pool_cuda(const BlockPoolParams& p);
void check_pooled_block_scores_cuda(const PooledBlockScoresParams& p);
void check_js_distance_cuda(const JsDistanceParams& p);
void check_coverage_select_cuda(const CoverageSelectParams& p);
void check_flexprefill_mask_cuda(const FlexPrefillMaskParams& p);
void check_pbs_permute_cuda(const PbsPermuteParams& p, int32_t max_len);
void check_pbs_mask_cuda(const PbsMaskParams& p);

// VerticalSlashParams::total_tokens is not read on the GPU (T lives in device memory).
void last_block_attention_cuda(const LastBlockAttentionParams& p, const MaskCudaCall& call);
void vertical_slash_cuda(const VerticalSlashParams& p, const MaskCudaCall& call);
void block_pool_cuda(const BlockPoolParams& p, const MaskCudaCall& call);
void pooled_block_scores_cuda(const PooledBlockScoresParams& p, const MaskCudaCall& call);
void js_distance_cuda(const JsDistanceParams& p, const MaskCudaCall& call);
void coverage_select_cuda(const CoverageSelectParams& p, const MaskCudaCall& call);
void flexprefill_mask_cuda(const FlexPrefillMaskParams& p, const MaskCudaCall& call);
void pbs_permute_cuda(const PbsPermuteParams& p, const MaskCudaCall& call);
void pbs_mask_cuda(const PbsMaskParams& p, const MaskCudaCall& call);

}  // namespace absparse

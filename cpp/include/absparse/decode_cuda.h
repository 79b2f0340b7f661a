// CUDA implementations of the decode pipeline (docs/decode.md) for Hopper (built for sm_90a, with
// compute_80 PTX as a fallback). Plain C++17: no CUDA headers. Link absparse::absparse_cuda.
//
// Same params structs as the CPU reference (absparse/decode.h); here every tensor pointer is a
// device pointer, except `layout` (a host object) and DecodeAttentionParams::block_sizes (a host
// array [Hk]). `stream` is a cudaStream_t; nothing synchronizes the host, nothing allocates (the
// caller passes a workspace of *_workspace_size bytes), results are deterministic (no float
// atomics; the split-KV decision comes from capacities, never from run-time lengths or the batch
// size, so a sequence's results do not depend on the other sequences of the batch). Launches go to
// the current device: make the tensors' device current (absparse::CudaDeviceGuard).
//
// Supported (else InvalidArgument naming the argument): dtype float16/bfloat16 (float32 is CPU
// only); head_dim 64, 128, 256; group G = Hq / Hk in 1..16; Hk <= 256; B <= 65535 for update and
// select; block sizes: powers of two dividing a power-of-two page size, mixed per head in one
// launch (8..128 tested); k_cache / v_cache rows 16-byte aligned (data pointer and the
// page/token/head strides non-negative multiples of 8 elements). Every stride is 64-bit; other
// tensors take any strides (float tensors with a contiguous last dimension).
//
// Host-side checks only. Values in device memory (seq_lens, start_pos, page-table entries,
// block_counts, block_indices) cannot be checked without a sync, so the kernels make bad values
// harmless instead of reading out of bounds:
//   seq_lens clamp to [0, max_pages * P]; start_pos clamps to [0, L_b];
//   a page-table entry outside [0, num_pages) of a used page drops what lives there: update writes
//     no summary for its blocks, select scores its blocks as NaN (ranked last), attention skips
//     its tokens;
//   block_counts clamp to [0, min(max_blocks, L_b // bs_h)]; a listed block index outside
//     [0, L_b // bs_h) is skipped; an unsorted or repeated list is attended as listed.
// select_blocks_cuda checks max_blocks against a bound that needs no seq_lens
// (select_blocks_capacity_bound); the kernels never write past max_blocks.
//
// Arithmetic:
//   update_centroids: the CPU reference's float64 reductions in the same order, so the stored
//     summaries are bit-identical to update_centroids_cpu (NaN payloads aside).
//   select_blocks: block logits in float32 from the stored codes (per-channel formats score the
//     codes with q * channel_scale and add q . channel_zero; box kinds use max(q hi, q lo) =
//     q mid + |q| rad); softmax_sum in float32; exact top-k on the float32 scores (radix select),
//     ties to the lower block index. Scores within ~1e-5 relative of each other may therefore
//     rank differently than in the float64 CPU reference.
//   attention: fp16/bf16 tensor-core products with float32 accumulation; the softmax weights are
//     split into a high and a low fp16/bf16 part for P.V, so out is accurate to ~1e-5 of max|v|
//     (plus the final rounding); lse in float32.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absparse/decode.h"

namespace absparse {

// Limits of the CUDA kernels.
constexpr int kCudaMaxKvHeads = 256;
constexpr int kCudaMaxGroup = 16;

// update_centroids on the GPU. No workspace.
void update_centroids_cuda(const UpdateCentroidsParams& p);

// select_blocks on the GPU: a scoring kernel writes float32 block scores into the workspace
// ([B, Hk, rows, max_pages * P / min bs] with rows = 1 for max, G + 1 for softmax_sum), then one
// CTA per (sequence, KV head) selects the top k and writes the lists. The size function reads
// only host fields of p.
size_t select_blocks_workspace_size(const SelectBlocksParams& p);
void select_blocks_cuda(const SelectBlocksParams& p, void* workspace);

// Largest block_counts[b, h] that any seq_lens <= max_pages * P can produce with p's budget,
// windows and layout (no seq_lens needed): min(max_pages * P / bs_h,
// max(ceil(sink / bs_h) + ceil(local / bs_h), floor(T / bs_h))) over heads, with T the token
// budget (or ceil(fraction * max_pages * P)). select_blocks_cuda requires max_blocks >= this;
// the default capacity ceil(max_pages * P / min bs) always satisfies it.
int64_t select_blocks_capacity_bound(const SelectBlocksParams& p);

// sparse_decode / dense_decode on the GPU. Split-KV with an LSE merge when
// decode_attention_num_splits(p) > 1; the workspace then holds the per-split partial outputs
// ([S, B, Hq, D + 1] float32). The two functions read only host fields of p (and the host
// block_sizes array).
int32_t decode_attention_num_splits(const DecodeAttentionParams& p);
size_t decode_attention_workspace_size(const DecodeAttentionParams& p);
void decode_attention_cuda(const DecodeAttentionParams& p, void* workspace);

// Makes `device` the current CUDA device for its lifetime (no-op when it already is).
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device);
  ~CudaDeviceGuard();
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace absparse

// CUDA implementations of the decode pipeline (docs/decode.md) for Hopper (sm_90a: the kernels use
// thread-block clusters and are built for that target only). Plain C++17: no CUDA headers. Link
// absparse::absparse_cuda.
//
// Same params structs as the CPU reference (absparse/decode.h); here every tensor pointer is a
// device pointer, except `layout` (a host object) and DecodeAttentionParams::block_sizes (a host
// array [Hk]). `stream` is a cudaStream_t; nothing synchronizes the host, nothing allocates
// (select_blocks takes a workspace of select_blocks_workspace_size bytes), results are
// deterministic (no float atomics; the split-KV decision comes from capacities, never from
// run-time lengths or the batch size, so a sequence's results do not depend on the other
// sequences of the batch). Launches go to the current device: make the tensors' device current
// (absparse::CudaDeviceGuard).
//
// Supported (else InvalidArgument naming the argument and the supported set, raised by the
// check_*_cuda functions below before any CUDA call): dtype float16/bfloat16 (float32 is CPU
// only); head_dim 64, 128, 256; group G = Hq / Hk in 1..16; Hk <= 256; B <= 65535; block sizes:
// powers of two dividing a power-of-two page size, mixed per head in one launch; k_cache / v_cache
// rows 16-byte aligned (data pointer and the page/token/head strides non-negative multiples of 8
// elements). Every stride is 64-bit; other tensors take any strides (float tensors with a
// contiguous last dimension).
//
// Host-side checks only. Values in device memory (seq_lens, start_pos, page-table entries,
// block_counts, block_indices, the layout's channel parameters) cannot be checked without a sync,
// so the kernels make bad values harmless instead of reading out of bounds:
//   seq_lens clamp to [0, max_pages * P]; start_pos clamps to [0, L_b];
//   a page-table entry outside [0, num_pages) of a used page drops what lives there: update writes
//     no summary for its blocks, select scores its blocks as NaN (ranked last), attention skips
//     its tokens;
//   block_counts clamp to [0, min(max_blocks, L_b // bs_h)]; a listed block index outside
//     [0, L_b // bs_h) is skipped; an unsorted or repeated list is attended as listed. When every
//     attended row is skipped the output is 0 and lse -inf, as for an empty set.
// select_blocks_cuda checks max_blocks against a bound that needs no seq_lens (max_blocks_bound of
// absparse/decode.h); the kernels never write past max_blocks.
//
// Arithmetic:
//   update_centroids: the CPU reference's float64 reductions in the same order, so the stored
//     summaries are bit-identical to update_centroids_cpu (NaN payloads aside).
//   select_blocks: block logits on tensor cores where the format allows, else on CUDA cores in
//     float32. Integer codes: the query side rounded to 30-bit integers per head (14-bit above 4
//     query heads per KV head; error <= 2^-30, resp. 2^-14, of the head's largest
//     |q . channel scale| per term), exact integer sums per byte of it, combined in float32;
//     fp16 / bf16 summaries: float32 accumulation with the query side split into two 16-bit parts
//     (~2^-16 relative per term). softmax_sum in float32; exact top-k of the float32 scores
//     (radix select), ties to the lower block index. Scores within ~1e-5 of the computation's
//     magnitude may therefore rank differently than in the float64 CPU reference. A logit that is
//     not finite in float32 (a non-finite q or summary value, or overflow) is NaN and ranks last.
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

// "Can the CUDA kernels run these arguments?" The host-side checks of the CPU path
// (check_*_args of absparse/decode.h, same messages), then the supported configurations above
// (dtype, head_dim, group, KV heads, batch, K/V row alignment) and, for select_blocks, max_blocks
// against max_blocks_bound. Reads no device memory and calls no CUDA function, so a
// rejected input throws InvalidArgument before any device work; the *_cuda entry points run them
// first.
void check_update_centroids_cuda(const UpdateCentroidsParams& p);
void check_select_blocks_cuda(const SelectBlocksParams& p);
void check_decode_attention_cuda(const DecodeAttentionParams& p);

// update_centroids on the GPU. No workspace. p.max_new_tokens sizes the grid (1 for a decode step).
void update_centroids_cuda(const UpdateCentroidsParams& p);

// select_blocks on the GPU: one fused score + top-k kernel (the last CTA of each (sequence, head)
// selects), preceded by a memset of its arrival counters. The workspace holds the block keys
// ([B, Hk, rows, max_pages * P / min bs] 32-bit, rows = 1 for max, G + 1 for softmax_sum) and the
// counters; the size function reads only host fields of p.
size_t select_blocks_workspace_size(const SelectBlocksParams& p);
void select_blocks_cuda(const SelectBlocksParams& p, void* workspace);

// sparse_decode / dense_decode on the GPU: one launch of clusters of S CTAs per (sequence, KV
// head) that split the attended positions and merge their partial results through distributed
// shared memory. No workspace. S comes from capacities (the page table and, sparse, max_blocks and
// the block sizes), never from run-time lengths.
void decode_attention_cuda(const DecodeAttentionParams& p);

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

// Block-sparse causal prefill attention (docs/prefill.md). Torch-free C++ API: a params struct of
// raw pointers and explicit 64-bit element strides.
//
// Shapes: a packed variable-length batch of B sequences and T tokens in all (FlashAttention's
// varlen layout), sequence b owning rows [cu_seqlens[b], cu_seqlens[b + 1]) of q, k, v and out;
// Hq query heads, Hk KV heads (G = Hq / Hk query heads per KV head), head dim D. Query block i of
// a sequence is its positions [i * q_block, (i + 1) * q_block), key block j its stored key rows
// [j * k_block, (j + 1) * k_block) (both clipped to the sequence's length L_b).
//
// Query row t of sequence b, query head h, attends exactly the keys r of that sequence with
//   (1) r in a key block listed for (b, list head, query block t / q_block), and
//   (2) pos(r) <= t, where pos(r) = key_positions[cu_seqlens[b] + r, h / G] when key positions are
//       given (the caller permuted keys within the sequence) and r otherwise.
// With s = scale: out = softmax_r(s q_t . k_r) v_r over those keys and lse = ln sum_r exp(s q_t . k_r);
// a row with no such key gets out 0 and lse -inf.
//
// Float tensors (q, k, v, out) have a contiguous last dimension (stride 1); every other stride is
// free. Pointers are host pointers for the *_cpu entry points, which validate every argument,
// values included (cu_seqlens, block lists, counts, key positions), before they read or write
// anything and throw absparse::InvalidArgument on bad input.
#pragma once

#include <cstdint>

#include "absparse/numeric.h"

namespace absparse {

struct SparsePrefillParams {
  int32_t batch = 0;            // B (>= 0)
  int64_t total_tokens = 0;     // T = cu_seqlens[B], rows of q, k, v and out (< 2^31)
  int32_t num_q_heads = 0;      // Hq, a multiple of Hk
  int32_t num_kv_heads = 0;     // Hk
  int32_t head_dim = 0;         // D (> 0; any value on the CPU)
  int32_t q_block = 0;          // query positions per query block (> 0)
  int32_t k_block = 0;          // stored key rows per key block (> 0)
  DType dtype = DType::kFloat32;  // of q, k, v and out: float32, float16 or bfloat16

  const int32_t* cu_seqlens = nullptr;  // [B + 1]: 0 = cu[0] <= cu[1] <= ... <= cu[B] = T
  int64_t cu_seqlens_stride = 0;

  const void* q = nullptr;      // [T, Hq, D]
  int64_t q_stride_token = 0;
  int64_t q_stride_head = 0;
  const void* k = nullptr;      // [T, Hk, D], keys in stored order (permuted when key_positions)
  int64_t k_stride_token = 0;
  int64_t k_stride_head = 0;
  const void* v = nullptr;      // [T, Hk, D], values in the order of k
  int64_t v_stride_token = 0;
  int64_t v_stride_head = 0;

  // Block lists [B, H, Nq, M] and counts [B, H, Nq]. H = num_list_heads is Hq (one list per
  // query head) or Hk (one list per KV head, shared by its G query heads). Row (b, h, i) lists
  // block_counts[b, h, i] key blocks of sequence b in [0, ceil(L_b / k_block)), strictly ascending;
  // entries past the count are not read. Nq >= ceil(max_b L_b / q_block); rows i >=
  // ceil(L_b / q_block) (query blocks past the end of sequence b) are not read at all.
  int32_t num_list_heads = 0;   // H
  int32_t num_q_blocks = 0;     // Nq
  int32_t max_blocks = 0;       // M
  const int32_t* block_indices = nullptr;
  int64_t block_indices_stride_batch = 0;
  int64_t block_indices_stride_head = 0;
  int64_t block_indices_stride_row = 0;
  int64_t block_indices_stride_slot = 0;
  const int32_t* block_counts = nullptr;  // 0 <= count <= M
  int64_t block_counts_stride_batch = 0;
  int64_t block_counts_stride_head = 0;
  int64_t block_counts_stride_row = 0;

  // [T, Hk] original in-sequence position of each stored key row, or null (pos(r) = r). For every
  // (sequence b, KV head h), key_positions[cu[b] .. cu[b+1]-1, h] is a permutation of 0 .. L_b-1.
  const int32_t* key_positions = nullptr;  // may be null
  int64_t key_positions_stride_token = 0;
  int64_t key_positions_stride_head = 0;

  double scale = 0.0;           // logit scale s, finite (callers pass 1/sqrt(D) by default)

  void* out = nullptr;          // [T, Hq, D] in dtype
  int64_t out_stride_token = 0;
  int64_t out_stride_head = 0;
  float* lse = nullptr;         // [T, Hq] float32 natural-log sum of exp, may be null
  int64_t lse_stride_token = 0;
  int64_t lse_stride_head = 0;

  void* stream = nullptr;       // cudaStream_t for a CUDA path; unused on the CPU
};

// CPU reference (float64 accumulation; out rounded once to dtype, lse once to float32).
void sparse_prefill_cpu(const SparsePrefillParams& p);

// Validation alone (what sparse_prefill_cpu runs first), for callers that check before launching.
void check_sparse_prefill(const SparsePrefillParams& p);

// The part of that validation that reads no tensor values (host fields and pointer presence):
// what a CUDA entry point runs before launching, with the same messages. It does not check Nq
// against the lengths (that needs cu_seqlens).
void check_sparse_prefill_args(const SparsePrefillParams& p);

}  // namespace absparse

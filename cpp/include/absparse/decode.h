// The AB-Sparse decode pipeline (docs/decode.md): update_centroids -> select_blocks -> sparse_decode,
// plus dense_decode. Torch-free C++ API: params structs of raw pointers and explicit element strides.
//
// Shapes: B sequences, Hq query heads, Hk KV heads (G = Hq / Hk), head dim D, page size P.
// Every float tensor has a contiguous last dimension (stride 1); every other stride is free and
// 64-bit. Pointers are host pointers for the *_cpu entry points. Each entry point validates its
// arguments (values included: seq_lens, page-table entries of used pages, block lists) before it
// reads or writes anything, and throws absparse::InvalidArgument on bad input.
#pragma once

#include <cstdint>

#include "absparse/layout.h"
#include "absparse/numeric.h"

namespace absparse {

// Batch geometry shared by every op.
struct BatchGeometry {
  int32_t batch = 0;          // B
  int32_t num_kv_heads = 0;   // Hk
  int32_t head_dim = 0;       // D
  int32_t page_size = 0;      // P
  int64_t num_pages = 0;      // pages in the KV pool
  int32_t max_pages = 0;      // page_table columns
  const int32_t* seq_lens = nullptr;     // [B], L_b >= 0
  int64_t seq_lens_stride = 0;
  const int32_t* page_table = nullptr;   // [B, max_pages]; entries past page ceil(L_b/P)-1 unread
  int64_t page_table_stride_batch = 0;
  int64_t page_table_stride_page = 0;
};

// One paged cache ([num_pages, P, Hk, D], channel stride 1) in the dtype of the op.
struct PagedCacheView {
  const void* data = nullptr;
  int64_t stride_page = 0;
  int64_t stride_token = 0;
  int64_t stride_head = 0;
};

// The summary cache of a layer: summaries [num_pages, slots_per_page, R, W] (summary_dtype),
// scales [num_pages, slots_per_page, R] float32 for int8/int4 (null otherwise), and the layout's
// per-channel parameters [Hk, D] float32 for int8c/int4c (null otherwise).
struct SummaryCacheView {
  void* data = nullptr;
  int64_t stride_page = 0;
  int64_t stride_slot = 0;
  int64_t stride_vector = 0;
  float* scales = nullptr;
  int64_t scales_stride_page = 0;
  int64_t scales_stride_slot = 0;
  int64_t scales_stride_vector = 0;
  const float* channel_scale = nullptr;  // [Hk, D], every entry finite and > 0
  const float* channel_zero = nullptr;   // [Hk, D], every entry finite
  int64_t channel_stride_head = 0;
};

// Writes the summaries of exactly the blocks that become complete in tokens [start_b, L_b) of
// each sequence: for head h with block size bs, blocks j in [floor(start_b/bs), floor(L_b/bs)).
struct UpdateCentroidsParams {
  const LayerLayout* layout = nullptr;
  BatchGeometry geometry;
  DType dtype = DType::kFloat32;  // of k_cache
  PagedCacheView k_cache;
  const int32_t* start_pos = nullptr;  // [B], 0 <= start_b <= L_b
  int64_t start_pos_stride = 0;
  SummaryCacheView summaries;
  // Parallelism hint of the CUDA path: at most this many tokens are new per sequence
  // (L_b - start_b), e.g. 1 for a decode step; 0 = unknown (a whole prefill). A wrong hint costs
  // speed, never correctness. Unused on the CPU.
  int64_t max_new_tokens = 0;
  void* stream = nullptr;  // cudaStream_t for the CUDA path; unused on the CPU
};

enum class GroupReduce : int32_t { kMax = 0, kSoftmaxSum = 1 };

struct SelectBlocksParams {
  const LayerLayout* layout = nullptr;
  BatchGeometry geometry;
  int32_t num_q_heads = 0;        // Hq, a multiple of Hk
  DType dtype = DType::kFloat32;  // of q
  const void* q = nullptr;        // [B, Hq, D]
  int64_t q_stride_batch = 0;
  int64_t q_stride_head = 0;
  SummaryCacheView summaries;     // read only
  // Budget: a token count (budget_fraction <= 0), or ceil(budget_fraction * L_b) tokens per
  // sequence when 0 < budget_fraction < 1.
  int64_t budget_tokens = 0;
  double budget_fraction = 0.0;
  int64_t sink_tokens = 0;        // blocks j < ceil(sink_tokens / bs) are always kept
  int64_t local_tokens = 0;       // the last ceil(local_tokens / bs) complete blocks are kept
  GroupReduce group_reduce = GroupReduce::kMax;
  double scale = 0.0;             // logit scale s (callers pass 1/sqrt(D) by default)
  int32_t max_blocks = 0;         // capacity of block_indices; too small is an error
  int32_t* block_indices = nullptr;  // [B, Hk, max_blocks] out: ascending, padded with -1
  int64_t block_indices_stride_batch = 0;
  int64_t block_indices_stride_head = 0;
  int64_t block_indices_stride_slot = 0;
  int32_t* block_counts = nullptr;   // [B, Hk] out
  int64_t block_counts_stride_batch = 0;
  int64_t block_counts_stride_head = 0;
  void* stream = nullptr;
};

// Attention of one new query per sequence over the attended set A of docs/decode.md.
// Sparse when block_sizes is non-null (A = listed blocks + partial tail), dense otherwise (A = all).
struct DecodeAttentionParams {
  BatchGeometry geometry;
  int32_t num_q_heads = 0;
  DType dtype = DType::kFloat32;  // of q, k_cache, v_cache and out
  const void* q = nullptr;        // [B, Hq, D]
  int64_t q_stride_batch = 0;
  int64_t q_stride_head = 0;
  PagedCacheView k_cache;
  PagedCacheView v_cache;
  const int32_t* block_sizes = nullptr;    // [Hk] host array, or null for dense attention
  const int32_t* block_indices = nullptr;  // [B, Hk, max_blocks]: the first count entries are
  int64_t block_indices_stride_batch = 0;  // in [0, L_b // bs_h), strictly ascending
  int64_t block_indices_stride_head = 0;
  int64_t block_indices_stride_slot = 0;
  int32_t max_blocks = 0;
  const int32_t* block_counts = nullptr;   // [B, Hk], 0 <= count <= max_blocks
  int64_t block_counts_stride_batch = 0;
  int64_t block_counts_stride_head = 0;
  double scale = 0.0;             // logit scale s, finite
  void* out = nullptr;            // [B, Hq, D] in dtype
  int64_t out_stride_batch = 0;
  int64_t out_stride_head = 0;
  float* lse = nullptr;           // [B, Hq] float32, may be null
  int64_t lse_stride_batch = 0;
  int64_t lse_stride_head = 0;
  void* stream = nullptr;
};

// CPU reference implementations (float64 accumulation; results rounded to the output dtype once).
void update_centroids_cpu(const UpdateCentroidsParams& p);
void select_blocks_cpu(const SelectBlocksParams& p);
void decode_attention_cpu(const DecodeAttentionParams& p);

// Validation alone (what the *_cpu functions run first), for callers that check before launching.
void check_update_centroids(const UpdateCentroidsParams& p);
void check_select_blocks(const SelectBlocksParams& p);
void check_decode_attention(const DecodeAttentionParams& p);

// The part of that validation that reads no tensor values (host fields, pointer presence, host
// arrays such as block_sizes): what the CUDA entry points run before launching, with the same
// messages. check_select_blocks_args does not check max_blocks against the lengths (that needs
// seq_lens); the CUDA path checks it against max_blocks_bound instead.
void check_update_centroids_args(const UpdateCentroidsParams& p);
void check_select_blocks_args(const SelectBlocksParams& p);
void check_decode_attention_args(const DecodeAttentionParams& p);

// Selection arithmetic of docs/decode.md for one (sequence, head), shared by every implementation.
struct SelectionPlan {
  int64_t num_blocks;       // n = L // bs complete blocks
  int64_t sink_blocks;      // kept blocks [0, sink_blocks)
  int64_t local_begin;      // kept blocks [local_begin, n)
  int64_t num_candidates;   // complete blocks that are neither sink nor local
  int64_t num_selected;     // k, clamped to [0, num_candidates]
  int64_t count() const { return (num_blocks - num_candidates) + num_selected; }
};
SelectionPlan plan_selection(int64_t seq_len, int32_t block_size, int64_t budget_tokens,
                             double budget_fraction, int64_t sink_tokens, int64_t local_tokens);

// Largest block_counts[b, h] that any length the page table can hold (<= max_pages * P) produces
// with this budget, windows and layout, without reading seq_lens: the maximum over heads of
// min(max_pages * P / bs_h, max(ceil(sink / bs_h) + ceil(local / bs_h), floor(T / bs_h))), with T
// the token budget or ceil(fraction * max_pages * P). (A count is sink + selected + local blocks,
// at most T / bs_h once anything is ranked, else at most the kept blocks or all n <= L / bs_h.)
// The default max_blocks of select_blocks, and the least capacity its CUDA path accepts.
int64_t max_blocks_bound(const LayerLayout& layout, int32_t max_pages, int64_t budget_tokens,
                         double budget_fraction, int64_t sink_tokens, int64_t local_tokens);

// Smallest max_blocks capacity that select_blocks accepts for these lengths and budget.
int64_t required_max_blocks(const LayerLayout& layout, const int32_t* seq_lens, int32_t batch,
                            int64_t seq_lens_stride, int64_t budget_tokens, double budget_fraction,
                            int64_t sink_tokens, int64_t local_tokens);

}  // namespace absparse

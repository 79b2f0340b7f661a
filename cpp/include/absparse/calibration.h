// Calibration of AB-Sparse's per-head block sizes (notes: algorithms.md §1.4).
//
// 1. head_recall_cpu: the attention recall of every KV head for every candidate block size, i.e.
//    the softmax mass that the decode pipeline's selection (docs/decode.md) would attend for a set
//    of probe queries over one calibration sample.
// 2. allocate_block_sizes: the exact optimum of the multiple-choice knapsack "one block size per
//    head, maximise total recall, keep the summary budget of a uniform layout", by dynamic
//    programming over integer costs.
//
// Torch-free like decode.h: params structs of host pointers and explicit element strides; every
// entry point validates its whole input first and throws absparse::InvalidArgument.
#pragma once

#include <cstdint>
#include <string>

#include "absparse/decode.h"
#include "absparse/layout.h"
#include "absparse/numeric.h"

namespace absparse {

// ------------------------------------------------------------------------------------------------
// Head sensitivity profile
// ------------------------------------------------------------------------------------------------
//
// Shapes: N probe queries, Hq query heads, Hk KV heads (G = Hq / Hk), head dim D, T keys of one
// sample (post-RoPE, token order, not paged), C candidate block sizes.
//
// Probe n sits at position pos_n and attends keys [0, L) with L = pos_n + 1. For KV head h and
// block size bs = candidates[c], the attended set A is what select_blocks + sparse_decode would
// attend: with plan = plan_selection(L, bs, budget, sink, local),
//   A = blocks [0, sink_blocks) ∪ [local_begin, n) ∪ the top num_selected candidate blocks by the
//       group score ∪ the partial tail [n * bs, L),
// where candidate block logits are those of select_blocks (block_logit below) on float32
// summaries computed like update_centroids (unquantized, i.e. format fp32), ties to the lower
// block index. recall[h, c] = mean over the N probes and the G query heads of group h of
// sum_{t in A} p_i(t), p_i(t) = softmax over t in [0, L) of scale * q_i . k_t (float64).
// A that covers [0, L) (budget >= L, or every candidate selected) gives exactly 1.
struct HeadRecallParams {
  int32_t num_probes = 0;         // N >= 1
  int32_t num_q_heads = 0;        // Hq, a positive multiple of Hk
  int32_t num_kv_heads = 0;       // Hk >= 1
  int32_t head_dim = 0;           // D >= 1
  int64_t num_tokens = 0;         // T >= 1
  DType dtype = DType::kFloat32;  // of q and k: float32, float16 or bfloat16
  const void* q = nullptr;        // [N, Hq, D], channel stride 1, finite
  int64_t q_stride_probe = 0;
  int64_t q_stride_head = 0;
  const void* k = nullptr;        // [T, Hk, D], channel stride 1, finite
  int64_t k_stride_token = 0;
  int64_t k_stride_head = 0;
  const int32_t* positions = nullptr;  // [N], 0 <= pos_n < T
  int64_t positions_stride = 0;
  const int32_t* candidates = nullptr;  // [C] host array: distinct powers of two in [1, 2^30]
  int32_t num_candidates = 0;           // C >= 1
  // Budget exactly as SelectBlocksParams: tokens (budget_fraction == 0) or a fraction in (0, 1).
  int64_t budget_tokens = 0;
  double budget_fraction = 0.0;
  int64_t sink_tokens = 0;
  int64_t local_tokens = 0;
  SummaryKind kind = SummaryKind::kMinMax;
  GroupReduce group_reduce = GroupReduce::kMax;
  double scale = 0.0;             // logit scale s, finite (callers pass 1/sqrt(D) by default)
  double* recall = nullptr;       // [Hk, C] out
  int64_t recall_stride_head = 0;
  int64_t recall_stride_candidate = 0;
};

void check_head_recall(const HeadRecallParams& p);
// Cost: O(N * Hq * L * D) for the exact softmax plus O(N * Hq * L * D * sum_c R / bs_c) for the
// block logits; block summaries are computed once per (head, candidate) for the whole sample.
void head_recall_cpu(const HeadRecallParams& p);

// ------------------------------------------------------------------------------------------------
// Block-size allocation
// ------------------------------------------------------------------------------------------------

enum class AllocationConstraint : int32_t {
  // Summary-memory parity: sum_n 1 / size_n <= N / avg_block_size. Integer form with
  // cost_n = max_size / size_n: sum_n cost_n <= floor(N * max_size / avg_block_size).
  kCount = 0,
  // Arithmetic mean: sum_n size_n >= N * avg_block_size. Integer form with
  // cost_n = size_n / min_size: sum_n cost_n >= ceil(N * avg_block_size / min_size).
  kMean = 1,
};
AllocationConstraint parse_allocation_constraint(const std::string& name);  // "count" | "mean"
const char* allocation_constraint_name(AllocationConstraint constraint);

// Recall values are compared on a fixed grid: v -> llround(v * 2^kRecallGridBits) (int64), so the
// optimum and every tie are exact (no float summation-order effects). Differences below ~1e-12
// count as ties.
constexpr int kRecallGridBits = 40;

// Maximises sum_n recall[n, c_n] over choices c_n subject to the constraint. Among optimal
// choices (equal grid sums) the tie rule is, in order: (1) fewest summaries, i.e. smallest
// sum_n max_size / size_n; (2) the lexicographically largest sizes in head order (a larger block
// at the first head that differs). Infeasible (avg_block_size > max candidate) is an error; an
// avg_block_size below the smallest candidate makes the constraint slack.
struct AllocateBlockSizesParams {
  int64_t num_heads = 0;          // N >= 0 (all KV heads of all layers)
  int32_t num_candidates = 0;     // C >= 1
  const double* recall = nullptr;  // [N, C] finite, N * max|recall| * 2^40 < 2^62
  int64_t recall_stride_head = 0;
  int64_t recall_stride_candidate = 0;
  const int32_t* candidates = nullptr;  // [C]: distinct powers of two in [1, 2^30]
  int64_t avg_block_size = 0;     // > 0, at most the largest candidate
  AllocationConstraint constraint = AllocationConstraint::kCount;
  int32_t* block_sizes = nullptr;  // [N] out
  int64_t block_sizes_stride = 0;
};

void check_allocate_block_sizes(const AllocateBlockSizesParams& p);
// Cost: O(N * S * C) time and N * S bytes, S = number of DP states <= N * max_size / min_size + 1.
void allocate_block_sizes(const AllocateBlockSizesParams& p);

}  // namespace absparse

// Block-list builders for sparse prefill (docs/prefill_masks.md): FlexPrefill and PBS-Attn, and the
// primitives they are made of. Their outputs are the block lists of the sparse prefill op
// (block_indices [B, H, Nq, M] + block_counts [B, H, Nq], key_positions [T, Hk]).
//
// Shapes: a packed variable-length batch of B sequences and T tokens (FlashAttention's varlen
// layout): sequence b owns rows [cu_seqlens[b], cu_seqlens[b + 1]) of q [T, Hq, D] and k, v
// [T, Hk, D], L_b = cu_seqlens[b + 1] - cu_seqlens[b], max_len = max_b L_b. Query head h reads KV
// head h / G (G = Hq / Hk). Block j of a sequence is its rows [j * bs, (j + 1) * bs) clipped to
// L_b; a sequence has nb_b = ceil(L_b / bs) blocks, and Nb = ceil(max_len / bs).
//
// Inputs q, k, v may be strided (64-bit element strides, contiguous last dimension); every output
// is a contiguous tensor of the documented shape allocated by the caller. Every *_cpu entry point
// validates all arguments, values included (cu_seqlens, key_positions), before it writes anything,
// and throws absparse::InvalidArgument on bad input. Arithmetic is float64; float outputs are
// rounded once to float32.
#pragma once

#include <cstdint>

#include "absparse/numeric.h"

namespace absparse {

// The queries and keys every builder reads.
struct PrefillQK {
  int32_t batch = 0;                    // B >= 0
  int64_t total_tokens = 0;             // T = cu_seqlens[B] (< 2^31)
  const int32_t* cu_seqlens = nullptr;  // [B + 1]: 0 = cu[0] <= cu[1] <= ... <= cu[B] = T
  int64_t cu_seqlens_stride = 0;
  int32_t num_q_heads = 0;              // Hq, a positive multiple of Hk
  int32_t num_kv_heads = 0;             // Hk > 0
  int32_t head_dim = 0;                 // D > 0
  DType dtype = DType::kFloat32;        // of q and k (and v): float32, float16 or bfloat16
  const void* q = nullptr;              // [T, Hq, D]
  int64_t q_stride_token = 0;
  int64_t q_stride_head = 0;
  const void* k = nullptr;              // [T, Hk, D]
  int64_t k_stride_token = 0;
  int64_t k_stride_head = 0;
  double scale = 0.0;                   // logit scale s, finite (callers pass 1/sqrt(D))
};

// ---- Primitives -------------------------------------------------------------------------------

// Exact attention probabilities of the last n_b = min(bs, L_b) queries of each sequence over all
// its keys, causal (query position t sees key position p iff p <= t):
//   P[b, h, r, p] = softmax_p(s q_t . k_p), t = L_b - n_b + r, for r < n_b and p <= t; else 0.
// With group_mean, H = Hk and P[b, h] is the mean over the G query heads of KV head h; else H = Hq.
struct LastBlockAttentionParams {
  PrefillQK qk;
  int32_t block_size = 0;   // bs > 0 (the number of last queries)
  bool group_mean = false;
  int32_t max_len = 0;      // columns of probs (>= max_b L_b)
  float* probs = nullptr;   // [B, H, bs, max_len] out, contiguous
};

// Vertical and slash (diagonal) means of last-block probabilities, per (b, h):
//   vertical[p] = (1/n_b) sum_r P[r, p]                    (p < L_b)
//   slash[d]    = (1/n_b) sum_r P[r, t_r - d]              (d < L_b, t_r - d >= 0)
// with t_r = L_b - n_b + r; entries past L_b are 0.
struct VerticalSlashParams {
  int32_t batch = 0;
  const int32_t* cu_seqlens = nullptr;  // [B + 1]
  int64_t cu_seqlens_stride = 0;
  int64_t total_tokens = 0;             // T = cu_seqlens[B]
  int32_t num_heads = 0;                // H
  int32_t block_size = 0;               // bs: rows of probs
  int32_t max_len = 0;                  // columns of probs (>= max_b L_b)
  const float* probs = nullptr;         // [B, H, bs, max_len], contiguous (LastBlockAttention's)
  float* vertical = nullptr;            // [B, H, max_len] out, contiguous
  float* slash = nullptr;               // [B, H, max_len] out, contiguous
};

// Mean of each block's rows (the actual rows of a partial last block):
//   pooled[b, h, j] = mean_{p in block j} x[cu[b] + p, h]; blocks j >= nb_b are 0.
struct BlockPoolParams {
  int32_t batch = 0;
  const int32_t* cu_seqlens = nullptr;
  int64_t cu_seqlens_stride = 0;
  int64_t total_tokens = 0;
  int32_t num_heads = 0;          // H
  int32_t head_dim = 0;           // D
  DType dtype = DType::kFloat32;
  const void* x = nullptr;        // [T, H, D]
  int64_t x_stride_token = 0;
  int64_t x_stride_head = 0;
  int32_t block_size = 0;
  int32_t num_blocks = 0;         // Nb >= ceil(max_len / bs)
  float* pooled = nullptr;        // [B, H, Nb, D] out, contiguous
};

// Softmax of pooled block logits over the allowed key blocks of each query block i < nb_b:
//   A[b, h, i, j] = softmax_{j allowed} (s mean(Q_i) . mean(K_j)),
// allowed j: j <= i (segment_size = 0, FlexPrefill) or segment(j) < segment(i) with
// segment(j) = j / (segment_size / bs) (PBS-Attn's off-diagonal segments). Rows without an allowed
// block and entries outside are 0. With group_mean, H = Hk and each row is the mean over the
// group's query heads of their softmax rows; else H = Hq.
struct PooledBlockScoresParams {
  PrefillQK qk;
  int32_t block_size = 0;
  int32_t segment_size = 0;  // 0, or a positive multiple of block_size
  bool group_mean = false;
  int32_t num_blocks = 0;    // Nb >= ceil(max_len / bs)
  float* scores = nullptr;   // [B, H, Nb, Nb] out, contiguous
};

// Square-root Jensen-Shannon divergence (natural log) of the first n_r entries of two rows:
//   out[r] = sqrt(JSD(p_r, q_r)), JSD = 1/2 sum p log(p/m) + 1/2 sum q log(q/m), m = (p + q) / 2,
// a term with p_i = 0 (q_i = 0) counting 0. The rows are used as given (no renormalisation).
struct JsDistanceParams {
  int64_t rows = 0;
  int64_t n = 0;
  const float* p = nullptr;        // [rows, n], contiguous
  const float* q = nullptr;        // [rows, n], contiguous
  const int32_t* lengths = nullptr;  // [rows] n_r in [0, n], or null (n_r = n)
  float* out = nullptr;            // [rows] out
};

// Cumulative-coverage selection, per row r of scores [rows, n] restricted to its first n_r entries:
// order the entries by score, descending, ties to the lower index (NaN ranks last and weighs 0);
// keep the shortest prefix whose float64 running sum is >= gamma (all n_r entries when the total
// stays below gamma, none when gamma <= 0); then add the forced entries (they do not count toward
// gamma). indices[r] lists the kept entries ascending, padded with -1; counts[r] their number.
struct CoverageSelectParams {
  int64_t rows = 0;
  int64_t n = 0;
  const float* scores = nullptr;     // [rows, n], contiguous
  double gamma = 0.0;                // finite
  const int32_t* lengths = nullptr;  // [rows] n_r in [0, n], or null (n_r = n)
  const uint8_t* forced = nullptr;   // [rows, n] nonzero = forced, may be null; read below n_r
  int32_t* indices = nullptr;        // [rows, n] out
  int32_t* counts = nullptr;         // [rows] out
};

// ---- Builders ---------------------------------------------------------------------------------

// The block lists every builder writes. Row (b, h, i) for i < nb_b lists the key blocks query
// block i attends, strictly ascending, padded with -1; rows i >= nb_b have count 0.
struct BlockListsOut {
  int32_t num_q_blocks = 0;       // Nq >= ceil(max_len / bs)
  int32_t max_blocks = 0;         // M >= Nq
  int32_t* block_indices = nullptr;  // [B, H, Nq, M] out, contiguous
  int32_t* block_counts = nullptr;   // [B, H, Nq] out, contiguous
  // Listed blocks / blocks holding at least one causal (query, key) pair, per (b, h); 1 for an
  // empty sequence. May be null.
  float* density = nullptr;          // [B, H] out
};

// FlexPrefill (docs/prefill_masks.md): per (sequence, query head), H = Hq.
struct FlexPrefillMaskParams {
  PrefillQK qk;
  int32_t block_size = 0;     // bs > 0: query and key blocks
  double gamma = 0.0;         // coverage, in (0, 1]
  double tau = 0.0;           // pattern threshold, >= 0
  int64_t min_budget = 0;     // tokens, >= 0
  int64_t max_budget = 0;     // tokens, >= max(min_budget, 1)
  BlockListsOut out;
  // Per (b, h), may be null: 0 vertical-slash, 1 query-aware, 2 dense (short sequence);
  // the JS distance (NaN for dense); the vertical and slash block budgets used (0 for dense).
  int32_t* pattern = nullptr;          // [B, Hq]
  float* js_distance = nullptr;        // [B, Hq]
  int32_t* vertical_blocks = nullptr;  // [B, Hq]
  int32_t* slash_blocks = nullptr;     // [B, Hq]
};

// PBS-Attn key permutation, per (sequence, KV head): the keys of every complete segment of
// segment_size rows are sorted by descending group-mean last-block attention (ties to the lower
// position); the tail (L_b mod segment_size rows) stays; nothing moves when the sequence has no
// complete segment or is exactly one. v follows k.
struct PbsPermuteParams {
  PrefillQK qk;
  const void* v = nullptr;        // [T, Hk, D] in qk.dtype
  int64_t v_stride_token = 0;
  int64_t v_stride_head = 0;
  int32_t block_size = 0;         // bs: last queries scored
  int32_t segment_size = 0;       // a positive multiple of bs
  void* k_perm = nullptr;         // [T, Hk, D] out, contiguous, in qk.dtype
  void* v_perm = nullptr;         // [T, Hk, D] out, contiguous
  int32_t* key_positions = nullptr;  // [T, Hk] out: original in-sequence position of each row
};

// PBS-Attn block selection over permuted keys, per (sequence, KV head), H = Hk. qk.k holds the
// permuted keys; key_positions maps each stored row to its original position, a permutation of
// each segment (validated).
struct PbsMaskParams {
  PrefillQK qk;
  const int32_t* key_positions = nullptr;  // [T, Hk]
  int64_t key_positions_stride_token = 0;
  int64_t key_positions_stride_head = 0;
  int32_t block_size = 0;
  int32_t segment_size = 0;     // a positive multiple of block_size
  double threshold = 0.0;       // cumulative block mass, in (0, 1]
  bool force_first = true;      // always list the key block holding original position 0
  BlockListsOut out;
};

void last_block_attention_cpu(const LastBlockAttentionParams& p);
void vertical_slash_cpu(const VerticalSlashParams& p);
void block_pool_cpu(const BlockPoolParams& p);
void pooled_block_scores_cpu(const PooledBlockScoresParams& p);
void js_distance_cpu(const JsDistanceParams& p);
void coverage_select_cpu(const CoverageSelectParams& p);
void flexprefill_mask_cpu(const FlexPrefillMaskParams& p);
void pbs_permute_cpu(const PbsPermuteParams& p);
void pbs_mask_cpu(const PbsMaskParams& p);

// The builders' validation that reads no tensor value (host fields, pointer presence, parameter
// ranges): what a CUDA entry point can run before launching, with the messages of the *_cpu
// functions. The *_cpu functions run it first, then check the values (cu_seqlens, Nq against the
// lengths, key_positions).
void check_flexprefill_mask_args(const FlexPrefillMaskParams& p);
void check_pbs_permute_args(const PbsPermuteParams& p);
void check_pbs_mask_args(const PbsMaskParams& p);

}  // namespace absparse

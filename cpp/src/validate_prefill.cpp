// Argument validation of sparse_prefill (absparse/prefill.h). Everything here runs before the op
// reads or writes a tensor, so bad input raises InvalidArgument instead of reading out of bounds.
// Messages name the Python arguments (q, cu_seqlens, block_indices, ...).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "absparse/error.h"
#include "absparse/prefill.h"

namespace absparse {
namespace {

constexpr const char* kFn = "sparse_prefill";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void check_sparse_prefill_args(const SparsePrefillParams& p) {
  ABSPARSE_CHECK_ARG(p.batch >= 0, kFn, "cu_seqlens: expected B + 1 >= 1 entries, got ",
                     static_cast<int64_t>(p.batch) + 1);
  ABSPARSE_CHECK_ARG(p.total_tokens >= 0 && p.total_tokens <= INT32_MAX, kFn,
                     "q.shape[0]: expected a token count T in [0, 2^31) (cu_seqlens is int32), got ",
                     p.total_tokens);
  ABSPARSE_CHECK_ARG(p.num_kv_heads > 0, kFn, "k: expected at least one KV head, got ",
                     p.num_kv_heads);
  ABSPARSE_CHECK_ARG(p.num_q_heads > 0 && p.num_q_heads % p.num_kv_heads == 0, kFn,
                     "q: expected a number of query heads that is a positive multiple of the ",
                     p.num_kv_heads, " KV heads, got ", p.num_q_heads);
  ABSPARSE_CHECK_ARG(p.head_dim > 0, kFn, "q.shape[2]: expected a head dim > 0, got ", p.head_dim);
  ABSPARSE_CHECK_ARG(p.q_block > 0, kFn, "q_block: expected > 0, got ", p.q_block);
  ABSPARSE_CHECK_ARG(p.k_block > 0, kFn, "k_block: expected > 0, got ", p.k_block);
  ABSPARSE_CHECK_ARG(p.dtype == DType::kFloat32 || p.dtype == DType::kFloat16 ||
                         p.dtype == DType::kBFloat16,
                     kFn, "q: expected dtype float16, bfloat16 or float32, got ",
                     dtype_name(p.dtype));
  ABSPARSE_CHECK_ARG(p.num_list_heads == p.num_q_heads || p.num_list_heads == p.num_kv_heads, kFn,
                     "block_indices.shape[1]: expected Hq = ", p.num_q_heads,
                     " (a list per query head) or Hk = ", p.num_kv_heads,
                     " (a list per KV head), got ", p.num_list_heads);
  ABSPARSE_CHECK_ARG(p.num_q_blocks >= 0, kFn, "block_indices.shape[2]: expected Nq >= 0, got ",
                     p.num_q_blocks);
  ABSPARSE_CHECK_ARG(p.max_blocks >= 0, kFn, "block_indices.shape[3]: expected M >= 0, got ",
                     p.max_blocks);
  ABSPARSE_CHECK_ARG(std::isfinite(p.scale), kFn, "scale: expected a finite value, got ", p.scale);
  ABSPARSE_CHECK_ARG(p.cu_seqlens != nullptr, kFn, "cu_seqlens: expected a tensor, got none");
  const bool tokens = p.total_tokens > 0;
  ABSPARSE_CHECK_ARG(!tokens || p.q != nullptr, kFn, "q: expected a tensor, got none");
  ABSPARSE_CHECK_ARG(!tokens || p.k != nullptr, kFn, "k: expected a tensor, got none");
  ABSPARSE_CHECK_ARG(!tokens || p.v != nullptr, kFn, "v: expected a tensor, got none");
  ABSPARSE_CHECK_ARG(!tokens || p.out != nullptr, kFn, "out: expected a tensor, got none");
  const bool rows = static_cast<int64_t>(p.batch) * p.num_list_heads * p.num_q_blocks > 0;
  ABSPARSE_CHECK_ARG(!rows || p.block_counts != nullptr, kFn,
                     "block_counts: expected a tensor, got none");
  ABSPARSE_CHECK_ARG(!rows || p.max_blocks == 0 || p.block_indices != nullptr, kFn,
                     "block_indices: expected a tensor, got none");
}

void check_sparse_prefill(const SparsePrefillParams& p) {
  check_sparse_prefill_args(p);

  // cu_seqlens: 0, non-decreasing, T.
  const auto cu = [&p](int64_t b) -> int64_t { return p.cu_seqlens[b * p.cu_seqlens_stride]; };
  ABSPARSE_CHECK_ARG(cu(0) == 0, kFn, "cu_seqlens[0]: expected 0, got ", cu(0));
  int64_t max_len = 0;
  for (int32_t b = 0; b < p.batch; ++b) {
    ABSPARSE_CHECK_ARG(cu(b + 1) >= cu(b), kFn, "cu_seqlens[", b + 1,
                       "]: expected non-decreasing offsets, >= cu_seqlens[", b, "] = ", cu(b),
                       ", got ", cu(b + 1));
    max_len = std::max(max_len, cu(b + 1) - cu(b));
  }
  ABSPARSE_CHECK_ARG(cu(p.batch) == p.total_tokens, kFn, "cu_seqlens[", p.batch,
                     "]: expected the token count T = q.shape[0] = ", p.total_tokens, ", got ",
                     cu(p.batch));
  const int64_t needed_rows = ceil_div(max_len, p.q_block);
  ABSPARSE_CHECK_ARG(p.num_q_blocks >= needed_rows, kFn, "block_indices.shape[2]: expected Nq >= ",
                     "ceil(max_len / q_block) = ceil(", max_len, " / ", p.q_block, ") = ",
                     needed_rows, ", got ", p.num_q_blocks);

  // Block lists of every query block that exists: counts in [0, M], entries strictly ascending
  // key blocks of the sequence.
  for (int32_t b = 0; b < p.batch; ++b) {
    const int64_t len = cu(b + 1) - cu(b);
    const int64_t num_rows = ceil_div(len, p.q_block);
    const int64_t num_key_blocks = ceil_div(len, p.k_block);
    for (int32_t h = 0; h < p.num_list_heads; ++h) {
      for (int64_t i = 0; i < num_rows; ++i) {
        const int64_t count =
            p.block_counts[b * p.block_counts_stride_batch + h * p.block_counts_stride_head +
                           i * p.block_counts_stride_row];
        ABSPARSE_CHECK_ARG(count >= 0 && count <= p.max_blocks, kFn, "block_counts[", b, ", ", h,
                           ", ", i, "]: expected in [0, M = block_indices.shape[3] = ",
                           p.max_blocks, "], got ", count);
        const int32_t* list = p.block_indices + b * p.block_indices_stride_batch +
                              h * p.block_indices_stride_head + i * p.block_indices_stride_row;
        int64_t previous = -1;
        for (int64_t s = 0; s < count; ++s) {
          const int64_t j = list[s * p.block_indices_stride_slot];
          ABSPARSE_CHECK_ARG(j > previous && j < num_key_blocks, kFn, "block_indices[", b, ", ", h,
                             ", ", i, ", ", s, "]: expected a key block in [", previous + 1, ", ",
                             num_key_blocks, ") (strictly ascending; sequence ", b, " has ", len,
                             " keys, k_block ", p.k_block, "), got ", j);
          previous = j;
        }
      }
    }
  }

  // key_positions: per (sequence, KV head) a permutation of 0 .. L_b-1. first_row[x] is the
  // stored row that claimed position x (-1: none yet), to name both rows of a duplicate.
  if (p.key_positions == nullptr) return;
  std::vector<int64_t> first_row;
  for (int32_t b = 0; b < p.batch; ++b) {
    const int64_t begin = cu(b), len = cu(b + 1) - cu(b);
    for (int32_t h = 0; h < p.num_kv_heads; ++h) {
      first_row.assign(static_cast<size_t>(len), -1);
      for (int64_t r = 0; r < len; ++r) {
        const int64_t row = begin + r;
        const int64_t x = p.key_positions[row * p.key_positions_stride_token +
                                          h * p.key_positions_stride_head];
        ABSPARSE_CHECK_ARG(x >= 0 && x < len, kFn, "key_positions[", row, ", ", h,
                           "]: expected an in-sequence position in [0, ", len, ") (sequence ", b,
                           " owns rows [", begin, ", ", begin + len, ")), got ", x);
        ABSPARSE_CHECK_ARG(first_row[x] < 0, kFn, "key_positions[", row, ", ", h,
                           "]: expected a permutation of 0..", len - 1, " per sequence and KV ",
                           "head, but position ", x, " already appears at row ", first_row[x],
                           " (sequence ", b, ")");
        first_row[x] = row;
      }
    }
  }
}

}  // namespace absparse

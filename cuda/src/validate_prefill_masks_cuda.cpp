// Host-side validation of the CUDA prefill mask builders (absparse/prefill_masks_cuda.h): the
// checks of the CPU entry points that read no tensor value (the builders' check_*_args, same
// messages; the primitives' host-field checks, restated here because the CPU functions read
// cu_seqlens first), then the configurations the kernels run. Plain C++: runs before any CUDA call.
#include <cmath>
#include <cstdint>

#include "absparse/error.h"
#include "absparse/prefill_masks_cuda.h"
#include "prefill_common.h"  // cpp/src: the CPU entry points' host checks

namespace absparse {
namespace {

const char* kSupported =
    "the CUDA mask builders support dtype float32, float16 or bfloat16, head_dim 64 or 128, "
    "block_size <= 128 for last-block attention, and up to 65535 sequences and heads";

using prefill_detail::check_dtype;

// q / k host fields (the CPU side's check_qk_args, same messages), then the GPU's supported set.
void check_qk_cuda(const char* fn, const PrefillQK& in) {
  prefill_detail::check_qk_args(fn, in);
  ABSPARSE_CHECK_ARG(in.batch <= 65535, fn, "cu_seqlens: expected B in [0, 65535] on the GPU, got B = ",
                     in.batch, "; ", kSupported);
  ABSPARSE_CHECK_ARG(in.num_q_heads <= 65535, fn, "q: ", in.num_q_heads,
                     " query heads are not supported on the GPU; ", kSupported);
  ABSPARSE_CHECK_ARG(in.head_dim == 64 || in.head_dim == 128, fn, "q: head_dim ", in.head_dim,
                     " is not supported on the GPU; ", kSupported);
}

void check_block_size(const char* fn, int32_t bs, bool last_block) {
  prefill_detail::check_block_size(fn, bs);
  ABSPARSE_CHECK_ARG(!last_block || bs <= 128, fn, "block_size: ", bs,
                     " is not supported on the GPU; ", kSupported);
}

void check_rows(const char* fn, int64_t rows, int64_t n) {
  ABSPARSE_CHECK_ARG(rows >= 0 && n >= 0 && n <= INT32_MAX, fn,
                     "scores: expected a [rows, n] tensor with n < 2^31, got rows = ", rows,
                     ", n = ", n);
  ABSPARSE_CHECK_ARG(rows <= INT32_MAX, fn, "rows: expected < 2^31 on the GPU, got ", rows);
}

}  // namespace

void check_last_block_attention_cuda(const LastBlockAttentionParams& p) {
  const char* fn = "last_block_attention";
  check_qk_cuda(fn, p.qk);
  check_block_size(fn, p.block_size, true);
  ABSPARSE_CHECK_ARG(p.max_len >= 0, fn, "probs.shape[3]: expected >= 0, got ", p.max_len);
  ABSPARSE_CHECK_ARG(p.probs || p.qk.batch == 0 || p.max_len == 0, fn,
                     "probs: expected an output pointer, got null");
}

void check_vertical_slash_cuda(const VerticalSlashParams& p) {
  const char* fn = "vertical_slash_sums";
  ABSPARSE_CHECK_ARG(p.batch >= 0 && p.batch <= 65535, fn,
                     "cu_seqlens: expected B in [0, 65535] on the GPU, got B = ", p.batch);
  ABSPARSE_CHECK_ARG(p.cu_seqlens != nullptr, fn, "cu_seqlens: expected a pointer, got null");
  ABSPARSE_CHECK_ARG(p.block_size > 0, fn, "block_size: expected > 0, got ", p.block_size);
  ABSPARSE_CHECK_ARG(p.num_heads > 0 && p.num_heads <= 65535, fn,
                     "probs.shape[1]: expected H in [1, 65535], got ", p.num_heads);
  ABSPARSE_CHECK_ARG(p.max_len >= 0, fn, "probs.shape[3]: expected >= 0, got ", p.max_len);
  ABSPARSE_CHECK_ARG(p.batch == 0 || p.max_len == 0 || (p.probs && p.vertical && p.slash), fn,
                     "probs, vertical, slash: expected pointers, got null");
}

void check_block_pool_cuda(const BlockPoolParams& p) {
  const char* fn = "block_pool";
  ABSPARSE_CHECK_ARG(p.batch >= 0 && p.batch <= 65535, fn,
                     "cu_seqlens: expected B in [0, 65535] on the GPU, got B = ", p.batch);
  ABSPARSE_CHECK_ARG(p.total_tokens >= 0 && p.total_tokens <= INT32_MAX, fn,
                     "total_tokens: expected T in [0, 2^31), got ", p.total_tokens);
  ABSPARSE_CHECK_ARG(p.cu_seqlens != nullptr, fn, "cu_seqlens: expected a pointer, got null");
  check_block_size(fn, p.block_size, false);
  check_dtype(fn, "x", p.dtype);
  ABSPARSE_CHECK_ARG(p.num_heads > 0 && p.head_dim > 0, fn, "x: expected H > 0 and D > 0, got H = ",
                     p.num_heads, ", D = ", p.head_dim);
  ABSPARSE_CHECK_ARG(p.num_heads <= 65535, fn, "x: ", p.num_heads,
                     " heads are not supported on the GPU; ", kSupported);
  ABSPARSE_CHECK_ARG(p.num_blocks >= 0, fn, "pooled.shape[2]: expected >= 0, got ", p.num_blocks);
  ABSPARSE_CHECK_ARG(
      (p.pooled || p.batch == 0 || p.num_blocks == 0) && (p.total_tokens == 0 || p.x), fn,
      "x, pooled: expected pointers, got null");
}

void check_pooled_block_scores_cuda(const PooledBlockScoresParams& p) {
  const char* fn = "pooled_block_scores";
  check_qk_cuda(fn, p.qk);
  check_block_size(fn, p.block_size, false);
  ABSPARSE_CHECK_ARG(p.segment_size == 0 || (p.segment_size > 0 && p.segment_size % p.block_size == 0),
                     fn, "segment_size: expected a positive multiple of block_size ", p.block_size,
                     " (or 0), got ", p.segment_size);
  ABSPARSE_CHECK_ARG(p.num_blocks >= 0, fn, "scores.shape[2]: expected >= 0, got ", p.num_blocks);
  ABSPARSE_CHECK_ARG(p.scores || p.qk.batch == 0 || p.num_blocks == 0, fn,
                     "scores: expected an output pointer, got null");
}

void check_js_distance_cuda(const JsDistanceParams& p) {
  const char* fn = "js_distance";
  ABSPARSE_CHECK_ARG(p.rows >= 0 && p.n >= 0, fn, "p: expected a [rows, n] tensor, got rows = ",
                     p.rows, ", n = ", p.n);
  ABSPARSE_CHECK_ARG(p.rows <= INT32_MAX, fn, "p: expected rows < 2^31 on the GPU, got ", p.rows);
  ABSPARSE_CHECK_ARG(p.rows == 0 || (p.out && (p.n == 0 || (p.p && p.q))), fn,
                     "p, q, out: expected pointers, got null");
}

void check_coverage_select_cuda(const CoverageSelectParams& p) {
  const char* fn = "coverage_select";
  check_rows(fn, p.rows, p.n);
  ABSPARSE_CHECK_ARG(std::isfinite(p.gamma), fn, "gamma: expected a finite float, got ", p.gamma);
  ABSPARSE_CHECK_ARG(p.rows == 0 || (p.counts && (p.n == 0 || (p.scores && p.indices))), fn,
                     "scores, indices, counts: expected pointers, got null");
}

void check_flexprefill_mask_cuda(const FlexPrefillMaskParams& p) {
  const char* fn = "flexprefill_mask";
  check_flexprefill_mask_args(p);
  check_qk_cuda(fn, p.qk);
  check_block_size(fn, p.block_size, true);
}

void check_pbs_permute_cuda(const PbsPermuteParams& p, int32_t max_len) {
  const char* fn = "pbs_permute";
  check_pbs_permute_args(p);
  check_qk_cuda(fn, p.qk);
  check_block_size(fn, p.block_size, true);
  ABSPARSE_CHECK_ARG(max_len >= 0, fn, "max_len: expected >= 0 (0: T), got ", max_len);
}

void check_pbs_mask_cuda(const PbsMaskParams& p) {
  const char* fn = "pbs_mask";
  check_pbs_mask_args(p);
  check_qk_cuda(fn, p.qk);
}

}  // namespace absparse

// CPU reference of the prefill mask primitives (absparse/prefill_masks.h, docs/prefill_masks.md):
// last-block attention, vertical/slash means, block pooling, pooled block scores, JS distance and
// the coverage selector. float64 throughout; one (sequence, head) at a time.
#include <algorithm>
#include <cmath>
#include <vector>

#include "absparse/error.h"
#include "absparse/prefill_masks.h"
#include "prefill_common.h"

namespace absparse {

using namespace prefill_detail;

// ---- Primitives -------------------------------------------------------------------------------

void last_block_attention_cpu(const LastBlockAttentionParams& p) {
  const char* fn = "last_block_attention";
  const std::vector<Seq> seqs = check_qk(fn, p.qk);
  check_block_size(fn, p.block_size);
  ABSPARSE_CHECK_ARG(p.max_len >= max_len_of(seqs), fn, "probs.shape[3]: expected >= max_len ",
                     max_len_of(seqs), ", got ", p.max_len);
  ABSPARSE_CHECK_ARG(p.probs || p.qk.batch == 0 || p.max_len == 0, fn,
                     "probs: expected an output pointer, got null");
  const PrefillQK& in = p.qk;
  const int32_t group = in.num_q_heads / in.num_kv_heads;
  const int32_t heads = p.group_mean ? in.num_kv_heads : in.num_q_heads;
  const int64_t bs = p.block_size, width = p.max_len;
  std::vector<double> keys, acc;
  for (int32_t b = 0; b < in.batch; ++b) {
    for (int32_t h = 0; h < heads; ++h) {
      acc.assign(static_cast<size_t>(bs) * width, 0.0);
      const int32_t hk = p.group_mean ? h : h / group;
      load_keys(in, seqs[b], hk, keys);
      const int32_t first = p.group_mean ? h * group : h, count = p.group_mean ? group : 1;
      for (int32_t hq = first; hq < first + count; ++hq) {
        for_each_last_query(in, seqs[b], hq, keys, p.block_size,
                            [&](int64_t r, int64_t, const double* probs) {
                              for (int64_t c = 0; c < seqs[b].len; ++c) {
                                acc[r * width + c] += probs[c] / count;
                              }
                            });
      }
      float* dst = p.probs + (int64_t{b} * heads + h) * bs * width;
      for (int64_t i = 0; i < bs * width; ++i) dst[i] = static_cast<float>(acc[i]);
    }
  }
}

void vertical_slash_cpu(const VerticalSlashParams& p) {
  const char* fn = "vertical_slash_sums";
  const std::vector<Seq> seqs =
      read_sequences(fn, p.cu_seqlens, p.cu_seqlens_stride, p.batch, p.total_tokens);
  check_block_size(fn, p.block_size);
  ABSPARSE_CHECK_ARG(p.num_heads > 0, fn, "probs.shape[1]: expected H > 0, got ", p.num_heads);
  ABSPARSE_CHECK_ARG(p.max_len >= max_len_of(seqs), fn, "probs.shape[3]: expected >= max_len ",
                     max_len_of(seqs), ", got ", p.max_len);
  ABSPARSE_CHECK_ARG(p.batch == 0 || p.max_len == 0 || (p.probs && p.vertical && p.slash), fn,
                     "probs, vertical, slash: expected pointers, got null");
  const int64_t width = p.max_len;
  std::vector<double> vertical, slash;
  for (int32_t b = 0; b < p.batch; ++b) {
    const int64_t len = seqs[b].len, n = std::min<int64_t>(p.block_size, len);
    for (int32_t h = 0; h < p.num_heads; ++h) {
      const float* probs = p.probs + (int64_t{b} * p.num_heads + h) * p.block_size * width;
      vertical.assign(width, 0.0);
      slash.assign(width, 0.0);
      for (int64_t r = 0; r < n; ++r) {
        const int64_t t = len - n + r;
        for (int64_t c = 0; c <= t; ++c) {
          vertical[c] += probs[r * width + c] / n;
          slash[t - c] += probs[r * width + c] / n;
        }
      }
      const int64_t at = (int64_t{b} * p.num_heads + h) * width;
      for (int64_t c = 0; c < width; ++c) {
        p.vertical[at + c] = static_cast<float>(vertical[c]);
        p.slash[at + c] = static_cast<float>(slash[c]);
      }
    }
  }
}

void block_pool_cpu(const BlockPoolParams& p) {
  const char* fn = "block_pool";
  const std::vector<Seq> seqs =
      read_sequences(fn, p.cu_seqlens, p.cu_seqlens_stride, p.batch, p.total_tokens);
  check_block_size(fn, p.block_size);
  check_dtype(fn, "x", p.dtype);
  ABSPARSE_CHECK_ARG(p.num_heads > 0 && p.head_dim > 0, fn, "x: expected H > 0 and D > 0, got H = ",
                     p.num_heads, ", D = ", p.head_dim);
  const int64_t need = ceil_div(max_len_of(seqs), p.block_size);
  ABSPARSE_CHECK_ARG(p.num_blocks >= need, fn, "pooled.shape[2]: expected >= ceil(max_len / ",
                     "block_size) = ", need, ", got ", p.num_blocks);
  ABSPARSE_CHECK_ARG(
      (p.pooled || p.batch == 0 || p.num_blocks == 0) && (p.total_tokens == 0 || p.x), fn,
                     "x, pooled: expected pointers, got null");
  const int32_t dim = p.head_dim;
  std::vector<double> rows;
  for (int32_t b = 0; b < p.batch; ++b) {
    for (int32_t h = 0; h < p.num_heads; ++h) {
      load_rows(p.x, p.dtype, p.x_stride_token, p.x_stride_head, h, seqs[b].begin, seqs[b].len,
                dim, rows);
      const std::vector<double> pooled = pool(rows, seqs[b].len, dim, p.block_size);
      float* dst = p.pooled + (int64_t{b} * p.num_heads + h) * p.num_blocks * dim;
      std::fill(dst, dst + int64_t{p.num_blocks} * dim, 0.0f);
      for (size_t i = 0; i < pooled.size(); ++i) dst[i] = static_cast<float>(pooled[i]);
    }
  }
}

void pooled_block_scores_cpu(const PooledBlockScoresParams& p) {
  const char* fn = "pooled_block_scores";
  const std::vector<Seq> seqs = check_qk(fn, p.qk);
  check_block_size(fn, p.block_size);
  check_segment_size(fn, p.segment_size, p.block_size, true);
  const int64_t need = ceil_div(max_len_of(seqs), p.block_size);
  ABSPARSE_CHECK_ARG(p.num_blocks >= need, fn, "scores.shape[2]: expected >= ceil(max_len / ",
                     "block_size) = ", need, ", got ", p.num_blocks);
  ABSPARSE_CHECK_ARG(p.scores || p.qk.batch == 0 || p.num_blocks == 0, fn,
                     "scores: expected an output pointer, got null");
  const PrefillQK& in = p.qk;
  const int32_t dim = in.head_dim, group = in.num_q_heads / in.num_kv_heads;
  const int32_t heads = p.group_mean ? in.num_kv_heads : in.num_q_heads;
  const int64_t per_segment = p.segment_size / p.block_size, width = p.num_blocks;
  std::vector<double> rows, a;
  for (int32_t b = 0; b < in.batch; ++b) {
    const Seq& s = seqs[b];
    const int64_t nb = ceil_div(s.len, p.block_size);
    for (int32_t h = 0; h < heads; ++h) {
      const int32_t hk = p.group_mean ? h : h / group;
      load_keys(in, s, hk, rows);
      const std::vector<double> kbar = pool(rows, s.len, dim, p.block_size);
      a.assign(static_cast<size_t>(nb) * nb, 0.0);
      const int32_t first = p.group_mean ? h * group : h, count = p.group_mean ? group : 1;
      for (int32_t hq = first; hq < first + count; ++hq) {
        load_rows(in.q, in.dtype, in.q_stride_token, in.q_stride_head, hq, s.begin, s.len, dim,
                  rows);
        pooled_softmax(pool(rows, s.len, dim, p.block_size), kbar, nb, dim, in.scale, per_segment,
                       1.0 / count, a);
      }
      float* dst = p.scores + (int64_t{b} * heads + h) * width * width;
      std::fill(dst, dst + width * width, 0.0f);
      for (int64_t i = 0; i < nb; ++i) {
        for (int64_t j = 0; j < nb; ++j) dst[i * width + j] = static_cast<float>(a[i * nb + j]);
      }
    }
  }
}

void js_distance_cpu(const JsDistanceParams& p) {
  const char* fn = "js_distance";
  ABSPARSE_CHECK_ARG(p.rows >= 0 && p.n >= 0, fn, "p: expected a [rows, n] tensor, got rows = ",
                     p.rows, ", n = ", p.n);
  ABSPARSE_CHECK_ARG(p.rows == 0 || (p.out && (p.n == 0 || (p.p && p.q))), fn,
                     "p, q, out: expected pointers, got null");
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t len = p.lengths ? p.lengths[r] : p.n;
    ABSPARSE_CHECK_ARG(len >= 0 && len <= p.n, fn, "lengths[", r, "]: expected a value in [0, ",
                       p.n, "], got ", len);
  }
  std::vector<double> a, b;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t len = p.lengths ? p.lengths[r] : p.n;
    a.assign(p.p + r * p.n, p.p + r * p.n + len);
    b.assign(p.q + r * p.n, p.q + r * p.n + len);
    p.out[r] = static_cast<float>(js_distance(a.data(), b.data(), len));
  }
}

void coverage_select_cpu(const CoverageSelectParams& p) {
  const char* fn = "coverage_select";
  ABSPARSE_CHECK_ARG(p.rows >= 0 && p.n >= 0 && p.n <= INT32_MAX, fn,
                     "scores: expected a [rows, n] tensor with n < 2^31, got rows = ", p.rows,
                     ", n = ", p.n);
  ABSPARSE_CHECK_ARG(std::isfinite(p.gamma), fn, "gamma: expected a finite float, got ", p.gamma);
  ABSPARSE_CHECK_ARG(p.rows == 0 || (p.counts && (p.n == 0 || (p.scores && p.indices))), fn,
                     "scores, indices, counts: expected pointers, got null");
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t len = p.lengths ? p.lengths[r] : p.n;
    ABSPARSE_CHECK_ARG(len >= 0 && len <= p.n, fn, "lengths[", r, "]: expected a value in [0, ",
                       p.n, "], got ", len);
  }
  std::vector<double> score;
  std::vector<int64_t> order;
  std::vector<char> keep;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t len = p.lengths ? p.lengths[r] : p.n;
    score.assign(p.scores + r * p.n, p.scores + r * p.n + len);
    rank(score.data(), len, -1, order);
    const int64_t k = coverage_count(score.data(), order, p.gamma);
    keep.assign(len, 0);
    for (int64_t i = 0; i < k; ++i) keep[order[i]] = 1;
    int32_t* row = p.indices + r * p.n;
    int64_t count = 0;
    for (int64_t i = 0; i < len; ++i) {
      if (keep[i] || (p.forced && p.forced[r * p.n + i])) row[count++] = static_cast<int32_t>(i);
    }
    std::fill(row + count, row + p.n, -1);
    p.counts[r] = static_cast<int32_t>(count);
  }
}

}  // namespace absparse

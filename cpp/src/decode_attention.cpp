// sparse_decode and dense_decode on the CPU: one query token per sequence attends to the tokens
// of its attended set A (docs/decode.md, "Sparse attention"), in float64.
//
// Per (sequence, KV head) the G query heads of the group are processed together: every key and
// value row is converted to float64 once and used by all G heads (the CPU analogue of the GPU's
// shared KV read). Softmax is two-pass: logits and their maximum, then exp-weights and sums.
#include <cmath>
#include <limits>
#include <vector>

#include "absparse/decode.h"
#include "float64_rows.h"

namespace absparse {

using float64_rows::dot;
using float64_rows::LoadRow;
using float64_rows::row_loader;

void decode_attention_cpu(const DecodeAttentionParams& p) {
  check_decode_attention(p);
  const BatchGeometry& g = p.geometry;
  const int32_t dim = g.head_dim;
  const int32_t group = p.num_q_heads / g.num_kv_heads;
  const LoadRow load = row_loader(p.dtype);

  std::vector<int64_t> tokens;                 // attended positions of one (sequence, KV head)
  std::vector<double> queries(static_cast<size_t>(group) * dim);  // [G, D]
  std::vector<double> row(dim);                // one key or value row
  std::vector<double> logits;                  // [G, |A|]
  std::vector<double> peaks(group), totals(group);
  std::vector<double> acc(static_cast<size_t>(group) * dim);      // [G, D]

  for (int32_t b = 0; b < g.batch; ++b) {
    const int64_t len = g.seq_lens[b * g.seq_lens_stride];
    const int32_t* pages = g.page_table + b * g.page_table_stride_batch;
    auto row_offset = [&](const PagedCacheView& cache, int64_t t, int32_t h) {
      return pages[(t / g.page_size) * g.page_table_stride_page] * cache.stride_page +
             (t % g.page_size) * cache.stride_token + h * cache.stride_head;
    };
    for (int32_t h = 0; h < g.num_kv_heads; ++h) {
      // Attended set: every token (dense), or the listed blocks plus the partial tail (sparse).
      tokens.clear();
      int64_t tail_begin = 0;
      if (p.block_sizes) {
        const int64_t bs = p.block_sizes[h];
        const int32_t* list = p.block_indices + b * p.block_indices_stride_batch +
                              h * p.block_indices_stride_head;
        const int64_t count =
            p.block_counts[b * p.block_counts_stride_batch + h * p.block_counts_stride_head];
        for (int64_t i = 0; i < count; ++i) {
          const int64_t j = list[i * p.block_indices_stride_slot];
          for (int64_t t = j * bs; t < (j + 1) * bs; ++t) tokens.push_back(t);
        }
        tail_begin = (len / bs) * bs;
      }
      for (int64_t t = tail_begin; t < len; ++t) tokens.push_back(t);
      const size_t n = tokens.size();

      for (int32_t i = 0; i < group; ++i) {
        load(p.q, b * p.q_stride_batch + (h * group + i) * p.q_stride_head, dim,
             queries.data() + static_cast<size_t>(i) * dim);
      }
      // Pass 1: logits [G, n] and their maximum per head (a NaN logit propagates to the output).
      logits.resize(static_cast<size_t>(group) * n);
      std::fill(peaks.begin(), peaks.end(), -std::numeric_limits<double>::infinity());
      for (size_t k = 0; k < n; ++k) {
        load(p.k_cache.data, row_offset(p.k_cache, tokens[k], h), dim, row.data());
        for (int32_t i = 0; i < group; ++i) {
          const double l = p.scale * dot(queries.data() + static_cast<size_t>(i) * dim, row.data(), dim);
          logits[i * n + k] = l;
          peaks[i] = std::max(peaks[i], l);
        }
      }
      // Pass 2: weights exp(l - peak), their sums, and the weighted sums of value rows.
      std::fill(acc.begin(), acc.end(), 0.0);
      std::fill(totals.begin(), totals.end(), 0.0);
      for (size_t k = 0; k < n; ++k) {
        load(p.v_cache.data, row_offset(p.v_cache, tokens[k], h), dim, row.data());
        for (int32_t i = 0; i < group; ++i) {
          const double w = std::exp(logits[i * n + k] - peaks[i]);
          totals[i] += w;
          double* a = acc.data() + static_cast<size_t>(i) * dim;
          for (int32_t d = 0; d < dim; ++d) a[d] += w * row[d];
        }
      }
      for (int32_t i = 0; i < group; ++i) {
        const int32_t qh = h * group + i;
        const int64_t out_at = b * p.out_stride_batch + qh * p.out_stride_head;
        const double* a = acc.data() + static_cast<size_t>(i) * dim;
        for (int32_t d = 0; d < dim; ++d) {
          store_double(p.out, out_at + d, p.dtype, n == 0 ? 0.0 : a[d] / totals[i]);
        }
        if (p.lse) {
          p.lse[b * p.lse_stride_batch + qh * p.lse_stride_head] =
              n == 0 ? -std::numeric_limits<float>::infinity()
                     : static_cast<float>(peaks[i] + std::log(totals[i]));
        }
      }
    }
  }
}

}  // namespace absparse

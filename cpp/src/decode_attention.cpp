// sparse_decode and dense_decode on the CPU: one query token per sequence attends to the tokens
// of its attended set A (docs/decode.md, "Sparse attention"), in float64.
#include <cmath>
#include <limits>
#include <vector>

#include "absparse/decode.h"

namespace absparse {

void decode_attention_cpu(const DecodeAttentionParams& p) {
  check_decode_attention(p);
  const BatchGeometry& g = p.geometry;
  const int32_t dim = g.head_dim;
  const int32_t group = p.num_q_heads / g.num_kv_heads;

  std::vector<int64_t> tokens;   // attended token positions of one (sequence, KV head)
  std::vector<double> query(dim);
  std::vector<double> logits;
  std::vector<double> acc(dim);

  for (int32_t b = 0; b < g.batch; ++b) {
    const int64_t len = g.seq_lens[b * g.seq_lens_stride];
    const int32_t* pages = g.page_table + b * g.page_table_stride_batch;
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

      for (int32_t i = 0; i < group; ++i) {
        const int32_t qh = h * group + i;
        const int64_t q_at = b * p.q_stride_batch + qh * p.q_stride_head;
        for (int32_t d = 0; d < dim; ++d) query[d] = load_float(p.q, q_at + d, p.dtype);
        // Pass 1: logits and their maximum (for a stable softmax).
        logits.resize(tokens.size());
        double peak = -std::numeric_limits<double>::infinity();
        for (size_t n = 0; n < tokens.size(); ++n) {
          const int64_t t = tokens[n];
          const int64_t k_at = pages[(t / g.page_size) * g.page_table_stride_page] *
                                   p.k_cache.stride_page +
                               (t % g.page_size) * p.k_cache.stride_token +
                               h * p.k_cache.stride_head;
          double dot = 0.0;
          for (int32_t d = 0; d < dim; ++d) dot += query[d] * load_float(p.k_cache.data, k_at + d, p.dtype);
          logits[n] = p.scale * dot;
          peak = std::max(peak, logits[n]);  // a NaN logit propagates through the sums below
        }
        // Pass 2: weights exp(l - peak), their sum, and the weighted sum of values.
        std::fill(acc.begin(), acc.end(), 0.0);
        double total = 0.0;
        for (size_t n = 0; n < tokens.size(); ++n) {
          const int64_t t = tokens[n];
          const double w = std::exp(logits[n] - peak);
          total += w;
          const int64_t v_at = pages[(t / g.page_size) * g.page_table_stride_page] *
                                   p.v_cache.stride_page +
                               (t % g.page_size) * p.v_cache.stride_token +
                               h * p.v_cache.stride_head;
          for (int32_t d = 0; d < dim; ++d) acc[d] += w * load_float(p.v_cache.data, v_at + d, p.dtype);
        }
        const int64_t out_at = b * p.out_stride_batch + qh * p.out_stride_head;
        const bool empty = tokens.empty();
        for (int32_t d = 0; d < dim; ++d) {
          store_double(p.out, out_at + d, p.dtype, empty ? 0.0 : acc[d] / total);
        }
        if (p.lse) {
          p.lse[b * p.lse_stride_batch + qh * p.lse_stride_head] =
              empty ? -std::numeric_limits<float>::infinity()
                    : static_cast<float>(peak + std::log(total));
        }
      }
    }
  }
}

}  // namespace absparse

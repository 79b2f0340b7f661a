// sparse_prefill on the CPU: block-sparse causal attention of a packed varlen batch, in float64
// (absparse/prefill.h states the attended set; docs/prefill.md the choices).
//
// Per (sequence, KV head) the sequence's key and value rows are converted to float64 once ([L, D]
// each) and used by all G query heads of the group. Per (query head, query block) the listed key
// blocks are expanded to stored key rows once; each query row then keeps the rows whose original
// position is <= its own and runs a two-pass softmax: logits and their maximum, then exp-weights,
// their sum and the weighted sum of value rows. Everything is rounded once at the end.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absparse/prefill.h"
#include "float64_rows.h"

namespace absparse {

using float64_rows::dot;
using float64_rows::LoadRow;
using float64_rows::row_loader;

void sparse_prefill_cpu(const SparsePrefillParams& p) {
  check_sparse_prefill(p);
  const int32_t dim = p.head_dim;
  const int32_t group = p.num_q_heads / p.num_kv_heads;
  const bool list_per_q_head = p.num_list_heads == p.num_q_heads;
  const LoadRow load = row_loader(p.dtype);
  const double neg_inf = -std::numeric_limits<double>::infinity();

  std::vector<double> keys, values;   // [L, D] of one (sequence, KV head)
  std::vector<int64_t> positions;     // [L] original position of each stored key row
  std::vector<int64_t> rows;          // stored key rows of the blocks listed for one query block
  std::vector<int64_t> seen;          // [n] the rows one query row sees
  std::vector<double> logits;         // [n]
  std::vector<double> query(dim), acc(dim);

  for (int32_t b = 0; b < p.batch; ++b) {
    const int64_t begin = p.cu_seqlens[b * p.cu_seqlens_stride];
    const int64_t len = p.cu_seqlens[(b + 1) * p.cu_seqlens_stride] - begin;
    const int64_t num_q_blocks = (len + p.q_block - 1) / p.q_block;
    for (int32_t h = 0; h < p.num_kv_heads; ++h) {
      keys.resize(static_cast<size_t>(len) * dim);
      values.resize(static_cast<size_t>(len) * dim);
      positions.resize(static_cast<size_t>(len));
      for (int64_t r = 0; r < len; ++r) {
        const int64_t row = begin + r;
        load(p.k, row * p.k_stride_token + h * p.k_stride_head, dim, keys.data() + r * dim);
        load(p.v, row * p.v_stride_token + h * p.v_stride_head, dim, values.data() + r * dim);
        positions[r] = p.key_positions ? p.key_positions[row * p.key_positions_stride_token +
                                                         h * p.key_positions_stride_head]
                                       : r;
      }
      for (int32_t qh = h * group; qh < (h + 1) * group; ++qh) {
        const int32_t list_head = list_per_q_head ? qh : h;
        for (int64_t i = 0; i < num_q_blocks; ++i) {
          // The listed blocks as stored rows; the last block of the sequence may be partial.
          const int64_t count =
              p.block_counts[b * p.block_counts_stride_batch +
                             list_head * p.block_counts_stride_head + i * p.block_counts_stride_row];
          const int32_t* list = p.block_indices + b * p.block_indices_stride_batch +
                                list_head * p.block_indices_stride_head +
                                i * p.block_indices_stride_row;
          rows.clear();
          for (int64_t s = 0; s < count; ++s) {
            const int64_t j = list[s * p.block_indices_stride_slot];
            const int64_t end = std::min((j + 1) * p.k_block, len);
            for (int64_t r = j * p.k_block; r < end; ++r) rows.push_back(r);
          }
          const int64_t t_end = std::min((i + 1) * p.q_block, len);
          for (int64_t t = i * p.q_block; t < t_end; ++t) {
            const int64_t row = begin + t;
            load(p.q, row * p.q_stride_token + qh * p.q_stride_head, dim, query.data());
            // Pass 1: causal filter by original position, logits and their maximum (a NaN logit
            // propagates to the output, as in decode).
            seen.clear();
            logits.clear();
            double peak = neg_inf;
            for (const int64_t r : rows) {
              if (positions[r] > t) continue;
              const double l = p.scale * dot(query.data(), keys.data() + r * dim, dim);
              seen.push_back(r);
              logits.push_back(l);
              peak = std::max(peak, l);
            }
            // Pass 2: weights exp(l - peak), their sum, the weighted sum of value rows.
            std::fill(acc.begin(), acc.end(), 0.0);
            double total = 0.0;
            for (size_t k = 0; k < seen.size(); ++k) {
              const double w = std::exp(logits[k] - peak);
              total += w;
              const double* value = values.data() + seen[k] * dim;
              for (int32_t d = 0; d < dim; ++d) acc[d] += w * value[d];
            }
            const bool empty = seen.empty();
            const int64_t out_at = row * p.out_stride_token + qh * p.out_stride_head;
            for (int32_t d = 0; d < dim; ++d) {
              store_double(p.out, out_at + d, p.dtype, empty ? 0.0 : acc[d] / total);
            }
            if (p.lse) {
              p.lse[row * p.lse_stride_token + qh * p.lse_stride_head] =
                  empty ? -std::numeric_limits<float>::infinity()
                        : static_cast<float>(peak + std::log(total));
            }
          }
        }
      }
    }
  }
}

}  // namespace absparse

// select_blocks on the CPU: score candidate blocks from their summaries, keep the top k per
// (sequence, KV head), and emit sink ∪ selected ∪ local in ascending order.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "absparse/decode.h"
#include "absparse/quantize.h"

namespace absparse {

namespace {
// ceil(a / b) for a >= 0, b > 0, without overflow near INT64_MAX.
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }
// Floor division that is correct for negative numerators (C++ '/' truncates toward zero).
int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a) / b + ((-a) % b != 0)); }
}  // namespace

SelectionPlan plan_selection(int64_t seq_len, int32_t block_size, int64_t budget_tokens,
                             double budget_fraction, int64_t sink_tokens, int64_t local_tokens) {
  SelectionPlan plan{};
  const int64_t n = seq_len / block_size;
  plan.num_blocks = n;
  plan.sink_blocks = std::min(ceil_div(sink_tokens, block_size), n);
  const int64_t local_blocks = std::min(ceil_div(local_tokens, block_size), n);
  // Local blocks that overlap the sink are kept once: candidates are [sink_blocks, local_begin).
  plan.local_begin = std::max(n - local_blocks, plan.sink_blocks);
  plan.num_candidates = plan.local_begin - plan.sink_blocks;
  // A fractional budget is ceil(fraction * L) tokens, evaluated in float64.
  const int64_t budget = budget_fraction > 0.0
                             ? static_cast<int64_t>(std::ceil(budget_fraction * seq_len))
                             : budget_tokens;
  if (budget >= seq_len) {
    plan.num_selected = plan.num_candidates;  // everything: equals dense attention
  } else {
    const int64_t kept = n - plan.num_candidates;
    const int64_t tail = seq_len - n * block_size;
    const int64_t k = floor_div(budget - block_size * kept - tail, block_size);
    plan.num_selected = std::clamp<int64_t>(k, 0, plan.num_candidates);
  }
  return plan;
}

int64_t required_max_blocks(const LayerLayout& layout, const int32_t* seq_lens, int32_t batch,
                            int64_t seq_lens_stride, int64_t budget_tokens, double budget_fraction,
                            int64_t sink_tokens, int64_t local_tokens) {
  int64_t most = 0;
  for (int32_t b = 0; b < batch; ++b) {
    for (int32_t h = 0; h < layout.num_kv_heads(); ++h) {
      const SelectionPlan plan =
          plan_selection(seq_lens[b * seq_lens_stride], layout.block_size(h), budget_tokens,
                         budget_fraction, sink_tokens, local_tokens);
      most = std::max(most, plan.count());
    }
  }
  return most;
}

namespace {

template <typename T>
bool all_finite(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return false;
  }
  return true;
}

// Block logit s * score(q, summary) from dequantized summary vectors (float64 arithmetic).
//   mean:        q · c
//   minmax/cub.: sum_d max(q_d * hi_d, q_d * lo_d)
// NaN when q or a summary value is NaN or +-inf (docs/decode.md, "Choices"): the finite-input
// arithmetic below would otherwise turn inf into +-inf logits (ranked first) and drop NaN
// products depending on their side (std::max(a, NaN) is a, std::max(NaN, a) is NaN).
double block_logit(SummaryKind kind, const double* q, bool q_finite, const float* vectors,
                   bool vectors_finite, int32_t dim, double scale) {
  if (!q_finite || !vectors_finite) return std::numeric_limits<double>::quiet_NaN();
  double acc = 0.0;
  if (kind == SummaryKind::kMean) {
    for (int32_t d = 0; d < dim; ++d) acc += q[d] * vectors[d];
  } else {
    for (int32_t d = 0; d < dim; ++d) {
      acc += std::max(q[d] * vectors[d], q[d] * vectors[dim + d]);
    }
  }
  return scale * acc;
}

// NaN logits rank below every number (as -inf), keeping the sort well defined.
double rank_key(double x) { return std::isnan(x) ? -std::numeric_limits<double>::infinity() : x; }

}  // namespace

void select_blocks_cpu(const SelectBlocksParams& p) {
  check_select_blocks(p);
  const LayerLayout& layout = *p.layout;
  const BatchGeometry& g = p.geometry;
  const int32_t dim = g.head_dim;
  const int32_t group = p.num_q_heads / g.num_kv_heads;
  const int32_t num_vectors = layout.summary_vectors();
  const SummaryFormat format = layout.format();
  const int summary_bytes = dtype_size(summary_dtype(format));
  const SummaryCacheView& s = p.summaries;

  std::vector<double> queries(static_cast<size_t>(group) * dim);  // [G, D]
  std::vector<char> query_finite(group);                           // [G]
  std::vector<float> vectors(static_cast<size_t>(num_vectors) * dim);
  std::vector<double> logits;     // [G, candidates]
  std::vector<double> scores;     // [candidates]
  std::vector<int64_t> order;     // candidate positions sorted by score

  for (int32_t b = 0; b < g.batch; ++b) {
    const int64_t len = g.seq_lens[b * g.seq_lens_stride];
    const int32_t* pages = g.page_table + b * g.page_table_stride_batch;
    for (int32_t h = 0; h < g.num_kv_heads; ++h) {
      const int32_t bs = layout.block_size(h);
      const SelectionPlan plan = plan_selection(len, bs, p.budget_tokens, p.budget_fraction,
                                                p.sink_tokens, p.local_tokens);
      int32_t* out = p.block_indices + b * p.block_indices_stride_batch +
                     h * p.block_indices_stride_head;
      int64_t written = 0;
      auto emit = [&](int64_t j) { out[(written++) * p.block_indices_stride_slot] =
                                       static_cast<int32_t>(j); };
      for (int64_t j = 0; j < plan.sink_blocks; ++j) emit(j);

      const int64_t num_cand = plan.num_candidates;
      if (plan.num_selected == num_cand) {
        for (int64_t c = 0; c < num_cand; ++c) emit(plan.sink_blocks + c);
      } else if (plan.num_selected > 0) {
        for (int32_t i = 0; i < group; ++i) {
          const int64_t q_at = b * p.q_stride_batch + (h * group + i) * p.q_stride_head;
          for (int32_t d = 0; d < dim; ++d) {
            queries[static_cast<size_t>(i) * dim + d] = load_float(p.q, q_at + d, p.dtype);
          }
          query_finite[i] = all_finite(queries.data() + static_cast<size_t>(i) * dim, dim);
        }
        logits.assign(static_cast<size_t>(group) * num_cand, 0.0);
        const float* channel_scale = s.channel_scale ? s.channel_scale + h * s.channel_stride_head
                                                     : nullptr;
        const float* channel_zero = s.channel_zero ? s.channel_zero + h * s.channel_stride_head
                                                   : nullptr;
        for (int64_t c = 0; c < num_cand; ++c) {
          const int64_t first_token = (plan.sink_blocks + c) * bs;
          const int64_t page = pages[(first_token / g.page_size) * g.page_table_stride_page];
          const int64_t slot = layout.slot_offset(h) + (first_token % g.page_size) / bs;
          for (int32_t r = 0; r < num_vectors; ++r) {
            const int64_t at = page * s.stride_page + slot * s.stride_slot + r * s.stride_vector;
            const float vector_scale =
                format_has_vector_scales(format)
                    ? s.scales[page * s.scales_stride_page + slot * s.scales_stride_slot +
                               r * s.scales_stride_vector]
                    : 0.0f;
            dequantize_vector(format, static_cast<const char*>(s.data) + at * summary_bytes, dim,
                              vector_scale, channel_scale, channel_zero,
                              vectors.data() + static_cast<size_t>(r) * dim);
          }
          const bool vectors_finite = all_finite(vectors.data(), int64_t{num_vectors} * dim);
          for (int32_t i = 0; i < group; ++i) {
            logits[i * num_cand + c] =
                block_logit(layout.kind(), queries.data() + static_cast<size_t>(i) * dim,
                            query_finite[i], vectors.data(), vectors_finite, dim, p.scale);
          }
        }
        scores.assign(num_cand, 0.0);
        if (p.group_reduce == GroupReduce::kMax) {
          for (int64_t c = 0; c < num_cand; ++c) {
            double best = -std::numeric_limits<double>::infinity();
            for (int32_t i = 0; i < group; ++i) {
              best = std::max(best, rank_key(logits[i * num_cand + c]));  // all NaN: -inf
            }
            scores[c] = best;
          }
        } else {  // softmax_sum: sum over the group of each head's softmax over the candidates
          // (a NaN logit weighs exp(-inf) = 0; a head without a finite logit adds nothing)
          for (int32_t i = 0; i < group; ++i) {
            const double* row = logits.data() + static_cast<size_t>(i) * num_cand;
            double peak = -std::numeric_limits<double>::infinity();
            for (int64_t c = 0; c < num_cand; ++c) peak = std::max(peak, rank_key(row[c]));
            if (!std::isfinite(peak)) continue;  // no finite logit: this head adds nothing
            double total = 0.0;
            for (int64_t c = 0; c < num_cand; ++c) total += std::exp(rank_key(row[c]) - peak);
            for (int64_t c = 0; c < num_cand; ++c) {
              scores[c] += std::exp(rank_key(row[c]) - peak) / total;
            }
          }
        }
        order.resize(num_cand);
        std::iota(order.begin(), order.end(), int64_t{0});
        std::partial_sort(order.begin(), order.begin() + plan.num_selected, order.end(),
                          [&](int64_t x, int64_t y) {
                            const double sx = rank_key(scores[x]), sy = rank_key(scores[y]);
                            return sx > sy || (sx == sy && x < y);  // ties: lower index first
                          });
        std::sort(order.begin(), order.begin() + plan.num_selected);
        for (int64_t k = 0; k < plan.num_selected; ++k) emit(plan.sink_blocks + order[k]);
      }
      for (int64_t j = plan.local_begin; j < plan.num_blocks; ++j) emit(j);
      for (int64_t i = written; i < p.max_blocks; ++i) out[i * p.block_indices_stride_slot] = -1;
      p.block_counts[b * p.block_counts_stride_batch + h * p.block_counts_stride_head] =
          static_cast<int32_t>(written);
    }
  }
}

}  // namespace absparse

// Argument validation of the decode ops. Everything here runs before an op reads or writes a
// tensor, so bad input raises InvalidArgument instead of reading out of bounds.
#include <algorithm>
#include <cmath>

#include "absparse/decode.h"
#include "absparse/error.h"

namespace absparse {
namespace {

bool is_power_of_two(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

// Host fields of the geometry every op shares.
void check_geometry_args(const char* fn, const BatchGeometry& g) {
  ABSPARSE_CHECK_ARG(g.batch >= 0, fn, "batch: expected >= 0, got ", g.batch);
  ABSPARSE_CHECK_ARG(g.num_kv_heads > 0, fn, "num_kv_heads: expected > 0, got ", g.num_kv_heads);
  ABSPARSE_CHECK_ARG(g.head_dim > 0 && g.head_dim % 8 == 0, fn,
                     "head_dim: expected a positive multiple of 8, got ", g.head_dim);
  ABSPARSE_CHECK_ARG(is_power_of_two(g.page_size), fn,
                     "page_size: expected a power of two, got ", g.page_size);
  ABSPARSE_CHECK_ARG(g.num_pages >= 0, fn, "num_pages: expected >= 0, got ", g.num_pages);
  ABSPARSE_CHECK_ARG(g.max_pages >= 0, fn, "max_pages: expected >= 0, got ", g.max_pages);
}

// The integer inputs every op shares (values in host memory): seq_lens and the page-table entries
// of the pages each sequence uses ([0, ceil(L_b / P)); later entries are never read).
void check_geometry_values(const char* fn, const BatchGeometry& g) {
  const int64_t capacity = static_cast<int64_t>(g.max_pages) * g.page_size;
  for (int32_t b = 0; b < g.batch; ++b) {
    const int64_t len = g.seq_lens[b * g.seq_lens_stride];
    ABSPARSE_CHECK_ARG(len >= 0, fn, "seq_lens[", b, "]: expected >= 0, got ", len);
    ABSPARSE_CHECK_ARG(len <= capacity, fn, "seq_lens[", b, "]: expected <= page_table capacity ",
                       "max_pages * page_size = ", g.max_pages, " * ", g.page_size, " = ", capacity,
                       ", got ", len);
    const int64_t used_pages = (len + g.page_size - 1) / g.page_size;
    for (int64_t i = 0; i < used_pages; ++i) {
      const int64_t page = g.page_table[b * g.page_table_stride_batch + i * g.page_table_stride_page];
      ABSPARSE_CHECK_ARG(page >= 0 && page < g.num_pages, fn, "page_table[", b, ", ", i,
                         "]: expected a page index in [0, ", g.num_pages, ") for a page that ",
                         "sequence ", b, " uses (seq_len ", len, "), got ", page);
    }
  }
}

void check_layout_matches(const char* fn, const LayerLayout* layout, const BatchGeometry& g) {
  ABSPARSE_CHECK_ARG(layout != nullptr, fn, "layout: expected a LayerLayout, got none");
  ABSPARSE_CHECK_ARG(layout->num_kv_heads() == g.num_kv_heads, fn,
                     "layout.block_sizes: expected one block size per KV head (", g.num_kv_heads,
                     "), got ", layout->num_kv_heads());
  ABSPARSE_CHECK_ARG(layout->page_size() == g.page_size, fn,
                     "layout.page_size: expected the cache's page size ", g.page_size, ", got ",
                     layout->page_size());
  ABSPARSE_CHECK_ARG(!format_is_4bit(layout->format()) || g.head_dim % 2 == 0, fn,
                     "head_dim: the 4-bit formats need an even head dim, got ", g.head_dim);
}

// Presence of the tensors the layout's format needs.
void check_summary_cache_args(const char* fn, const LayerLayout& layout, const BatchGeometry& g,
                              const SummaryCacheView& s) {
  ABSPARSE_CHECK_ARG(s.data != nullptr || g.num_pages == 0, fn,
                     "summaries: expected a tensor, got none");
  if (format_has_vector_scales(layout.format())) {
    ABSPARSE_CHECK_ARG(s.scales != nullptr, fn, "scales: format '",
                       summary_format_name(layout.format()),
                       "' stores one float32 scale per vector, expected a scales tensor, got None");
  }
  if (format_is_per_channel(layout.format())) {
    for (int which = 0; which < 2; ++which) {
      const float* values = which == 0 ? s.channel_scale : s.channel_zero;
      const char* name = which == 0 ? "layout.channel_scale" : "layout.channel_zero";
      ABSPARSE_CHECK_ARG(values != nullptr, fn, name, ": format '",
                         summary_format_name(layout.format()), "' needs it, got None");
    }
  }
}

// The per-channel parameters (values in host memory): finite, scales > 0.
void check_summary_cache_values(const char* fn, const LayerLayout& layout, const BatchGeometry& g,
                                const SummaryCacheView& s) {
  if (!format_is_per_channel(layout.format())) return;
  for (int which = 0; which < 2; ++which) {
    const float* values = which == 0 ? s.channel_scale : s.channel_zero;
    const char* name = which == 0 ? "layout.channel_scale" : "layout.channel_zero";
    for (int32_t h = 0; h < g.num_kv_heads; ++h) {
      for (int32_t d = 0; d < g.head_dim; ++d) {
        const float v = values[h * s.channel_stride_head + d];
        ABSPARSE_CHECK_ARG(std::isfinite(v) && (which == 1 || v > 0.0f), fn, name, "[", h, ", ", d,
                           "]: expected a finite value", which == 0 ? " > 0" : "", ", got ", v);
      }
    }
  }
}

void check_budget(const char* fn, int64_t budget_tokens, double budget_fraction,
                  int64_t sink_tokens, int64_t local_tokens) {
  if (budget_fraction != 0.0) {
    ABSPARSE_CHECK_ARG(budget_fraction > 0.0 && budget_fraction < 1.0, fn,
                       "token_budget: a fractional budget must lie in (0, 1), got ",
                       budget_fraction);
  } else {
    ABSPARSE_CHECK_ARG(budget_tokens >= 0, fn, "token_budget: expected a token count >= 0, got ",
                       budget_tokens);
  }
  ABSPARSE_CHECK_ARG(sink_tokens >= 0, fn, "sink_tokens: expected >= 0, got ", sink_tokens);
  ABSPARSE_CHECK_ARG(local_tokens >= 0, fn, "local_tokens: expected >= 0, got ", local_tokens);
}

}  // namespace

int64_t max_blocks_bound(const LayerLayout& layout, int32_t max_pages, int64_t budget_tokens,
                         double budget_fraction, int64_t sink_tokens, int64_t local_tokens) {
  const int64_t capacity = static_cast<int64_t>(max_pages) * layout.page_size();
  const int64_t budget = budget_fraction > 0.0
                             ? static_cast<int64_t>(std::ceil(budget_fraction * capacity))
                             : budget_tokens;
  int64_t bound = 0;
  for (int32_t h = 0; h < layout.num_kv_heads(); ++h) {
    const int64_t bs = layout.block_size(h);
    const auto blocks_of = [bs](int64_t tokens) { return tokens / bs + (tokens % bs != 0); };
    const int64_t kept = blocks_of(sink_tokens) + blocks_of(local_tokens);
    bound = std::max(bound, std::min(capacity / bs, std::max(kept, budget / bs)));
  }
  return bound;
}

void check_update_centroids_args(const UpdateCentroidsParams& p) {
  const char* fn = "update_centroids";
  check_layout_matches(fn, p.layout, p.geometry);
  check_geometry_args(fn, p.geometry);
  check_summary_cache_args(fn, *p.layout, p.geometry, p.summaries);
}

void check_update_centroids(const UpdateCentroidsParams& p) {
  const char* fn = "update_centroids";
  check_update_centroids_args(p);
  check_geometry_values(fn, p.geometry);
  check_summary_cache_values(fn, *p.layout, p.geometry, p.summaries);
  for (int32_t b = 0; b < p.geometry.batch; ++b) {
    const int64_t start = p.start_pos[b * p.start_pos_stride];
    const int64_t len = p.geometry.seq_lens[b * p.geometry.seq_lens_stride];
    ABSPARSE_CHECK_ARG(start >= 0 && start <= len, fn, "start_pos[", b, "]: expected in [0, ",
                       "seq_lens[", b, "] = ", len, "], got ", start);
  }
}

void check_select_blocks_args(const SelectBlocksParams& p) {
  const char* fn = "select_blocks";
  check_layout_matches(fn, p.layout, p.geometry);
  ABSPARSE_CHECK_ARG(p.num_q_heads > 0 && p.num_q_heads % p.geometry.num_kv_heads == 0, fn,
                     "q: expected a number of query heads that is a positive multiple of the ",
                     p.geometry.num_kv_heads, " KV heads, got ", p.num_q_heads);
  check_geometry_args(fn, p.geometry);
  check_summary_cache_args(fn, *p.layout, p.geometry, p.summaries);
  check_budget(fn, p.budget_tokens, p.budget_fraction, p.sink_tokens, p.local_tokens);
  ABSPARSE_CHECK_ARG(std::isfinite(p.scale), fn, "scale: expected a finite value, got ", p.scale);
  ABSPARSE_CHECK_ARG(p.group_reduce == GroupReduce::kMax ||
                         p.group_reduce == GroupReduce::kSoftmaxSum,
                     fn, "group_reduce: expected max or softmax_sum, got ",
                     static_cast<int>(p.group_reduce));
  ABSPARSE_CHECK_ARG(p.max_blocks >= 0, fn, "max_blocks: expected >= 0, got ", p.max_blocks);
}

void check_select_blocks(const SelectBlocksParams& p) {
  const char* fn = "select_blocks";
  check_select_blocks_args(p);
  check_geometry_values(fn, p.geometry);
  check_summary_cache_values(fn, *p.layout, p.geometry, p.summaries);
  const int64_t needed =
      required_max_blocks(*p.layout, p.geometry.seq_lens, p.geometry.batch,
                          p.geometry.seq_lens_stride, p.budget_tokens, p.budget_fraction,
                          p.sink_tokens, p.local_tokens);
  ABSPARSE_CHECK_ARG(p.max_blocks >= needed, fn, "max_blocks: expected a capacity >= ", needed,
                     " (the most blocks one (sequence, head) attends with this budget), got ",
                     p.max_blocks);
}

void check_decode_attention_args(const DecodeAttentionParams& p) {
  const char* fn = p.block_sizes ? "sparse_decode" : "dense_decode";
  const BatchGeometry& g = p.geometry;
  ABSPARSE_CHECK_ARG(p.num_q_heads > 0 && p.num_q_heads % g.num_kv_heads == 0, fn,
                     "q: expected a number of query heads that is a positive multiple of the ",
                     g.num_kv_heads, " KV heads, got ", p.num_q_heads);
  check_geometry_args(fn, g);
  ABSPARSE_CHECK_ARG(std::isfinite(p.scale), fn, "scale: expected a finite value, got ", p.scale);
  if (!p.block_sizes) return;
  for (int32_t h = 0; h < g.num_kv_heads; ++h) {
    const int32_t bs = p.block_sizes[h];
    ABSPARSE_CHECK_ARG(is_power_of_two(bs) && g.page_size % bs == 0, fn, "block_sizes[", h,
                       "]: expected a power of two dividing page_size ", g.page_size, ", got ", bs);
  }
  ABSPARSE_CHECK_ARG(p.max_blocks >= 0, fn, "block_indices: expected a capacity >= 0, got ",
                     p.max_blocks);
}

void check_decode_attention(const DecodeAttentionParams& p) {
  const char* fn = p.block_sizes ? "sparse_decode" : "dense_decode";
  const BatchGeometry& g = p.geometry;
  check_decode_attention_args(p);
  check_geometry_values(fn, g);
  if (!p.block_sizes) return;
  for (int32_t b = 0; b < g.batch; ++b) {
    const int64_t len = g.seq_lens[b * g.seq_lens_stride];
    for (int32_t h = 0; h < g.num_kv_heads; ++h) {
      const int64_t num_blocks = len / p.block_sizes[h];
      const int64_t count =
          p.block_counts[b * p.block_counts_stride_batch + h * p.block_counts_stride_head];
      ABSPARSE_CHECK_ARG(count >= 0 && count <= p.max_blocks && count <= num_blocks, fn,
                         "block_counts[", b, ", ", h, "]: expected in [0, min(max_blocks ",
                         p.max_blocks, ", complete blocks ", num_blocks, ")], got ", count);
      const int32_t* list = p.block_indices + b * p.block_indices_stride_batch +
                            h * p.block_indices_stride_head;
      int64_t previous = -1;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t j = list[i * p.block_indices_stride_slot];
        ABSPARSE_CHECK_ARG(j > previous && j < num_blocks, fn, "block_indices[", b, ", ", h, ", ",
                           i, "]: expected a complete block index in [", previous + 1, ", ",
                           num_blocks, ") (strictly ascending, seq_len ", len, ", block size ",
                           p.block_sizes[h], "), got ", j);
        previous = j;
      }
    }
  }
}

}  // namespace absparse

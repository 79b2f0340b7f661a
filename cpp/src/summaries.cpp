// update_centroids on the CPU: block summaries of the blocks that become complete.
#include <algorithm>
#include <cmath>
#include <vector>

#include "absparse/decode.h"
#include "absparse/quantize.h"
#include "block_summary.h"

namespace absparse {

void update_centroids_cpu(const UpdateCentroidsParams& p) {
  check_update_centroids(p);
  const LayerLayout& layout = *p.layout;
  const BatchGeometry& g = p.geometry;
  const int32_t dim = g.head_dim;
  const int32_t page_size = g.page_size;
  const int32_t num_vectors = layout.summary_vectors();
  const SummaryFormat format = layout.format();
  const int summary_bytes = dtype_size(summary_dtype(format));
  std::vector<float> keys(static_cast<size_t>(page_size) * dim);
  std::vector<float> vectors(static_cast<size_t>(num_vectors) * dim);

  for (int32_t b = 0; b < g.batch; ++b) {
    const int64_t len = g.seq_lens[b * g.seq_lens_stride];
    const int64_t start = p.start_pos[b * p.start_pos_stride];
    const int32_t* pages = g.page_table + b * g.page_table_stride_batch;
    for (int32_t h = 0; h < g.num_kv_heads; ++h) {
      const int32_t bs = layout.block_size(h);
      const float* channel_scale =
          p.summaries.channel_scale ? p.summaries.channel_scale + h * p.summaries.channel_stride_head
                                    : nullptr;
      const float* channel_zero =
          p.summaries.channel_zero ? p.summaries.channel_zero + h * p.summaries.channel_stride_head
                                   : nullptr;
      // Blocks whose last token (j+1)*bs - 1 lies in [start, len).
      for (int64_t j = start / bs; j < len / bs; ++j) {
        const int64_t first_token = j * bs;
        const int64_t page = pages[(first_token / page_size) * g.page_table_stride_page];
        const int64_t in_page = first_token % page_size;
        for (int32_t t = 0; t < bs; ++t) {
          const int64_t offset = page * p.k_cache.stride_page +
                                 (in_page + t) * p.k_cache.stride_token +
                                 h * p.k_cache.stride_head;
          for (int32_t d = 0; d < dim; ++d) {
            keys[static_cast<size_t>(t) * dim + d] = load_float(p.k_cache.data, offset + d, p.dtype);
          }
        }
        detail::summarize_block(layout.kind(), keys.data(), bs, dim, vectors.data());
        const int64_t slot = layout.slot_offset(h) + in_page / bs;
        for (int32_t r = 0; r < num_vectors; ++r) {
          const int64_t at = page * p.summaries.stride_page + slot * p.summaries.stride_slot +
                             r * p.summaries.stride_vector;
          float scale = 0.0f;
          quantize_vector(format, vectors.data() + static_cast<size_t>(r) * dim, dim,
                          channel_scale, channel_zero,
                          static_cast<char*>(p.summaries.data) + at * summary_bytes, &scale);
          if (format_has_vector_scales(format)) {
            p.summaries.scales[page * p.summaries.scales_stride_page +
                               slot * p.summaries.scales_stride_slot +
                               r * p.summaries.scales_stride_vector] = scale;
          }
        }
      }
    }
  }
}

}  // namespace absparse

// Internal to absparse_core: the block summary arithmetic shared by update_centroids
// (summaries.cpp) and the calibration profiler (calibration.cpp), so both store and score exactly
// the same float32 summaries.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absparse/layout.h"

namespace absparse::detail {

// Summary vectors of one complete block of bs keys (float64 reductions, rounded once to float32).
// keys: [bs * D] float32. out: R vectors of D float32 (mean: c; minmax/cuboid: hi then lo).
inline void summarize_block(SummaryKind kind, const float* keys, int32_t bs, int32_t dim,
                            float* out) {
  for (int32_t d = 0; d < dim; ++d) {
    if (kind == SummaryKind::kMean) {
      double sum = 0.0;
      for (int32_t t = 0; t < bs; ++t) sum += keys[t * dim + d];
      out[d] = static_cast<float>(sum / bs);
      continue;
    }
    double hi = keys[d], lo = keys[d];
    for (int32_t t = 1; t < bs; ++t) {
      hi = std::max<double>(hi, keys[t * dim + d]);
      lo = std::min<double>(lo, keys[t * dim + d]);
    }
    if (kind == SummaryKind::kCuboid) {
      const double centre = (hi + lo) / 2.0;
      double dev = 0.0;
      for (int32_t t = 0; t < bs; ++t) dev += std::fabs(keys[t * dim + d] - centre);
      const double radius = dev / bs;
      hi = centre + radius;
      lo = centre - radius;
    }
    out[d] = static_cast<float>(hi);
    out[dim + d] = static_cast<float>(lo);
  }
}

}  // namespace absparse::detail

// Internal helpers of the float64 CPU references (decode_attention.cpp, sparse_prefill.cpp, the
// prefill mask ops): rows of a float tensor converted to float64, and the dot product they all use.
// Not installed.
#pragma once

#include <cstdint>

#include "absparse/numeric.h"

namespace absparse::float64_rows {

// Converts `dim` contiguous elements of a float tensor to float64.
template <DType kType>
void load_row(const void* base, int64_t offset, int32_t dim, double* out) {
  for (int32_t d = 0; d < dim; ++d) out[d] = load_float(base, offset + d, kType);
}

using LoadRow = void (*)(const void*, int64_t, int32_t, double*);

// The converter of a dtype, chosen once per call (the loops then call it per row).
inline LoadRow row_loader(DType t) {
  switch (t) {
    case DType::kFloat16: return &load_row<DType::kFloat16>;
    case DType::kBFloat16: return &load_row<DType::kBFloat16>;
    default: return &load_row<DType::kFloat32>;
  }
}

// Dot product of any length with four independent partial sums over the first dim - dim % 4
// channels, the rest added to the first (a fixed order: deterministic).
inline double dot(const double* a, const double* b, int32_t dim) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int32_t d = 0;
  for (; d + 4 <= dim; d += 4) {
    s0 += a[d] * b[d];
    s1 += a[d + 1] * b[d + 1];
    s2 += a[d + 2] * b[d + 2];
    s3 += a[d + 3] * b[d + 3];
  }
  for (; d < dim; ++d) s0 += a[d] * b[d];
  return (s0 + s1) + (s2 + s3);
}

}  // namespace absparse::float64_rows

#include "absparse/quantize.h"

#include <cmath>

#include "absparse/error.h"

namespace absparse {
namespace {

// round_half_even(v) clamped to [lo, hi]; NaN saturates to hi (fmin/fmax drop NaN operands), so a
// corrupt input never reaches an undefined float -> int conversion.
inline int32_t round_clamp(float v, float lo, float hi) {
  const float r = std::nearbyintf(v);  // default rounding mode: to nearest, ties to even
  return static_cast<int32_t>(std::fmax(std::fmin(r, hi), lo));
}

inline void store_nibble(uint8_t* out, int32_t i, int32_t code) {
  const uint8_t nibble = static_cast<uint8_t>(code) & 0xF;
  if (i % 2 == 0) {
    out[i / 2] = static_cast<uint8_t>((out[i / 2] & 0xF0) | nibble);
  } else {
    out[i / 2] = static_cast<uint8_t>((out[i / 2] & 0x0F) | (nibble << 4));
  }
}

inline int32_t load_nibble(const uint8_t* in, int32_t i, bool is_signed) {
  const int32_t nibble = (i % 2 == 0) ? (in[i / 2] & 0xF) : (in[i / 2] >> 4);
  return (is_signed && nibble >= 8) ? nibble - 16 : nibble;
}

}  // namespace

void quantize_vector(SummaryFormat format, const float* x, int32_t dim, const float* channel_scale,
                     const float* channel_zero, void* codes, float* scale_out) {
  switch (format) {
    case SummaryFormat::kFp32:
    case SummaryFormat::kFp16:
    case SummaryFormat::kBf16: {
      const DType t = summary_dtype(format);
      for (int32_t d = 0; d < dim; ++d) store_float(codes, d, t, x[d]);
      return;
    }
    case SummaryFormat::kInt8:
    case SummaryFormat::kInt4: {
      const float qmax = static_cast<float>(format_qmax(format));
      float max_abs = 0.0f;
      for (int32_t d = 0; d < dim; ++d) max_abs = std::fmax(max_abs, std::fabs(x[d]));
      const float scale = max_abs / qmax;
      *scale_out = scale;
      for (int32_t d = 0; d < dim; ++d) {
        const int32_t code = scale == 0.0f ? 0 : round_clamp(x[d] / scale, -qmax, qmax);
        if (format == SummaryFormat::kInt8) {
          static_cast<int8_t*>(codes)[d] = static_cast<int8_t>(code);
        } else {
          store_nibble(static_cast<uint8_t*>(codes), d, code);
        }
      }
      return;
    }
    case SummaryFormat::kInt8c:
    case SummaryFormat::kInt4c: {
      const float qmax = static_cast<float>(format_qmax(format));
      for (int32_t d = 0; d < dim; ++d) {
        const float diff = x[d] - channel_zero[d];
        const int32_t code = round_clamp(diff / channel_scale[d], 0.0f, qmax);
        if (format == SummaryFormat::kInt8c) {
          static_cast<uint8_t*>(codes)[d] = static_cast<uint8_t>(code);
        } else {
          store_nibble(static_cast<uint8_t*>(codes), d, code);
        }
      }
      return;
    }
  }
}

void dequantize_vector(SummaryFormat format, const void* codes, int32_t dim, float vector_scale,
                       const float* channel_scale, const float* channel_zero, float* out) {
  switch (format) {
    case SummaryFormat::kFp32:
    case SummaryFormat::kFp16:
    case SummaryFormat::kBf16: {
      const DType t = summary_dtype(format);
      for (int32_t d = 0; d < dim; ++d) out[d] = load_float(codes, d, t);
      return;
    }
    case SummaryFormat::kInt8:
      for (int32_t d = 0; d < dim; ++d) {
        out[d] = static_cast<float>(static_cast<const int8_t*>(codes)[d]) * vector_scale;
      }
      return;
    case SummaryFormat::kInt4:
      for (int32_t d = 0; d < dim; ++d) {
        const int32_t code = load_nibble(static_cast<const uint8_t*>(codes), d, true);
        out[d] = static_cast<float>(code) * vector_scale;
      }
      return;
    case SummaryFormat::kInt8c:
    case SummaryFormat::kInt4c:
      for (int32_t d = 0; d < dim; ++d) {
        const int32_t code = format == SummaryFormat::kInt8c
                                 ? static_cast<const uint8_t*>(codes)[d]
                                 : load_nibble(static_cast<const uint8_t*>(codes), d, false);
        const float scaled = static_cast<float>(code) * channel_scale[d];
        out[d] = scaled + channel_zero[d];
      }
      return;
  }
}

namespace {

void check_channel_params(const char* fn, const float* values, int64_t rows, int64_t stride,
                          int32_t dim, bool is_scale) {
  const char* name = is_scale ? "channel_scale" : "channel_zero";
  ABSPARSE_CHECK_ARG(values != nullptr, fn, name, ": required by the per-channel formats, got none");
  for (int64_t r = 0; r < rows; ++r) {
    for (int32_t d = 0; d < dim; ++d) {
      const float v = values[r * stride + d];
      ABSPARSE_CHECK_ARG(std::isfinite(v) && (!is_scale || v > 0.0f), fn, name, "[", r, ", ", d,
                         "]: expected a finite value", is_scale ? " > 0" : "", ", got ", v);
    }
  }
}

void check_rows(const char* fn, SummaryFormat format, int64_t rows, int32_t dim, bool has_scales,
                const float* channel_scale, int64_t cs_stride, const float* channel_zero,
                int64_t cz_stride) {
  ABSPARSE_CHECK_ARG(rows >= 0, fn, "rows: expected >= 0, got ", rows);
  ABSPARSE_CHECK_ARG(dim > 0, fn, "dim: expected > 0, got ", dim);
  ABSPARSE_CHECK_ARG(!format_is_4bit(format) || dim % 2 == 0, fn,
                     "dim: the 4-bit formats pack two values per byte, expected an even size, got ",
                     dim);
  if (format_has_vector_scales(format)) {
    ABSPARSE_CHECK_ARG(has_scales, fn, "scales: required by format '",
                       summary_format_name(format), "', got none");
  }
  if (format_is_per_channel(format)) {
    check_channel_params(fn, channel_scale, rows, cs_stride, dim, true);
    check_channel_params(fn, channel_zero, rows, cz_stride, dim, false);
  }
}

}  // namespace

void quantize_rows(const QuantizeParams& p) {
  check_rows("quantize", p.format, p.rows, p.dim, p.scales != nullptr, p.channel_scale,
             p.channel_scale_stride_row, p.channel_zero, p.channel_zero_stride_row);
  const int elem = dtype_size(summary_dtype(p.format));
  for (int64_t r = 0; r < p.rows; ++r) {
    float scale = 0.0f;
    void* codes = static_cast<char*>(p.codes) + r * p.codes_stride_row * elem;
    quantize_vector(p.format, p.x + r * p.x_stride_row, p.dim,
                    p.channel_scale ? p.channel_scale + r * p.channel_scale_stride_row : nullptr,
                    p.channel_zero ? p.channel_zero + r * p.channel_zero_stride_row : nullptr,
                    codes, &scale);
    if (format_has_vector_scales(p.format)) p.scales[r * p.scales_stride] = scale;
  }
}

void dequantize_rows(const DequantizeParams& p) {
  check_rows("dequantize", p.format, p.rows, p.dim, p.scales != nullptr, p.channel_scale,
             p.channel_scale_stride_row, p.channel_zero, p.channel_zero_stride_row);
  const int elem = dtype_size(summary_dtype(p.format));
  for (int64_t r = 0; r < p.rows; ++r) {
    const void* codes = static_cast<const char*>(p.codes) + r * p.codes_stride_row * elem;
    const float scale = format_has_vector_scales(p.format) ? p.scales[r * p.scales_stride] : 0.0f;
    dequantize_vector(p.format, codes, p.dim, scale,
                      p.channel_scale ? p.channel_scale + r * p.channel_scale_stride_row : nullptr,
                      p.channel_zero ? p.channel_zero + r * p.channel_zero_stride_row : nullptr,
                      p.x + r * p.x_stride_row);
  }
}

}  // namespace absparse

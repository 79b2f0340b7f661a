// Storage formats of block summaries: quantize float32 vectors to a SummaryFormat and back.
//
// The arithmetic is fixed so that any implementation reproduces the codes bit for bit:
//   int8/int4 (symmetric per vector): scale = max_d |x_d| / qmax  (float32 division),
//       code_d = clamp(round_half_even(x_d / scale), -qmax, qmax); all-zero vector -> scale 0, codes 0.
//   int8c/int4c (asymmetric per channel): code_d = clamp(round_half_even((x_d - zero_d) / scale_d),
//       0, 2^bits - 1); value = code * scale + zero.
//   fp16/bf16: round to nearest even; fp32: copy.
// 4-bit codes pack element 2i in the low nibble and 2i+1 in the high nibble of byte i.
#pragma once

#include <cstdint>

#include "absparse/layout.h"

namespace absparse {

// Quantizes one vector x[0, dim). codes: summary_dtype(format) storage of summary_width elements.
// scale_out: written for int8/int4 only (may be null otherwise). channel_scale/channel_zero: [dim],
// required for int8c/int4c (may be null otherwise).
void quantize_vector(SummaryFormat format, const float* x, int32_t dim, const float* channel_scale,
                     const float* channel_zero, void* codes, float* scale_out);

// Inverse of quantize_vector: writes dim float32 values to out.
void dequantize_vector(SummaryFormat format, const void* codes, int32_t dim, float vector_scale,
                       const float* channel_scale, const float* channel_zero, float* out);

// Row-wise quantization of a [rows, dim] float32 matrix (channel stride 1).
struct QuantizeParams {
  SummaryFormat format = SummaryFormat::kFp32;
  int64_t rows = 0;
  int32_t dim = 0;                   // must be even for the 4-bit formats
  const float* x = nullptr;          // [rows, dim]
  int64_t x_stride_row = 0;
  const float* channel_scale = nullptr;  // [rows, dim], int8c/int4c only, else may be null; > 0
  int64_t channel_scale_stride_row = 0;
  const float* channel_zero = nullptr;   // [rows, dim], int8c/int4c only, else may be null
  int64_t channel_zero_stride_row = 0;
  void* codes = nullptr;             // [rows, summary_width(format, dim)], summary_dtype(format)
  int64_t codes_stride_row = 0;
  float* scales = nullptr;           // [rows], int8/int4 only, else may be null
  int64_t scales_stride = 0;
};

// Row-wise dequantization: codes (+ scales or channel parameters) -> x. Same fields as above with
// roles swapped: codes/scales/channel_* are read, x is written.
struct DequantizeParams {
  SummaryFormat format = SummaryFormat::kFp32;
  int64_t rows = 0;
  int32_t dim = 0;
  const void* codes = nullptr;
  int64_t codes_stride_row = 0;
  const float* scales = nullptr;
  int64_t scales_stride = 0;
  const float* channel_scale = nullptr;
  int64_t channel_scale_stride_row = 0;
  const float* channel_zero = nullptr;
  int64_t channel_zero_stride_row = 0;
  float* x = nullptr;
  int64_t x_stride_row = 0;
};

void quantize_rows(const QuantizeParams& p);      // validates, then runs on the CPU
void dequantize_rows(const DequantizeParams& p);  // validates, then runs on the CPU

}  // namespace absparse

// Host-side checks of the model ops (absparse/model_ops.h), shared by the CPU entry points and the
// CUDA entry points' host validation: every check that reads no tensor value. Not installed.
#pragma once

#include <cstdint>
#include <utility>

#include "absparse/error.h"
#include "absparse/model_ops.h"

namespace absparse::model_detail {

inline void check_float_dtype(const char* fn, DType t) {
  ABSPARSE_CHECK_ARG(t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16, fn,
                     "dtype: expected float32, float16 or bfloat16, got ", dtype_name(t));
}

inline void check_pointer(const char* fn, const char* name, const void* ptr, bool needed) {
  ABSPARSE_CHECK_ARG(!needed || ptr != nullptr, fn, name, ": expected a pointer, got null");
}

// A written [rows, width] tensor must not overlap itself: row stride >= width (one row: any).
inline void check_row_stride(const char* fn, const char* name, int64_t rows, int64_t stride,
                             int64_t width) {
  ABSPARSE_CHECK_ARG(rows <= 1 || stride >= width, fn, name, ": expected a row stride >= ", width,
                     " (rows must not overlap), got ", stride);
}

inline void check_rms_norm(const RmsNormParams& p) {
  const char* fn = "rms_norm";
  check_float_dtype(fn, p.dtype);
  ABSPARSE_CHECK_ARG(p.rows >= 0, fn, "x: expected N >= 0 rows, got ", p.rows);
  ABSPARSE_CHECK_ARG(p.hidden > 0, fn, "x: expected H > 0 columns, got ", p.hidden);
  ABSPARSE_CHECK_ARG(p.eps >= 0.0f && p.eps <= 3.4e38f, fn, "eps: expected a finite value >= 0, got ",
                     p.eps);
  const bool any = p.rows > 0;
  check_pointer(fn, "x", p.x, any);
  check_pointer(fn, "weight", p.weight, any);
  check_pointer(fn, "out", p.out, any);
  check_row_stride(fn, "out", p.rows, p.out_stride_row, p.hidden);
  if (p.residual != nullptr) check_row_stride(fn, "residual", p.rows, p.residual_stride_row, p.hidden);
}

inline void check_silu_mul(const SiluMulParams& p) {
  const char* fn = "silu_mul";
  check_float_dtype(fn, p.dtype);
  ABSPARSE_CHECK_ARG(p.rows >= 0, fn, "gate_up: expected N >= 0 rows, got ", p.rows);
  ABSPARSE_CHECK_ARG(p.inner > 0, fn, "gate_up: expected 2 I > 0 columns, got I = ", p.inner);
  check_pointer(fn, "gate_up", p.gate_up, p.rows > 0);
  check_pointer(fn, "out", p.out, p.rows > 0);
  check_row_stride(fn, "out", p.rows, p.out_stride_row, p.inner);
}

inline void check_rope_append(const RopeAppendParams& p) {
  const char* fn = "rope_append";
  check_float_dtype(fn, p.dtype);
  ABSPARSE_CHECK_ARG(p.batch >= 0, fn, "qkv: expected B >= 0 rows, got ", p.batch);
  ABSPARSE_CHECK_ARG(p.num_q_heads > 0, fn, "num_q_heads: expected > 0, got ", p.num_q_heads);
  ABSPARSE_CHECK_ARG(p.num_kv_heads > 0, fn, "k_cache: expected Hk > 0 heads, got ",
                     p.num_kv_heads);
  ABSPARSE_CHECK_ARG(p.head_dim > 0 && p.head_dim % 2 == 0, fn,
                     "k_cache: expected an even head dim D > 0 (RoPE rotates pairs), got ",
                     p.head_dim);
  ABSPARSE_CHECK_ARG(p.page_size > 0, fn, "k_cache: expected a page size P > 0, got ",
                     p.page_size);
  ABSPARSE_CHECK_ARG(p.max_pages >= 0, fn, "page_table: expected max_pages >= 0, got ",
                     p.max_pages);
  ABSPARSE_CHECK_ARG(p.num_positions >= 0, fn, "cos: expected num_positions >= 0, got ",
                     p.num_positions);
  const bool any = p.batch > 0;
  for (const auto& [name, ptr] : {std::pair<const char*, const void*>{"qkv", p.qkv},
                                  {"cos", p.cos}, {"sin", p.sin}, {"positions", p.positions},
                                  {"q_out", p.q_out}, {"k_cache", p.k_cache},
                                  {"v_cache", p.v_cache}, {"page_table", p.page_table}}) {
    check_pointer(fn, name, ptr, any);
  }
}

}  // namespace absparse::model_detail

// CPU entry points of the model ops (absparse/model_ops.h): the reference the CUDA kernels are
// tested against. Every product and sum below is one float32 operation rounded to the tensor's
// dtype where the header says so (absparse_core builds with -ffp-contract=off: no fused
// multiply-adds), the mean of squares of rms_norm a float64 sum.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absparse/model_ops.h"
#include "model_ops_common.h"

namespace absparse {

namespace {

// x rounded to dtype t (and back to float32).
float round_to(DType t, float x) {
  switch (t) {
    case DType::kFloat16: return fp16_to_float(float_to_fp16(x));
    case DType::kBFloat16: return bf16_to_float(float_to_bf16(x));
    default: return x;
  }
}

}  // namespace

void rms_norm_cpu(const RmsNormParams& p) {
  model_detail::check_rms_norm(p);
  const DType t = p.dtype;
  for (int64_t n = 0; n < p.rows; ++n) {
    const int64_t xr = n * p.x_stride_row, rr = n * p.residual_stride_row,
                  orow = n * p.out_stride_row;
    double squares = 0.0;
    for (int64_t c = 0; c < p.hidden; ++c) {
      float h = load_float(p.x, xr + c, t);
      if (p.residual != nullptr) {
        h = round_to(t, h + load_float(p.residual, rr + c, t));
        store_float(p.residual, rr + c, t, h);
      }
      squares += static_cast<double>(h) * h;
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(squares / p.hidden + p.eps));
    for (int64_t c = 0; c < p.hidden; ++c) {
      const float h = p.residual != nullptr ? load_float(p.residual, rr + c, t)
                                            : load_float(p.x, xr + c, t);
      const float normed = round_to(t, h * inv);
      store_float(p.out, orow + c, t, load_float(p.weight, c, t) * normed);
    }
  }
}

void silu_mul_cpu(const SiluMulParams& p) {
  model_detail::check_silu_mul(p);
  const DType t = p.dtype;
  for (int64_t n = 0; n < p.rows; ++n) {
    const int64_t in = n * p.gate_up_stride_row, out = n * p.out_stride_row;
    for (int64_t i = 0; i < p.inner; ++i) {
      const float g = load_float(p.gate_up, in + i, t);
      const float silu = round_to(t, g / (1.0f + std::exp(-g)));
      store_float(p.out, out + i, t, silu * load_float(p.gate_up, in + p.inner + i, t));
    }
  }
}

void rope_append_cpu(const RopeAppendParams& p) {
  model_detail::check_rope_append(p);
  const char* fn = "rope_append";
  const DType t = p.dtype;
  const int64_t hq = p.num_q_heads, hk = p.num_kv_heads, d = p.head_dim, half = d / 2;
  // Values first: nothing is written unless every sequence's position and page are valid.
  const int64_t capacity = int64_t{p.max_pages} * p.page_size;
  for (int32_t b = 0; b < p.batch; ++b) {
    const int64_t pos = p.positions[b * p.positions_stride];
    ABSPARSE_CHECK_ARG(pos >= 0 && pos < p.num_positions && pos < capacity, fn, "positions[", b,
                       "]: expected a position in [0, ", std::min(p.num_positions, capacity),
                       ") (the rows of cos / sin and the page table's capacity max_pages * P), "
                       "got ", pos);
    const int64_t page =
        p.page_table[b * p.page_table_stride_batch + (pos / p.page_size) * p.page_table_stride_page];
    ABSPARSE_CHECK_ARG(page >= 0 && page < p.num_pages, fn, "page_table[", b, ", ",
                       pos / p.page_size, "]: expected a page in [0, ", p.num_pages, "), got ",
                       page);
  }
  for (int32_t b = 0; b < p.batch; ++b) {
    const int64_t pos = p.positions[b * p.positions_stride];
    const int64_t page =
        p.page_table[b * p.page_table_stride_batch + (pos / p.page_size) * p.page_table_stride_page];
    const int64_t row = pos % p.page_size;
    const int64_t in = b * p.qkv_stride_batch;
    const int64_t cs = pos * p.cos_stride_position, sn = pos * p.sin_stride_position;
    // x [D] at x_off of qkv, rotated into dst (element offset) of `out`.
    auto rotate = [&](int64_t x_off, void* out, int64_t dst) {
      for (int64_t i = 0; i < d; ++i) {
        const float x = load_float(p.qkv, x_off + i, t);
        const float partner = i < half ? -load_float(p.qkv, x_off + i + half, t)
                                       : load_float(p.qkv, x_off + i - half, t);
        const float a = round_to(t, x * load_float(p.cos, cs + i, t));
        const float r = round_to(t, partner * load_float(p.sin, sn + i, t));
        store_float(out, dst + i, t, a + r);
      }
    };
    for (int64_t h = 0; h < hq; ++h) {
      rotate(in + h * d, p.q_out, b * p.q_out_stride_batch + h * p.q_out_stride_head);
    }
    for (int64_t h = 0; h < hk; ++h) {
      rotate(in + (hq + h) * d, p.k_cache,
             page * p.k_stride_page + row * p.k_stride_token + h * p.k_stride_head);
      const int64_t v_in = in + (hq + hk + h) * d;
      const int64_t v_dst = page * p.v_stride_page + row * p.v_stride_token + h * p.v_stride_head;
      for (int64_t i = 0; i < d; ++i) {
        store_float(p.v_cache, v_dst + i, t, load_float(p.qkv, v_in + i, t));
      }
    }
  }
}

}  // namespace absparse

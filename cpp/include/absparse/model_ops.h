// The non-attention steps of a Llama decoder layer that a decode step would otherwise run as
// dozens of small framework kernels (docs/model_ops.md): RMSNorm with the residual add, SwiGLU's
// silu(gate) * up, and RoPE on q and k with the K / V append into the paged cache. Torch-free C++
// API: params structs of raw pointers and explicit 64-bit element strides; the float tensors have
// a contiguous last dimension (stride 1).
//
// Rounding follows transformers' Llama modules in the tensors' dtype T (float32, float16 or
// bfloat16), so a model run through these ops rounds where the stock model rounds:
//   rms_norm:   h = T(x + residual) (when a residual is given, also stored into it);
//               n = T(h * 1/sqrt(mean(h^2) + eps)) (the mean over the row of the float values);
//               out = T(weight * n)
//   silu_mul:   out = T(T(silu(gate)) * up), silu(g) = g / (1 + exp(-g))
//   rope:       with half = D / 2, c = cos[pos], s = sin[pos] (tables in T):
//               out[i] = T(T(x[i] c[i]) + T(-x[i + half] s[i]))              for i < half
//               out[i] = T(T(x[i] c[i]) + T(x[i - half] s[i]))               for i >= half
// The CPU entry points compute the mean of squares in float64 and round the rest in float32 as
// above (the products and sums of rope and silu_mul are float32 operations, each rounded to T:
// bit-identical to the framework's formulas); the CUDA kernels (absparse/model_ops_cuda.h) sum
// the squares in float32 in their own order, so rms_norm may differ from the CPU by one unit in
// the last place of T.
//
// Pointers are host pointers for these CPU entry points, which validate every argument (values
// included: positions and page-table entries) before they write and throw
// absparse::InvalidArgument on bad input.
#pragma once

#include <cstdint>

#include "absparse/numeric.h"

namespace absparse {

// out = rms_norm(x [+ residual]) * weight over rows of `hidden` values.
struct RmsNormParams {
  int64_t rows = 0;         // N (>= 0)
  int64_t hidden = 0;       // H (> 0)
  DType dtype = DType::kFloat32;  // of x, residual, weight and out
  float eps = 0.0f;         // >= 0, finite
  const void* x = nullptr;  // [N, H]
  int64_t x_stride_row = 0;
  void* residual = nullptr;  // [N, H] or null: then h = x; else h = T(x + residual), stored here
  int64_t residual_stride_row = 0;
  const void* weight = nullptr;  // [H]
  void* out = nullptr;      // [N, H]; may be x (each element is read before it is written)
  int64_t out_stride_row = 0;
  void* stream = nullptr;   // cudaStream_t for the CUDA path; unused on the CPU
};

// out = silu(gate) * up, gate and up the two halves of each row of gate_up.
struct SiluMulParams {
  int64_t rows = 0;          // N (>= 0)
  int64_t inner = 0;         // I (> 0)
  DType dtype = DType::kFloat32;  // of gate_up and out
  const void* gate_up = nullptr;  // [N, 2 I]: gate = [:, :I], up = [:, I:]
  int64_t gate_up_stride_row = 0;
  void* out = nullptr;       // [N, I]
  int64_t out_stride_row = 0;
  void* stream = nullptr;
};

// One decode token per sequence: q and k of the fused projection output rotated at the token's
// position, q written to q_out, k and v appended to the paged caches at that position.
struct RopeAppendParams {
  int32_t batch = 0;          // B (>= 0)
  int32_t num_q_heads = 0;    // Hq (> 0)
  int32_t num_kv_heads = 0;   // Hk (> 0)
  int32_t head_dim = 0;       // D (even, > 0)
  DType dtype = DType::kFloat32;  // of qkv, cos, sin, q_out and the caches
  const void* qkv = nullptr;  // [B, (Hq + 2 Hk) D]: q heads, then k heads, then v heads
  int64_t qkv_stride_batch = 0;
  const void* cos = nullptr;  // [num_positions, D]
  const void* sin = nullptr;  // [num_positions, D]
  int64_t cos_stride_position = 0;
  int64_t sin_stride_position = 0;
  int64_t num_positions = 0;  // rows of the tables
  const int32_t* positions = nullptr;  // [B]: the token's position, in [0, min(num_positions,
  int64_t positions_stride = 0;        //      max_pages * P))
  void* q_out = nullptr;      // [B, Hq, D]
  int64_t q_out_stride_batch = 0;
  int64_t q_out_stride_head = 0;
  // Paged caches [num_pages, P, Hk, D]; position p of sequence b is row p % P of page
  // page_table[b, p / P], which must be in [0, num_pages).
  void* k_cache = nullptr;
  int64_t k_stride_page = 0, k_stride_token = 0, k_stride_head = 0;
  void* v_cache = nullptr;
  int64_t v_stride_page = 0, v_stride_token = 0, v_stride_head = 0;
  int32_t page_size = 0;      // P (> 0)
  int64_t num_pages = 0;
  const int32_t* page_table = nullptr;  // [B, max_pages]
  int64_t page_table_stride_batch = 0;
  int64_t page_table_stride_page = 0;
  int32_t max_pages = 0;
  void* stream = nullptr;
};

void rms_norm_cpu(const RmsNormParams& p);
void silu_mul_cpu(const SiluMulParams& p);
void rope_append_cpu(const RopeAppendParams& p);

}  // namespace absparse

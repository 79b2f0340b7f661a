// The model ops on the GPU (absparse/model_ops_cuda.h): one launch each, float16 / bfloat16.
//
// rms_norm_kernel: one CTA of 256 threads per row. Pass 1 forms h = T(x + residual) (stored back
//   into the residual), pass 2 scales by 1 / sqrt(mean(h^2) + eps) and the weight; each thread
//   reads back in pass 2 exactly the elements it wrote in pass 1 (no barrier needed between them
//   beyond the reduction's). Rows whose pointers and stride are 16-byte aligned (H % 8 == 0) move
//   8 elements per load; others one.
// rms_norm_resident_kernel: the same arithmetic in the same order for aligned rows of at most
//   kResidentChunks x 2048 elements (Llama's 4096: 2 chunks), with the row, its residual and the
//   weight loaded once into registers before anything is reduced: one memory round trip instead
//   of pass 2's re-read (a decode step calls rms_norm 2 L + 1 times on a handful of rows, where
//   latency is the whole cost).
// silu_mul_kernel: grid (column chunks, rows), 8 elements per thread when aligned.
// rope_append_kernel: grid (pair chunks, B); one thread per rotated pair (i, i + D/2) of a q or k
//   head, or per copied pair of a v head.
// Products and sums use explicit round-to-nearest intrinsics (__fmul_rn, __fadd_rn), so nvcc does
// not contract them into fused multiply-adds: every rounding is the CPU reference's.
#include "absparse/model_ops_cuda.h"
#include "common.cuh"
#include "model_ops_common.h"

namespace absparse {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // half-precision elements per 16-byte access

template <typename T>
__device__ inline float round_to(float x) {
  return to_float<T>(from_float<T>(x));
}

// 8 half-precision values as one 16-byte word.
template <typename T>
union Vec8 {
  uint4 word;
  T v[kVec];
};

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---- rms_norm -----------------------------------------------------------------------------------

template <typename T>
struct RmsArgs {
  const T* x;
  int64_t x_stride;
  T* residual;  // or null
  int64_t residual_stride;
  const T* weight;
  T* out;
  int64_t out_stride;
  int64_t hidden;
  float eps;
};

// Sum over the CTA in a fixed order (butterflies within warps, then warps in order).
__device__ inline float block_sum(float v, float* slots) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total = __fadd_rn(total, slots[w]);
  return total;
}

// The arithmetic both rms_norm kernels share, one definition so that they round alike.
// One row's pointers (grid: one CTA per row).
template <typename T>
struct RmsRow {
  const T* x;
  T* res;  // or null
  T* out;
  __device__ explicit RmsRow(const RmsArgs<T>& a) {
    const int64_t n = blockIdx.x;
    x = a.x + n * a.x_stride;
    res = a.residual != nullptr ? a.residual + n * a.residual_stride : nullptr;
    out = a.out + n * a.out_stride;
  }
};
// h = T(x + residual), rounded to T as transformers' residual stream is.
template <typename T>
__device__ inline T residual_add(T x, T residual) {
  return from_float<T>(__fadd_rn(to_float(x), to_float(residual)));
}
// 1 / sqrt(mean(h^2) + eps) from the row's sum of squares.
__device__ inline float inverse_rms(float sum_of_squares, int64_t hidden, float eps) {
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(
                             __fdiv_rn(sum_of_squares, static_cast<float>(hidden)), eps)));
}
// out = T(weight * T(h * inv)).
template <typename T>
__device__ inline T rms_scaled(T h, T weight, float inv) {
  const float normed = round_to<T>(__fmul_rn(to_float(h), inv));
  return from_float<T>(__fmul_rn(to_float(weight), normed));
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const RmsArgs<T> a) {
  __shared__ float slots[kThreads / 32];
  const RmsRow<T> row(a);
  const T *x = row.x;
  T *res = row.res, *out = row.out;
  constexpr int kStep = kVector ? kVec : 1;
  // Pass 1: h (into the residual), sum of squares.
  float squares = 0.0f;
  for (int64_t c = threadIdx.x * kStep; c < a.hidden; c += kThreads * kStep) {
    Vec8<T> xv, rv;
    if (kVector) {
      xv.word = *reinterpret_cast<const uint4*>(x + c);
      if (res != nullptr) rv.word = *reinterpret_cast<const uint4*>(res + c);
    } else {
      xv.v[0] = x[c];
      if (res != nullptr) rv.v[0] = res[c];
    }
#pragma unroll
    for (int e = 0; e < kStep; ++e) {
      float h = to_float(xv.v[e]);
      if (res != nullptr) {
        rv.v[e] = residual_add(xv.v[e], rv.v[e]);
        h = to_float(rv.v[e]);
      }
      squares = __fmaf_rn(h, h, squares);
    }
    if (res != nullptr) {
      if (kVector) {
        *reinterpret_cast<uint4*>(res + c) = rv.word;
      } else {
        res[c] = rv.v[0];
      }
    }
  }
  const float inv = inverse_rms(block_sum(squares, slots), a.hidden, a.eps);
  // Pass 2: the elements this thread wrote (or read) in pass 1.
  const T* h_row = res != nullptr ? res : x;
  for (int64_t c = threadIdx.x * kStep; c < a.hidden; c += kThreads * kStep) {
    Vec8<T> hv, wv, ov;
    if (kVector) {
      hv.word = *reinterpret_cast<const uint4*>(h_row + c);
      wv.word = *reinterpret_cast<const uint4*>(a.weight + c);
    } else {
      hv.v[0] = h_row[c];
      wv.v[0] = a.weight[c];
    }
#pragma unroll
    for (int e = 0; e < kStep; ++e) ov.v[e] = rms_scaled(hv.v[e], wv.v[e], inv);
    if (kVector) {
      *reinterpret_cast<uint4*>(out + c) = ov.word;
    } else {
      out[c] = ov.v[0];
    }
  }
}

constexpr int kResidentChunks = 4;  // 16-byte chunks of a row per thread (H <= 8192)

template <typename T>
__global__ void __launch_bounds__(kThreads) rms_norm_resident_kernel(const RmsArgs<T> a) {
  __shared__ float slots[kThreads / 32];
  const RmsRow<T> row(a);
  const T* x = row.x;
  T *res = row.res, *out = row.out;
  Vec8<T> hv[kResidentChunks], rv[kResidentChunks], wv[kResidentChunks];
#pragma unroll
  for (int i = 0; i < kResidentChunks; ++i) {  // every load issued before any is used
    const int64_t c = (threadIdx.x + static_cast<int64_t>(i) * kThreads) * kVec;
    if (c < a.hidden) {
      hv[i].word = *reinterpret_cast<const uint4*>(x + c);
      if (res != nullptr) rv[i].word = *reinterpret_cast<const uint4*>(res + c);
      wv[i].word = *reinterpret_cast<const uint4*>(a.weight + c);
    }
  }
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < kResidentChunks; ++i) {
    const int64_t c = (threadIdx.x + static_cast<int64_t>(i) * kThreads) * kVec;
    if (c >= a.hidden) continue;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (res != nullptr) hv[i].v[e] = residual_add(hv[i].v[e], rv[i].v[e]);
      const float h = to_float(hv[i].v[e]);
      squares = __fmaf_rn(h, h, squares);
    }
    if (res != nullptr) *reinterpret_cast<uint4*>(res + c) = hv[i].word;
  }
  const float inv = inverse_rms(block_sum(squares, slots), a.hidden, a.eps);
#pragma unroll
  for (int i = 0; i < kResidentChunks; ++i) {
    const int64_t c = (threadIdx.x + static_cast<int64_t>(i) * kThreads) * kVec;
    if (c >= a.hidden) continue;
    Vec8<T> ov;
#pragma unroll
    for (int e = 0; e < kVec; ++e) ov.v[e] = rms_scaled(hv[i].v[e], wv[i].v[e], inv);
    *reinterpret_cast<uint4*>(out + c) = ov.word;
  }
}

template <typename T>
void launch_rms_norm(const RmsNormParams& p) {
  RmsArgs<T> a;
  a.x = static_cast<const T*>(p.x);
  a.x_stride = p.x_stride_row;
  a.residual = static_cast<T*>(p.residual);
  a.residual_stride = p.residual_stride_row;
  a.weight = static_cast<const T*>(p.weight);
  a.out = static_cast<T*>(p.out);
  a.out_stride = p.out_stride_row;
  a.hidden = p.hidden;
  a.eps = p.eps;
  const bool vector = p.hidden % kVec == 0 && aligned16(p.x) && aligned16(p.weight) &&
                      aligned16(p.out) && p.x_stride_row % kVec == 0 &&
                      p.out_stride_row % kVec == 0 &&
                      (p.residual == nullptr ||
                       (aligned16(p.residual) && p.residual_stride_row % kVec == 0));
  const dim3 grid(static_cast<unsigned>(p.rows));
  if (vector && p.hidden <= int64_t{kResidentChunks} * kThreads * kVec) {
    rms_norm_resident_kernel<T><<<grid, kThreads, 0, to_stream(p.stream)>>>(a);
  } else if (vector) {
    rms_norm_kernel<T, true><<<grid, kThreads, 0, to_stream(p.stream)>>>(a);
  } else {
    rms_norm_kernel<T, false><<<grid, kThreads, 0, to_stream(p.stream)>>>(a);
  }
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

// ---- silu_mul -----------------------------------------------------------------------------------

template <typename T>
struct SiluArgs {
  const T* gate_up;
  int64_t gate_up_stride;
  T* out;
  int64_t out_stride;
  int64_t inner;
};

template <typename T>
__device__ inline T silu_times(T g, T u) {
  const float gf = to_float(g);
  const float silu = round_to<T>(__fdiv_rn(gf, __fadd_rn(1.0f, expf(-gf))));
  return from_float<T>(__fmul_rn(silu, to_float(u)));
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) silu_mul_kernel(const SiluArgs<T> a) {
  const int64_t n = blockIdx.y;
  const T* gate = a.gate_up + n * a.gate_up_stride;
  const T* up = gate + a.inner;
  T* out = a.out + n * a.out_stride;
  constexpr int kStep = kVector ? kVec : 1;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kStep;
  if (c >= a.inner) return;
  if (kVector) {
    Vec8<T> g, u, o;
    g.word = *reinterpret_cast<const uint4*>(gate + c);
    u.word = *reinterpret_cast<const uint4*>(up + c);
#pragma unroll
    for (int e = 0; e < kVec; ++e) o.v[e] = silu_times(g.v[e], u.v[e]);
    *reinterpret_cast<uint4*>(out + c) = o.word;
  } else {
    out[c] = silu_times(gate[c], up[c]);
  }
}

template <typename T>
void launch_silu_mul(const SiluMulParams& p) {
  SiluArgs<T> a{static_cast<const T*>(p.gate_up), p.gate_up_stride_row, static_cast<T*>(p.out),
                p.out_stride_row, p.inner};
  const bool vector = p.inner % kVec == 0 && aligned16(p.gate_up) && aligned16(p.out) &&
                      p.gate_up_stride_row % kVec == 0 && p.out_stride_row % kVec == 0;
  const int64_t per_cta = int64_t{kThreads} * (vector ? kVec : 1);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.inner, per_cta)), static_cast<unsigned>(p.rows));
  if (vector) {
    silu_mul_kernel<T, true><<<grid, kThreads, 0, to_stream(p.stream)>>>(a);
  } else {
    silu_mul_kernel<T, false><<<grid, kThreads, 0, to_stream(p.stream)>>>(a);
  }
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

// ---- rope_append --------------------------------------------------------------------------------

template <typename T>
struct RopeArgs {
  const T* qkv;
  int64_t qkv_stride;
  const T* cos;
  const T* sin;
  int64_t cos_stride, sin_stride, num_positions;
  const int32_t* positions;
  int64_t positions_stride;
  T* q_out;
  int64_t q_stride_batch, q_stride_head;
  T* k;
  int64_t k_stride_page, k_stride_token, k_stride_head;
  T* v;
  int64_t v_stride_page, v_stride_token, v_stride_head;
  int page_size;
  int64_t num_pages;
  const int32_t* page_table;
  int64_t pt_stride_batch, pt_stride_page;
  int64_t max_pages;
  int hq, hk, half;  // half = D / 2
};

template <typename T>
__global__ void __launch_bounds__(kThreads) rope_append_kernel(const RopeArgs<T> a) {
  const int b = blockIdx.y;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t heads = a.hq + 2 * a.hk;
  if (item >= heads * a.half) return;
  const int head = static_cast<int>(item / a.half), i = static_cast<int>(item % a.half);
  const int64_t d = 2 * a.half;
  const int64_t pos = a.positions[b * a.positions_stride];
  // The K / V row of this token: none when the position or its page is out of range.
  T* k_row = nullptr;
  T* v_row = nullptr;
  if (head >= a.hq && pos >= 0 && pos / a.page_size < a.max_pages) {
    const int64_t page = a.page_table[b * a.pt_stride_batch + (pos / a.page_size) * a.pt_stride_page];
    if (page >= 0 && page < a.num_pages) {
      const int64_t row = pos % a.page_size;
      const int kv = head < a.hq + a.hk ? head - a.hq : head - a.hq - a.hk;
      k_row = a.k + page * a.k_stride_page + row * a.k_stride_token + kv * a.k_stride_head;
      v_row = a.v + page * a.v_stride_page + row * a.v_stride_token + kv * a.v_stride_head;
    }
  }
  const T* x = a.qkv + b * a.qkv_stride + head * d;
  if (head >= a.hq + a.hk) {  // v: a copy
    if (v_row != nullptr) {
      v_row[i] = x[i];
      v_row[i + a.half] = x[i + a.half];
    }
    return;
  }
  T* dst = head < a.hq ? a.q_out + b * a.q_stride_batch + head * a.q_stride_head : k_row;
  if (dst == nullptr) return;
  const int64_t p = clamp64(pos, 0, a.num_positions - 1);
  const T* c = a.cos + p * a.cos_stride;
  const T* s = a.sin + p * a.sin_stride;
  const float x1 = to_float(x[i]), x2 = to_float(x[i + a.half]);
  // out[i] = T(T(x1 c[i]) + T(-x2 s[i])), out[i + half] = T(T(x2 c[i + half]) + T(x1 s[i + half])).
  const float lo = __fadd_rn(round_to<T>(__fmul_rn(x1, to_float(c[i]))),
                             round_to<T>(__fmul_rn(-x2, to_float(s[i]))));
  const float hi = __fadd_rn(round_to<T>(__fmul_rn(x2, to_float(c[i + a.half]))),
                             round_to<T>(__fmul_rn(x1, to_float(s[i + a.half]))));
  dst[i] = from_float<T>(lo);
  dst[i + a.half] = from_float<T>(hi);
}

template <typename T>
void launch_rope_append(const RopeAppendParams& p) {
  RopeArgs<T> a;
  a.qkv = static_cast<const T*>(p.qkv);
  a.qkv_stride = p.qkv_stride_batch;
  a.cos = static_cast<const T*>(p.cos);
  a.sin = static_cast<const T*>(p.sin);
  a.cos_stride = p.cos_stride_position;
  a.sin_stride = p.sin_stride_position;
  a.num_positions = p.num_positions;
  a.positions = p.positions;
  a.positions_stride = p.positions_stride;
  a.q_out = static_cast<T*>(p.q_out);
  a.q_stride_batch = p.q_out_stride_batch;
  a.q_stride_head = p.q_out_stride_head;
  a.k = static_cast<T*>(p.k_cache);
  a.k_stride_page = p.k_stride_page;
  a.k_stride_token = p.k_stride_token;
  a.k_stride_head = p.k_stride_head;
  a.v = static_cast<T*>(p.v_cache);
  a.v_stride_page = p.v_stride_page;
  a.v_stride_token = p.v_stride_token;
  a.v_stride_head = p.v_stride_head;
  a.page_size = p.page_size;
  a.num_pages = p.num_pages;
  a.page_table = p.page_table;
  a.pt_stride_batch = p.page_table_stride_batch;
  a.pt_stride_page = p.page_table_stride_page;
  a.max_pages = p.max_pages;
  a.hq = p.num_q_heads;
  a.hk = p.num_kv_heads;
  a.half = p.head_dim / 2;
  const int64_t items = (int64_t{p.num_q_heads} + 2 * p.num_kv_heads) * a.half;
  const dim3 grid(static_cast<unsigned>(ceil_div(items, kThreads)), static_cast<unsigned>(p.batch));
  rope_append_kernel<T><<<grid, kThreads, 0, to_stream(p.stream)>>>(a);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

// Host checks shared by the three entry points: the CPU's field checks, then the GPU's limits.
void check_grid_rows(const char* fn, const char* name, int64_t rows) {
  ABSPARSE_CHECK_ARG(rows <= 65535, fn, name, ": the CUDA kernel supports at most 65535 rows, got ",
                     rows);
}

}  // namespace
}  // namespace cuda

void rms_norm_cuda(const RmsNormParams& p) {
  model_detail::check_rms_norm(p);
  ABSPARSE_CHECK_ARG(p.rows <= INT32_MAX, "rms_norm", "x: the CUDA kernel supports < 2^31 rows, got ",
                     p.rows);
  if (p.rows == 0) return;
  ABSPARSE_DISPATCH_HALF("rms_norm", "x", p.dtype, T, [&] { cuda::launch_rms_norm<T>(p); });
}

void silu_mul_cuda(const SiluMulParams& p) {
  model_detail::check_silu_mul(p);
  cuda::check_grid_rows("silu_mul", "gate_up", p.rows);
  ABSPARSE_CHECK_ARG(p.inner <= int64_t{INT32_MAX} * 8, "silu_mul", "gate_up: I too large: ",
                     p.inner);
  if (p.rows == 0) return;
  ABSPARSE_DISPATCH_HALF("silu_mul", "gate_up", p.dtype, T, [&] { cuda::launch_silu_mul<T>(p); });
}

void rope_append_cuda(const RopeAppendParams& p) {
  model_detail::check_rope_append(p);
  cuda::check_grid_rows("rope_append", "qkv", p.batch);
  ABSPARSE_CHECK_ARG(p.num_positions > 0 || p.batch == 0, "rope_append",
                     "cos: expected at least one position row, got 0");
  if (p.batch == 0) return;
  ABSPARSE_DISPATCH_HALF("rope_append", "qkv", p.dtype, T,
                         [&] { cuda::launch_rope_append<T>(p); });
}

}  // namespace absparse

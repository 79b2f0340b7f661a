// Shared pieces of the absparse CUDA kernels: error checks, dispatch, dtype loads, the device copy
// of the selection arithmetic, clamping of device-side values, warp reductions. The tensor-core and
// copy primitives live in mma.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "absparse/decode.h"
#include "absparse/decode_cuda.h"
#include "absparse/error.h"

namespace absparse::cuda {

// Throws std::runtime_error (Python RuntimeError) on a CUDA runtime error: these are not argument
// errors (launch failures, an earlier asynchronous fault surfacing here).
#define ABSPARSE_CUDA_CHECK(expr)                                                           \
  do {                                                                                      \
    const cudaError_t absparse_err_ = (expr);                                               \
    if (absparse_err_ != cudaSuccess) {                                                     \
      throw std::runtime_error(std::string("absparse CUDA error: ") +                       \
                               cudaGetErrorString(absparse_err_) + " (" #expr ") [" +       \
                               __FILE__ + ":" + std::to_string(__LINE__) + "]");            \
    }                                                                                       \
  } while (0)

// Dispatch: the lambda-style switches instantiate only what the build supports; the default
// branch names the offending value.
#define ABSPARSE_DISPATCH_HEAD_DIM(fn, dim, kDim, ...)                                       \
  [&] {                                                                                     \
    switch (dim) {                                                                          \
      case 64: { constexpr int kDim = 64; return __VA_ARGS__(); }                           \
      case 128: { constexpr int kDim = 128; return __VA_ARGS__(); }                         \
      case 256: { constexpr int kDim = 256; return __VA_ARGS__(); }                         \
      default:                                                                              \
        ABSPARSE_CHECK_ARG(false, fn, "head_dim: the CUDA kernels support 64, 128 and 256, " \
                           "got ", dim);                                                    \
    }                                                                                       \
  }()

#define ABSPARSE_DISPATCH_HALF(fn, name, dtype, T, ...)                                     \
  [&] {                                                                                     \
    switch (dtype) {                                                                        \
      case DType::kFloat16: { using T = __half; return __VA_ARGS__(); }                     \
      case DType::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); }             \
      default:                                                                              \
        ABSPARSE_CHECK_ARG(false, fn, name, ": the CUDA kernels support float16 and "        \
                           "bfloat16 (float32 runs on the CPU only), got ", dtype_name(dtype)); \
    }                                                                                       \
  }()

inline cudaStream_t to_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// ceil(a / b) for a >= 0, b > 0, without overflow near INT64_MAX (as cpp/src/select_blocks.cpp).
__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }
// Floor division that is correct for negative numerators.
__host__ __device__ inline int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a) / b + ((-a) % b != 0));
}
__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Multiprocessors of the current device (the launchers size their grids by it).
inline int multiprocessor_count() {
  int device = 0, count = 0;
  ABSPARSE_CUDA_CHECK(cudaGetDevice(&device));
  ABSPARSE_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

inline int log2_exact(int64_t x) {
  int l = 0;
  while ((int64_t{1} << l) < x) ++l;
  return l;
}
inline bool is_power_of_two(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

// A device-side length: seq_lens[b] clamped to what the page table can hold (docs in
// absparse/decode_cuda.h: values are never trusted on the device).
__device__ inline int64_t clamped_seq_len(const int32_t* seq_lens, int64_t stride, int32_t b,
                                          int64_t capacity) {
  return clamp64(seq_lens[b * stride], 0, capacity);
}

// Device copy of absparse::plan_selection (cpp/src/select_blocks.cpp), operation for operation,
// so that both sides make the same lists (the block size is 1 << log2_bs here).
struct DevicePlan {
  int64_t num_blocks, sink_blocks, local_begin, num_candidates, num_selected;
  __host__ __device__ int64_t count() const {
    return (num_blocks - num_candidates) + num_selected;
  }
};

__host__ __device__ inline DevicePlan device_plan(int64_t seq_len, int log2_bs,
                                                  int64_t budget_tokens, double budget_fraction,
                                                  int64_t sink_tokens, int64_t local_tokens) {
  const int64_t bs = int64_t{1} << log2_bs;
  DevicePlan plan;
  const int64_t n = seq_len >> log2_bs;
  plan.num_blocks = n;
  plan.sink_blocks = min64(ceil_div(sink_tokens, bs), n);
  const int64_t local_blocks = min64(ceil_div(local_tokens, bs), n);
  plan.local_begin = max64(n - local_blocks, plan.sink_blocks);
  plan.num_candidates = plan.local_begin - plan.sink_blocks;
  const int64_t budget = budget_fraction > 0.0
                             ? static_cast<int64_t>(ceil(budget_fraction * seq_len))
                             : budget_tokens;
  if (budget >= seq_len) {
    plan.num_selected = plan.num_candidates;
  } else {
    const int64_t kept = n - plan.num_candidates;
    const int64_t tail = seq_len - n * bs;
    const int64_t k = floor_div(budget - bs * kept - tail, bs);
    plan.num_selected = clamp64(k, 0, plan.num_candidates);
  }
  return plan;
}

// Element loads and stores of the half-precision dtypes.
template <typename T> __device__ inline float to_float(T x);
template <> __device__ inline float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Loads element i of a float16/bfloat16 tensor given at run time.
__device__ inline float load_half_as_float(const void* base, int64_t i, bool is_bf16) {
  const uint16_t bits = static_cast<const uint16_t*>(base)[i];
  if (is_bf16) return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  return __half2float(__ushort_as_half(bits));
}

constexpr unsigned kFullMask = 0xffffffffu;

__device__ inline float warp_max(float v) {  // fmaxf: a NaN operand is dropped
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ inline float warp_sum(float v) {  // fixed butterfly: deterministic
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// NaN ranks below every number (the CPU's rank_key).
__device__ inline float rank_value(float x) { return isnan(x) ? -INFINITY : x; }

}  // namespace absparse::cuda

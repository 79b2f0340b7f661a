// update_centroids on the GPU: the summaries of the blocks that become complete in tokens
// [start_b, L_b) of each sequence (docs/decode.md), bit-identical to update_centroids_cpu.
//
// Grid (X, Hk, B), 4 warps per CTA, one warp per block: warps stride over the blocks
// [start_b // bs_h, L_b // bs_h) of their (sequence, head); X is fixed from the capacity (the
// host cannot see start_b and L_b), so a decode step (at most one block per (b, h)) leaves most
// CTAs with nothing to do and they exit after two loads. Lane l owns the channel pairs
// d = 2 (l + 32 k), k < D / 64: each key row is read as coalesced 128-byte segments.
// The reductions run in float64 in the CPU's order (t = 0 .. bs-1), so every rounding matches.
#include "common.cuh"

namespace absparse::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxPairs = 4;   // channel pairs per lane: D / 64 <= 4 (D <= 256)
constexpr int kMaxGridX = 8;   // CTAs per (sequence, head) at most

struct UpdateArgs {
  const void* k;
  int64_t k_stride_page, k_stride_token, k_stride_head;
  bool bf16;
  const int32_t* seq_lens;
  int64_t seq_lens_stride;
  const int32_t* start_pos;
  int64_t start_pos_stride;
  const int32_t* page_table;
  int64_t page_table_stride_batch, page_table_stride_page;
  int64_t num_pages;
  int64_t capacity;  // max_pages * P
  int log2_page;
  int head_dim;
  int kind;    // SummaryKind
  int format;  // SummaryFormat
  void* summaries;  // element strides in the summary dtype
  int64_t s_stride_page, s_stride_slot, s_stride_vector;
  float* scales;
  int64_t sc_stride_page, sc_stride_slot, sc_stride_vector;
  const float* channel_scale;
  const float* channel_zero;
  int64_t channel_stride_head;
  uint8_t log2_block[kCudaMaxKvHeads];
  int32_t slot_offset[kCudaMaxKvHeads];
};

// round_half_even(v) clamped to [lo, hi]; NaN saturates to hi like the CPU's round_clamp.
__device__ inline int round_clamp(float v, float lo, float hi) {
  return static_cast<int>(fmaxf(fminf(rintf(v), hi), lo));
}

__global__ void __launch_bounds__(kThreads) update_kernel(const __grid_constant__ UpdateArgs a) {
  const int b = blockIdx.z, h = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t len = clamped_seq_len(a.seq_lens, a.seq_lens_stride, b, a.capacity);
  const int64_t start = clamp64(a.start_pos[b * a.start_pos_stride], 0, len);
  const int log2_bs = a.log2_block[h];
  const int bs = 1 << log2_bs;
  const int64_t first = start >> log2_bs, last = len >> log2_bs;
  const int pairs = a.head_dim / 64;
  const int num_vectors = a.kind == static_cast<int>(SummaryKind::kMean) ? 1 : 2;
  const SummaryFormat format = static_cast<SummaryFormat>(a.format);
  const int32_t* pages = a.page_table + b * a.page_table_stride_batch;
  const float* cscale = a.channel_scale ? a.channel_scale + h * a.channel_stride_head : nullptr;
  const float* czero = a.channel_zero ? a.channel_zero + h * a.channel_stride_head : nullptr;

  for (int64_t j = first + blockIdx.x * kWarps + warp; j < last;
       j += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t token0 = j << log2_bs;
    const int64_t page = pages[(token0 >> a.log2_page) * a.page_table_stride_page];
    if (page < 0 || page >= a.num_pages) continue;  // bad entry: nothing is written
    const int64_t in_page = token0 & ((int64_t{1} << a.log2_page) - 1);
    const int64_t base = page * a.k_stride_page + in_page * a.k_stride_token + h * a.k_stride_head;

    // Reductions over the block's tokens, per channel, in float64 and in token order.
    double acc0[kMaxPairs][2], acc1[kMaxPairs][2];  // mean: sum; box: hi, lo
#pragma unroll
    for (int k = 0; k < kMaxPairs; ++k) {
#pragma unroll
      for (int e = 0; e < 2; ++e) acc0[k][e] = acc1[k][e] = 0.0;
    }
    for (int t = 0; t < bs; ++t) {
      const int64_t row = base + t * a.k_stride_token;
#pragma unroll
      for (int k = 0; k < kMaxPairs; ++k) {
        if (k >= pairs) break;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const double x = load_half_as_float(a.k, row + 2 * (lane + 32 * k) + e, a.bf16);
          if (num_vectors == 1) {
            acc0[k][e] += x;
          } else if (t == 0) {
            acc0[k][e] = acc1[k][e] = x;
          } else {  // std::max / std::min of the CPU: hi = (hi < x) ? x : hi
            acc0[k][e] = acc0[k][e] < x ? x : acc0[k][e];
            acc1[k][e] = x < acc1[k][e] ? x : acc1[k][e];
          }
        }
      }
    }
    float vec[2][kMaxPairs][2];  // [R][pair][element]
    if (a.kind == static_cast<int>(SummaryKind::kCuboid)) {
      double dev[kMaxPairs][2];
#pragma unroll
      for (int k = 0; k < kMaxPairs; ++k) {
#pragma unroll
        for (int e = 0; e < 2; ++e) dev[k][e] = 0.0;
      }
      for (int t = 0; t < bs; ++t) {
        const int64_t row = base + t * a.k_stride_token;
#pragma unroll
        for (int k = 0; k < kMaxPairs; ++k) {
          if (k >= pairs) break;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const double centre = (acc0[k][e] + acc1[k][e]) / 2.0;
            const double x = load_half_as_float(a.k, row + 2 * (lane + 32 * k) + e, a.bf16);
            dev[k][e] += fabs(x - centre);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kMaxPairs; ++k) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const double centre = (acc0[k][e] + acc1[k][e]) / 2.0;
          const double radius = dev[k][e] / bs;
          vec[0][k][e] = static_cast<float>(centre + radius);
          vec[1][k][e] = static_cast<float>(centre - radius);
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < kMaxPairs; ++k) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          vec[0][k][e] = static_cast<float>(num_vectors == 1 ? acc0[k][e] / bs : acc0[k][e]);
          vec[1][k][e] = static_cast<float>(acc1[k][e]);
        }
      }
    }

    // Quantize and store each vector (quantize_vector of cpp/src/quantize.cpp).
    const int64_t slot = a.slot_offset[h] + (in_page >> log2_bs);
    for (int r = 0; r < num_vectors; ++r) {
      const int64_t at = page * a.s_stride_page + slot * a.s_stride_slot + r * a.s_stride_vector;
      float vscale = 0.0f;
      if (format == SummaryFormat::kInt8 || format == SummaryFormat::kInt4) {
        float max_abs = 0.0f;
#pragma unroll
        for (int k = 0; k < kMaxPairs; ++k) {
          if (k >= pairs) break;
          max_abs = fmaxf(max_abs, fmaxf(fabsf(vec[r][k][0]), fabsf(vec[r][k][1])));
        }
        max_abs = warp_max(max_abs);  // fmax: order-independent, exact
        vscale = max_abs / static_cast<float>(format == SummaryFormat::kInt8 ? 127 : 7);
        if (lane == 0) {
          a.scales[page * a.sc_stride_page + slot * a.sc_stride_slot + r * a.sc_stride_vector] =
              vscale;
        }
      }
#pragma unroll
      for (int k = 0; k < kMaxPairs; ++k) {
        if (k >= pairs) break;
        const int d = 2 * (lane + 32 * k);
        const float x0 = vec[r][k][0], x1 = vec[r][k][1];
        switch (format) {
          case SummaryFormat::kFp32: {
            float* out = static_cast<float*>(a.summaries) + at + d;
            out[0] = x0;
            out[1] = x1;
            break;
          }
          case SummaryFormat::kFp16: {
            __half* out = static_cast<__half*>(a.summaries) + at + d;
            out[0] = __float2half_rn(x0);
            out[1] = __float2half_rn(x1);
            break;
          }
          case SummaryFormat::kBf16: {
            __nv_bfloat16* out = static_cast<__nv_bfloat16*>(a.summaries) + at + d;
            out[0] = __float2bfloat16_rn(x0);
            out[1] = __float2bfloat16_rn(x1);
            break;
          }
          case SummaryFormat::kInt8:
          case SummaryFormat::kInt4: {
            const float qmax = format == SummaryFormat::kInt8 ? 127.0f : 7.0f;
            const int c0 = vscale == 0.0f ? 0 : round_clamp(x0 / vscale, -qmax, qmax);
            const int c1 = vscale == 0.0f ? 0 : round_clamp(x1 / vscale, -qmax, qmax);
            if (format == SummaryFormat::kInt8) {
              int8_t* out = static_cast<int8_t*>(a.summaries) + at + d;
              out[0] = static_cast<int8_t>(c0);
              out[1] = static_cast<int8_t>(c1);
            } else {
              static_cast<uint8_t*>(a.summaries)[at + d / 2] =
                  static_cast<uint8_t>((c0 & 0xF) | ((c1 & 0xF) << 4));
            }
            break;
          }
          case SummaryFormat::kInt8c:
          case SummaryFormat::kInt4c: {
            const float qmax = format == SummaryFormat::kInt8c ? 255.0f : 15.0f;
            const int c0 = round_clamp((x0 - czero[d]) / cscale[d], 0.0f, qmax);
            const int c1 = round_clamp((x1 - czero[d + 1]) / cscale[d + 1], 0.0f, qmax);
            uint8_t* out = static_cast<uint8_t*>(a.summaries);
            if (format == SummaryFormat::kInt8c) {
              out[at + d] = static_cast<uint8_t>(c0);
              out[at + d + 1] = static_cast<uint8_t>(c1);
            } else {
              out[at + d / 2] = static_cast<uint8_t>(c0 | (c1 << 4));
            }
            break;
          }
        }
      }
    }
  }
}

}  // namespace

void run_update_centroids(const UpdateCentroidsParams& p) {
  const char* fn = "update_centroids";
  const BatchGeometry& g = p.geometry;
  const LayerLayout& layout = check_cuda_layout(fn, p.layout, g, "k_cache");
  ABSPARSE_CHECK_ARG(g.head_dim == 64 || g.head_dim == 128 || g.head_dim == 256, fn,
                     "head_dim: the CUDA kernels support 64, 128 and 256, got ", g.head_dim);
  ABSPARSE_CHECK_ARG(p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16, fn,
                     "k_cache: the CUDA kernels support float16 and bfloat16 (float32 runs on the "
                     "CPU only), got ", dtype_name(p.dtype));
  ABSPARSE_CHECK_ARG(g.batch >= 0 && g.max_pages >= 0 && g.num_pages >= 0, fn,
                     "batch, max_pages, num_pages: expected >= 0, got ", g.batch, ", ",
                     g.max_pages, ", ", g.num_pages);
  const SummaryFormat format = layout.format();
  if (format_has_vector_scales(format)) {
    ABSPARSE_CHECK_ARG(p.summaries.scales != nullptr, fn, "scales: format '",
                       summary_format_name(format), "' needs a scales tensor, got None");
  }
  if (format_is_per_channel(format)) {
    ABSPARSE_CHECK_ARG(p.summaries.channel_scale && p.summaries.channel_zero, fn,
                       "layout: format '", summary_format_name(format),
                       "' needs channel_scale and channel_zero, got None");
  }
  if (g.batch == 0 || g.num_pages == 0 || g.max_pages == 0) return;  // no complete block exists

  UpdateArgs a{};
  a.k = p.k_cache.data;
  a.k_stride_page = p.k_cache.stride_page;
  a.k_stride_token = p.k_cache.stride_token;
  a.k_stride_head = p.k_cache.stride_head;
  a.bf16 = p.dtype == DType::kBFloat16;
  a.seq_lens = g.seq_lens;
  a.seq_lens_stride = g.seq_lens_stride;
  a.start_pos = p.start_pos;
  a.start_pos_stride = p.start_pos_stride;
  a.page_table = g.page_table;
  a.page_table_stride_batch = g.page_table_stride_batch;
  a.page_table_stride_page = g.page_table_stride_page;
  a.num_pages = g.num_pages;
  a.capacity = static_cast<int64_t>(g.max_pages) * g.page_size;
  a.log2_page = log2_exact(g.page_size);
  a.head_dim = g.head_dim;
  a.kind = static_cast<int>(layout.kind());
  a.format = static_cast<int>(format);
  a.summaries = p.summaries.data;
  a.s_stride_page = p.summaries.stride_page;
  a.s_stride_slot = p.summaries.stride_slot;
  a.s_stride_vector = p.summaries.stride_vector;
  a.scales = p.summaries.scales;
  a.sc_stride_page = p.summaries.scales_stride_page;
  a.sc_stride_slot = p.summaries.scales_stride_slot;
  a.sc_stride_vector = p.summaries.scales_stride_vector;
  a.channel_scale = format_is_per_channel(format) ? p.summaries.channel_scale : nullptr;
  a.channel_zero = format_is_per_channel(format) ? p.summaries.channel_zero : nullptr;
  a.channel_stride_head = p.summaries.channel_stride_head;
  for (int h = 0; h < g.num_kv_heads; ++h) {
    a.log2_block[h] = static_cast<uint8_t>(log2_exact(layout.block_size(h)));
    a.slot_offset[h] = layout.slot_offset(h);
  }
  // Grid X: enough warps for a prefill of the longest sequence the page table holds, capped.
  const int64_t capacity_blocks = a.capacity / layout.min_block_size();
  const int grid_x =
      static_cast<int>(clamp64(ceil_div(capacity_blocks, kWarps * 64), 1, kMaxGridX));
  ABSPARSE_CHECK_ARG(g.batch <= 65535, fn, "batch: the CUDA kernels support up to 65535 ",
                     "sequences, got ", g.batch);
  const dim3 grid(grid_x, g.num_kv_heads, g.batch);
  update_kernel<<<grid, kThreads, 0, to_stream(p.stream)>>>(a);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace absparse::cuda

namespace absparse {
void update_centroids_cuda(const UpdateCentroidsParams& p) { cuda::run_update_centroids(p); }
}  // namespace absparse

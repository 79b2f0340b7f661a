// update_centroids on the GPU: the summaries of the blocks that become complete in tokens
// [start_b, L_b) of each sequence (docs/decode.md), bit-identical to update_centroids_cpu.
//
// update_kernel<D>: grid (X, Hk, B), 4 warps per CTA. A block of bs keys is summarized by D / 8
// lanes, each owning 8 consecutive channels read as one 16-byte load per key row, so a warp
// summarizes 256 / D blocks at once; warps stride over the blocks [start_b // bs_h, L_b // bs_h) of
// their (sequence, head). Rows are loaded 8 at a time (8 loads in flight per lane) and reduced in
// float64 in the CPU's order (t = 0 .. bs-1), so every rounding matches the reference.
// X comes from the host: enough CTAs to cover max_new_tokens (a parallelism hint; the loop covers
// any number of blocks), capped so that the whole grid is a few waves (a long prefill), or 1 CTA
// per (sequence, head) for a decode step (max_new_tokens = 1).
#include "common.cuh"

namespace absparse::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowBatch = 8;  // key rows loaded before they are reduced

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

// Eight 16-bit key elements as float64 (exact).
__device__ inline void unpack8(const uint4& v, bool bf16, double (&x)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const uint16_t bits = static_cast<uint16_t>(w[i] >> (16 * e));
      x[2 * i + e] = bf16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16)
                          : __half2float(__ushort_as_half(bits));
    }
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) update_kernel(const __grid_constant__ UpdateArgs a) {
  constexpr int kLanesPerBlock = D / 8;
  constexpr int kBlocksPerWarp = 32 / kLanesPerBlock;
  const int b = blockIdx.z, h = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sub = lane / kLanesPerBlock;        // which block of the warp
  const int c0 = (lane % kLanesPerBlock) * 8;   // this lane's channels [c0, c0 + 8)
  const int64_t len = clamped_seq_len(a.seq_lens, a.seq_lens_stride, b, a.capacity);
  const int64_t start = clamp64(a.start_pos[b * a.start_pos_stride], 0, len);
  const int log2_bs = a.log2_block[h];
  const int bs = 1 << log2_bs;
  const int64_t first = start >> log2_bs, last = len >> log2_bs;
  const bool mean = a.kind == static_cast<int>(SummaryKind::kMean);
  const int num_vectors = mean ? 1 : 2;
  const SummaryFormat format = static_cast<SummaryFormat>(a.format);
  const int32_t* pages = a.page_table + b * a.page_table_stride_batch;
  const uint4* kbase = static_cast<const uint4*>(a.k);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps * kBlocksPerWarp;

  // Warp-uniform loop; lanes whose block is past the end (or has a bad page entry) idle along,
  // so that the shuffles of the per-vector scale see every lane.
  for (int64_t j_warp = first + (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kBlocksPerWarp;
       j_warp < last; j_warp += stride) {
    const int64_t j = j_warp + sub;
    const int64_t token0 = j << log2_bs;
    int64_t page = -1;
    if (j < last) page = pages[(token0 >> a.log2_page) * a.page_table_stride_page];
    const bool active = j < last && page >= 0 && page < a.num_pages;  // bad entry: no write
    const int64_t in_page = token0 & ((int64_t{1} << a.log2_page) - 1);
    const int64_t base =
        active ? page * a.k_stride_page + in_page * a.k_stride_token + h * a.k_stride_head + c0
               : 0;

    // Reductions over the block's tokens, per channel, in float64 and in token order.
    double acc0[8], acc1[8];  // mean: sum; box: hi, lo
#pragma unroll
    for (int c = 0; c < 8; ++c) acc0[c] = acc1[c] = 0.0;
    for (int t0 = 0; t0 < bs; t0 += kRowBatch) {
      uint4 rows[kRowBatch];
#pragma unroll
      for (int r = 0; r < kRowBatch; ++r) {
        rows[r] = make_uint4(0, 0, 0, 0);
        if (active && t0 + r < bs) rows[r] = __ldg(kbase + (base + (t0 + r) * a.k_stride_token) / 8);
      }
#pragma unroll
      for (int r = 0; r < kRowBatch; ++r) {
        if (t0 + r >= bs) break;
        double x[8];
        unpack8(rows[r], a.bf16, x);
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          if (mean) {
            acc0[c] += x[c];
          } else if (t0 + r == 0) {
            acc0[c] = acc1[c] = x[c];
          } else {  // std::max / std::min of the CPU: hi = (hi < x) ? x : hi
            acc0[c] = acc0[c] < x[c] ? x[c] : acc0[c];
            acc1[c] = x[c] < acc1[c] ? x[c] : acc1[c];
          }
        }
      }
    }
    float vec[2][8];  // [R][channel]
    if (a.kind == static_cast<int>(SummaryKind::kCuboid)) {
      double dev[8];
#pragma unroll
      for (int c = 0; c < 8; ++c) dev[c] = 0.0;
      for (int t0 = 0; t0 < bs; t0 += kRowBatch) {
        uint4 rows[kRowBatch];
#pragma unroll
        for (int r = 0; r < kRowBatch; ++r) {
          rows[r] = make_uint4(0, 0, 0, 0);
          if (active && t0 + r < bs) {
            rows[r] = __ldg(kbase + (base + (t0 + r) * a.k_stride_token) / 8);
          }
        }
#pragma unroll
        for (int r = 0; r < kRowBatch; ++r) {
          if (t0 + r >= bs) break;
          double x[8];
          unpack8(rows[r], a.bf16, x);
#pragma unroll
          for (int c = 0; c < 8; ++c) dev[c] += fabs(x[c] - (acc0[c] + acc1[c]) / 2.0);
        }
      }
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const double centre = (acc0[c] + acc1[c]) / 2.0;
        const double radius = dev[c] / bs;
        vec[0][c] = static_cast<float>(centre + radius);
        vec[1][c] = static_cast<float>(centre - radius);
      }
    } else {
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        vec[0][c] = static_cast<float>(mean ? acc0[c] / bs : acc0[c]);
        vec[1][c] = static_cast<float>(acc1[c]);
      }
    }

    // Quantize and store each vector (quantize_vector of cpp/src/quantize.cpp).
    const int64_t slot = a.slot_offset[h] + (in_page >> log2_bs);
    for (int r = 0; r < num_vectors; ++r) {
      // Element offset of vector r; this lane's channels start at element c0 (byte c0 / 2 for
      // the 4-bit formats, whose elements are bytes of two codes).
      const int64_t vec_at = page * a.s_stride_page + slot * a.s_stride_slot + r * a.s_stride_vector;
      const bool four_bit = format == SummaryFormat::kInt4 || format == SummaryFormat::kInt4c;
      const int64_t at = vec_at + (four_bit ? c0 / 2 : c0);
      float vscale = 0.0f;
      if (format == SummaryFormat::kInt8 || format == SummaryFormat::kInt4) {
        float max_abs = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; ++c) max_abs = fmaxf(max_abs, fabsf(vec[r][c]));
#pragma unroll
        for (int o = kLanesPerBlock / 2; o > 0; o >>= 1) {  // fmax: order-independent, exact
          max_abs = fmaxf(max_abs, __shfl_xor_sync(kFullMask, max_abs, o));
        }
        vscale = max_abs / static_cast<float>(format == SummaryFormat::kInt8 ? 127 : 7);
        if (active && c0 == 0) {
          a.scales[page * a.sc_stride_page + slot * a.sc_stride_slot + r * a.sc_stride_vector] =
              vscale;
        }
      }
      if (!active) continue;
      switch (format) {
        case SummaryFormat::kFp32: {
          float* out = static_cast<float*>(a.summaries) + at;
#pragma unroll
          for (int c = 0; c < 8; ++c) out[c] = vec[r][c];
          break;
        }
        case SummaryFormat::kFp16: {
          __half* out = static_cast<__half*>(a.summaries) + at;
#pragma unroll
          for (int c = 0; c < 8; ++c) out[c] = __float2half_rn(vec[r][c]);
          break;
        }
        case SummaryFormat::kBf16: {
          __nv_bfloat16* out = static_cast<__nv_bfloat16*>(a.summaries) + at;
#pragma unroll
          for (int c = 0; c < 8; ++c) out[c] = __float2bfloat16_rn(vec[r][c]);
          break;
        }
        case SummaryFormat::kInt8:
        case SummaryFormat::kInt4: {
          const float qmax = format == SummaryFormat::kInt8 ? 127.0f : 7.0f;
          int code[8];
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            code[c] = vscale == 0.0f ? 0 : round_clamp(vec[r][c] / vscale, -qmax, qmax);
          }
          if (format == SummaryFormat::kInt8) {
            int8_t* out = static_cast<int8_t*>(a.summaries) + at;
#pragma unroll
            for (int c = 0; c < 8; ++c) out[c] = static_cast<int8_t>(code[c]);
          } else {
            uint8_t* out = static_cast<uint8_t*>(a.summaries) + at;
#pragma unroll
            for (int c = 0; c < 8; c += 2) {
              out[c / 2] = static_cast<uint8_t>((code[c] & 0xF) | ((code[c + 1] & 0xF) << 4));
            }
          }
          break;
        }
        case SummaryFormat::kInt8c:
        case SummaryFormat::kInt4c: {
          const float qmax = format == SummaryFormat::kInt8c ? 255.0f : 15.0f;
          const float* cscale = a.channel_scale + h * a.channel_stride_head + c0;
          const float* czero = a.channel_zero + h * a.channel_stride_head + c0;
          int code[8];
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            code[c] = round_clamp((vec[r][c] - czero[c]) / cscale[c], 0.0f, qmax);
          }
          if (format == SummaryFormat::kInt8c) {
            uint8_t* out = static_cast<uint8_t*>(a.summaries) + at;
#pragma unroll
            for (int c = 0; c < 8; ++c) out[c] = static_cast<uint8_t>(code[c]);
          } else {
            uint8_t* out = static_cast<uint8_t*>(a.summaries) + at;
#pragma unroll
            for (int c = 0; c < 8; c += 2) {
              out[c / 2] = static_cast<uint8_t>(code[c] | (code[c + 1] << 4));
            }
          }
          break;
        }
      }
    }
  }
}

}  // namespace

void run_update_centroids(const UpdateCentroidsParams& p) {
  const char* fn = "update_centroids";
  check_update_centroids_cuda(p);
  const BatchGeometry& g = p.geometry;
  const LayerLayout& layout = *p.layout;
  if (g.batch == 0 || g.num_pages == 0 || g.max_pages == 0) return;  // no complete block exists
  const SummaryFormat format = layout.format();

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
  // Grid X: the blocks max_new_tokens can complete per (sequence, head) with the smallest block
  // size (+1: a block completes when its last token arrives), over the blocks one CTA summarizes
  // at once, capped at ~8 CTAs per multiprocessor over the whole grid. Example: a 128K prefill
  // of 8 sequences x 8 heads runs 17 CTAs per (sequence, head); a decode step runs 1.
  const int64_t new_tokens =
      p.max_new_tokens > 0 ? min64(p.max_new_tokens, a.capacity) : a.capacity;
  const int64_t new_blocks = new_tokens / layout.min_block_size() + 1;
  const int64_t per_cta = kWarps * (256 / g.head_dim);
  const int64_t cap = max64(1, ceil_div(8 * static_cast<int64_t>(multiprocessor_count()),
                                        static_cast<int64_t>(g.batch) * g.num_kv_heads));
  const int grid_x = static_cast<int>(clamp64(ceil_div(new_blocks, per_cta), 1, cap));
  const dim3 grid(grid_x, g.num_kv_heads, g.batch);
  const cudaStream_t stream = to_stream(p.stream);
  ABSPARSE_DISPATCH_HEAD_DIM(fn, g.head_dim, kDim,
                             [&] { update_kernel<kDim><<<grid, kThreads, 0, stream>>>(a); });
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace absparse::cuda

namespace absparse {
void update_centroids_cuda(const UpdateCentroidsParams& p) { cuda::run_update_centroids(p); }
}  // namespace absparse

// update_centroids on the GPU: the summaries of the blocks that become complete in tokens
// [start_b, L_b) of each sequence (docs/decode.md), bit-identical to update_centroids_cpu.
//
// Every lane owns 8 consecutive channels of a key row (one 16-byte load per row), so D / 8 lanes
// cover a row. The CPU reduces in float64 in token order: the sums (mean, the cuboid's deviation)
// are kept in float64 and in that order here; max / min of the row values are exact in float32
// with the CPU's rule (hi = hi < x ? x : hi), which also lets them run over row ranges in
// parallel: a fold of each range from a -inf / +inf start, the ranges combined in order with the
// same rule, is the CPU's sequential result (the first of equal values, NaN rows skipped) except
// when row 0 is NaN, where the CPU keeps NaN: that case is restored at the end.
//
// Two kernels, 4 warps per CTA:
//   update_kernel<D> (a prefill: many blocks): grid (X, Hk, B); a warp summarizes 256 / D blocks
//     at once, 8 rows loaded before they are reduced (8 loads in flight per lane, many warps per
//     multiprocessor); warps stride over the blocks [start_b // bs_h, L_b // bs_h) of their
//     (sequence, head). X: enough CTAs to cover max_new_tokens (a parallelism hint: the loop
//     covers any number of blocks), capped so that the whole grid is a few waves.
//   update_step_kernel<D> (a decode step: at most one block per (sequence, head) completes):
//     grid (1, Hk, B); the CTA's 128 threads split the block's rows into 128 / (D / 8) ranges
//     (8 rows each for 64-token blocks at D 128: one round trip to memory instead of bs / 8
//     dependent ones, and 1 / 8 of the serial max / min work per lane), then the first D / 8
//     threads combine the ranges, add the float64 sums in token order (mean, cuboid: from the
//     rows the ranges left in shared memory when they fit, 32 KiB) and store.
#include "common.cuh"

namespace absparse::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowBatch = 8;  // key rows loaded before they are reduced
constexpr int kStageUnits = 2048;  // step kernel: 16-byte row pieces kept for the sums (32 KiB)

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

// Eight 16-bit key elements as float32 (exact).
__device__ inline void unpack8(const uint4& v, bool bf16, float (&x)[8]) {
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

// The CPU's std::max / std::min on the running value and the next row: the earlier value wins
// ties and NaN rows are skipped.
__device__ inline float max_rule(float hi, float x) { return hi < x ? x : hi; }
__device__ inline float min_rule(float lo, float x) { return x < lo ? x : lo; }

// Where block j of (b, h) lives: its page (-1 for an entry outside [0, num_pages): nothing is
// written) and the element offset of its first key row's channel c0.
struct BlockAt {
  int64_t page, in_page, base;
};
__device__ inline BlockAt block_at(const UpdateArgs& a, const int32_t* pages, int h, int log2_bs,
                                   int64_t j, int c0) {
  const int64_t token0 = j << log2_bs;
  int64_t page = pages[(token0 >> a.log2_page) * a.page_table_stride_page];
  if (page < 0 || page >= a.num_pages) page = -1;
  const int64_t in_page = token0 & ((int64_t{1} << a.log2_page) - 1);
  const int64_t base =
      page < 0 ? 0 : page * a.k_stride_page + in_page * a.k_stride_token + h * a.k_stride_head + c0;
  return {page, in_page, base};
}

// Visits rows [r0, r1) of a block in order, kRowBatch loads in flight: f(t, x[8]) with this
// lane's 8 channels of row t as float32. Inactive lanes load nothing and visit zeros. With a
// `stage`, row t's 16 bytes are also stored at stage[t * stage_stride].
template <class F>
__device__ inline void visit_rows(const UpdateArgs& a, int64_t base, bool active, int r0, int r1,
                                  F&& f, uint4* stage = nullptr, int stage_stride = 0) {
  const uint4* kbase = static_cast<const uint4*>(a.k);
  for (int t0 = r0; t0 < r1; t0 += kRowBatch) {
    uint4 rows[kRowBatch];
#pragma unroll
    for (int r = 0; r < kRowBatch; ++r) {
      rows[r] = make_uint4(0, 0, 0, 0);
      if (active && t0 + r < r1) rows[r] = __ldg(kbase + (base + (t0 + r) * a.k_stride_token) / 8);
    }
#pragma unroll
    for (int r = 0; r < kRowBatch; ++r) {
      if (t0 + r >= r1) break;
      if (stage != nullptr) stage[(t0 + r) * stage_stride] = rows[r];
      float x[8];
      unpack8(rows[r], a.bf16, x);
      f(t0 + r, x);
    }
  }
}

// The rows [0, bs) of a block, visited in token order: from memory (visit_rows) or, `stage`
// set, from the copy the step kernel's threads left in shared memory.
struct BlockRows {
  const UpdateArgs& a;
  int64_t base;
  bool active;
  int bs;
  const uint4* stage;  // row t at stage[t * stage_stride], or null
  int stage_stride;
  template <class F>
  __device__ void visit(F&& f) const {
    if (stage == nullptr) {
      visit_rows(a, base, active, 0, bs, f);
      return;
    }
#pragma unroll 4
    for (int t = 0; t < bs; ++t) {
      float x[8];
      unpack8(stage[t * stage_stride], a.bf16, x);
      f(t, x);
    }
  }
};

// Sum over the block's rows in token order, float64 (the mean's sum; the cuboid's deviation from
// `centre` when kDeviation).
template <bool kDeviation>
__device__ inline void row_sums(const BlockRows& rows, const double (&centre)[8],
                                double (&sum)[8]) {
#pragma unroll
  for (int c = 0; c < 8; ++c) sum[c] = 0.0;
  rows.visit([&](int, const float (&x)[8]) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      sum[c] += kDeviation ? fabs(static_cast<double>(x[c]) - centre[c]) : static_cast<double>(x[c]);
    }
  });
}

// The summary vectors from a block's max / min (minmax, cuboid) or sum (mean) per channel, the
// cuboid's deviation computed here (a second pass over the rows).
__device__ inline void summary_vectors(const BlockRows& rows, const float (&hi)[8],
                                       const float (&lo)[8], const double (&sum)[8],
                                       float (&vec)[2][8]) {
  const UpdateArgs& a = rows.a;
  const int bs = rows.bs;
  if (a.kind == static_cast<int>(SummaryKind::kCuboid)) {
    double centre[8], dev[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) centre[c] = (static_cast<double>(hi[c]) + lo[c]) / 2.0;
    row_sums<true>(rows, centre, dev);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const double radius = dev[c] / bs;
      vec[0][c] = static_cast<float>(centre[c] + radius);
      vec[1][c] = static_cast<float>(centre[c] - radius);
    }
  } else if (a.kind == static_cast<int>(SummaryKind::kMean)) {
#pragma unroll
    for (int c = 0; c < 8; ++c) vec[0][c] = vec[1][c] = static_cast<float>(sum[c] / bs);
  } else {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      vec[0][c] = hi[c];
      vec[1][c] = lo[c];
    }
  }
}

// Quantizes and stores the summary vectors of one block (quantize_vector of
// cpp/src/quantize.cpp): this lane's channels [c0, c0 + 8). Called by every lane of the warp
// (the per-vector formats' max |value| is a shuffle over the kLanesPerBlock lanes of a block);
// lanes with !active write nothing.
template <int kLanesPerBlock>
__device__ void store_vectors(const UpdateArgs& a, int h, int64_t page, int64_t slot, int c0,
                              const float (&vec)[2][8], bool active) {
  const SummaryFormat format = static_cast<SummaryFormat>(a.format);
  const int num_vectors = a.kind == static_cast<int>(SummaryKind::kMean) ? 1 : 2;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (r == num_vectors) break;
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
        uint8_t* out = static_cast<uint8_t*>(a.summaries) + at;
        if (format == SummaryFormat::kInt8c) {
#pragma unroll
          for (int c = 0; c < 8; ++c) out[c] = static_cast<uint8_t>(code[c]);
        } else {
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
  const int32_t* pages = a.page_table + b * a.page_table_stride_batch;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps * kBlocksPerWarp;

  // Warp-uniform loop; lanes whose block is past the end (or has a bad page entry) idle along,
  // so that the shuffles of the per-vector scale see every lane.
  for (int64_t j_warp = first + (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kBlocksPerWarp;
       j_warp < last; j_warp += stride) {
    const int64_t j = j_warp + sub;
    BlockAt at{-1, 0, 0};
    if (j < last) at = block_at(a, pages, h, log2_bs, j, c0);
    const bool active = at.page >= 0;  // past the end or a bad entry: no write

    // One pass over the rows in token order: max / min (float32, the CPU's rule from row 0) or
    // the float64 sum.
    float hi[8], lo[8];
    double sum[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      hi[c] = lo[c] = 0.0f;
      sum[c] = 0.0;
    }
    visit_rows(a, at.base, active, 0, bs, [&](int t, const float (&x)[8]) {
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        if (mean) {
          sum[c] += static_cast<double>(x[c]);
        } else if (t == 0) {
          hi[c] = lo[c] = x[c];
        } else {
          hi[c] = max_rule(hi[c], x[c]);
          lo[c] = min_rule(lo[c], x[c]);
        }
      }
    });
    float vec[2][8];
    summary_vectors(BlockRows{a, at.base, active, bs, nullptr, 0}, hi, lo, sum, vec);
    const int64_t slot = a.slot_offset[h] + (at.in_page >> log2_bs);
    store_vectors<kLanesPerBlock>(a, h, at.page, slot, c0, vec, active);
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    update_step_kernel(const __grid_constant__ UpdateArgs a) {
  constexpr int kLanesPerRow = D / 8;
  constexpr int kRanges = kThreads / kLanesPerRow;  // row ranges: 8 at D 128
  __shared__ float range_hi[kRanges][D], range_lo[kRanges][D];  // 8 KiB
  __shared__ uint4 stage[kStageUnits];  // the block's rows for the float64 sums: [bs][D / 8]
  const int b = blockIdx.z, h = blockIdx.y;
  const int range = threadIdx.x / kLanesPerRow, piece = threadIdx.x % kLanesPerRow;
  const int c0 = piece * 8;  // this thread's channels [c0, c0 + 8)
  const int64_t len = clamped_seq_len(a.seq_lens, a.seq_lens_stride, b, a.capacity);
  const int64_t start = clamp64(a.start_pos[b * a.start_pos_stride], 0, len);
  const int log2_bs = a.log2_block[h];
  const int bs = 1 << log2_bs;
  const bool mean = a.kind == static_cast<int>(SummaryKind::kMean);
  const bool sums = a.kind != static_cast<int>(SummaryKind::kMinMax);
  // The sums read the rows from shared memory when they fit (bs <= 128 at D 128), else again
  // from memory; either way in token order.
  const bool staged = sums && bs * kLanesPerRow <= kStageUnits;
  const int32_t* pages = a.page_table + b * a.page_table_stride_batch;
  // Rows [r0, r1) of this thread's range (empty ranges when bs < kRanges).
  const int per_range = (bs + kRanges - 1) / kRanges;
  const int r0 = min(bs, range * per_range), r1 = min(bs, r0 + per_range);

  // Usually at most one block; a larger hint than max_new_tokens = 1 runs the other kernel.
  for (int64_t j = start >> log2_bs; j < (len >> log2_bs); ++j) {
    const BlockAt at = block_at(a, pages, h, log2_bs, j, c0);
    if (at.page < 0) continue;  // a bad page entry: nothing is written (uniform over the CTA)

    float hi[8], lo[8];
    float row0[8];  // range 0: row 0 (a NaN there is the CPU's max and min)
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      hi[c] = -INFINITY;
      lo[c] = INFINITY;
      row0[c] = 0.0f;
    }
    if (!mean || staged) visit_rows(a, at.base, true, r0, r1, [&](int t, const float (&x)[8]) {
      if (mean) return;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        if (t == 0) row0[c] = x[c];
        hi[c] = max_rule(hi[c], x[c]);
        lo[c] = min_rule(lo[c], x[c]);
      }
    }, staged ? stage + piece : nullptr, kLanesPerRow);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      range_hi[range][c0 + c] = hi[c];
      range_lo[range][c0 + c] = lo[c];
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // warp 0; lanes of range >= 1 idle along for the shuffles
      const bool writer = range == 0;
      const BlockRows rows{a, at.base, writer, bs, staged ? stage + piece : nullptr, kLanesPerRow};
      double sum[8];
      if (mean) {
        const double none[8] = {};
        row_sums<false>(rows, none, sum);
      } else {
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          sum[c] = 0.0;
          for (int g = 1; g < kRanges; ++g) {  // ranges in token order, the same rule
            hi[c] = max_rule(hi[c], range_hi[g][c0 + c]);
            lo[c] = min_rule(lo[c], range_lo[g][c0 + c]);
          }
          if (isnan(row0[c])) hi[c] = lo[c] = row0[c];
        }
      }
      float vec[2][8];
      summary_vectors(rows, hi, lo, sum, vec);
      const int64_t slot = a.slot_offset[h] + (at.in_page >> log2_bs);
      store_vectors<kLanesPerRow>(a, h, at.page, slot, c0, vec, writer);
    }
    __syncthreads();  // the ranges' buffers and the stage are reused by the next block
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
  // The blocks max_new_tokens can complete per (sequence, head) with the smallest block size (+1:
  // a block completes when its last token arrives). One (a decode step): the step kernel, one
  // CTA per (sequence, head). More: grid X is those blocks over the blocks one CTA summarizes at
  // once, capped at ~8 CTAs per multiprocessor over the whole grid. Example: a 128K prefill of
  // 8 sequences x 8 heads runs 17 CTAs per (sequence, head).
  const int64_t new_tokens =
      p.max_new_tokens > 0 ? min64(p.max_new_tokens, a.capacity) : a.capacity;
  const int64_t new_blocks = new_tokens / layout.min_block_size() + 1;
  const cudaStream_t stream = to_stream(p.stream);
  if (new_blocks == 1) {
    const dim3 grid(1, g.num_kv_heads, g.batch);
    ABSPARSE_DISPATCH_HEAD_DIM(fn, g.head_dim, kDim, [&] {
      update_step_kernel<kDim><<<grid, kThreads, 0, stream>>>(a);
    });
  } else {
    const int64_t per_cta = kWarps * (256 / g.head_dim);
    const int64_t cap = max64(1, ceil_div(8 * static_cast<int64_t>(multiprocessor_count()),
                                          static_cast<int64_t>(g.batch) * g.num_kv_heads));
    const int grid_x = static_cast<int>(clamp64(ceil_div(new_blocks, per_cta), 1, cap));
    const dim3 grid(grid_x, g.num_kv_heads, g.batch);
    ABSPARSE_DISPATCH_HEAD_DIM(fn, g.head_dim, kDim, [&] {
      update_kernel<kDim><<<grid, kThreads, 0, stream>>>(a);
    });
  }
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace absparse::cuda

namespace absparse {
void update_centroids_cuda(const UpdateCentroidsParams& p) { cuda::run_update_centroids(p); }
}  // namespace absparse

// select_blocks on the GPU (docs/decode.md, "Selection"): two launches on the caller's stream.
//
// 1. score_kernel, grid (ceil(n_cap / NB), Hk, B), 256 threads: a CTA takes NB consecutive
//    candidate blocks of one (sequence, KV head), stages their stored summaries in shared memory
//    (16-byte loads when the summary cache is 16-byte aligned, else bytes), then each warp scores
//    one block at a time: lane l owns channels [l D/32, (l+1) D/32) and holds the G queries of the
//    group for them in registers (q * channel_scale for int8c/int4c), dequantizes its channels
//    (box kinds: mid = (hi+lo)/2, rad = |hi-lo|/2, so max(q hi, q lo) = q mid + |q| rad), and the
//    G dot products are reduced across lanes with a transposed butterfly (G - 1 + 5 - log2 G
//    shuffles for G values instead of 5 G). It writes float32 scores to the workspace
//    [B, Hk, rows, n_cap] indexed by block: rows = 1 (max over the group, NaN -> -inf) or G + 1
//    (the G block logits, then the softmax_sum score). NB = clamp(16 KiB / block bytes, 16, 128).
// 2. topk_kernel, grid (B, Hk), 512 threads, one CTA per (sequence, head): softmax_sum scores
//    (per-head max and sum by block reductions in a fixed order), then an exact radix select on
//    order-preserving uint32 keys of the float32 scores (4 passes of 8 bits; keys cached in shared
//    memory up to 8192 candidates), then an ordered compaction (two block scans) that writes the
//    selected candidates ascending, ties at the threshold to the lower block index; plus the sink
//    and local blocks, -1 padding and the count.
// Both kernels recompute the plan (device_plan, the CPU's arithmetic) from seq_lens on the device:
// CTAs of (b, h) with nothing to score exit at once (k = 0 or k = all candidates).
#include "common.cuh"

namespace absparse::cuda {
namespace {

constexpr int kScoreWarps = 8;
constexpr int kScoreThreads = 32 * kScoreWarps;
constexpr int kTopkWarps = 16;
constexpr int kTopkThreads = 32 * kTopkWarps;
constexpr int kKeyCache = 8192;  // candidates whose keys stay in shared memory between passes

struct SelectArgs {
  const void* q;
  int64_t q_stride_batch, q_stride_head;
  bool q_bf16;
  const uint8_t* summaries;  // byte strides below
  int64_t s_stride_page, s_stride_slot, s_stride_vector;
  const float* scales;
  int64_t sc_stride_page, sc_stride_slot, sc_stride_vector;
  const float* channel_scale;
  const float* channel_zero;
  int64_t channel_stride_head;
  int format;        // SummaryFormat
  int num_vectors;   // R
  int vector_bytes;  // W * element size, a multiple of 16
  bool aligned16;    // summaries data and strides 16-byte aligned
  const int32_t* seq_lens;
  int64_t seq_lens_stride;
  const int32_t* page_table;
  int64_t page_table_stride_batch, page_table_stride_page;
  int64_t num_pages;
  int64_t capacity;  // max_pages * P
  int log2_page;
  int num_kv_heads, group;
  int64_t budget_tokens;
  double budget_fraction;
  int64_t sink_tokens, local_tokens;
  bool softmax_sum;
  float scale;
  float* ws;          // [B, Hk, rows, ws_row]
  int64_t ws_row;     // n_cap
  int ws_rows;        // 1 or G + 1
  int blocks_per_cta; // NB
  int32_t* block_indices;
  int64_t bi_stride_batch, bi_stride_head, bi_stride_slot;
  int32_t max_blocks;
  int32_t* block_counts;
  int64_t bc_stride_batch, bc_stride_head;
  uint8_t log2_block[kCudaMaxKvHeads];
  int32_t slot_offset[kCudaMaxKvHeads];
};

__device__ inline DevicePlan plan_for(const SelectArgs& a, int b, int h) {
  const int64_t len = clamped_seq_len(a.seq_lens, a.seq_lens_stride, b, a.capacity);
  return device_plan(len, a.log2_block[h], a.budget_tokens, a.budget_fraction, a.sink_tokens,
                     a.local_tokens);
}

// ------------------------------------------------------------------------------------------------
// Scoring
// ------------------------------------------------------------------------------------------------

// Channels [c0, c0 + CPL) of one stored vector, dequantized to float32 (per-channel formats:
// the raw codes; their scale and zero are folded into the query).
template <int CPL>
__device__ inline void decode_channels(int format, const uint8_t* vec, int c0, float vscale,
                                       float (&out)[CPL]) {
  switch (static_cast<SummaryFormat>(format)) {
    case SummaryFormat::kFp32:
#pragma unroll
      for (int c = 0; c < CPL; ++c) out[c] = reinterpret_cast<const float*>(vec)[c0 + c];
      break;
    case SummaryFormat::kFp16:
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        out[c] = __half2float(reinterpret_cast<const __half*>(vec)[c0 + c]);
      }
      break;
    case SummaryFormat::kBf16:
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        out[c] = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(vec)[c0 + c]);
      }
      break;
    case SummaryFormat::kInt8:
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        out[c] = static_cast<float>(reinterpret_cast<const int8_t*>(vec)[c0 + c]) * vscale;
      }
      break;
    case SummaryFormat::kInt4:
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        const int byte = vec[(c0 + c) >> 1];
        const int nibble = ((c0 + c) & 1) ? byte >> 4 : byte & 0xF;
        out[c] = static_cast<float>((nibble ^ 8) - 8) * vscale;  // two's complement
      }
      break;
    case SummaryFormat::kInt8c:
#pragma unroll
      for (int c = 0; c < CPL; ++c) out[c] = static_cast<float>(vec[c0 + c]);
      break;
    case SummaryFormat::kInt4c:
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        const int byte = vec[(c0 + c) >> 1];
        out[c] = static_cast<float>(((c0 + c) & 1) ? byte >> 4 : byte & 0xF);
      }
      break;
  }
}

// Transposed butterfly over the lanes of a warp: N values per lane in, and after it lane l holds
// the warp-wide sum of value index l >> (5 - log2 N) (N a power of two <= 32). Each step sends
// half of the remaining values, so N values cost N - 1 + 5 - log2 N shuffles in all.
template <int N, int kOffset>
struct TransposeReduce {
  template <int M>
  __device__ static void run(float (&v)[M], int lane) {
    constexpr int kHalf = N / 2;
    const bool upper = (lane & kOffset) != 0;
#pragma unroll
    for (int k = 0; k < kHalf; ++k) {
      const float send = upper ? v[k] : v[k + kHalf];
      const float keep = upper ? v[k + kHalf] : v[k];
      v[k] = keep + __shfl_xor_sync(kFullMask, send, kOffset);
    }
    TransposeReduce<kHalf, kOffset / 2>::run(v, lane);
  }
};
template <int kOffset>
struct TransposeReduce<1, kOffset> {
  template <int M>
  __device__ static void run(float (&v)[M], int) {
#pragma unroll
    for (int o = kOffset; o > 0; o >>= 1) v[0] += __shfl_xor_sync(kFullMask, v[0], o);
  }
};

// Scores of NB candidate blocks of one (sequence, head). kMaxG: the group padded to 4, 8 or 16.
// Two CTAs per SM (<= 128 registers) except where the queries alone need more registers.
template <int D, int kMaxG>
__global__ void __launch_bounds__(kScoreThreads, D * kMaxG >= 2048 ? 1 : 2)
    score_kernel(const __grid_constant__ SelectArgs a) {
  constexpr int kCpl = D / 32;  // channels per lane
  constexpr int kLanesPerHead = 32 / kMaxG;
  extern __shared__ __align__(16) unsigned char smem[];
  const int b = blockIdx.z, h = blockIdx.y;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const DevicePlan plan = plan_for(a, b, h);
  if (plan.num_selected == 0 || plan.num_selected == plan.num_candidates) return;
  const int nb_max = a.blocks_per_cta;
  const int64_t j0 = plan.sink_blocks + static_cast<int64_t>(blockIdx.x) * nb_max;
  if (j0 >= plan.local_begin) return;
  const int nb = static_cast<int>(min64(nb_max, plan.local_begin - j0));
  const int num_vectors = a.num_vectors;
  const int vbytes = a.vector_bytes;
  const int log2_bs = a.log2_block[h];
  const bool vector_scales = a.scales != nullptr;
  const bool per_channel = a.channel_scale != nullptr;

  uint8_t* raw = smem;                                                  // [nb][R][vbytes]
  int64_t* base =                                                        // [nb]
      reinterpret_cast<int64_t*>(smem + static_cast<size_t>(nb_max) * num_vectors * vbytes);
  float* vscale = reinterpret_cast<float*>(base + nb_max);              // [nb][2]

  // Where each block's summary lives (byte offset of vector 0; -1 for a bad page entry).
  const int32_t* pages = a.page_table + b * a.page_table_stride_batch;
  for (int jj = tid; jj < nb; jj += kScoreThreads) {
    const int64_t token0 = (j0 + jj) << log2_bs;
    const int64_t page = pages[(token0 >> a.log2_page) * a.page_table_stride_page];
    const bool ok = page >= 0 && page < a.num_pages;
    const int64_t slot =
        a.slot_offset[h] + ((token0 & ((int64_t{1} << a.log2_page) - 1)) >> log2_bs);
    base[jj] = ok ? page * a.s_stride_page + slot * a.s_stride_slot : -1;
    if (vector_scales) {
      for (int r = 0; r < num_vectors; ++r) {
        vscale[2 * jj + r] = ok ? a.scales[page * a.sc_stride_page + slot * a.sc_stride_slot +
                                           r * a.sc_stride_vector]
                                : 0.0f;
      }
    }
  }
  __syncthreads();
  if (a.aligned16) {
    const int chunks = vbytes / 16;
    const int total = nb * num_vectors * chunks;
#pragma unroll 4
    for (int i = tid; i < total; i += kScoreThreads) {
      const int jj = i / (num_vectors * chunks);
      const int rem = i - jj * num_vectors * chunks;
      const int r = rem / chunks, c = rem - r * chunks;
      const int64_t at = base[jj];
      uint4 v = make_uint4(0, 0, 0, 0);
      if (at >= 0) {
        v = __ldg(
            reinterpret_cast<const uint4*>(a.summaries + at + r * a.s_stride_vector + c * 16));
      }
      const size_t dst = (static_cast<size_t>(jj) * num_vectors + r) * vbytes + c * 16;
      *reinterpret_cast<uint4*>(raw + dst) = v;
    }
  } else {
    const int total = nb * num_vectors * vbytes;
    for (int i = tid; i < total; i += kScoreThreads) {
      const int jj = i / (num_vectors * vbytes);
      const int rem = i - jj * num_vectors * vbytes;
      const int r = rem / vbytes, c = rem - r * vbytes;
      const int64_t at = base[jj];
      raw[i] = at >= 0 ? a.summaries[at + r * a.s_stride_vector + c] : 0;
    }
  }
  __syncthreads();

  // The group's queries for this lane's channels (q * scale for the per-channel formats) and
  // q . zero per head (per-channel formats), reduced like the logits. Loaded after the staging:
  // holding them across it costs ~40 registers.
  const int group = a.group;
  const int c0 = lane * kCpl;
  float qr[kMaxG][kCpl];
  float qz[kMaxG];
  const int64_t q_at = b * a.q_stride_batch + static_cast<int64_t>(h) * group * a.q_stride_head;
  const float* cscale = per_channel ? a.channel_scale + h * a.channel_stride_head : nullptr;
  const float* czero = per_channel ? a.channel_zero + h * a.channel_stride_head : nullptr;
#pragma unroll
  for (int i = 0; i < kMaxG; ++i) {
    qz[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < kCpl; ++c) {
      qr[i][c] = i < group ? load_half_as_float(a.q, q_at + i * a.q_stride_head + c0 + c, a.q_bf16)
                           : 0.0f;
      if (per_channel) {
        qz[i] = fmaf(qr[i][c], czero[c0 + c], qz[i]);
        qr[i][c] *= cscale[c0 + c];
      }
    }
  }
  TransposeReduce<kMaxG, 16>::run(qz, lane);
  const float qz_mine = qz[0];  // q . zero of head `my_head` (0 for the other formats)
  const int my_head = lane / kLanesPerHead;
  const bool box = num_vectors == 2;
  float* ws_bh = a.ws + (static_cast<int64_t>(b) * a.num_kv_heads + h) * a.ws_rows * a.ws_row;

  for (int jj = warp; jj < nb; jj += kScoreWarps) {
    const uint8_t* vec = raw + static_cast<size_t>(jj) * num_vectors * vbytes;
    float mid[kCpl], rad[kCpl];
    decode_channels<kCpl>(a.format, vec, c0, vector_scales ? vscale[2 * jj] : 0.0f, mid);
    float acc[kMaxG];
#pragma unroll
    for (int i = 0; i < kMaxG; ++i) acc[i] = 0.0f;
    if (box) {
      decode_channels<kCpl>(a.format, vec + vbytes, c0, vector_scales ? vscale[2 * jj + 1] : 0.0f,
                            rad);
#pragma unroll
      for (int c = 0; c < kCpl; ++c) {
        const float hi = fmaxf(mid[c], rad[c]), lo = fminf(mid[c], rad[c]);
        mid[c] = (hi + lo) * 0.5f;
        rad[c] = (hi - lo) * 0.5f;
      }
#pragma unroll
      for (int c = 0; c < kCpl; ++c) {
#pragma unroll
        for (int i = 0; i < kMaxG; ++i) {
          acc[i] = fmaf(qr[i][c], mid[c], acc[i]);
          acc[i] = fmaf(fabsf(qr[i][c]), rad[c], acc[i]);
        }
      }
    } else {
#pragma unroll
      for (int c = 0; c < kCpl; ++c) {
#pragma unroll
        for (int i = 0; i < kMaxG; ++i) acc[i] = fmaf(qr[i][c], mid[c], acc[i]);
      }
    }
    TransposeReduce<kMaxG, 16>::run(acc, lane);
    float logit = (acc[0] + qz_mine) * a.scale;
    if (base[jj] < 0) logit = NAN;  // bad page-table entry: ranked last
    const int64_t j = j0 + jj;
    if (!a.softmax_sum) {
      const float best = warp_max(my_head < group ? rank_value(logit) : -INFINITY);
      if (lane == 0) ws_bh[j] = best;
    } else if (my_head < group && lane % kLanesPerHead == 0) {
      ws_bh[my_head * a.ws_row + j] = logit;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Top-k
// ------------------------------------------------------------------------------------------------

struct TopkShared {
  uint32_t keys[kKeyCache];
  uint32_t hist[256];
  int32_t warp_int[kTopkWarps];
  float warp_float[kTopkWarps];
  uint32_t digit, above;
};

// Order-preserving key of a score: larger float -> larger key; NaN ranks as -inf, -0 as +0.
__device__ inline uint32_t score_key(float x) {
  x = rank_value(x);
  if (x == 0.0f) x = 0.0f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of v over the block's threads (in thread order); *total = the sum.
__device__ int block_exclusive_scan(int v, int* total, TopkShared& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) s.warp_int[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kTopkWarps ? s.warp_int[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += y;
    }
    if (lane < kTopkWarps) s.warp_int[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int result = (warp > 0 ? s.warp_int[warp - 1] : 0) + x - v;
  *total = s.warp_int[kTopkWarps - 1];
  __syncthreads();
  return result;
}

// Block-wide max (fmaxf) or sum of one float per thread, in a fixed order.
template <bool kMax>
__device__ float block_reduce(float v, TopkShared& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) s.warp_float[warp] = v;
  __syncthreads();
  float w = lane < kTopkWarps ? s.warp_float[lane] : (kMax ? -INFINITY : 0.0f);
  w = kMax ? warp_max(w) : warp_sum(w);
  __syncthreads();
  return w;
}

__global__ void __launch_bounds__(kTopkThreads) topk_kernel(const __grid_constant__ SelectArgs a) {
  __shared__ TopkShared s;
  const int b = blockIdx.x, h = blockIdx.y;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const DevicePlan plan = plan_for(a, b, h);
  int32_t* out = a.block_indices + b * a.bi_stride_batch + h * a.bi_stride_head;
  const int64_t max_blocks = a.max_blocks;
  auto put = [&](int64_t pos, int64_t block) {
    if (pos < max_blocks) out[pos * a.bi_stride_slot] = static_cast<int32_t>(block);
  };
  const int64_t sink = plan.sink_blocks, k = plan.num_selected, nc = plan.num_candidates;
  for (int64_t j = tid; j < sink; j += kTopkThreads) put(j, j);
  for (int64_t j = plan.local_begin + tid; j < plan.num_blocks; j += kTopkThreads) {
    put(sink + k + (j - plan.local_begin), j);
  }
  if (k == nc) {
    for (int64_t c = tid; c < nc; c += kTopkThreads) put(sink + c, sink + c);
  } else if (k > 0) {
    float* row =  // the scores of candidates sink, sink + 1, ...
        a.ws + (static_cast<int64_t>(b) * a.num_kv_heads + h) * a.ws_rows * a.ws_row + sink;
    if (a.softmax_sum) {
      // score[c] = sum over heads i of softmax_c(logit_i) (heads without a finite logit add 0).
      float* score = row + static_cast<int64_t>(a.group) * a.ws_row;
      for (int64_t c = tid; c < nc; c += kTopkThreads) score[c] = 0.0f;
      for (int i = 0; i < a.group; ++i) {
        const float* logit = row + static_cast<int64_t>(i) * a.ws_row;
        float peak = -INFINITY;
        for (int64_t c = tid; c < nc; c += kTopkThreads) peak = fmaxf(peak, rank_value(logit[c]));
        peak = block_reduce<true>(peak, s);
        if (!isfinite(peak)) continue;  // uniform across the block
        float total = 0.0f;
        for (int64_t c = tid; c < nc; c += kTopkThreads) total += expf(rank_value(logit[c]) - peak);
        total = block_reduce<false>(total, s);
        for (int64_t c = tid; c < nc; c += kTopkThreads) {
          score[c] += expf(rank_value(logit[c]) - peak) / total;
        }
      }
      __syncthreads();
      row = score;
    }
    // Radix select: the key T of the k-th largest score, and how many scores equal to T
    // (the lowest-index ones) complete the k.
    const bool cached = nc <= kKeyCache;
    uint32_t prefix = 0, mask = 0;
    int64_t want = k;  // rank of the threshold among the keys matching prefix
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      if (tid < 256) s.hist[tid] = 0;
      __syncthreads();
      for (int64_t c = tid; c < nc; c += kTopkThreads) {
        uint32_t key;
        if (pass == 0) {
          key = score_key(row[c]);
          if (cached) s.keys[c] = key;
        } else {
          key = cached ? s.keys[c] : score_key(row[c]);
        }
        if ((key & mask) == prefix) atomicAdd(&s.hist[(key >> shift) & 0xFF], 1u);
      }
      __syncthreads();
      if (warp == 0) {  // lane l holds digits 255 - 8l - i, i = 0..7 (descending)
        uint32_t cnt[8], mine = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          cnt[i] = s.hist[255 - 8 * lane - i];
          mine += cnt[i];
        }
        uint32_t incl = mine;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const uint32_t y = __shfl_up_sync(kFullMask, incl, o);
          if (lane >= o) incl += y;
        }
        uint32_t run = incl - mine;
        if (static_cast<int64_t>(run) < want && want <= static_cast<int64_t>(incl)) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (static_cast<int64_t>(run + cnt[i]) >= want) {
              s.digit = 255 - 8 * lane - i;
              s.above = run;
              break;
            }
            run += cnt[i];
          }
        }
      }
      __syncthreads();
      prefix |= s.digit << shift;
      mask |= 0xFFu << shift;
      want -= s.above;
      __syncthreads();
    }
    const uint32_t threshold = prefix;
    const int64_t take_equal = want;  // >= 1
    // Ordered compaction: position of each selected candidate among the selected.
    int64_t equal_before = 0, selected_before = 0;
    for (int64_t base = 0; base < nc && selected_before < k; base += kTopkThreads) {
      const int64_t c = base + tid;
      const uint32_t key = c < nc ? (cached ? s.keys[c] : score_key(row[c])) : 0;
      const bool greater = c < nc && key > threshold;
      const bool equal = c < nc && key == threshold;
      int equal_total = 0, selected_total = 0;
      const int equal_rank = block_exclusive_scan(equal ? 1 : 0, &equal_total, s);
      const bool take = greater || (equal && equal_before + equal_rank < take_equal);
      const int pos = block_exclusive_scan(take ? 1 : 0, &selected_total, s);
      if (take) put(sink + selected_before + pos, sink + c);
      equal_before += equal_total;
      selected_before += selected_total;
    }
  }
  const int64_t count = plan.count();
  for (int64_t pos = count + tid; pos < max_blocks; pos += kTopkThreads) {
    out[pos * a.bi_stride_slot] = -1;
  }
  if (tid == 0) {
    a.block_counts[b * a.bc_stride_batch + h * a.bc_stride_head] =
        static_cast<int32_t>(min64(count, max_blocks));
  }
}

template <int D, int kMaxG>
void launch_score(const SelectArgs& a, dim3 grid, size_t smem, cudaStream_t stream) {
  score_kernel<D, kMaxG><<<grid, kScoreThreads, smem, stream>>>(a);
}

void check_select(const char* fn, const SelectBlocksParams& p) {
  const BatchGeometry& g = p.geometry;
  const LayerLayout& layout = check_cuda_layout(fn, p.layout, g, "layout");
  ABSPARSE_CHECK_ARG(p.num_q_heads > 0 && p.num_q_heads % g.num_kv_heads == 0, fn,
                     "q: expected a number of query heads that is a positive multiple of the ",
                     g.num_kv_heads, " KV heads, got ", p.num_q_heads);
  const int group = p.num_q_heads / g.num_kv_heads;
  ABSPARSE_CHECK_ARG(group <= kCudaMaxGroup, fn, "q: the CUDA kernels support up to ",
                     kCudaMaxGroup, " query heads per KV head, got ", group);
  ABSPARSE_CHECK_ARG(g.head_dim == 64 || g.head_dim == 128 || g.head_dim == 256, fn,
                     "head_dim: the CUDA kernels support 64, 128 and 256, got ", g.head_dim);
  ABSPARSE_CHECK_ARG(p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16, fn,
                     "q: the CUDA kernels support float16 and bfloat16 (float32 runs on the CPU "
                     "only), got ", dtype_name(p.dtype));
  ABSPARSE_CHECK_ARG(g.batch >= 0 && g.batch <= 65535, fn,
                     "batch: the CUDA kernels support 0 to 65535 sequences, got ", g.batch);
  ABSPARSE_CHECK_ARG(g.max_pages >= 0 && g.num_pages >= 0, fn,
                     "max_pages, num_pages: expected >= 0, got ", g.max_pages, ", ", g.num_pages);
  ABSPARSE_CHECK_ARG(std::isfinite(p.scale), fn, "scale: expected a finite value, got ", p.scale);
  if (p.budget_fraction != 0.0) {
    ABSPARSE_CHECK_ARG(p.budget_fraction > 0.0 && p.budget_fraction < 1.0, fn,
                       "token_budget: a fractional budget must lie in (0, 1), got ",
                       p.budget_fraction);
  } else {
    ABSPARSE_CHECK_ARG(p.budget_tokens >= 0, fn, "token_budget: expected a token count >= 0, got ",
                       p.budget_tokens);
  }
  ABSPARSE_CHECK_ARG(p.sink_tokens >= 0, fn, "sink_tokens: expected >= 0, got ", p.sink_tokens);
  ABSPARSE_CHECK_ARG(p.local_tokens >= 0, fn, "local_tokens: expected >= 0, got ", p.local_tokens);
  ABSPARSE_CHECK_ARG(p.group_reduce == GroupReduce::kMax ||
                         p.group_reduce == GroupReduce::kSoftmaxSum,
                     fn, "group_reduce: expected max or softmax_sum, got ",
                     static_cast<int>(p.group_reduce));
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
  const int64_t bound = select_blocks_capacity_bound(p);
  ABSPARSE_CHECK_ARG(p.max_blocks >= bound, fn, "max_blocks: on CUDA tensors the capacity must ",
                     "hold the most blocks any length the page table allows can need with this ",
                     "budget (seq_lens are not read on the host), expected >= ", bound, ", got ",
                     p.max_blocks);
}

int64_t capacity_blocks(const SelectBlocksParams& p) {
  const int64_t capacity = static_cast<int64_t>(p.geometry.max_pages) * p.geometry.page_size;
  return capacity / p.layout->min_block_size();
}

}  // namespace

void run_select_blocks(const SelectBlocksParams& p, void* workspace) {
  const char* fn = "select_blocks";
  check_select(fn, p);
  const BatchGeometry& g = p.geometry;
  const LayerLayout& layout = *p.layout;
  if (g.batch == 0) return;
  const size_t need = select_blocks_workspace_size(p);
  ABSPARSE_CHECK_ARG(need == 0 || workspace != nullptr, fn, "workspace: expected ", need,
                     " bytes (select_blocks_workspace_size), got none");
  const int group = p.num_q_heads / g.num_kv_heads;
  const SummaryFormat format = layout.format();
  const int esize = dtype_size(summary_dtype(format));

  SelectArgs a{};
  a.q = p.q;
  a.q_stride_batch = p.q_stride_batch;
  a.q_stride_head = p.q_stride_head;
  a.q_bf16 = p.dtype == DType::kBFloat16;
  a.summaries = static_cast<const uint8_t*>(p.summaries.data);
  a.s_stride_page = p.summaries.stride_page * esize;
  a.s_stride_slot = p.summaries.stride_slot * esize;
  a.s_stride_vector = p.summaries.stride_vector * esize;
  a.scales = format_has_vector_scales(format) ? p.summaries.scales : nullptr;
  a.sc_stride_page = p.summaries.scales_stride_page;
  a.sc_stride_slot = p.summaries.scales_stride_slot;
  a.sc_stride_vector = p.summaries.scales_stride_vector;
  a.channel_scale = format_is_per_channel(format) ? p.summaries.channel_scale : nullptr;
  a.channel_zero = format_is_per_channel(format) ? p.summaries.channel_zero : nullptr;
  a.channel_stride_head = p.summaries.channel_stride_head;
  a.format = static_cast<int>(format);
  a.num_vectors = layout.summary_vectors();
  a.vector_bytes = summary_width(format, g.head_dim) * esize;
  const auto aligned = [](int64_t x) { return x % 16 == 0; };
  a.aligned16 = reinterpret_cast<uintptr_t>(p.summaries.data) % 16 == 0 &&
                aligned(a.s_stride_page) && aligned(a.s_stride_slot) && aligned(a.s_stride_vector);
  a.seq_lens = g.seq_lens;
  a.seq_lens_stride = g.seq_lens_stride;
  a.page_table = g.page_table;
  a.page_table_stride_batch = g.page_table_stride_batch;
  a.page_table_stride_page = g.page_table_stride_page;
  a.num_pages = g.num_pages;
  a.capacity = static_cast<int64_t>(g.max_pages) * g.page_size;
  a.log2_page = log2_exact(g.page_size);
  a.num_kv_heads = g.num_kv_heads;
  a.group = group;
  a.budget_tokens = p.budget_tokens;
  a.budget_fraction = p.budget_fraction;
  a.sink_tokens = p.sink_tokens;
  a.local_tokens = p.local_tokens;
  a.softmax_sum = p.group_reduce == GroupReduce::kSoftmaxSum;
  a.scale = static_cast<float>(p.scale);
  a.ws = static_cast<float*>(workspace);
  a.ws_row = capacity_blocks(p);
  a.ws_rows = a.softmax_sum ? group + 1 : 1;
  const int block_bytes = a.num_vectors * a.vector_bytes;
  a.blocks_per_cta = static_cast<int>(clamp64(16384 / block_bytes, 16, 128));
  a.block_indices = p.block_indices;
  a.bi_stride_batch = p.block_indices_stride_batch;
  a.bi_stride_head = p.block_indices_stride_head;
  a.bi_stride_slot = p.block_indices_stride_slot;
  a.max_blocks = p.max_blocks;
  a.block_counts = p.block_counts;
  a.bc_stride_batch = p.block_counts_stride_batch;
  a.bc_stride_head = p.block_counts_stride_head;
  for (int h = 0; h < g.num_kv_heads; ++h) {
    a.log2_block[h] = static_cast<uint8_t>(log2_exact(layout.block_size(h)));
    a.slot_offset[h] = layout.slot_offset(h);
  }

  const cudaStream_t stream = to_stream(p.stream);
  if (a.ws_row > 0) {
    const int64_t grid_x = ceil_div(a.ws_row, a.blocks_per_cta);
    ABSPARSE_CHECK_ARG(grid_x <= INT32_MAX, fn, "page_table: too many blocks per sequence for ",
                       "one launch (", a.ws_row, ")");
    const dim3 grid(static_cast<unsigned>(grid_x), g.num_kv_heads, g.batch);
    const size_t smem = static_cast<size_t>(a.blocks_per_cta) * (block_bytes + 8 + 8);
    ABSPARSE_DISPATCH_HEAD_DIM(fn, g.head_dim, kDim, [&] {
      if (group <= 4) {
        launch_score<kDim, 4>(a, grid, smem, stream);
      } else if (group <= 8) {
        launch_score<kDim, 8>(a, grid, smem, stream);
      } else {
        launch_score<kDim, 16>(a, grid, smem, stream);
      }
    });
    ABSPARSE_CUDA_CHECK(cudaGetLastError());
  }
  topk_kernel<<<dim3(g.batch, g.num_kv_heads), kTopkThreads, 0, stream>>>(a);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace absparse::cuda

namespace absparse {

size_t select_blocks_workspace_size(const SelectBlocksParams& p) {
  if (p.layout == nullptr || p.geometry.batch <= 0 || p.geometry.num_kv_heads <= 0 ||
      p.num_q_heads <= 0) {
    return 0;
  }
  const int64_t rows = p.group_reduce == GroupReduce::kSoftmaxSum
                           ? p.num_q_heads / p.geometry.num_kv_heads + 1
                           : 1;
  const int64_t floats = static_cast<int64_t>(p.geometry.batch) * p.geometry.num_kv_heads * rows *
                         cuda::capacity_blocks(p);
  return static_cast<size_t>(floats) * sizeof(float);
}

int64_t select_blocks_capacity_bound(const SelectBlocksParams& p) {
  const int64_t capacity = static_cast<int64_t>(p.geometry.max_pages) * p.geometry.page_size;
  const int64_t budget = p.budget_fraction > 0.0
                             ? static_cast<int64_t>(std::ceil(p.budget_fraction * capacity))
                             : p.budget_tokens;
  int64_t bound = 0;
  for (int h = 0; h < p.layout->num_kv_heads(); ++h) {
    const int64_t bs = p.layout->block_size(h);
    const auto blocks_of = [bs](int64_t tokens) { return tokens / bs + (tokens % bs != 0); };
    const int64_t kept = blocks_of(p.sink_tokens) + blocks_of(p.local_tokens);
    const int64_t most = std::min(capacity / bs, std::max(kept, budget / bs));
    bound = std::max(bound, most);
  }
  return bound;
}

void select_blocks_cuda(const SelectBlocksParams& p, void* workspace) {
  cuda::run_select_blocks(p, workspace);
}

}  // namespace absparse

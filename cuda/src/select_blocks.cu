// select_blocks on the GPU (docs/decode.md, "Selection"): one fused kernel per call (plus a memset
// of its arrival counters) on the caller's stream.
//
// One-dimensional grid, 256 threads. Each KV head h gets, per sequence, enough chunks of
// chunk_blocks candidate blocks for the longest sequence the page table can hold (capacity /
// bs_h), so heads with small blocks get more CTAs and mixed block sizes stay balanced. The CTAs
// run head by head, smallest block size first (most candidates: the longest selections start
// early and the grid ends with short ones), and within a head sequence by sequence, so that the
// chunks of one (sequence, head) run together. CTA (h, c) of sequence b:
//   1. recomputes the plan of (b, h) from seq_lens (device_plan, the CPU's arithmetic); when
//      nothing is ranked (k = 0 or k = all candidates) only chunk 0 runs, writing the list;
//   2. scores candidate blocks [sink + c NB, sink + (c+1) NB) (NB = chunk_blocks, in passes of
//      256 blocks that reuse the query side built once; each pass loads the next one's
//      page-table entries) and writes one uint32 key per block (group_reduce max: an
//      order-preserving key of the max over the group of the block logits, NaN -> -inf) or the
//      G float logits (softmax_sum) to the workspace;
//   3. signals arrival on the (b, h) counter (fence + atomic, like a split-K semaphore); the last
//      CTA to arrive selects: an exact radix select of the k largest keys over the bits below the
//      prefix all keys share (11-bit digits, shared-memory histograms, stopping as soon as the
//      threshold digit holds exactly the keys still wanted; above 16384 candidates, whose keys
//      stay in L2, a floor estimated from every 16th key first), ties to the lower block index,
//      an ordered compaction (one ballot per 32 candidates into bitmaps, two block scans per
//      16384 candidates), and writes sink ∪ selected ∪ local ascending, -1 padding and the count.
//
// Two scorers share that frame:
//   MmaScorer<D, bits, n-tiles> (16-byte aligned caches, every format except fp32 and the
//     per-vector int8 / int4 box kinds): block logits as a small tensor-core product. With c > 0
//     per channel, max(q hi, q lo) = q+ hi + q- lo (q+ = max(q, 0), q- = min(q, 0)) when
//     hi >= lo, which the monotone per-channel codes and the float formats guarantee; so the
//     logits of 16 blocks are one product codes[16 x R D] . X[R D x G] with X = (q+ c ; q- c)
//     (mean: q c). Integer codes (4 / 8 bits) run on integer tensor cores: X scaled by a power of
//     two per head to 30-bit integers (14-bit for groups above 4 heads) split into signed bytes,
//     exact int32 sums; 16-bit summaries run in their own type with X split into a high and a low
//     16-bit part (details at MmaScorer). Per-channel zero points add q . zero per head,
//     per-vector scales multiply each block's product. Lane L of a warp resolves the address of
//     block L of the warp's 32; the MMA threads take theirs by shuffles.
//   GenericScorer<D>: stages summaries in shared memory (any alignment), dequantizes to float32 per
//     lane (box kinds: mid = (hi+lo)/2, rad = |hi-lo|/2, so max(q hi, q lo) = q mid + |q| rad for
//     either order) and reduces each head's dot product over the warp.
// A logit that is not finite (a non-finite q or summary value, or float32 overflow) becomes NaN,
// ranked below every number, as on the CPU (docs/decode.md).
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

namespace absparse::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kTilesPerWarp = 2;                               // m-tiles of 16 blocks per warp
constexpr int kSubChunk = 16 * kTilesPerWarp * kWarps;  // 256 candidate blocks per scoring pass
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kKeyCache = 16384;  // candidates whose keys the selecting CTA keeps in shared memory
constexpr int kBatch = 8;         // keys per lane loaded together in the selection passes
constexpr int kCompactWords = 512;  // compaction segment: 32 x 512 candidates, 2 words per thread
// Every kSampleStride-th key estimates a floor for the radix select when the keys do not fit in
// shared memory (each pass re-reads them from L2; the floor shortens the digits). Measured on the
// H200: with the keys in shared memory (<= 16 K) the estimate costs more than it saves.
constexpr int kSampleStride = 16;
constexpr int kSampleMin = kKeyCache + 1;
constexpr int kGenericStageBytes = 32 * 1024;
// Scoring CTAs per multiprocessor that the grid is sized for: the 2 resident at once (registers
// and shared memory), so that the grid runs in one wave. Measured on the H200 against 4 (two
// waves): select 33.3 -> 28.0 us at B8/32K, 62.6 -> 58.8 at B8/128K, 60.5 -> 58.8 at B32/32K,
// batch 1 unchanged; 8 was slower (bench/results/h200_2026-12-02_s11).
constexpr int kCtasPerMultiprocessor = 2;

struct SelectArgs {
  const void* q;
  int64_t q_stride_batch, q_stride_head;
  bool q_bf16;
  const uint8_t* summaries;  // byte strides below
  int64_t s_stride_page, s_stride_slot, s_stride_vector;
  const float* scales;       // per-vector formats, else null
  int64_t sc_stride_page, sc_stride_slot, sc_stride_vector;
  const float* channel_scale;  // per-channel formats, else null
  const float* channel_zero;
  int64_t channel_stride_head;
  int format;        // SummaryFormat
  int num_vectors;   // R
  int vector_bytes;  // W * element size
  bool aligned16;    // summaries data and strides 16-byte aligned (GenericScorer staging)
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
  uint32_t* ws;        // [B, Hk, rows, ws_row]: keys (row 0, max) or G float logits + keys
  int64_t ws_row;      // capacity / min bs
  int ws_rows;         // 1 or G + 1
  uint32_t* arrivals;  // [B, Hk], zero on entry
  int32_t* block_indices;
  int64_t bi_stride_batch, bi_stride_head, bi_stride_slot;
  int32_t max_blocks;
  int32_t* block_counts;
  int64_t bc_stride_batch, bc_stride_head;
  int chunk_blocks;    // candidate blocks per CTA, a multiple of kSubChunk
  int num_chunk_ctas;  // chunk_begin[Hk]: CTAs per sequence
  // Heads in launch order (head_order[i]); the chunk CTAs of the head at position i are
  // [chunk_begin[i], chunk_begin[i + 1]) of each sequence.
  int32_t chunk_begin[kCudaMaxKvHeads + 1];
  uint8_t head_order[kCudaMaxKvHeads];
  uint8_t log2_block[kCudaMaxKvHeads];
  int32_t slot_offset[kCudaMaxKvHeads];
};

__device__ inline DevicePlan plan_for(const SelectArgs& a, int b, int h) {
  const int64_t len = clamped_seq_len(a.seq_lens, a.seq_lens_stride, b, a.capacity);
  return device_plan(len, a.log2_block[h], a.budget_tokens, a.budget_fraction, a.sink_tokens,
                     a.local_tokens);
}

__device__ inline uint32_t* ws_of(const SelectArgs& a, int b, int h) {
  return a.ws + (static_cast<int64_t>(b) * a.num_kv_heads + h) * a.ws_rows * a.ws_row;
}

// Order-preserving key of a score: larger float -> larger key; NaN ranks as -inf, -0 as +0.
__device__ inline uint32_t score_key(float x) {
  x = rank_value(x);
  if (x == 0.0f) x = 0.0f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ inline float finite_or_nan(float x) { return isfinite(x) ? x : NAN; }

// Where block j of head h of a sequence keeps its summary: page and slot, page = -1 for a
// page-table entry outside [0, num_pages).
struct SummaryAt {
  int64_t page, slot;
};
// The page-table entry of block j (as stored: not yet checked).
__device__ inline int32_t page_entry(const SelectArgs& a, const int32_t* pages, int h, int64_t j) {
  return pages[((j << a.log2_block[h]) >> a.log2_page) * a.page_table_stride_page];
}
// Block j's summary given its page-table entry.
__device__ inline SummaryAt summary_at_page(const SelectArgs& a, int h, int64_t j, int64_t page) {
  const int log2_bs = a.log2_block[h];
  const int64_t token0 = j << log2_bs;
  if (page < 0 || page >= a.num_pages) page = -1;
  const int64_t slot = a.slot_offset[h] + ((token0 & ((int64_t{1} << a.log2_page) - 1)) >> log2_bs);
  return {page, slot};
}
__device__ inline SummaryAt summary_at(const SelectArgs& a, const int32_t* pages, int h,
                                       int64_t j) {
  return summary_at_page(a, h, j, page_entry(a, pages, h, j));
}
__device__ inline int64_t byte_offset(const SelectArgs& a, SummaryAt at) {
  return at.page < 0 ? -1 : at.page * a.s_stride_page + at.slot * a.s_stride_slot;
}
__device__ inline float vector_scale(const SelectArgs& a, SummaryAt at, int r) {
  return a.scales[at.page * a.sc_stride_page + at.slot * a.sc_stride_slot +
                  r * a.sc_stride_vector];
}

// ------------------------------------------------------------------------------------------------
// Tensor-core scorer
// ------------------------------------------------------------------------------------------------

// MmaScorer<D, kBits, kNT>: kBits 4 / 8 (integer codes): m16n8k32 products of unsigned codes and
// signed query bytes with int32 sums (exact); kBits 16: the stored fp16 / bf16 values on m16n8k16
// with float32 sums. kNT n-tiles of 8 columns are held, kPlanes columns per head of the group:
//   integer codes: X (float32) becomes integers x = X 2^(kXBits - e), |x| < 2^kXBits (2^e > the
//     head's largest |X|; a power of two, so x = X exactly for every |X| >= 2^(e - 7) at 30 bits),
//     each x split into kPlanes balanced signed bytes x = sum_p x_p 256^p, one column each; a
//     head's dot product is sum_p acc_p 256^p (each acc_p exact, combined in float32) times
//     2^(e - kXBits). kNT = 2 for groups of up to 4 heads (4 planes, 30-bit x; column 2 head +
//     plane % 2 of n-tile plane / 2, so that one thread holds all 4 planes of a head), else 4
//     (2 planes, 14-bit x; column 2 head + plane over the n-tiles). Signed codes (int8 / int4
//     with per-vector scales, mean kind only) are biased to unsigned by a flip of the top bit
//     and the bias times sum x is subtracted.
//   16-bit values: 2 planes, the high and the low 16-bit part of X (X = hi + lo to ~2^-16
//     relative); fp16 operands are scaled by a power of two per head so that |X| <= 1. kNT = 1 for
//     up to 4 heads, else 4.
// Codes are unpacked by masks: a 32-bit word of 4-bit codes gives its even and its odd nibbles as
// two registers of 4 bytes (the channel order this leaves is undone by the B fragments' order).
template <int D, int kBits, int kNT>
struct MmaScorer {
  static constexpr bool kInt = kBits <= 8;
  static constexpr int kPlanes = kInt && kNT == 2 ? 4 : 2;
  static constexpr int kXBits = 8 * kPlanes - 2;  // the top byte of x stays within [-65, 65]
  static constexpr int kVecBytes = D * kBits / 8;
  static constexpr int kThreadBytes = kVecBytes >= 64 ? 16 : 8;  // one load per thread-chunk
  static constexpr int kWords = kThreadBytes / 4;
  static constexpr int kChunks = kVecBytes / (4 * kThreadBytes);  // thread-chunks per vector
  // k-steps (32 channels for integer codes, 16 for 16-bit values) per thread-chunk and vector.
  static constexpr int kStepsPerChunk = kBits == 4 ? kWords : kWords / 2;
  static constexpr int kStepsPerVector = D / (kInt ? 32 : 16);
  static_assert(kChunks * kStepsPerChunk == kStepsPerVector, "chunk geometry");
  static_assert(16 * kTilesPerWarp == 32, "a lane per row of the warp's m-tiles");
  using Chunk = typename std::conditional<kThreadBytes == 16, uint4, uint2>::type;
  using Acc = typename std::conditional<kInt, int, float>::type;

  // The channels of the k slots one B-fragment lane holds in k-step j of a thread-chunk whose
  // first channel is cb, in register order (b0 .. b3 of the first register, then the second):
  //   4-bit codes: word j's even nibbles (channels cb + 8j + 2i), then its odd ones;
  //   8-bit codes: words 2j and 2j + 1 (channels cb + 8j + i, then cb + 8j + 4 + i);
  //   16-bit values: k slots 2tq, 2tq+1 (b0b1) and 2tq+8, 2tq+9 (b2b3): words 2j and 2j + 1.
  static constexpr int kSlots = kInt ? 8 : 4;
  __device__ static void step_channels(int cb, int j, int (&ch)[kSlots]) {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      if (kBits == 4) {
        ch[i] = cb + 8 * j + 2 * (i & 3) + (i >> 2);
      } else {
        ch[i] = cb + (kInt ? 8 : 4) * j + i;
      }
    }
  }
  // First channel of thread-chunk c of lane tq.
  __device__ static int chunk_channel(int c, int tq) {
    return (c * 4 + tq) * kThreadBytes * 8 / kBits;
  }

  struct Smem {
    uint2 b[2 * kStepsPerVector][kNT][32];  // B fragments per (k-step, n-tile, lane)
    float x[kCudaMaxGroup][2][D];  // q+ c, q- c (mean: q c in [0]); integer codes: then x + offset
    float qz[kCudaMaxGroup];                // q . zero per head
    float post[kCudaMaxGroup];              // undoes the operand scaling (NaN: a non-finite X)
    float bias_xsum[kCudaMaxGroup];         // signed codes: code bias times sum x (vector 0)
  };

  // Balanced base-256 digits of x: x = sum_p d_p 256^p with d_p in [-128, 127] below the top
  // plane (the top one in [-65, 65]). With y = x + kDigitOffset (128 added at every lower byte)
  // byte p of y is d_p + 128 below the top and the top byte is d_top: digit() reads the two's
  // complement byte of d_p from y without a carry chain.
  static constexpr int kDigitOffset = kPlanes == 4 ? 0x808080 : 0x80;

  // Column c (0..7) of n-tile nt holds plane `plane` of head `head` (see the header). The MMA
  // accumulators of thread (gid, tq) are columns 2 tq and 2 tq + 1 of each n-tile: both planes of
  // head tq in each n-tile with 4 planes, planes 0 and 1 of head 4 nt + tq with 2 planes.
  __device__ static void column_head_plane(int nt, int c, int& head, int& plane) {
    if (kPlanes == 4) {
      head = c >> 1;
      plane = 2 * nt + (c & 1);
    } else {
      head = (8 * nt + c) / kPlanes;
      plane = (8 * nt + c) % kPlanes;
    }
  }
  // n-tiles that carry a head of the group (the MMAs and logits of the others are skipped).
  __device__ static int used_ntiles(int group) {
    return kPlanes == 4 ? kNT : (kPlanes * group + 7) / 8;
  }
  // Heads whose logits one thread holds (slot i: head slot_head(i, tq)).
  static constexpr int kHeadSlots = kPlanes == 4 ? 1 : kNT;
  __device__ static int slot_head(int i, int tq) { return kPlanes == 4 ? tq : 4 * i + tq; }
  __device__ static uint32_t digit(int y, int plane) {
    return (static_cast<uint32_t>(y >> (8 * plane)) & 0xFFu) ^ (plane < kPlanes - 1 ? 0x80u : 0u);
  }

  // The query side in shared memory: X (q+ c, q- c or q c) in float32, q . zero and the operand
  // scaling per head, then the B fragments. Ends with a barrier.
  __device__ static void prepare(const SelectArgs& a, int b, int h, Smem& s) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int group = a.group;
    const bool box = a.num_vectors == 2;
    const SummaryFormat format = static_cast<SummaryFormat>(a.format);
    const bool a_bf16 = kBits == 16 && format == SummaryFormat::kBf16;
    const bool is_signed = format == SummaryFormat::kInt8 || format == SummaryFormat::kInt4;
    const int64_t q_at = b * a.q_stride_batch + static_cast<int64_t>(h) * group * a.q_stride_head;
    const float* cscale = a.channel_scale ? a.channel_scale + h * a.channel_stride_head : nullptr;
    const float* czero = a.channel_zero ? a.channel_zero + h * a.channel_stride_head : nullptr;
    for (int i = warp; i < group; i += kWarps) {
      float qz = 0.0f, amax = 0.0f;
      bool bad = false;
      for (int c = lane; c < D; c += 32) {
        const float q = load_half_as_float(a.q, q_at + i * a.q_stride_head + c, a.q_bf16);
        const float cs = cscale ? cscale[c] : 1.0f;
        if (czero) qz = fmaf(q, czero[c], qz);
        // q+ and q- keep a NaN (it must make the logit NaN); the mean kind uses q in [0].
        const float pos = box ? (q < 0.0f ? 0.0f : q) * cs : q * cs;
        const float neg = (q > 0.0f ? 0.0f : q) * cs;
        s.x[i][0][c] = pos;
        s.x[i][1][c] = neg;
        amax = fmaxf(amax, fmaxf(fabsf(pos), fabsf(neg)));
        bad = bad || !isfinite(pos) || !isfinite(neg);
      }
      qz = warp_sum(qz);
      amax = warp_max(amax);
      bad = __any_sync(kFullMask, bad);
      int e = 0;
      if (amax > 0.0f && isfinite(amax)) frexpf(amax, &e);  // amax < 2^e (fmaxf drops NaN)
      float post;
      if (kInt) {
        // A non-finite X makes every logit of the head NaN, as on the CPU.
        // Each lane rewrites its own channels: x = X 2^(kXBits - e) (|x| < 2^kXBits; exact
        // for |X| >= 2^(e - 7) at 30 bits), stored as the bits of x + kDigitOffset.
        post = bad ? NAN : ldexpf(1.0f, e - kXBits);
        const float pre = bad ? 0.0f : ldexpf(1.0f, kXBits - e);
        long long sum = 0;
        for (int r = 0; r < 2; ++r) {
          for (int c = lane; c < D; c += 32) {
            const int xi = __float2int_rn(s.x[i][r][c] * pre);
            if (r == 0) sum += xi;
            s.x[i][r][c] = __int_as_float(xi + kDigitOffset);
          }
        }
        if (is_signed) {
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
        }
        if (lane == 0) {
          const long long bias = kBits == 4 ? 8 : 128;
          s.bias_xsum[i] = is_signed ? static_cast<float>(bias * sum) : 0.0f;
        }
      } else {
        post = a_bf16 ? 1.0f : ldexpf(1.0f, e);  // fp16: X / 2^e with |X / 2^e| < 1
      }
      if (lane == 0) {
        s.qz[i] = qz;
        s.post[i] = post;
      }
    }
    __syncthreads();

    // B fragments: lane ln holds column ln / 4 of each n-tile.
    const int total_steps = a.num_vectors * kStepsPerVector;
    const int ntiles = used_ntiles(group);
    for (int idx = tid; idx < total_steps * ntiles * 32; idx += kThreads) {
      const int ln = idx & 31, nt = (idx >> 5) % ntiles, step = idx / (32 * ntiles);
      const int r = step / kStepsPerVector, sv = step % kStepsPerVector;
      const int c = sv / kStepsPerChunk, j = sv % kStepsPerChunk;
      int head, plane;
      column_head_plane(nt, ln >> 2, head, plane);
      int ch[kSlots];
      step_channels(chunk_channel(c, ln & 3), j, ch);
      uint32_t w[2] = {0u, 0u};
#pragma unroll
      for (int e = 0; e < kSlots; ++e) {
        const int word = e / (kSlots / 2), shift = (e % (kSlots / 2)) * (kInt ? 8 : 16);
        if (head >= group) continue;
        const float x = s.x[head][r][ch[e]];
        uint32_t v;
        if (kInt) {
          v = digit(__float_as_int(x), plane);
        } else if (a_bf16) {
          const __nv_bfloat16 hi = __float2bfloat16_rn(x);
          v = plane == 0 ? __bfloat16_as_ushort(hi)
                         : __bfloat16_as_ushort(__float2bfloat16_rn(x - __bfloat162float(hi)));
        } else {
          const float xs = x / s.post[head];  // exact: a power of two
          const __half hi = __float2half_rn(xs);
          v = plane == 0 ? __half_as_ushort(hi)
                         : __half_as_ushort(__float2half_rn(xs - __half2float(hi)));
        }
        w[word] |= v << shift;
      }
      s.b[step][nt][ln] = make_uint2(w[0], w[1]);
    }
    __syncthreads();
  }

  // The page-table entry of this lane's row in one scoring pass (lane L: row L of the warp's
  // kTilesPerWarp m-tiles), loaded a pass ahead so that its latency overlaps the previous pass.
  struct RowPages {
    int32_t page;
  };
  __device__ static int lane_row(int warp, int lane) { return 16 * kTilesPerWarp * warp + lane; }
  __device__ static void load_pages(const SelectArgs& a, int b, int h, int64_t j0, int nb,
                                    RowPages& rp) {
    // Rows past nb load row nb - 1's entry (unused): an unconditional load has no consumer
    // until the next pass (a select against -1 right after it waited for the load).
    const int jj = min(lane_row(threadIdx.x >> 5, threadIdx.x & 31), nb - 1);
    rp.page = page_entry(a, a.page_table + b * a.page_table_stride_batch, h, j0 + jj);
  }

  // Scores candidate blocks [j0, j0 + nb) of (b, h) (nb <= kSubChunk; `pages` from load_pages);
  // writes keys or logits to the workspace, and loads the page-table entries of the next pass
  // ([j_next, j_next + nb_next), none when nb_next = 0) into `next`. `first`: the CTA's first
  // pass, which builds the query side in shared memory (later ones reuse it).
  __device__ static void score(const SelectArgs& a, int b, int h, int64_t j0, int nb, bool first,
                               unsigned char* smem_raw, const RowPages& pages, RowPages& next,
                               int64_t j_next, int nb_next) {
    Smem& s = *reinterpret_cast<Smem*>(smem_raw);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tq = lane & 3;
    const int group = a.group;
    const bool box = a.num_vectors == 2;
    const int ntiles = used_ntiles(group);
    const SummaryFormat format = static_cast<SummaryFormat>(a.format);
    const bool a_bf16 = kBits == 16 && format == SummaryFormat::kBf16;
    const bool is_signed = format == SummaryFormat::kInt8 || format == SummaryFormat::kInt4;

    // 1. Lane L resolves the summary of row L of the warp's blocks (address, per-vector scale);
    //    the MMA threads take their rows' (m-tile t: blocks j0 + 16 (kTilesPerWarp warp + t) +
    //    {gid, gid + 8}) by shuffles, as the address of their own thread-chunk of vector 0 (null:
    //    no summary). Then the summary loads are issued first, so that their latency overlaps the
    //    query set-up.
    const int jj_mine = lane_row(warp, lane);
    const uint8_t* row_mine = nullptr;
    float scale_mine = 1.0f;
    if (jj_mine < nb) {
      const SummaryAt at = summary_at_page(a, h, j0 + jj_mine, pages.page);
      if (at.page >= 0) {
        row_mine = a.summaries + byte_offset(a, at);
        if (a.scales != nullptr) scale_mine = vector_scale(a, at, 0);
      }
    }
    const uint8_t* row_ptr[kTilesPerWarp][2];
    float row_scale[kTilesPerWarp][2];
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int src = 16 * t + gid + 8 * half;
        const uint8_t* row = reinterpret_cast<const uint8_t*>(
            __shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(row_mine), src));
        row_ptr[t][half] = row != nullptr ? row + tq * kThreadBytes : nullptr;
        row_scale[t][half] = a.scales != nullptr ? __shfl_sync(kFullMask, scale_mine, src) : 1.0f;
      }
    }
    // Loads i = ((t kChunks + c) 2 + r): thread-chunk c of vector r of m-tile t (r = 1 is skipped
    // for the mean kind), streamed through a ring of kDepth registers sets.
    constexpr int kLoads = kTilesPerWarp * kChunks * 2;
    constexpr int kDepth = kThreadBytes == 16 ? 4 : 8;
    const int64_t vector_stride = a.s_stride_vector;
    auto load = [&](int i, Chunk (&dst)[2]) {
      const int t = i / (2 * kChunks), c = (i / 2) % kChunks, r = i % 2;
      const int64_t off = r * vector_stride + c * 4 * kThreadBytes;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint8_t* row = row_ptr[t][half];
        dst[half] = Chunk{};
        if (row != nullptr && (r == 0 || box)) {
          dst[half] = __ldg(reinterpret_cast<const Chunk*>(row + off));
        }
      }
    };
    Chunk ring[kDepth][2];
#pragma unroll
    for (int i = 0; i < kDepth && i < kLoads; ++i) load(i, ring[i]);
    if (nb_next > 0) load_pages(a, b, h, j_next, nb_next, next);

    if (first) prepare(a, b, h, s);

    // 2. The products, one k-step at a time.
    Acc acc[kTilesPerWarp][kNT][4];
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][nt][e] = 0;
      }
    }
    const uint32_t flip = is_signed ? (kBits == 4 ? 0x88888888u : 0x80808080u) : 0u;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int t = i / (2 * kChunks), c = (i / 2) % kChunks, r = i % 2;
      Chunk cur[2] = {ring[i % kDepth][0], ring[i % kDepth][1]};
      if (i + kDepth < kLoads) load(i + kDepth, ring[i % kDepth]);
      if (r == 1 && !box) continue;
      const uint32_t* wlo = reinterpret_cast<const uint32_t*>(&cur[0]);
      const uint32_t* whi = reinterpret_cast<const uint32_t*>(&cur[1]);
#pragma unroll
      for (int j = 0; j < kStepsPerChunk; ++j) {
        uint32_t afrag[4];
        if (kBits == 4) {  // even nibbles (k 4tq..), then odd ones (k 16 + 4tq..)
          const uint32_t lo = wlo[j] ^ flip, hi = whi[j] ^ flip;
          afrag[0] = lo & 0x0F0F0F0Fu;
          afrag[1] = hi & 0x0F0F0F0Fu;
          afrag[2] = (lo >> 4) & 0x0F0F0F0Fu;
          afrag[3] = (hi >> 4) & 0x0F0F0F0Fu;
        } else {
          afrag[0] = wlo[2 * j] ^ flip;
          afrag[1] = whi[2 * j] ^ flip;
          afrag[2] = wlo[2 * j + 1] ^ flip;
          afrag[3] = whi[2 * j + 1] ^ flip;
        }
        const int step = r * kStepsPerVector + c * kStepsPerChunk + j;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          if (kNT <= 2 || nt < ntiles) {
            const uint2 bf = s.b[step][nt][lane];
            if constexpr (kInt) {
              mma_u8s8(acc[t][nt], afrag, bf.x, bf.y);
            } else if (a_bf16) {
              mma_bf16(acc[t][nt], afrag, bf.x, bf.y);
            } else {
              mma_f16(acc[t][nt], afrag, bf.x, bf.y);
            }
          }
        }
      }
    }

    // 3. Logits: thread (gid, tq) holds rows gid, gid + 8 of each m-tile and the heads of its
    //    slots (column_head_plane). A head's logit is (dot - bias) post rs scale + (q . zero)
    //    scale (rs: the row's per-vector scale), one fma with the per-head factors below (post is
    //    a power of two, so post scale is exact). The group reduction is a uniform branch, so
    //    that each variant compiles to straight-line code.
    float mul[kHeadSlots], add[kHeadSlots], bias[kHeadSlots];
    bool used[kHeadSlots];
#pragma unroll
    for (int i = 0; i < kHeadSlots; ++i) {
      const int head = slot_head(i, tq);
      used[i] = head < group && (kPlanes == 4 || i < ntiles);
      mul[i] = used[i] ? s.post[head] * a.scale : 0.0f;
      add[i] = used[i] ? s.qz[head] * a.scale : 0.0f;
      bias[i] = used[i] && kInt && is_signed ? s.bias_xsum[head] : 0.0f;
    }
    // The logit of slot i for row `half` of m-tile t (NaN for a row without a summary).
    auto logit_of = [&](int t, int half, int i) {
      float dot;
      if constexpr (kInt) {
        // sum_p acc_p 256^p in float32: each acc_p (|acc_p| < 2^24) and power of two is exact,
        // the additions round (the same codes always give the same logit).
        const Acc* p0 = &acc[t][kPlanes == 4 ? 0 : i][2 * half];
        dot = fmaf(static_cast<float>(p0[1]), 256.0f, static_cast<float>(p0[0]));
        if (kPlanes == 4) {
          const Acc* p2 = &acc[t][1][2 * half];
          const float upper = fmaf(static_cast<float>(p2[1]), 256.0f, static_cast<float>(p2[0]));
          dot = fmaf(upper, 65536.0f, dot);
        }
      } else {
        dot = acc[t][i][2 * half] + acc[t][i][2 * half + 1];
      }
      return row_ptr[t][half] != nullptr
                 ? finite_or_nan(fmaf(dot - bias[i], mul[i] * row_scale[t][half], add[i]))
                 : NAN;
    };
    uint32_t* ws_bh = ws_of(a, b, h);
    if (a.softmax_sum) {
      float* logits = reinterpret_cast<float*>(ws_bh);
#pragma unroll
      for (int t = 0; t < kTilesPerWarp; ++t) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int jj = 16 * (kTilesPerWarp * warp + t) + gid + 8 * half;
#pragma unroll
          for (int i = 0; i < kHeadSlots; ++i) {
            if (used[i] && jj < nb) {
              logits[slot_head(i, tq) * a.ws_row + j0 + jj] = logit_of(t, half, i);
            }
          }
        }
      }
    } else {
#pragma unroll
      for (int t = 0; t < kTilesPerWarp; ++t) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int jj = 16 * (kTilesPerWarp * warp + t) + gid + 8 * half;
          float best = -INFINITY;
#pragma unroll
          for (int i = 0; i < kHeadSlots; ++i) {
            if (used[i]) best = fmaxf(best, rank_value(logit_of(t, half, i)));
          }
          best = fmaxf(best, __shfl_xor_sync(kFullMask, best, 1));
          best = fmaxf(best, __shfl_xor_sync(kFullMask, best, 2));
          if (tq == 0 && jj < nb) ws_bh[j0 + jj] = score_key(best);
        }
      }
    }
  }

  static constexpr size_t smem_bytes() { return sizeof(Smem); }
};

// ------------------------------------------------------------------------------------------------
// Generic scorer (fp32 summaries, per-vector int8 / int4 box kinds, unaligned caches)
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

template <int D>
struct GenericScorer {
  static constexpr int kCpl = D / 32;  // channels per lane

  struct Smem {
    float q[kCudaMaxGroup][D];  // q * channel_scale (per-channel formats) or q
    float qz[kCudaMaxGroup];
    int64_t base[kSubChunk];
    float vscale[kSubChunk][2];
    alignas(16) uint8_t raw[kGenericStageBytes];
  };

  // Same interface as MmaScorer's; the page-table entries are read in score() itself.
  struct RowPages {};
  __device__ static void load_pages(const SelectArgs&, int, int, int64_t, int, RowPages&) {}

  __device__ static void score(const SelectArgs& a, int b, int h, int64_t j0, int nb, bool first,
                               unsigned char* smem_raw, const RowPages&, RowPages&, int64_t,
                               int) {
    Smem& s = *reinterpret_cast<Smem*>(smem_raw);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int group = a.group;
    const int num_vectors = a.num_vectors;
    const int vbytes = a.vector_bytes;
    const int block_bytes = num_vectors * vbytes;
    const bool vector_scales = a.scales != nullptr;
    const bool box = num_vectors == 2;
    const int32_t* pages = a.page_table + b * a.page_table_stride_batch;

    const int64_t q_at = b * a.q_stride_batch + static_cast<int64_t>(h) * group * a.q_stride_head;
    const float* cscale = a.channel_scale ? a.channel_scale + h * a.channel_stride_head : nullptr;
    const float* czero = a.channel_zero ? a.channel_zero + h * a.channel_stride_head : nullptr;
    for (int i = warp; first && i < group; i += kWarps) {
      float qz = 0.0f;
      for (int c = lane; c < D; c += 32) {
        const float q = load_half_as_float(a.q, q_at + i * a.q_stride_head + c, a.q_bf16);
        if (czero) qz = fmaf(q, czero[c], qz);
        s.q[i][c] = cscale ? q * cscale[c] : q;
      }
      qz = warp_sum(qz);
      if (lane == 0) s.qz[i] = qz;
    }
    for (int jj = tid; jj < nb; jj += kThreads) {
      const SummaryAt at = summary_at(a, pages, h, j0 + jj);
      s.base[jj] = byte_offset(a, at);
      for (int r = 0; r < num_vectors; ++r) {
        s.vscale[jj][r] = vector_scales && at.page >= 0 ? vector_scale(a, at, r) : 0.0f;
      }
    }
    __syncthreads();

    uint32_t* ws_bh = ws_of(a, b, h);
    const int per_stage = kGenericStageBytes / block_bytes;  // >= 16: block_bytes <= 2 KiB
    for (int first = 0; first < nb; first += per_stage) {
      const int count = min(per_stage, nb - first);
      if (a.aligned16) {
        const int chunks = vbytes / 16;
        for (int i = tid; i < count * num_vectors * chunks; i += kThreads) {
          const int jj = i / (num_vectors * chunks), rem = i % (num_vectors * chunks);
          const int r = rem / chunks, c = rem % chunks;
          const int64_t at = s.base[first + jj];
          uint4 v = make_uint4(0, 0, 0, 0);
          if (at >= 0) {
            v = __ldg(reinterpret_cast<const uint4*>(a.summaries + at + r * a.s_stride_vector +
                                                     c * 16));
          }
          *reinterpret_cast<uint4*>(s.raw + (jj * num_vectors + r) * vbytes + c * 16) = v;
        }
      } else {
        for (int i = tid; i < count * block_bytes; i += kThreads) {
          const int jj = i / block_bytes, rem = i % block_bytes;
          const int r = rem / vbytes, c = rem % vbytes;
          const int64_t at = s.base[first + jj];
          s.raw[i] = at >= 0 ? a.summaries[at + r * a.s_stride_vector + c] : 0;
        }
      }
      __syncthreads();
      for (int jj = warp; jj < count; jj += kWarps) {
        const uint8_t* vec = s.raw + jj * block_bytes;
        const int c0 = lane * kCpl;
        float mid[kCpl], rad[kCpl];
        decode_channels<kCpl>(a.format, vec, c0, s.vscale[first + jj][0], mid);
        if (box) {
          decode_channels<kCpl>(a.format, vec + vbytes, c0, s.vscale[first + jj][1], rad);
#pragma unroll
          for (int c = 0; c < kCpl; ++c) {
            // A non-finite value must make the logit NaN: mid/rad keep it non-finite.
            const float x = mid[c], y = rad[c];
            mid[c] = (x + y) * 0.5f;
            rad[c] = fabsf(x - y) * 0.5f;
          }
        }
        const bool row_ok = s.base[first + jj] >= 0;
        float best = -INFINITY;
        for (int i = 0; i < group; ++i) {
          float acc = 0.0f;
#pragma unroll
          for (int c = 0; c < kCpl; ++c) {
            const float q = s.q[i][c0 + c];
            acc = fmaf(q, mid[c], acc);
            if (box) acc = fmaf(fabsf(q), rad[c], acc);
          }
          acc = warp_sum(acc);
          const float logit = row_ok ? finite_or_nan((acc + s.qz[i]) * a.scale) : NAN;
          best = fmaxf(best, rank_value(logit));
          if (a.softmax_sum && lane == 0) {
            reinterpret_cast<float*>(ws_bh)[i * a.ws_row + j0 + first + jj] = logit;
          }
        }
        if (!a.softmax_sum && lane == 0) ws_bh[j0 + first + jj] = score_key(best);
      }
      __syncthreads();
    }
  }

  static constexpr size_t smem_bytes() { return sizeof(Smem); }
};

// ------------------------------------------------------------------------------------------------
// Selection by the last CTA of (b, h)
// ------------------------------------------------------------------------------------------------

struct SelectSmem {
  uint32_t hist[kBins];
  uint32_t keys[kKeyCache];
  uint32_t greater_bits[kCompactWords];  // candidates above / at the threshold, one bit each
  uint32_t equal_bits[kCompactWords];
  int32_t warp_a[kWarps], warp_b[kWarps];
  float warp_f[kWarps];
  uint32_t digit, above, equal;
};

// Block-wide max (fmaxf) or sum of one float per thread, in a fixed order.
template <bool kMax>
__device__ float block_reduce(float v, SelectSmem& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) s.warp_f[warp] = v;
  __syncthreads();
  float w = lane < kWarps ? s.warp_f[lane] : (kMax ? -INFINITY : 0.0f);
  w = kMax ? warp_max(w) : warp_sum(w);
  __syncthreads();
  return w;
}

// Reads the candidate keys from shared memory (cached) or from the workspace (L2, written by
// other CTAs: ld.global.cg, never a stale L1 line).
struct KeySource {
  const uint32_t* global;  // keys of candidates 0, 1, ... (block sink + c)
  const uint32_t* shared;  // or null
  int64_t stride;          // 1, or the sampling stride (candidate stride c)
  __device__ uint32_t operator()(int64_t c) const {
    return shared ? shared[c * stride] : __ldcg(global + c * stride);
  }
};

// The k-th largest of n keys as a radix threshold: the keys whose masked value is above `prefix`
// and the first `want` (by index) of those equal to it are the k largest.
struct Threshold {
  uint32_t prefix, mask;
  int64_t want;
};

// Radix select of the threshold of the k largest (1 <= k <= n) among the keys >= floor of
// key_of(0 .. n-1), all in [lo, hi] (lo >= floor), over the bits below the prefix that lo and hi
// share (the sign and most exponent bits, typically: digits taken from the top would put nearly
// all keys in a few bins), 11 bits per pass from the top. Stops as soon as the threshold digit
// holds exactly the keys still wanted. Keys below `floor` are skipped (when at least k keys are
// >= floor, the k largest are among them): a floor near the k-th largest key (lo raised to it)
// shortens the digits and keeps most keys out of the histograms.
__device__ Threshold radix_threshold(const KeySource& key_of, int64_t n, int64_t k, uint32_t lo,
                                     uint32_t hi, uint32_t floor, SelectSmem& s) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  int low_bit = lo == hi ? 0 : 32 - __clz(lo ^ hi);  // bits [0, low_bit) differ among the keys
  Threshold th;
  th.mask = low_bit == 32 ? 0u : ~((1u << low_bit) - 1u);
  th.prefix = lo & th.mask;
  th.want = k;
  while (low_bit > 0) {
    const int width = low_bit < kDigitBits ? low_bit : kDigitBits;
    const int shift = low_bit - width;
    const uint32_t dmask = (1u << width) - 1u;
    const int bins = 1 << width;
    for (int i = tid; i < bins; i += kThreads) s.hist[i] = 0;
    __syncthreads();
    // kBatch keys per lane are loaded before any is counted (their latencies overlap). Below the
    // shared prefix the digits spread over the bins, so plain shared-memory atomics rarely
    // collide (warp aggregation with __match_any_sync costs more than it saves there).
    for (int64_t base = warp * 32; base < n; base += kThreads * kBatch) {
      uint32_t key[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t c = base + u * kThreads + lane;
        key[u] = c < n ? key_of(c) : 0;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (base + u * kThreads + lane < n && key[u] >= floor &&
            (key[u] & th.mask) == th.prefix) {
          atomicAdd(&s.hist[(key[u] >> shift) & dmask], 1u);
        }
      }
    }
    __syncthreads();
    // Descending scan: thread t owns the `per` digits dmask - per t, ..., dmask - per t - per + 1.
    const int per = bins >= kThreads ? bins / kThreads : 1;  // 1 to 8
    uint32_t cnt[8];
    uint32_t mine = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      cnt[i] = i < per && per * tid + i < bins ? s.hist[dmask - per * tid - i] : 0;
      mine += cnt[i];
    }
    uint32_t incl = mine;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t y = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) s.warp_a[warp] = static_cast<int32_t>(incl);
    __syncthreads();
    uint32_t before = 0;
    for (int w = 0; w < warp; ++w) before += static_cast<uint32_t>(s.warp_a[w]);
    uint32_t run = before + incl - mine;
    if (static_cast<int64_t>(run) < th.want && th.want <= static_cast<int64_t>(run + mine)) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (i < per && static_cast<int64_t>(run + cnt[i]) >= th.want) {
          s.digit = static_cast<uint32_t>(dmask - per * tid - i);
          s.above = run;
          s.equal = cnt[i];
          break;
        }
        run += cnt[i];
      }
    }
    __syncthreads();
    th.prefix |= s.digit << shift;
    th.mask |= dmask << shift;
    th.want -= s.above;
    low_bit = shift;
    const bool exact = static_cast<int64_t>(s.equal) == th.want;  // every key with the prefix wins
    __syncthreads();
    if (exact) break;
  }
  return th;
}

__device__ void write_list(const SelectArgs& a, int b, int h, const DevicePlan& plan,
                           bool take_all) {
  int32_t* out = a.block_indices + b * a.bi_stride_batch + h * a.bi_stride_head;
  const int64_t max_blocks = a.max_blocks;
  auto put = [&](int64_t pos, int64_t block) {
    if (pos < max_blocks) out[pos * a.bi_stride_slot] = static_cast<int32_t>(block);
  };
  const int64_t sink = plan.sink_blocks, k = plan.num_selected;
  for (int64_t j = threadIdx.x; j < sink; j += kThreads) put(j, j);
  if (take_all) {
    for (int64_t c = threadIdx.x; c < k; c += kThreads) put(sink + c, sink + c);
  }
  for (int64_t j = plan.local_begin + threadIdx.x; j < plan.num_blocks; j += kThreads) {
    put(sink + k + (j - plan.local_begin), j);
  }
  const int64_t count = plan.count();
  for (int64_t pos = count + threadIdx.x; pos < max_blocks; pos += kThreads) {
    out[pos * a.bi_stride_slot] = -1;
  }
  if (threadIdx.x == 0) {
    a.block_counts[b * a.bc_stride_batch + h * a.bc_stride_head] =
        static_cast<int32_t>(min64(count, max_blocks));
  }
}

// Exclusive scan over the CTA of one int per thread in thread order; *total = the sum of all.
__device__ int block_exclusive_scan(int v, int32_t* warp_slots, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_slots[warp] = incl;
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < kWarps; ++w) {
    const int x = warp_slots[w];
    before += w < warp ? x : 0;
    all += x;
  }
  __syncthreads();
  *total = all;
  return before + incl - v;
}

__device__ void select_top_k(const SelectArgs& a, int b, int h, const DevicePlan& plan,
                             unsigned char* smem_raw) {
  SelectSmem& s = *reinterpret_cast<SelectSmem*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t nc = plan.num_candidates, k = plan.num_selected, sink = plan.sink_blocks;
  uint32_t* ws_bh = ws_of(a, b, h);
  const bool cached = nc <= kKeyCache;
  uint32_t* key_row = ws_bh + static_cast<int64_t>(a.ws_rows - 1) * a.ws_row + sink;

  // The keys in shared memory (cached) or in the workspace, and their least and largest value.
  uint32_t lo = 0xFFFFFFFFu, hi = 0u;
  if (a.softmax_sum) {
    // score[c] = sum over heads i of softmax_c(logit_i): heads in order, each a fixed-order
    // block reduction, so the result does not depend on which CTA selects.
    // The float scores live in the key row until they are converted to keys.
    const float* logits = reinterpret_cast<const float*>(ws_bh) + sink;
    float* score = reinterpret_cast<float*>(key_row);
    for (int64_t c = tid; c < nc; c += kThreads) score[c] = 0.0f;
    for (int i = 0; i < a.group; ++i) {
      const float* row = logits + static_cast<int64_t>(i) * a.ws_row;
      float peak = -INFINITY;
#pragma unroll 8
      for (int64_t c = tid; c < nc; c += kThreads) peak = fmaxf(peak, rank_value(__ldcg(row + c)));
      peak = block_reduce<true>(peak, s);
      if (!isfinite(peak)) continue;  // uniform across the block
      float total = 0.0f;
#pragma unroll 8
      for (int64_t c = tid; c < nc; c += kThreads) {
        total += expf(rank_value(__ldcg(row + c)) - peak);
      }
      total = block_reduce<false>(total, s);
#pragma unroll 8
      for (int64_t c = tid; c < nc; c += kThreads) {
        score[c] += expf(rank_value(__ldcg(row + c)) - peak) / total;
      }
    }
    // Each thread rewrote only its own candidates: no barrier needed before it re-reads them.
    for (int64_t c = tid; c < nc; c += kThreads) {
      const uint32_t key = score_key(score[c]);
      lo = min(lo, key);
      hi = max(hi, key);
      if (cached) {
        s.keys[c] = key;
      } else {
        key_row[c] = key;
      }
    }
  } else {
    // 16-byte loads where the row's alignment permits (a scalar head and tail), unrolled so that
    // each thread has 8 of them in flight (16 K keys: two round trips to L2).
    auto take = [&](int64_t c, uint32_t key) {
      if (cached) s.keys[c] = key;
      lo = min(lo, key);
      hi = max(hi, key);
    };
    const int64_t head =
        min64(nc, (4 - static_cast<int64_t>((reinterpret_cast<uintptr_t>(key_row) >> 2) & 3)) & 3);
    const int64_t vectors = (nc - head) / 4;
    for (int64_t c = tid; c < head; c += kThreads) take(c, __ldcg(key_row + c));
    const uint4* row4 = reinterpret_cast<const uint4*>(key_row + head);
#pragma unroll 8
    for (int64_t v = tid; v < vectors; v += kThreads) {
      const uint4 q = __ldcg(row4 + v);
      const int64_t c = head + 4 * v;
      take(c, q.x);
      take(c + 1, q.y);
      take(c + 2, q.z);
      take(c + 3, q.w);
    }
    for (int64_t c = head + 4 * vectors + tid; c < nc; c += kThreads) take(c, __ldcg(key_row + c));
  }
  lo = __reduce_min_sync(kFullMask, lo);
  hi = __reduce_max_sync(kFullMask, hi);
  if (lane == 0) {
    s.warp_a[warp] = static_cast<int32_t>(lo);
    s.warp_b[warp] = static_cast<int32_t>(hi);
  }
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) {
    lo = min(lo, static_cast<uint32_t>(s.warp_a[w]));
    hi = max(hi, static_cast<uint32_t>(s.warp_b[w]));
  }
  __syncthreads();  // s.warp_a / warp_b are reused below
  const KeySource key_of{key_row, cached ? s.keys : nullptr, 1};

  // A floor for the radix select from a sample: the threshold of the ks largest of every
  // kSampleStride-th key, ks = k / kSampleStride with a margin of ~3 standard deviations, is
  // below the k-th largest key unless the sample is very unlike the whole; when fewer than k keys
  // reach it (or the sample is too small), the select runs without a floor. Either way the result
  // is exact: the floor only skips keys that cannot be among the k largest.
  uint32_t floor = 0;
  const int64_t sampled = nc / kSampleStride;
  const float expected = static_cast<float>(k) / kSampleStride;
  const int64_t ks = static_cast<int64_t>(expected + 3.0f * sqrtf(expected)) + 8;
  if (nc >= kSampleMin && 2 * ks <= sampled) {
    const KeySource sample{key_row, cached ? s.keys : nullptr, kSampleStride};
    const Threshold st = radix_threshold(sample, sampled, ks, lo, hi, 0, s);
    int reached = 0;
    for (int64_t c = tid; c < nc; c += kThreads) reached += key_of(c) >= st.prefix ? 1 : 0;
    int total = 0;
    block_exclusive_scan(reached, s.warp_b, &total);
    if (total >= k) {
      floor = st.prefix;
      lo = max(lo, floor);
    }
  }
  const Threshold th = radix_threshold(key_of, nc, k, lo, hi, floor, s);
  const uint32_t mask = th.mask, prefix = th.prefix;
  const int64_t want = th.want;

  // Ordered compaction, kCompactWords x 32 candidates at a time: bit c of greater_bits /
  // equal_bits = candidate c's masked key is above / equal to the prefix (one ballot per 32
  // candidates); a candidate is taken when above, or equal and among the first `want` equal ones
  // by index; each thread then writes the taken candidates of its words in ascending order.
  int32_t* out = a.block_indices + b * a.bi_stride_batch + h * a.bi_stride_head;
  int64_t written = 0, eq_seen = 0;
  constexpr int kWordsPerThread = kCompactWords / kThreads;
  for (int64_t seg = 0; seg < nc; seg += 32 * kCompactWords) {
    const int words = static_cast<int>(min64(kCompactWords, ceil_div(nc - seg, int64_t{32})));
    for (int w0 = warp; w0 < words; w0 += kWarps * kBatch) {
      uint32_t key[kBatch];
      bool in[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t c = seg + 32 * static_cast<int64_t>(w0 + u * kWarps) + lane;
        in[u] = w0 + u * kWarps < words && c < nc;
        key[u] = in[u] ? key_of(c) : 0;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        // Keys below the floor never count as equal (the radix select skipped them).
        const uint32_t masked = key[u] & mask;
        const uint32_t gt = __ballot_sync(kFullMask, in[u] && masked > prefix);
        const uint32_t eq = __ballot_sync(kFullMask, in[u] && masked == prefix && key[u] >= floor);
        if (lane == 0 && w0 + u * kWarps < words) {
          s.greater_bits[w0 + u * kWarps] = gt;
          s.equal_bits[w0 + u * kWarps] = eq;
        }
      }
    }
    __syncthreads();
    // Thread t owns words [t kWordsPerThread, (t + 1) kWordsPerThread) of the segment.
    uint32_t gt[kWordsPerThread], eq[kWordsPerThread];
    int eq_mine = 0;
#pragma unroll
    for (int i = 0; i < kWordsPerThread; ++i) {
      const int w = tid * kWordsPerThread + i;
      gt[i] = w < words ? s.greater_bits[w] : 0u;
      eq[i] = w < words ? s.equal_bits[w] : 0u;
      eq_mine += __popc(eq[i]);
    }
    int eq_total = 0;
    int64_t eq_left = want - eq_seen - block_exclusive_scan(eq_mine, s.warp_a, &eq_total);
    int taken_mine = 0;
#pragma unroll
    for (int i = 0; i < kWordsPerThread; ++i) {
      uint32_t take_eq = eq[i];  // the lowest eq_left set bits of eq[i]
      if (eq_left < __popc(eq[i])) {
        take_eq = 0u;
        for (uint32_t rest = eq[i]; eq_left > 0; --eq_left) {
          const uint32_t low = rest & (~rest + 1u);
          take_eq |= low;
          rest ^= low;
        }
        eq_left = 0;
      } else {
        eq_left -= __popc(eq[i]);
      }
      gt[i] |= take_eq;  // now: the taken candidates
      taken_mine += __popc(gt[i]);
    }
    int taken_total = 0;
    int64_t pos = sink + written + block_exclusive_scan(taken_mine, s.warp_b, &taken_total);
#pragma unroll
    for (int i = 0; i < kWordsPerThread; ++i) {
      const int64_t c0 = seg + 32 * static_cast<int64_t>(tid * kWordsPerThread + i);
      for (uint32_t bits = gt[i]; bits != 0u; bits &= bits - 1u, ++pos) {
        if (pos < a.max_blocks) {
          out[pos * a.bi_stride_slot] = static_cast<int32_t>(sink + c0 + __ffs(bits) - 1);
        }
      }
    }
    written += taken_total;
    eq_seen += eq_total;
  }
  write_list(a, b, h, plan, false);
}

template <class Scorer>
__global__ void __launch_bounds__(kThreads, 2) select_kernel(const __grid_constant__ SelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int is_last;
  // Which (head, sequence, chunk): heads in order of head_order (most candidate blocks first, so
  // the longest selections start early and the grid ends with short ones); for each head, its
  // chunks of sequence 0, then of sequence 1, ... (a (sequence, head)'s CTAs run together).
  const int64_t x = blockIdx.x;
  const int64_t batch = gridDim.x / a.num_chunk_ctas;
  int lo = 0, hi = a.num_kv_heads;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (batch * a.chunk_begin[mid] <= x) lo = mid; else hi = mid;
  }
  const int h = a.head_order[lo];
  const int64_t per_sequence = a.chunk_begin[lo + 1] - a.chunk_begin[lo];
  const int64_t r = x - batch * a.chunk_begin[lo];
  const int b = static_cast<int>(r / per_sequence);
  const int chunk = static_cast<int>(r % per_sequence);
  const DevicePlan plan = plan_for(a, b, h);
  const int64_t nc = plan.num_candidates, k = plan.num_selected;
  if (k == 0 || k == nc) {
    if (chunk == 0) write_list(a, b, h, plan, true);
    return;
  }
  const int64_t chunks = ceil_div(nc, a.chunk_blocks);
  if (chunk >= chunks) return;
  const int64_t j0 = plan.sink_blocks + static_cast<int64_t>(chunk) * a.chunk_blocks;
  const int64_t j1 = min64(j0 + a.chunk_blocks, plan.local_begin);
  typename Scorer::RowPages pages;
  Scorer::load_pages(a, b, h, j0, static_cast<int>(min64(kSubChunk, j1 - j0)), pages);
  for (int64_t j = j0; j < j1; j += kSubChunk) {
    const int64_t j_next = j + kSubChunk;
    const int nb_next = j_next < j1 ? static_cast<int>(min64(kSubChunk, j1 - j_next)) : 0;
    typename Scorer::RowPages next;
    Scorer::score(a, b, h, j, static_cast<int>(min64(kSubChunk, j1 - j)), j == j0, smem, pages,
                  next, j_next, nb_next);
    pages = next;
  }

  // Arrival: the last CTA of (b, h) selects. Its reads of the other CTAs' keys follow their
  // fence + atomic, and its own fence + barrier (the threadFenceReduction pattern).
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const uint32_t arrived =
        atomicAdd(a.arrivals + static_cast<int64_t>(b) * a.num_kv_heads + h, 1u);
    is_last = arrived == static_cast<uint32_t>(chunks - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  select_top_k(a, b, h, plan, smem);
}

template <class Scorer>
void launch_select(const SelectArgs& a, int batch, cudaStream_t stream) {
  const size_t smem = Scorer::smem_bytes() > sizeof(SelectSmem) ? Scorer::smem_bytes()
                                                                 : sizeof(SelectSmem);
  static bool configured[64] = {};
  int device = 0;
  ABSPARSE_CUDA_CHECK(cudaGetDevice(&device));
  if (smem > 48 * 1024 && (device >= 64 || !configured[device])) {
    ABSPARSE_CUDA_CHECK(cudaFuncSetAttribute(select_kernel<Scorer>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
    if (device < 64) configured[device] = true;
  }
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(a.num_chunk_ctas) * batch));
  select_kernel<Scorer><<<grid, kThreads, smem, stream>>>(a);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

// Calls f(std::integral_constant<int, bits>) for the code width of the tensor-core scorer.
template <class F>
void dispatch_code_bits(int bits, F&& f) {
  if (bits == 4) {
    f(std::integral_constant<int, 4>{});
  } else if (bits == 8) {
    f(std::integral_constant<int, 8>{});
  } else {
    f(std::integral_constant<int, 16>{});
  }
}

int64_t capacity_blocks(const SelectBlocksParams& p) {
  const int64_t capacity = static_cast<int64_t>(p.geometry.max_pages) * p.geometry.page_size;
  return capacity / p.layout->min_block_size();
}

// Bytes of the workspace: keys / logits, then the arrival counters at a 256-byte boundary.
int64_t key_bytes(const SelectBlocksParams& p) {
  const int64_t rows = p.group_reduce == GroupReduce::kSoftmaxSum
                           ? p.num_q_heads / p.geometry.num_kv_heads + 1
                           : 1;
  const int64_t bytes = static_cast<int64_t>(p.geometry.batch) * p.geometry.num_kv_heads * rows *
                        capacity_blocks(p) * 4;
  return (bytes + 255) / 256 * 256;
}

// The tensor-core scorer runs when the format's codes convert exactly (all but fp32), the box
// identity holds (not for int8 / int4 with per-vector scales), and every thread-chunk load is
// aligned (16 bytes, 8 for 4-bit codes at D = 64).
bool use_mma_scorer(const SelectBlocksParams& p, int head_dim) {
  const SummaryFormat f = p.layout->format();
  if (f == SummaryFormat::kFp32) return false;
  if (format_has_vector_scales(f) && p.layout->summary_vectors() == 2) return false;
  const int esize = dtype_size(summary_dtype(f));
  const int64_t vec_bytes = static_cast<int64_t>(summary_width(f, head_dim)) * esize;
  const int64_t align = vec_bytes >= 64 ? 16 : 8;
  const auto ok = [align](int64_t x) { return x % align == 0; };
  return reinterpret_cast<uintptr_t>(p.summaries.data) % align == 0 &&
         ok(p.summaries.stride_page * esize) && ok(p.summaries.stride_slot * esize) &&
         ok(p.summaries.stride_vector * esize);
}

}  // namespace

void run_select_blocks(const SelectBlocksParams& p, void* workspace) {
  const char* fn = "select_blocks";
  check_select_blocks_cuda(p);
  const BatchGeometry& g = p.geometry;
  const LayerLayout& layout = *p.layout;
  if (g.batch == 0) return;
  const size_t need = select_blocks_workspace_size(p);
  ABSPARSE_CHECK_ARG(workspace != nullptr, fn, "workspace: expected ", need,
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
                aligned(a.s_stride_page) && aligned(a.s_stride_slot) &&
                aligned(a.s_stride_vector) && aligned(a.vector_bytes);
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
  a.ws = static_cast<uint32_t*>(workspace);
  a.ws_row = capacity_blocks(p);
  a.ws_rows = a.softmax_sum ? group + 1 : 1;
  a.arrivals = reinterpret_cast<uint32_t*>(static_cast<char*>(workspace) + key_bytes(p));
  a.block_indices = p.block_indices;
  a.bi_stride_batch = p.block_indices_stride_batch;
  a.bi_stride_head = p.block_indices_stride_head;
  a.bi_stride_slot = p.block_indices_stride_slot;
  a.max_blocks = p.max_blocks;
  a.block_counts = p.block_counts;
  a.bc_stride_batch = p.block_counts_stride_batch;
  a.bc_stride_head = p.block_counts_stride_head;
  // Candidate blocks per CTA: about kCtasPerMultiprocessor CTAs per multiprocessor over the
  // whole grid, from 256 (one scoring pass; small batches, short capacities) to 2048 blocks.
  // Example: 128K tokens, 8 heads of block sizes {8,8,16,16,16,32,32,64}: 8 sequences -> 2048
  // blocks per CTA (264 CTAs), 1 sequence -> 256 (264 CTAs). Chunking never changes a result.
  const int64_t capacity = a.capacity;
  int64_t all_blocks = 0;
  for (int h = 0; h < g.num_kv_heads; ++h) all_blocks += capacity / layout.block_size(h);
  all_blocks *= g.batch;
  a.chunk_blocks = static_cast<int>(
      clamp64(ceil_div(ceil_div(all_blocks, kCtasPerMultiprocessor * multiprocessor_count()),
                       kSubChunk) * kSubChunk,
              kSubChunk, 8 * kSubChunk));
  // Launch order: smallest block size (most candidates, the longest selection) first.
  int order[kCudaMaxKvHeads];
  for (int h = 0; h < g.num_kv_heads; ++h) {
    a.log2_block[h] = static_cast<uint8_t>(log2_exact(layout.block_size(h)));
    a.slot_offset[h] = layout.slot_offset(h);
    order[h] = h;
  }
  std::stable_sort(order, order + g.num_kv_heads,
                   [&](int x, int y) { return layout.block_size(x) < layout.block_size(y); });
  int64_t ctas = 0;
  for (int i = 0; i < g.num_kv_heads; ++i) {
    a.head_order[i] = static_cast<uint8_t>(order[i]);
    a.chunk_begin[i] = static_cast<int32_t>(ctas);
    ctas += max64(1, ceil_div(capacity / layout.block_size(order[i]), a.chunk_blocks));
  }
  ABSPARSE_CHECK_ARG(ctas * g.batch <= INT32_MAX, fn, "page_table: too many blocks for one ",
                     "launch (", g.batch, " sequences of ", capacity, " tokens)");
  a.chunk_begin[g.num_kv_heads] = static_cast<int32_t>(ctas);
  a.num_chunk_ctas = static_cast<int>(ctas);

  const cudaStream_t stream = to_stream(p.stream);
  ABSPARSE_CUDA_CHECK(cudaMemsetAsync(a.arrivals, 0,
                                      sizeof(uint32_t) * g.batch * g.num_kv_heads, stream));
  const bool mma = use_mma_scorer(p, g.head_dim);
  ABSPARSE_DISPATCH_HEAD_DIM(fn, g.head_dim, kDim, [&] {
    if (!mma) {
      launch_select<GenericScorer<kDim>>(a, g.batch, stream);
    } else {
      dispatch_code_bits(format_is_4bit(format) ? 4 : esize == 1 ? 8 : 16, [&](auto bits) {
        if (group <= 4) {  // integer codes: 4 planes per head (2 n-tiles); 16-bit: 2 (1 n-tile)
          launch_select<MmaScorer<kDim, bits.value, bits.value <= 8 ? 2 : 1>>(a, g.batch, stream);
        } else {
          launch_select<MmaScorer<kDim, bits.value, 2 * kCudaMaxGroup / 8>>(a, g.batch, stream);
        }
      });
    }
  });
}

}  // namespace absparse::cuda

namespace absparse {

size_t select_blocks_workspace_size(const SelectBlocksParams& p) {
  if (p.layout == nullptr || p.geometry.batch <= 0 || p.geometry.num_kv_heads <= 0 ||
      p.num_q_heads <= 0) {
    return 0;
  }
  return static_cast<size_t>(cuda::key_bytes(p)) +
         sizeof(uint32_t) * p.geometry.batch * p.geometry.num_kv_heads;
}

void select_blocks_cuda(const SelectBlocksParams& p, void* workspace) {
  cuda::run_select_blocks(p, workspace);
}

}  // namespace absparse

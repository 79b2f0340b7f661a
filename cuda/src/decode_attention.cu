// sparse_decode / dense_decode on the GPU (docs/decode.md, "Sparse attention").
//
// The attended set of (sequence b, KV head h) is walked as a list of positions: sparse, position
// p lies in listed block i = p >> log2 bs_h (token list[i] * bs_h + p % bs_h), and the positions
// after the count * bs_h of the listed blocks are the partial tail [n bs_h, L_b); dense is the
// same walk with "blocks" = pages and the identity list. A block or the tail never spans a page
// (bs_h divides P), so one page-table lookup gives each row's address: no per-token index
// expansion, every head's block size in the same launch.
//
// attention_kernel<T, D>: grid (B, Hk, S), 128 threads (4 warps). CTA (b, h, s) attends
// positions [s per, (s+1) per) of (b, h) for the G query heads of the group at once (one K/V read
// per group), with mma.sync m16n8k16 (G padded to 16 rows):
//   - tiles of 32 positions; warp 0 turns the positions of tile t+2 into K/V row offsets (one
//     block-list and one page-table load per row) while tile t+1 loads: K and V rows go to shared
//     memory with 16-byte cp.async (zero-filled for rows past the end or with a bad entry), two
//     stages; rows are padded by 16 bytes so ldmatrix is conflict-free;
//   - S = Q K^T: warp w scores the 8 positions [8w, 8w+8) over all of D; the row maximum and sum
//     of the online softmax combine the 4 warps through shared memory in a fixed order;
//   - O += P V: warp w owns the channels [w D/4, (w+1) D/4); P is written to shared memory as a
//     high and a low fp16/bf16 part (P = hi + lo to ~2^-16), two MMAs each, so P V keeps float32
//     accuracy.
// Split-KV (decode_attention_num_splits): S and per = max(ceil(total / S), 128) rounded up to the
// tile depend only on capacities and on (b, h)'s own total, so results do not depend on the other
// sequences of the batch. With S > 1 each CTA writes a normalized partial output and its lse (log2
// units) to the workspace, and merge_kernel (one warp per (b, query head)) combines the splits in
// order with LSE weights.
#include <atomic>

#include "common.cuh"

namespace absparse::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileN = 32;           // positions per tile: 8 per warp in S = Q K^T
constexpr int kRows = 16;            // MMA rows: the group's query heads, padded
constexpr int kPad = 8;              // row padding in elements (16 bytes)
constexpr int kMaxSplits = 32;
constexpr int64_t kSplitCapacityTokens = 256;  // one more split per 256 tokens of capacity
constexpr int64_t kMinSplitTokens = 128;       // a split attends at least this many positions
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

struct AttnArgs {
  const void* q;
  int64_t q_stride_batch, q_stride_head;
  const void* k;
  int64_t k_stride_page, k_stride_token, k_stride_head;
  const void* v;
  int64_t v_stride_page, v_stride_token, v_stride_head;
  const int32_t* seq_lens;
  int64_t seq_lens_stride;
  const int32_t* page_table;
  int64_t page_table_stride_batch, page_table_stride_page;
  const int32_t* block_indices;  // null: dense
  int64_t bi_stride_batch, bi_stride_head, bi_stride_slot;
  const int32_t* block_counts;
  int64_t bc_stride_batch, bc_stride_head;
  int64_t max_blocks;
  int64_t num_pages;
  int64_t capacity;  // max_pages * P
  int log2_page;
  int batch, num_kv_heads, group, head_dim;
  int num_splits;
  float scale_log2;  // scale * log2(e)
  void* out;
  int64_t out_stride_batch, out_stride_head;
  float* lse;  // may be null
  int64_t lse_stride_batch, lse_stride_head;
  float* part_out;  // [S, B, Hq, D] (S > 1)
  float* part_lse;  // [S, B, Hq], log2 units
  uint8_t log2_block[kCudaMaxKvHeads];
};

// The attended positions of (b, h): `count` listed blocks of 1 << log2_bs tokens, then the tail.
struct AttendSet {
  int64_t len, num_blocks, count, total;
  int log2_bs;
};

__device__ inline AttendSet attend_set(const AttnArgs& a, int b, int h) {
  AttendSet s;
  s.len = clamped_seq_len(a.seq_lens, a.seq_lens_stride, b, a.capacity);
  s.log2_bs = a.block_indices ? a.log2_block[h] : a.log2_page;
  s.num_blocks = s.len >> s.log2_bs;
  s.count = a.block_indices
                ? clamp64(a.block_counts[b * a.bc_stride_batch + h * a.bc_stride_head], 0,
                          min64(a.max_blocks, s.num_blocks))
                : s.num_blocks;
  s.total = (s.count << s.log2_bs) + (s.len - (s.num_blocks << s.log2_bs));
  return s;
}

// Positions per split: a multiple of the tile, at least kMinSplitTokens (or all of a short set).
__host__ __device__ inline int64_t split_positions(int64_t total, int num_splits) {
  int64_t per = num_splits > 1 ? max64(ceil_div(total, num_splits), kMinSplitTokens) : total;
  return max64(ceil_div(per, kTileN) * kTileN, kTileN);
}

template <typename T, int D>
struct AttnSmem {
  static constexpr int kStride = D + kPad;
  static constexpr int kPStride = kTileN + kPad;
  T k[2][kTileN][kStride];
  T v[2][kTileN][kStride];
  T q[kRows][kStride];
  T p_hi[kRows][kPStride];
  T p_lo[kRows][kPStride];
  float red_max[kWarps][kRows];
  float red_sum[kWarps][kRows];
  int64_t k_off[3][kTileN];  // element offsets of the rows of three tiles; -1: skip the row
  int64_t v_off[3][kTileN];
};

__device__ inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; zero-fills the destination when !valid (src is not read).
__device__ inline void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// D (16x8, f32) += A (16x16, row) * B (16x8, col).
template <typename T>
__device__ inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ inline void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ inline void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T> __device__ inline uint16_t bits16(T x);
template <> __device__ inline uint16_t bits16<__half>(__half x) { return __half_as_ushort(x); }
template <> __device__ inline uint16_t bits16<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat16_as_ushort(x);
}
// Two elements as one 32-bit word: `first` at the lower address.
template <typename T>
__device__ inline uint32_t pack2(T first, T second) {
  return static_cast<uint32_t>(bits16(first)) | (static_cast<uint32_t>(bits16(second)) << 16);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_kernel(const __grid_constant__ AttnArgs a) {
  using Smem = AttnSmem<T, D>;
  constexpr int kChunks = D / 8;     // 16-byte chunks per row
  constexpr int kNT = D / 32;        // n-tiles of 8 channels per warp in O
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);

  const int b = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gid = lane >> 2, tq = lane & 3;  // MMA fragment coordinates
  const AttendSet set = attend_set(a, b, h);
  const int64_t per = split_positions(set.total, a.num_splits);
  const int64_t begin = split * per;
  if (a.num_splits > 1 && begin >= set.total) return;  // nothing for this split (uniform)
  const int64_t end = min64(begin + per, set.total);
  const int group = a.group;

  const T* q = static_cast<const T*>(a.q) + b * a.q_stride_batch +
               static_cast<int64_t>(h) * group * a.q_stride_head;
  for (int i = tid; i < kRows * D; i += kThreads) {
    const int row = i / D, d = i % D;
    s.q[row][d] = row < group ? q[row * a.q_stride_head + d] : from_float<T>(0.0f);
  }

  const T* kbase = static_cast<const T*>(a.k);
  const T* vbase = static_cast<const T*>(a.v);
  const int32_t* pages = a.page_table + b * a.page_table_stride_batch;
  const int32_t* list = a.block_indices
                            ? a.block_indices + b * a.bi_stride_batch + h * a.bi_stride_head
                            : nullptr;
  const int64_t page_mask = (int64_t{1} << a.log2_page) - 1;
  const int64_t block_mask = (int64_t{1} << set.log2_bs) - 1;

  // Warp 0: row offsets of tile `tile` into slot `slot` (lane = row).
  auto offsets = [&](int64_t tile, int slot) {
    const int64_t pos = begin + tile * kTileN + lane;
    int64_t ko = -1, vo = -1;
    if (pos < end) {
      const int64_t i = pos >> set.log2_bs;
      int64_t block = i;  // dense: the identity (the last, partial page included)
      bool block_ok = true;
      if (list != nullptr) {
        if (i < set.count) {  // a listed block: skipped unless in [0, n)
          block = list[i * a.bi_stride_slot];
          block_ok = block >= 0 && block < set.num_blocks;
        } else {
          block = set.num_blocks;  // the partial tail [n bs, L)
        }
      }
      const int64_t token = block_ok ? (block << set.log2_bs) + (pos & block_mask) : set.len;
      if (token < set.len) {
        const int64_t page = pages[(token >> a.log2_page) * a.page_table_stride_page];
        if (page >= 0 && page < a.num_pages) {
          const int64_t in_page = token & page_mask;
          ko = page * a.k_stride_page + in_page * a.k_stride_token + h * a.k_stride_head;
          vo = page * a.v_stride_page + in_page * a.v_stride_token + h * a.v_stride_head;
        }
      }
    }
    s.k_off[slot][lane] = ko;
    s.v_off[slot][lane] = vo;
  };
  // All threads: cp.async of a tile's K and V rows into `stage`.
  auto issue = [&](int stage, int slot) {
#pragma unroll
    for (int it = 0; it < kTileN * kChunks / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int row = i / kChunks, ch = i % kChunks;
      const int64_t ko = s.k_off[slot][row], vo = s.v_off[slot][row];
      cp_async_16(&s.k[stage][row][ch * 8], kbase + (ko >= 0 ? ko + ch * 8 : 0), ko >= 0);
      cp_async_16(&s.v[stage][row][ch * 8], vbase + (vo >= 0 ? vo + ch * 8 : 0), vo >= 0);
    }
  };

  const int64_t num_tiles = end > begin ? ceil_div(end - begin, kTileN) : 0;
  if (num_tiles > 0) {
    if (warp == 0) {
      offsets(0, 0);
      if (num_tiles > 1) offsets(1, 1);
    }
    __syncthreads();
    issue(0, 0);
  }
  cp_async_commit();

  float m_run[2] = {-INFINITY, -INFINITY};  // running max (log2 units) of rows gid, gid + 8
  float l_run[2] = {0.0f, 0.0f};            // running sum of exp2(x - m)
  float o[kNT][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;

  for (int64_t t = 0; t < num_tiles; ++t) {
    const int stage = static_cast<int>(t & 1);
    const int slot = static_cast<int>(t % 3);
    if (t + 1 < num_tiles) issue(static_cast<int>((t + 1) & 1), static_cast<int>((t + 1) % 3));
    cp_async_commit();
    if (warp == 0 && t + 2 < num_tiles) offsets(t + 2, static_cast<int>((t + 2) % 3));
    cp_async_wait<1>();
    __syncthreads();

    // S = Q K^T for positions [8 warp, 8 warp + 8) of the tile.
    float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk) {
      uint32_t kb[4], qa[4];
      ldmatrix_x4(kb, &s.k[stage][warp * 8 + (lane & 7)][kk * 32 + (lane >> 3) * 8]);
      ldmatrix_x4(qa, &s.q[lane & 15][kk * 32 + (lane >> 4) * 8]);
      mma_16816<T>(sc, qa, kb[0], kb[1]);
      ldmatrix_x4(qa, &s.q[lane & 15][kk * 32 + 16 + (lane >> 4) * 8]);
      mma_16816<T>(sc, qa, kb[2], kb[3]);
    }
    const int col = warp * 8 + tq * 2;  // tile positions of sc[0] / sc[1] (rows gid, gid + 8)
    const bool ok0 = s.k_off[slot][col] >= 0, ok1 = s.k_off[slot][col + 1] >= 0;
    float x[4];
    x[0] = ok0 ? sc[0] * a.scale_log2 : -INFINITY;
    x[1] = ok1 ? sc[1] * a.scale_log2 : -INFINITY;
    x[2] = ok0 ? sc[2] * a.scale_log2 : -INFINITY;
    x[3] = ok1 ? sc[3] * a.scale_log2 : -INFINITY;

    // Online softmax: the tile's row maxima over the 4 warps (fmaxf drops NaN; a NaN logit still
    // makes the row NaN through its weight below, as in the reference).
    float mx[2] = {fmaxf(x[0], x[1]), fmaxf(x[2], x[3])};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 2));
    }
    if (tq == 0) {
      s.red_max[warp][gid] = mx[0];
      s.red_max[warp][gid + 8] = mx[1];
    }
    __syncthreads();
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = gid + 8 * r;
      const float tile_max = fmaxf(fmaxf(s.red_max[0][row], s.red_max[1][row]),
                                   fmaxf(s.red_max[2][row], s.red_max[3][row]));
      const float m_new = fmaxf(m_run[r], tile_max);
      m_use[r] = m_new == -INFINITY ? 0.0f : m_new;  // all -inf so far: weights exp2(-inf) = 0
      alpha[r] = exp2f(m_run[r] - m_use[r]);
      m_run[r] = m_new;
    }
    float p[4];
    p[0] = exp2f(x[0] - m_use[0]);
    p[1] = exp2f(x[1] - m_use[0]);
    p[2] = exp2f(x[2] - m_use[1]);
    p[3] = exp2f(x[3] - m_use[1]);
    T hi[4], lo[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      hi[e] = from_float<T>(p[e]);
      lo[e] = from_float<T>(p[e] - to_float(hi[e]));
    }
    *reinterpret_cast<uint32_t*>(&s.p_hi[gid][col]) = pack2(hi[0], hi[1]);
    *reinterpret_cast<uint32_t*>(&s.p_hi[gid + 8][col]) = pack2(hi[2], hi[3]);
    *reinterpret_cast<uint32_t*>(&s.p_lo[gid][col]) = pack2(lo[0], lo[1]);
    *reinterpret_cast<uint32_t*>(&s.p_lo[gid + 8][col]) = pack2(lo[2], lo[3]);
    float sum[2] = {p[0] + p[1], p[2] + p[3]};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      sum[r] += __shfl_xor_sync(kFullMask, sum[r], 1);
      sum[r] += __shfl_xor_sync(kFullMask, sum[r], 2);
    }
    if (tq == 0) {
      s.red_sum[warp][gid] = sum[0];
      s.red_sum[warp][gid + 8] = sum[1];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = gid + 8 * r;
      l_run[r] = l_run[r] * alpha[r] + ((s.red_sum[0][row] + s.red_sum[1][row]) +
                                        (s.red_sum[2][row] + s.red_sum[3][row]));
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      o[nt][0] *= alpha[0];
      o[nt][1] *= alpha[0];
      o[nt][2] *= alpha[1];
      o[nt][3] *= alpha[1];
    }

    // O += P V for channels [warp D/4, (warp + 1) D/4).
#pragma unroll
    for (int ks = 0; ks < kTileN / 16; ++ks) {
      uint32_t ah[4], al[4];
      ldmatrix_x4(ah, &s.p_hi[lane & 15][ks * 16 + (lane >> 4) * 8]);
      ldmatrix_x4(al, &s.p_lo[lane & 15][ks * 16 + (lane >> 4) * 8]);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        const int n0 = warp * (D / 4) + np * 16;
        uint32_t vb[4];
        ldmatrix_x4_trans(
            vb, &s.v[stage][ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8][n0 + (lane >> 4) * 8]);
        mma_16816<T>(o[2 * np], ah, vb[0], vb[1]);
        mma_16816<T>(o[2 * np], al, vb[0], vb[1]);
        mma_16816<T>(o[2 * np + 1], ah, vb[2], vb[3]);
        mma_16816<T>(o[2 * np + 1], al, vb[2], vb[3]);
      }
    }
    __syncthreads();  // stage, P and the reductions are reused by the next tile
  }

  // Results of rows gid and gid + 8, channels warp D/4 + nt 8 + 2 tq (+1).
  const int64_t hq = static_cast<int64_t>(a.num_kv_heads) * group;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = gid + 8 * r;
    if (row >= group) continue;
    const int64_t qh = static_cast<int64_t>(h) * group + row;
    const float l = l_run[r];
    if (a.num_splits == 1) {
      T* out = static_cast<T*>(a.out) + b * a.out_stride_batch + qh * a.out_stride_head;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int c = warp * (D / 4) + nt * 8 + tq * 2;
        // Empty set: 0. Otherwise o / l (l = 0 only when every logit is -inf: NaN, as on the CPU).
        out[c] = from_float<T>(set.total == 0 ? 0.0f : o[nt][2 * r] / l);
        out[c + 1] = from_float<T>(set.total == 0 ? 0.0f : o[nt][2 * r + 1] / l);
      }
      if (a.lse != nullptr && warp == 0 && tq == 0) {
        a.lse[b * a.lse_stride_batch + qh * a.lse_stride_head] =
            set.total == 0 ? -INFINITY : (l == 0.0f ? NAN : (m_run[r] + log2f(l)) * kLn2);
      }
    } else {
      const int64_t at = (static_cast<int64_t>(split) * a.batch + b) * hq + qh;
      float* part = a.part_out + at * D;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int c = warp * (D / 4) + nt * 8 + tq * 2;
        *reinterpret_cast<float2*>(part + c) = make_float2(o[nt][2 * r] / l, o[nt][2 * r + 1] / l);
      }
      if (warp == 0 && tq == 0) a.part_lse[at] = l == 0.0f ? -INFINITY : m_run[r] + log2f(l);
    }
  }
}

// One warp per (sequence, query head): out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max).
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_kernel(const __grid_constant__ AttnArgs a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t hq = static_cast<int64_t>(a.num_kv_heads) * a.group;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= a.batch * hq) return;
  const int b = static_cast<int>(row / hq);
  const int64_t qh = row % hq;
  const int h = static_cast<int>(qh / a.group);
  const int D = a.head_dim;
  const AttendSet set = attend_set(a, b, h);
  const int64_t per = split_positions(set.total, a.num_splits);
  const int active = set.total == 0 ? 0 : static_cast<int>(ceil_div(set.total, per));
  const int64_t stride = static_cast<int64_t>(a.batch) * hq;  // between splits
  float peak = -INFINITY;
  for (int sp = 0; sp < active; ++sp) peak = fmaxf(peak, a.part_lse[sp * stride + row]);
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  float total = 0.0f;
  for (int sp = 0; sp < active; ++sp) {
    // All -inf: peak = -inf and w = NaN, which makes the row NaN like the reference.
    const float w = exp2f(a.part_lse[sp * stride + row] - peak);
    if (w == 0.0f) continue;  // a split with no finite weight (its o is 0/0)
    total += w;
    const float* part = a.part_out + (sp * stride + row) * D;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (32 * k < D) acc[k] += w * part[lane + 32 * k];
    }
  }
  T* out = static_cast<T*>(a.out) + b * a.out_stride_batch + qh * a.out_stride_head;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if (32 * k < D) out[lane + 32 * k] = from_float<T>(active == 0 ? 0.0f : acc[k] / total);
  }
  if (a.lse != nullptr && lane == 0) {
    a.lse[b * a.lse_stride_batch + qh * a.lse_stride_head] =
        active == 0 ? -INFINITY : (peak + log2f(total)) * kLn2;
  }
}

// Raises the dynamic shared-memory limit of a kernel once per device when it needs > 48 KiB.
template <typename Kernel>
void ensure_smem(Kernel kernel, size_t bytes, std::atomic<uint64_t>& configured) {
  if (bytes <= 48 * 1024) return;
  int device = 0;
  ABSPARSE_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (configured.load(std::memory_order_relaxed) & bit)) return;
  ABSPARSE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes)));
  configured.fetch_or(bit, std::memory_order_relaxed);
}

template <typename T, int D>
void launch_attention(const AttnArgs& a, cudaStream_t stream) {
  static std::atomic<uint64_t> configured{0};
  const size_t smem = sizeof(AttnSmem<T, D>);
  ensure_smem(attention_kernel<T, D>, smem, configured);
  const dim3 grid(a.batch, a.num_kv_heads, a.num_splits);
  attention_kernel<T, D><<<grid, kThreads, smem, stream>>>(a);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
  if (a.num_splits > 1) {
    const int64_t rows = static_cast<int64_t>(a.batch) * a.num_kv_heads * a.group;
    merge_kernel<T><<<static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(a);
    ABSPARSE_CUDA_CHECK(cudaGetLastError());
  }
}

void check_attention(const char* fn, const DecodeAttentionParams& p) {
  const BatchGeometry& g = p.geometry;
  ABSPARSE_CHECK_ARG(g.num_kv_heads > 0 && g.num_kv_heads <= kCudaMaxKvHeads, fn,
                     "k_cache: the CUDA kernels support 1 to ", kCudaMaxKvHeads,
                     " KV heads, got ", g.num_kv_heads);
  ABSPARSE_CHECK_ARG(p.num_q_heads > 0 && p.num_q_heads % g.num_kv_heads == 0, fn,
                     "q: expected a number of query heads that is a positive multiple of the ",
                     g.num_kv_heads, " KV heads, got ", p.num_q_heads);
  ABSPARSE_CHECK_ARG(p.num_q_heads / g.num_kv_heads <= kCudaMaxGroup, fn,
                     "q: the CUDA kernels support up to ", kCudaMaxGroup,
                     " query heads per KV head, got ", p.num_q_heads / g.num_kv_heads);
  ABSPARSE_CHECK_ARG(is_power_of_two(g.page_size), fn, "page_size: expected a power of two, got ",
                     g.page_size);
  ABSPARSE_CHECK_ARG(g.batch >= 0 && g.max_pages >= 0 && g.num_pages >= 0, fn,
                     "batch, max_pages, num_pages: expected >= 0, got ", g.batch, ", ",
                     g.max_pages, ", ", g.num_pages);
  ABSPARSE_CHECK_ARG(std::isfinite(p.scale), fn, "scale: expected a finite value, got ", p.scale);
  for (int which = 0; which < 2; ++which) {
    const PagedCacheView& c = which == 0 ? p.k_cache : p.v_cache;
    const char* name = which == 0 ? "k_cache" : "v_cache";
    const bool aligned = reinterpret_cast<uintptr_t>(c.data) % 16 == 0 && c.stride_page % 8 == 0 &&
                         c.stride_token % 8 == 0 && c.stride_head % 8 == 0 &&
                         c.stride_page >= 0 && c.stride_token >= 0 && c.stride_head >= 0;
    ABSPARSE_CHECK_ARG(aligned, fn, name, ": the CUDA kernels read 16-byte rows: expected a ",
                       "16-byte aligned data pointer and page/token/head strides that are ",
                       "non-negative multiples of 8 elements, got strides (", c.stride_page, ", ",
                       c.stride_token, ", ", c.stride_head, ")");
  }
  if (p.block_sizes != nullptr) {
    for (int h = 0; h < g.num_kv_heads; ++h) {
      const int32_t bs = p.block_sizes[h];
      ABSPARSE_CHECK_ARG(is_power_of_two(bs) && g.page_size % bs == 0, fn, "block_sizes[", h,
                         "]: expected a power of two dividing page_size ", g.page_size, ", got ",
                         bs);
    }
    ABSPARSE_CHECK_ARG(p.max_blocks >= 0, fn, "block_indices: expected a capacity >= 0, got ",
                       p.max_blocks);
  }
}

}  // namespace

// Split-KV decision, from capacities only (never from seq_lens, counts or the batch size):
// S = clamp(ceil(C / 256), 1, 32) with C the most positions one (sequence, head) can attend:
// dense max_pages * P; sparse min(max_pages * P, max_h(max_blocks * bs_h + bs_h - 1)). At run time
// (b, h) attends `total` positions split into ceil(total / per) active CTAs of
// per = roundup32(max(ceil(total / S), 128)) positions. Example: a 32K-token page table with the
// default max_blocks (C = 32768) gives S = 32; a sequence attending 2100 positions then runs 17
// CTAs of 128 positions (one wave at batch 1 with 8 KV heads); a 90-token sequence runs one.
int32_t num_splits(const DecodeAttentionParams& p) {
  const BatchGeometry& g = p.geometry;
  const int64_t capacity = static_cast<int64_t>(g.max_pages) * g.page_size;
  int64_t most = capacity;  // dense: every token the page table can hold
  if (p.block_sizes != nullptr) {
    most = 0;
    for (int h = 0; h < g.num_kv_heads; ++h) {
      const int64_t bs = p.block_sizes[h];
      most = max64(most, min64(capacity, static_cast<int64_t>(p.max_blocks) * bs + bs - 1));
    }
  }
  return static_cast<int32_t>(clamp64(ceil_div(most, kSplitCapacityTokens), 1, kMaxSplits));
}

void run_decode_attention(const DecodeAttentionParams& p, void* workspace) {
  const bool sparse = p.block_sizes != nullptr;
  const char* fn = sparse ? "sparse_decode" : "dense_decode";
  check_attention(fn, p);
  const BatchGeometry& g = p.geometry;
  const int group = p.num_q_heads / g.num_kv_heads;
  ABSPARSE_DISPATCH_HALF(fn, "q", p.dtype, T, [&] {
    ABSPARSE_DISPATCH_HEAD_DIM(fn, g.head_dim, kDim, [&] {
      if (g.batch == 0) return;
      AttnArgs a{};
      a.q = p.q;
      a.q_stride_batch = p.q_stride_batch;
      a.q_stride_head = p.q_stride_head;
      a.k = p.k_cache.data;
      a.k_stride_page = p.k_cache.stride_page;
      a.k_stride_token = p.k_cache.stride_token;
      a.k_stride_head = p.k_cache.stride_head;
      a.v = p.v_cache.data;
      a.v_stride_page = p.v_cache.stride_page;
      a.v_stride_token = p.v_cache.stride_token;
      a.v_stride_head = p.v_cache.stride_head;
      a.seq_lens = g.seq_lens;
      a.seq_lens_stride = g.seq_lens_stride;
      a.page_table = g.page_table;
      a.page_table_stride_batch = g.page_table_stride_batch;
      a.page_table_stride_page = g.page_table_stride_page;
      if (sparse) {
        a.block_indices = p.block_indices;
        a.bi_stride_batch = p.block_indices_stride_batch;
        a.bi_stride_head = p.block_indices_stride_head;
        a.bi_stride_slot = p.block_indices_stride_slot;
        a.block_counts = p.block_counts;
        a.bc_stride_batch = p.block_counts_stride_batch;
        a.bc_stride_head = p.block_counts_stride_head;
        a.max_blocks = p.max_blocks;
        for (int h = 0; h < g.num_kv_heads; ++h) {
          a.log2_block[h] = static_cast<uint8_t>(log2_exact(p.block_sizes[h]));
        }
      }
      a.num_pages = g.num_pages;
      a.capacity = static_cast<int64_t>(g.max_pages) * g.page_size;
      a.log2_page = log2_exact(g.page_size);
      a.batch = g.batch;
      a.num_kv_heads = g.num_kv_heads;
      a.group = group;
      a.head_dim = g.head_dim;
      a.num_splits = num_splits(p);
      a.scale_log2 = static_cast<float>(p.scale * static_cast<double>(kLog2e));
      a.out = p.out;
      a.out_stride_batch = p.out_stride_batch;
      a.out_stride_head = p.out_stride_head;
      a.lse = p.lse;
      a.lse_stride_batch = p.lse_stride_batch;
      a.lse_stride_head = p.lse_stride_head;
      if (a.num_splits > 1) {
        ABSPARSE_CHECK_ARG(workspace != nullptr, fn, "workspace: expected ",
                           decode_attention_workspace_size(p),
                           " bytes (decode_attention_workspace_size), got none");
        const int64_t rows = static_cast<int64_t>(a.num_splits) * g.batch * p.num_q_heads;
        a.part_out = static_cast<float*>(workspace);
        a.part_lse = a.part_out + rows * g.head_dim;
      }
      ABSPARSE_CHECK_ARG(g.batch <= INT32_MAX, fn, "batch: too large for one launch: ", g.batch);
      launch_attention<T, kDim>(a, to_stream(p.stream));
    });
  });
}

}  // namespace absparse::cuda

namespace absparse {

int32_t decode_attention_num_splits(const DecodeAttentionParams& p) { return cuda::num_splits(p); }

size_t decode_attention_workspace_size(const DecodeAttentionParams& p) {
  if (p.geometry.batch <= 0 || p.num_q_heads <= 0 || p.geometry.head_dim <= 0) return 0;
  const int64_t splits = cuda::num_splits(p);
  if (splits <= 1) return 0;
  const int64_t rows = splits * p.geometry.batch * p.num_q_heads;
  return static_cast<size_t>(rows * (p.geometry.head_dim + 1)) * sizeof(float);
}

void decode_attention_cuda(const DecodeAttentionParams& p, void* workspace) {
  cuda::run_decode_attention(p, workspace);
}

}  // namespace absparse

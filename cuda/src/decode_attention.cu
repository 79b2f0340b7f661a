// sparse_decode / dense_decode on the GPU (docs/decode.md, "Sparse attention"): one launch.
//
// The attended set of (sequence b, KV head h) is a list of entries of 2^log2_bs positions each:
// sparse, the `count` listed blocks of bs_h tokens, then the partial tail [n bs_h, L_b) as one more
// entry; dense, the pages of the sequence (identity list, bs = P, the last page partial). An entry
// never spans a page (bs_h divides P), so one page-table lookup per entry gives the address of all
// its rows: every head's block size runs in the same launch with no per-token index expansion.
//
// attention_kernel<T, D, kNT>: grid (S, Hk, B), clusters of (S, 1, 1), 128 threads (4 warps).
// The S CTAs of a cluster split the positions of (b, h) into equal ranges (multiples of the
// 64-position tile; S from capacities only, so a sequence's results never depend on the rest of
// the batch) and attend them for the G query heads of the group (one K/V read per group):
//   - prologue: the CTA's entries are resolved once (block list -> page table -> K/V row bases in
//     shared memory, all entries in parallel); ranges of more than kMaxEntries entries run in
//     segments;
//   - K and V tiles of 64 rows stream into shared memory with 16-byte cp.async (zero-filled for
//     masked rows), `stages` buffers deep, one barrier per tile; the rows' global byte addresses
//     (0: masked) are computed once per tile (64 threads, from the resolved entries) a tile ahead
//     of its copies, so a copy costs a shared load, a null test, an add and the cp.async (with
//     element offsets and a computed source size it was ~20 instructions: 38 % of all at batch 1);
//   - each warp owns 16 positions of a tile for both products, with its own online softmax (no
//     cross-warp reduction per tile), operands swapped so that positions are the MMA's M and the
//     group's heads its N (8 per n-tile, kNT = ceil(G / 8)): S^T = K Q^T, O^T += V^T P^T, with P
//     split into a high and a low 16-bit part (P = hi + lo to ~2^-16) so P V keeps float32
//     accuracy;
//   - merge: the 4 warps' (m, l, O) combine in shared memory into the CTA's partial; after a
//     cluster barrier each CTA combines the S partials for a share of the outputs, reading the
//     other CTAs' shared memory (distributed shared memory) in rank order: deterministic, no
//     workspace, no second launch.
#include <cooperative_groups.h>

#include <atomic>

#include "common.cuh"
#include "mma.cuh"

namespace absparse::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileRows = 16 * kWarps;   // positions per tile: 16 per warp
constexpr int kPad = 8;                  // q / P row padding in elements (16 bytes): conflict-free
constexpr int kMaxEntries = 128;         // entries resolved per segment
constexpr int kMaxClusterSplits = 16;
constexpr int64_t kSplitTargetPositions = 512;  // S = ceil(capacity positions / this), capped
constexpr int64_t kSplitGranule = 16;           // a CTA's positions: a multiple of one warp's rows
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr size_t kSmemLimit = 227 * 1024;

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
  int num_kv_heads, group;
  int num_splits;  // S, the cluster size
  int stages;      // K/V tile buffers
  float scale_log2;  // scale * log2(e)
  void* out;
  int64_t out_stride_batch, out_stride_head;
  float* lse;  // may be null
  int64_t lse_stride_batch, lse_stride_head;
  uint8_t log2_block[kCudaMaxKvHeads];
};

// The attended positions of (b, h): `count` entries of 1 << log2_bs positions, then the tail.
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

// Shared memory of one CTA (T = element type, kG = 8 kNT padded heads). K and V tiles are
// [kTileRows][D] with the 16-byte chunks of a row XOR-swizzled by (row & 7): the 8 rows an
// ldmatrix reads at one logical chunk hit 8 different bank groups, with no padding (which keeps
// 3 stages of 64-row tiles for D = 128 under 113 KB: 2 CTAs per multiprocessor).
template <typename T, int D, int kNT>
struct AttnLayout {
  static constexpr int kG = 8 * kNT;
  static constexpr int kQStride = D + kPad;
  static constexpr int kPStride = 16 + kPad;
  static constexpr size_t kTileBytes = sizeof(T) * kTileRows * D;  // one K or V tile
  struct Fixed {
    T q[kG][kQStride];
    T p[kWarps][kNT][2][8][kPStride];      // per warp: P (hi, lo) [head][position]
    int64_t k_base[kMaxEntries];           // element offset of an entry's first K row; -1: masked
    int64_t v_base[kMaxEntries];
  };
  // After the tiles (or the merge area): the global byte address of each row of the stages + 1
  // tiles whose addresses are held (the stages in flight and the next one), K then V; 0: masked.
  static constexpr size_t kRowOffsetBytes = 2 * sizeof(uint64_t) * kTileRows;
  // Merge area (reuses the tile buffers once the pipeline has drained): the 4 warps' partials,
  // then the CTA's partial that the other CTAs of the cluster read.
  struct Merge {
    float m[kWarps][kG];
    float l[kWarps][kG];
    int valid[kWarps];
    float o[kWarps][kG][D];
    float cta_m[kG], cta_l[kG];
    int cta_valid;
    float cta_o[kG][D];
  };
  static __host__ __device__ size_t tile_area_bytes(int stages) {
    const size_t tiles = 2 * kTileBytes * stages;
    const size_t merge = (sizeof(Merge) + 15) / 16 * 16;
    return tiles > merge ? tiles : merge;
  }
  static size_t bytes(int stages) {
    return sizeof(Fixed) + tile_area_bytes(stages) + (stages + 1) * kRowOffsetBytes;
  }
};

template <typename T, int D, int kNT>
__global__ void __launch_bounds__(kThreads)
    attention_kernel(const __grid_constant__ AttnArgs a) {
  using L = AttnLayout<T, D, kNT>;
  using Fixed = typename L::Fixed;
  using Merge = typename L::Merge;
  constexpr int kG = L::kG;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(kThreads % kChunks == 0 && kTileRows % (kThreads / kChunks) == 0, "copy map");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Fixed& fx = *reinterpret_cast<Fixed*>(smem_raw);
  unsigned char* tiles = smem_raw + sizeof(Fixed);
  Merge& mg = *reinterpret_cast<Merge*>(tiles);
  const int stages = a.stages;
  const int offset_slots = stages + 1;  // 3 or 4
  // Offset slot of a tile: a constant-divisor remainder (a 64-bit remainder by a run-time value
  // is a software division, three per tile: dense batch 1 ran 8-10 % slower with it on the
  // H200). Tiles of a segment fit in 32 bits.
  auto slot_of = [offset_slots](int64_t tile) {
    const uint32_t t = static_cast<uint32_t>(tile);
    return static_cast<int>(offset_slots == 4 ? t & 3u : t % 3u);
  };
  uint64_t* row_k = reinterpret_cast<uint64_t*>(tiles + L::tile_area_bytes(stages));  // [slot][row]
  uint64_t* row_v = row_k + offset_slots * kTileRows;
  auto k_tile = [&](int stage) { return reinterpret_cast<T*>(tiles + (2 * stage) * L::kTileBytes); };
  auto v_tile = [&](int stage) {
    return reinterpret_cast<T*>(tiles + (2 * stage + 1) * L::kTileBytes);
  };

  cg::cluster_group cluster = cg::this_cluster();
  const int split = static_cast<int>(cluster.block_rank());
  const int S = a.num_splits;
  const int h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gid = lane >> 2, tq = lane & 3;
  const int group = a.group;

  // Queries of the group, rows padded with zeros to kG (q rows may have any alignment).
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride_batch +
               static_cast<int64_t>(h) * group * a.q_stride_head;
  for (int i = tid; i < kG * D; i += kThreads) {
    const int row = i / D, d = i % D;
    fx.q[row][d] = row < group ? q[row * a.q_stride_head + d] : from_float<T>(0.0f);
  }

  const AttendSet set = attend_set(a, b, h);
  const int64_t per =
      max64(ceil_div(ceil_div(set.total, S), kSplitGranule) * kSplitGranule, kSplitGranule);
  const int64_t begin = min64(static_cast<int64_t>(split) * per, set.total);
  const int64_t end = min64(begin + per, set.total);
  const int32_t* pages = a.page_table + b * a.page_table_stride_batch;
  const int32_t* list = a.block_indices
                            ? a.block_indices + b * a.bi_stride_batch + h * a.bi_stride_head
                            : nullptr;
  const int log2_bs = set.log2_bs;
  const int64_t block_mask = (int64_t{1} << log2_bs) - 1;
  const T* kbase = static_cast<const T*>(a.k);
  const T* vbase = static_cast<const T*>(a.v);

  // Online softmax state of this warp: heads 8 nt + 2 tq (+1), identical across the gid lanes.
  float m_run[kNT][2], l_part[kNT][2];
  float o[kNT][D / 16][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    m_run[nt][0] = m_run[nt][1] = -INFINITY;
    l_part[nt][0] = l_part[nt][1] = 0.0f;
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) o[nt][mt][0] = o[nt][mt][1] = o[nt][mt][2] = o[nt][mt][3] = 0.0f;
  }
  int valid_rows = 0;  // positions of this warp that were attended (not masked)

  // Segments of at most kMaxEntries entries: [seg_begin, seg_end) positions.
  for (int64_t seg_begin = begin; seg_begin < end;) {
    const int64_t e0 = seg_begin >> log2_bs;
    const int64_t seg_end = min64(end, (e0 + kMaxEntries) << log2_bs);
    const int64_t e1 = ceil_div(seg_end, int64_t{1} << log2_bs);
    __syncthreads();  // the previous segment's entries and tiles are no longer read
    for (int64_t e = e0 + tid; e < e1; e += kThreads) {
      int64_t kb = -1, vb = -1;
      int64_t block = e;  // dense: the identity (the last, partial page included)
      bool ok = true;
      if (list != nullptr) {
        if (e < set.count) {  // a listed block: skipped unless in [0, n)
          block = list[e * a.bi_stride_slot];
          ok = block >= 0 && block < set.num_blocks;
        } else {
          block = set.num_blocks;  // the partial tail [n bs, L)
        }
      }
      if (ok) {
        const int64_t token0 = block << log2_bs;
        const int64_t page = pages[(token0 >> a.log2_page) * a.page_table_stride_page];
        if (page >= 0 && page < a.num_pages) {
          const int64_t in_page = token0 & ((int64_t{1} << a.log2_page) - 1);
          kb = page * a.k_stride_page + in_page * a.k_stride_token + h * a.k_stride_head;
          vb = page * a.v_stride_page + in_page * a.v_stride_token + h * a.v_stride_head;
        }
      }
      fx.k_base[e - e0] = kb;
      fx.v_base[e - e0] = vb;
    }
    __syncthreads();

    const int64_t num_tiles = ceil_div(seg_end - seg_begin, kTileRows);
    // Threads 0..63: the K / V row addresses of tile `tile` into offset slot tile % (stages + 1).
    auto offsets = [&](int64_t tile) {
      if (tid < kTileRows && tile < num_tiles) {
        const int64_t pos = seg_begin + tile * kTileRows + tid;
        uint64_t kp = 0, vp = 0;
        if (pos < seg_end) {
          const int64_t e = (pos >> log2_bs) - e0;
          const int64_t kb = fx.k_base[e];
          if (kb >= 0) {
            const int64_t off = pos & block_mask;
            kp = reinterpret_cast<uint64_t>(kbase + kb + off * a.k_stride_token);
            vp = reinterpret_cast<uint64_t>(vbase + fx.v_base[e] + off * a.v_stride_token);
          }
        }
        const int slot = slot_of(tile);
        row_k[slot * kTileRows + tid] = kp;
        row_v[slot * kTileRows + tid] = vp;
      }
    };
    // All threads: cp.async of a tile's K and V rows, thread -> chunk tid % (D / 8) of rows
    // tid / (D / 8) + kRowsPerPass it, so that a warp's copy instruction reads whole rows (two
    // at D 128). (Two threads per row, each reading its row offsets once, measured 1.3x slower
    // on the H200: each copy instruction then touches 16 rows.)
    constexpr int kRowsPerPass = kThreads / kChunks;
    const int copy_row = tid / kChunks, copy_col = (tid % kChunks) * 8;
    auto issue = [&](int64_t tile, int stage) {
      T* kt = k_tile(stage);
      T* vt = v_tile(stage);
      const uint64_t* krows = row_k + slot_of(tile) * kTileRows + copy_row;
      const uint64_t* vrows = row_v + slot_of(tile) * kTileRows + copy_row;
#pragma unroll
      for (int it = 0; it < kTileRows / kRowsPerPass; ++it) {
        const int row = copy_row + it * kRowsPerPass;
        const uint64_t kp = krows[it * kRowsPerPass], vp = vrows[it * kRowsPerPass];
        cp_async_16(kt + swz<D>(row, copy_col), reinterpret_cast<const T*>(kp) + copy_col,
                    kp != 0);
        cp_async_16(vt + swz<D>(row, copy_col), reinterpret_cast<const T*>(vp) + copy_col,
                    vp != 0);
      }
    };
    for (int t = 0; t < stages - 1; ++t) offsets(t);
    __syncthreads();
    for (int t = 0; t < stages - 1; ++t) {
      if (t < num_tiles) issue(t, t);
      cp_async_commit();
    }
    offsets(stages - 1);

    // stage: the buffer of tile t; fill: the buffer of tile t + stages - 1 (counters, not a
    // remainder by the run-time depth per tile).
    auto next_stage = [stages](int s) { return s + 1 == stages ? 0 : s + 1; };
    int stage = 0, fill = stages - 1;
    for (int64_t t = 0; t < num_tiles; ++t, stage = next_stage(stage), fill = next_stage(fill)) {
      cp_async_wait(stages - 2);  // tile t has landed (this thread's copies)
      __syncthreads();  // everyone's copies and offsets; everyone is done with tile t - 1
      if (t + stages - 1 < num_tiles) issue(t + stages - 1, fill);
      cp_async_commit();
      offsets(t + stages);  // the slot of tile t - 1 (stages + 1 slots), which nobody reads now

      const T* kt = k_tile(stage);
      const T* vt = v_tile(stage);
      const int r0 = 16 * warp;  // this warp's rows of the tile
      const uint64_t* tile_rows = row_k + slot_of(t) * kTileRows;
      const bool ok_lo = tile_rows[r0 + gid] != 0;
      const bool ok_hi = tile_rows[r0 + gid + 8] != 0;
      valid_rows += __popc(__ballot_sync(kFullMask, ok_lo && tq == 0)) +
                    __popc(__ballot_sync(kFullMask, ok_hi && tq == 0));
      if (!__any_sync(kFullMask, ok_lo || ok_hi)) continue;  // nothing of this warp's rows

      // S^T = K Q^T: rows = the warp's 16 positions, columns = heads.
      float sc[kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; kk += 2) {
        uint32_t ka[4], kb2[4];
        const int row = r0 + (lane & 15);
        ldmatrix_x4(ka, kt + swz<D>(row, kk * 16 + (lane >> 4) * 8));
        ldmatrix_x4(kb2, kt + swz<D>(row, (kk + 1) * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          uint32_t qb[4];  // b0b1, b2b3 of k-steps kk and kk + 1
          ldmatrix_x4(qb, &fx.q[nt * 8 + (lane & 7)][kk * 16 + (lane >> 3) * 8]);
          mma_16816<T>(sc[nt], ka, qb[0], qb[1]);
          mma_16816<T>(sc[nt], kb2, qb[2], qb[3]);
        }
      }

      // Online softmax per head column over the warp's 16 positions (log2 units). fmaxf drops a
      // NaN logit from the maximum; its weight exp2(NaN) still makes the head's output NaN.
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        float x[4];
        x[0] = ok_lo ? sc[nt][0] * a.scale_log2 : -INFINITY;
        x[1] = ok_lo ? sc[nt][1] * a.scale_log2 : -INFINITY;
        x[2] = ok_hi ? sc[nt][2] * a.scale_log2 : -INFINITY;
        x[3] = ok_hi ? sc[nt][3] * a.scale_log2 : -INFINITY;
        float alpha[2], p[4];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float mx = fmaxf(x[c], x[c + 2]);
          mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 4));
          mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 8));
          mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 16));
          const float m_new = fmaxf(m_run[nt][c], mx);
          const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // all -inf so far: weights 0
          alpha[c] = exp2f(m_run[nt][c] - m_use);
          m_run[nt][c] = m_new;
          p[c] = exp2f(x[c] - m_use);
          p[c + 2] = exp2f(x[c + 2] - m_use);
          l_part[nt][c] = l_part[nt][c] * alpha[c] + (p[c] + p[c + 2]);
        }
#pragma unroll
        for (int mt = 0; mt < D / 16; ++mt) {
          o[nt][mt][0] *= alpha[0];
          o[nt][mt][1] *= alpha[1];
          o[nt][mt][2] *= alpha[0];
          o[nt][mt][3] *= alpha[1];
        }
        // P (hi, lo) -> shared memory as [head][position] for the B operand of O^T += V^T P^T.
        T(*phi)[L::kPStride] = fx.p[warp][nt][0];
        T(*plo)[L::kPStride] = fx.p[warp][nt][1];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int head = 2 * tq + (e & 1), pos = gid + 8 * (e >> 1);
          const T hi = from_float<T>(p[e]);
          phi[head][pos] = hi;
          plo[head][pos] = from_float<T>(p[e] - to_float(hi));
        }
      }
      __syncwarp();

      // O^T += V^T P^T: rows = channels (16 per m-tile), columns = heads.
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        uint32_t pb[4];  // hi b0b1, hi b2b3, lo b0b1, lo b2b3
        ldmatrix_x4(pb, &fx.p[warp][nt][lane >> 4][lane & 7][((lane >> 3) & 1) * 8]);
#pragma unroll
        for (int mt = 0; mt < D / 16; ++mt) {
          uint32_t va[4];
          ldmatrix_x4_trans(va, vt + swz<D>(r0 + (lane & 7) + ((lane >> 4) << 3),
                                            mt * 16 + ((lane >> 3) & 1) * 8));
          mma_16816<T>(o[nt][mt], va, pb[0], pb[1]);
          mma_16816<T>(o[nt][mt], va, pb[2], pb[3]);
        }
      }
      __syncwarp();  // P is rewritten by the next tile
    }
    cp_async_wait(0);
    seg_begin = seg_end;
  }
  __syncthreads();  // the tile buffers become the merge area

  // 1. Each warp's partial (m, l summed over its positions with a fixed butterfly, O) to shared.
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float l = l_part[nt][c];
      l += __shfl_xor_sync(kFullMask, l, 4);
      l += __shfl_xor_sync(kFullMask, l, 8);
      l += __shfl_xor_sync(kFullMask, l, 16);
      if (gid == 0) {
        mg.m[warp][nt * 8 + 2 * tq + c] = m_run[nt][c];
        mg.l[warp][nt * 8 + 2 * tq + c] = l;
      }
    }
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
      const int head = nt * 8 + 2 * tq, ch = mt * 16 + gid;
      mg.o[warp][head][ch] = o[nt][mt][0];
      mg.o[warp][head + 1][ch] = o[nt][mt][1];
      mg.o[warp][head][ch + 8] = o[nt][mt][2];
      mg.o[warp][head + 1][ch + 8] = o[nt][mt][3];
    }
  }
  if (lane == 0) mg.valid[warp] = valid_rows;
  __syncthreads();

  // 2. The CTA's partial: the 4 warps combined in order (local shared memory).
  for (int idx = tid; idx < group * D; idx += kThreads) {
    const int i = idx / D, ch = idx % D;
    float peak = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) peak = fmaxf(peak, mg.m[w][i]);
    const float m_use = peak == -INFINITY ? 0.0f : peak;
    float acc = 0.0f, l = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wgt = exp2f(mg.m[w][i] - m_use);
      acc += wgt * mg.o[w][i][ch];
      l += wgt * mg.l[w][i];
    }
    mg.cta_o[i][ch] = acc;
    if (ch == 0) {
      mg.cta_m[i] = peak;
      mg.cta_l[i] = l;
    }
  }
  if (tid == 0) mg.cta_valid = mg.valid[0] + mg.valid[1] + mg.valid[2] + mg.valid[3];
  cluster.sync();  // every CTA's partial is written and visible to the cluster

  // 3. The cluster's result: CTA `split` combines the S partials (other CTAs' shared memory,
  //    read in rank order, the loads of one output issued together) for its share of outputs.
  T* out = static_cast<T*>(a.out) + b * a.out_stride_batch;
  for (int idx = split * kThreads + tid; idx < group * D; idx += S * kThreads) {
    const int i = idx / D, ch = idx % D;
    float m[kMaxClusterSplits], l[kMaxClusterSplits], part[kMaxClusterSplits];
    int valid = 0;
#pragma unroll
    for (int r = 0; r < kMaxClusterSplits; ++r) {
      m[r] = -INFINITY;
      l[r] = part[r] = 0.0f;
      if (r < S) {
        const Merge* other = cluster.map_shared_rank(&mg, r);
        m[r] = other->cta_m[i];
        l[r] = other->cta_l[i];
        part[r] = other->cta_o[i][ch];
        valid += other->cta_valid;
      }
    }
    float peak = -INFINITY;
#pragma unroll
    for (int r = 0; r < kMaxClusterSplits; ++r) peak = fmaxf(peak, m[r]);
    const float m_use = peak == -INFINITY ? 0.0f : peak;
    float acc = 0.0f, total = 0.0f;
#pragma unroll
    for (int r = 0; r < kMaxClusterSplits; ++r) {
      const float wgt = exp2f(m[r] - m_use);  // 0 for r >= S and for empty partials
      acc += wgt * part[r];
      total += wgt * l[r];
    }
    // Nothing attended (empty set, or every row masked): out 0, lse -inf. Attended rows but
    // every weight 0 (all logits -inf): 0 / 0 = NaN, as on the CPU.
    const int64_t qh = static_cast<int64_t>(h) * group + i;
    out[qh * a.out_stride_head + ch] = from_float<T>(valid == 0 ? 0.0f : acc / total);
    if (ch == 0 && a.lse != nullptr) {
      a.lse[b * a.lse_stride_batch + qh * a.lse_stride_head] =
          valid == 0 ? -INFINITY : (total == 0.0f ? NAN : (m_use + log2f(total)) * kLn2);
    }
  }
  cluster.sync();  // no CTA leaves while another still reads its shared memory
}

// Raises the dynamic shared-memory limit of a kernel (> 48 KiB) and allows clusters of 16 CTAs,
// once per device.
template <typename Kernel>
void configure_kernel(Kernel kernel, std::atomic<uint64_t>& configured) {
  int device = 0;
  ABSPARSE_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (configured.load(std::memory_order_relaxed) & bit)) return;
  ABSPARSE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kSmemLimit)));
  ABSPARSE_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  configured.fetch_or(bit, std::memory_order_relaxed);
}

// Positions one (sequence, head) typically attends, from capacities only: dense max_pages * P;
// sparse min(max_pages * P, min_h(max_blocks * bs_h + bs_h - 1)). The minimum over heads: with a
// shared token budget every head attends about the same number of positions, and max_blocks (one
// capacity for all heads) is sized by the smallest block size. A head attending more positions
// only gets longer ranges per CTA (speed, never results, depend on this choice).
int64_t typical_positions(const DecodeAttentionParams& p) {
  const BatchGeometry& g = p.geometry;
  const int64_t capacity = static_cast<int64_t>(g.max_pages) * g.page_size;
  if (p.block_sizes == nullptr) return capacity;
  int64_t most = capacity;
  for (int h = 0; h < g.num_kv_heads; ++h) {
    const int64_t bs = p.block_sizes[h];
    most = min64(most, static_cast<int64_t>(p.max_blocks) * bs + bs - 1);
  }
  return most;
}

// CTAs with `stages` tile buffers that one multiprocessor holds at once (shared memory and
// registers), cached per stage count. Times the multiprocessor count it bounds the resident
// CTAs from above (clusters must also fit within GPCs).
template <typename T, int D, int kNT>
int ctas_per_multiprocessor(int stages) {
  using L = AttnLayout<T, D, kNT>;
  static std::atomic<int> cache[4];  // [stages 2, 3]; 0: not asked yet
  int n = cache[stages].load(std::memory_order_relaxed);
  if (n == 0) {
    ABSPARSE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, attention_kernel<T, D, kNT>, kThreads, L::bytes(stages)));
    n = n > 0 ? n : -1;
    cache[stages].store(n, std::memory_order_relaxed);
  }
  return n > 0 ? n : 0;
}

// The launch plan: cluster size S and pipeline depth. S comes from capacities only (so a
// sequence's results never depend on the rest of the batch); the depth changes speed, never
// results. Depth: 3 stages (2 tiles in flight) when all B Hk S CTAs can be resident at once with
// them and a CTA has more than 2 tiles, else 2 stages, which keep the most CTAs
// resident (3 per multiprocessor at D 128 instead of 2): a partial second wave costs a whole
// CTA's latency. Worked example (Llama-3.1-8B heads, D 128, bf16): a 2048-token
// budget with 8-token blocks (max_blocks 256, C = 2055) gives S = 5 CTAs of at most 416
// positions (7 tiles); batch 1 (8 clusters) runs 3 stages, batch 8 (64 clusters, 320 CTAs) 2
// stages in one wave (3 stages would hold only 264 CTAs). Dense over a 128K page table:
// S = 16 CTAs of 8192 positions. Fewer, longer CTAs amortize each CTA's fixed latency (entries ->
// pages -> first tile, the cluster merge); the sequence's own length decides at run time how
// many of the S CTAs have positions.
struct AttnPlan {
  int splits, stages;
  size_t smem;
};

template <typename T, int D, int kNT>
AttnPlan plan_attention(const DecodeAttentionParams& p) {
  using L = AttnLayout<T, D, kNT>;
  static std::atomic<uint64_t> configured{0};
  configure_kernel(attention_kernel<T, D, kNT>, configured);
  const int64_t most = typical_positions(p);
  // Largest cluster the device can co-schedule for this kernel (16 on an H100 / H200).
  static std::atomic<int> cluster_cap{0};
  int cap = cluster_cap.load(std::memory_order_relaxed);
  if (cap == 0) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(kMaxClusterSplits, 1, 1);
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.dynamicSmemBytes = L::bytes(2);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kMaxClusterSplits;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int n = 0;
    ABSPARSE_CUDA_CHECK(cudaOccupancyMaxPotentialClusterSize(&n, attention_kernel<T, D, kNT>, &cfg));
    cap = static_cast<int>(clamp64(n, 1, kMaxClusterSplits));
    cluster_cap.store(cap, std::memory_order_relaxed);
  }
  AttnPlan plan;
  plan.splits = static_cast<int>(clamp64(ceil_div(most, kSplitTargetPositions), 1, cap));
  const int64_t per = ceil_div(ceil_div(most, plan.splits), kSplitGranule) * kSplitGranule;
  const int64_t clusters = static_cast<int64_t>(p.geometry.batch) * p.geometry.num_kv_heads;
  const int64_t resident_ctas_3 =
      static_cast<int64_t>(ctas_per_multiprocessor<T, D, kNT>(3)) * multiprocessor_count();
  plan.stages = 2;
  if (ceil_div(per, kTileRows) > 2 && L::bytes(3) <= kSmemLimit &&
      resident_ctas_3 >= clusters * plan.splits) {
    plan.stages = 3;
  }
  plan.smem = L::bytes(plan.stages);
  return plan;
}

template <typename T, int D, int kNT>
void launch_attention(AttnArgs a, const DecodeAttentionParams& p, cudaStream_t stream) {
  const AttnPlan plan = plan_attention<T, D, kNT>(p);
  a.num_splits = plan.splits;
  a.stages = plan.stages;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(plan.splits, p.geometry.num_kv_heads, p.geometry.batch);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = plan.smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = plan.splits;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  ABSPARSE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, attention_kernel<T, D, kNT>, a));
}

}  // namespace

void run_decode_attention(const DecodeAttentionParams& p) {
  const bool sparse = p.block_sizes != nullptr;
  const char* fn = sparse ? "sparse_decode" : "dense_decode";
  check_decode_attention_cuda(p);
  const BatchGeometry& g = p.geometry;
  if (g.batch == 0) return;
  const int group = p.num_q_heads / g.num_kv_heads;
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
  a.num_kv_heads = g.num_kv_heads;
  a.group = group;
  a.scale_log2 = static_cast<float>(p.scale * static_cast<double>(kLog2e));
  a.out = p.out;
  a.out_stride_batch = p.out_stride_batch;
  a.out_stride_head = p.out_stride_head;
  a.lse = p.lse;
  a.lse_stride_batch = p.lse_stride_batch;
  a.lse_stride_head = p.lse_stride_head;
  const cudaStream_t stream = to_stream(p.stream);
  ABSPARSE_DISPATCH_HALF(fn, "q", p.dtype, T, [&] {
    ABSPARSE_DISPATCH_HEAD_DIM(fn, g.head_dim, kDim, [&] {
      if (group <= 8) {
        launch_attention<T, kDim, 1>(a, p, stream);
      } else {
        launch_attention<T, kDim, 2>(a, p, stream);
      }
    });
  });
}

}  // namespace absparse::cuda

namespace absparse {

void decode_attention_cuda(const DecodeAttentionParams& p) { cuda::run_decode_attention(p); }

}  // namespace absparse

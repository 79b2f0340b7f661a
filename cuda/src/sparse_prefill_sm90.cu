// sparse_prefill on Hopper (absparse/prefill_cuda.h, docs/prefill.md): the warp-specialized
// warpgroup-MMA / TMA kernel, FlashAttention-3's structure applied to listed key blocks. Built only
// with the CUTLASS / CuTe headers (CMake option ABSPARSE_CUTLASS); PrefillKernel::kAuto picks it
// for the configurations check_sparse_prefill_cuda accepts for kSm90, else the mma.sync kernel of
// sparse_prefill.cu runs.
//
// prefill_sm90_kernel<T, D>: grid (Nq, Hq, B), 384 threads = 3 warpgroups, one CTA per SM (160 KiB
// of shared memory at D = 128). CTA (x, h, b) computes query block i = Nq - 1 - x (the longest
// rows first, so the causal tail is short) of sequence b for query head h: 128 query rows.
//   - The tiles: every listed block cut into 128-key tiles, without those that cannot contribute
//     (block index out of range, rows past the sequence, and without key_positions tiles wholly
//     after the CTA's last query). The producer warp and every consumer warp walk the block list
//     themselves (TileWalker, the same code), so they agree on the tiles without passing them
//     through shared memory.
//   - Warpgroup 0 is the producer (its registers given back with setmaxnreg): one warp of it
//     TMA-loads the Q tile once, then per tile n: K_n, then V_(n-1) (V one tile behind, the order
//     in which the consumers need them).
//   - Warpgroups 1 and 2 are consumers, 64 query rows each (the 128 x 128 tile of S split by M).
//     Per tile: S_n = Q K_n^T (wgmma, both operands in shared memory), then O += P_(n-1) V_(n-1)
//     (wgmma, P from registers) is issued before the softmax of S_n so that the tensor cores run
//     the P V product while the warpgroup computes exponentials (FA3's intra-warpgroup overlap);
//     two named barriers alternate the two warpgroups' MMA issue (FA3's ping-pong), so one
//     warpgroup's softmax overlaps the other's MMAs.
//   - Masks: none for a tile wholly at or before the CTA's first query; the causal test key row
//     <= query position on tiles that reach past it (the diagonal); with key_positions the test
//     pos <= t on every tile: while the tile's Q K^T runs, each consumer thread loads the
//     position of one key column from global memory, and its warpgroup shares them through its
//     own double-buffered row of shared memory (one 128-thread named barrier per tile).
//   - Online softmax in log2 units per row in registers; out = O / l rounded to T, lse = (m +
//     log2 l) ln 2; a row with nothing attended gets 0 and -inf.
//
// Pipeline: kStages K stages and kStages V stages, each with a "full" mbarrier (one arrival by the
// producer's lane 0 and the TMA transaction bytes) and an "empty" mbarrier (one arrival per
// consumer warp, after its MMA reading the stage completed). Tile n uses stage n % kStages with
// parity (n / kStages) & 1.
//
// Rows past the end of the sequence: the TMA boxes are cut at T only (sequences are packed), so a
// Q tile or the last K / V tile of a sequence may read rows of the next sequence. Such query rows
// are computed and not stored; such keys are masked (their positions exceed every query of the
// sequence), so they get weight 0 in P V: a NaN or infinite value there would still reach the
// rows of this tile (0 * inf), the same rule as for unattended keys of a processed tile.
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <climits>
#include <type_traits>

#include "absparse/prefill_cuda.h"
#include "common.cuh"
#include "sparse_prefill_sm90.h"

namespace absparse::cuda {
namespace {

using namespace cute;

constexpr int kBlockM = 128;  // query rows per CTA (= q_block)
constexpr int kBlockN = 128;  // keys per tile (k_block is a multiple)
constexpr int kStages = 2;    // K and V stages: 2 x 2 x 32 KiB + 32 KiB of Q at D = 128
constexpr int kConsumerWarpGroups = 2;
constexpr int kConsumerThreads = 128 * kConsumerWarpGroups;
constexpr int kThreads = 128 + kConsumerThreads;
constexpr int kConsumerWarps = kConsumerThreads / 32;
// setmaxnreg budgets: 40 x 128 + 232 x 256 = 64512 of the SM's 65536 registers (the producer
// warp spills below 40: it walks the list and loads key positions).
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;
// Named barriers of the MMA ping-pong: ids kPingPong + w for consumer warpgroup w (CUTLASS offsets
// user ids past its reserved ones).
constexpr int kPingPong = 0;
// Named barriers kPositions + w: consumer warpgroup w's threads after writing key positions.
constexpr int kPositions = 2;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// mbarrier operations with "memory" clobbers: the consumers read the tile row and key positions
// with ordinary loads after a wait, and the producer writes them before an arrive, so the
// compiler must not move memory accesses across these.
__device__ inline void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(cast_smem_ptr_to_uint(bar)),
               "r"(count)
               : "memory");
}
__device__ inline void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(cast_smem_ptr_to_uint(bar))
               : "memory");
}
__device__ inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                   cast_smem_ptr_to_uint(bar)),
               "r"(bytes)
               : "memory");
}
__device__ inline void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}" ::"r"(cast_smem_ptr_to_uint(bar)),
      "r"(parity)
      : "memory");
}

// Accumulator fragment layouts of an m64nNk16 wgmma, per thread ((2, 2, N / 8), MMA_M, MMA_N):
// two adjacent columns, rows r and r + 8, N / 8 column groups of 8.
// As (rows, columns): ((2, MMA_M), (2, N / 8, MMA_N)), so a row's values are one slice.
template <class L>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(L l) {
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}
// As the A operand of a 16-bit m64nNk16 wgmma with the accumulator's columns as its K:
// ((2, 2, 2), MMA_M, N / 16): two column groups of 8 make one K step of 16.
template <class L>
CUTE_HOST_DEVICE constexpr auto acc_as_a_operand(L l) {
  auto groups = logical_divide(get<0, 2>(l), Tile<_2>{});  // ((2, N / 16))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 0>(groups)), get<1>(l),
                     coalesce(make_layout(get<0, 1>(groups), get<2>(l))));
}

// C (+)= A B over the K mode on one warpgroup, issued and committed, not waited for.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
__device__ inline void wgmma(Mma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kRegisterA =
      !std::is_base_of<GMMA::DescriptorIterator, typename Mma::FrgTypeA>::value;
  if constexpr (kRegisterA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kRegisterA) warpgroup_fence_operand(const_cast<TA&>(a));
}

template <typename T, int D>
struct Sm90Config {
  static_assert(D == 64 || D == 128, "the 128-byte swizzle atoms tile D = 64 and 128");
  using TileQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<D>>;  // (M, N, K) of S = Q K^T
  using TilePV = Shape<Int<kBlockM>, Int<D>, Int<kBlockN>>;  // (M, N, K) of O = P V
  using WarpGroups = Layout<Shape<Int<kConsumerWarpGroups>, _1, _1>>;  // split along M
  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, TileQK>(),
                                        WarpGroups{}));
  // V stays as stored ([key, channel], channels contiguous): an MN-major B operand.
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, TilePV, GMMA::Major::K, GMMA::Major::MN>(),
      WarpGroups{}));
  using SmemQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                       Shape<Int<kBlockM>, Int<D>>{}));
  using SmemK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                       Shape<Int<kBlockN>, Int<D>, Int<kStages>>{}));
  // V^T tiles (channel, key, stage).
  using SmemVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{},
                                        Shape<Int<D>, Int<kBlockN>, Int<kStages>>{},
                                        Step<_2, _1, _3>{}));
  // Global views for the TMA descriptors: (token, channel, head) for Q and K, (channel, token,
  // head) for V; 32-bit extents (T < 2^31), 64-bit strides.
  using GShape = Shape<int32_t, int32_t, int32_t>;
  using GStrideQK = Stride<int64_t, _1, int64_t>;
  using GStrideVt = Stride<_1, int64_t, int64_t>;
  using TmaQ = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<T const*>(nullptr)), GShape{},
                                   GStrideQK{}),
      SmemQ{}));
  using TmaK = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<T const*>(nullptr)), GShape{},
                                   GStrideQK{}),
      take<0, 2>(SmemK{})));
  using TmaV = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<T const*>(nullptr)), GShape{},
                                   GStrideVt{}),
      take<0, 2>(SmemVt{})));
  static constexpr uint32_t kTileBytes = kBlockN * D * sizeof(T);  // a K or V tile, and Q
  static_assert(kBlockM == kBlockN, "Q and a K tile share kTileBytes");

  // The 128-byte swizzle repeats every 1024 bytes: tiles are 1024-byte aligned (the launcher
  // aligns the dynamic shared memory base).
  struct Smem {
    alignas(1024) T q[cosize_v<SmemQ>];
    alignas(1024) T k[cosize_v<SmemK>];
    alignas(1024) T v[cosize_v<SmemVt>];
    uint64_t q_full;
    uint64_t k_full[kStages], k_empty[kStages], v_full[kStages], v_empty[kStages];
    // With key_positions: the positions of tile n's keys for consumer warpgroup w in
    // key_pos[w][n % 2] (INT32_MAX past the sequence).
    int32_t key_pos[kConsumerWarpGroups][2][kBlockN];
  };
};

template <typename T, int D>
struct Sm90Args {
  using Config = Sm90Config<T, D>;
  typename Config::TmaQ tma_q;
  typename Config::TmaK tma_k;
  typename Config::TmaV tma_v;
  int32_t total_tokens, num_q_heads, num_kv_heads;
  const int32_t* cu_seqlens;
  int64_t cu_stride;
  int group;  // G
  bool list_per_q_head;
  int k_block, max_blocks;
  const int32_t* block_indices;
  int64_t bi_stride_batch, bi_stride_head, bi_stride_row, bi_stride_slot;
  const int32_t* block_counts;
  int64_t bc_stride_batch, bc_stride_head, bc_stride_row;
  const int32_t* key_positions;  // or null
  int64_t kp_stride_token, kp_stride_head;
  float scale_log2;  // scale * log2(e)
  T* out;
  int64_t out_stride_token, out_stride_head;
  float* lse;  // or null
  int64_t lse_stride_token, lse_stride_head;
};

// Where a CTA works: sequence rows [start, start + len), query rows [q0, q0 + 128).
struct CtaTile {
  int64_t start;
  int32_t len, q0, qblock, h, hk;
};

// The contributing tiles of a CTA's block list, in order: next() returns the first key row
// (within the sequence) of the next tile, or -1 after the last one (and on every later call).
// Warp-cooperative: all 32 lanes call next() together and get the same value; 32 list entries per
// coalesced load, broadcast one at a time.
struct TileWalker {
  const int32_t* list;  // the CTA's row of block_indices
  int64_t stride;       // between its entries
  int32_t count;        // entries listed (clamped to [0, max_blocks])
  int32_t num_kblocks;  // key blocks of the sequence
  int32_t len;          // sequence length
  int32_t q_last;       // the CTA's last query row (within the sequence)
  int32_t k_block;
  bool by_position;     // key_positions: no tile is known to be after every query
  int32_t seg = -32;    // first entry of the loaded group of 32
  int32_t e = 31;       // entry within the group
  int32_t mine = -1;    // this lane's entry of the group
  int32_t j = -1;       // current key block (-1: none)
  int32_t t = 0;        // its next tile

  __device__ int32_t next() {
    const int lane = threadIdx.x % 32;
    for (;;) {
      if (j >= 0 && t * kBlockN < k_block) {
        const int64_t r0 = static_cast<int64_t>(j) * k_block + t * kBlockN;
        ++t;
        if (r0 < len && (by_position || r0 <= q_last)) return static_cast<int32_t>(r0);
        j = -1;  // this block's later tiles are out too
      }
      if (++e >= 32 || seg + e >= count) {
        if (seg >= count) return -1;  // ended (seg stays >= count)
        seg += 32;
        e = 0;
        if (seg >= count) return -1;
        mine = seg + lane < count ? list[static_cast<int64_t>(seg + lane) * stride] : -1;
      }
      j = __shfl_sync(kFullMask, mine, e);
      if (j >= num_kblocks) j = -1;
      t = 0;
    }
  }
};

template <typename T, int D>
__device__ TileWalker tile_walker(const Sm90Args<T, D>& a, const CtaTile& c) {
  TileWalker w;
  const int lh = a.list_per_q_head ? c.h : c.hk;
  w.list = a.block_indices + blockIdx.z * a.bi_stride_batch + lh * a.bi_stride_head +
           c.qblock * a.bi_stride_row;
  w.stride = a.bi_stride_slot;
  w.count = static_cast<int32_t>(clamp64(
      a.block_counts[blockIdx.z * a.bc_stride_batch + lh * a.bc_stride_head +
                     c.qblock * a.bc_stride_row],
      0, a.max_blocks));
  w.num_kblocks = static_cast<int32_t>(ceil_div(c.len, a.k_block));
  w.len = c.len;
  w.q_last = min(c.q0 + kBlockM, c.len) - 1;
  w.k_block = a.k_block;
  w.by_position = a.key_positions != nullptr;
  return w;
}

// The producer warp: Q once, then per contributing tile K_n and V_(n-1).
template <typename T, int D>
__device__ void produce(const Sm90Args<T, D>& a, typename Sm90Config<T, D>::Smem& s,
                        const CtaTile& c) {
  using Config = Sm90Config<T, D>;
  const int lane = threadIdx.x % 32;
  const int32_t start = static_cast<int32_t>(c.start);
  Tensor sQ = make_tensor(make_smem_ptr(s.q), typename Config::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(s.k), typename Config::SmemK{});
  Tensor sVt = make_tensor(make_smem_ptr(s.v), typename Config::SmemVt{});
  // Coordinate tensors of the TMA descriptors, moved to the sequence's first row.
  Tensor mQ = a.tma_q.get_tma_tensor(make_shape(a.total_tokens, D, a.num_q_heads))(_, _, c.h);
  Tensor mK = a.tma_k.get_tma_tensor(make_shape(a.total_tokens, D, a.num_kv_heads))(_, _, c.hk);
  Tensor mVt = a.tma_v.get_tma_tensor(make_shape(D, a.total_tokens, a.num_kv_heads))(_, _, c.hk);
  Tensor gQ = local_tile(domain_offset(make_coord(start, _0{}), mQ),
                         Shape<Int<kBlockM>, Int<D>>{}, make_coord(c.qblock, _0{}));  // (M, D)
  Tensor gK = local_tile(domain_offset(make_coord(start, _0{}), mK),
                         Shape<Int<kBlockN>, Int<D>>{}, make_coord(_, _0{}));  // (N, D, tile)
  Tensor gVt = local_tile(domain_offset(make_coord(_0{}, start), mVt),
                          Shape<Int<D>, Int<kBlockN>>{}, make_coord(_0{}, _));  // (D, N, tile)
  auto cta_q = a.tma_q.get_slice(_0{});
  auto cta_k = a.tma_k.get_slice(_0{});
  auto cta_v = a.tma_v.get_slice(_0{});
  Tensor tQgQ = group_modes<0, 3>(cta_q.partition_S(gQ));   // (TMA)
  Tensor tQsQ = group_modes<0, 3>(cta_q.partition_D(sQ));   // (TMA)
  Tensor tKgK = group_modes<0, 3>(cta_k.partition_S(gK));   // (TMA, tile)
  Tensor tKsK = group_modes<0, 3>(cta_k.partition_D(sK));   // (TMA, stage)
  Tensor tVgV = group_modes<0, 3>(cta_v.partition_S(gVt));  // (TMA, tile)
  Tensor tVsV = group_modes<0, 3>(cta_v.partition_D(sVt));  // (TMA, stage)

  if (lane == 0) {
    mbar_arrive_expect_tx(&s.q_full, Config::kTileBytes);
    copy(a.tma_q.with(s.q_full), tQgQ, tQsQ);
  }

  // K tile n (first key row r0) into stage n % kStages.
  auto load_k = [&](int n, int32_t r0) {
    const int stage = n % kStages;
    if (lane == 0) {
      mbar_wait(&s.k_empty[stage], ((n / kStages) & 1) ^ 1);
      mbar_arrive_expect_tx(&s.k_full[stage], Config::kTileBytes);
      copy(a.tma_k.with(s.k_full[stage]), tKgK(_, r0 / kBlockN), tKsK(_, stage));
    }
  };
  auto load_v = [&](int n, int32_t r0) {
    const int stage = n % kStages;
    if (lane == 0) {
      mbar_wait(&s.v_empty[stage], ((n / kStages) & 1) ^ 1);
      mbar_arrive_expect_tx(&s.v_full[stage], Config::kTileBytes);
      copy(a.tma_v.with(s.v_full[stage]), tVgV(_, r0 / kBlockN), tVsV(_, stage));
    }
  };

  TileWalker tiles = tile_walker(a, c);
  int n = 0;            // tiles issued
  int32_t prev_r0 = 0;  // first key row of tile n - 1
  for (int32_t r0 = tiles.next(); r0 >= 0; r0 = tiles.next()) {
    load_k(n, r0);
    if (n > 0) load_v(n - 1, prev_r0);
    prev_r0 = r0;
    ++n;
  }
  if (n > 0) load_v(n - 1, prev_r0);
}

// Scales a tile's logits to log2 units and applies its mask (-inf): kMode 0 masks nothing, 1 is
// the causal test by key row (r0 + column <= t), 2 by key position (pos[column] <= t). Rows and
// columns come from the identity tensor partitioned like S.
template <int kMode, class TS, class TC>
__device__ inline void mask_and_scale(TS& s_rc, TC const& c_rc, int32_t q0, int32_t r0,
                                      const int32_t* pos, float scale_log2) {
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(s_rc); ++mi) {
    const int32_t t = q0 + get<0>(c_rc(mi, 0));
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(s_rc); ++ni) {
      const int col = get<1>(c_rc(mi, ni));
      const bool seen = kMode == 0 ? true : kMode == 1 ? r0 + col <= t : pos[col] <= t;
      s_rc(mi, ni) = seen ? s_rc(mi, ni) * scale_log2 : -INFINITY;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_sm90_kernel(const __grid_constant__ Sm90Args<T, D> a) {
  using Config = Sm90Config<T, D>;
  using Smem = typename Config::Smem;
  extern __shared__ unsigned char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                     ~uintptr_t{1023});

  CtaTile c;
  c.h = blockIdx.y;
  c.hk = c.h / a.group;
  c.qblock = gridDim.x - 1 - blockIdx.x;
  const int b = blockIdx.z;
  c.start = clamp64(a.cu_seqlens[b * a.cu_stride], 0, a.total_tokens);
  c.len = static_cast<int32_t>(
      clamp64(a.cu_seqlens[(b + 1) * a.cu_stride] - c.start, 0, a.total_tokens - c.start));
  c.q0 = c.qblock * kBlockM;
  if (c.q0 >= c.len) return;  // the whole CTA: no barrier is initialized yet

  if (threadIdx.x == 0) {
    mbar_init(&s.q_full, 1);
    for (int i = 0; i < kStages; ++i) {
      mbar_init(&s.k_full[i], 1);  // the producer's lane 0 (which also expects the bytes)
      mbar_init(&s.v_full[i], 1);
      mbar_init(&s.k_empty[i], kConsumerWarps);
      mbar_init(&s.v_empty[i], kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();  // the initialized barriers visible to the TMA unit
  }
  __syncthreads();  // the last CTA-wide barrier: the warpgroups take separate paths below

  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    if (threadIdx.x < 32) produce<T, D>(a, s, c);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegisters>();

  const int tid = threadIdx.x - 128;  // consumer thread 0 .. 255
  const int wg = tid / 128;           // rows 64 wg .. 64 wg + 63 of the tile
  const int lane = tid % 32;
  typename Config::MmaQK mma_qk;
  typename Config::MmaPV mma_pv;
  Tensor sQ = make_tensor(make_smem_ptr(s.q), typename Config::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(s.k), typename Config::SmemK{});
  Tensor sVt = make_tensor(make_smem_ptr(s.v), typename Config::SmemVt{});
  auto wg_qk = mma_qk.get_slice(wg * 128);
  auto wg_pv = mma_pv.get_slice(wg * 128);
  Tensor tSrQ = wg_qk.partition_fragment_A(sQ);   // descriptors (MMA, MMA_M, MMA_K)
  Tensor tSrK = wg_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = wg_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});  // 64 fp32
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<D>>{});        // D/2 fp32
  Tensor tOrP = make_tensor<T>(acc_as_a_operand(tSrS.layout()));  // P of the previous tile
  // (row, column) of each accumulator element within the CTA's tile.
  Tensor tScS = mma_qk.get_thread_slice(tid).partition_C(
      make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tOcO = mma_pv.get_thread_slice(tid).partition_C(
      make_identity_tensor(Shape<Int<kBlockM>, Int<D>>{}));
  Tensor s_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));  // (2 rows, 32 columns)
  Tensor cs_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  Tensor o_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));  // (2 rows, D / 4 columns)
  Tensor co_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  constexpr int kRows = decltype(size<0>(s_rc))::value;
  static_assert(kRows == 2, "a thread holds rows r and r + 8 of its warp's 16");

  float m_run[kRows], l_run[kRows];  // running max (log2 units) and this thread's partial sum
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    m_run[mi] = -INFINITY;
    l_run[mi] = 0.0f;
  }
  const bool by_position = a.key_positions != nullptr;
  // With key_positions, thread tid % 128 of a warpgroup loads the position of key column
  // tid % 128 of tile n (INT32_MAX past the sequence) while the tile's Q K^T runs, then publishes
  // it in key_pos[wg][n % 2]. Two buffers make one barrier per tile enough: a thread writes tile
  // n + 2's buffer only after the barrier of tile n + 1, which every thread of the warpgroup
  // reaches after reading tile n's.
  const int32_t* kp = by_position
                          ? a.key_positions + c.start * a.kp_stride_token + c.hk * a.kp_stride_head
                          : nullptr;
  int32_t my_pos = INT32_MAX;
  auto load_position = [&](int32_t r0) {
    const int32_t r = r0 + tid % 128;
    my_pos = r < c.len ? __ldg(kp + static_cast<int64_t>(r) * a.kp_stride_token) : INT32_MAX;
  };
  auto publish_positions = [&](int n) {
    s.key_pos[wg][n & 1][tid % 128] = my_pos;
    cutlass::arch::NamedBarrier::sync(128, kPositions + wg);
  };

  // Mask, scale and online softmax of tile n (first key row r0) in s_rc; returns each row's
  // rescale factor of O.
  auto softmax = [&](int32_t r0, int n, float (&alpha)[kRows]) {
    if (by_position) {
      publish_positions(n);
      mask_and_scale<2>(s_rc, cs_rc, c.q0, r0, s.key_pos[wg][n & 1], a.scale_log2);
    } else if (r0 + kBlockN - 1 > c.q0) {  // the tile reaches past the first query: diagonal
      mask_and_scale<1>(s_rc, cs_rc, c.q0, r0, nullptr, a.scale_log2);
    } else {
      mask_and_scale<0>(s_rc, cs_rc, c.q0, r0, nullptr, a.scale_log2);
    }
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      float mx = -INFINITY;
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s_rc); ++ni) mx = fmaxf(mx, s_rc(mi, ni));
      // The 4 lanes of a quad hold the row's other columns.
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float m_new = fmaxf(m_run[mi], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing attended yet: weights 0
      alpha[mi] = exp2f(m_run[mi] - m_use);
      m_run[mi] = m_new;
      float sum = 0.0f;
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s_rc); ++ni) {
        const float p = exp2f(s_rc(mi, ni) - m_use);
        s_rc(mi, ni) = p;
        sum += p;
      }
      l_run[mi] = l_run[mi] * alpha[mi] + sum;
    }
  };
  // P (rounded to T, as FlashAttention does) for the next P V product.
  auto convert_p = [&] {
    Tensor p_acc = make_tensor(tSrS.data(), tOrP.layout());
    cutlass::NumericArrayConverter<T, float, 2> cvt;
    auto src = recast<cutlass::Array<float, 2> const>(p_acc);
    auto dst = recast<cutlass::Array<T, 2>>(tOrP);
    CUTE_UNROLL
    for (int i = 0; i < size(src); ++i) dst(i) = cvt(src(i));
  };
  auto release = [&](uint64_t* bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };

  if (wg == 0) cutlass::arch::NamedBarrier::arrive(kConsumerThreads, kPingPong + 0);  // WG 0 first
  mbar_wait(&s.q_full, 0);

  // Tile 0: S_0 alone, no P V yet.
  TileWalker tiles = tile_walker(a, c);
  int32_t r0 = tiles.next();
  int n = 0;
  float alpha[kRows];
  if (r0 >= 0) {
    mbar_wait(&s.k_full[0], 0);
    wgmma<true>(mma_qk, tSrQ, tSrK(_, _, _, 0), tSrS);
    // The next tile is found while the MMAs run (the walk loads 32 list entries at a time).
    int32_t r_next = tiles.next();
    if (by_position) load_position(r0);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    softmax(r0, 0, alpha);
    release(&s.k_empty[0]);
    convert_p();
    clear(tOrO);
    for (n = 1; r_next >= 0; ++n) {
      const int stage = n % kStages, prev = (n - 1) % kStages;
      r0 = r_next;
      mbar_wait(&s.k_full[stage], (n / kStages) & 1);
      cutlass::arch::NamedBarrier::sync(kConsumerThreads, kPingPong + wg);
      wgmma<true>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
      mbar_wait(&s.v_full[prev], ((n - 1) / kStages) & 1);
      wgmma<false>(mma_pv, tOrP, tOrV(_, _, _, prev), tOrO);
      cutlass::arch::NamedBarrier::arrive(kConsumerThreads, kPingPong + (1 - wg));
      r_next = tiles.next();
      if (by_position) load_position(r0);
      warpgroup_wait<1>();  // S_n done, P_(n-1) V_(n-1) may still run
      warpgroup_fence_operand(tSrS);
      softmax(r0, n, alpha);
      release(&s.k_empty[stage]);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      release(&s.v_empty[prev]);
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(o_rc); ++ni) o_rc(mi, ni) *= alpha[mi];
      }
      convert_p();
    }
    const int last = (n - 1) % kStages;
    mbar_wait(&s.v_full[last], ((n - 1) / kStages) & 1);
    wgmma<false>(mma_pv, tOrP, tOrV(_, _, _, last), tOrO);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
  } else {
    clear(tOrO);
  }
  // Warpgroup 0 received one arrival more than it waited for (its own first one): consume it so
  // no barrier is left half-arrived.
  if (wg == 0) cutlass::arch::NamedBarrier::sync(kConsumerThreads, kPingPong + 0);

  // Epilogue: rows inside the sequence get O / l and lse; a thread's row values are in one quad.
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    float l = l_run[mi];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    const int32_t t = c.q0 + get<0>(co_rc(mi, 0));
    if (t >= c.len) continue;
    const float inv = l == 0.0f ? 0.0f : 1.0f / l;
    T* out = a.out + (c.start + t) * a.out_stride_token + c.h * a.out_stride_head;
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(o_rc); ni += 2) {
      // Columns ni and ni + 1 are adjacent channels (the accumulator's innermost pair).
      const int col = get<1>(co_rc(mi, ni));
      cutlass::Array<float, 2> pair;
      pair[0] = l == 0.0f ? 0.0f : o_rc(mi, ni) * inv;
      pair[1] = l == 0.0f ? 0.0f : o_rc(mi, ni + 1) * inv;
      *reinterpret_cast<cutlass::Array<T, 2>*>(out + col) =
          cutlass::NumericArrayConverter<T, float, 2>{}(pair);
    }
    if (a.lse != nullptr && get<1>(co_rc(mi, 0)) == 0) {
      a.lse[(c.start + t) * a.lse_stride_token + c.h * a.lse_stride_head] =
          l == 0.0f ? -INFINITY : (m_run[mi] + log2f(l)) * kLn2;
    }
  }
}

template <typename T, int D>
void launch(const SparsePrefillParams& p) {
  using Config = Sm90Config<T, D>;
  using GShape = typename Config::GShape;
  const int32_t tokens = static_cast<int32_t>(p.total_tokens);
  Sm90Args<T, D> a{};
  const auto tensor = [&](const void* data, auto stride, int32_t heads, bool channel_first) {
    const GShape shape = channel_first ? GShape(D, tokens, heads) : GShape(tokens, D, heads);
    return make_tensor(make_gmem_ptr(static_cast<T const*>(data)), shape, stride);
  };
  a.tma_q = make_tma_copy(SM90_TMA_LOAD{},
                          tensor(p.q, typename Config::GStrideQK(p.q_stride_token, _1{},
                                                                 p.q_stride_head),
                                 p.num_q_heads, false),
                          typename Config::SmemQ{});
  a.tma_k = make_tma_copy(SM90_TMA_LOAD{},
                          tensor(p.k, typename Config::GStrideQK(p.k_stride_token, _1{},
                                                                 p.k_stride_head),
                                 p.num_kv_heads, false),
                          take<0, 2>(typename Config::SmemK{}));
  a.tma_v = make_tma_copy(SM90_TMA_LOAD{},
                          tensor(p.v, typename Config::GStrideVt(_1{}, p.v_stride_token,
                                                                 p.v_stride_head),
                                 p.num_kv_heads, true),
                          take<0, 2>(typename Config::SmemVt{}));
  a.total_tokens = tokens;
  a.num_q_heads = p.num_q_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.cu_seqlens = p.cu_seqlens;
  a.cu_stride = p.cu_seqlens_stride;
  a.group = p.num_q_heads / p.num_kv_heads;
  a.list_per_q_head = p.num_list_heads == p.num_q_heads;
  a.k_block = p.k_block;
  a.max_blocks = p.max_blocks;
  a.block_indices = p.block_indices;
  a.bi_stride_batch = p.block_indices_stride_batch;
  a.bi_stride_head = p.block_indices_stride_head;
  a.bi_stride_row = p.block_indices_stride_row;
  a.bi_stride_slot = p.block_indices_stride_slot;
  a.block_counts = p.block_counts;
  a.bc_stride_batch = p.block_counts_stride_batch;
  a.bc_stride_head = p.block_counts_stride_head;
  a.bc_stride_row = p.block_counts_stride_row;
  a.key_positions = p.key_positions;
  a.kp_stride_token = p.key_positions_stride_token;
  a.kp_stride_head = p.key_positions_stride_head;
  a.scale_log2 = static_cast<float>(p.scale) * kLog2e;
  a.out = static_cast<T*>(p.out);
  a.out_stride_token = p.out_stride_token;
  a.out_stride_head = p.out_stride_head;
  a.lse = p.lse;
  a.lse_stride_token = p.lse_stride_token;
  a.lse_stride_head = p.lse_stride_head;

  const int smem = static_cast<int>(sizeof(typename Config::Smem)) + 1024;  // + base alignment
  static bool configured[64] = {};
  int device = 0;
  ABSPARSE_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= 64 || !configured[device]) {
    ABSPARSE_CUDA_CHECK(cudaFuncSetAttribute(prefill_sm90_kernel<T, D>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    if (device < 64) configured[device] = true;
  }
  const dim3 grid(static_cast<unsigned>(p.num_q_blocks), static_cast<unsigned>(p.num_q_heads),
                  static_cast<unsigned>(p.batch));
  prefill_sm90_kernel<T, D><<<grid, kThreads, smem, to_stream(p.stream)>>>(a);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_sparse_prefill_sm90(const SparsePrefillParams& p) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64) {
    if (bf16) launch<cutlass::bfloat16_t, 64>(p);
    else launch<cutlass::half_t, 64>(p);
  } else {
    if (bf16) launch<cutlass::bfloat16_t, 128>(p);
    else launch<cutlass::half_t, 128>(p);
  }
}

}  // namespace absparse::cuda

// sparse_prefill on the GPU (absparse/prefill_cuda.h, docs/prefill.md): block-sparse causal
// attention over a packed variable-length batch, one launch. sparse_prefill_cuda dispatches to
// the Hopper kernel of sparse_prefill_sm90.cu (PrefillKernel::kSm90) when it is built and runs
// the arguments; this file's kernel (kFa2) runs everything else.
//
// prefill_kernel<T, D>: grid (Nq * q_block / 64, Hq, B), 128 threads (4 warps). CTA (x, h, b)
// attends the 64 query positions [64 x, 64 x + 64) of sequence b (query block 64 x / q_block,
// whose list it reads) for query head h; warp w owns positions 64 x + 16 w .. + 15.
//   - The listed key blocks become 64-row key tiles (k_block / 64 per block); the tiles that can
//     contribute (block index in range, rows inside the sequence, and, without key_positions,
//     not wholly after the CTA's last query position) are compacted, in list order, into shared
//     memory, a segment of kSegment list entries at a time.
//   - Q rows go to shared memory once and stay in registers as MMA A fragments. K and V tiles
//     stream through two shared-memory buffers with 16-byte cp.async (rows past the sequence
//     zero-filled), with each row's position (key_positions, or its index; INT32_MAX past the
//     sequence, never attended).
//   - S = Q K^T on tensor cores (float32 accumulation), the causal test pos <= t per element,
//     online softmax in log2 units per row; P, rounded to T, is reused from the S accumulators as
//     the A operand of O += P V (FlashAttention's register reuse).
//   - out = O / l in T, lse = ln l + m in float32; a row with nothing attended: 0 and -inf.
#include <climits>

#include "absparse/prefill_cuda.h"
#include "common.cuh"
#include "mma.cuh"
#ifdef ABSPARSE_WITH_SM90_PREFILL
#include "sparse_prefill_sm90.h"
#endif

namespace absparse::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // query positions per CTA
constexpr int kKeys = 64;           // keys per tile
constexpr int kSegment = kThreads;  // list entries compacted per segment (one per thread)
constexpr int kMaxTilesPerBlock = 4;  // k_block <= 256 keeps a segment's tiles in shared memory
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct PrefillArgs {
  const int32_t* cu_seqlens;
  int64_t cu_stride;
  int64_t total_tokens;
  const void *q, *k, *v;
  int64_t q_stride_token, q_stride_head;
  int64_t k_stride_token, k_stride_head;
  int64_t v_stride_token, v_stride_head;
  int group;           // G
  bool list_per_q_head;
  int q_block, k_block;
  int max_blocks;      // M
  const int32_t* block_indices;
  int64_t bi_stride_batch, bi_stride_head, bi_stride_row, bi_stride_slot;
  const int32_t* block_counts;
  int64_t bc_stride_batch, bc_stride_head, bc_stride_row;
  const int32_t* key_positions;  // or null
  int64_t kp_stride_token, kp_stride_head;
  float scale_log2;    // scale * log2(e)
  void* out;
  int64_t out_stride_token, out_stride_head;
  float* lse;          // or null
  int64_t lse_stride_token, lse_stride_head;
};

template <typename T, int D>
struct PrefillSmem {
  T q[kRows * D];
  T k[2][kKeys * D];
  T v[2][kKeys * D];
  int32_t pos[2][kKeys];
  int32_t tile_row[kSegment * kMaxTilesPerBlock];  // first key row of each compacted tile
  int32_t warp_count[kWarps];
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    prefill_kernel(const __grid_constant__ PrefillArgs a) {
  using Smem = PrefillSmem<T, D>;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gid = lane >> 2, tq = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / a.group;

  const int64_t start = a.cu_seqlens[b * a.cu_stride];
  const int64_t len = clamp64(a.cu_seqlens[(b + 1) * a.cu_stride] - start, 0,
                              max64(0, a.total_tokens - start));
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kRows;  // first query position
  if (q0 >= len) return;
  const int64_t q_last = min64(q0 + kRows, len) - 1;
  const int qblock = static_cast<int>(q0 / a.q_block);
  const int lh = a.list_per_q_head ? h : hk;
  const int32_t* list = a.block_indices + b * a.bi_stride_batch + lh * a.bi_stride_head +
                        qblock * a.bi_stride_row;
  const int count = static_cast<int>(clamp64(
      a.block_counts[b * a.bc_stride_batch + lh * a.bc_stride_head + qblock * a.bc_stride_row], 0,
      a.max_blocks));
  const int64_t num_kblocks = ceil_div(len, a.k_block);
  const int tiles_per_block = a.k_block / kKeys;

  const T* qg = static_cast<const T*>(a.q) + start * a.q_stride_token + h * a.q_stride_head;
  const T* kg = static_cast<const T*>(a.k) + start * a.k_stride_token + hk * a.k_stride_head;
  const T* vg = static_cast<const T*>(a.v) + start * a.v_stride_token + hk * a.v_stride_head;
  const int32_t* kp = a.key_positions
                          ? a.key_positions + start * a.kp_stride_token + hk * a.kp_stride_head
                          : nullptr;

  // Q tile (rows past the sequence zero-filled); committed with the first K / V tile.
  for (int i = tid; i < kRows * kChunks; i += kThreads) {
    const int row = i / kChunks, c = i % kChunks;
    const bool ok = q0 + row < len;
    cp_async_16(s.q + swz<D>(row, c * 8), qg + (ok ? (q0 + row) * a.q_stride_token + c * 8 : 0),
                ok);
  }
  cp_async_commit();

  // One 64-key tile starting at key row r0 into buffer `stage`.
  auto issue = [&](int64_t r0, int stage) {
#pragma unroll
    for (int it = 0; it < kKeys * kChunks / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int row = i / kChunks, c = i % kChunks;
      const bool ok = r0 + row < len;
      const int64_t r = ok ? r0 + row : 0;
      cp_async_16(s.k[stage] + swz<D>(row, c * 8), kg + r * a.k_stride_token + c * 8, ok);
      cp_async_16(s.v[stage] + swz<D>(row, c * 8), vg + r * a.v_stride_token + c * 8, ok);
    }
    if (tid < kKeys) {
      const int64_t r = r0 + tid;
      s.pos[stage][tid] = r < len ? (kp ? kp[r * a.kp_stride_token] : static_cast<int32_t>(r))
                                  : INT32_MAX;
    }
  };

  // Per-warp state: rows q0 + 16 warp + gid (index 0) and + 8 (index 1).
  const int64_t t_row[2] = {q0 + 16 * warp + gid, q0 + 16 * warp + gid + 8};
  uint32_t qa[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  bool q_loaded = false;

  for (int seg = 0; seg < count; seg += kSegment) {
    // Compact the contributing tiles of list entries [seg, seg + kSegment), in list order.
    int mine = 0;
    int64_t rows[kMaxTilesPerBlock];
    if (seg + tid < count) {
      const int64_t j = list[static_cast<int64_t>(seg + tid) * a.bi_stride_slot];
      if (j >= 0 && j < num_kblocks) {
        for (int t = 0; t < tiles_per_block; ++t) {
          const int64_t r0 = j * a.k_block + t * kKeys;
          if (r0 < len && (kp != nullptr || r0 <= q_last)) rows[mine++] = r0;
        }
      }
    }
    int incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(kFullMask, incl, off);
      if (lane >= off) incl += y;
    }
    __syncthreads();  // the previous segment's tile_row and buffers are no longer read
    if (lane == 31) s.warp_count[warp] = incl;
    __syncthreads();
    int before = 0, num_tiles = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? s.warp_count[w] : 0;
      num_tiles += s.warp_count[w];
    }
    for (int t = 0; t < mine; ++t) {
      s.tile_row[before + incl - mine + t] = static_cast<int32_t>(rows[t]);
    }
    __syncthreads();

    if (num_tiles > 0) issue(s.tile_row[0], 0);
    cp_async_commit();
    for (int t = 0; t < num_tiles; ++t) {
      const int stage = t & 1;
      if (t + 1 < num_tiles) issue(s.tile_row[t + 1], stage ^ 1);
      cp_async_commit();
      cp_async_wait(1);  // tile t (and Q) landed: this thread's copies
      __syncthreads();   // everyone's copies and positions
      if (!q_loaded) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          ldmatrix_x4(qa[kk], s.q + swz<D>(16 * warp + (lane & 15), kk * 16 + (lane >> 4) * 8));
        }
        q_loaded = true;
      }
      const T* kt = s.k[stage];
      const T* vt = s.v[stage];

      // S = Q K^T: 16 rows x 64 keys per warp, n-tiles of 8 keys.
      float sc[kKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kKeys / 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; nt += 2) {
          uint32_t kb[4];  // b0b1, b2b3 of n-tiles nt and nt + 1
          ldmatrix_x4(kb, kt + swz<D>(nt * 8 + ((lane >> 4) << 3) + (lane & 7),
                                      kk * 16 + ((lane >> 3) & 1) * 8));
          mma_16816<T>(sc[nt], qa[kk], kb[0], kb[1]);
          mma_16816<T>(sc[nt + 1], qa[kk], kb[2], kb[3]);
        }
      }

      // Causal test and online softmax (log2 units); a row's 64 scores are spread over the 4
      // lanes of its quad.
      const int32_t* pos = s.pos[stage];
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = nt * 8 + 2 * tq + e;
            float& x = sc[nt][2 * r + e];
            x = pos[key] <= t_row[r] ? x * a.scale_log2 : -INFINITY;
            mx = fmaxf(mx, x);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
        const float m_new = fmaxf(m_run[r], mx);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing attended yet: weights 0
        alpha[r] = exp2f(m_run[r] - m_use);
        m_run[r] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = sc[nt][2 * r + e];
            x = exp2f(x - m_use);
            sum += x;
          }
        }
        l_run[r] = l_run[r] * alpha[r] + sum;
      }
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][0] *= alpha[0];
        o[dt][1] *= alpha[0];
        o[dt][2] *= alpha[1];
        o[dt][3] *= alpha[1];
      }

      // O += P V: P's A fragments are the S accumulators of n-tiles 2 kk and 2 kk + 1.
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        uint32_t pa[4];
        pa[0] = pack2(from_float<T>(sc[2 * kk][0]), from_float<T>(sc[2 * kk][1]));
        pa[1] = pack2(from_float<T>(sc[2 * kk][2]), from_float<T>(sc[2 * kk][3]));
        pa[2] = pack2(from_float<T>(sc[2 * kk + 1][0]), from_float<T>(sc[2 * kk + 1][1]));
        pa[3] = pack2(from_float<T>(sc[2 * kk + 1][2]), from_float<T>(sc[2 * kk + 1][3]));
#pragma unroll
        for (int dt = 0; dt < D / 8; dt += 2) {
          uint32_t vb[4];  // b0b1, b2b3 of n-tiles dt and dt + 1
          ldmatrix_x4_trans(vb, vt + swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                            dt * 8 + (lane >> 4) * 8));
          mma_16816<T>(o[dt], pa, vb[0], vb[1]);
          mma_16816<T>(o[dt + 1], pa, vb[2], vb[3]);
        }
      }
      __syncthreads();  // buffer `stage` is refilled by the next iteration's issue
    }
  }
  cp_async_wait(0);  // nothing in flight at exit (the Q tile when no tile contributed)

  // Output rows inside the sequence: O / l, lse = (m + log2 l) ln 2.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    if (t_row[r] >= len) continue;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    T* out = static_cast<T*>(a.out) + (start + t_row[r]) * a.out_stride_token +
             h * a.out_stride_head;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t pair = pack2(from_float<T>(o[dt][2 * r] * inv),
                                  from_float<T>(o[dt][2 * r + 1] * inv));
      *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * tq) = pair;
    }
    if (a.lse != nullptr && tq == 0) {
      a.lse[(start + t_row[r]) * a.lse_stride_token + h * a.lse_stride_head] =
          l > 0.0f ? (m_run[r] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

template <typename T, int D>
void launch_prefill(const PrefillArgs& a, const SparsePrefillParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(PrefillSmem<T, D>);
  static bool configured[64] = {};
  int device = 0;
  ABSPARSE_CUDA_CHECK(cudaGetDevice(&device));
  if (smem > 48 * 1024 && (device >= 64 || !configured[device])) {
    ABSPARSE_CUDA_CHECK(cudaFuncSetAttribute(prefill_kernel<T, D>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
    if (device < 64) configured[device] = true;
  }
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.num_q_blocks) * p.q_block / kRows),
                  static_cast<unsigned>(p.num_q_heads), static_cast<unsigned>(p.batch));
  prefill_kernel<T, D><<<grid, kThreads, smem, stream>>>(a);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace absparse::cuda

namespace absparse {

void sparse_prefill_cuda(const SparsePrefillParams& p, PrefillKernel kernel) {
  check_sparse_prefill_cuda(p, kernel);
  if (p.batch == 0 || p.total_tokens == 0 || p.num_q_blocks == 0) return;
  if (kernel == PrefillKernel::kAuto) kernel = select_sparse_prefill_kernel(p);
#ifdef ABSPARSE_WITH_SM90_PREFILL
  if (kernel == PrefillKernel::kSm90) {
    cuda::launch_sparse_prefill_sm90(p);
    return;
  }
#endif
  cuda::PrefillArgs a{};
  a.cu_seqlens = p.cu_seqlens;
  a.cu_stride = p.cu_seqlens_stride;
  a.total_tokens = p.total_tokens;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.q_stride_token = p.q_stride_token;
  a.q_stride_head = p.q_stride_head;
  a.k_stride_token = p.k_stride_token;
  a.k_stride_head = p.k_stride_head;
  a.v_stride_token = p.v_stride_token;
  a.v_stride_head = p.v_stride_head;
  a.group = p.num_q_heads / p.num_kv_heads;
  a.list_per_q_head = p.num_list_heads == p.num_q_heads;
  a.q_block = p.q_block;
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
  a.scale_log2 = static_cast<float>(p.scale) * cuda::kLog2e;
  a.out = p.out;
  a.out_stride_token = p.out_stride_token;
  a.out_stride_head = p.out_stride_head;
  a.lse = p.lse;
  a.lse_stride_token = p.lse_stride_token;
  a.lse_stride_head = p.lse_stride_head;
  const cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64) {
    if (bf16) cuda::launch_prefill<__nv_bfloat16, 64>(a, p, stream);
    else cuda::launch_prefill<__half, 64>(a, p, stream);
  } else {
    if (bf16) cuda::launch_prefill<__nv_bfloat16, 128>(a, p, stream);
    else cuda::launch_prefill<__half, 128>(a, p, stream);
  }
}

}  // namespace absparse

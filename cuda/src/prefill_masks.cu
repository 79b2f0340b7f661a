// The prefill mask builders on the GPU (absparse/prefill_masks_cuda.h, docs/prefill_masks.md):
// FlexPrefill, PBS-Attn (permutation and mask) and the primitives they are made of. Every op is a
// fixed sequence of launches on one stream; sizes come from host fields; scratch comes from the
// caller's workspace.
//
// Kernels (B sequences, H heads, Nq query blocks, W = the length bound of the op):
//   lb_stats / lb_combine / lb_probs   last-block attention: the n = min(bs, L) last queries of a
//       (sequence, head) against its keys in chunks of 1024 keys per CTA (grid (W / 1024, H, B)),
//       128 x 64 tiles of S = q.k: float16 / bfloat16 inputs on tensor cores (lb_*_mma: mma.sync
//       m16n8k16, float32 accumulation, one warp per 16 rows), float32 inputs in float32 on CUDA
//       cores (8 x 4 outputs per thread). Pass 1 keeps each row's (max, sum exp) per chunk,
//       lb_combine merges the chunks in order, pass 2 recomputes S and writes p (probs), column
//       sums (FlexPrefill's vertical, PBS-Attn's key scores) and per-chunk diagonal sums (slash)
//       that slash_combine adds in chunk order.
//   block_pool      block means in float64 (the CPU's order), rounded to float32.
//   pooled_scores   softmax rows of pooled logits, 16 query blocks per CTA, one key block per
//       thread, two passes (online max / sum, then p), group mean by accumulation in head order.
//   flex_analyse    per (sequence, query head): budgets, block-pooled vertical / slash, the JS
//       pattern test and the top vertical / slash blocks (one CTA each).
//   flex_select / pbs_select   coverage selection on the pooled map (global per head / per row).
//   emit_lists + list_density  the block lists and the density, per row / per (b, h).
//   pbs_positions / pbs_gather  the segment sort (rank by counting) and the row gather.
//
// Selection (block_select): exact order by score descending, ties to the lower index, NaN last,
// found without sorting: a binary search over the scores' order-preserving integer keys for the
// threshold key of the k-th entry (by count) or of the entry where the float64 running sum first
// reaches the target (by sum: sums of the entries at or above a key, per thread in a fixed
// partition, then a fixed-order block reduction), then the entries above the threshold key plus
// the first ones (by index) at it. Deterministic; it differs from a sorted running sum only in
// the rounding of the float64 sum (the near-ties of absparse/prefill_masks_cuda.h).
#include <cfloat>
#include <climits>
#include <type_traits>

#include "absparse/prefill_masks_cuda.h"
#include "common.cuh"
#include "mma.cuh"

namespace absparse::cuda {
namespace {

constexpr int kLbRows = 128;                      // query rows of last-block attention (bs <= 128)
constexpr int kLbKeys = 64;                       // keys per tile
constexpr int kLbTiles = 16;                      // tiles per CTA
constexpr int kLbChunk = kLbKeys * kLbTiles;      // keys per CTA
constexpr int kLbThreads = 256;                   // 16 x 16 threads, 8 rows x 4 keys each
constexpr int kDiag = kLbRows + kLbChunk - 1;     // diagonals crossing a chunk
constexpr int kAccPitch = kLbKeys + 1;            // accT row pitch (conflict-free columns)
constexpr int kPoolRows = 16;                     // query blocks per pooled_scores CTA
constexpr int kPoolThreads = 128;
constexpr int kSelectThreads = 512;
constexpr int kRowThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

// ---- Small helpers -----------------------------------------------------------------------------

__device__ inline float ld(const float* p) { return *p; }
__device__ inline float ld(const __half* p) { return __half2float(*p); }
__device__ inline float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// Sequence b: first row and length, the offsets clamped to [0, T] and the length to `bound`.
struct Span {
  int64_t start, len;
};
__device__ inline Span seq_span(const int32_t* cu, int64_t stride, int b, int64_t total,
                                int64_t bound) {
  const int64_t start = clamp64(cu[b * stride], 0, total);
  const int64_t end = clamp64(cu[(b + 1) * stride], 0, total);
  return {start, clamp64(end - start, 0, bound)};
}

// Order-preserving unsigned keys: NaN as -inf, -0 as +0 (the CPU's rank_key and == ties).
__device__ inline uint32_t order_key(float x) {
  if (isnan(x)) x = -INFINITY;
  if (x == 0.0f) x = 0.0f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ inline float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
__device__ inline uint64_t order_key(double x) {
  if (isnan(x)) x = -INFINITY;
  if (x == 0.0) x = 0.0;
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(x));
  const uint64_t top = uint64_t{1} << 63;
  return (u & top) ? ~u : (u | top);
}
__device__ inline double key_value(uint64_t k) {
  const uint64_t top = uint64_t{1} << 63;
  return __longlong_as_double(static_cast<long long>((k & top) ? (k & ~top) : ~k));
}
template <typename V> struct KeyOf;
template <> struct KeyOf<float> {
  using type = uint32_t;
  static constexpr uint32_t kMinPositive = 0x80000001u;  // key of the smallest positive float
  static constexpr uint32_t kInf = 0xff800000u;
  static constexpr uint32_t kMax = 0xffffffffu;
};
template <> struct KeyOf<double> {
  using type = uint64_t;
  static constexpr uint64_t kMinPositive = 0x8000000000000001ull;
  static constexpr uint64_t kInf = 0xfff0000000000000ull;
  static constexpr uint64_t kMax = 0xffffffffffffffffull;
};

// Shared scratch of the block reductions (at most 32 warps).
struct BlockRed {
  double s[32];
  long long c[32];
  long long scan[32];
  double s_all;
  long long c_all;
};

// Sum of (s, c) over the block, in a fixed order, returned to every thread.
__device__ void block_sum(double& s, long long& c, BlockRed& r) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_xor_sync(kFullMask, s, o);
    c += __shfl_xor_sync(kFullMask, c, o);
  }
  __syncthreads();  // readers of the previous call's totals are done
  if (lane == 0) {
    r.s[warp] = s;
    r.c[warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    s = lane < nw ? r.s[lane] : 0.0;
    c = lane < nw ? r.c[lane] : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      s += __shfl_xor_sync(kFullMask, s, o);
      c += __shfl_xor_sync(kFullMask, c, o);
    }
    if (lane == 0) {
      r.s_all = s;
      r.c_all = c;
    }
  }
  __syncthreads();
  s = r.s_all;
  c = r.c_all;
}

__device__ double block_max(double x, BlockRed& r) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(kFullMask, x, o));
  __syncthreads();
  if (lane == 0) r.s[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < nw ? r.s[lane] : -INFINITY;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(kFullMask, x, o));
    if (lane == 0) r.s_all = x;
  }
  __syncthreads();
  return r.s_all;
}

// Exclusive prefix sum of x over the threads in index order; *total gets the block's sum.
__device__ long long block_exclusive_scan(long long x, BlockRed& r, long long* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  long long inc = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long y = __shfl_up_sync(kFullMask, inc, o);
    if (lane >= o) inc += y;
  }
  __syncthreads();
  if (lane == 31) r.scan[warp] = inc;
  __syncthreads();
  long long before = 0, all = 0;
  for (int w = 0; w < nw; ++w) {
    if (w < warp) before += r.scan[w];
    all += r.scan[w];
  }
  *total = all;
  return before + inc - x;
}

// ---- Selection (see the file comment) ----------------------------------------------------------

// A Source describes a row of n entries: each(f) calls f(index, value) for this thread's share of
// the present entries (any fixed partition); at(i, &v) is random access (false: not present).
template <typename K>
struct Selection {
  int mode;           // 0 none, 1 every present entry, 2 threshold
  K key;              // mode 2: entries with a larger key are taken
  long long take_eq;  // mode 2: and the first take_eq entries (by index) with this key
  long long count;    // entries taken
};

template <typename V, typename Src>
__device__ Selection<typename KeyOf<V>::type> block_select(const Src& src, bool by_sum,
                                                           double target, long long k,
                                                           BlockRed& red) {
  using K = typename KeyOf<V>::type;
  // Over the present entries with key >= u: the count and the float64 sum of positive values.
  auto stats = [&](K u, double& s, long long& c) {
    s = 0.0;
    c = 0;
    src.each([&](int64_t, V v) {
      if (order_key(v) >= u) {
        ++c;
        if (by_sum && v > V(0)) s += static_cast<double>(v);
      }
    });
    block_sum(s, c, red);
  };
  Selection<K> sel{0, K(0), 0, 0};
  double s;
  long long c;
  stats(K(0), s, c);
  const long long present = c;
  K lo, hi;
  if (by_sum) {
    // The shortest prefix reaching target > 0 ends at a positive entry: search among those.
    if (!(target > 0.0)) return sel;
    if (!(s >= target)) return Selection<K>{1, K(0), 0, present};
    lo = KeyOf<V>::kMinPositive;
    hi = KeyOf<V>::kInf;
  } else {
    if (k <= 0) return sel;
    if (k >= present) return Selection<K>{1, K(0), 0, present};
    lo = K(0);
    hi = KeyOf<V>::kMax;
  }
  // Largest u with P(u) (P(lo) holds; P is monotone): the key of the entry that ends the prefix.
  while (lo < hi) {
    const K span = hi - lo;
    const K mid = lo + span / 2 + (span & 1);
    stats(mid, s, c);
    if (by_sum ? s >= target : c >= k) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  double s_gt = 0.0, s_ge;
  long long c_gt = 0, c_ge;
  if (lo != KeyOf<V>::kMax) stats(lo + 1, s_gt, c_gt);
  stats(lo, s_ge, c_ge);
  const long long c_eq = c_ge - c_gt;
  long long m;
  if (by_sum) {
    // The fewest entries of value v at the threshold that bring s_gt to the target.
    const double v = static_cast<double>(key_value(lo));
    const double q = ceil((target - s_gt) / v);
    m = q >= static_cast<double>(c_eq) ? c_eq : (q < 1.0 ? 1 : static_cast<long long>(q));
    while (m > 1 && s_gt + static_cast<double>(m - 1) * v >= target) --m;
    while (m < c_eq && s_gt + static_cast<double>(m) * v < target) ++m;
  } else {
    m = k - c_gt;
  }
  return Selection<K>{2, lo, m, c_gt + m};
}

// Calls mark(i, present, taken) for every index of [0, n), each thread over a contiguous range
// in index order (the tie rank at the threshold key is a prefix count over the indices).
template <typename V, typename Src, typename Mark>
__device__ void block_mark(const Src& src, int64_t n,
                           const Selection<typename KeyOf<V>::type>& sel, Mark mark,
                           BlockRed& red) {
  const int64_t per = ceil_div(n, blockDim.x);
  const int64_t lo = min64(n, per * threadIdx.x), hi = min64(n, lo + per);
  long long eq = 0;
  if (sel.mode == 2) {
    for (int64_t i = lo; i < hi; ++i) {
      V v;
      if (src.at(i, v) && order_key(v) == sel.key) ++eq;
    }
  }
  long long total;
  long long rank = block_exclusive_scan(eq, red, &total);
  for (int64_t i = lo; i < hi; ++i) {
    V v;
    const bool present = src.at(i, v);
    bool taken = false;
    if (present && sel.mode == 1) taken = true;
    if (present && sel.mode == 2) {
      const auto key = order_key(v);
      taken = key > sel.key || (key == sel.key && rank++ < sel.take_eq);
    }
    mark(i, present, taken);
  }
}

// A contiguous row [0, n) of V, every entry present; strided partition.
template <typename V>
struct RowSrc {
  const V* row;
  int64_t n;
  template <typename F>
  __device__ void each(F f) const {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) f(i, row[i]);
  }
  __device__ bool at(int64_t i, V& v) const {
    v = row[i];
    return true;
  }
};

// ---- Last-block attention ----------------------------------------------------------------------

struct QK {
  const int32_t* cu;
  int64_t cu_stride, total;
  const void *q, *k;
  int64_t q_st, q_sh, k_st, k_sh;
  int hq, hk, group;
};

QK make_qk(const PrefillQK& in) {
  return QK{in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, in.q, in.k,
            in.q_stride_token, in.q_stride_head, in.k_stride_token, in.k_stride_head,
            in.num_q_heads, in.num_kv_heads, in.num_q_heads / in.num_kv_heads};
}

struct LbArgs {
  QK in;
  int bs;                // n = min(bs, L) last queries
  int64_t bound;         // length bound = columns of the per-key rows
  int nsplit;            // ceil(bound / kLbChunk)
  float scale_log2;      // scale * log2(e)
  float2* part;          // [B, Hq, nsplit, kLbRows] (max, sum exp) in log2 units, per chunk
  float2* stats;         // [B, Hq, kLbRows] (max, 1 / sum)
  // lb_probs: output heads (Hq, or Hk for group means over G = heads_per_out query heads)
  int out_heads, heads_per_out;
  bool weight_rows;      // column sums / slash weigh p by 1 / (n G), probs by 1 / G
  float* probs;          // [B, out_heads, bs, bound] or null
  float* colsum;         // [B, out_heads, bound] or null
  float* slash_part;     // [B, out_heads, nsplit, kDiag] or null
};

// qT[d][r] = q of head hq at position L - n + r (0 for r >= n), as float.
template <typename T, int D>
__device__ void load_last_queries(float* qT, const QK& in, Span sp, int64_t n, int hq) {
  const T* base = static_cast<const T*>(in.q) + hq * in.q_sh;
  for (int e = threadIdx.x; e < D * kLbRows; e += blockDim.x) {
    const int r = e % kLbRows, d = e / kLbRows;
    qT[d * kLbRows + r] = r < n ? ld(base + (sp.start + sp.len - n + r) * in.q_st + d) : 0.0f;
  }
}

// kT[d][c] = k of head hk at position c0 + c (0 past the sequence), as float.
template <typename T, int D>
__device__ void load_key_tile(float* kT, const QK& in, Span sp, int64_t c0, int hk) {
  const T* base = static_cast<const T*>(in.k) + hk * in.k_sh;
  for (int e = threadIdx.x; e < D * kLbKeys; e += blockDim.x) {
    const int c = e % kLbKeys, d = e / kLbKeys;
    kT[d * kLbKeys + c] = c0 + c < sp.len ? ld(base + (sp.start + c0 + c) * in.k_st + d) : 0.0f;
  }
}

// s[i][j] = q_r . k_c for r = 8 ty + i, c = 4 tx + j (float32 FMAs over d in order).
template <int D>
__device__ inline void tile_dots(const float* qT, const float* kT, float s[8][4]) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
  }
#pragma unroll 4
  for (int d = 0; d < D; ++d) {
    const float4 a0 = *reinterpret_cast<const float4*>(qT + d * kLbRows + ty * 8);
    const float4 a1 = *reinterpret_cast<const float4*>(qT + d * kLbRows + ty * 8 + 4);
    const float4 b4 = *reinterpret_cast<const float4*>(kT + d * kLbKeys + tx * 4);
    const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
    const float bb[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = fmaf(a[i], bb[j], s[i][j]);
    }
  }
}

// Pass 1: per chunk of keys, each row's max and sum of exp2 of its causal log2-logits.
template <typename T, int D>
__global__ void __launch_bounds__(kLbThreads) lb_stats_kernel(const __grid_constant__ LbArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* qT = reinterpret_cast<float*>(smem_raw);  // [D][kLbRows]
  float* kT = qT + D * kLbRows;                    // [D][kLbKeys]
  const int split = blockIdx.x, hq = blockIdx.y, b = blockIdx.z;
  const Span sp = seq_span(a.in.cu, a.in.cu_stride, b, a.in.total, a.bound);
  const int64_t n = min64(a.bs, sp.len), c0 = int64_t{split} * kLbChunk;
  if (c0 >= sp.len) return;  // lb_combine reads the chunks below L only
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  load_last_queries<T, D>(qT, a.in, sp, n, hq);
  float m[8], l[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }
  for (int tile = 0; tile < kLbTiles; ++tile) {
    const int64_t ct = c0 + int64_t{tile} * kLbKeys;
    if (ct >= sp.len) break;
    __syncthreads();  // the previous tile's kT (and, first, qT's writes)
    load_key_tile<T, D>(kT, a.in, sp, ct, hq / a.in.group);
    __syncthreads();
    float s[8][4];
    tile_dots<D>(qT, kT, s);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = ty * 8 + i;
      const int64_t t = sp.len - n + r;  // the query's position
      float tmax = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = ct + tx * 4 + j;
        s[i][j] = (r < n && c <= t) ? s[i][j] * a.scale_log2 : -INFINITY;
        tmax = fmaxf(tmax, s[i][j]);
      }
      if (tmax > -INFINITY) {
        const float mn = fmaxf(m[i], tmax);
        float acc = l[i] * exp2f(m[i] - mn);
#pragma unroll
        for (int j = 0; j < 4; ++j) acc += exp2f(s[i][j] - mn);
        m[i] = mn;
        l[i] = acc;
      }
    }
  }
  // Merge the 16 threads of a row (lanes tx of one half-warp), fixed butterfly.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) {
      const float mo = __shfl_xor_sync(kFullMask, m[i], o);
      const float lo = __shfl_xor_sync(kFullMask, l[i], o);
      const float mn = fmaxf(m[i], mo);
      if (mn > -INFINITY) {
        l[i] = l[i] * exp2f(m[i] - mn) + lo * exp2f(mo - mn);
        m[i] = mn;
      }
    }
  }
  if (tx == 0) {
    float2* part = a.part + ((int64_t{b} * a.in.hq + hq) * a.nsplit + split) * kLbRows;
#pragma unroll
    for (int i = 0; i < 8; ++i) part[ty * 8 + i] = make_float2(m[i], l[i]);
  }
}

// Merges the chunks of each row in chunk order: (max, 1 / sum); rows past n get (0, 0).
__global__ void lb_combine_kernel(const __grid_constant__ LbArgs a) {
  const int hq = blockIdx.x, b = blockIdx.y, r = threadIdx.x;  // kLbRows threads
  const Span sp = seq_span(a.in.cu, a.in.cu_stride, b, a.in.total, a.bound);
  const int64_t chunks = ceil_div(sp.len, kLbChunk);
  const int64_t row = int64_t{b} * a.in.hq + hq;
  const float2* part = a.part + row * a.nsplit * kLbRows + r;
  float m = -INFINITY, l = 0.0f;
  for (int64_t s = 0; s < chunks; ++s) m = fmaxf(m, part[s * kLbRows].x);
  if (m > -INFINITY) {
    for (int64_t s = 0; s < chunks; ++s) l += part[s * kLbRows].y * exp2f(part[s * kLbRows].x - m);
  }
  a.stats[row * kLbRows + r] = m > -INFINITY ? make_float2(m, 1.0f / l) : make_float2(0.0f, 0.0f);
}

// Pass 2: probabilities of a chunk of keys, averaged over heads_per_out query heads, and what the
// op needs of them: probs, column sums, per-chunk diagonal sums.
template <typename T, int D>
__global__ void __launch_bounds__(kLbThreads) lb_probs_kernel(const __grid_constant__ LbArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* qT = reinterpret_cast<float*>(smem_raw);  // [D][kLbRows]
  float* kT = qT + D * kLbRows;                    // [D][kLbKeys]
  float* acc = kT + D * kLbKeys;                   // [kLbRows][kAccPitch]: the tile's weighted p
  float* colchunk = acc + kLbRows * kAccPitch;     // [kLbChunk] column sums of the chunk
  float* diag = colchunk + kLbChunk;               // [kDiag] diagonal sums of the chunk
  float* row_m = diag + kDiag;                     // [kLbRows]
  float* row_inv = row_m + kLbRows;                // [kLbRows]
  const int split = blockIdx.x, ho = blockIdx.y, b = blockIdx.z;
  const Span sp = seq_span(a.in.cu, a.in.cu_stride, b, a.in.total, a.bound);
  const int64_t n = min64(a.bs, sp.len), c0 = int64_t{split} * kLbChunk;
  const int64_t out_row = int64_t{b} * a.out_heads + ho;
  const int64_t c_end = min64(c0 + kLbChunk, a.bound);  // columns of this CTA in the outputs
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const bool reduce = a.colsum || a.slash_part;
  const float w_col = a.weight_rows && n > 0 ? 1.0f / static_cast<float>(n * a.heads_per_out)
                                              : 1.0f / static_cast<float>(a.heads_per_out);
  const float w_prob = 1.0f / static_cast<float>(a.heads_per_out);
  if (c0 >= sp.len) {  // past the sequence: zeros (the slash partials of such chunks are unread)
    if (a.colsum) {
      for (int64_t c = c0 + tid; c < c_end; c += blockDim.x) a.colsum[out_row * a.bound + c] = 0.0f;
    }
    if (a.probs) {
      for (int64_t e = tid; e < int64_t{a.bs} * (c_end - c0); e += blockDim.x) {
        const int64_t r = e / (c_end - c0), c = c0 + e % (c_end - c0);
        a.probs[(out_row * a.bs + r) * a.bound + c] = 0.0f;
      }
    }
    return;
  }
  for (int e = tid; e < kLbChunk; e += blockDim.x) colchunk[e] = 0.0f;
  for (int e = tid; e < kDiag; e += blockDim.x) diag[e] = 0.0f;
  for (int g = 0; g < a.heads_per_out; ++g) {
    const int hq = ho * a.heads_per_out + g;
    __syncthreads();  // readers of the previous head's qT / row stats are done
    load_last_queries<T, D>(qT, a.in, sp, n, hq);
    for (int r = tid; r < kLbRows; r += blockDim.x) {
      const float2 st = a.stats[(int64_t{b} * a.in.hq + hq) * kLbRows + r];
      row_m[r] = st.x;
      row_inv[r] = st.y;
    }
    for (int tile = 0; tile < kLbTiles; ++tile) {
      const int64_t ct = c0 + int64_t{tile} * kLbKeys;
      if (ct >= sp.len) {
        // Keys past the sequence: probs 0, written once (the other sums stay 0).
        if (a.probs && g == 0) {
          for (int e = tid; e < a.bs * kLbKeys; e += blockDim.x) {
            const int64_t r = e / kLbKeys, c = ct + e % kLbKeys;
            if (c < a.bound) a.probs[(out_row * a.bs + r) * a.bound + c] = 0.0f;
          }
        }
        continue;
      }
      __syncthreads();  // readers of kT and acc (previous tile) are done; qT, row stats written
      load_key_tile<T, D>(kT, a.in, sp, ct, hq / a.in.group);
      __syncthreads();
      float s[8][4];
      tile_dots<D>(qT, kT, s);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int r = ty * 8 + i;
        const int64_t t = sp.len - n + r;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t c = ct + tx * 4 + j;
          const float p = (r < n && c <= t)
                              ? exp2f(s[i][j] * a.scale_log2 - row_m[r]) * row_inv[r] : 0.0f;
          if (a.probs && r < a.bs && c < a.bound) {
            float* dst = a.probs + (out_row * a.bs + r) * a.bound + c;
            *dst = g == 0 ? p * w_prob : *dst + p * w_prob;
          }
          s[i][j] = p * w_col;
        }
      }
      if (reduce) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[(ty * 8 + i) * kAccPitch + tx * 4 + j] = s[i][j];
        }
        __syncthreads();
        if (tid >= kLbThreads - kLbKeys) {  // 64 threads: column sums over the rows, in order
          const int cc = tid - (kLbThreads - kLbKeys);
          float sum = 0.0f;
          for (int r = 0; r < kLbRows; ++r) sum += acc[r * kAccPitch + cc];
          colchunk[tile * kLbKeys + cc] += sum;
        } else if (a.slash_part && tid < kLbRows + kLbKeys - 1) {
          // Diagonal q = r - cc + 63 of the tile; d = t_r - c indexes the chunk's diagonals as
          // e = r - (c - c0) + kLbChunk - 1.
          const int q = tid;
          float sum = 0.0f;
          const int cc_lo = q < kLbKeys - 1 ? kLbKeys - 1 - q : 0;
          const int cc_hi = min(kLbKeys - 1, kLbRows + kLbKeys - 2 - q);
          for (int cc = cc_lo; cc <= cc_hi; ++cc) sum += acc[(cc + q - (kLbKeys - 1)) * kAccPitch + cc];
          diag[q - (kLbKeys - 1) - tile * kLbKeys + kLbChunk - 1] += sum;
        }
      }
    }
  }
  __syncthreads();
  if (a.colsum) {
    for (int64_t c = c0 + tid; c < c_end; c += blockDim.x) {
      a.colsum[out_row * a.bound + c] = colchunk[c - c0];
    }
  }
  if (a.slash_part) {
    float* dst = a.slash_part + (out_row * a.nsplit + split) * kDiag;
    for (int e = tid; e < kDiag; e += blockDim.x) dst[e] = diag[e];
  }
}

// ---- Last-block attention on tensor cores (float16 / bfloat16 inputs) ---------------------------
//
// The same CTAs, chunks and outputs as lb_stats / lb_probs above (grid (W / 1024, H, B), 256
// threads, 16 tiles of 64 keys), with S = Q K^T by mma.m16n8k16 (inputs T, float32 accumulation):
// warp w owns query rows 16 w .. 16 w + 15 of the 128 and all 64 keys of a tile (8 n-tiles of 8
// keys; C fragments: rows gid and gid + 8, keys 8 nt + 2 tq, + 1). Q's 128 rows go once per head
// through the K buffers into A fragments (ldmatrix) that stay in registers; K tiles stream through
// two swizzled shared-memory buffers, one tile ahead, B fragments by ldmatrix. Copies are 16-byte
// cp.async when the tensor and its strides are 16-byte aligned, 16-bit loads otherwise. Both
// passes compute a logit with the same instructions (lb_tile_mma, then one rounded multiply by
// scale log2 e, never fused into the exponent's subtraction), so pass 2's p = exp2(x - m) / l has
// x <= m. 2 CTAs per SM (128 registers; pass 2: 81 KB of shared memory at D 128).
constexpr int kLbWarps = kLbThreads / 32;           // 8 warps x 16 query rows = kLbRows
constexpr int kStripPitch = kLbKeys + 8;            // floats per strip row (conflict-free float2)
constexpr int kWarpDiag = 16 + kLbKeys - 1;         // diagonals of a warp's 16 x 64 block
constexpr int kWarpDiagPad = 80;
static_assert(kLbWarps * 16 == kLbRows, "one warp per 16 query rows");
static_assert(2 * kLbKeys == kLbRows, "the two K buffers hold the Q tile");
static_assert(kWarpDiag <= kWarpDiagPad, "diagonal partials");
static_assert(kLbKeys + kLbRows + kLbKeys - 1 <= kLbThreads, "one combining thread per sum");

// The K tile buffers of both passes, then pass 2's reduction scratch.
template <typename T, int D>
struct LbMmaSmem {
  T k[2][kLbKeys * D];                            // swizzled [key][d] (swz<D>); Q: [row][d]
  float strip[kLbWarps][16 * kStripPitch];        // a warp's p (its 16 rows x 64 keys)
  float colpart[kLbWarps][kLbKeys];               // a warp's column sums of the tile
  float diagpart[kLbWarps][kWarpDiagPad];         // a warp's diagonal sums of the tile
  float colchunk[kLbChunk];                       // column sums of the chunk
  float diag[kDiag];                              // diagonal sums of the chunk
};
template <typename T, int D>
constexpr size_t lb_stats_mma_smem() {
  return sizeof(T) * 2 * kLbKeys * D;  // LbMmaSmem's k only
}

// A fragments of rows 16 warp .. 16 warp + 15 of the n last queries of head hq (0 for rows >= n),
// through qs (swizzled [kLbRows][D]: the two K buffers, which must be free; free again on return).
// 16-byte cp.async when q and its strides are 16-byte aligned, 16-bit loads otherwise.
template <typename T, int D>
__device__ inline void load_query_frags(uint32_t (&qa)[D / 16][4], T* qs, const QK& in, Span sp,
                                        int64_t n, int hq, int warp, int lane) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const T* base = static_cast<const T*>(in.q) + hq * in.q_sh + (sp.start + sp.len - n) * in.q_st;
  const bool vec16 =
      (reinterpret_cast<uintptr_t>(in.q) & 15) == 0 && in.q_st % 8 == 0 && in.q_sh % 8 == 0;
  if (vec16) {
    // Thread: chunk c of rows row0 + kStep it (the same swizzle for all it: kStep % 8 == 0).
    constexpr int kStep = kLbThreads / kChunks;
    static_assert(kStep % 8 == 0 && kLbRows % kStep == 0, "query tile copy");
    const int row0 = static_cast<int>(threadIdx.x) / kChunks;
    const int c = static_cast<int>(threadIdx.x) % kChunks;
    T* d = qs + swz<D>(row0, c * 8);
    const T* src = base + row0 * in.q_st + c * 8;
#pragma unroll
    for (int it = 0; it < kLbRows / kStep; ++it) {
      const bool ok = row0 + it * kStep < n;
      cp_async_16(d + it * kStep * D, ok ? src + it * kStep * in.q_st : base, ok);
    }
    cp_async_commit();
    cp_async_wait(0);
  } else {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(base);
    uint16_t* q16 = reinterpret_cast<uint16_t*>(qs);
    for (int i = threadIdx.x; i < kLbRows * D; i += kLbThreads) {
      const int row = i / D, col = i % D;
      q16[swz<D>(row, col & ~7) + (col & 7)] = row < n ? src[row * in.q_st + col] : uint16_t{0};
    }
  }
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qa[kk], qs + swz<D>(16 * warp + (lane & 15), kk * 16 + (lane >> 4) * 8));
  }
  __syncthreads();  // every warp has its fragments: qs may be refilled
}

// Starts the copy of the 64 keys from ct of head hk into dst (zeros past the sequence).
template <typename T, int D>
__device__ inline void issue_key_tile(T* dst, const QK& in, Span sp, int64_t ct, int hk,
                                      bool vec16) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const T* base = static_cast<const T*>(in.k) + hk * in.k_sh + sp.start * in.k_st;
  if (vec16) {
    // Thread: chunk c of rows row0 + kStep it (the same swizzle for all it: kStep % 8 == 0).
    constexpr int kStep = kLbThreads / kChunks;
    static_assert(kStep % 8 == 0 && kLbKeys % kStep == 0, "key tile copy");
    const int row0 = static_cast<int>(threadIdx.x) / kChunks;
    const int c = static_cast<int>(threadIdx.x) % kChunks;
    T* d = dst + swz<D>(row0, c * 8);
    const T* src = base + (ct + row0) * in.k_st + c * 8;
    const int64_t left = sp.len - ct - row0;  // rows of the sequence from row0 on
#pragma unroll
    for (int it = 0; it < kLbKeys / kStep; ++it) {
      const bool ok = it * kStep < left;
      cp_async_16(d + it * kStep * D, ok ? src + it * kStep * in.k_st : base, ok);
    }
  } else {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(base);
    uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
    for (int i = threadIdx.x; i < kLbKeys * D; i += kLbThreads) {
      const int row = i / D, col = i % D;
      d16[swz<D>(row, col & ~7) + (col & 7)] =
          ct + row < sp.len ? src[(ct + row) * in.k_st + col] : uint16_t{0};
    }
  }
}

// k and its strides allow 16-byte copies (the element offsets are multiples of 8).
__device__ inline bool keys_vec16(const QK& in) {
  return (reinterpret_cast<uintptr_t>(in.k) & 15) == 0 && in.k_st % 8 == 0 && in.k_sh % 8 == 0;
}

// sc[nt] += Q K^T of the warp's 16 rows and keys 8 nt .. 8 nt + 7 of the tile kt; D / 16 steps
// in order (the same instructions in both passes).
template <typename T, int D>
__device__ inline void lb_tile_mma(const uint32_t (&qa)[D / 16][4], const T* kt,
                                   float (&sc)[kLbKeys / 8][4], int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int nt = 0; nt < kLbKeys / 8; nt += 2) {
      uint32_t kb[4];  // b0b1, b2b3 of n-tiles nt and nt + 1
      ldmatrix_x4(kb, kt + swz<D>(nt * 8 + ((lane >> 4) << 3) + (lane & 7),
                                  kk * 16 + ((lane >> 3) & 1) * 8));
      mma_16816<T>(sc[nt], qa[kk], kb[0], kb[1]);
      mma_16816<T>(sc[nt + 1], qa[kk], kb[2], kb[3]);
    }
  }
}

// Keys of a tile a row may attend: key cc (0..63) of the tile at ct is causal for row r iff
// ct + cc <= L - n + r, i.e. cc <= lim + r with lim = L - n - ct (clamped: |lim| past 256
// decides nothing more for r < 128, cc < 64).
__device__ inline int causal_lim(Span sp, int64_t n, int64_t ct) {
  return static_cast<int>(clamp64(sp.len - n - ct, -256, 256));
}

// Pass 1 on tensor cores: lb_stats_kernel's outputs (per chunk, each row's max and sum of exp2).
template <typename T, int D>
__global__ void __launch_bounds__(kLbThreads, 2)
    lb_stats_mma_kernel(const __grid_constant__ LbArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* kbuf = reinterpret_cast<T*>(smem_raw);  // LbMmaSmem<T, D>::k
  const int split = blockIdx.x, hq = blockIdx.y, b = blockIdx.z;
  const Span sp = seq_span(a.in.cu, a.in.cu_stride, b, a.in.total, a.bound);
  const int64_t n = min64(a.bs, sp.len), c0 = int64_t{split} * kLbChunk;
  if (c0 >= sp.len) return;  // lb_combine reads the chunks below L only
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tq = lane & 3;
  const int hk = hq / a.in.group;
  const bool vec16 = keys_vec16(a.in);
  const int tiles = static_cast<int>(min64(kLbTiles, ceil_div(sp.len - c0, kLbKeys)));
  uint32_t qa[D / 16][4];
  load_query_frags<T, D>(qa, kbuf, a.in, sp, n, hq, warp, lane);
  issue_key_tile<T, D>(kbuf, a.in, sp, c0, hk, vec16);
  cp_async_commit();
  const bool active = 16 * warp < n;  // the warp has a row below n
  const int row0 = 16 * warp + gid;   // rows row0 (h = 0) and row0 + 8 (h = 1)
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for (int tile = 0; tile < tiles; ++tile) {
    const int64_t ct = c0 + int64_t{tile} * kLbKeys;
    cp_async_wait(0);
    __syncthreads();  // tile `tile` landed (all copies); the other buffer is no longer read
    if (tile + 1 < tiles) {
      issue_key_tile<T, D>(kbuf + ((tile + 1) & 1) * kLbKeys * D, a.in, sp, ct + kLbKeys, hk,
                           vec16);
    }
    cp_async_commit();
    if (!active) continue;
    float sc[kLbKeys / 8][4];
#pragma unroll
    for (int nt = 0; nt < kLbKeys / 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
    lb_tile_mma<T, D>(qa, kbuf + (tile & 1) * kLbKeys * D, sc, lane);
    const int lim = causal_lim(sp, n, ct);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + 8 * h;
      // Key cc = 8 nt + 2 tq + e is causal for row r < n iff 8 nt + e <= last.
      const int last = r < n ? lim + r - 2 * tq : -1;
      float tmax = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kLbKeys / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = sc[nt][2 * h + e];
          x = nt * 8 + e <= last ? __fmul_rn(x, a.scale_log2) : -INFINITY;
          tmax = fmaxf(tmax, x);
        }
      }
      if (tmax > -INFINITY) {
        const float mn = fmaxf(m[h], tmax);
        float acc = l[h] * exp2f(m[h] - mn);
#pragma unroll
        for (int nt = 0; nt < kLbKeys / 8; ++nt) {
          acc += exp2f(sc[nt][2 * h] - mn);
          acc += exp2f(sc[nt][2 * h + 1] - mn);
        }
        m[h] = mn;
        l[h] = acc;
      }
    }
  }
  cp_async_wait(0);
  // Merge the 4 lanes of a row (its quad), fixed butterfly.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      const float mo = __shfl_xor_sync(kFullMask, m[h], o);
      const float lo = __shfl_xor_sync(kFullMask, l[h], o);
      const float mn = fmaxf(m[h], mo);
      if (mn > -INFINITY) {
        l[h] = l[h] * exp2f(m[h] - mn) + lo * exp2f(mo - mn);
        m[h] = mn;
      }
    }
  }
  if (tq == 0) {
    float2* part = a.part + ((int64_t{b} * a.in.hq + hq) * a.nsplit + split) * kLbRows;
    part[row0] = make_float2(m[0], l[0]);
    part[row0 + 8] = make_float2(m[1], l[1]);
  }
}

// Pass 2 on tensor cores: lb_probs_kernel's outputs. Per tile, each warp stores its p (16 rows x
// 64 keys) in its shared-memory strip, writes the probs rows from it (coalesced), and sums its
// columns and diagonals of p / (n G) (one per lane, rows in order); one thread per column /
// diagonal of the tile then adds the warps' sums in warp order to the chunk's.
template <typename T, int D>
__global__ void __launch_bounds__(kLbThreads, 2)
    lb_probs_mma_kernel(const __grid_constant__ LbArgs a) {
  using Smem = LbMmaSmem<T, D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);
  const int split = blockIdx.x, ho = blockIdx.y, b = blockIdx.z;
  const Span sp = seq_span(a.in.cu, a.in.cu_stride, b, a.in.total, a.bound);
  const int64_t n = min64(a.bs, sp.len), c0 = int64_t{split} * kLbChunk;
  const int64_t out_row = int64_t{b} * a.out_heads + ho;
  const int64_t c_end = min64(c0 + kLbChunk, a.bound);  // columns of this CTA in the outputs
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tq = lane & 3;
  const bool reduce = a.colsum || a.slash_part;
  const float w_col = a.weight_rows && n > 0 ? 1.0f / static_cast<float>(n * a.heads_per_out)
                                              : 1.0f / static_cast<float>(a.heads_per_out);
  const float w_prob = 1.0f / static_cast<float>(a.heads_per_out);
  if (c0 >= sp.len) {  // past the sequence: zeros (the slash partials of such chunks are unread)
    if (a.colsum) {
      for (int64_t c = c0 + tid; c < c_end; c += blockDim.x) a.colsum[out_row * a.bound + c] = 0.0f;
    }
    if (a.probs) {
      for (int64_t e = tid; e < int64_t{a.bs} * (c_end - c0); e += blockDim.x) {
        const int64_t r = e / (c_end - c0), c = c0 + e % (c_end - c0);
        a.probs[(out_row * a.bs + r) * a.bound + c] = 0.0f;
      }
    }
    return;
  }
  const bool vec16 = keys_vec16(a.in);
  // float2 probs stores: even row length and an 8-byte aligned base (c is even).
  const bool probs_vec2 = (a.bound & 1) == 0 && (reinterpret_cast<uintptr_t>(a.probs) & 7) == 0;
  const int tiles = static_cast<int>(min64(kLbTiles, ceil_div(sp.len - c0, kLbKeys)));
  const bool active = 16 * warp < n;
  const int row0 = 16 * warp + gid;  // rows row0 (h = 0) and row0 + 8 (h = 1)
  for (int e = tid; e < kLbChunk; e += blockDim.x) s.colchunk[e] = 0.0f;
  for (int e = tid; e < kDiag; e += blockDim.x) s.diag[e] = 0.0f;
  // Keys past the sequence: probs 0, written once (the other sums stay 0).
  if (a.probs) {
    const int64_t ct = c0 + int64_t{tiles} * kLbKeys;
    const int64_t cols = max64(0, min64(c0 + kLbChunk, a.bound) - ct);
    for (int64_t e = tid; e < int64_t{a.bs} * cols; e += blockDim.x) {
      const int64_t r = e / cols, c = ct + e % cols;
      a.probs[(out_row * a.bs + r) * a.bound + c] = 0.0f;
    }
  }
  for (int g = 0; g < a.heads_per_out; ++g) {
    const int hq = ho * a.heads_per_out + g, hk = hq / a.in.group;
    const float2* stats = a.stats + (int64_t{b} * a.in.hq + hq) * kLbRows + row0;
    __syncthreads();  // the previous head's readers of both K buffers are done
    uint32_t qa[D / 16][4];
    load_query_frags<T, D>(qa, s.k[0], a.in, sp, n, hq, warp, lane);
    issue_key_tile<T, D>(s.k[0], a.in, sp, c0, hk, vec16);
    cp_async_commit();
    for (int tile = 0; tile < tiles; ++tile) {
      const int64_t ct = c0 + int64_t{tile} * kLbKeys;
      cp_async_wait(0);
      __syncthreads();  // tile landed; the other buffer and the previous tile's partials are free
      if (tile + 1 < tiles) {
        issue_key_tile<T, D>(s.k[(tile + 1) & 1], a.in, sp, ct + kLbKeys, hk, vec16);
      }
      cp_async_commit();
      float sc[kLbKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kLbKeys / 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
      if (active) lb_tile_mma<T, D>(qa, s.k[tile & 1], sc, lane);
      const int lim = causal_lim(sp, n, ct);
      float* strip = s.strip[warp];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row0 + 8 * h;
        // Key cc = 8 nt + 2 tq + e is causal for row r < n iff 8 nt + e <= last.
        const int last = r < n ? lim + r - 2 * tq : -1;
        const float2 st = stats[8 * h];  // (max, 1 / sum) of row r (per tile: fewer live registers)
#pragma unroll
        for (int nt = 0; nt < kLbKeys / 8; ++nt) {
          float p[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = __fmul_rn(sc[nt][2 * h + e], a.scale_log2);
            p[e] = nt * 8 + e <= last ? exp2f(x - st.x) * st.y : 0.0f;
          }
          *reinterpret_cast<float2*>(strip + (gid + 8 * h) * kStripPitch + nt * 8 + 2 * tq) =
              make_float2(p[0], p[1]);
        }
      }
      __syncwarp();  // the warp's strip holds its p
      if (a.probs) {  // rows 16 warp + rl < bs, columns ct .. ct + 63 below bound, p / G
        const int cols = static_cast<int>(min64(a.bound - ct, kLbKeys));  // > 0
        for (int rl = 0; rl < 16; ++rl) {
          const int r = 16 * warp + rl;
          if (r >= a.bs) break;
          float* prow = a.probs + (out_row * a.bs + r) * a.bound + ct;
          const float* srow = strip + rl * kStripPitch;
          if (probs_vec2) {  // columns 2 lane, 2 lane + 1 (both or neither below cols: even)
            if (2 * lane < cols) {
              const float2 pv = *reinterpret_cast<const float2*>(srow + 2 * lane);
              float2* dst = reinterpret_cast<float2*>(prow + 2 * lane);
              float2 v = make_float2(pv.x * w_prob, pv.y * w_prob);
              if (g > 0) {
                const float2 old = *dst;
                v = make_float2(old.x + v.x, old.y + v.y);
              }
              *dst = v;
            }
          } else {
#pragma unroll
            for (int c = lane; c < kLbKeys; c += 32) {
              if (c < cols) prow[c] = g == 0 ? srow[c] * w_prob : prow[c] + srow[c] * w_prob;
            }
          }
        }
      }
      if (!reduce) continue;
      if (a.colsum) {  // columns lane, lane + 32: the warp's 16 rows in order
#pragma unroll
        for (int c = lane; c < kLbKeys; c += 32) {
          float sum = 0.0f;
#pragma unroll
          for (int rl = 0; rl < 16; ++rl) sum += strip[rl * kStripPitch + c] * w_col;
          s.colpart[warp][c] = sum;
        }
      }
      if (a.slash_part) {
        // Diagonal j = rl - cc + 63 of the warp's block (rl its row 0..15, cc the key 0..63).
        for (int j = lane; j < kWarpDiag; j += 32) {
          const int lo = max(0, j - (kLbKeys - 1)), hi = min(15, j);
          float sum = 0.0f;
          for (int rl = lo; rl <= hi; ++rl) {
            sum += strip[rl * kStripPitch + rl - j + kLbKeys - 1] * w_col;
          }
          s.diagpart[warp][j] = sum;
        }
      }
      __syncthreads();
      if (tid < kLbKeys) {  // column tid of the tile: the warps in order
        if (a.colsum) {
          float sum = 0.0f;
#pragma unroll
          for (int w = 0; w < kLbWarps; ++w) sum += s.colpart[w][tid];
          s.colchunk[tile * kLbKeys + tid] += sum;
        }
      } else if (a.slash_part && tid < kLbKeys + kLbRows + kLbKeys - 1) {
        // Diagonal q = r - cc + 63 of the tile (r = 16 w + j): chunk diagonal
        // e = r - (c - c0) + kLbChunk - 1 = q - 63 - 64 tile + kLbChunk - 1.
        const int q = tid - kLbKeys;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kLbWarps; ++w) {
          const int j = q - 16 * w;
          if (j >= 0 && j < kWarpDiag) sum += s.diagpart[w][j];
        }
        s.diag[q - (kLbKeys - 1) - tile * kLbKeys + kLbChunk - 1] += sum;
      }
    }
  }
  cp_async_wait(0);
  __syncthreads();
  if (a.colsum) {
    for (int64_t c = c0 + tid; c < c_end; c += blockDim.x) {
      a.colsum[out_row * a.bound + c] = s.colchunk[c - c0];
    }
  }
  if (a.slash_part) {
    float* dst = a.slash_part + (out_row * a.nsplit + split) * kDiag;
    for (int e = tid; e < kDiag; e += blockDim.x) dst[e] = s.diag[e];
  }
}

// slash[d] = the chunks' diagonal sums at distance d, added in chunk order (at most two chunks
// hold a distance, since n <= kLbChunk).
__global__ void slash_combine_kernel(const __grid_constant__ LbArgs a, float* slash) {
  const int64_t d = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int ho = blockIdx.y, b = blockIdx.z;
  if (d >= a.bound) return;
  const Span sp = seq_span(a.in.cu, a.in.cu_stride, b, a.in.total, a.bound);
  const int64_t n = min64(a.bs, sp.len), out_row = int64_t{b} * a.out_heads + ho;
  float v = 0.0f;
  if (d < sp.len) {
    // Chunk s holds d iff s kLbChunk <= L - 1 - d and s kLbChunk >= L - n - kLbChunk + 1 - d.
    const int64_t low = sp.len - n - kLbChunk + 1 - d;
    const int64_t s_lo = low <= 0 ? 0 : ceil_div(low, kLbChunk);
    const int64_t s_hi = (sp.len - 1 - d) / kLbChunk;
    for (int64_t s = s_lo; s <= s_hi; ++s) {
      v += a.slash_part[(out_row * a.nsplit + s) * kDiag + (d - sp.len + n + s * kLbChunk + kLbChunk - 1)];
    }
  }
  slash[out_row * a.bound + d] = v;
}

// ---- Block pooling and pooled scores -----------------------------------------------------------

// pooled[b, h, j, :] = mean of the rows of block j (float64 in row order, as the CPU), 0 past nb.
template <typename T>
__global__ void block_pool_kernel(const int32_t* cu, int64_t cu_stride, int64_t total,
                                  const void* x, int64_t x_st, int64_t x_sh, int heads, int dim,
                                  int bs, int nb_alloc, float* pooled) {
  const int64_t j = blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const Span sp = seq_span(cu, cu_stride, b, total, int64_t{nb_alloc} * bs);
  const int64_t lo = j * bs, hi = min64(sp.len, lo + bs);
  const T* base = static_cast<const T*>(x) + h * x_sh;
  float* dst = pooled + ((int64_t{b} * heads + h) * nb_alloc + j) * dim;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    double sum = 0.0;
    for (int64_t r = lo; r < hi; ++r) sum += static_cast<double>(ld(base + (sp.start + r) * x_st + d));
    dst[d] = lo < hi ? static_cast<float>(sum / static_cast<double>(hi - lo)) : 0.0f;
  }
}

struct PooledArgs {
  const int32_t* cu;
  int64_t cu_stride, total;
  const float* qbar;      // [B, Hq, nb_alloc, D]
  const float* kbar;      // [B, Hk, nb_alloc, D]
  int hq, hk, group, bs, nb_alloc, per_segment;  // per_segment 0: causal (j <= i)
  float scale_log2;
  int out_heads, heads_per_out;
  float* scores;          // [B, out_heads, nb_alloc, nb_alloc]
  const int32_t* pattern; // [B, Hq] or null: heads whose pattern is not 1 are skipped
};

__device__ inline int64_t allowed_end(int64_t i, int64_t per_segment) {
  return per_segment == 0 ? i + 1 : (i / per_segment) * per_segment;
}

// Rows [i0, i0 + kPoolRows) of one (b, out head): A[i, j] = mean over the group of
// softmax_{j < end(i)}(s qbar_i . kbar_j); 0 outside.
template <int D>
__global__ void __launch_bounds__(kPoolThreads) pooled_scores_kernel(const __grid_constant__ PooledArgs a) {
  __shared__ __align__(16) float qs[kPoolRows * D];
  __shared__ float red_m[kPoolThreads / 32][kPoolRows], red_l[kPoolThreads / 32][kPoolRows];
  __shared__ float row_m[kPoolRows], row_inv[kPoolRows];
  const int ho = blockIdx.y, b = blockIdx.z, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t i0 = int64_t{blockIdx.x} * kPoolRows, width = a.nb_alloc;
  if (a.pattern && a.pattern[int64_t{b} * a.hq + ho] != 1) return;
  const Span sp = seq_span(a.cu, a.cu_stride, b, a.total, width * a.bs);
  const int64_t nb = ceil_div(sp.len, a.bs);
  float* out = a.scores + (int64_t{b} * a.out_heads + ho) * width * width;
  int64_t end[kPoolRows];
  int64_t jmax = 0;
#pragma unroll
  for (int r = 0; r < kPoolRows; ++r) {
    end[r] = i0 + r < nb ? allowed_end(i0 + r, a.per_segment) : 0;
    jmax = max64(jmax, end[r]);
  }
  const float w = 1.0f / static_cast<float>(a.heads_per_out);
  for (int g = 0; g < a.heads_per_out; ++g) {
    const int hq = ho * a.heads_per_out + g, hk = hq / a.group;
    const float* kb = a.kbar + (int64_t{b} * a.hk + hk) * width * D;
    __syncthreads();
    for (int e = tid; e < kPoolRows * D; e += kPoolThreads) {
      const int64_t i = i0 + e / D;
      qs[e] = i < nb ? a.qbar[((int64_t{b} * a.hq + hq) * width + i) * D + e % D] : 0.0f;
    }
    __syncthreads();
    auto dots = [&](int64_t j, float x[kPoolRows]) {
#pragma unroll
      for (int r = 0; r < kPoolRows; ++r) x[r] = 0.0f;
      const float4* kj = reinterpret_cast<const float4*>(kb + j * D);
#pragma unroll 4
      for (int d4 = 0; d4 < D / 4; ++d4) {
        const float4 k4 = kj[d4];
#pragma unroll
        for (int r = 0; r < kPoolRows; ++r) {
          const float4 q4 = *reinterpret_cast<const float4*>(qs + r * D + d4 * 4);
          x[r] = fmaf(q4.x, k4.x, x[r]);
          x[r] = fmaf(q4.y, k4.y, x[r]);
          x[r] = fmaf(q4.z, k4.z, x[r]);
          x[r] = fmaf(q4.w, k4.w, x[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < kPoolRows; ++r) x[r] *= a.scale_log2;
    };
    // Pass 1: online max / sum per row over this thread's key blocks, then over the CTA.
    float m[kPoolRows], l[kPoolRows], x[kPoolRows];
#pragma unroll
    for (int r = 0; r < kPoolRows; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.0f;
    }
    for (int64_t j = tid; j < jmax; j += kPoolThreads) {
      dots(j, x);
#pragma unroll
      for (int r = 0; r < kPoolRows; ++r) {
        if (j < end[r]) {
          const float mn = fmaxf(m[r], x[r]);
          l[r] = l[r] * exp2f(m[r] - mn) + exp2f(x[r] - mn);
          m[r] = mn;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kPoolRows; ++r) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float mo = __shfl_xor_sync(kFullMask, m[r], o);
        const float lo = __shfl_xor_sync(kFullMask, l[r], o);
        const float mn = fmaxf(m[r], mo);
        if (mn > -INFINITY) {
          l[r] = l[r] * exp2f(m[r] - mn) + lo * exp2f(mo - mn);
          m[r] = mn;
        }
      }
      if (lane == 0) {
        red_m[warp][r] = m[r];
        red_l[warp][r] = l[r];
      }
    }
    __syncthreads();
    if (tid < kPoolRows) {
      float mm = -INFINITY, ll = 0.0f;
      for (int w2 = 0; w2 < kPoolThreads / 32; ++w2) {
        const float mo = red_m[w2][tid], lo = red_l[w2][tid];
        const float mn = fmaxf(mm, mo);
        if (mn > -INFINITY) {
          ll = ll * exp2f(mm - mn) + lo * exp2f(mo - mn);
          mm = mn;
        }
      }
      row_m[tid] = mm;
      row_inv[tid] = mm > -INFINITY ? 1.0f / ll : 0.0f;
    }
    __syncthreads();
    // Pass 2: the probabilities (group mean accumulated in head order by the same thread).
    for (int64_t j = tid; j < width; j += kPoolThreads) {
      if (j < jmax) dots(j, x);
#pragma unroll
      for (int r = 0; r < kPoolRows; ++r) {
        const int64_t i = i0 + r;
        if (i >= width) continue;
        const float p = j < end[r] ? exp2f(x[r] - row_m[r]) * row_inv[r] * w : 0.0f;
        float* dst = out + i * width + j;
        *dst = g == 0 ? p : *dst + p;
      }
    }
  }
}

// ---- Block lists -------------------------------------------------------------------------------

struct ListsArgs {
  const int32_t* cu;
  int64_t cu_stride, total;
  int heads, bs, nq, m;
  int32_t* indices;      // [B, heads, nq, m]
  int32_t* counts;       // [B, heads, nq]
  int32_t* causal_rows;  // [B, heads, nq]: blocks holding a causal pair, per row (density)
  float* density;        // [B, heads] or null
};

// Row (b, h, i): the listed key blocks ascending (a block scan per 256 candidates), -1 padding.
template <typename Marker>
__global__ void emit_lists_kernel(const __grid_constant__ ListsArgs a, const Marker mk) {
  __shared__ BlockRed red;
  const int64_t i = blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const Span sp = seq_span(a.cu, a.cu_stride, b, a.total, int64_t{a.nq} * a.bs);
  const int64_t nb = ceil_div(sp.len, a.bs), at = int64_t{b} * a.heads + h;
  int32_t* row = a.indices + (at * a.nq + i) * a.m;
  long long listed = 0, causal = 0;
  if (i < nb) {
    for (int64_t j0 = 0; j0 < nb; j0 += blockDim.x) {
      const int64_t j = j0 + threadIdx.x;
      bool in_list = false, in_causal = false;
      if (j < nb) mk(b, h, i, j, sp.len, in_list, in_causal);
      long long total;
      const long long before = block_exclusive_scan(in_list ? 1 : 0, red, &total);
      if (in_list) row[listed + before] = static_cast<int32_t>(j);
      listed += total;
      double unused = 0.0;
      long long c = in_causal ? 1 : 0;
      block_sum(unused, c, red);
      causal += c;
    }
  }
  for (int64_t s = listed + threadIdx.x; s < a.m; s += blockDim.x) row[s] = -1;
  if (threadIdx.x == 0) {
    a.counts[at * a.nq + i] = static_cast<int32_t>(listed);
    a.causal_rows[at * a.nq + i] = static_cast<int32_t>(causal);
  }
}

// density[b, h] = listed / causal blocks over the rows (1 when nothing is causal).
__global__ void list_density_kernel(const __grid_constant__ ListsArgs a) {
  __shared__ BlockRed red;
  const int64_t at = int64_t{blockIdx.y} * a.heads + blockIdx.x;
  double unused = 0.0;
  long long listed = 0, causal = 0;
  for (int64_t i = threadIdx.x; i < a.nq; i += blockDim.x) {
    listed += a.counts[at * a.nq + i];
    causal += a.causal_rows[at * a.nq + i];
  }
  block_sum(unused, listed, red);
  block_sum(unused, causal, red);
  if (threadIdx.x == 0) {
    a.density[at] = causal == 0 ? 1.0f
                                : static_cast<float>(static_cast<double>(listed) / causal);
  }
}

// ---- FlexPrefill -------------------------------------------------------------------------------

struct FlexArgs {
  QK in;
  int bs, nq;
  int64_t bound;             // nq * bs
  double scale, gamma, tau;
  int64_t min_blocks, max_budget_blocks, dense_len;
  const float* vertical;     // [B, Hq, bound]
  const float* slash;        // [B, Hq, bound]
  const float* kbar;         // [B, Hk, nq, D]
  double* vb;                // [B, Hq, nq] block-pooled vertical
  double* sb;                // [B, Hq, nq] band-pooled slash
  double* est;               // [B, Hq, nq] the pattern test's estimate
  uint8_t* vsel;             // [B, Hq, nq] chosen key-block columns
  uint8_t* ssel;             // [B, Hq, nq] chosen diagonal bands
  int32_t* pattern_ws;       // [B, Hq]
  const float* pooled;       // [B, Hq, nq, nq] causal pooled map (query-aware heads)
  uint8_t* amark;            // [B, Hq, nq, nq] its coverage selection
  int32_t* pattern;          // outputs [B, Hq], each may be null
  float* js;
  int32_t* nv_out;
  int32_t* ns_out;
};

// The entries [1, nb) of a float64 row (block 0 is forced ahead of them).
struct TailSrc {
  const double* row;
  int64_t n;  // nb - 1
  template <typename F>
  __device__ void each(F f) const {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) f(i, row[i + 1]);
  }
  __device__ bool at(int64_t i, double& v) const {
    v = row[i + 1];
    return true;
  }
};

// One CTA per (query head, sequence): steps 1-6 of docs/prefill_masks.md, FlexPrefill.
template <typename T, int D>
__global__ void __launch_bounds__(kSelectThreads) flex_analyse_kernel(const __grid_constant__ FlexArgs a) {
  __shared__ BlockRed red;
  __shared__ double qbar[D];
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const Span sp = seq_span(a.in.cu, a.in.cu_stride, b, a.in.total, a.bound);
  const int64_t len = sp.len, nb = ceil_div(len, a.bs), at = int64_t{b} * a.in.hq + h;
  auto write_info = [&](int pattern, float js, int64_t nv, int64_t ns) {
    if (tid != 0) return;
    a.pattern_ws[at] = pattern;
    if (a.pattern) a.pattern[at] = pattern;
    if (a.js) a.js[at] = js;
    if (a.nv_out) a.nv_out[at] = static_cast<int32_t>(nv);
    if (a.ns_out) a.ns_out[at] = static_cast<int32_t>(ns);
  };
  if (len <= a.dense_len) {  // short: every causal block
    write_info(2, __int_as_float(0x7fffffff), 0, 0);
    return;
  }
  // Budgets: the coverage count (tokens) of vertical and slash, to blocks, clamped.
  const int64_t max_blocks = min64(a.max_budget_blocks, nb);
  const float* vrow = a.vertical + at * a.bound;
  const float* srow = a.slash + at * a.bound;
  const long long tv = block_select<float>(RowSrc<float>{vrow, len}, true, a.gamma, 0, red).count;
  const long long ts = block_select<float>(RowSrc<float>{srow, len}, true, a.gamma, 0, red).count;
  int64_t nv = min64(max64(tv / a.bs + 1, a.min_blocks), max_blocks);
  int64_t ns = min64(max64(ts / a.bs + 1, a.min_blocks), max_blocks);
  // Block-pooled sums (float64, in position order).
  double* vb = a.vb + at * a.nq;
  double* sb = a.sb + at * a.nq;
  double* est = a.est + at * a.nq;
  for (int64_t j = tid; j < nb; j += blockDim.x) {
    double v = 0.0, s = 0.0;
    for (int64_t c = j * a.bs; c < min64(len, (j + 1) * a.bs); ++c) {
      v += static_cast<double>(vrow[c]);
      s += static_cast<double>(srow[c]);
    }
    vb[j] = v;
    sb[j] = s;
  }
  // Mean of the last n queries (the CPU's order: sum of x / n).
  const int64_t n = min64(a.bs, len);
  const T* qb = static_cast<const T*>(a.in.q) + h * a.in.q_sh;
  for (int d = tid; d < D; d += blockDim.x) {
    double sum = 0.0;
    for (int64_t r = 0; r < n; ++r) {
      sum += static_cast<double>(ld(qb + (sp.start + len - n + r) * a.in.q_st + d)) / n;
    }
    qbar[d] = sum;
  }
  __syncthreads();
  // Pattern test: softmax(s qbar . kbar_j) against vb (float64).
  const float* kb = a.kbar + (int64_t{b} * a.in.hk + h / a.in.group) * a.nq * D;
  double peak = -INFINITY;
  long long bad = 0;
  for (int64_t j = tid; j < nb; j += blockDim.x) {
    double dot = 0.0;
    for (int d = 0; d < D; ++d) dot += qbar[d] * static_cast<double>(kb[j * D + d]);
    est[j] = a.scale * dot;
    if (isfinite(est[j])) {
      peak = fmax(peak, est[j]);
    } else {
      ++bad;
    }
  }
  double unused = 0.0;
  block_sum(unused, bad, red);
  peak = block_max(peak, red);
  double total = 0.0;
  long long none = 0;
  for (int64_t j = tid; j < nb; j += blockDim.x) total += (est[j] = exp(est[j] - peak));
  block_sum(total, none, red);
  double js_acc = 0.0;
  for (int64_t j = tid; j < nb; j += blockDim.x) {
    const double p = bad ? NAN : est[j] / total, q = vb[j];
    const double m = 0.5 * (p + q);
    if (p != 0.0) js_acc += 0.5 * p * log(p / m);
    if (q != 0.0) js_acc += 0.5 * q * log(q / m);
  }
  block_sum(js_acc, none, red);
  const double distance = sqrt(js_acc);
  const int pattern = distance < a.tau ? 1 : 0;
  if (pattern == 1) nv = ns = max64(min64(a.min_blocks, nb), 1);
  // Top blocks: block 0 first, then the largest (nv - 1) of the rest; bands likewise.
  uint8_t* vsel = a.vsel + at * a.nq;
  uint8_t* ssel = a.ssel + at * a.nq;
  const TailSrc vsrc{vb, nb - 1}, ssrc{sb, nb - 1};
  const auto vpick = block_select<double>(vsrc, false, 0.0, nv - 1, red);
  block_mark<double>(vsrc, nb - 1, vpick,
                     [&](int64_t i, bool, bool taken) { vsel[i + 1] = taken; }, red);
  const auto spick = block_select<double>(ssrc, false, 0.0, ns - 1, red);
  block_mark<double>(ssrc, nb - 1, spick,
                     [&](int64_t i, bool, bool taken) { ssel[i + 1] = taken; }, red);
  if (tid == 0) {
    vsel[0] = 1;
    ssel[0] = 1;
  }
  write_info(pattern, static_cast<float>(distance), nv, ns);
}

// The causal entries (i, j <= i) of one head's pooled map, in row-major order.
struct CausalSrc {
  const float* map;  // [nq, nq]
  int64_t nb, nq;
  template <typename F>
  __device__ void each(F f) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int64_t i = warp; i < nb; i += nw) {
      for (int64_t j = lane; j <= i; j += 32) f(i * nb + j, map[i * nq + j]);
    }
  }
  __device__ bool at(int64_t f, float& v) const {
    const int64_t i = f / nb, j = f % nb;
    if (j > i) return false;
    v = map[i * nq + j];
    return true;
  }
};

// Query-aware heads: the entries covering gamma * nb of the causal pooled map, all rows at once.
__global__ void __launch_bounds__(kSelectThreads) flex_select_kernel(const __grid_constant__ FlexArgs a) {
  __shared__ BlockRed red;
  const int h = blockIdx.x, b = blockIdx.y;
  const int64_t at = int64_t{b} * a.in.hq + h;
  if (a.pattern_ws[at] != 1) return;
  const Span sp = seq_span(a.in.cu, a.in.cu_stride, b, a.in.total, a.bound);
  const int64_t nb = ceil_div(sp.len, a.bs), nq = a.nq;
  const CausalSrc src{a.pooled + at * nq * nq, nb, nq};
  const auto sel = block_select<float>(src, true, a.gamma * static_cast<double>(nb), 0, red);
  uint8_t* mark = a.amark + at * nq * nq;
  block_mark<float>(src, nb * nb, sel,
                    [&](int64_t f, bool present, bool taken) {
                      if (present) mark[(f / nb) * nq + f % nb] = taken;
                    },
                    red);
}

struct FlexMarker {
  const int32_t* pattern;
  const uint8_t *vsel, *ssel, *amark;
  int heads, nq;
  __device__ void operator()(int b, int h, int64_t i, int64_t j, int64_t, bool& listed,
                             bool& causal) const {
    causal = j <= i;
    listed = false;
    if (!causal) return;
    const int64_t at = int64_t{b} * heads + h;
    const int pat = pattern[at];
    listed = pat == 2 || vsel[at * nq + j] || ssel[at * nq + (i - j)] ||
             (pat == 1 && amark[(at * nq + i) * nq + j]);
  }
};

// ---- PBS-Attn ----------------------------------------------------------------------------------

struct PbsArgs {
  QK in;
  int bs, seg, nseg;
  int64_t bound;
  const float* score;        // [B, Hk, bound] group-mean last-block attention per key
  int32_t* key_positions;    // [T, Hk] out (contiguous)
  const void* v;
  int64_t v_st, v_sh;
  void* k_perm;              // [T, Hk, D] out (contiguous)
  void* v_perm;
  int row_units;             // 2-byte units per row (D * element size / 2)
  int dim, elem;
};

// Segment g of (b, hk): positions of the sorted keys (rank by counting: score descending, ties to
// the lower position), or the identity (tail, or a sequence that is not permuted).
__global__ void pbs_positions_kernel(const __grid_constant__ PbsArgs a) {
  const int64_t g = blockIdx.x;
  const int hk = blockIdx.y, b = blockIdx.z;
  const Span sp = seq_span(a.in.cu, a.in.cu_stride, b, a.in.total, a.bound);
  const int64_t lo = g * a.seg, hi = min64(sp.len, lo + a.seg);
  if (lo >= hi) return;
  const int64_t complete = sp.len / a.seg;
  const bool sorted = g < complete && (complete > 1 || (complete == 1 && sp.len > a.seg));
  const float* score = a.score + (int64_t{b} * a.in.hk + hk) * a.bound;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    int64_t rank = i - lo;
    if (sorted) {
      const uint32_t key = order_key(score[i]);
      rank = 0;
      for (int64_t j = lo; j < hi; ++j) {
        const uint32_t kj = order_key(score[j]);
        rank += kj > key || (kj == key && j < i);
      }
    }
    a.key_positions[(sp.start + lo + rank) * a.in.hk + hk] = static_cast<int32_t>(i);
  }
}

// Rows of k_perm / v_perm: copies of k / v at the stored row's original position.
__global__ void pbs_gather_kernel(const __grid_constant__ PbsArgs a) {
  const int64_t r = int64_t{blockIdx.x} * (blockDim.x / 32) + threadIdx.x / 32;
  const int hk = blockIdx.y, b = blockIdx.z, lane = threadIdx.x & 31;
  const Span sp = seq_span(a.in.cu, a.in.cu_stride, b, a.in.total, a.bound);
  if (r >= sp.len) return;
  const int64_t dst_row = (sp.start + r) * a.in.hk + hk;
  const int64_t pos = clamp64(a.key_positions[dst_row], 0, sp.len - 1);
  const uint16_t* ks = reinterpret_cast<const uint16_t*>(
      static_cast<const char*>(a.in.k) + ((sp.start + pos) * a.in.k_st + hk * a.in.k_sh) * a.elem);
  const uint16_t* vs = reinterpret_cast<const uint16_t*>(
      static_cast<const char*>(a.v) + ((sp.start + pos) * a.v_st + hk * a.v_sh) * a.elem);
  uint16_t* kd = reinterpret_cast<uint16_t*>(static_cast<char*>(a.k_perm) + dst_row * a.dim * a.elem);
  uint16_t* vd = reinterpret_cast<uint16_t*>(static_cast<char*>(a.v_perm) + dst_row * a.dim * a.elem);
  for (int u = lane; u < a.row_units; u += 32) {
    kd[u] = ks[u];
    vd[u] = vs[u];
  }
}

struct PbsMaskArgs {
  const int32_t* cu;
  int64_t cu_stride, total;
  const int32_t* key_positions;
  int64_t kp_st, kp_sh;
  int hk, bs, nq, per_segment;
  double threshold;
  const float* pooled;       // [B, Hk, nq, nq] group-mean pooled scores
  uint8_t* mark;             // [B, Hk, nq, nq] the rows' coverage selection
  int32_t* min_pos;          // [B, Hk, nq] smallest original position per key block
  int32_t* first_block;      // [B, Hk] the block holding position 0, or -1
};

__global__ void pbs_blocks_kernel(const __grid_constant__ PbsMaskArgs a) {
  __shared__ int first;
  const int hk = blockIdx.x, b = blockIdx.y;
  const Span sp = seq_span(a.cu, a.cu_stride, b, a.total, int64_t{a.nq} * a.bs);
  const int64_t nb = ceil_div(sp.len, a.bs), at = int64_t{b} * a.hk + hk;
  if (threadIdx.x == 0) first = INT_MAX;
  __syncthreads();
  int mine = INT_MAX;
  for (int64_t j = threadIdx.x; j < nb; j += blockDim.x) {
    int64_t lowest = sp.len;
    for (int64_t r = j * a.bs; r < min64(sp.len, (j + 1) * a.bs); ++r) {
      const int64_t pos = a.key_positions[(sp.start + r) * a.kp_st + hk * a.kp_sh];
      lowest = min64(lowest, pos);
      if (pos == 0 && mine == INT_MAX) mine = static_cast<int>(j);
    }
    a.min_pos[at * a.nq + j] = static_cast<int32_t>(max64(lowest, INT_MIN));
  }
  atomicMin(&first, mine);  // integer minimum: the same result in any order
  __syncthreads();
  if (threadIdx.x == 0) a.first_block[at] = first == INT_MAX ? -1 : first;
}

// Row i of (b, hk): the coverage selection at threshold over the earlier segments' blocks.
__global__ void __launch_bounds__(kRowThreads) pbs_select_kernel(const __grid_constant__ PbsMaskArgs a) {
  __shared__ BlockRed red;
  const int64_t i = blockIdx.x;
  const int hk = blockIdx.y, b = blockIdx.z;
  const Span sp = seq_span(a.cu, a.cu_stride, b, a.total, int64_t{a.nq} * a.bs);
  const int64_t nb = ceil_div(sp.len, a.bs), at = int64_t{b} * a.hk + hk;
  if (i >= nb) return;
  const int64_t end = allowed_end(i, a.per_segment);
  if (end == 0) return;
  const RowSrc<float> src{a.pooled + (at * a.nq + i) * a.nq, end};
  const auto sel = block_select<float>(src, true, a.threshold, 0, red);
  uint8_t* mark = a.mark + (at * a.nq + i) * a.nq;
  block_mark<float>(src, end, sel, [&](int64_t j, bool, bool taken) { mark[j] = taken; }, red);
}

struct PbsMarker {
  const uint8_t* mark;
  const int32_t *min_pos, *first_block;
  int heads, nq, bs, per_segment;
  bool force_first;
  __device__ void operator()(int b, int h, int64_t i, int64_t j, int64_t len, bool& listed,
                             bool& causal) const {
    const int64_t at = int64_t{b} * heads + h, end = allowed_end(i, per_segment);
    const int64_t last_query = min64((i + 1) * bs, len) - 1;
    causal = min_pos[at * nq + j] <= last_query;
    listed = (j < end && mark[(at * nq + i) * nq + j]) ||
             (j >= end && j < end + per_segment && causal) ||
             (force_first && j == first_block[at]);
  }
};

// ---- Primitive kernels -------------------------------------------------------------------------

// vertical / slash from probs in the CPU's operations and order (r ascending): each term is the
// float32 quotient p / n (float / integer divides in float on the CPU too), summed in float64;
// one column per thread.
__global__ void vertical_slash_kernel(const __grid_constant__ VerticalSlashParams p) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int64_t width = p.max_len;
  if (c >= width) return;
  const int64_t start = p.cu_seqlens[b * p.cu_seqlens_stride];
  const int64_t len = clamp64(p.cu_seqlens[(b + 1) * p.cu_seqlens_stride] - start, 0, width);
  const int64_t n = min64(p.block_size, len);
  const float* probs = p.probs + (int64_t{b} * p.num_heads + h) * p.block_size * width;
  double v = 0.0, s = 0.0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t t = len - n + r;
    if (c <= t) v += probs[r * width + c] / static_cast<float>(n);
    if (c <= t) s += probs[r * width + t - c] / static_cast<float>(n);  // d = c
  }
  const int64_t at = (int64_t{b} * p.num_heads + h) * width + c;
  p.vertical[at] = static_cast<float>(v);
  p.slash[at] = static_cast<float>(s);
}

__global__ void __launch_bounds__(kRowThreads) js_distance_kernel(const __grid_constant__ JsDistanceParams p) {
  __shared__ BlockRed red;
  const int64_t r = blockIdx.x;
  const int64_t len = p.lengths ? clamp64(p.lengths[r], 0, p.n) : p.n;
  double acc = 0.0;
  long long unused = 0;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    const double x = p.p[r * p.n + i], y = p.q[r * p.n + i], m = 0.5 * (x + y);
    if (x != 0.0) acc += 0.5 * x * log(x / m);
    if (y != 0.0) acc += 0.5 * y * log(y / m);
  }
  block_sum(acc, unused, red);
  if (threadIdx.x == 0) p.out[r] = static_cast<float>(sqrt(acc));
}

__global__ void __launch_bounds__(kSelectThreads) coverage_select_kernel(const __grid_constant__ CoverageSelectParams p) {
  __shared__ BlockRed red;
  const int64_t r = blockIdx.x;
  const int64_t len = p.lengths ? clamp64(p.lengths[r], 0, p.n) : p.n;
  const RowSrc<float> src{p.scores + r * p.n, len};
  const auto sel = block_select<float>(src, true, p.gamma, 0, red);
  // Kept or forced entries in index order: a scan over each thread's contiguous range.
  const uint8_t* forced = p.forced ? p.forced + r * p.n : nullptr;
  int32_t* row = p.indices + r * p.n;
  const int64_t per = ceil_div(len, blockDim.x);
  const int64_t lo = min64(len, per * threadIdx.x), hi = min64(len, lo + per);
  long long eq = 0;
  if (sel.mode == 2) {
    for (int64_t i = lo; i < hi; ++i) eq += order_key(src.row[i]) == sel.key;
  }
  long long total;
  long long rank = block_exclusive_scan(eq, red, &total);
  long long mine = 0;
  auto keep = [&](int64_t i, long long& rk) {
    bool taken = sel.mode == 1;
    if (sel.mode == 2) {
      const uint32_t key = order_key(src.row[i]);
      taken = key > sel.key || (key == sel.key && rk++ < sel.take_eq);
    }
    return taken || (forced && forced[i]);
  };
  long long rk = rank;
  for (int64_t i = lo; i < hi; ++i) mine += keep(i, rk);
  long long count;
  long long slot = block_exclusive_scan(mine, red, &count);
  rk = rank;
  for (int64_t i = lo; i < hi; ++i) {
    if (keep(i, rk)) row[slot++] = static_cast<int32_t>(i);
  }
  for (int64_t i = count + threadIdx.x; i < p.n; i += blockDim.x) row[i] = -1;
  if (threadIdx.x == 0) p.counts[r] = static_cast<int32_t>(count);
}

// ---- Host side ---------------------------------------------------------------------------------

// Carves the workspace (base null: only counts the bytes), 256-byte aligned pieces.
struct Carver {
  char* base;
  int64_t used = 0;
  template <typename T>
  T* take(int64_t count) {
    const int64_t at = (used + 255) / 256 * 256;
    used = at + count * static_cast<int64_t>(sizeof(T));
    return base ? reinterpret_cast<T*>(base + at) : nullptr;
  }
};

void check_workspace(const char* fn, const Carver& c, const MaskCudaCall& call) {
  ABSPARSE_CHECK_ARG(call.workspace_bytes >= c.used && (c.used == 0 || call.workspace), fn,
                     "workspace: expected ", c.used, " bytes, got ", call.workspace_bytes);
}

template <typename F>
void launch_smem(F kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                 const LbArgs& a, bool max_carveout = false) {
  ABSPARSE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
  if (max_carveout) {  // two CTAs per SM need more than the default shared-memory carveout
    ABSPARSE_CUDA_CHECK(cudaFuncSetAttribute(kernel,
                                             cudaFuncAttributePreferredSharedMemoryCarveout,
                                             static_cast<int>(cudaSharedmemCarveoutMaxShared)));
  }
  kernel<<<grid, threads, smem, stream>>>(a);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

template <int D>
size_t lb_probs_smem() {
  return sizeof(float) * (D * kLbRows + D * kLbKeys + kLbRows * kAccPitch + kLbChunk + kDiag +
                          2 * kLbRows);
}

// The last-block scratch of an op: row stats, and the chunk partials.
struct LbScratch {
  float2* part;
  float2* stats;
};
LbScratch take_lb(Carver& c, int64_t batch, int64_t hq, int64_t nsplit) {
  return {c.take<float2>(batch * hq * nsplit * kLbRows), c.take<float2>(batch * hq * kLbRows)};
}

int nsplit_of(int64_t bound) { return static_cast<int>(ceil_div(max64(bound, 1), kLbChunk)); }

// Stats passes, then lb_probs with a's output fields; dispatch over dtype and D.
void run_last_block(const LbArgs& a, DType dtype, int dim, int batch, cudaStream_t stream) {
  if (batch == 0 || a.bound == 0) return;
  const dim3 stats_grid(a.nsplit, a.in.hq, batch), probs_grid(a.nsplit, a.out_heads, batch);
  auto go = [&](auto tag, auto dim_tag) {
    using T = decltype(tag);
    constexpr int kD = decltype(dim_tag)::value;
    if constexpr (std::is_same_v<T, float>) {  // CUDA cores (float32 FMAs)
      launch_smem(lb_stats_kernel<T, kD>, stats_grid, kLbThreads,
                  sizeof(float) * (kD * kLbRows + kD * kLbKeys), stream, a);
    } else {  // tensor cores
      launch_smem(lb_stats_mma_kernel<T, kD>, stats_grid, kLbThreads,
                  lb_stats_mma_smem<T, kD>(), stream, a, true);
    }
    lb_combine_kernel<<<dim3(a.in.hq, batch), kLbRows, 0, stream>>>(a);
    ABSPARSE_CUDA_CHECK(cudaGetLastError());
    if constexpr (std::is_same_v<T, float>) {
      launch_smem(lb_probs_kernel<T, kD>, probs_grid, kLbThreads, lb_probs_smem<kD>(), stream, a);
    } else {
      launch_smem(lb_probs_mma_kernel<T, kD>, probs_grid, kLbThreads, sizeof(LbMmaSmem<T, kD>),
                  stream, a, true);
    }
  };
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  switch (dtype) {
    case DType::kFloat32: dim == 64 ? go(float{}, D64{}) : go(float{}, D128{}); break;
    case DType::kFloat16: dim == 64 ? go(__half{}, D64{}) : go(__half{}, D128{}); break;
    default: dim == 64 ? go(__nv_bfloat16{}, D64{}) : go(__nv_bfloat16{}, D128{}); break;
  }
}

LbArgs lb_args(const PrefillQK& in, int bs, int64_t bound) {
  LbArgs a{};
  a.in = make_qk(in);
  a.bs = bs;
  a.bound = bound;
  a.nsplit = nsplit_of(bound);
  a.scale_log2 = static_cast<float>(in.scale) * kLog2e;
  return a;
}

void run_block_pool(const int32_t* cu, int64_t cu_stride, int64_t total, const void* x,
                    int64_t x_st, int64_t x_sh, DType dtype, int batch, int heads, int dim,
                    int bs, int nb_alloc, float* pooled, cudaStream_t stream) {
  if (batch == 0 || nb_alloc == 0) return;
  const dim3 grid(nb_alloc, heads, batch);
  const int threads = dim >= 128 ? 128 : 64;
  switch (dtype) {
    case DType::kFloat32:
      block_pool_kernel<float><<<grid, threads, 0, stream>>>(cu, cu_stride, total, x, x_st, x_sh,
                                                             heads, dim, bs, nb_alloc, pooled);
      break;
    case DType::kFloat16:
      block_pool_kernel<__half><<<grid, threads, 0, stream>>>(cu, cu_stride, total, x, x_st, x_sh,
                                                              heads, dim, bs, nb_alloc, pooled);
      break;
    default:
      block_pool_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(
          cu, cu_stride, total, x, x_st, x_sh, heads, dim, bs, nb_alloc, pooled);
      break;
  }
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

void run_pooled(const PooledArgs& a, int dim, int batch, cudaStream_t stream) {
  if (batch == 0 || a.nb_alloc == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.nb_alloc, kPoolRows)), a.out_heads, batch);
  if (dim == 64) {
    pooled_scores_kernel<64><<<grid, kPoolThreads, 0, stream>>>(a);
  } else {
    pooled_scores_kernel<128><<<grid, kPoolThreads, 0, stream>>>(a);
  }
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

template <typename Marker>
void run_lists(const ListsArgs& la, const Marker& mk, int batch, cudaStream_t stream) {
  if (batch == 0 || la.nq == 0) return;
  emit_lists_kernel<Marker><<<dim3(la.nq, la.heads, batch), 256, 0, stream>>>(la, mk);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
  if (la.density) {
    list_density_kernel<<<dim3(la.heads, batch), 256, 0, stream>>>(la);
    ABSPARSE_CUDA_CHECK(cudaGetLastError());
  }
}

// Density of heads with no rows (Nq = 0: every sequence empty): 1, as on the CPU.
__global__ void fill_kernel(float* x, int64_t n, float value) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i < n) x[i] = value;
}

ListsArgs lists_args(const PrefillQK& in, const BlockListsOut& out, int heads, int bs,
                     int32_t* causal_rows) {
  return ListsArgs{in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, heads, bs,
                   out.num_q_blocks, out.max_blocks, out.block_indices, out.block_counts,
                   causal_rows, out.density};
}

void fill_density_if_no_rows(const BlockListsOut& out, int64_t count, cudaStream_t stream) {
  if (out.num_q_blocks != 0 || !out.density || count == 0) return;
  fill_kernel<<<static_cast<unsigned>(ceil_div(count, 256)), 256, 0, stream>>>(out.density, count,
                                                                              1.0f);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

// ---- FlexPrefill's workspace --------------------------------------------------------------------

struct FlexScratch {
  LbScratch lb;
  float *vertical, *slash, *slash_part, *qbar, *kbar, *pooled;
  double *vb, *sb, *est;
  uint8_t *vsel, *ssel, *amark;
  int32_t *pattern, *causal_rows;
};

FlexScratch flex_scratch(const FlexPrefillMaskParams& p, Carver& c) {
  const int64_t B = p.qk.batch, hq = p.qk.num_q_heads, hk = p.qk.num_kv_heads,
                d = p.qk.head_dim, nq = p.out.num_q_blocks, bound = nq * int64_t{p.block_size};
  const int64_t nsplit = nsplit_of(bound);
  FlexScratch s{};
  s.lb = take_lb(c, B, hq, nsplit);
  s.vertical = c.take<float>(B * hq * bound);
  s.slash = c.take<float>(B * hq * bound);
  s.slash_part = c.take<float>(B * hq * nsplit * kDiag);
  s.qbar = c.take<float>(B * hq * nq * d);
  s.kbar = c.take<float>(B * hk * nq * d);
  s.pooled = c.take<float>(B * hq * nq * nq);
  s.vb = c.take<double>(B * hq * nq);
  s.sb = c.take<double>(B * hq * nq);
  s.est = c.take<double>(B * hq * nq);
  s.vsel = c.take<uint8_t>(B * hq * nq);
  s.ssel = c.take<uint8_t>(B * hq * nq);
  s.amark = c.take<uint8_t>(B * hq * nq * nq);
  s.pattern = c.take<int32_t>(B * hq);
  s.causal_rows = c.take<int32_t>(B * hq * nq);
  return s;
}

struct PbsMaskScratch {
  float *qbar, *kbar, *pooled;
  uint8_t* mark;
  int32_t *min_pos, *first_block, *causal_rows;
};

PbsMaskScratch pbs_mask_scratch(const PbsMaskParams& p, Carver& c) {
  const int64_t B = p.qk.batch, hq = p.qk.num_q_heads, hk = p.qk.num_kv_heads,
                d = p.qk.head_dim, nq = p.out.num_q_blocks;
  PbsMaskScratch s{};
  s.qbar = c.take<float>(B * hq * nq * d);
  s.kbar = c.take<float>(B * hk * nq * d);
  s.pooled = c.take<float>(B * hk * nq * nq);
  s.mark = c.take<uint8_t>(B * hk * nq * nq);
  s.min_pos = c.take<int32_t>(B * hk * nq);
  s.first_block = c.take<int32_t>(B * hk);
  s.causal_rows = c.take<int32_t>(B * hk * nq);
  return s;
}

int64_t pbs_bound(const PbsPermuteParams& p, int32_t max_len) {
  return max_len > 0 ? min64(max_len, p.qk.total_tokens) : p.qk.total_tokens;
}

struct PbsPermuteScratch {
  LbScratch lb;
  float* score;
};

PbsPermuteScratch pbs_permute_scratch(const PbsPermuteParams& p, int64_t bound, Carver& c) {
  const int64_t B = p.qk.batch;
  PbsPermuteScratch s{};
  s.lb = take_lb(c, B, p.qk.num_q_heads, nsplit_of(bound));
  s.score = c.take<float>(B * p.qk.num_kv_heads * bound);
  return s;
}

// pooled_block_scores' scratch: the block means of q and k.
void pooled_scratch(const PooledBlockScoresParams& p, Carver& c, float** qbar = nullptr,
                    float** kbar = nullptr) {
  const int64_t B = p.qk.batch, nb = p.num_blocks, d = p.qk.head_dim;
  float* q = c.take<float>(B * p.qk.num_q_heads * nb * d);
  float* k = c.take<float>(B * p.qk.num_kv_heads * nb * d);
  if (qbar) *qbar = q;
  if (kbar) *kbar = k;
}

}  // namespace
}  // namespace absparse::cuda

namespace absparse {

using namespace absparse::cuda;

int64_t last_block_attention_cuda_workspace_bytes(const LastBlockAttentionParams& p) {
  Carver c{nullptr};
  take_lb(c, p.qk.batch, p.qk.num_q_heads, nsplit_of(p.max_len));
  return c.used;
}

int64_t flexprefill_mask_cuda_workspace_bytes(const FlexPrefillMaskParams& p) {
  Carver c{nullptr};
  flex_scratch(p, c);
  return c.used;
}

int64_t pbs_permute_cuda_workspace_bytes(const PbsPermuteParams& p, int32_t max_len) {
  Carver c{nullptr};
  pbs_permute_scratch(p, pbs_bound(p, max_len), c);
  return c.used;
}

int64_t pbs_mask_cuda_workspace_bytes(const PbsMaskParams& p) {
  Carver c{nullptr};
  pbs_mask_scratch(p, c);
  return c.used;
}

void last_block_attention_cuda(const LastBlockAttentionParams& p, const MaskCudaCall& call) {
  check_last_block_attention_cuda(p);
  Carver c{static_cast<char*>(call.workspace)};
  const LbScratch s = take_lb(c, p.qk.batch, p.qk.num_q_heads, nsplit_of(p.max_len));
  check_workspace("last_block_attention", c, call);
  LbArgs a = lb_args(p.qk, p.block_size, p.max_len);
  a.part = s.part;
  a.stats = s.stats;
  a.out_heads = p.group_mean ? p.qk.num_kv_heads : p.qk.num_q_heads;
  a.heads_per_out = p.group_mean ? p.qk.num_q_heads / p.qk.num_kv_heads : 1;
  a.weight_rows = false;
  a.probs = p.probs;
  run_last_block(a, p.qk.dtype, p.qk.head_dim, p.qk.batch, to_stream(call.stream));
}

void vertical_slash_cuda(const VerticalSlashParams& p, const MaskCudaCall& call) {
  check_vertical_slash_cuda(p);
  if (p.batch == 0 || p.max_len == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_len, 256)), p.num_heads, p.batch);
  vertical_slash_kernel<<<grid, 256, 0, to_stream(call.stream)>>>(p);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

void block_pool_cuda(const BlockPoolParams& p, const MaskCudaCall& call) {
  check_block_pool_cuda(p);
  run_block_pool(p.cu_seqlens, p.cu_seqlens_stride, p.total_tokens, p.x, p.x_stride_token,
                 p.x_stride_head, p.dtype, p.batch, p.num_heads, p.head_dim, p.block_size,
                 p.num_blocks, p.pooled, to_stream(call.stream));
}

int64_t pooled_block_scores_cuda_workspace_bytes(const PooledBlockScoresParams& p) {
  Carver c{nullptr};
  pooled_scratch(p, c);
  return c.used;
}

void pooled_block_scores_cuda(const PooledBlockScoresParams& p, const MaskCudaCall& call) {
  check_pooled_block_scores_cuda(p);
  const int64_t B = p.qk.batch, nb = p.num_blocks;
  Carver c{static_cast<char*>(call.workspace)};
  float *qbar, *kbar;
  pooled_scratch(p, c, &qbar, &kbar);
  check_workspace("pooled_block_scores", c, call);
  if (B == 0 || nb == 0) return;
  cudaStream_t stream = to_stream(call.stream);
  const PrefillQK& in = p.qk;
  run_block_pool(in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, in.q, in.q_stride_token,
                 in.q_stride_head, in.dtype, in.batch, in.num_q_heads, in.head_dim, p.block_size,
                 p.num_blocks, qbar, stream);
  run_block_pool(in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, in.k, in.k_stride_token,
                 in.k_stride_head, in.dtype, in.batch, in.num_kv_heads, in.head_dim, p.block_size,
                 p.num_blocks, kbar, stream);
  const int group = in.num_q_heads / in.num_kv_heads;
  PooledArgs a{in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, qbar, kbar,
               in.num_q_heads, in.num_kv_heads, group, p.block_size, p.num_blocks,
               p.segment_size / p.block_size, static_cast<float>(in.scale) * kLog2e,
               p.group_mean ? in.num_kv_heads : in.num_q_heads, p.group_mean ? group : 1,
               p.scores, nullptr};
  run_pooled(a, in.head_dim, in.batch, stream);
}

void js_distance_cuda(const JsDistanceParams& p, const MaskCudaCall& call) {
  check_js_distance_cuda(p);
  if (p.rows == 0) return;
  js_distance_kernel<<<static_cast<unsigned>(p.rows), kRowThreads, 0, to_stream(call.stream)>>>(p);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

void coverage_select_cuda(const CoverageSelectParams& p, const MaskCudaCall& call) {
  check_coverage_select_cuda(p);
  if (p.rows == 0) return;
  coverage_select_kernel<<<static_cast<unsigned>(p.rows), kSelectThreads, 0,
                           to_stream(call.stream)>>>(p);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

void flexprefill_mask_cuda(const FlexPrefillMaskParams& p, const MaskCudaCall& call) {
  check_flexprefill_mask_cuda(p);
  const char* fn = "flexprefill_mask";
  Carver c{static_cast<char*>(call.workspace)};
  const FlexScratch s = flex_scratch(p, c);
  check_workspace(fn, c, call);
  cudaStream_t stream = to_stream(call.stream);
  const PrefillQK& in = p.qk;
  const int B = in.batch, hq = in.num_q_heads, nq = p.out.num_q_blocks, bs = p.block_size;
  fill_density_if_no_rows(p.out, int64_t{B} * hq, stream);
  if (B == 0) return;
  const int64_t bound = int64_t{nq} * bs;
  // Last-block vertical (column means) and slash (diagonal means), per query head.
  LbArgs lb = lb_args(in, bs, bound);
  lb.part = s.lb.part;
  lb.stats = s.lb.stats;
  lb.out_heads = hq;
  lb.heads_per_out = 1;
  lb.weight_rows = true;
  lb.colsum = s.vertical;
  lb.slash_part = s.slash_part;
  run_last_block(lb, in.dtype, in.head_dim, B, stream);
  if (bound > 0) {
    slash_combine_kernel<<<dim3(static_cast<unsigned>(ceil_div(bound, 256)), hq, B), 256, 0,
                           stream>>>(lb, s.slash);
    ABSPARSE_CUDA_CHECK(cudaGetLastError());
  }
  // Block means of q (pooled map) and k (pooled map and pattern test).
  run_block_pool(in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, in.q, in.q_stride_token,
                 in.q_stride_head, in.dtype, B, hq, in.head_dim, bs, nq, s.qbar, stream);
  run_block_pool(in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, in.k, in.k_stride_token,
                 in.k_stride_head, in.dtype, B, in.num_kv_heads, in.head_dim, bs, nq, s.kbar,
                 stream);
  const int64_t min_blocks = ceil_div(p.min_budget, bs);
  FlexArgs f{};
  f.in = make_qk(in);
  f.bs = bs;
  f.nq = nq;
  f.bound = bound;
  f.scale = in.scale;
  f.gamma = p.gamma;
  f.tau = p.tau;
  f.min_blocks = min_blocks;
  f.max_budget_blocks = ceil_div(p.max_budget, bs);
  f.dense_len = max64(2 * int64_t{bs}, min_blocks * bs);
  f.vertical = s.vertical;
  f.slash = s.slash;
  f.kbar = s.kbar;
  f.vb = s.vb;
  f.sb = s.sb;
  f.est = s.est;
  f.vsel = s.vsel;
  f.ssel = s.ssel;
  f.pattern_ws = s.pattern;
  f.pooled = s.pooled;
  f.amark = s.amark;
  f.pattern = p.pattern;
  f.js = p.js_distance;
  f.nv_out = p.vertical_blocks;
  f.ns_out = p.slash_blocks;
  const dim3 heads_grid(hq, B);
  auto analyse = [&](auto tag) {
    using T = decltype(tag);
    if (in.head_dim == 64) {
      flex_analyse_kernel<T, 64><<<heads_grid, kSelectThreads, 0, stream>>>(f);
    } else {
      flex_analyse_kernel<T, 128><<<heads_grid, kSelectThreads, 0, stream>>>(f);
    }
  };
  switch (in.dtype) {
    case DType::kFloat32: analyse(float{}); break;
    case DType::kFloat16: analyse(__half{}); break;
    default: analyse(__nv_bfloat16{}); break;
  }
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
  // Query-aware heads: the causal pooled map and its global coverage selection.
  PooledArgs pa{in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, s.qbar, s.kbar, hq,
                in.num_kv_heads, hq / in.num_kv_heads, bs, nq, 0,
                static_cast<float>(in.scale) * kLog2e, hq, 1, s.pooled, s.pattern};
  run_pooled(pa, in.head_dim, B, stream);
  if (nq > 0) {
    flex_select_kernel<<<heads_grid, kSelectThreads, 0, stream>>>(f);
    ABSPARSE_CUDA_CHECK(cudaGetLastError());
  }
  const FlexMarker mk{s.pattern, s.vsel, s.ssel, s.amark, hq, nq};
  run_lists(lists_args(in, p.out, hq, bs, s.causal_rows), mk, B, stream);
}

void pbs_permute_cuda(const PbsPermuteParams& p, const MaskCudaCall& call) {
  check_pbs_permute_cuda(p, call.max_len);
  const int64_t bound = pbs_bound(p, call.max_len);
  Carver c{static_cast<char*>(call.workspace)};
  const PbsPermuteScratch s = pbs_permute_scratch(p, bound, c);
  check_workspace("pbs_permute", c, call);
  const PrefillQK& in = p.qk;
  if (in.batch == 0 || bound == 0) return;
  cudaStream_t stream = to_stream(call.stream);
  const int group = in.num_q_heads / in.num_kv_heads;
  LbArgs lb = lb_args(in, p.block_size, bound);
  lb.part = s.lb.part;
  lb.stats = s.lb.stats;
  lb.out_heads = in.num_kv_heads;
  lb.heads_per_out = group;
  lb.weight_rows = true;
  lb.colsum = s.score;
  run_last_block(lb, in.dtype, in.head_dim, in.batch, stream);
  PbsArgs a{};
  a.in = make_qk(in);
  a.bs = p.block_size;
  a.seg = p.segment_size;
  a.bound = bound;
  a.nseg = static_cast<int>(ceil_div(bound, p.segment_size));
  a.score = s.score;
  a.key_positions = p.key_positions;
  a.v = p.v;
  a.v_st = p.v_stride_token;
  a.v_sh = p.v_stride_head;
  a.k_perm = p.k_perm;
  a.v_perm = p.v_perm;
  a.elem = dtype_size(in.dtype);
  a.dim = in.head_dim;
  a.row_units = in.head_dim * a.elem / 2;
  pbs_positions_kernel<<<dim3(a.nseg, in.num_kv_heads, in.batch), 256, 0, stream>>>(a);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
  pbs_gather_kernel<<<dim3(static_cast<unsigned>(ceil_div(bound, 8)), in.num_kv_heads, in.batch),
                      256, 0, stream>>>(a);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
}

void pbs_mask_cuda(const PbsMaskParams& p, const MaskCudaCall& call) {
  check_pbs_mask_cuda(p);
  Carver c{static_cast<char*>(call.workspace)};
  const PbsMaskScratch s = pbs_mask_scratch(p, c);
  check_workspace("pbs_mask", c, call);
  cudaStream_t stream = to_stream(call.stream);
  const PrefillQK& in = p.qk;
  const int B = in.batch, hk = in.num_kv_heads, nq = p.out.num_q_blocks, bs = p.block_size;
  fill_density_if_no_rows(p.out, int64_t{B} * hk, stream);
  if (B == 0 || nq == 0) return;
  const int group = in.num_q_heads / hk, per_segment = p.segment_size / bs;
  run_block_pool(in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, in.q, in.q_stride_token,
                 in.q_stride_head, in.dtype, B, in.num_q_heads, in.head_dim, bs, nq, s.qbar,
                 stream);
  run_block_pool(in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, in.k, in.k_stride_token,
                 in.k_stride_head, in.dtype, B, hk, in.head_dim, bs, nq, s.kbar, stream);
  PooledArgs pa{in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, s.qbar, s.kbar,
                in.num_q_heads, hk, group, bs, nq, per_segment,
                static_cast<float>(in.scale) * kLog2e, hk, group, s.pooled, nullptr};
  run_pooled(pa, in.head_dim, B, stream);
  PbsMaskArgs m{in.cu_seqlens, in.cu_seqlens_stride, in.total_tokens, p.key_positions,
                p.key_positions_stride_token, p.key_positions_stride_head, hk, bs, nq,
                per_segment, p.threshold, s.pooled, s.mark, s.min_pos, s.first_block};
  pbs_blocks_kernel<<<dim3(hk, B), 256, 0, stream>>>(m);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
  pbs_select_kernel<<<dim3(nq, hk, B), kRowThreads, 0, stream>>>(m);
  ABSPARSE_CUDA_CHECK(cudaGetLastError());
  const PbsMarker mk{s.mark, s.min_pos, s.first_block, hk, nq, bs, per_segment, p.force_first};
  run_lists(lists_args(in, p.out, hk, bs, s.causal_rows), mk, B, stream);
}

}  // namespace absparse

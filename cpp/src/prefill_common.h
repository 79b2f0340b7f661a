// Internal helpers shared by the prefill mask primitives (prefill_masks.cpp) and builders
// (prefill_builders.cpp): validation of the shared inputs, float64 row loading, block pooling,
// softmax, last-block attention rows, ranking and coverage, block-list output. Not installed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "absparse/error.h"
#include "absparse/prefill_masks.h"
#include "float64_rows.h"

namespace absparse::prefill_detail {

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

struct Seq {
  int64_t begin;  // first row in the packed batch
  int64_t len;    // L_b
};

// cu_seqlens: 0 = cu[0] <= ... <= cu[B] = T, T < 2^31.
inline std::vector<Seq> read_sequences(const char* fn, const int32_t* cu, int64_t stride,
                                       int32_t batch, int64_t total) {
  ABSPARSE_CHECK_ARG(batch >= 0, fn, "cu_seqlens: expected B + 1 >= 1 entries, got B = ", batch);
  ABSPARSE_CHECK_ARG(total >= 0 && total <= INT32_MAX, fn,
                     "total_tokens: expected T in [0, 2^31), got ", total);
  ABSPARSE_CHECK_ARG(cu != nullptr, fn, "cu_seqlens: expected a pointer, got null");
  ABSPARSE_CHECK_ARG(cu[0] == 0, fn, "cu_seqlens[0]: expected 0, got ", cu[0]);
  std::vector<Seq> seqs(batch);
  for (int32_t b = 0; b < batch; ++b) {
    const int64_t lo = cu[b * stride], hi = cu[(b + 1) * stride];
    ABSPARSE_CHECK_ARG(hi >= lo, fn, "cu_seqlens[", b + 1, "]: expected >= cu_seqlens[", b,
                       "] = ", lo, " (non-decreasing), got ", hi);
    seqs[b] = Seq{lo, hi - lo};
  }
  const int64_t last = cu[int64_t{batch} * stride];
  ABSPARSE_CHECK_ARG(last == total, fn, "cu_seqlens[", batch, "]: expected T = ", total,
                     " (the rows of q and k), got ", last);
  return seqs;
}

inline int64_t max_len_of(const std::vector<Seq>& seqs) {
  int64_t m = 0;
  for (const Seq& s : seqs) m = std::max(m, s.len);
  return m;
}

inline void check_dtype(const char* fn, const char* name, DType t) {
  ABSPARSE_CHECK_ARG(t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16, fn,
                     name, ": expected dtype float32, float16 or bfloat16, got ", dtype_name(t));
}

// The host fields and pointers of q, k and cu_seqlens (no tensor value is read).
inline void check_qk_args(const char* fn, const PrefillQK& in) {
  ABSPARSE_CHECK_ARG(in.batch >= 0, fn, "cu_seqlens: expected B + 1 >= 1 entries, got B = ",
                     in.batch);
  ABSPARSE_CHECK_ARG(in.total_tokens >= 0 && in.total_tokens <= INT32_MAX, fn,
                     "total_tokens: expected T in [0, 2^31), got ", in.total_tokens);
  ABSPARSE_CHECK_ARG(in.cu_seqlens != nullptr, fn, "cu_seqlens: expected a pointer, got null");
  ABSPARSE_CHECK_ARG(in.num_kv_heads > 0, fn, "num_kv_heads: expected > 0, got ", in.num_kv_heads);
  ABSPARSE_CHECK_ARG(in.num_q_heads > 0 && in.num_q_heads % in.num_kv_heads == 0, fn,
                     "num_q_heads: expected a positive multiple of Hk = ", in.num_kv_heads,
                     ", got ", in.num_q_heads);
  ABSPARSE_CHECK_ARG(in.head_dim > 0, fn, "head_dim: expected > 0, got ", in.head_dim);
  check_dtype(fn, "q", in.dtype);
  ABSPARSE_CHECK_ARG(std::isfinite(in.scale), fn, "scale: expected a finite float, got ", in.scale);
  ABSPARSE_CHECK_ARG(in.total_tokens == 0 || (in.q && in.k), fn,
                     "q, k: expected data pointers, got null");
}

inline std::vector<Seq> check_qk(const char* fn, const PrefillQK& in) {
  check_qk_args(fn, in);
  return read_sequences(fn, in.cu_seqlens, in.cu_seqlens_stride, in.batch, in.total_tokens);
}

inline void check_block_size(const char* fn, int32_t bs) {
  ABSPARSE_CHECK_ARG(bs > 0, fn, "block_size: expected > 0, got ", bs);
}

inline void check_segment_size(const char* fn, int32_t segment, int32_t bs, bool allow_zero) {
  ABSPARSE_CHECK_ARG((allow_zero && segment == 0) || (segment > 0 && segment % bs == 0), fn,
                     "segment_size: expected a positive multiple of block_size ", bs,
                     allow_zero ? " (or 0)" : "", ", got ", segment);
}

inline void check_lists_out_args(const char* fn, const BlockListsOut& out, int32_t batch) {
  ABSPARSE_CHECK_ARG(out.num_q_blocks >= 0, fn, "block_indices.shape[2]: expected Nq >= 0, got ",
                     out.num_q_blocks);
  ABSPARSE_CHECK_ARG(out.max_blocks >= out.num_q_blocks, fn,
                     "block_indices.shape[3]: expected M >= Nq = ", out.num_q_blocks, ", got ",
                     out.max_blocks);
  ABSPARSE_CHECK_ARG(batch == 0 || out.num_q_blocks == 0 || (out.block_indices && out.block_counts),
                     fn,
                     "block_indices, block_counts: expected output pointers, got null");
}

// Nq against the lengths (needs cu_seqlens' values).
inline void check_lists_rows(const char* fn, const BlockListsOut& out, const std::vector<Seq>& seqs,
                      int32_t bs) {
  const int64_t need = ceil_div(max_len_of(seqs), bs);
  ABSPARSE_CHECK_ARG(out.num_q_blocks >= need, fn, "block_indices.shape[2]: expected Nq >= ", need,
                     " = ceil(max_len / block_size), got ", out.num_q_blocks);
}

// Rows [begin, begin + count) of head `head` of a [T, H, D] tensor, as float64 [count, D].
inline void load_rows(const void* base, DType t, int64_t stride_token, int64_t stride_head,
                      int32_t head, int64_t begin, int64_t count, int32_t dim,
                      std::vector<double>& out) {
  out.resize(static_cast<size_t>(count) * dim);
  for (int64_t r = 0; r < count; ++r) {
    const int64_t at = (begin + r) * stride_token + head * stride_head;
    for (int32_t d = 0; d < dim; ++d) out[r * dim + d] = load_float(base, at + d, t);
  }
}

// Block means of rows [count, D] (the actual rows of a partial last block): [ceil(count/bs), D].
inline std::vector<double> pool(const std::vector<double>& rows, int64_t count, int32_t dim,
                                int32_t bs) {
  const int64_t nb = ceil_div(count, bs);
  std::vector<double> pooled(static_cast<size_t>(nb) * dim, 0.0);
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t lo = j * bs, hi = std::min<int64_t>(count, lo + bs);
    for (int64_t r = lo; r < hi; ++r) {
      for (int32_t d = 0; d < dim; ++d) pooled[j * dim + d] += rows[r * dim + d];
    }
    for (int32_t d = 0; d < dim; ++d) pooled[j * dim + d] /= static_cast<double>(hi - lo);
  }
  return pooled;
}

using float64_rows::dot;

// In-place softmax of x[0, n): NaN everywhere when a logit is not finite (a non-finite input).
inline void softmax(double* x, int64_t n) {
  double peak = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) {
      std::fill(x, x + n, kNaN);
      return;
    }
    peak = std::max(peak, x[i]);
  }
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += (x[i] = std::exp(x[i] - peak));
  for (int64_t i = 0; i < n; ++i) x[i] /= total;
}

// Calls f(r, t, probs) for each of the n = min(bs, L) last queries t = L - n + r of query head hq:
// probs[p] = softmax_{p <= t}(s q_t . k_p) for p <= t, 0 for p > t (length L). keys: [L, D] of
// the query head's KV head.
template <typename F>
inline void for_each_last_query(const PrefillQK& in, const Seq& s, int32_t hq,
                         const std::vector<double>& keys, int32_t bs, F&& f) {
  const int32_t dim = in.head_dim;
  const int64_t n = std::min<int64_t>(bs, s.len);
  std::vector<double> query;
  std::vector<double> probs(s.len);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t t = s.len - n + r;
    load_rows(in.q, in.dtype, in.q_stride_token, in.q_stride_head, hq, s.begin + t, 1, dim, query);
    for (int64_t p = 0; p <= t; ++p) probs[p] = in.scale * dot(query.data(), &keys[p * dim], dim);
    softmax(probs.data(), t + 1);
    std::fill(probs.begin() + t + 1, probs.end(), 0.0);
    f(r, t, probs.data());
  }
}

inline void load_keys(const PrefillQK& in, const Seq& s, int32_t hk, std::vector<double>& keys) {
  load_rows(in.k, in.dtype, in.k_stride_token, in.k_stride_head, hk, s.begin, s.len, in.head_dim,
            keys);
}

// NaN ranks below every number and weighs 0 in running sums.
inline double rank_key(double x) {
  return std::isnan(x) ? -std::numeric_limits<double>::infinity() : x;
}

// Entries [0, n) by descending score, ties to the lower index; `first` (if >= 0) ranks first.
inline void rank(const double* score, int64_t n, int64_t first, std::vector<int64_t>& order) {
  order.resize(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    if ((x == first) != (y == first)) return x == first;
    const double sx = rank_key(score[x]), sy = rank_key(score[y]);
    return sx > sy || (sx == sy && x < y);
  });
}

// Shortest prefix of `order` whose running sum is >= gamma (n when it never is, 0 if gamma <= 0).
inline int64_t coverage_count(const double* score, const std::vector<int64_t>& order,
                              double gamma) {
  if (gamma <= 0.0) return 0;
  double sum = 0.0;
  for (size_t k = 0; k < order.size(); ++k) {
    const double x = score[order[k]];
    sum += std::isnan(x) ? 0.0 : x;
    if (sum >= gamma) return static_cast<int64_t>(k) + 1;
  }
  return static_cast<int64_t>(order.size());
}

// The key blocks query block i may select are [0, allowed_end(i)): j <= i without segments
// (blocks_per_segment = 0, FlexPrefill), else the blocks of the segments before i's (PBS-Attn).
inline int64_t allowed_end(int64_t i, int64_t blocks_per_segment) {
  return blocks_per_segment == 0 ? i + 1 : (i / blocks_per_segment) * blocks_per_segment;
}

// a[i, j] += weight * softmax_{j < allowed_end(i)}(s qbar_i . kbar_j) for every query block
// i < nb; a is [nb, nb] row-major, entries outside the allowed blocks are left as they are.
// qbar, kbar: [nb, D] block means.
inline void pooled_softmax(const std::vector<double>& qbar, const std::vector<double>& kbar,
                           int64_t nb, int32_t dim, double scale, int64_t blocks_per_segment,
                           double weight, std::vector<double>& a) {
  std::vector<double> row;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t end = allowed_end(i, blocks_per_segment);
    row.resize(end);
    for (int64_t j = 0; j < end; ++j) row[j] = scale * dot(&qbar[i * dim], &kbar[j * dim], dim);
    softmax(row.data(), end);
    for (int64_t j = 0; j < end; ++j) a[i * nb + j] += weight * row[j];
  }
}

inline double js_distance(const double* p, const double* q, int64_t n) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double m = 0.5 * (p[i] + q[i]);
    if (p[i] != 0.0) acc += 0.5 * p[i] * std::log(p[i] / m);
    if (q[i] != 0.0) acc += 0.5 * q[i] * std::log(q[i] / m);
  }
  return std::sqrt(acc);
}

// Writes the block lists of one (b, h) from a [nb, nb] marker matrix (row i: key blocks of query
// block i) and returns the number of listed blocks.
inline int64_t emit_lists(const BlockListsOut& out, int64_t b, int64_t h, int64_t num_heads,
                   const std::vector<char>& marked, int64_t nb) {
  const int64_t nq = out.num_q_blocks, m = out.max_blocks;
  int64_t total = 0;
  for (int64_t i = 0; i < nq; ++i) {
    int32_t* row = out.block_indices + ((b * num_heads + h) * nq + i) * m;
    int64_t count = 0;
    if (i < nb) {
      for (int64_t j = 0; j < nb; ++j) {
        if (marked[i * nb + j]) row[count++] = static_cast<int32_t>(j);
      }
    }
    std::fill(row + count, row + m, -1);
    out.block_counts[(b * num_heads + h) * nq + i] = static_cast<int32_t>(count);
    total += count;
  }
  return total;
}

inline void write_density(const BlockListsOut& out, int64_t at, int64_t listed, int64_t causal) {
  if (out.density) {
    out.density[at] = causal == 0 ? 1.0f : static_cast<float>(static_cast<double>(listed) / causal);
  }
}

}  // namespace absparse::prefill_detail

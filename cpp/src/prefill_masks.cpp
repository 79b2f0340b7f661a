// CPU reference of the prefill block-list builders (absparse/prefill_masks.h,
// docs/prefill_masks.md): FlexPrefill, PBS-Attn, and their primitives. float64 throughout; one
// (sequence, head) at a time, so memory stays O(L * D + nb^2) per call.
#include "absparse/prefill_masks.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "absparse/error.h"

namespace absparse {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

struct Seq {
  int64_t begin;  // first row in the packed batch
  int64_t len;    // L_b
};

// cu_seqlens: 0 = cu[0] <= ... <= cu[B] = T, T < 2^31.
std::vector<Seq> read_sequences(const char* fn, const int32_t* cu, int64_t stride, int32_t batch,
                                int64_t total) {
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

int64_t max_len_of(const std::vector<Seq>& seqs) {
  int64_t m = 0;
  for (const Seq& s : seqs) m = std::max(m, s.len);
  return m;
}

void check_dtype(const char* fn, const char* name, DType t) {
  ABSPARSE_CHECK_ARG(t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16, fn,
                     name, ": expected dtype float32, float16 or bfloat16, got ", dtype_name(t));
}

std::vector<Seq> check_qk(const char* fn, const PrefillQK& in) {
  ABSPARSE_CHECK_ARG(in.num_kv_heads > 0, fn, "num_kv_heads: expected > 0, got ", in.num_kv_heads);
  ABSPARSE_CHECK_ARG(in.num_q_heads > 0 && in.num_q_heads % in.num_kv_heads == 0, fn,
                     "num_q_heads: expected a positive multiple of Hk = ", in.num_kv_heads,
                     ", got ", in.num_q_heads);
  ABSPARSE_CHECK_ARG(in.head_dim > 0, fn, "head_dim: expected > 0, got ", in.head_dim);
  check_dtype(fn, "q", in.dtype);
  ABSPARSE_CHECK_ARG(std::isfinite(in.scale), fn, "scale: expected a finite float, got ", in.scale);
  std::vector<Seq> seqs =
      read_sequences(fn, in.cu_seqlens, in.cu_seqlens_stride, in.batch, in.total_tokens);
  ABSPARSE_CHECK_ARG(in.total_tokens == 0 || (in.q && in.k), fn,
                     "q, k: expected data pointers, got null");
  return seqs;
}

void check_block_size(const char* fn, int32_t bs) {
  ABSPARSE_CHECK_ARG(bs > 0, fn, "block_size: expected > 0, got ", bs);
}

void check_segment_size(const char* fn, int32_t segment, int32_t bs, bool allow_zero) {
  ABSPARSE_CHECK_ARG((allow_zero && segment == 0) || (segment > 0 && segment % bs == 0), fn,
                     "segment_size: expected a positive multiple of block_size ", bs,
                     allow_zero ? " (or 0)" : "", ", got ", segment);
}

void check_lists_out(const char* fn, const BlockListsOut& out, int32_t batch, int64_t num_blocks) {
  ABSPARSE_CHECK_ARG(out.num_q_blocks >= num_blocks, fn, "block_indices.shape[2]: expected Nq >= ",
                     num_blocks, " = ceil(max_len / block_size), got ", out.num_q_blocks);
  ABSPARSE_CHECK_ARG(out.max_blocks >= out.num_q_blocks, fn,
                     "block_indices.shape[3]: expected M >= Nq = ", out.num_q_blocks, ", got ",
                     out.max_blocks);
  ABSPARSE_CHECK_ARG(batch == 0 || out.num_q_blocks == 0 || (out.block_indices && out.block_counts),
                     fn,
                     "block_indices, block_counts: expected output pointers, got null");
}

// Rows [begin, begin + count) of head `head` of a [T, H, D] tensor, as float64 [count, D].
void load_rows(const void* base, DType t, int64_t stride_token, int64_t stride_head, int32_t head,
               int64_t begin, int64_t count, int32_t dim, std::vector<double>& out) {
  out.resize(static_cast<size_t>(count) * dim);
  for (int64_t r = 0; r < count; ++r) {
    const int64_t at = (begin + r) * stride_token + head * stride_head;
    for (int32_t d = 0; d < dim; ++d) out[r * dim + d] = load_float(base, at + d, t);
  }
}

// Block means of rows [count, D] (the actual rows of a partial last block): [ceil(count/bs), D].
std::vector<double> pool(const std::vector<double>& rows, int64_t count, int32_t dim, int32_t bs) {
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

double dot(const double* a, const double* b, int32_t dim) {
  double acc = 0.0;
  for (int32_t d = 0; d < dim; ++d) acc += a[d] * b[d];
  return acc;
}

// In-place softmax of x[0, n): NaN everywhere when a logit is not finite (a non-finite input).
void softmax(double* x, int64_t n) {
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
void for_each_last_query(const PrefillQK& in, const Seq& s, int32_t hq,
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

void load_keys(const PrefillQK& in, const Seq& s, int32_t hk, std::vector<double>& keys) {
  load_rows(in.k, in.dtype, in.k_stride_token, in.k_stride_head, hk, s.begin, s.len, in.head_dim,
            keys);
}

// NaN ranks below every number and weighs 0 in running sums.
double rank_key(double x) { return std::isnan(x) ? -std::numeric_limits<double>::infinity() : x; }

// Entries [0, n) by descending score, ties to the lower index; `first` (if >= 0) ranks first.
void rank(const double* score, int64_t n, int64_t first, std::vector<int64_t>& order) {
  order.resize(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    if ((x == first) != (y == first)) return x == first;
    const double sx = rank_key(score[x]), sy = rank_key(score[y]);
    return sx > sy || (sx == sy && x < y);
  });
}

// Shortest prefix of `order` whose running sum is >= gamma (n when it never is, 0 if gamma <= 0).
int64_t coverage_count(const double* score, const std::vector<int64_t>& order, double gamma) {
  if (gamma <= 0.0) return 0;
  double sum = 0.0;
  for (size_t k = 0; k < order.size(); ++k) {
    const double x = score[order[k]];
    sum += std::isnan(x) ? 0.0 : x;
    if (sum >= gamma) return static_cast<int64_t>(k) + 1;
  }
  return static_cast<int64_t>(order.size());
}

// Softmax rows of pooled logits: A[i, j] = softmax_{j in allowed(i)} (s qbar_i . kbar_j) for
// i < nb, j < nb; allowed(i) = [0, end(i)) with end(i) = i + 1 (segment 0) or the first block of
// i's segment. Rows of A (nb x nb) outside allowed are 0.
int64_t allowed_end(int64_t i, int64_t blocks_per_segment) {
  return blocks_per_segment == 0 ? i + 1 : (i / blocks_per_segment) * blocks_per_segment;
}

void pooled_softmax(const std::vector<double>& qbar, const std::vector<double>& kbar, int64_t nb,
                    int32_t dim, double scale, int64_t blocks_per_segment, double weight,
                    std::vector<double>& a) {
  std::vector<double> row;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t end = allowed_end(i, blocks_per_segment);
    row.resize(end);
    for (int64_t j = 0; j < end; ++j) row[j] = scale * dot(&qbar[i * dim], &kbar[j * dim], dim);
    softmax(row.data(), end);
    for (int64_t j = 0; j < end; ++j) a[i * nb + j] += weight * row[j];
  }
}

double js_distance(const double* p, const double* q, int64_t n) {
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
int64_t emit_lists(const BlockListsOut& out, int64_t b, int64_t h, int64_t num_heads,
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

void write_density(const BlockListsOut& out, int64_t at, int64_t listed, int64_t causal) {
  if (out.density) {
    out.density[at] = causal == 0 ? 1.0f : static_cast<float>(static_cast<double>(listed) / causal);
  }
}

}  // namespace

// ---- Primitives -------------------------------------------------------------------------------

void last_block_attention_cpu(const LastBlockAttentionParams& p) {
  const char* fn = "last_block_attention";
  const std::vector<Seq> seqs = check_qk(fn, p.qk);
  check_block_size(fn, p.block_size);
  ABSPARSE_CHECK_ARG(p.max_len >= max_len_of(seqs), fn, "probs.shape[3]: expected >= max_len ",
                     max_len_of(seqs), ", got ", p.max_len);
  ABSPARSE_CHECK_ARG(p.probs || p.qk.batch == 0 || p.max_len == 0, fn,
                     "probs: expected an output pointer, got null");
  const PrefillQK& in = p.qk;
  const int32_t group = in.num_q_heads / in.num_kv_heads;
  const int32_t heads = p.group_mean ? in.num_kv_heads : in.num_q_heads;
  const int64_t bs = p.block_size, width = p.max_len;
  std::vector<double> keys, acc;
  for (int32_t b = 0; b < in.batch; ++b) {
    for (int32_t h = 0; h < heads; ++h) {
      acc.assign(static_cast<size_t>(bs) * width, 0.0);
      const int32_t hk = p.group_mean ? h : h / group;
      load_keys(in, seqs[b], hk, keys);
      const int32_t first = p.group_mean ? h * group : h, count = p.group_mean ? group : 1;
      for (int32_t hq = first; hq < first + count; ++hq) {
        for_each_last_query(in, seqs[b], hq, keys, p.block_size,
                            [&](int64_t r, int64_t, const double* probs) {
                              for (int64_t c = 0; c < seqs[b].len; ++c) {
                                acc[r * width + c] += probs[c] / count;
                              }
                            });
      }
      float* dst = p.probs + (int64_t{b} * heads + h) * bs * width;
      for (int64_t i = 0; i < bs * width; ++i) dst[i] = static_cast<float>(acc[i]);
    }
  }
}

void vertical_slash_cpu(const VerticalSlashParams& p) {
  const char* fn = "vertical_slash_sums";
  const std::vector<Seq> seqs =
      read_sequences(fn, p.cu_seqlens, p.cu_seqlens_stride, p.batch, p.total_tokens);
  check_block_size(fn, p.block_size);
  ABSPARSE_CHECK_ARG(p.num_heads > 0, fn, "probs.shape[1]: expected H > 0, got ", p.num_heads);
  ABSPARSE_CHECK_ARG(p.max_len >= max_len_of(seqs), fn, "probs.shape[3]: expected >= max_len ",
                     max_len_of(seqs), ", got ", p.max_len);
  ABSPARSE_CHECK_ARG(p.batch == 0 || p.max_len == 0 || (p.probs && p.vertical && p.slash), fn,
                     "probs, vertical, slash: expected pointers, got null");
  const int64_t width = p.max_len;
  std::vector<double> vertical, slash;
  for (int32_t b = 0; b < p.batch; ++b) {
    const int64_t len = seqs[b].len, n = std::min<int64_t>(p.block_size, len);
    for (int32_t h = 0; h < p.num_heads; ++h) {
      const float* probs = p.probs + (int64_t{b} * p.num_heads + h) * p.block_size * width;
      vertical.assign(width, 0.0);
      slash.assign(width, 0.0);
      for (int64_t r = 0; r < n; ++r) {
        const int64_t t = len - n + r;
        for (int64_t c = 0; c <= t; ++c) {
          vertical[c] += probs[r * width + c] / n;
          slash[t - c] += probs[r * width + c] / n;
        }
      }
      const int64_t at = (int64_t{b} * p.num_heads + h) * width;
      for (int64_t c = 0; c < width; ++c) {
        p.vertical[at + c] = static_cast<float>(vertical[c]);
        p.slash[at + c] = static_cast<float>(slash[c]);
      }
    }
  }
}

void block_pool_cpu(const BlockPoolParams& p) {
  const char* fn = "block_pool";
  const std::vector<Seq> seqs =
      read_sequences(fn, p.cu_seqlens, p.cu_seqlens_stride, p.batch, p.total_tokens);
  check_block_size(fn, p.block_size);
  check_dtype(fn, "x", p.dtype);
  ABSPARSE_CHECK_ARG(p.num_heads > 0 && p.head_dim > 0, fn, "x: expected H > 0 and D > 0, got H = ",
                     p.num_heads, ", D = ", p.head_dim);
  const int64_t need = ceil_div(max_len_of(seqs), p.block_size);
  ABSPARSE_CHECK_ARG(p.num_blocks >= need, fn, "pooled.shape[2]: expected >= ceil(max_len / ",
                     "block_size) = ", need, ", got ", p.num_blocks);
  ABSPARSE_CHECK_ARG((p.pooled || p.batch == 0 || p.num_blocks == 0) && (p.total_tokens == 0 || p.x),
                     fn,
                     "x, pooled: expected pointers, got null");
  const int32_t dim = p.head_dim;
  std::vector<double> rows;
  for (int32_t b = 0; b < p.batch; ++b) {
    for (int32_t h = 0; h < p.num_heads; ++h) {
      load_rows(p.x, p.dtype, p.x_stride_token, p.x_stride_head, h, seqs[b].begin, seqs[b].len,
                dim, rows);
      const std::vector<double> pooled = pool(rows, seqs[b].len, dim, p.block_size);
      float* dst = p.pooled + (int64_t{b} * p.num_heads + h) * p.num_blocks * dim;
      std::fill(dst, dst + int64_t{p.num_blocks} * dim, 0.0f);
      for (size_t i = 0; i < pooled.size(); ++i) dst[i] = static_cast<float>(pooled[i]);
    }
  }
}

void pooled_block_scores_cpu(const PooledBlockScoresParams& p) {
  const char* fn = "pooled_block_scores";
  const std::vector<Seq> seqs = check_qk(fn, p.qk);
  check_block_size(fn, p.block_size);
  check_segment_size(fn, p.segment_size, p.block_size, true);
  const int64_t need = ceil_div(max_len_of(seqs), p.block_size);
  ABSPARSE_CHECK_ARG(p.num_blocks >= need, fn, "scores.shape[2]: expected >= ceil(max_len / ",
                     "block_size) = ", need, ", got ", p.num_blocks);
  ABSPARSE_CHECK_ARG(p.scores || p.qk.batch == 0 || p.num_blocks == 0, fn,
                     "scores: expected an output pointer, got null");
  const PrefillQK& in = p.qk;
  const int32_t dim = in.head_dim, group = in.num_q_heads / in.num_kv_heads;
  const int32_t heads = p.group_mean ? in.num_kv_heads : in.num_q_heads;
  const int64_t per_segment = p.segment_size / p.block_size, width = p.num_blocks;
  std::vector<double> rows, a;
  for (int32_t b = 0; b < in.batch; ++b) {
    const Seq& s = seqs[b];
    const int64_t nb = ceil_div(s.len, p.block_size);
    for (int32_t h = 0; h < heads; ++h) {
      const int32_t hk = p.group_mean ? h : h / group;
      load_keys(in, s, hk, rows);
      const std::vector<double> kbar = pool(rows, s.len, dim, p.block_size);
      a.assign(static_cast<size_t>(nb) * nb, 0.0);
      const int32_t first = p.group_mean ? h * group : h, count = p.group_mean ? group : 1;
      for (int32_t hq = first; hq < first + count; ++hq) {
        load_rows(in.q, in.dtype, in.q_stride_token, in.q_stride_head, hq, s.begin, s.len, dim,
                  rows);
        pooled_softmax(pool(rows, s.len, dim, p.block_size), kbar, nb, dim, in.scale, per_segment,
                       1.0 / count, a);
      }
      float* dst = p.scores + (int64_t{b} * heads + h) * width * width;
      std::fill(dst, dst + width * width, 0.0f);
      for (int64_t i = 0; i < nb; ++i) {
        for (int64_t j = 0; j < nb; ++j) dst[i * width + j] = static_cast<float>(a[i * nb + j]);
      }
    }
  }
}

void js_distance_cpu(const JsDistanceParams& p) {
  const char* fn = "js_distance";
  ABSPARSE_CHECK_ARG(p.rows >= 0 && p.n >= 0, fn, "p: expected a [rows, n] tensor, got rows = ",
                     p.rows, ", n = ", p.n);
  ABSPARSE_CHECK_ARG(p.rows == 0 || (p.out && (p.n == 0 || (p.p && p.q))), fn,
                     "p, q, out: expected pointers, got null");
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t len = p.lengths ? p.lengths[r] : p.n;
    ABSPARSE_CHECK_ARG(len >= 0 && len <= p.n, fn, "lengths[", r, "]: expected a value in [0, ",
                       p.n, "], got ", len);
  }
  std::vector<double> a, b;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t len = p.lengths ? p.lengths[r] : p.n;
    a.assign(p.p + r * p.n, p.p + r * p.n + len);
    b.assign(p.q + r * p.n, p.q + r * p.n + len);
    p.out[r] = static_cast<float>(js_distance(a.data(), b.data(), len));
  }
}

void coverage_select_cpu(const CoverageSelectParams& p) {
  const char* fn = "coverage_select";
  ABSPARSE_CHECK_ARG(p.rows >= 0 && p.n >= 0 && p.n <= INT32_MAX, fn,
                     "scores: expected a [rows, n] tensor with n < 2^31, got rows = ", p.rows,
                     ", n = ", p.n);
  ABSPARSE_CHECK_ARG(std::isfinite(p.gamma), fn, "gamma: expected a finite float, got ", p.gamma);
  ABSPARSE_CHECK_ARG(p.rows == 0 || (p.counts && (p.n == 0 || (p.scores && p.indices))), fn,
                     "scores, indices, counts: expected pointers, got null");
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t len = p.lengths ? p.lengths[r] : p.n;
    ABSPARSE_CHECK_ARG(len >= 0 && len <= p.n, fn, "lengths[", r, "]: expected a value in [0, ",
                       p.n, "], got ", len);
  }
  std::vector<double> score;
  std::vector<int64_t> order;
  std::vector<char> keep;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t len = p.lengths ? p.lengths[r] : p.n;
    score.assign(p.scores + r * p.n, p.scores + r * p.n + len);
    rank(score.data(), len, -1, order);
    const int64_t k = coverage_count(score.data(), order, p.gamma);
    keep.assign(len, 0);
    for (int64_t i = 0; i < k; ++i) keep[order[i]] = 1;
    int32_t* row = p.indices + r * p.n;
    int64_t count = 0;
    for (int64_t i = 0; i < len; ++i) {
      if (keep[i] || (p.forced && p.forced[r * p.n + i])) row[count++] = static_cast<int32_t>(i);
    }
    std::fill(row + count, row + p.n, -1);
    p.counts[r] = static_cast<int32_t>(count);
  }
}

// ---- FlexPrefill ------------------------------------------------------------------------------

void flexprefill_mask_cpu(const FlexPrefillMaskParams& p) {
  const char* fn = "flexprefill_mask";
  const std::vector<Seq> seqs = check_qk(fn, p.qk);
  check_block_size(fn, p.block_size);
  ABSPARSE_CHECK_ARG(p.gamma > 0.0 && p.gamma <= 1.0, fn, "gamma: expected a value in (0, 1], got ",
                     p.gamma);
  ABSPARSE_CHECK_ARG(std::isfinite(p.tau) && p.tau >= 0.0, fn,
                     "tau: expected a finite value >= 0, got ", p.tau);
  ABSPARSE_CHECK_ARG(p.min_budget >= 0, fn, "min_budget: expected >= 0 tokens, got ", p.min_budget);
  ABSPARSE_CHECK_ARG(p.max_budget >= std::max<int64_t>(p.min_budget, 1), fn,
                     "max_budget: expected >= max(min_budget, 1) = ",
                     std::max<int64_t>(p.min_budget, 1), " tokens, got ", p.max_budget);
  check_lists_out(fn, p.out, p.qk.batch, ceil_div(max_len_of(seqs), p.block_size));
  const PrefillQK& in = p.qk;
  const int32_t dim = in.head_dim, group = in.num_q_heads / in.num_kv_heads;
  const int64_t bs = p.block_size;
  const int64_t min_blocks = ceil_div(p.min_budget, bs);
  // Shorter sequences are attended densely (the original's "q_len <= max(2 bs, min budget)").
  const int64_t dense_len = std::max(2 * bs, min_blocks * bs);

  std::vector<double> keys, rows, vertical, slash, a;
  std::vector<int64_t> order;
  std::vector<char> marked;
  for (int32_t b = 0; b < in.batch; ++b) {
    const Seq& s = seqs[b];
    const int64_t len = s.len, nb = ceil_div(len, bs);
    for (int32_t hk = 0; hk < in.num_kv_heads; ++hk) {
      load_keys(in, s, hk, keys);
      const std::vector<double> kbar = pool(keys, len, dim, p.block_size);
      for (int32_t hq = hk * group; hq < (hk + 1) * group; ++hq) {
        const int64_t at = int64_t{b} * in.num_q_heads + hq;
        marked.assign(static_cast<size_t>(nb) * nb, 0);
        int32_t pattern = 2;
        double distance = kNaN;
        int64_t nv = 0, ns = 0;
        if (len <= dense_len) {
          for (int64_t i = 0; i < nb; ++i) std::fill(&marked[i * nb], &marked[i * nb] + i + 1, 1);
        } else {
          // Vertical v[p] and slash sigma[d] means of the last block's attention (length L).
          vertical.assign(len, 0.0);
          slash.assign(len, 0.0);
          std::vector<double> qbar(dim, 0.0);
          const int64_t n = std::min<int64_t>(bs, len);
          for_each_last_query(in, s, hq, keys, p.block_size,
                              [&](int64_t, int64_t t, const double* probs) {
                                for (int64_t c = 0; c <= t; ++c) {
                                  vertical[c] += probs[c] / n;
                                  slash[t - c] += probs[c] / n;
                                }
                              });
          // Budgets: the fewest tokens covering gamma, converted to blocks with the real block
          // size (the original hard-codes 128 here), clamped to [min, max] budget in blocks.
          const int64_t max_blocks = std::min(ceil_div(p.max_budget, bs), nb);
          auto budget = [&](const std::vector<double>& x) {
            rank(x.data(), len, -1, order);
            const int64_t tokens = coverage_count(x.data(), order, p.gamma);
            return std::min(std::max(tokens / bs + 1, min_blocks), max_blocks);
          };
          nv = budget(vertical);
          ns = budget(slash);
          // Block-pooled sums: key block j, and diagonal band d = offsets [d bs, (d + 1) bs).
          std::vector<double> vb(nb, 0.0), sb(nb, 0.0);
          for (int64_t c = 0; c < len; ++c) {
            vb[c / bs] += vertical[c];
            sb[c / bs] += slash[c];
          }
          // Pattern test: softmax(s mean(last queries) . kbar) against the pooled vertical.
          load_rows(in.q, in.dtype, in.q_stride_token, in.q_stride_head, hq, s.begin + len - n, n,
                    dim, rows);
          for (int64_t r = 0; r < n; ++r) {
            for (int32_t d = 0; d < dim; ++d) qbar[d] += rows[r * dim + d] / n;
          }
          std::vector<double> estimate(nb);
          for (int64_t j = 0; j < nb; ++j) {
            estimate[j] = in.scale * dot(qbar.data(), &kbar[j * dim], dim);
          }
          softmax(estimate.data(), nb);
          distance = js_distance(estimate.data(), vb.data(), nb);
          pattern = distance < p.tau ? 1 : 0;
          if (pattern == 1) nv = ns = std::max<int64_t>(std::min(min_blocks, nb), 1);
          // Column stripes (first block forced) and diagonal bands (main diagonal forced).
          rank(vb.data(), nb, 0, order);
          for (int64_t k = 0; k < nv; ++k) {
            for (int64_t i = order[k]; i < nb; ++i) marked[i * nb + order[k]] = 1;
          }
          rank(sb.data(), nb, 0, order);
          for (int64_t k = 0; k < ns; ++k) {
            for (int64_t i = order[k]; i < nb; ++i) marked[i * nb + i - order[k]] = 1;
          }
          if (pattern == 1) {
            // Pooled block map, causal, chosen by global coverage gamma * nb over all its rows.
            load_rows(in.q, in.dtype, in.q_stride_token, in.q_stride_head, hq, s.begin, len, dim,
                      rows);
            a.assign(static_cast<size_t>(nb) * nb, 0.0);
            pooled_softmax(pool(rows, len, dim, p.block_size), kbar, nb, dim, in.scale, 0, 1.0, a);
            std::vector<double> flat;       // the causal entries (i, j <= i), row-major
            std::vector<int64_t> flat_at;   // their index i * nb + j in marked
            for (int64_t i = 0; i < nb; ++i) {
              for (int64_t j = 0; j <= i; ++j) {
                flat.push_back(a[i * nb + j]);
                flat_at.push_back(i * nb + j);
              }
            }
            rank(flat.data(), static_cast<int64_t>(flat.size()), -1, order);
            const int64_t k = coverage_count(flat.data(), order, p.gamma * nb);
            for (int64_t e = 0; e < k; ++e) marked[flat_at[order[e]]] = 1;
          }
        }
        const int64_t listed = emit_lists(p.out, b, hq, in.num_q_heads, marked, nb);
        write_density(p.out, at, listed, nb * (nb + 1) / 2);
        if (p.pattern) p.pattern[at] = pattern;
        if (p.js_distance) p.js_distance[at] = static_cast<float>(distance);
        if (p.vertical_blocks) p.vertical_blocks[at] = static_cast<int32_t>(nv);
        if (p.slash_blocks) p.slash_blocks[at] = static_cast<int32_t>(ns);
      }
    }
  }
}

// ---- PBS-Attn ---------------------------------------------------------------------------------

void pbs_permute_cpu(const PbsPermuteParams& p) {
  const char* fn = "pbs_permute";
  const std::vector<Seq> seqs = check_qk(fn, p.qk);
  check_block_size(fn, p.block_size);
  check_segment_size(fn, p.segment_size, p.block_size, false);
  ABSPARSE_CHECK_ARG(p.qk.total_tokens == 0 || (p.v && p.k_perm && p.v_perm && p.key_positions),
                     fn, "v, k_perm, v_perm, key_positions: expected pointers, got null");
  const PrefillQK& in = p.qk;
  const int32_t dim = in.head_dim, group = in.num_q_heads / in.num_kv_heads, hk_n = in.num_kv_heads;
  const int64_t seg = p.segment_size, row_bytes = int64_t{dim} * dtype_size(in.dtype);
  std::vector<double> keys, score;
  std::vector<int64_t> order, position;
  for (int32_t b = 0; b < in.batch; ++b) {
    const Seq& s = seqs[b];
    const int64_t complete = s.len / seg;
    for (int32_t hk = 0; hk < hk_n; ++hk) {
      position.resize(s.len);
      std::iota(position.begin(), position.end(), int64_t{0});
      // Permuting the only segment changes nothing the attention can see (all of it is diagonal).
      if (complete > 1 || (complete == 1 && s.len > seg)) {
        load_keys(in, s, hk, keys);
        score.assign(s.len, 0.0);
        const double weight = 1.0 / (double{1.0} * group * std::min<int64_t>(p.block_size, s.len));
        for (int32_t hq = hk * group; hq < (hk + 1) * group; ++hq) {
          for_each_last_query(in, s, hq, keys, p.block_size,
                              [&](int64_t, int64_t t, const double* probs) {
                                for (int64_t c = 0; c <= t; ++c) score[c] += weight * probs[c];
                              });
        }
        for (int64_t g = 0; g < complete; ++g) {
          rank(&score[g * seg], seg, -1, order);
          for (int64_t r = 0; r < seg; ++r) position[g * seg + r] = g * seg + order[r];
        }
      }
      for (int64_t r = 0; r < s.len; ++r) {
        const int64_t src = s.begin + position[r], dst = (s.begin + r) * hk_n + hk;
        std::memcpy(static_cast<char*>(p.k_perm) + dst * row_bytes,
                    static_cast<const char*>(in.k) +
                        (src * in.k_stride_token + hk * in.k_stride_head) * dtype_size(in.dtype),
                    row_bytes);
        std::memcpy(static_cast<char*>(p.v_perm) + dst * row_bytes,
                    static_cast<const char*>(p.v) +
                        (src * p.v_stride_token + hk * p.v_stride_head) * dtype_size(in.dtype),
                    row_bytes);
        p.key_positions[dst] = static_cast<int32_t>(position[r]);
      }
    }
  }
}

void pbs_mask_cpu(const PbsMaskParams& p) {
  const char* fn = "pbs_mask";
  const std::vector<Seq> seqs = check_qk(fn, p.qk);
  check_block_size(fn, p.block_size);
  check_segment_size(fn, p.segment_size, p.block_size, false);
  ABSPARSE_CHECK_ARG(p.threshold > 0.0 && p.threshold <= 1.0, fn,
                     "threshold: expected a value in (0, 1], got ", p.threshold);
  check_lists_out(fn, p.out, p.qk.batch, ceil_div(max_len_of(seqs), p.block_size));
  const PrefillQK& in = p.qk;
  ABSPARSE_CHECK_ARG(in.total_tokens == 0 || p.key_positions, fn,
                     "key_positions: expected a pointer, got null");
  // key_positions: per (sequence, KV head) a permutation of each segment (values validated first).
  std::vector<char> seen;
  for (int32_t b = 0; b < in.batch; ++b) {
    const Seq& s = seqs[b];
    for (int32_t hk = 0; hk < in.num_kv_heads; ++hk) {
      seen.assign(s.len, 0);
      for (int64_t r = 0; r < s.len; ++r) {
        const int64_t pos = p.key_positions[(s.begin + r) * p.key_positions_stride_token +
                                            hk * p.key_positions_stride_head];
        const int64_t lo = r / p.segment_size * p.segment_size;
        const int64_t hi = std::min<int64_t>(lo + p.segment_size, s.len);
        ABSPARSE_CHECK_ARG(pos >= lo && pos < hi && !seen[pos], fn, "key_positions[",
                           s.begin + r, ", ", hk, "]: expected a position in [", lo, ", ", hi,
                           ") not used before (a permutation of the segment of stored row ", r,
                           " of sequence ", b, "), got ", pos);
        seen[pos] = 1;
      }
    }
  }
  const int32_t dim = in.head_dim, group = in.num_q_heads / in.num_kv_heads;
  const int64_t bs = p.block_size, per_segment = p.segment_size / bs;
  std::vector<double> rows, a;
  std::vector<int64_t> order;
  std::vector<char> marked;
  for (int32_t b = 0; b < in.batch; ++b) {
    const Seq& s = seqs[b];
    const int64_t len = s.len, nb = ceil_div(len, bs);
    for (int32_t hk = 0; hk < in.num_kv_heads; ++hk) {
      // Smallest original position in each key block, and the block holding position 0.
      std::vector<int64_t> min_pos(nb, len);
      int64_t first_block = -1;
      for (int64_t r = 0; r < len; ++r) {
        const int64_t pos = p.key_positions[(s.begin + r) * p.key_positions_stride_token +
                                            hk * p.key_positions_stride_head];
        min_pos[r / bs] = std::min(min_pos[r / bs], pos);
        if (pos == 0) first_block = r / bs;
      }
      // Group mean of the query heads' pooled softmax rows over off-diagonal segments.
      load_keys(in, s, hk, rows);
      const std::vector<double> kbar = pool(rows, len, dim, p.block_size);
      a.assign(static_cast<size_t>(nb) * nb, 0.0);
      for (int32_t hq = hk * group; hq < (hk + 1) * group; ++hq) {
        load_rows(in.q, in.dtype, in.q_stride_token, in.q_stride_head, hq, s.begin, len, dim,
                  rows);
        pooled_softmax(pool(rows, len, dim, p.block_size), kbar, nb, dim, in.scale, per_segment,
                       1.0 / group, a);
      }
      marked.assign(static_cast<size_t>(nb) * nb, 0);
      int64_t causal = 0;
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t last_query = std::min((i + 1) * bs, len) - 1;
        const int64_t end = allowed_end(i, per_segment);  // off-diagonal: blocks [0, end)
        rank(&a[i * nb], end, -1, order);
        const int64_t k = coverage_count(&a[i * nb], order, p.threshold);
        for (int64_t e = 0; e < k; ++e) marked[i * nb + order[e]] = 1;
        // Diagonal segment: every block with a key the block's last query may see.
        for (int64_t j = end; j < std::min(end + per_segment, nb); ++j) {
          if (min_pos[j] <= last_query) marked[i * nb + j] = 1;
        }
        if (p.force_first && first_block >= 0) marked[i * nb + first_block] = 1;
        for (int64_t j = 0; j < nb; ++j) causal += min_pos[j] <= last_query;
      }
      const int64_t listed = emit_lists(p.out, b, hk, in.num_kv_heads, marked, nb);
      write_density(p.out, int64_t{b} * in.num_kv_heads + hk, listed, causal);
    }
  }
}

}  // namespace absparse

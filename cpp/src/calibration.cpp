// Calibration on the CPU: per-head attention recall for candidate block sizes (head_recall_cpu)
// and the exact block-size allocation (allocate_block_sizes). See absparse/calibration.h.
#include "absparse/calibration.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "absparse/error.h"
#include "block_summary.h"

// x86-64 builds target the SSE2 baseline; the two hot loops below (float32 -> float64 multiply-add
// and multiply-max-add, vectorized over tokens or blocks) also get an AVX2 clone picked at load
// time. Results are bitwise equal: every lane does the same IEEE operations in the same order
// (no FMA: the library builds with -ffp-contract=off).
// Needs ifunc (glibc) and GCC >= 8 or Clang >= 14; define ABSPARSE_NO_VECTOR_CLONES to opt out.
#if defined(__x86_64__) && defined(__GLIBC__) && !defined(ABSPARSE_NO_VECTOR_CLONES) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && __GNUC__ >= 8))
#define ABSPARSE_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ABSPARSE_VECTOR_CLONES
#endif

namespace absparse {

namespace {

bool is_power_of_two(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

constexpr int64_t kMaxCandidateSize = int64_t{1} << 30;

// Candidates shared by both entry points: 1 <= C <= 64 distinct powers of two in [1, 2^30].
void check_candidates(const char* fn, const int32_t* candidates, int32_t count) {
  ABSPARSE_CHECK_ARG(count >= 1 && count <= 64, fn,
                     "candidates: expected between 1 and 64 block sizes, got ", count);
  ABSPARSE_CHECK_ARG(candidates != nullptr, fn, "candidates: expected an array, got null");
  for (int32_t c = 0; c < count; ++c) {
    ABSPARSE_CHECK_ARG(is_power_of_two(candidates[c]) && candidates[c] <= kMaxCandidateSize, fn,
                       "candidates[", c, "]: expected a power of two in [1, 2^30], got ",
                       candidates[c]);
    for (int32_t e = 0; e < c; ++e) {
      ABSPARSE_CHECK_ARG(candidates[e] != candidates[c], fn, "candidates: expected distinct ",
                         "block sizes, got ", candidates[c], " at positions ", e, " and ", c);
    }
  }
}

// ---- Shared with the decode pipeline ------------------------------------------------------------
// Summaries come from detail::summarize_block (block_summary.h), shared with update_centroids.
// block_logits below restates, operation for operation, select_blocks.cpp's block_logit for a run
// of blocks at once (channel-major, vectorizable), so head_recall's logits are bitwise the same.

// Block logits of blocks [0, count) of a channel-major summary table, for one query q (float64):
//   mean:        s * sum_d q_d c_d
//   minmax/cub.: s * sum_d max(q_d hi_d, q_d lo_d)
// vectors: R planes of [D][ld] float32 (plane 0 = c or hi, plane 1 = lo). Every logit accumulates
// in channel order from 0.0 and is scaled last, as select_blocks.cpp's block_logit does, so the
// values are bitwise equal; the block-minor layout only lets the compiler run blocks in parallel.
ABSPARSE_VECTOR_CLONES
void block_logits(SummaryKind kind, const double* __restrict__ q, const float* __restrict__ vectors,
                  int64_t ld, int32_t dim, int64_t count, double scale, double* __restrict__ out) {
  std::fill(out, out + count, 0.0);
  if (kind == SummaryKind::kMean) {
    for (int32_t d = 0; d < dim; ++d) {
      const double qd = q[d];
      const float* __restrict__ c = vectors + d * ld;
      for (int64_t j = 0; j < count; ++j) out[j] += qd * static_cast<double>(c[j]);
    }
  } else {
    const float* planes_lo = vectors + static_cast<int64_t>(dim) * ld;
    for (int32_t d = 0; d < dim; ++d) {
      const double qd = q[d];
      const float* __restrict__ hi = vectors + d * ld;
      const float* __restrict__ lo = planes_lo + d * ld;
      for (int64_t j = 0; j < count; ++j) {
        out[j] += std::max(qd * static_cast<double>(hi[j]), qd * static_cast<double>(lo[j]));
      }
    }
  }
  for (int64_t j = 0; j < count; ++j) out[j] = scale * out[j];
}

// NaN logits rank below every number (as in select_blocks; inputs are finite here: parity only).
double rank_key(double x) { return std::isnan(x) ? -std::numeric_limits<double>::infinity() : x; }

// ---- Exact attention ----------------------------------------------------------------------------

// acc[g][t] += sum_d q[g][d] * keys[d][t] for t in [0, width), G queries at once.
// keys: channel-major [D][ld] float32; acc: G rows of ld_acc float64, zeroed by the caller.
// Per element the sum runs over d in order from 0.0 (a sequential sum: it agrees with the four
// partial sums of float64_rows::dot to float64 rounding); four channels are applied per pass over
// acc, which keeps that order and saves loads/stores.
ABSPARSE_VECTOR_CLONES
void dot_tile(const double* __restrict__ q, int32_t group, int32_t dim, const float* keys,
              int64_t ld, int64_t width, double* acc, int64_t ld_acc) {
  int32_t d = 0;
  for (; d + 4 <= dim; d += 4) {
    const float* __restrict__ k0 = keys + d * ld;
    const float* __restrict__ k1 = k0 + ld;
    const float* __restrict__ k2 = k1 + ld;
    const float* __restrict__ k3 = k2 + ld;
    for (int32_t g = 0; g < group; ++g) {
      const double q0 = q[g * dim + d], q1 = q[g * dim + d + 1];
      const double q2 = q[g * dim + d + 2], q3 = q[g * dim + d + 3];
      double* __restrict__ a = acc + g * ld_acc;
      for (int64_t t = 0; t < width; ++t) {
        double v = a[t];
        v += q0 * static_cast<double>(k0[t]);
        v += q1 * static_cast<double>(k1[t]);
        v += q2 * static_cast<double>(k2[t]);
        v += q3 * static_cast<double>(k3[t]);
        a[t] = v;
      }
    }
  }
  for (; d < dim; ++d) {
    const float* __restrict__ k0 = keys + d * ld;
    for (int32_t g = 0; g < group; ++g) {
      const double q0 = q[g * dim + d];
      double* __restrict__ a = acc + g * ld_acc;
      for (int64_t t = 0; t < width; ++t) a[t] += q0 * static_cast<double>(k0[t]);
    }
  }
}

// Tokens per tile of the logit passes: G rows of float64 accumulators (G * 2 KiB) stay in L1.
constexpr int64_t kTile = 256;

// The softmax of one query over [0, len) as a prefix sum: cum[t] = sum_{u < t} exp(l_u - peak),
// so the mass of tokens [a, b) is (cum[b] - cum[a]) / cum[len]. logits: [len] (overwritten).
void softmax_prefix(const double* logits, int64_t len, double* cum) {
  double peak = -std::numeric_limits<double>::infinity();
  for (int64_t t = 0; t < len; ++t) peak = std::max(peak, logits[t]);
  double total = 0.0;
  cum[0] = 0.0;
  for (int64_t t = 0; t < len; ++t) {
    total += std::exp(logits[t] - peak);
    cum[t + 1] = total;
  }
}

}  // namespace

void check_head_recall(const HeadRecallParams& p) {
  const char* fn = "head_recall";
  ABSPARSE_CHECK_ARG(p.num_probes >= 1, fn, "q: expected at least one probe query (N >= 1), got ",
                     p.num_probes);
  ABSPARSE_CHECK_ARG(p.num_kv_heads >= 1, fn, "k: expected at least one KV head, got ",
                     p.num_kv_heads);
  ABSPARSE_CHECK_ARG(p.num_q_heads > 0 && p.num_q_heads % p.num_kv_heads == 0, fn,
                     "q: expected a number of query heads that is a positive multiple of the ",
                     p.num_kv_heads, " KV heads, got ", p.num_q_heads);
  ABSPARSE_CHECK_ARG(p.head_dim >= 1, fn, "q: expected a head dim >= 1, got ", p.head_dim);
  ABSPARSE_CHECK_ARG(p.num_tokens >= 1, fn, "k: expected at least one key (T >= 1), got ",
                     p.num_tokens);
  ABSPARSE_CHECK_ARG(p.dtype == DType::kFloat32 || p.dtype == DType::kFloat16 ||
                         p.dtype == DType::kBFloat16,
                     fn, "q: expected dtype float16, bfloat16 or float32, got ",
                     dtype_name(p.dtype));
  check_candidates(fn, p.candidates, p.num_candidates);
  ABSPARSE_CHECK_ARG(p.q && p.k && p.positions && p.recall, fn,
                     "expected non-null q, k, positions and recall pointers");
  if (p.budget_fraction != 0.0) {
    ABSPARSE_CHECK_ARG(p.budget_fraction > 0.0 && p.budget_fraction < 1.0, fn,
                       "token_budget: a fractional budget must lie in (0, 1), got ",
                       p.budget_fraction);
  } else {
    ABSPARSE_CHECK_ARG(p.budget_tokens >= 0, fn,
                       "token_budget: expected a token count >= 0, got ", p.budget_tokens);
  }
  ABSPARSE_CHECK_ARG(p.sink_tokens >= 0, fn, "sink_tokens: expected >= 0, got ", p.sink_tokens);
  ABSPARSE_CHECK_ARG(p.local_tokens >= 0, fn, "local_tokens: expected >= 0, got ",
                     p.local_tokens);
  ABSPARSE_CHECK_ARG(p.kind == SummaryKind::kMean || p.kind == SummaryKind::kMinMax ||
                         p.kind == SummaryKind::kCuboid,
                     fn, "summary: expected mean, minmax or cuboid, got ",
                     static_cast<int>(p.kind));
  ABSPARSE_CHECK_ARG(p.group_reduce == GroupReduce::kMax ||
                         p.group_reduce == GroupReduce::kSoftmaxSum,
                     fn, "group_reduce: expected max or softmax_sum, got ",
                     static_cast<int>(p.group_reduce));
  ABSPARSE_CHECK_ARG(std::isfinite(p.scale), fn, "scale: expected a finite value, got ", p.scale);
  for (int32_t n = 0; n < p.num_probes; ++n) {
    const int64_t pos = p.positions[n * p.positions_stride];
    ABSPARSE_CHECK_ARG(pos >= 0 && pos < p.num_tokens, fn, "positions[", n,
                       "]: expected in [0, T) = [0, ", p.num_tokens, ") (the probe attends keys ",
                       "[0, position]), got ", pos);
  }
  // Non-finite queries or keys would make the softmax (and so every recall) NaN.
  for (int32_t n = 0; n < p.num_probes; ++n) {
    for (int32_t i = 0; i < p.num_q_heads; ++i) {
      const int64_t at = n * p.q_stride_probe + i * p.q_stride_head;
      for (int32_t d = 0; d < p.head_dim; ++d) {
        const float v = load_float(p.q, at + d, p.dtype);
        ABSPARSE_CHECK_ARG(std::isfinite(v), fn, "q: expected finite values, got ", v, " at [",
                           n, ", ", i, ", ", d, "]");
      }
    }
  }
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    for (int32_t h = 0; h < p.num_kv_heads; ++h) {
      const int64_t at = t * p.k_stride_token + h * p.k_stride_head;
      for (int32_t d = 0; d < p.head_dim; ++d) {
        const float v = load_float(p.k, at + d, p.dtype);
        ABSPARSE_CHECK_ARG(std::isfinite(v), fn, "k: expected finite values, got ", v, " at [",
                           t, ", ", h, ", ", d, "]");
      }
    }
  }
}

void head_recall_cpu(const HeadRecallParams& p) {
  check_head_recall(p);
  const int32_t num_probes = p.num_probes, dim = p.head_dim, num_cand = p.num_candidates;
  const int32_t group = p.num_q_heads / p.num_kv_heads;
  const int32_t num_vectors = summary_vectors(p.kind);

  std::vector<int64_t> lens(num_probes);
  for (int32_t n = 0; n < num_probes; ++n) {
    lens[n] = int64_t{p.positions[n * p.positions_stride]} + 1;
  }
  const int64_t max_len = *std::max_element(lens.begin(), lens.end());

  // Selection plan of every (probe, candidate); `full` when A covers [0, L) (recall exactly 1).
  std::vector<SelectionPlan> plans(static_cast<size_t>(num_probes) * num_cand);
  std::vector<char> all_full(num_probes, 1);
  auto full = [](const SelectionPlan& plan) { return plan.num_selected == plan.num_candidates; };
  for (int32_t n = 0; n < num_probes; ++n) {
    for (int32_t c = 0; c < num_cand; ++c) {
      SelectionPlan& plan = plans[static_cast<size_t>(n) * num_cand + c];
      plan = plan_selection(lens[n], p.candidates[c], p.budget_tokens, p.budget_fraction,
                            p.sink_tokens, p.local_tokens);
      if (!full(plan)) all_full[n] = 0;
    }
  }

  std::vector<float> keys_h(static_cast<size_t>(max_len) * dim);  // [max_len][D] one KV head
  std::vector<float> keys_t(static_cast<size_t>(dim) * max_len);  // [D][max_len] the same keys
  std::vector<std::vector<float>> summaries(num_cand);             // [c] -> [R][D][nb_c]
  std::vector<float> block_vectors(static_cast<size_t>(num_vectors) * dim);
  std::vector<double> queries(static_cast<size_t>(group) * dim);   // [G][D]
  const int64_t ld_acc = max_len + 1;
  std::vector<double> logits(static_cast<size_t>(group) * ld_acc);  // [G][max_len]
  std::vector<double> cum(static_cast<size_t>(group) * ld_acc);     // [G][max_len + 1]
  std::vector<double> block_scores;                                 // [G][candidates]
  std::vector<double> scores;                                       // [candidates]
  std::vector<int64_t> order;
  std::vector<double> sums(num_cand);

  for (int32_t h = 0; h < p.num_kv_heads; ++h) {
    // The head's keys as float32, token-major (for the summaries) and channel-major (for the
    // logit passes; transposed in tiles of 64 tokens).
    for (int64_t t = 0; t < max_len; ++t) {
      const int64_t at = t * p.k_stride_token + h * p.k_stride_head;
      for (int32_t d = 0; d < dim; ++d) keys_h[t * dim + d] = load_float(p.k, at + d, p.dtype);
    }
    for (int64_t t0 = 0; t0 < max_len; t0 += 64) {
      const int64_t t1 = std::min<int64_t>(max_len, t0 + 64);
      for (int32_t d = 0; d < dim; ++d) {
        for (int64_t t = t0; t < t1; ++t) keys_t[d * max_len + t] = keys_h[t * dim + d];
      }
    }
    // Summaries of every complete block of [0, max_len), once per candidate: a complete block's
    // summary does not depend on the probe's length.
    for (int32_t c = 0; c < num_cand; ++c) {
      const int32_t bs = p.candidates[c];
      const int64_t nb = max_len / bs;
      std::vector<float>& table = summaries[c];
      table.assign(static_cast<size_t>(num_vectors) * dim * nb, 0.0f);
      for (int64_t j = 0; j < nb; ++j) {
        detail::summarize_block(p.kind, keys_h.data() + j * bs * dim, bs, dim, block_vectors.data());
        for (int32_t r = 0; r < num_vectors; ++r) {
          for (int32_t d = 0; d < dim; ++d) {
            table[(static_cast<size_t>(r) * dim + d) * nb + j] = block_vectors[r * dim + d];
          }
        }
      }
    }

    std::fill(sums.begin(), sums.end(), 0.0);
    for (int32_t n = 0; n < num_probes; ++n) {
      const int64_t len = lens[n];
      if (all_full[n]) {
        for (int32_t c = 0; c < num_cand; ++c) sums[c] += group;
        continue;
      }
      for (int32_t i = 0; i < group; ++i) {
        const int64_t at = n * p.q_stride_probe + (h * group + i) * p.q_stride_head;
        for (int32_t d = 0; d < dim; ++d) queries[i * dim + d] = load_float(p.q, at + d, p.dtype);
      }
      // Exact logits of the G query heads over [0, len), then their softmax prefix sums.
      for (int64_t t0 = 0; t0 < len; t0 += kTile) {
        const int64_t width = std::min(kTile, len - t0);
        for (int32_t i = 0; i < group; ++i) {
          std::fill_n(logits.data() + i * ld_acc + t0, width, 0.0);
        }
        dot_tile(queries.data(), group, dim, keys_t.data() + t0, max_len, width,
                 logits.data() + t0, ld_acc);
      }
      for (int32_t i = 0; i < group; ++i) {
        double* row = logits.data() + i * ld_acc;
        for (int64_t t = 0; t < len; ++t) row[t] = p.scale * row[t];
        softmax_prefix(row, len, cum.data() + i * ld_acc);
      }

      for (int32_t c = 0; c < num_cand; ++c) {
        const SelectionPlan& plan = plans[static_cast<size_t>(n) * num_cand + c];
        if (full(plan)) {
          sums[c] += group;
          continue;
        }
        const int64_t bs = p.candidates[c];
        const int64_t nb_all = max_len / bs;
        const int64_t count = plan.num_candidates;
        // Candidates [sink_blocks, local_begin) get the group score of select_blocks.
        order.resize(count);
        std::iota(order.begin(), order.end(), int64_t{0});
        if (plan.num_selected > 0) {
          block_scores.resize(static_cast<size_t>(group) * count);
          const float* first = summaries[c].data() + plan.sink_blocks;
          for (int32_t i = 0; i < group; ++i) {
            block_logits(p.kind, queries.data() + i * dim, first, nb_all, dim, count, p.scale,
                         block_scores.data() + static_cast<size_t>(i) * count);
          }
          scores.assign(count, 0.0);
          if (p.group_reduce == GroupReduce::kMax) {
            for (int64_t j = 0; j < count; ++j) {
              double best = -std::numeric_limits<double>::infinity();
              for (int32_t i = 0; i < group; ++i) {
                best = std::max(best, rank_key(block_scores[i * count + j]));
              }
              scores[j] = best;
            }
          } else {  // softmax_sum: sum over the group of each head's softmax over the candidates
            for (int32_t i = 0; i < group; ++i) {
              const double* row = block_scores.data() + static_cast<size_t>(i) * count;
              double peak = -std::numeric_limits<double>::infinity();
              for (int64_t j = 0; j < count; ++j) peak = std::max(peak, rank_key(row[j]));
              if (!std::isfinite(peak)) continue;
              double total = 0.0;
              for (int64_t j = 0; j < count; ++j) total += std::exp(rank_key(row[j]) - peak);
              for (int64_t j = 0; j < count; ++j) {
                scores[j] += std::exp(rank_key(row[j]) - peak) / total;
              }
            }
          }
          std::partial_sort(order.begin(), order.begin() + plan.num_selected, order.end(),
                            [&](int64_t x, int64_t y) {
                              const double sx = rank_key(scores[x]), sy = rank_key(scores[y]);
                              return sx > sy || (sx == sy && x < y);  // ties: lower index first
                            });
        }
        // Attended mass per query head: sink blocks, local blocks + partial tail, selected blocks.
        const int64_t sink_end = plan.sink_blocks * bs, local_start = plan.local_begin * bs;
        for (int32_t i = 0; i < group; ++i) {
          const double* cu = cum.data() + i * ld_acc;
          double mass = (cu[sink_end] - cu[0]) + (cu[len] - cu[local_start]);
          for (int64_t s = 0; s < plan.num_selected; ++s) {
            const int64_t j = plan.sink_blocks + order[s];
            mass += cu[(j + 1) * bs] - cu[j * bs];
          }
          sums[c] += mass / cu[len];
        }
      }
    }
    const double probes_heads = static_cast<double>(num_probes) * group;
    for (int32_t c = 0; c < num_cand; ++c) {
      p.recall[h * p.recall_stride_head + c * p.recall_stride_candidate] = sums[c] / probes_heads;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Allocation
// ------------------------------------------------------------------------------------------------

AllocationConstraint parse_allocation_constraint(const std::string& name) {
  if (name == "count") return AllocationConstraint::kCount;
  if (name == "mean") return AllocationConstraint::kMean;
  ABSPARSE_CHECK_ARG(false, "allocate_block_sizes",
                     "constraint: expected 'count' or 'mean', got '", name, "'");
  return AllocationConstraint::kCount;
}

const char* allocation_constraint_name(AllocationConstraint constraint) {
  return constraint == AllocationConstraint::kMean ? "mean" : "count";
}

namespace {

// The integer knapsack of one allocation problem (see AllocationConstraint).
//   count: state r = capacity left, start r0 = min(floor(N * max / avg), N * max / min);
//          a choice of cost w needs r >= w and leads to r - w; every end state is feasible.
//   mean:  state r = cost still needed, start r0 = ceil(N * avg / min) (<= N * max / min);
//          a choice leads to max(0, r - w); only the end state 0 is feasible.
struct Knapsack {
  bool mean = false;
  int64_t start = 0;
  std::vector<int64_t> cost;  // [C]
  // Next state, or -1 when the choice does not fit.
  int64_t next(int64_t r, int32_t c) const {
    return mean ? std::max<int64_t>(0, r - cost[c]) : (r >= cost[c] ? r - cost[c] : -1);
  }
};

Knapsack make_knapsack(const AllocateBlockSizesParams& p, int64_t min_size, int64_t max_size) {
  Knapsack k;
  k.mean = p.constraint == AllocationConstraint::kMean;
  k.cost.resize(p.num_candidates);
  for (int32_t c = 0; c < p.num_candidates; ++c) {
    k.cost[c] = k.mean ? p.candidates[c] / min_size : max_size / p.candidates[c];
  }
  const int64_t most = p.num_heads * (max_size / min_size);  // the largest reachable total cost
  if (k.mean) {
    k.start = (p.num_heads * p.avg_block_size + min_size - 1) / min_size;
  } else {
    k.start = std::min(p.num_heads * max_size / p.avg_block_size, most);
  }
  return k;
}

// Upper bound on N * S (bytes of the choice table).
constexpr int64_t kMaxTableBytes = int64_t{1} << 31;

}  // namespace

void check_allocate_block_sizes(const AllocateBlockSizesParams& p) {
  const char* fn = "allocate_block_sizes";
  ABSPARSE_CHECK_ARG(p.num_heads >= 0 && p.num_heads <= (int64_t{1} << 30), fn,
                     "recall: expected a number of heads in [0, 2^30], got ", p.num_heads);
  check_candidates(fn, p.candidates, p.num_candidates);
  ABSPARSE_CHECK_ARG(p.constraint == AllocationConstraint::kCount ||
                         p.constraint == AllocationConstraint::kMean,
                     fn, "constraint: expected count or mean, got ",
                     static_cast<int>(p.constraint));
  ABSPARSE_CHECK_ARG(p.num_heads == 0 || (p.recall && p.block_sizes), fn,
                     "expected non-null recall and block_sizes pointers");
  const int32_t* cand = p.candidates;
  const int64_t min_size = *std::min_element(cand, cand + p.num_candidates);
  const int64_t max_size = *std::max_element(cand, cand + p.num_candidates);
  ABSPARSE_CHECK_ARG(p.avg_block_size > 0, fn, "avg_block_size: expected > 0, got ",
                     p.avg_block_size);
  ABSPARSE_CHECK_ARG(
      p.avg_block_size <= max_size, fn, "avg_block_size: infeasible budget: with constraint '",
      allocation_constraint_name(p.constraint), "' (",
      p.constraint == AllocationConstraint::kMean ? "sum of sizes >= N * avg_block_size"
                                                  : "sum of 1/size <= N / avg_block_size",
      ") even every head at the largest candidate ", max_size,
      " falls short; expected avg_block_size <= ", max_size, ", got ", p.avg_block_size);
  double most = 0.0;
  for (int64_t n = 0; n < p.num_heads; ++n) {
    for (int32_t c = 0; c < p.num_candidates; ++c) {
      const double v = p.recall[n * p.recall_stride_head + c * p.recall_stride_candidate];
      ABSPARSE_CHECK_ARG(std::isfinite(v), fn, "recall: expected finite values, got ", v, " at [",
                         n, ", ", c, "]");
      most = std::max(most, std::fabs(v));
    }
  }
  // Grid sums of N values must fit int64: N * max|v| * 2^40 < 2^62.
  ABSPARSE_CHECK_ARG(std::ldexp(most * static_cast<double>(p.num_heads), kRecallGridBits) <
                         std::ldexp(1.0, 62),
                     fn, "recall: expected N * max|recall| < 2^22 (values are summed exactly on a ",
                     "2^-40 grid), got N = ", p.num_heads, ", max|recall| = ", most);
  const Knapsack k = make_knapsack(p, min_size, max_size);
  ABSPARSE_CHECK_ARG(p.num_heads == 0 || k.start + 1 <= kMaxTableBytes / p.num_heads, fn,
                     "recall: the exact allocation needs N * S = ", p.num_heads, " * ",
                     k.start + 1, " bytes of choice table, expected at most 2^31 (fewer heads, ",
                     "or a smaller max/min candidate ratio)");
}

void allocate_block_sizes(const AllocateBlockSizesParams& p) {
  check_allocate_block_sizes(p);
  const int64_t num_heads = p.num_heads;
  const int32_t num_cand = p.num_candidates;
  if (num_heads == 0) return;
  const int32_t* cand = p.candidates;
  const int64_t min_size = *std::min_element(cand, cand + num_cand);
  const int64_t max_size = *std::max_element(cand, cand + num_cand);
  const Knapsack k = make_knapsack(p, min_size, max_size);
  const int64_t num_states = k.start + 1;

  // Choices visited from the largest block down, so a later choice replaces the best only when
  // strictly better: equal keys keep the larger block (tie rule 2).
  std::vector<int32_t> by_size(num_cand);
  std::iota(by_size.begin(), by_size.end(), 0);
  std::sort(by_size.begin(), by_size.end(),
            [&](int32_t a, int32_t b) { return cand[a] > cand[b]; });
  std::vector<int64_t> summaries(num_cand);  // summaries per max_size tokens: max_size / size
  for (int32_t c = 0; c < num_cand; ++c) summaries[c] = max_size / cand[c];

  auto grid = [&](int64_t n, int32_t c) {
    const double v = p.recall[n * p.recall_stride_head + c * p.recall_stride_candidate];
    return std::llround(std::ldexp(v, kRecallGridBits));
  };

  // Suffix DP: value[r] / summ[r] = best key (max grid sum, then min summaries) of heads n..N-1
  // from state r; choice[n][r] = the choice of head n that reaches it.
  constexpr int64_t kInfeasible = std::numeric_limits<int64_t>::min();
  std::vector<int64_t> value(num_states), summ(num_states, 0);
  std::vector<int64_t> next_value(num_states), next_summ(num_states);
  for (int64_t r = 0; r < num_states; ++r) value[r] = (!k.mean || r == 0) ? 0 : kInfeasible;
  std::vector<uint8_t> choice(static_cast<size_t>(num_heads) * num_states);
  std::vector<int64_t> gains(num_cand);

  for (int64_t n = num_heads - 1; n >= 0; --n) {
    for (int32_t c = 0; c < num_cand; ++c) gains[c] = grid(n, c);
    uint8_t* row = choice.data() + static_cast<size_t>(n) * num_states;
    for (int64_t r = 0; r < num_states; ++r) {
      int64_t best_value = kInfeasible, best_summ = 0;
      int32_t best = 0;
      for (int32_t c : by_size) {
        const int64_t r2 = k.next(r, c);
        if (r2 < 0 || value[r2] == kInfeasible) continue;
        const int64_t v = gains[c] + value[r2];
        const int64_t s = summaries[c] + summ[r2];
        if (best_value == kInfeasible || v > best_value || (v == best_value && s < best_summ)) {
          best_value = v;
          best_summ = s;
          best = c;
        }
      }
      next_value[r] = best_value;
      next_summ[r] = best_summ;
      row[r] = static_cast<uint8_t>(best);
    }
    value.swap(next_value);
    summ.swap(next_summ);
  }
  // Feasible by check_allocate_block_sizes (avg <= max: all heads at max_size fit).
  int64_t r = k.start;
  for (int64_t n = 0; n < num_heads; ++n) {
    const int32_t c = choice[static_cast<size_t>(n) * num_states + r];
    p.block_sizes[n * p.block_sizes_stride] = cand[c];
    r = k.next(r, c);
  }
}

}  // namespace absparse

// CPU reference of the prefill block-list builders (absparse/prefill_masks.h,
// docs/prefill_masks.md): FlexPrefill and PBS-Attn (permutation and mask), with their argument
// checks. float64 throughout; one (sequence, head) at a time, so memory stays O(L * D + nb^2).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "absparse/error.h"
#include "absparse/prefill_masks.h"
#include "prefill_common.h"

namespace absparse {

using namespace prefill_detail;

// ---- FlexPrefill ------------------------------------------------------------------------------

void check_flexprefill_mask_args(const FlexPrefillMaskParams& p) {
  const char* fn = "flexprefill_mask";
  check_qk_args(fn, p.qk);
  check_block_size(fn, p.block_size);
  ABSPARSE_CHECK_ARG(p.gamma > 0.0 && p.gamma <= 1.0, fn, "gamma: expected a value in (0, 1], got ",
                     p.gamma);
  ABSPARSE_CHECK_ARG(std::isfinite(p.tau) && p.tau >= 0.0, fn,
                     "tau: expected a finite value >= 0, got ", p.tau);
  ABSPARSE_CHECK_ARG(p.min_budget >= 0, fn, "min_budget: expected >= 0 tokens, got ", p.min_budget);
  ABSPARSE_CHECK_ARG(p.max_budget >= std::max<int64_t>(p.min_budget, 1), fn,
                     "max_budget: expected >= max(min_budget, 1) = ",
                     std::max<int64_t>(p.min_budget, 1), " tokens, got ", p.max_budget);
  check_lists_out_args(fn, p.out, p.qk.batch);
}

void flexprefill_mask_cpu(const FlexPrefillMaskParams& p) {
  const char* fn = "flexprefill_mask";
  check_flexprefill_mask_args(p);
  const std::vector<Seq> seqs = check_qk(fn, p.qk);
  check_lists_rows(fn, p.out, seqs, p.block_size);
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

void check_pbs_permute_args(const PbsPermuteParams& p) {
  const char* fn = "pbs_permute";
  check_qk_args(fn, p.qk);
  check_block_size(fn, p.block_size);
  check_segment_size(fn, p.segment_size, p.block_size, false);
  ABSPARSE_CHECK_ARG(p.qk.total_tokens == 0 || (p.v && p.k_perm && p.v_perm && p.key_positions),
                     fn, "v, k_perm, v_perm, key_positions: expected pointers, got null");
}

void pbs_permute_cpu(const PbsPermuteParams& p) {
  check_pbs_permute_args(p);
  const std::vector<Seq> seqs = check_qk("pbs_permute", p.qk);
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

void check_pbs_mask_args(const PbsMaskParams& p) {
  const char* fn = "pbs_mask";
  check_qk_args(fn, p.qk);
  check_block_size(fn, p.block_size);
  check_segment_size(fn, p.segment_size, p.block_size, false);
  ABSPARSE_CHECK_ARG(p.threshold > 0.0 && p.threshold <= 1.0, fn,
                     "threshold: expected a value in (0, 1], got ", p.threshold);
  ABSPARSE_CHECK_ARG(p.qk.total_tokens == 0 || p.key_positions, fn,
                     "key_positions: expected a pointer, got null");
  check_lists_out_args(fn, p.out, p.qk.batch);
}

void pbs_mask_cpu(const PbsMaskParams& p) {
  const char* fn = "pbs_mask";
  check_pbs_mask_args(p);
  const std::vector<Seq> seqs = check_qk(fn, p.qk);
  check_lists_rows(fn, p.out, seqs, p.block_size);
  const PrefillQK& in = p.qk;
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

// Consumer of the installed absparse C++ API (no torch, no Python): a tiny paged KV cache, dense
// and sparse decode attention through absparse::decode_attention_cpu, both checked against a direct
// float64 computation here; then a bad argument must throw absparse::InvalidArgument. prefill.cpp
// does the same for sparse_prefill_cpu.
// Prints "absparse consumer OK ..." and returns 0 on success, prints the failure and returns 1.
//
// Shapes: B = 2 sequences (L = 21, 13), Hq = 4, Hk = 2 (G = 2), D = 16, page size P = 8, float32.
// Pool of 6 pages, page table [2, 3] (shuffled, one pool page unused). Sparse: block sizes {4, 8};
// lists  seq 0: head 0 blocks {1, 3} + tail [20, 21), head 1 block {0} + tail [16, 21);
//        seq 1: head 0 blocks {0, 2} + tail [12, 13), head 1 no block, tail [8, 13) only.
#include <absparse/absparse.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int32_t kB = 2, kHq = 4, kHk = 2, kD = 16, kP = 8, kPages = 6, kMaxPages = 3;
constexpr int32_t kMaxBlocks = 3;
constexpr int32_t kGroup = kHq / kHk;

static_assert(std::is_base_of<std::invalid_argument, absparse::InvalidArgument>::value,
              "absparse::InvalidArgument must derive from std::invalid_argument");

struct Problem {
  std::vector<float> q = std::vector<float>(kB * kHq * kD);                // [B, Hq, D]
  std::vector<float> k = std::vector<float>(kPages * kP * kHk * kD);       // [pages, P, Hk, D]
  std::vector<float> v = std::vector<float>(kPages * kP * kHk * kD);
  std::vector<int32_t> page_table = {4, 0, 2, 5, 1, -1};                   // [B, max_pages]
  std::vector<int32_t> seq_lens = {21, 13};                                // [B]
  std::vector<int32_t> block_sizes = {4, 8};                               // [Hk]
  std::vector<int32_t> block_indices = {1, 3, -1, 0, -1, -1,               // [B, Hk, max_blocks]
                                        0, 2, -1, -1, -1, -1};
  std::vector<int32_t> block_counts = {2, 1, 2, 0};                        // [B, Hk]
  double scale = 1.0 / std::sqrt(static_cast<double>(kD));

  int64_t kv_at(int32_t b, int64_t t, int32_t h) const {  // element offset of token t, head h
    const int64_t page = page_table[b * kMaxPages + t / kP];
    return ((page * kP + t % kP) * kHk + h) * kD;
  }
};

absparse::DecodeAttentionParams dense_params(const Problem& pr, std::vector<float>& out,
                                             std::vector<float>& lse) {
  absparse::DecodeAttentionParams p;
  p.geometry.batch = kB;
  p.geometry.num_kv_heads = kHk;
  p.geometry.head_dim = kD;
  p.geometry.page_size = kP;
  p.geometry.num_pages = kPages;
  p.geometry.max_pages = kMaxPages;
  p.geometry.seq_lens = pr.seq_lens.data();
  p.geometry.seq_lens_stride = 1;
  p.geometry.page_table = pr.page_table.data();
  p.geometry.page_table_stride_batch = kMaxPages;
  p.geometry.page_table_stride_page = 1;
  p.num_q_heads = kHq;
  p.dtype = absparse::DType::kFloat32;
  p.q = pr.q.data();
  p.q_stride_batch = kHq * kD;
  p.q_stride_head = kD;
  p.k_cache = absparse::PagedCacheView{pr.k.data(), kP * kHk * kD, kHk * kD, kD};
  p.v_cache = absparse::PagedCacheView{pr.v.data(), kP * kHk * kD, kHk * kD, kD};
  p.scale = pr.scale;
  p.out = out.data();
  p.out_stride_batch = kHq * kD;
  p.out_stride_head = kD;
  p.lse = lse.data();
  p.lse_stride_batch = kHq;
  p.lse_stride_head = 1;
  return p;
}

void make_sparse(const Problem& pr, absparse::DecodeAttentionParams& p) {
  p.block_sizes = pr.block_sizes.data();
  p.block_indices = pr.block_indices.data();
  p.block_indices_stride_batch = kHk * kMaxBlocks;
  p.block_indices_stride_head = kMaxBlocks;
  p.block_indices_stride_slot = 1;
  p.max_blocks = kMaxBlocks;
  p.block_counts = pr.block_counts.data();
  p.block_counts_stride_batch = kHk;
  p.block_counts_stride_head = 1;
}

// Tokens attended by (b, h): every token (dense) or the listed blocks plus the partial tail.
std::vector<int64_t> attended(const Problem& pr, int32_t b, int32_t h, bool sparse) {
  const int64_t len = pr.seq_lens[b];
  std::vector<int64_t> tokens;
  int64_t tail = 0;
  if (sparse) {
    const int64_t bs = pr.block_sizes[h];
    for (int32_t i = 0; i < pr.block_counts[b * kHk + h]; ++i) {
      const int64_t j = pr.block_indices[(b * kHk + h) * kMaxBlocks + i];
      for (int64_t t = j * bs; t < (j + 1) * bs; ++t) tokens.push_back(t);
    }
    tail = len / bs * bs;
  }
  for (int64_t t = tail; t < len; ++t) tokens.push_back(t);
  return tokens;
}

// Max |out - ref| / (1e-6 + 1e-6 |ref|) over out and lse, with ref the float64 softmax attention.
double worst_error(const Problem& pr, const std::vector<float>& out, const std::vector<float>& lse,
                   bool sparse) {
  double worst = 0.0;
  for (int32_t b = 0; b < kB; ++b) {
    for (int32_t qh = 0; qh < kHq; ++qh) {
      const int32_t h = qh / kGroup;
      const std::vector<int64_t> tokens = attended(pr, b, h, sparse);
      std::vector<double> logits;
      double peak = -INFINITY;
      for (int64_t t : tokens) {
        double dot = 0.0;
        for (int32_t d = 0; d < kD; ++d) {
          dot += static_cast<double>(pr.q[(b * kHq + qh) * kD + d]) * pr.k[pr.kv_at(b, t, h) + d];
        }
        logits.push_back(pr.scale * dot);
        peak = std::max(peak, logits.back());
      }
      double total = 0.0;
      std::vector<double> acc(kD, 0.0);
      for (size_t n = 0; n < tokens.size(); ++n) {
        const double w = std::exp(logits[n] - peak);
        total += w;
        for (int32_t d = 0; d < kD; ++d) acc[d] += w * pr.v[pr.kv_at(b, tokens[n], h) + d];
      }
      for (int32_t d = 0; d < kD; ++d) {
        const double ref = acc[d] / total;
        const double err = std::fabs(out[(b * kHq + qh) * kD + d] - ref);
        worst = std::max(worst, err / (1e-6 + 1e-6 * std::fabs(ref)));
      }
      const double ref_lse = peak + std::log(total);
      worst = std::max(worst, std::fabs(lse[b * kHq + qh] - ref_lse) /
                                  (1e-6 + 1e-6 * std::fabs(ref_lse)));
    }
  }
  return worst;
}

}  // namespace

double prefill_consumer_check();  // prefill.cpp

int main() {
  Problem pr;
  std::mt19937 rng(2024);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (auto* x : {&pr.q, &pr.k, &pr.v}) {
    for (float& e : *x) e = uniform(rng);
  }
  std::vector<float> out(pr.q.size()), lse(kB * kHq);

  absparse::DecodeAttentionParams p = dense_params(pr, out, lse);
  absparse::decode_attention_cpu(p);
  const double dense = worst_error(pr, out, lse, /*sparse=*/false);

  make_sparse(pr, p);
  absparse::decode_attention_cpu(p);
  const double sparse = worst_error(pr, out, lse, /*sparse=*/true);

  if (!(dense <= 1.0 && sparse <= 1.0)) {
    std::printf("absparse consumer FAILED: error/tolerance dense %.3g, sparse %.3g\n", dense,
                sparse);
    return 1;
  }

  // A list that is not strictly ascending must be rejected before anything is written.
  Problem bad = pr;
  bad.block_indices[0] = 3;
  bad.block_indices[1] = 1;
  make_sparse(bad, p);
  std::string message;
  try {
    absparse::decode_attention_cpu(p);
  } catch (const absparse::InvalidArgument& e) {
    message = e.what();
  }
  if (message.find("block_indices") == std::string::npos) {
    std::printf("absparse consumer FAILED: a descending block list did not throw an "
                "InvalidArgument naming block_indices (message: '%s')\n", message.c_str());
    return 1;
  }
  const double prefill = prefill_consumer_check();
  if (!(prefill >= 0.0 && prefill <= 1.0)) {
    std::printf("absparse consumer FAILED: sparse_prefill error/tolerance %.3g (-1: bad "
                "key_positions not rejected)\n", prefill);
    return 1;
  }
  std::printf("absparse consumer OK: dense and sparse decode and prefill match the direct "
              "computation (error/tolerance %.3f, %.3f, %.3f), InvalidArgument thrown\n", dense,
              sparse, prefill);
  return 0;
}

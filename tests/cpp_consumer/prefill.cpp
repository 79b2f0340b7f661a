// The consumer's prefill part: absparse::sparse_prefill_cpu with every causal block listed must be
// dense causal attention (checked against a direct float64 computation here), and a key_positions
// column that is not a permutation must throw absparse::InvalidArgument naming key_positions.
//
// Shapes: B = 2 sequences (L = 5, 11) packed into T = 16 rows, Hq = 2, Hk = 1 (G = 2), D = 8,
// q_block = 4, k_block = 4 (Nq = M = 3), one list per KV head, float32.
#include <absparse/absparse.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int32_t kB = 2, kT = 16, kHq = 2, kHk = 1, kD = 8, kBlock = 4, kNq = 3;
const std::vector<int32_t> kCuSeqlens = {0, 5, 16};  // [B + 1]

}  // namespace

// Returns the worst |out - direct| / tolerance (<= 1 passes), or -1 when the bad key_positions
// were not rejected.
double prefill_consumer_check() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> q(kT * kHq * kD), k(kT * kHk * kD), v(kT * kHk * kD), out(q.size());
  for (auto* x : {&q, &k, &v}) {
    for (float& e : *x) e = uniform(rng);
  }
  // Every causal block: query block i lists key blocks 0..i (blocks of 4 on both sides).
  std::vector<int32_t> indices(kB * kHk * kNq * kNq, -1), counts(kB * kHk * kNq, 0);
  for (int32_t b = 0; b < kB; ++b) {
    for (int32_t i = 0; i < kNq; ++i) {
      counts[b * kNq + i] = i + 1;
      for (int32_t j = 0; j <= i; ++j) indices[(b * kNq + i) * kNq + j] = j;
    }
  }
  std::vector<int32_t> positions(kT);  // [T, Hk]: the identity
  for (int32_t b = 0; b < kB; ++b) {
    for (int32_t r = kCuSeqlens[b]; r < kCuSeqlens[b + 1]; ++r) positions[r] = r - kCuSeqlens[b];
  }

  absparse::SparsePrefillParams p;
  p.batch = kB;
  p.total_tokens = kT;
  p.num_q_heads = kHq;
  p.num_kv_heads = kHk;
  p.head_dim = kD;
  p.q_block = p.k_block = kBlock;
  p.dtype = absparse::DType::kFloat32;
  p.cu_seqlens = kCuSeqlens.data();
  p.cu_seqlens_stride = 1;
  p.q = q.data();
  p.q_stride_token = kHq * kD;
  p.q_stride_head = kD;
  p.k = k.data();
  p.v = v.data();
  p.k_stride_token = p.v_stride_token = kHk * kD;
  p.k_stride_head = p.v_stride_head = kD;
  p.num_list_heads = kHk;
  p.num_q_blocks = p.max_blocks = kNq;
  p.block_indices = indices.data();
  p.block_indices_stride_batch = kHk * kNq * kNq;
  p.block_indices_stride_head = kNq * kNq;
  p.block_indices_stride_row = kNq;
  p.block_indices_stride_slot = 1;
  p.block_counts = counts.data();
  p.block_counts_stride_batch = kHk * kNq;
  p.block_counts_stride_head = kNq;
  p.block_counts_stride_row = 1;
  p.key_positions = positions.data();
  p.key_positions_stride_token = kHk;
  p.key_positions_stride_head = 1;
  p.scale = 1.0 / std::sqrt(static_cast<double>(kD));
  p.out = out.data();
  p.out_stride_token = kHq * kD;
  p.out_stride_head = kD;
  absparse::sparse_prefill_cpu(p);

  // Direct causal attention in float64; tolerance: float32 rounding of |out| <= 1 plus noise.
  double worst = 0.0;
  for (int32_t b = 0; b < kB; ++b) {
    const int32_t begin = kCuSeqlens[b], len = kCuSeqlens[b + 1] - begin;
    for (int32_t t = 0; t < len; ++t) {
      for (int32_t h = 0; h < kHq; ++h) {
        std::vector<double> logits(t + 1);
        double peak = -INFINITY, total = 0.0;
        for (int32_t r = 0; r <= t; ++r) {
          double dot = 0.0;
          for (int32_t d = 0; d < kD; ++d) {
            dot += static_cast<double>(q[((begin + t) * kHq + h) * kD + d]) *
                   k[(begin + r) * kD + d];
          }
          logits[r] = p.scale * dot;
          peak = std::max(peak, logits[r]);
        }
        for (double& l : logits) total += (l = std::exp(l - peak));
        for (int32_t d = 0; d < kD; ++d) {
          double direct = 0.0;
          for (int32_t r = 0; r <= t; ++r) direct += logits[r] / total * v[(begin + r) * kD + d];
          const double got = out[((begin + t) * kHq + h) * kD + d];
          worst = std::max(worst, std::fabs(got - direct) / 1e-6);
        }
      }
    }
  }

  positions[9] = 0;  // sequence 1 (rows 5..15) now holds position 0 twice
  try {
    absparse::sparse_prefill_cpu(p);
  } catch (const absparse::InvalidArgument& e) {
    if (std::string(e.what()).find("key_positions") != std::string::npos) return worst;
  }
  return -1.0;
}

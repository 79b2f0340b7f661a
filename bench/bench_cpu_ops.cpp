// absparse_bench_cpu: google-benchmark microbenchmarks of the CPU reference ops (absparse/decode.h,
// absparse/quantize.h), called through the C++ API exactly as an engine would.
//
// Shapes: Llama-like layer, Hq = 32 query heads, Hk = 8 KV heads (G = 4), D = 128, page P = 64,
// bfloat16 q / KV cache, every sequence of the batch at length L, L in {4096, 16384}, B in {1, 4}.
// Layouts:
//   mixed_minmax_int4c:  block sizes {8, 16, 32, 64, 8, 16, 32, 64}, Quest min/max, int4 per
//                        channel
//                        (channel scale/zero calibrated from the keys)
//   uniform16_mean_int8: block size 16 on every head, mean, int8 with one scale per vector
// Selection: token budget 1024, sink 16, local 64, group reduce max, scale 1/sqrt(D).
//
// Byte model (counter bytes_per_second = bytes per iteration / time): the bytes an op must touch.
//   update_centroids (prefill, start 0): keys read B*L*Hk*D*2 + summaries written
//                                        sum_{b,h} (L/bs_h) * R * (W*code bytes + 4 if per-vector
//                                        scale)
//   select_blocks: summaries of the candidate blocks read (plan_selection's num_candidates per
//                  (b, h), R vectors each) + per-channel parameters 2*Hk*D*4 + q B*Hq*D*2
//   sparse_decode: attended tokens (listed blocks + partial tail) * D * 2 (K and V) * 2 + q + out
//   dense_decode:  B*L*Hk*D*2*2 + q + out
//   quantize_rows: x rows*D*4 read + codes rows*W written + scales rows*4 (int8) or channel
//                  parameters rows*D*4*2 read (int4c)
// FLOP model (counter FLOP/s): attention 4*D per (query head, attended token) (q.k and p*v
// multiply-adds); selection 2*R*D per (query head, candidate block).
//
// Data: uniform random values in (-2, 2) from a fixed-seed splitmix64 (never zero), page tables
// shuffled like a paged allocator. Inputs are built once per (L, B) and reused by every op of that
// shape (benchmarks are registered shape-major, so only one shape is held in memory at a time).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absparse/absparse.h"
#include "bench_rng.h"

namespace {

using namespace absparse;

constexpr int32_t kNumQHeads = 32;
constexpr int32_t kNumKvHeads = 8;
constexpr int32_t kHeadDim = 128;
constexpr int32_t kPageSize = 64;
constexpr DType kDtype = DType::kBFloat16;
constexpr int64_t kElemBytes = 2;
constexpr int64_t kBudgetTokens = 1024;
constexpr int64_t kSinkTokens = 16;
constexpr int64_t kLocalTokens = 64;

struct LayoutSpec {
  const char* name;
  std::vector<int32_t> block_sizes;  // [Hk]
  SummaryKind kind;
  SummaryFormat format;
};

const std::vector<LayoutSpec>& layout_specs() {
  static const std::vector<LayoutSpec> specs = {
      {"mixed_minmax_int4c", {8, 16, 32, 64, 8, 16, 32, 64}, SummaryKind::kMinMax,
       SummaryFormat::kInt4c},
      {"uniform16_mean_int8", std::vector<int32_t>(kNumKvHeads, 16), SummaryKind::kMean,
       SummaryFormat::kInt8},
  };
  return specs;
}

using absparse_bench::Rng;

void fill_bf16(std::vector<uint16_t>& x, Rng& rng) {
  for (auto& e : x) e = float_to_bf16(rng.uniform());
}

// Summary cache of one layout over a workload's page pool, plus the block lists of one selection.
struct SummaryState {
  explicit SummaryState(const LayoutSpec& spec)
      : layout(spec.block_sizes, kPageSize, spec.kind, spec.format) {}
  LayerLayout layout;
  std::vector<uint8_t> data;          // [num_pages, slots, R, W] summary_dtype(format)
  std::vector<float> scales;          // [num_pages, slots, R] (int8/int4)
  std::vector<float> channel_scale;   // [Hk, D] (int8c/int4c)
  std::vector<float> channel_zero;    // [Hk, D]
  bool filled = false;                // summaries of every complete block written
  int32_t max_blocks = 0;
  std::vector<int32_t> block_indices;  // [B, Hk, max_blocks]
  std::vector<int32_t> block_counts;   // [B, Hk]
};

// One (L, B) shape: q, K and V caches, page table.
struct Workload {
  int64_t len = 0;
  int32_t batch = 0;
  int32_t max_pages = 0;
  int64_t num_pages = 0;
  std::vector<uint16_t> q;           // [B, Hq, D] bf16
  std::vector<uint16_t> k, v;        // [num_pages, P, Hk, D] bf16
  std::vector<int32_t> page_table;   // [B, max_pages], a shuffled pool
  std::vector<int32_t> seq_lens;     // [B], all L
  std::vector<int32_t> start_pos;    // [B], all 0 (prefill)
  std::vector<uint16_t> out;         // [B, Hq, D] bf16
  std::map<int, std::unique_ptr<SummaryState>> summaries;  // by layout index

  BatchGeometry geometry() const {
    BatchGeometry g;
    g.batch = batch;
    g.num_kv_heads = kNumKvHeads;
    g.head_dim = kHeadDim;
    g.page_size = kPageSize;
    g.num_pages = num_pages;
    g.max_pages = max_pages;
    g.seq_lens = seq_lens.data();
    g.seq_lens_stride = 1;
    g.page_table = page_table.data();
    g.page_table_stride_batch = max_pages;
    g.page_table_stride_page = 1;
    return g;
  }
  PagedCacheView cache_view(const std::vector<uint16_t>& c) const {
    return PagedCacheView{c.data(), int64_t{kPageSize} * kNumKvHeads * kHeadDim,
                          int64_t{kNumKvHeads} * kHeadDim, kHeadDim};
  }
};

std::unique_ptr<Workload> make_workload(int64_t len, int32_t batch) {
  auto w = std::make_unique<Workload>();
  w->len = len;
  w->batch = batch;
  w->max_pages = static_cast<int32_t>((len + kPageSize - 1) / kPageSize);
  w->num_pages = int64_t{w->max_pages} * batch;
  Rng rng(0xAB5 + static_cast<uint64_t>(len) * 31 + static_cast<uint64_t>(batch));
  const size_t cache_elems = static_cast<size_t>(w->num_pages) * kPageSize * kNumKvHeads * kHeadDim;
  w->k.resize(cache_elems);
  w->v.resize(cache_elems);
  w->q.resize(static_cast<size_t>(batch) * kNumQHeads * kHeadDim);
  fill_bf16(w->k, rng);
  fill_bf16(w->v, rng);
  fill_bf16(w->q, rng);
  w->page_table.resize(static_cast<size_t>(w->num_pages));
  for (int64_t i = 0; i < w->num_pages; ++i) w->page_table[i] = static_cast<int32_t>(i);
  for (int64_t i = w->num_pages - 1; i > 0; --i) {  // Fisher-Yates
    std::swap(w->page_table[i], w->page_table[rng.next() % static_cast<uint64_t>(i + 1)]);
  }
  w->seq_lens.assign(batch, static_cast<int32_t>(len));
  w->start_pos.assign(batch, 0);
  w->out.resize(w->q.size());
  return w;
}

// The workload of (L, B), rebuilt only when the shape changes.
Workload& workload(int64_t len, int32_t batch) {
  static std::unique_ptr<Workload> current;
  if (!current || current->len != len || current->batch != batch) {
    current.reset();
    current = make_workload(len, batch);
  }
  return *current;
}

SummaryCacheView summary_view(SummaryState& s) {
  const LayerLayout& l = s.layout;
  const int64_t width = summary_width(l.format(), kHeadDim);
  const int64_t r = l.summary_vectors();
  SummaryCacheView view;
  view.data = s.data.data();
  view.stride_vector = width;
  view.stride_slot = r * width;
  view.stride_page = l.slots_per_page() * r * width;
  if (!s.scales.empty()) {
    view.scales = s.scales.data();
    view.scales_stride_vector = 1;
    view.scales_stride_slot = r;
    view.scales_stride_page = l.slots_per_page() * r;
  }
  if (!s.channel_scale.empty()) {
    view.channel_scale = s.channel_scale.data();
    view.channel_zero = s.channel_zero.data();
    view.channel_stride_head = kHeadDim;
  }
  return view;
}

UpdateCentroidsParams update_params(Workload& w, SummaryState& s) {
  UpdateCentroidsParams p;
  p.layout = &s.layout;
  p.geometry = w.geometry();
  p.dtype = kDtype;
  p.k_cache = w.cache_view(w.k);
  p.start_pos = w.start_pos.data();
  p.start_pos_stride = 1;
  p.summaries = summary_view(s);
  return p;
}

SelectBlocksParams select_params(Workload& w, SummaryState& s) {
  SelectBlocksParams p;
  p.layout = &s.layout;
  p.geometry = w.geometry();
  p.num_q_heads = kNumQHeads;
  p.dtype = kDtype;
  p.q = w.q.data();
  p.q_stride_batch = int64_t{kNumQHeads} * kHeadDim;
  p.q_stride_head = kHeadDim;
  p.summaries = summary_view(s);
  p.budget_tokens = kBudgetTokens;
  p.sink_tokens = kSinkTokens;
  p.local_tokens = kLocalTokens;
  p.group_reduce = GroupReduce::kMax;
  p.scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  p.max_blocks = s.max_blocks;
  p.block_indices = s.block_indices.data();
  p.block_indices_stride_batch = int64_t{kNumKvHeads} * s.max_blocks;
  p.block_indices_stride_head = s.max_blocks;
  p.block_indices_stride_slot = 1;
  p.block_counts = s.block_counts.data();
  p.block_counts_stride_batch = kNumKvHeads;
  p.block_counts_stride_head = 1;
  return p;
}

// Channel parameters of int8c/int4c from the keys: zero = min, scale = (max - min) / qmax.
void calibrate_channels(const Workload& w, SummaryState& s) {
  const int qmax = format_qmax(s.layout.format());
  std::vector<float> lo(kNumKvHeads * kHeadDim, INFINITY), hi(kNumKvHeads * kHeadDim, -INFINITY);
  const size_t tokens = static_cast<size_t>(w.num_pages) * kPageSize;
  for (size_t t = 0; t < tokens; ++t) {
    for (size_t c = 0; c < lo.size(); ++c) {
      const float x = bf16_to_float(w.k[t * lo.size() + c]);
      lo[c] = std::min(lo[c], x);
      hi[c] = std::max(hi[c], x);
    }
  }
  s.channel_scale.resize(lo.size());
  s.channel_zero = lo;
  for (size_t c = 0; c < lo.size(); ++c) {
    s.channel_scale[c] = std::max((hi[c] - lo[c]) / static_cast<float>(qmax), 1e-6f);
  }
}

// Summary state of layout `index` for workload w (allocated, not yet filled).
SummaryState& summary_state(Workload& w, int index) {
  auto& slot = w.summaries[index];
  if (!slot) {
    slot = std::make_unique<SummaryState>(layout_specs()[index]);
    SummaryState& s = *slot;
    const SummaryFormat f = s.layout.format();
    const size_t vectors =
        static_cast<size_t>(w.num_pages) * s.layout.slots_per_page() * s.layout.summary_vectors();
    s.data.assign(vectors * summary_width(f, kHeadDim) * dtype_size(summary_dtype(f)), 0);
    if (format_has_vector_scales(f)) s.scales.assign(vectors, 0.0f);
    if (format_is_per_channel(f)) calibrate_channels(w, s);
    s.max_blocks = static_cast<int32_t>(
        required_max_blocks(s.layout, w.seq_lens.data(), w.batch, 1, kBudgetTokens, 0.0,
                            kSinkTokens, kLocalTokens));
    s.block_indices.assign(static_cast<size_t>(w.batch) * kNumKvHeads * s.max_blocks, -1);
    s.block_counts.assign(static_cast<size_t>(w.batch) * kNumKvHeads, 0);
  }
  return *slot;
}

// Summaries of every complete block, then the block lists of one select_blocks call.
SummaryState& selected_state(Workload& w, int index) {
  SummaryState& s = summary_state(w, index);
  if (!s.filled) {
    update_centroids_cpu(update_params(w, s));
    select_blocks_cpu(select_params(w, s));
    s.filled = true;
  }
  return s;
}

int64_t summary_vector_bytes(const LayerLayout& l) {
  const SummaryFormat f = l.format();
  return int64_t{summary_width(f, kHeadDim)} * dtype_size(summary_dtype(f)) +
         (format_has_vector_scales(f) ? 4 : 0);
}

void set_rates(benchmark::State& state, int64_t bytes, double flops) {
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * bytes);
  state.counters["bytes"] = static_cast<double>(bytes);
  if (flops > 0) {
    state.counters["FLOP/s"] =
        benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  }
}

// Runs op once per iteration; an InvalidArgument becomes a benchmark error instead of an abort.
template <typename Op>
bool run_loop(benchmark::State& state, Op&& op) {
  try {
    for (auto _ : state) {
      op();
      benchmark::ClobberMemory();
    }
  } catch (const InvalidArgument& e) {
    state.SkipWithError(e.what());
    return false;
  }
  return true;
}

void bm_update_centroids(benchmark::State& state, int layout_index) {
  Workload& w = workload(state.range(0), static_cast<int32_t>(state.range(1)));
  SummaryState& s = summary_state(w, layout_index);
  const UpdateCentroidsParams p = update_params(w, s);
  if (!run_loop(state, [&] { update_centroids_cpu(p); })) return;
  int64_t written = 0;
  for (int32_t h = 0; h < kNumKvHeads; ++h) {
    written += w.batch * (w.len / s.layout.block_size(h)) * s.layout.summary_vectors() *
               summary_vector_bytes(s.layout);
  }
  set_rates(state, w.batch * w.len * kNumKvHeads * kHeadDim * kElemBytes + written, 0.0);
}

void bm_select_blocks(benchmark::State& state, int layout_index) {
  Workload& w = workload(state.range(0), static_cast<int32_t>(state.range(1)));
  SummaryState& s = selected_state(w, layout_index);
  const SelectBlocksParams p = select_params(w, s);
  if (!run_loop(state, [&] { select_blocks_cpu(p); })) return;
  const int64_t r = s.layout.summary_vectors();
  int64_t candidates = 0;
  for (int32_t h = 0; h < kNumKvHeads; ++h) {
    candidates += w.batch * plan_selection(w.len, s.layout.block_size(h), kBudgetTokens, 0.0,
                                           kSinkTokens, kLocalTokens).num_candidates;
  }
  const int64_t channel_bytes = s.channel_scale.empty() ? 0 : 2 * kNumKvHeads * kHeadDim * 4;
  const int64_t bytes = candidates * r * summary_vector_bytes(s.layout) + channel_bytes +
                        int64_t{w.batch} * kNumQHeads * kHeadDim * kElemBytes;
  set_rates(state, bytes, 2.0 * r * kHeadDim * (kNumQHeads / kNumKvHeads) * candidates);
  state.counters["candidates"] = static_cast<double>(candidates) / (w.batch * kNumKvHeads);
}

DecodeAttentionParams attention_params(Workload& w) {
  DecodeAttentionParams p;
  p.geometry = w.geometry();
  p.num_q_heads = kNumQHeads;
  p.dtype = kDtype;
  p.q = w.q.data();
  p.q_stride_batch = int64_t{kNumQHeads} * kHeadDim;
  p.q_stride_head = kHeadDim;
  p.k_cache = w.cache_view(w.k);
  p.v_cache = w.cache_view(w.v);
  p.scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  p.out = w.out.data();
  p.out_stride_batch = int64_t{kNumQHeads} * kHeadDim;
  p.out_stride_head = kHeadDim;
  return p;
}

// Attended tokens summed over (b, h) -> bytes and FLOPs of attention over them.
void set_attention_rates(benchmark::State& state, const Workload& w, int64_t tokens) {
  const int64_t qo_bytes = 2 * int64_t{w.batch} * kNumQHeads * kHeadDim * kElemBytes;
  set_rates(state, tokens * kHeadDim * 2 * kElemBytes + qo_bytes,
            4.0 * kHeadDim * (kNumQHeads / kNumKvHeads) * tokens);
  state.counters["tokens"] = static_cast<double>(tokens) / (w.batch * kNumKvHeads);
}

void bm_sparse_decode(benchmark::State& state, int layout_index) {
  Workload& w = workload(state.range(0), static_cast<int32_t>(state.range(1)));
  SummaryState& s = selected_state(w, layout_index);
  DecodeAttentionParams p = attention_params(w);
  p.block_sizes = s.layout.block_sizes().data();
  p.block_indices = s.block_indices.data();
  p.block_indices_stride_batch = int64_t{kNumKvHeads} * s.max_blocks;
  p.block_indices_stride_head = s.max_blocks;
  p.block_indices_stride_slot = 1;
  p.max_blocks = s.max_blocks;
  p.block_counts = s.block_counts.data();
  p.block_counts_stride_batch = kNumKvHeads;
  p.block_counts_stride_head = 1;
  if (!run_loop(state, [&] { decode_attention_cpu(p); })) return;
  int64_t tokens = 0;
  for (int32_t b = 0; b < w.batch; ++b) {
    for (int32_t h = 0; h < kNumKvHeads; ++h) {
      const int64_t bs = s.layout.block_size(h);
      tokens += s.block_counts[b * kNumKvHeads + h] * bs + (w.len - (w.len / bs) * bs);
    }
  }
  set_attention_rates(state, w, tokens);
}

void bm_dense_decode(benchmark::State& state) {
  Workload& w = workload(state.range(0), static_cast<int32_t>(state.range(1)));
  const DecodeAttentionParams p = attention_params(w);
  if (!run_loop(state, [&] { decode_attention_cpu(p); })) return;
  set_attention_rates(state, w, int64_t{w.batch} * kNumKvHeads * w.len);
}

void bm_quantize_rows(benchmark::State& state, SummaryFormat format) {
  const int64_t rows = state.range(0);
  const int32_t dim = static_cast<int32_t>(state.range(1));
  const int64_t width = summary_width(format, dim);
  Rng rng(0x9A7 + static_cast<uint64_t>(rows));
  std::vector<float> x(static_cast<size_t>(rows) * dim);
  for (auto& e : x) e = rng.uniform();
  std::vector<uint8_t> codes(static_cast<size_t>(rows) * width);
  std::vector<float> scales, channel_scale, channel_zero;
  QuantizeParams p;
  p.format = format;
  p.rows = rows;
  p.dim = dim;
  p.x = x.data();
  p.x_stride_row = dim;
  p.codes = codes.data();
  p.codes_stride_row = width;
  int64_t bytes = rows * dim * 4 + rows * width;
  if (format_has_vector_scales(format)) {
    scales.resize(rows);
    p.scales = scales.data();
    p.scales_stride = 1;
    bytes += rows * 4;
  }
  if (format_is_per_channel(format)) {
    // x in (-2, 2): zero -2 and scale 4 / qmax cover it (plus a little random spread).
    channel_scale.resize(x.size());
    channel_zero.resize(x.size());
    for (auto& e : channel_scale) e = (4.0f + 0.1f * rng.uniform()) / format_qmax(format);
    for (auto& e : channel_zero) e = -2.0f + 0.05f * rng.uniform();
    p.channel_scale = channel_scale.data();
    p.channel_scale_stride_row = dim;
    p.channel_zero = channel_zero.data();
    p.channel_zero_stride_row = dim;
    bytes += rows * dim * 4 * 2;
  }
  if (!run_loop(state, [&] { quantize_rows(p); })) return;
  set_rates(state, bytes, 0.0);
}

void register_benchmarks() {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{4096, 1}, {4096, 4}, {16384, 1}};
  for (const auto& [len, batch] : shapes) {
    for (int i = 0; i < static_cast<int>(layout_specs().size()); ++i) {
      const std::string layout = layout_specs()[i].name;
      const std::pair<const char*, void (*)(benchmark::State&, int)> ops[] = {
          {"update_centroids/", bm_update_centroids},
          {"select_blocks/", bm_select_blocks},
          {"sparse_decode/", bm_sparse_decode}};
      for (const auto& [name, fn] : ops) {
        benchmark::RegisterBenchmark((name + layout).c_str(), fn, i)
            ->Args({len, batch})
            ->ArgNames({"L", "B"})
            ->Unit(benchmark::kMicrosecond);
      }
    }
    benchmark::RegisterBenchmark("dense_decode", bm_dense_decode)
        ->Args({len, batch})
        ->ArgNames({"L", "B"})
        ->Unit(benchmark::kMicrosecond);
  }
  for (SummaryFormat format : {SummaryFormat::kInt4c, SummaryFormat::kInt8}) {
    benchmark::RegisterBenchmark(
        (std::string("quantize_rows/") + summary_format_name(format)).c_str(), bm_quantize_rows,
        format)
        ->Args({4096, kHeadDim})
        ->Args({32768, kHeadDim})
        ->ArgNames({"rows", "D"})
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_benchmarks();
  benchmark::AddCustomContext("absparse_shape",
                              "Hq=32 Hk=8 D=128 P=64 bfloat16, budget 1024 sink 16 local 64");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

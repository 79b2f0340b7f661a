// absparse_bench_gpu: google-benchmark microbenchmarks of the CUDA decode kernels
// (absparse/decode_cuda.h) through the C++ API, as an engine calls them.
//
// Shapes: Llama-3.1-8B attention, Hq = 32, Hk = 8 (G = 4), D = 128, page P = 64, bfloat16 q and
// KV cache, every sequence at length L; (L, B) in {32K, 128K} x {1, 8, 32} (B32/128K left out:
// 34 GB of KV). Layouts: mixed_minmax_int4c (block sizes {8,8,16,16,16,32,32,64}, min/max, int4
// per channel) and uniform16_minmax_int4c. Selection: budget 2048 tokens, sink 16, local 64, max.
//
// Timing: manual time from CUDA events around one call on a stream; before each call a 256 MiB
// memset evicts the L2 (60 MB on an H200), outside the events. The median over repetitions is
// what to read (--benchmark_repetitions, aggregates only).
//
// Byte model (counter `bytes`; bytes_per_second = bytes / manual time), what each op must move:
//   update_prefill: keys read B L Hk D 2 + summaries written sum_h B (L / bs_h) R W
//   update_append:  the keys of the blocks one appended token completes (start = L - 1)
//   select:         summaries of the candidate blocks (R W bytes each)
//   sparse_attend:  listed blocks + partial tail per (sequence, KV head) x D x 2 B x (K, V)
//   dense:          B L Hk D 2 B x 2
// Data: q and K/V pages from a fixed-seed splitmix64 (uniform in (-2, 2), never zero), a shuffled
// page table, summaries from one prefill update, block lists from one selection.
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absparse/absparse.h"
#include "absparse/decode_cuda.h"
#include "bench_rng.h"

namespace {

using namespace absparse;

constexpr int32_t kNumQHeads = 32;
constexpr int32_t kNumKvHeads = 8;
constexpr int32_t kHeadDim = 128;
constexpr int32_t kPageSize = 64;
constexpr int64_t kBudget = 2048;
constexpr int64_t kSink = 16;
constexpr int64_t kLocal = 64;
constexpr size_t kFlushBytes = size_t{256} << 20;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "absparse_bench_gpu: %s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n = 0) { resize(n); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void resize(size_t n) {
    cudaFree(ptr);
    ptr = nullptr;
    count = n;
    if (n) check(cudaMalloc(reinterpret_cast<void**>(&ptr), n * sizeof(T)), "cudaMalloc");
  }
  void upload(const std::vector<T>& host) {
    check(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "copy");
  }
};

using absparse_bench::Rng;

// Fills n bf16 values: a random 64 MiB pattern replicated on the device (fast to build; the L2
// cannot hold it, so the repetition does not change what the kernels read from memory).
void fill_random(uint16_t* dst, size_t n, uint64_t seed) {
  const size_t pattern = std::min(n, size_t{32} << 20);
  std::vector<uint16_t> host(pattern);
  Rng rng(seed);
  for (auto& e : host) e = float_to_bf16(rng.uniform());
  check(cudaMemcpy(dst, host.data(), pattern * 2, cudaMemcpyHostToDevice), "fill");
  for (size_t at = pattern; at < n; at += pattern) {
    check(cudaMemcpy(dst + at, dst, std::min(pattern, n - at) * 2, cudaMemcpyDeviceToDevice),
          "fill");
  }
}

struct LayoutSpec {
  const char* name;
  std::vector<int32_t> block_sizes;
};
const std::vector<LayoutSpec>& layouts() {
  static const std::vector<LayoutSpec> specs = {
      {"mixed_minmax_int4c", {8, 8, 16, 16, 16, 32, 32, 64}},
      {"uniform16_minmax_int4c", std::vector<int32_t>(kNumKvHeads, 16)},
  };
  return specs;
}

// One (L, B) shape with one layout: caches, page table, summaries, block lists, all on the GPU.
struct Workload {
  int64_t len;
  int32_t batch, layout_index;
  int32_t max_pages;
  int64_t num_pages;
  LayerLayout layout;
  DeviceBuffer<uint16_t> q, k, v, out;
  DeviceBuffer<int32_t> page_table, seq_lens, start_zero, start_append;
  DeviceBuffer<uint8_t> summaries;
  DeviceBuffer<float> channel_scale, channel_zero;
  DeviceBuffer<int32_t> block_indices, block_counts;
  DeviceBuffer<uint8_t> workspace;
  int32_t max_blocks = 0;
  int64_t attended_tokens = 0;  // listed blocks + tails, summed over (b, h)
  cudaStream_t stream = nullptr;

  Workload(int64_t l, int32_t b, int32_t li)
      : len(l), batch(b), layout_index(li),
        layout(layouts()[li].block_sizes, kPageSize, SummaryKind::kMinMax, SummaryFormat::kInt4c) {
    max_pages = static_cast<int32_t>((len + kPageSize - 1) / kPageSize);
    num_pages = int64_t{max_pages} * batch;
    const size_t cache = static_cast<size_t>(num_pages) * kPageSize * kNumKvHeads * kHeadDim;
    q.resize(static_cast<size_t>(batch) * kNumQHeads * kHeadDim);
    out.resize(q.count);
    k.resize(cache);
    v.resize(cache);
    fill_random(q.ptr, q.count, 1);
    fill_random(k.ptr, k.count, 2);
    fill_random(v.ptr, v.count, 3);
    std::vector<int32_t> pt(static_cast<size_t>(num_pages));
    for (int64_t i = 0; i < num_pages; ++i) pt[i] = static_cast<int32_t>(i);
    Rng rng(7);
    for (int64_t i = num_pages - 1; i > 0; --i) std::swap(pt[i], pt[rng.next() % (i + 1)]);
    page_table.resize(pt.size());
    page_table.upload(pt);
    seq_lens.resize(batch);
    seq_lens.upload(std::vector<int32_t>(batch, static_cast<int32_t>(len)));
    start_zero.resize(batch);
    start_zero.upload(std::vector<int32_t>(batch, 0));
    start_append.resize(batch);
    start_append.upload(std::vector<int32_t>(batch, static_cast<int32_t>(len - 1)));
    // Keys are uniform in (-2, 2): per-channel range [-2, 2] in 15 steps.
    channel_scale.resize(kNumKvHeads * kHeadDim);
    channel_zero.resize(kNumKvHeads * kHeadDim);
    channel_scale.upload(std::vector<float>(channel_scale.count, 4.0f / 15.0f));
    channel_zero.upload(std::vector<float>(channel_zero.count, -2.0f));
    const int64_t width = summary_width(layout.format(), kHeadDim);
    summaries.resize(static_cast<size_t>(num_pages) * layout.slots_per_page() * 2 * width);
    max_blocks = static_cast<int32_t>(
        max_blocks_bound(layout, max_pages, kBudget, 0.0, kSink, kLocal));
    block_indices.resize(static_cast<size_t>(batch) * kNumKvHeads * max_blocks);
    block_counts.resize(static_cast<size_t>(batch) * kNumKvHeads);
    check(cudaStreamCreate(&stream), "stream");
    workspace.resize(select_blocks_workspace_size(select_params()));
    update_centroids_cuda(update_params(false));
    select_blocks_cuda(select_params(), workspace.ptr);
    check(cudaStreamSynchronize(stream), "setup");
    std::vector<int32_t> counts(block_counts.count);
    check(cudaMemcpy(counts.data(), block_counts.ptr, counts.size() * 4, cudaMemcpyDeviceToHost),
          "counts");
    for (int32_t bb = 0; bb < batch; ++bb) {
      for (int32_t h = 0; h < kNumKvHeads; ++h) {
        const int64_t bs = layout.block_size(h);
        attended_tokens += counts[bb * kNumKvHeads + h] * bs + len % bs;
      }
    }
  }
  ~Workload() { cudaStreamDestroy(stream); }

  BatchGeometry geometry() const {
    BatchGeometry g;
    g.batch = batch;
    g.num_kv_heads = kNumKvHeads;
    g.head_dim = kHeadDim;
    g.page_size = kPageSize;
    g.num_pages = num_pages;
    g.max_pages = max_pages;
    g.seq_lens = seq_lens.ptr;
    g.seq_lens_stride = 1;
    g.page_table = page_table.ptr;
    g.page_table_stride_batch = max_pages;
    g.page_table_stride_page = 1;
    return g;
  }
  PagedCacheView view(const DeviceBuffer<uint16_t>& c) const {
    return PagedCacheView{c.ptr, int64_t{kPageSize} * kNumKvHeads * kHeadDim,
                          int64_t{kNumKvHeads} * kHeadDim, kHeadDim};
  }
  SummaryCacheView summary_view() const {
    const int64_t width = summary_width(layout.format(), kHeadDim);
    SummaryCacheView s;
    s.data = summaries.ptr;
    s.stride_vector = width;
    s.stride_slot = 2 * width;
    s.stride_page = layout.slots_per_page() * 2 * width;
    s.channel_scale = channel_scale.ptr;
    s.channel_zero = channel_zero.ptr;
    s.channel_stride_head = kHeadDim;
    return s;
  }
  UpdateCentroidsParams update_params(bool append) const {
    UpdateCentroidsParams p;
    p.layout = &layout;
    p.geometry = geometry();
    p.dtype = DType::kBFloat16;
    p.k_cache = view(k);
    p.start_pos = append ? start_append.ptr : start_zero.ptr;
    p.start_pos_stride = 1;
    p.summaries = summary_view();
    p.max_new_tokens = append ? 1 : 0;
    p.stream = stream;
    return p;
  }
  SelectBlocksParams select_params() const {
    SelectBlocksParams p;
    p.layout = &layout;
    p.geometry = geometry();
    p.num_q_heads = kNumQHeads;
    p.dtype = DType::kBFloat16;
    p.q = q.ptr;
    p.q_stride_batch = int64_t{kNumQHeads} * kHeadDim;
    p.q_stride_head = kHeadDim;
    p.summaries = summary_view();
    p.budget_tokens = kBudget;
    p.sink_tokens = kSink;
    p.local_tokens = kLocal;
    p.scale = 1.0 / 11.313708498984761;
    p.max_blocks = max_blocks;
    p.block_indices = block_indices.ptr;
    p.block_indices_stride_batch = int64_t{kNumKvHeads} * max_blocks;
    p.block_indices_stride_head = max_blocks;
    p.block_indices_stride_slot = 1;
    p.block_counts = block_counts.ptr;
    p.block_counts_stride_batch = kNumKvHeads;
    p.block_counts_stride_head = 1;
    p.stream = stream;
    return p;
  }
  DecodeAttentionParams attention_params(bool sparse) const {
    DecodeAttentionParams p;
    p.geometry = geometry();
    p.num_q_heads = kNumQHeads;
    p.dtype = DType::kBFloat16;
    p.q = q.ptr;
    p.q_stride_batch = int64_t{kNumQHeads} * kHeadDim;
    p.q_stride_head = kHeadDim;
    p.k_cache = view(k);
    p.v_cache = view(v);
    if (sparse) {
      p.block_sizes = layout.block_sizes().data();
      p.block_indices = block_indices.ptr;
      p.block_indices_stride_batch = int64_t{kNumKvHeads} * max_blocks;
      p.block_indices_stride_head = max_blocks;
      p.block_indices_stride_slot = 1;
      p.max_blocks = max_blocks;
      p.block_counts = block_counts.ptr;
      p.block_counts_stride_batch = kNumKvHeads;
      p.block_counts_stride_head = 1;
    }
    p.scale = 1.0 / 11.313708498984761;
    p.out = out.ptr;
    p.out_stride_batch = int64_t{kNumQHeads} * kHeadDim;
    p.out_stride_head = kHeadDim;
    p.stream = stream;
    return p;
  }
  int64_t candidate_blocks() const {
    int64_t total = 0;
    for (int32_t h = 0; h < kNumKvHeads; ++h) {
      const SelectionPlan plan =
          plan_selection(len, layout.block_size(h), kBudget, 0.0, kSink, kLocal);
      total += plan.num_candidates;
    }
    return total * batch;
  }
};

// The workload of (L, B, layout), rebuilt only when it changes (one shape in memory at a time).
Workload& workload(int64_t len, int32_t batch, int32_t layout_index) {
  static std::unique_ptr<Workload> current;
  if (!current || current->len != len || current->batch != batch ||
      current->layout_index != layout_index) {
    current.reset();
    current = std::make_unique<Workload>(len, batch, layout_index);
  }
  return *current;
}

// Times `op` with CUDA events, the L2 flushed before each call.
template <typename Op>
void run_timed(benchmark::State& state, Workload& w, Op op, int64_t bytes) {
  static DeviceBuffer<uint8_t> flush(kFlushBytes);
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "event");
  check(cudaEventCreate(&stop), "event");
  op();  // warm-up: first-use configuration of the kernels
  for (auto _ : state) {
    check(cudaMemsetAsync(flush.ptr, static_cast<int>(state.iterations() & 0xFF), kFlushBytes,
                          w.stream),
          "flush");
    check(cudaEventRecord(start, w.stream), "record");
    op();
    check(cudaEventRecord(stop, w.stream), "record");
    check(cudaEventSynchronize(stop), "sync");
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, start, stop), "elapsed");
    state.SetIterationTime(ms * 1e-3);
  }
  check(cudaGetLastError(), "kernel");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  state.SetBytesProcessed(state.iterations() * bytes);
  state.counters["bytes"] = static_cast<double>(bytes);
}

int64_t summary_bytes(const Workload& w, int64_t blocks) {
  return blocks * 2 * summary_width(w.layout.format(), kHeadDim);  // R = 2 vectors of W bytes
}

void BM_update_prefill(benchmark::State& state) {
  Workload& w = workload(state.range(0), static_cast<int32_t>(state.range(1)),
                         static_cast<int32_t>(state.range(2)));
  int64_t blocks = 0;
  for (int32_t h = 0; h < kNumKvHeads; ++h) blocks += w.len / w.layout.block_size(h);
  const int64_t bytes = int64_t{w.batch} * w.len * kNumKvHeads * kHeadDim * 2 +
                        summary_bytes(w, blocks * w.batch);
  const UpdateCentroidsParams p = w.update_params(false);
  run_timed(state, w, [&] { update_centroids_cuda(p); }, bytes);
}

void BM_update_append(benchmark::State& state) {
  Workload& w = workload(state.range(0), static_cast<int32_t>(state.range(1)),
                         static_cast<int32_t>(state.range(2)));
  int64_t rows = 0;  // the block that token L-1 completes, per head (L is a multiple of 64)
  for (int32_t h = 0; h < kNumKvHeads; ++h) rows += w.layout.block_size(h);
  const int64_t bytes = int64_t{w.batch} * rows * kHeadDim * 2;
  const UpdateCentroidsParams p = w.update_params(true);
  run_timed(state, w, [&] { update_centroids_cuda(p); }, bytes);
}

void BM_select(benchmark::State& state) {
  Workload& w = workload(state.range(0), static_cast<int32_t>(state.range(1)),
                         static_cast<int32_t>(state.range(2)));
  const SelectBlocksParams p = w.select_params();
  run_timed(state, w, [&] { select_blocks_cuda(p, w.workspace.ptr); },
            summary_bytes(w, w.candidate_blocks()));
  state.counters["candidates"] = static_cast<double>(w.candidate_blocks());
}

void BM_sparse_attend(benchmark::State& state) {
  Workload& w = workload(state.range(0), static_cast<int32_t>(state.range(1)),
                         static_cast<int32_t>(state.range(2)));
  const DecodeAttentionParams p = w.attention_params(true);
  run_timed(state, w, [&] { decode_attention_cuda(p); }, w.attended_tokens * kHeadDim * 2 * 2);
  state.counters["tokens"] = static_cast<double>(w.attended_tokens) / (w.batch * kNumKvHeads);
}

void BM_dense(benchmark::State& state) {
  Workload& w = workload(state.range(0), static_cast<int32_t>(state.range(1)), 0);
  const DecodeAttentionParams p = w.attention_params(false);
  run_timed(state, w, [&] { decode_attention_cuda(p); },
            int64_t{w.batch} * w.len * kNumKvHeads * kHeadDim * 2 * 2);
}

// Shape-major registration: every op of one (L, B, layout) runs before the next is built.
void register_all() {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {32768, 1}, {131072, 1}, {32768, 8}, {131072, 8}, {32768, 32}};
  for (const auto& [len, batch] : shapes) {
    for (int64_t li = 0; li < static_cast<int64_t>(layouts().size()); ++li) {
      const std::string tag = std::string(layouts()[li].name);
      auto add = [&](const char* op, void (*fn)(benchmark::State&)) {
        benchmark::RegisterBenchmark((std::string(op) + "/" + tag).c_str(), fn)
            ->Args({len, batch, li})
            ->ArgNames({"L", "B", "layout"})
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      };
      if (li == 0) add("dense", BM_dense);
      add("update_prefill", BM_update_prefill);
      add("update_append", BM_update_append);
      add("select", BM_select);
      add("sparse_attend", BM_sparse_attend);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "absparse_bench_gpu: no CUDA device\n");
    return 2;
  }
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, 0), "properties");
  benchmark::AddCustomContext("device", prop.name);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

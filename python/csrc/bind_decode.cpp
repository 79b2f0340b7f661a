// absparse._C.update_centroids / select_blocks / decode_attention: validate tensors, fill the
// params structs of absparse/decode.h, run. The Python wrappers (absparse/ops.py) own defaults,
// output allocation (the CUDA workspace included) and docstrings.
//
// CPU tensors run the reference, which validates values too (seq_lens, page table, block lists).
// CUDA tensors (builds with ABSPARSE_WITH_CUDA) run the kernels of absparse/decode_cuda.h on the
// given stream: the binding checks shapes, dtypes, devices and layouts, then check_*_cuda runs
// every other host-side check (the CPU path's, same messages, and the supported GPU
// configurations) before anything touches the device (the device guard, the launch), so every
// rejected input raises ValueError. Values in device memory are not read (that would
// synchronize); the kernels clamp or skip bad ones instead (see decode_cuda.h).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>

#include "absparse/decode.h"
#include "absparse/error.h"
#include "tensor_view.h"
#ifdef ABSPARSE_WITH_CUDA
#include "absparse/decode_cuda.h"
#endif

namespace absparse::py_binding {

namespace {

// True for a CUDA tensor in a build with the kernels; a CUDA tensor in a CPU-only build raises.
bool on_cuda(const TensorView& t, const char* fn, const char* name) {
#ifdef ABSPARSE_WITH_CUDA
  (void)fn;
  (void)name;
  return t.is_cuda;
#else
  expect_supported_device(t, fn, name);
  return false;
#endif
}

#ifdef ABSPARSE_WITH_CUDA
// The workspace of a CUDA op: a uint8 tensor of at least `need` bytes on the device of `ref`
// (None when nothing is needed).
void* workspace_arg(py::handle obj, size_t need, const TensorView& ref, const char* fn,
                    const char* ref_name) {
  if (need == 0) return nullptr;
  ABSPARSE_CHECK_ARG(!obj.is_none(), fn, "workspace: expected a uint8 tensor of at least ", need,
                     " bytes on ", ref.device_string(), ", got None");
  TensorView w = tensor_arg(obj, fn, "workspace");
  expect_same_device(w, ref, fn, "workspace", ref_name);
  expect_dtype(w, DType::kUInt8, fn, "workspace");
  ABSPARSE_CHECK_ARG(w.ndim == 1 && (w.size(0) <= 1 || w.stride(0) == 1), fn,
                     "workspace: expected a contiguous 1-D tensor, got shape ", w.shape_string());
  ABSPARSE_CHECK_ARG(w.numel() >= static_cast<int64_t>(need), fn, "workspace: expected at least ",
                     need, " bytes, got ", w.numel());
  ABSPARSE_CHECK_ARG(reinterpret_cast<uintptr_t>(w.data) % 16 == 0, fn,
                     "workspace: expected a 16-byte aligned data pointer");
  return w.data;
}
#endif

// page_table [B, max_pages] and seq_lens [B], int32, on the device of `ref`.
BatchGeometry batch_geometry(const char* fn, py::handle page_table_obj, py::handle seq_lens_obj,
                             int64_t batch, int64_t num_kv_heads, int64_t head_dim,
                             int64_t page_size, int64_t num_pages, const TensorView& ref,
                             const char* ref_name) {
  TensorView page_table = tensor_arg(page_table_obj, fn, "page_table");
  TensorView seq_lens = tensor_arg(seq_lens_obj, fn, "seq_lens");
  expect_ndim(page_table, 2, fn, "page_table", "[B, max_pages]");
  expect_ndim(seq_lens, 1, fn, "seq_lens", "[B]");
  expect_size(page_table, 0, batch, fn, "page_table", "B");
  expect_size(seq_lens, 0, batch, fn, "seq_lens", "B");
  expect_same_device(page_table, ref, fn, "page_table", ref_name);
  expect_same_device(seq_lens, ref, fn, "seq_lens", ref_name);
  expect_dtype(page_table, DType::kInt32, fn, "page_table");
  expect_dtype(seq_lens, DType::kInt32, fn, "seq_lens");
  ABSPARSE_CHECK_ARG(page_table.size(1) <= INT32_MAX, fn, "page_table.shape[1]: expected <= 2^31-1",
                     ", got ", page_table.size(1));
  BatchGeometry g;
  g.batch = static_cast<int32_t>(batch);
  g.num_kv_heads = static_cast<int32_t>(num_kv_heads);
  g.head_dim = static_cast<int32_t>(head_dim);
  g.page_size = static_cast<int32_t>(page_size);
  g.num_pages = num_pages;
  g.max_pages = static_cast<int32_t>(page_table.size(1));
  g.seq_lens = static_cast<const int32_t*>(seq_lens.data);
  g.seq_lens_stride = seq_lens.stride(0);
  g.page_table = static_cast<const int32_t*>(page_table.data);
  g.page_table_stride_batch = page_table.stride(0);
  g.page_table_stride_page = page_table.stride(1);
  return g;
}

// k_cache / v_cache: [num_pages, P, Hk, D], float dtype, contiguous channels.
TensorView paged_cache_arg(const char* fn, py::handle obj, const char* name) {
  TensorView t = tensor_arg(obj, fn, name);
  expect_ndim(t, 4, fn, name, "[num_pages, page_size, Hk, D]");
  return t;
}

PagedCacheView paged_view(const TensorView& t) {
  return PagedCacheView{t.data, t.stride(0), t.stride(1), t.stride(2)};
}

// summaries [num_pages, slots_per_page, R, W] + scales [num_pages, slots_per_page, R] (int8/int4)
// + the layout's channel parameters [Hk, D] (int8c/int4c).
SummaryCacheView summary_cache(const char* fn, const LayerLayout& layout, py::handle summaries_obj,
                               py::handle scales_obj, py::handle channel_scale_obj,
                               py::handle channel_zero_obj, int64_t head_dim,
                               const TensorView& ref, const char* ref_name, int64_t* num_pages) {
  const SummaryFormat format = layout.format();
  TensorView s = tensor_arg(summaries_obj, fn, "summaries");
  expect_ndim(s, 4, fn, "summaries", "[num_pages, slots_per_page, R, W]");
  expect_size(s, 1, layout.slots_per_page(), fn, "summaries", "layout.slots_per_page");
  expect_size(s, 2, layout.summary_vectors(), fn, "summaries", "R, vectors per summary");
  expect_size(s, 3, summary_width(format, static_cast<int>(head_dim)), fn, "summaries",
              "W, stored elements per vector for the layout's format");
  expect_same_device(s, ref, fn, "summaries", ref_name);
  expect_dtype(s, summary_dtype(format), fn, "summaries");
  expect_last_dim_contiguous(s, fn, "summaries");
  *num_pages = s.size(0);
  SummaryCacheView view;
  view.data = s.data;
  view.stride_page = s.stride(0);
  view.stride_slot = s.stride(1);
  view.stride_vector = s.stride(2);
  if (format_has_vector_scales(format)) {
    ABSPARSE_CHECK_ARG(!scales_obj.is_none(), fn, "scales: format '", summary_format_name(format),
                       "' stores one float32 scale per vector, expected a tensor ",
                       "[num_pages, slots_per_page, R], got None");
    TensorView sc = tensor_arg(scales_obj, fn, "scales");
    expect_ndim(sc, 3, fn, "scales", "[num_pages, slots_per_page, R]");
    expect_size(sc, 0, s.size(0), fn, "scales", "num_pages of summaries");
    expect_size(sc, 1, layout.slots_per_page(), fn, "scales", "layout.slots_per_page");
    expect_size(sc, 2, layout.summary_vectors(), fn, "scales", "R");
    expect_same_device(sc, ref, fn, "scales", ref_name);
    expect_dtype(sc, DType::kFloat32, fn, "scales");
    view.scales = static_cast<float*>(sc.data);
    view.scales_stride_page = sc.stride(0);
    view.scales_stride_slot = sc.stride(1);
    view.scales_stride_vector = sc.stride(2);
  }
  if (format_is_per_channel(format)) {
    ABSPARSE_CHECK_ARG(!channel_scale_obj.is_none() && !channel_zero_obj.is_none(), fn,
                       "layout: format '", summary_format_name(format),
                       "' needs channel_scale and channel_zero [Hk, D], got None");
    TensorView cs = tensor_arg(channel_scale_obj, fn, "layout.channel_scale");
    TensorView cz = tensor_arg(channel_zero_obj, fn, "layout.channel_zero");
    for (TensorView* t : {&cs, &cz}) {
      const char* name = t == &cs ? "layout.channel_scale" : "layout.channel_zero";
      expect_ndim(*t, 2, fn, name, "[Hk, D]");
      expect_size(*t, 0, layout.num_kv_heads(), fn, name, "Hk");
      expect_size(*t, 1, head_dim, fn, name, "D");
      expect_same_device(*t, ref, fn, name, ref_name);
      expect_dtype(*t, DType::kFloat32, fn, name);
      expect_last_dim_contiguous(*t, fn, name);
    }
    ABSPARSE_CHECK_ARG(cs.stride(0) == cz.stride(0), fn,
                       "layout.channel_zero: expected the row stride of layout.channel_scale (",
                       cs.stride(0), "), got ", cz.stride(0));
    view.channel_scale = static_cast<const float*>(cs.data);
    view.channel_zero = static_cast<const float*>(cz.data);
    view.channel_stride_head = cs.stride(0);
  }
  return view;
}

void update_centroids(py::handle k_cache_obj, py::handle page_table, py::handle seq_lens,
                      py::handle start_pos_obj, const LayerLayout& layout, py::handle summaries,
                      py::handle scales, py::handle channel_scale, py::handle channel_zero,
                      int64_t max_new_tokens, [[maybe_unused]] uintptr_t stream) {
  const char* fn = "update_centroids";
  TensorView k = paged_cache_arg(fn, k_cache_obj, "k_cache");
  expect_size(k, 1, layout.page_size(), fn, "k_cache", "layout.page_size");
  expect_size(k, 2, layout.num_kv_heads(), fn, "k_cache", "Hk = len(layout.block_sizes)");
  layout.check_head_dim(fn, k.size(3));
  TensorView start_pos = tensor_arg(start_pos_obj, fn, "start_pos");
  expect_ndim(start_pos, 1, fn, "start_pos", "[B]");
  const int64_t batch = start_pos.size(0);
  const bool cuda = on_cuda(k, fn, "k_cache");
  expect_same_device(start_pos, k, fn, "start_pos", "k_cache");
  expect_float_dtype(k, fn, "k_cache");
  expect_dtype(start_pos, DType::kInt32, fn, "start_pos");
  expect_last_dim_contiguous(k, fn, "k_cache");
  int64_t summary_pages = 0;
  UpdateCentroidsParams p;
  p.layout = &layout;
  p.summaries = summary_cache(fn, layout, summaries, scales, channel_scale, channel_zero, k.size(3),
                              k, "k_cache", &summary_pages);
  ABSPARSE_CHECK_ARG(summary_pages == k.size(0), fn, "summaries.shape[0]: expected num_pages of ",
                     "k_cache (", k.size(0), "), got ", summary_pages);
  p.geometry = batch_geometry(fn, page_table, seq_lens, batch, k.size(2), k.size(3), k.size(1),
                              k.size(0), k, "k_cache");
  p.dtype = k.dtype;
  p.k_cache = paged_view(k);
  p.start_pos = static_cast<const int32_t*>(start_pos.data);
  p.start_pos_stride = start_pos.stride(0);
  ABSPARSE_CHECK_ARG(max_new_tokens >= 0, fn, "max_new_tokens: expected >= 0 (0: unknown), got ",
                     max_new_tokens);
  p.max_new_tokens = max_new_tokens;
  if (cuda) {
#ifdef ABSPARSE_WITH_CUDA
    check_update_centroids_cuda(p);
    CudaDeviceGuard guard(k.device_index);
    p.stream = reinterpret_cast<void*>(stream);
    update_centroids_cuda(p);
#endif
    return;
  }
  update_centroids_cpu(p);
}

void select_blocks(py::handle q_obj, py::handle summaries, py::handle scales,
                   py::handle page_table, py::handle seq_lens, const LayerLayout& layout,
                   py::handle channel_scale, py::handle channel_zero, int64_t budget_tokens,
                   double budget_fraction, int64_t sink_tokens, int64_t local_tokens,
                   const std::string& group_reduce, double scale, py::handle indices_obj,
                   py::handle counts_obj, [[maybe_unused]] py::handle workspace_obj,
                   [[maybe_unused]] uintptr_t stream) {
  const char* fn = "select_blocks";
  TensorView q = tensor_arg(q_obj, fn, "q");
  expect_ndim(q, 3, fn, "q", "[B, Hq, D]");
  layout.check_head_dim(fn, q.size(2));
  const int64_t batch = q.size(0), hk = layout.num_kv_heads();
  const bool cuda = on_cuda(q, fn, "q");
  expect_float_dtype(q, fn, "q");
  expect_last_dim_contiguous(q, fn, "q");
  ABSPARSE_CHECK_ARG(group_reduce == "max" || group_reduce == "softmax_sum", fn,
                     "group_reduce: expected 'max' or 'softmax_sum', got '", group_reduce, "'");
  TensorView indices = tensor_arg(indices_obj, fn, "block_indices");
  TensorView counts = tensor_arg(counts_obj, fn, "block_counts");
  expect_ndim(indices, 3, fn, "block_indices", "[B, Hk, max_blocks]");
  expect_ndim(counts, 2, fn, "block_counts", "[B, Hk]");
  expect_size(indices, 0, batch, fn, "block_indices", "B");
  expect_size(indices, 1, hk, fn, "block_indices", "Hk");
  expect_size(counts, 0, batch, fn, "block_counts", "B");
  expect_size(counts, 1, hk, fn, "block_counts", "Hk");
  expect_same_device(indices, q, fn, "block_indices", "q");
  expect_same_device(counts, q, fn, "block_counts", "q");
  expect_dtype(indices, DType::kInt32, fn, "block_indices");
  expect_dtype(counts, DType::kInt32, fn, "block_counts");
  ABSPARSE_CHECK_ARG(indices.size(2) <= INT32_MAX, fn, "max_blocks: expected <= 2^31-1, got ",
                     indices.size(2));
  // The head dim of the query must be the summaries' (named as q's error, not the summaries').
  TensorView s_view = tensor_arg(summaries, fn, "summaries");
  if (s_view.ndim == 4) {
    const int64_t width = summary_width(layout.format(), static_cast<int>(q.size(2)));
    ABSPARSE_CHECK_ARG(s_view.size(3) == width, fn, "q.shape[2]: expected the head dim of the ",
                       "summaries (summaries.shape[3] = ", s_view.size(3), " stored elements per ",
                       "vector in format '", summary_format_name(layout.format()), "'), got ",
                       q.size(2));
  }
  SelectBlocksParams p;
  int64_t num_pages = 0;
  p.layout = &layout;
  p.summaries = summary_cache(fn, layout, summaries, scales, channel_scale, channel_zero,
                              q.size(2), q, "q", &num_pages);
  p.geometry = batch_geometry(fn, page_table, seq_lens, batch, hk, q.size(2), layout.page_size(),
                              num_pages, q, "q");
  p.num_q_heads = static_cast<int32_t>(q.size(1));
  p.dtype = q.dtype;
  p.q = q.data;
  p.q_stride_batch = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.budget_tokens = budget_tokens;
  p.budget_fraction = budget_fraction;
  p.sink_tokens = sink_tokens;
  p.local_tokens = local_tokens;
  p.group_reduce = group_reduce == "max" ? GroupReduce::kMax : GroupReduce::kSoftmaxSum;
  p.scale = scale;
  p.max_blocks = static_cast<int32_t>(indices.size(2));
  p.block_indices = static_cast<int32_t*>(indices.data);
  p.block_indices_stride_batch = indices.stride(0);
  p.block_indices_stride_head = indices.stride(1);
  p.block_indices_stride_slot = indices.stride(2);
  p.block_counts = static_cast<int32_t*>(counts.data);
  p.block_counts_stride_batch = counts.stride(0);
  p.block_counts_stride_head = counts.stride(1);
  if (cuda) {
#ifdef ABSPARSE_WITH_CUDA
    check_select_blocks_cuda(p);
    void* workspace = workspace_arg(workspace_obj, select_blocks_workspace_size(p), q, fn, "q");
    CudaDeviceGuard guard(q.device_index);
    p.stream = reinterpret_cast<void*>(stream);
    select_blocks_cuda(p, workspace);
#endif
    return;
  }
  select_blocks_cpu(p);
}

// Dense when block_sizes is None; sparse otherwise (then block_indices and block_counts too).
void decode_attention(py::handle q_obj, py::handle k_obj, py::handle v_obj, py::handle page_table,
                      py::handle seq_lens, py::handle block_sizes_obj, py::handle indices_obj,
                      py::handle counts_obj, double scale, py::handle out_obj, py::handle lse_obj,
                      [[maybe_unused]] uintptr_t stream) {
  const bool sparse = !block_sizes_obj.is_none();
  const char* fn = sparse ? "sparse_decode" : "dense_decode";
  TensorView q = tensor_arg(q_obj, fn, "q");
  TensorView k = paged_cache_arg(fn, k_obj, "k_cache");
  TensorView v = paged_cache_arg(fn, v_obj, "v_cache");
  TensorView out = tensor_arg(out_obj, fn, "out");
  expect_ndim(q, 3, fn, "q", "[B, Hq, D]");
  expect_ndim(out, 3, fn, "out", "[B, Hq, D]");
  const int64_t batch = q.size(0), hq = q.size(1), dim = q.size(2);
  const int64_t num_pages = k.size(0), page_size = k.size(1), hk = k.size(2);
  ABSPARSE_CHECK_ARG(dim > 0 && dim % 8 == 0, fn, "q.shape[2]: expected a head dim that is a ",
                     "positive multiple of 8, got ", dim);
  expect_size(k, 3, dim, fn, "k_cache", "D of q");
  for (int d = 0; d < 4; ++d) {
    ABSPARSE_CHECK_ARG(v.size(d) == k.size(d), fn, "v_cache: expected the shape of k_cache ",
                       k.shape_string(), ", got ", v.shape_string());
  }
  for (int d = 0; d < 3; ++d) expect_size(out, d, q.size(d), fn, "out", "shape of q");
  const bool cuda = on_cuda(q, fn, "q");
  expect_same_device(k, q, fn, "k_cache", "q");
  expect_same_device(v, q, fn, "v_cache", "q");
  expect_same_device(out, q, fn, "out", "q");
  expect_float_dtype(q, fn, "q");
  expect_dtype(k, q.dtype, fn, "k_cache");
  expect_dtype(v, q.dtype, fn, "v_cache");
  expect_dtype(out, q.dtype, fn, "out");
  expect_last_dim_contiguous(q, fn, "q");
  expect_last_dim_contiguous(k, fn, "k_cache");
  expect_last_dim_contiguous(v, fn, "v_cache");
  expect_last_dim_contiguous(out, fn, "out");

  DecodeAttentionParams p;
  p.geometry = batch_geometry(fn, page_table, seq_lens, batch, hk, dim, page_size, num_pages, q, "q");
  p.num_q_heads = static_cast<int32_t>(hq);
  p.dtype = q.dtype;
  p.q = q.data;
  p.q_stride_batch = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.k_cache = paged_view(k);
  p.v_cache = paged_view(v);
  p.scale = scale;
  p.out = out.data;
  p.out_stride_batch = out.stride(0);
  p.out_stride_head = out.stride(1);
  TensorView lse;
  if (optional_tensor_arg(lse_obj, fn, "lse", &lse)) {
    expect_ndim(lse, 2, fn, "lse", "[B, Hq]");
    expect_size(lse, 0, batch, fn, "lse", "B");
    expect_size(lse, 1, hq, fn, "lse", "Hq");
    expect_same_device(lse, q, fn, "lse", "q");
    expect_dtype(lse, DType::kFloat32, fn, "lse");
    p.lse = static_cast<float*>(lse.data);
    p.lse_stride_batch = lse.stride(0);
    p.lse_stride_head = lse.stride(1);
  }
  TensorView block_sizes;
  if (sparse) {
    block_sizes = tensor_arg(block_sizes_obj, fn, "block_sizes");
    TensorView indices = tensor_arg(indices_obj, fn, "block_indices");
    TensorView counts = tensor_arg(counts_obj, fn, "block_counts");
    expect_ndim(block_sizes, 1, fn, "block_sizes", "[Hk]");
    expect_ndim(indices, 3, fn, "block_indices", "[B, Hk, max_blocks]");
    expect_ndim(counts, 2, fn, "block_counts", "[B, Hk]");
    expect_size(block_sizes, 0, hk, fn, "block_sizes", "Hk of k_cache");
    expect_size(indices, 0, batch, fn, "block_indices", "B");
    expect_size(indices, 1, hk, fn, "block_indices", "Hk");
    expect_size(counts, 0, batch, fn, "block_counts", "B");
    expect_size(counts, 1, hk, fn, "block_counts", "Hk");
    ABSPARSE_CHECK_ARG(!block_sizes.is_cuda, fn, "block_sizes: expected a CPU tensor, got ",
                       block_sizes.device_string());
    expect_same_device(indices, q, fn, "block_indices", "q");
    expect_same_device(counts, q, fn, "block_counts", "q");
    expect_dtype(block_sizes, DType::kInt32, fn, "block_sizes");
    expect_dtype(indices, DType::kInt32, fn, "block_indices");
    expect_dtype(counts, DType::kInt32, fn, "block_counts");
    ABSPARSE_CHECK_ARG(block_sizes.stride(0) == 1 || hk == 1, fn,
                       "block_sizes: expected a contiguous tensor, got stride ",
                       block_sizes.stride(0));
    ABSPARSE_CHECK_ARG(indices.size(2) <= INT32_MAX, fn, "block_indices.shape[2]: expected <= ",
                       "2^31-1, got ", indices.size(2));
    p.block_sizes = static_cast<const int32_t*>(block_sizes.data);
    p.block_indices = static_cast<const int32_t*>(indices.data);
    p.block_indices_stride_batch = indices.stride(0);
    p.block_indices_stride_head = indices.stride(1);
    p.block_indices_stride_slot = indices.stride(2);
    p.max_blocks = static_cast<int32_t>(indices.size(2));
    p.block_counts = static_cast<const int32_t*>(counts.data);
    p.block_counts_stride_batch = counts.stride(0);
    p.block_counts_stride_head = counts.stride(1);
  }
  if (cuda) {
#ifdef ABSPARSE_WITH_CUDA
    check_decode_attention_cuda(p);
    CudaDeviceGuard guard(q.device_index);
    p.stream = reinterpret_cast<void*>(stream);
    decode_attention_cuda(p);
#endif
    return;
  }
  decode_attention_cpu(p);
}

// Workspace bytes of select_blocks / decode_attention on CUDA tensors (0 in a CPU-only build and
// for shapes the op itself will reject), from shapes alone.
size_t select_blocks_workspace_bytes(int64_t batch, int64_t num_q_heads, const LayerLayout& layout,
                                     int64_t max_pages, const std::string& group_reduce) {
#ifdef ABSPARSE_WITH_CUDA
  if (batch <= 0 || num_q_heads <= 0 || max_pages < 0 || max_pages > INT32_MAX ||
      batch > INT32_MAX || num_q_heads > INT32_MAX) {
    return 0;
  }
  SelectBlocksParams p;
  p.layout = &layout;
  p.geometry.batch = static_cast<int32_t>(batch);
  p.geometry.num_kv_heads = layout.num_kv_heads();
  p.geometry.page_size = layout.page_size();
  p.geometry.max_pages = static_cast<int32_t>(max_pages);
  p.num_q_heads = static_cast<int32_t>(num_q_heads);
  p.group_reduce = group_reduce == "softmax_sum" ? GroupReduce::kSoftmaxSum : GroupReduce::kMax;
  return select_blocks_workspace_size(p);
#else
  (void)batch, (void)num_q_heads, (void)layout, (void)max_pages, (void)group_reduce;
  return 0;
#endif
}

int64_t max_blocks_bound_of(const LayerLayout& layout, int64_t max_pages, int64_t budget_tokens,
                            double budget_fraction, int64_t sink_tokens, int64_t local_tokens) {
  ABSPARSE_CHECK_ARG(max_pages >= 0 && max_pages <= INT32_MAX, "max_blocks_bound",
                     "max_pages: expected in [0, 2^31), got ", max_pages);
  return max_blocks_bound(layout, static_cast<int32_t>(max_pages), budget_tokens, budget_fraction,
                          sink_tokens, local_tokens);
}

}  // namespace

void register_decode(py::module_& m) {
  m.def("update_centroids", &update_centroids, py::arg("k_cache"), py::arg("page_table"),
        py::arg("seq_lens"), py::arg("start_pos"), py::arg("layout"), py::arg("summaries"),
        py::arg("scales"), py::arg("channel_scale"), py::arg("channel_zero"),
        py::arg("max_new_tokens") = 0, py::arg("stream") = 0);
  m.def("select_blocks", &select_blocks, py::arg("q"), py::arg("summaries"), py::arg("scales"),
        py::arg("page_table"), py::arg("seq_lens"), py::arg("layout"), py::arg("channel_scale"),
        py::arg("channel_zero"), py::arg("budget_tokens"), py::arg("budget_fraction"),
        py::arg("sink_tokens"), py::arg("local_tokens"), py::arg("group_reduce"),
        py::arg("scale"), py::arg("block_indices"), py::arg("block_counts"),
        py::arg("workspace") = py::none(), py::arg("stream") = 0);
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("page_table"), py::arg("seq_lens"), py::arg("block_sizes"),
        py::arg("block_indices"), py::arg("block_counts"), py::arg("scale"), py::arg("out"),
        py::arg("lse"), py::arg("stream") = 0);
  m.def("max_blocks_bound", &max_blocks_bound_of, py::arg("layout"), py::arg("max_pages"),
        py::arg("budget_tokens"), py::arg("budget_fraction"), py::arg("sink_tokens"),
        py::arg("local_tokens"));
  m.def("select_blocks_workspace_size", &select_blocks_workspace_bytes, py::arg("batch"),
        py::arg("num_q_heads"), py::arg("layout"), py::arg("max_pages"), py::arg("group_reduce"));
}

}  // namespace absparse::py_binding

// absparse._C prefill mask builders and their primitives: validate tensors, fill the params structs
// of absparse/prefill_masks.h, run the CPU reference. The Python wrappers
// (absparse/prefill_masks.py) own defaults, output allocation and docstrings; outputs arrive here
// allocated, and are checked for their exact shape, dtype and contiguity. Every tensor must be on
// the device of the first input (q, probs, x, p or scores): CPU tensors run the float64 reference;
// CUDA tensors (builds with ABSPARSE_WITH_CUDA) run the *_cuda entry points of
// absparse/prefill_masks_cuda.h on the given stream, after their host-side checks, with scratch
// memory taken from torch's caching allocator (torch.empty on the device, freed on return: the
// allocator keeps it ordered on the current stream, the one the wrapper passes).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "absparse/error.h"
#include "absparse/prefill_masks.h"
#include "tensor_view.h"
#ifdef ABSPARSE_WITH_CUDA
#include "absparse/decode_cuda.h"  // CudaDeviceGuard
#include "absparse/prefill_masks_cuda.h"
#endif

namespace absparse::py_binding {

namespace {

// The device of a call: that of its first input (`ref`, named ref_name); every other tensor is
// checked against it. A CUDA tensor in a build without the kernels raises.
struct Device {
  TensorView ref;
  const char* name;
  bool cuda() const { return ref.is_cuda; }
};

Device device_of(const TensorView& ref, const char* fn, const char* name) {
#ifndef ABSPARSE_WITH_CUDA
  expect_supported_device(ref, fn, name);
#endif
  (void)fn;
  return Device{ref, name};
}

void expect_device(const TensorView& t, const Device& dev, const char* fn, const char* name) {
  expect_same_device(t, dev.ref, fn, name, dev.name);
}

#ifdef ABSPARSE_WITH_CUDA
// Device scratch of `bytes` from torch's caching allocator (kept alive by the returned object).
struct Workspace {
  py::object tensor;
  void* data = nullptr;
};

Workspace workspace(int64_t bytes, const Device& dev) {
  static py::object empty = py::module_::import("torch").attr("empty");
  static py::object uint8 = py::module_::import("torch").attr("uint8");
  Workspace w;
  w.tensor = empty(py::int_(bytes > 0 ? bytes : 1), py::arg("dtype") = uint8,
                   py::arg("device") = dev.ref.device_string());
  w.data = PyLong_AsVoidPtr(w.tensor.attr("data_ptr")().ptr());
  return w;
}

MaskCudaCall cuda_call(uintptr_t stream, const Workspace* w = nullptr, int64_t bytes = 0) {
  MaskCudaCall call;
  call.stream = reinterpret_cast<void*>(stream);
  if (w) {
    call.workspace = w->data;
    call.workspace_bytes = bytes;
  }
  return call;
}
#endif

int32_t to_int32(int64_t x, const char* fn, const char* name) {
  ABSPARSE_CHECK_ARG(x >= 0 && x <= INT32_MAX, fn, name, ": expected a value in [0, 2^31), got ",
                     x);
  return static_cast<int32_t>(x);
}

// An output the wrapper allocated: exactly `shape`, `dtype`, contiguous, on the CPU.
TensorView output_arg(py::handle obj, const char* fn, const char* name, DType dtype,
                      std::initializer_list<int64_t> shape, const Device& dev) {
  TensorView t = tensor_arg(obj, fn, name);
  ABSPARSE_CHECK_ARG(t.ndim == static_cast<int>(shape.size()), fn, name, ": expected ",
                     shape.size(), " dimensions, got shape ", t.shape_string());
  int dim = 0;
  for (int64_t size : shape) {
    ABSPARSE_CHECK_ARG(t.shape[dim] == size, fn, name, ".shape[", dim, "]: expected ", size,
                       ", got ", t.shape[dim], " (shape ", t.shape_string(), ")");
    ++dim;
  }
  expect_device(t, dev, fn, name);
  expect_dtype(t, dtype, fn, name);
  int64_t stride = 1;  // (an empty tensor has nothing to lay out)
  for (int d = t.ndim - 1; d >= 0 && t.numel() > 0; --d) {
    ABSPARSE_CHECK_ARG(t.shape[d] <= 1 || t.strides[d] == stride, fn, name,
                       ": expected a contiguous tensor, got strides of shape ", t.shape_string());
    stride *= t.shape[d];
  }
  return t;
}

// cu_seqlens: int32 [B + 1] on the call's device; its values are checked by the C++ API on the
// CPU (on the GPU they are clamped, absparse/prefill_masks_cuda.h).
TensorView cu_seqlens_arg(py::handle obj, const char* fn, const Device& dev) {
  TensorView cu = tensor_arg(obj, fn, "cu_seqlens");
  expect_ndim(cu, 1, fn, "cu_seqlens", "[B + 1]");
  ABSPARSE_CHECK_ARG(cu.size(0) >= 1, fn, "cu_seqlens.shape[0]: expected B + 1 >= 1, got 0");
  expect_device(cu, dev, fn, "cu_seqlens");
  expect_dtype(cu, DType::kInt32, fn, "cu_seqlens");
  return cu;
}

// q [T, Hq, D], k [T, Hk, D] (any float dtype, both the same), cu_seqlens [B + 1].
PrefillQK prefill_qk(const char* fn, py::handle q_obj, py::handle k_obj, py::handle cu_obj,
                     double scale, Device* dev, const char* k_name = "k") {
  TensorView q = tensor_arg(q_obj, fn, "q");
  TensorView k = tensor_arg(k_obj, fn, k_name);
  expect_ndim(q, 3, fn, "q", "[T, Hq, D]");
  expect_ndim(k, 3, fn, k_name, "[T, Hk, D]");
  expect_size(k, 0, q.size(0), fn, k_name, "T, the rows of q");
  expect_size(k, 2, q.size(2), fn, k_name, "D, the head dim of q");
  ABSPARSE_CHECK_ARG(k.size(1) > 0 && q.size(1) % k.size(1) == 0, fn, "q.shape[1]: expected a ",
                     "multiple of Hk = ", k.size(1), " (", k_name, ".shape[1]), got ", q.size(1));
  *dev = device_of(q, fn, "q");
  TensorView cu = cu_seqlens_arg(cu_obj, fn, *dev);
  expect_device(k, *dev, fn, k_name);
  expect_float_dtype(q, fn, "q");
  ABSPARSE_CHECK_ARG(k.dtype == q.dtype, fn, k_name, ": expected the dtype of q (",
                     dtype_name(q.dtype), "), got ", dtype_name(k.dtype));
  expect_last_dim_contiguous(q, fn, "q");
  expect_last_dim_contiguous(k, fn, k_name);
  PrefillQK in;
  in.batch = to_int32(cu.size(0) - 1, fn, "cu_seqlens.shape[0] - 1");
  in.total_tokens = q.size(0);
  in.cu_seqlens = static_cast<const int32_t*>(cu.data);
  in.cu_seqlens_stride = cu.stride(0);
  in.num_q_heads = to_int32(q.size(1), fn, "q.shape[1]");
  in.num_kv_heads = to_int32(k.size(1), fn, "k.shape[1]");
  in.head_dim = to_int32(q.size(2), fn, "q.shape[2]");
  in.dtype = q.dtype;
  in.q = q.data;
  in.q_stride_token = q.stride(0);
  in.q_stride_head = q.stride(1);
  in.k = k.data;
  in.k_stride_token = k.stride(0);
  in.k_stride_head = k.stride(1);
  in.scale = scale;
  return in;
}

BlockListsOut lists_out(const char* fn, py::handle indices_obj, py::handle counts_obj,
                        py::handle density_obj, int64_t batch, int64_t heads, const Device& dev) {
  TensorView idx = tensor_arg(indices_obj, fn, "block_indices");
  expect_ndim(idx, 4, fn, "block_indices", "[B, H, Nq, M]");
  const int64_t nq = idx.size(2), m = idx.size(3);
  output_arg(indices_obj, fn, "block_indices", DType::kInt32, {batch, heads, nq, m}, dev);
  TensorView cnt =
      output_arg(counts_obj, fn, "block_counts", DType::kInt32, {batch, heads, nq}, dev);
  TensorView density =
      output_arg(density_obj, fn, "density", DType::kFloat32, {batch, heads}, dev);
  BlockListsOut out;
  out.num_q_blocks = to_int32(nq, fn, "block_indices.shape[2]");
  out.max_blocks = to_int32(m, fn, "block_indices.shape[3]");
  out.block_indices = static_cast<int32_t*>(idx.data);
  out.block_counts = static_cast<int32_t*>(cnt.data);
  out.density = static_cast<float*>(density.data);
  return out;
}

void last_block_attention(py::handle q, py::handle k, py::handle cu_seqlens, int64_t block_size,
                          double scale, bool group_mean, py::handle probs_obj, uintptr_t stream) {
  const char* fn = "last_block_attention";
  LastBlockAttentionParams p;
  Device dev;
  p.qk = prefill_qk(fn, q, k, cu_seqlens, scale, &dev);
  p.block_size = to_int32(block_size, fn, "block_size");
  p.group_mean = group_mean;
  TensorView probs = tensor_arg(probs_obj, fn, "probs");
  expect_ndim(probs, 4, fn, "probs", "[B, H, block_size, max_len]");
  const int64_t heads = group_mean ? p.qk.num_kv_heads : p.qk.num_q_heads;
  output_arg(probs_obj, fn, "probs", DType::kFloat32,
             {p.qk.batch, heads, block_size, probs.size(3)}, dev);
  p.max_len = to_int32(probs.size(3), fn, "probs.shape[3]");
  p.probs = static_cast<float*>(probs.data);
#ifdef ABSPARSE_WITH_CUDA
  if (dev.cuda()) {
    check_last_block_attention_cuda(p);
    CudaDeviceGuard guard(dev.ref.device_index);
    const int64_t bytes = last_block_attention_cuda_workspace_bytes(p);
    const Workspace w = workspace(bytes, dev);
    last_block_attention_cuda(p, cuda_call(stream, &w, bytes));
    return;
  }
#endif
  (void)stream;
  last_block_attention_cpu(p);
}

void vertical_slash_sums(py::handle probs_obj, py::handle cu_obj, py::handle vertical_obj,
                         py::handle slash_obj, uintptr_t stream) {
  const char* fn = "vertical_slash_sums";
  TensorView probs = tensor_arg(probs_obj, fn, "probs");
  expect_ndim(probs, 4, fn, "probs", "[B, H, block_size, max_len]");
  const Device dev = device_of(probs, fn, "probs");
  TensorView cu = cu_seqlens_arg(cu_obj, fn, dev);
  const int64_t b = probs.size(0), h = probs.size(1), w = probs.size(3);
  expect_size(probs, 0, cu.size(0) - 1, fn, "probs", "B = cu_seqlens.shape[0] - 1");
  output_arg(probs_obj, fn, "probs", DType::kFloat32, {b, h, probs.size(2), w}, dev);
  TensorView vertical = output_arg(vertical_obj, fn, "vertical", DType::kFloat32, {b, h, w}, dev);
  TensorView slash = output_arg(slash_obj, fn, "slash", DType::kFloat32, {b, h, w}, dev);
  VerticalSlashParams p;
  p.batch = to_int32(b, fn, "probs.shape[0]");
  p.cu_seqlens = static_cast<const int32_t*>(cu.data);
  p.cu_seqlens_stride = cu.stride(0);
  p.num_heads = to_int32(h, fn, "probs.shape[1]");
  p.block_size = to_int32(probs.size(2), fn, "probs.shape[2]");
  p.max_len = to_int32(w, fn, "probs.shape[3]");
  p.probs = static_cast<const float*>(probs.data);
  p.vertical = static_cast<float*>(vertical.data);
  p.slash = static_cast<float*>(slash.data);
#ifdef ABSPARSE_WITH_CUDA
  if (dev.cuda()) {  // T is not read on the GPU (it lives in device memory)
    check_vertical_slash_cuda(p);
    CudaDeviceGuard guard(dev.ref.device_index);
    vertical_slash_cuda(p, cuda_call(stream));
    return;
  }
#endif
  (void)stream;
  // T is what cu_seqlens ends with (probs has no token dimension to compare it with).
  p.total_tokens = static_cast<const int32_t*>(cu.data)[b * cu.stride(0)];
  vertical_slash_cpu(p);
}

void block_pool(py::handle x_obj, py::handle cu_obj, int64_t block_size, py::handle pooled_obj,
                uintptr_t stream) {
  const char* fn = "block_pool";
  TensorView x = tensor_arg(x_obj, fn, "x");
  expect_ndim(x, 3, fn, "x", "[T, H, D]");
  const Device dev = device_of(x, fn, "x");
  TensorView cu = cu_seqlens_arg(cu_obj, fn, dev);
  expect_float_dtype(x, fn, "x");
  expect_last_dim_contiguous(x, fn, "x");
  TensorView pooled = tensor_arg(pooled_obj, fn, "pooled");
  expect_ndim(pooled, 4, fn, "pooled", "[B, H, Nb, D]");
  output_arg(pooled_obj, fn, "pooled", DType::kFloat32,
             {cu.size(0) - 1, x.size(1), pooled.size(2), x.size(2)}, dev);
  BlockPoolParams p;
  p.batch = to_int32(cu.size(0) - 1, fn, "cu_seqlens.shape[0] - 1");
  p.cu_seqlens = static_cast<const int32_t*>(cu.data);
  p.cu_seqlens_stride = cu.stride(0);
  p.total_tokens = x.size(0);
  p.num_heads = to_int32(x.size(1), fn, "x.shape[1]");
  p.head_dim = to_int32(x.size(2), fn, "x.shape[2]");
  p.dtype = x.dtype;
  p.x = x.data;
  p.x_stride_token = x.stride(0);
  p.x_stride_head = x.stride(1);
  p.block_size = to_int32(block_size, fn, "block_size");
  p.num_blocks = to_int32(pooled.size(2), fn, "pooled.shape[2]");
  p.pooled = static_cast<float*>(pooled.data);
#ifdef ABSPARSE_WITH_CUDA
  if (dev.cuda()) {
    check_block_pool_cuda(p);
    CudaDeviceGuard guard(dev.ref.device_index);
    block_pool_cuda(p, cuda_call(stream));
    return;
  }
#endif
  (void)stream;
  block_pool_cpu(p);
}

void pooled_block_scores(py::handle q, py::handle k, py::handle cu_seqlens, int64_t block_size,
                         int64_t segment_size, double scale, bool group_mean,
                         py::handle scores_obj, uintptr_t stream) {
  const char* fn = "pooled_block_scores";
  PooledBlockScoresParams p;
  Device dev;
  p.qk = prefill_qk(fn, q, k, cu_seqlens, scale, &dev);
  p.block_size = to_int32(block_size, fn, "block_size");
  p.segment_size = to_int32(segment_size, fn, "segment_size");
  p.group_mean = group_mean;
  TensorView scores = tensor_arg(scores_obj, fn, "scores");
  expect_ndim(scores, 4, fn, "scores", "[B, H, Nb, Nb]");
  const int64_t heads = group_mean ? p.qk.num_kv_heads : p.qk.num_q_heads;
  const int64_t nb = scores.size(2);
  output_arg(scores_obj, fn, "scores", DType::kFloat32, {p.qk.batch, heads, nb, nb}, dev);
  p.num_blocks = to_int32(nb, fn, "scores.shape[2]");
  p.scores = static_cast<float*>(scores.data);
#ifdef ABSPARSE_WITH_CUDA
  if (dev.cuda()) {
    check_pooled_block_scores_cuda(p);
    CudaDeviceGuard guard(dev.ref.device_index);
    const int64_t bytes = pooled_block_scores_cuda_workspace_bytes(p);
    const Workspace w = workspace(bytes, dev);
    pooled_block_scores_cuda(p, cuda_call(stream, &w, bytes));
    return;
  }
#endif
  (void)stream;
  pooled_block_scores_cpu(p);
}

// lengths: int32 [rows] on the call's device, or None.
const int32_t* lengths_arg(py::handle obj, const char* fn, int64_t rows, const Device& dev) {
  if (obj.is_none()) return nullptr;
  return static_cast<const int32_t*>(
      output_arg(obj, fn, "lengths", DType::kInt32, {rows}, dev).data);
}

void js_distance(py::handle p_obj, py::handle q_obj, py::handle lengths_obj, py::handle out_obj,
                 uintptr_t stream) {
  const char* fn = "js_distance";
  TensorView a = tensor_arg(p_obj, fn, "p");
  expect_ndim(a, 2, fn, "p", "[rows, n]");
  const Device dev = device_of(a, fn, "p");
  output_arg(p_obj, fn, "p", DType::kFloat32, {a.size(0), a.size(1)}, dev);
  TensorView b = output_arg(q_obj, fn, "q", DType::kFloat32, {a.size(0), a.size(1)}, dev);
  TensorView out = output_arg(out_obj, fn, "out", DType::kFloat32, {a.size(0)}, dev);
  JsDistanceParams p;
  p.rows = a.size(0);
  p.n = a.size(1);
  p.p = static_cast<const float*>(a.data);
  p.q = static_cast<const float*>(b.data);
  p.lengths = lengths_arg(lengths_obj, fn, a.size(0), dev);
  p.out = static_cast<float*>(out.data);
#ifdef ABSPARSE_WITH_CUDA
  if (dev.cuda()) {
    check_js_distance_cuda(p);
    CudaDeviceGuard guard(dev.ref.device_index);
    js_distance_cuda(p, cuda_call(stream));
    return;
  }
#endif
  (void)stream;
  js_distance_cpu(p);
}

void coverage_select(py::handle scores_obj, double gamma, py::handle lengths_obj,
                     py::handle forced_obj, py::handle indices_obj, py::handle counts_obj,
                     uintptr_t stream) {
  const char* fn = "coverage_select";
  TensorView s = tensor_arg(scores_obj, fn, "scores");
  expect_ndim(s, 2, fn, "scores", "[rows, n]");
  const Device dev = device_of(s, fn, "scores");
  output_arg(scores_obj, fn, "scores", DType::kFloat32, {s.size(0), s.size(1)}, dev);
  CoverageSelectParams p;
  p.rows = s.size(0);
  p.n = s.size(1);
  p.scores = static_cast<const float*>(s.data);
  p.gamma = gamma;
  p.lengths = lengths_arg(lengths_obj, fn, p.rows, dev);
  if (!forced_obj.is_none()) {
    p.forced = static_cast<const uint8_t*>(
        output_arg(forced_obj, fn, "forced", DType::kUInt8, {p.rows, p.n}, dev).data);
  }
  p.indices = static_cast<int32_t*>(
      output_arg(indices_obj, fn, "indices", DType::kInt32, {p.rows, p.n}, dev).data);
  p.counts = static_cast<int32_t*>(
      output_arg(counts_obj, fn, "counts", DType::kInt32, {p.rows}, dev).data);
#ifdef ABSPARSE_WITH_CUDA
  if (dev.cuda()) {
    check_coverage_select_cuda(p);
    CudaDeviceGuard guard(dev.ref.device_index);
    coverage_select_cuda(p, cuda_call(stream));
    return;
  }
#endif
  (void)stream;
  coverage_select_cpu(p);
}

void flexprefill_mask(py::handle q, py::handle k, py::handle cu_seqlens, int64_t block_size,
                      double gamma, double tau, int64_t min_budget, int64_t max_budget,
                      double scale, py::handle indices, py::handle counts, py::handle density,
                      py::handle pattern, py::handle js, py::handle nv, py::handle ns,
                      uintptr_t stream) {
  const char* fn = "flexprefill_mask";
  FlexPrefillMaskParams p;
  Device dev;
  p.qk = prefill_qk(fn, q, k, cu_seqlens, scale, &dev);
  p.block_size = to_int32(block_size, fn, "block_size");
  p.gamma = gamma;
  p.tau = tau;
  p.min_budget = min_budget;
  p.max_budget = max_budget;
  const int64_t b = p.qk.batch, h = p.qk.num_q_heads;
  p.out = lists_out(fn, indices, counts, density, b, h, dev);
  p.pattern =
      static_cast<int32_t*>(output_arg(pattern, fn, "pattern", DType::kInt32, {b, h}, dev).data);
  p.js_distance =
      static_cast<float*>(output_arg(js, fn, "js_distance", DType::kFloat32, {b, h}, dev).data);
  p.vertical_blocks = static_cast<int32_t*>(
      output_arg(nv, fn, "vertical_blocks", DType::kInt32, {b, h}, dev).data);
  p.slash_blocks = static_cast<int32_t*>(
      output_arg(ns, fn, "slash_blocks", DType::kInt32, {b, h}, dev).data);
#ifdef ABSPARSE_WITH_CUDA
  if (dev.cuda()) {
    check_flexprefill_mask_cuda(p);
    CudaDeviceGuard guard(dev.ref.device_index);
    const int64_t bytes = flexprefill_mask_cuda_workspace_bytes(p);
    const Workspace w = workspace(bytes, dev);
    flexprefill_mask_cuda(p, cuda_call(stream, &w, bytes));
    return;
  }
#endif
  (void)stream;
  flexprefill_mask_cpu(p);
}

void pbs_permute(py::handle q, py::handle k, py::handle v_obj, py::handle cu_seqlens,
                 int64_t block_size, int64_t segment_size, double scale, py::handle k_perm,
                 py::handle v_perm, py::handle key_positions, int64_t max_len, uintptr_t stream) {
  const char* fn = "pbs_permute";
  PbsPermuteParams p;
  Device dev;
  p.qk = prefill_qk(fn, q, k, cu_seqlens, scale, &dev);
  TensorView v = tensor_arg(v_obj, fn, "v");
  expect_ndim(v, 3, fn, "v", "[T, Hk, D]");
  const int64_t t = p.qk.total_tokens, hk = p.qk.num_kv_heads, d = p.qk.head_dim;
  expect_size(v, 0, t, fn, "v", "T, the rows of k");
  expect_size(v, 1, hk, fn, "v", "Hk, the heads of k");
  expect_size(v, 2, d, fn, "v", "D, the head dim of k");
  expect_device(v, dev, fn, "v");
  ABSPARSE_CHECK_ARG(v.dtype == p.qk.dtype, fn, "v: expected the dtype of k (",
                     dtype_name(p.qk.dtype), "), got ", dtype_name(v.dtype));
  expect_last_dim_contiguous(v, fn, "v");
  p.v = v.data;
  p.v_stride_token = v.stride(0);
  p.v_stride_head = v.stride(1);
  p.block_size = to_int32(block_size, fn, "block_size");
  p.segment_size = to_int32(segment_size, fn, "segment_size");
  p.k_perm = output_arg(k_perm, fn, "k_perm", p.qk.dtype, {t, hk, d}, dev).data;
  p.v_perm = output_arg(v_perm, fn, "v_perm", p.qk.dtype, {t, hk, d}, dev).data;
  p.key_positions = static_cast<int32_t*>(
      output_arg(key_positions, fn, "key_positions", DType::kInt32, {t, hk}, dev).data);
#ifdef ABSPARSE_WITH_CUDA
  if (dev.cuda()) {
    const int32_t bound = to_int32(max_len, fn, "max_len");
    check_pbs_permute_cuda(p, bound);
    CudaDeviceGuard guard(dev.ref.device_index);
    const int64_t bytes = pbs_permute_cuda_workspace_bytes(p, bound);
    const Workspace w = workspace(bytes, dev);
    MaskCudaCall call = cuda_call(stream, &w, bytes);
    call.max_len = bound;
    pbs_permute_cuda(p, call);
    return;
  }
#endif
  (void)stream;
  (void)max_len;
  pbs_permute_cpu(p);
}

void pbs_mask(py::handle q, py::handle k_perm, py::handle cu_seqlens, py::handle positions_obj,
              int64_t block_size, int64_t segment_size, double threshold, bool force_first,
              double scale, py::handle indices, py::handle counts, py::handle density,
              uintptr_t stream) {
  const char* fn = "pbs_mask";
  PbsMaskParams p;
  Device dev;
  p.qk = prefill_qk(fn, q, k_perm, cu_seqlens, scale, &dev, "k_perm");
  TensorView pos = tensor_arg(positions_obj, fn, "key_positions");
  expect_ndim(pos, 2, fn, "key_positions", "[T, Hk]");
  expect_size(pos, 0, p.qk.total_tokens, fn, "key_positions", "T, the rows of k_perm");
  expect_size(pos, 1, p.qk.num_kv_heads, fn, "key_positions", "Hk, the heads of k_perm");
  expect_device(pos, dev, fn, "key_positions");
  expect_dtype(pos, DType::kInt32, fn, "key_positions");
  p.key_positions = static_cast<const int32_t*>(pos.data);
  p.key_positions_stride_token = pos.stride(0);
  p.key_positions_stride_head = pos.stride(1);
  p.block_size = to_int32(block_size, fn, "block_size");
  p.segment_size = to_int32(segment_size, fn, "segment_size");
  p.threshold = threshold;
  p.force_first = force_first;
  p.out = lists_out(fn, indices, counts, density, p.qk.batch, p.qk.num_kv_heads, dev);
#ifdef ABSPARSE_WITH_CUDA
  if (dev.cuda()) {
    check_pbs_mask_cuda(p);
    CudaDeviceGuard guard(dev.ref.device_index);
    const int64_t bytes = pbs_mask_cuda_workspace_bytes(p);
    const Workspace w = workspace(bytes, dev);
    pbs_mask_cuda(p, cuda_call(stream, &w, bytes));
    return;
  }
#endif
  (void)stream;
  pbs_mask_cpu(p);
}

}  // namespace

void register_prefill_masks(py::module_& m) {
  using py::arg;
  m.def("last_block_attention", &last_block_attention, arg("q"), arg("k"), arg("cu_seqlens"),
        arg("block_size"), arg("scale"), arg("group_mean"), arg("probs"), arg("stream") = 0);
  m.def("vertical_slash_sums", &vertical_slash_sums, arg("probs"), arg("cu_seqlens"),
        arg("vertical"), arg("slash"), arg("stream") = 0);
  m.def("block_pool", &block_pool, arg("x"), arg("cu_seqlens"), arg("block_size"), arg("pooled"),
        arg("stream") = 0);
  m.def("pooled_block_scores", &pooled_block_scores, arg("q"), arg("k"), arg("cu_seqlens"),
        arg("block_size"), arg("segment_size"), arg("scale"), arg("group_mean"), arg("scores"),
        arg("stream") = 0);
  m.def("js_distance", &js_distance, arg("p"), arg("q"), arg("lengths"), arg("out"),
        arg("stream") = 0);
  m.def("coverage_select", &coverage_select, arg("scores"), arg("gamma"), arg("lengths"),
        arg("forced"), arg("indices"), arg("counts"), arg("stream") = 0);
  m.def("flexprefill_mask", &flexprefill_mask, arg("q"), arg("k"), arg("cu_seqlens"),
        arg("block_size"), arg("gamma"), arg("tau"), arg("min_budget"), arg("max_budget"),
        arg("scale"), arg("block_indices"), arg("block_counts"), arg("density"), arg("pattern"),
        arg("js_distance"), arg("vertical_blocks"), arg("slash_blocks"), arg("stream") = 0);
  m.def("pbs_permute", &pbs_permute, arg("q"), arg("k"), arg("v"), arg("cu_seqlens"),
        arg("block_size"), arg("segment_size"), arg("scale"), arg("k_perm"), arg("v_perm"),
        arg("key_positions"), arg("max_len") = 0, arg("stream") = 0);
  m.def("pbs_mask", &pbs_mask, arg("q"), arg("k_perm"), arg("cu_seqlens"), arg("key_positions"),
        arg("block_size"), arg("segment_size"), arg("threshold"), arg("force_first"),
        arg("scale"), arg("block_indices"), arg("block_counts"), arg("density"),
        arg("stream") = 0);
}

}  // namespace absparse::py_binding

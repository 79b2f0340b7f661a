// absparse._C.sparse_prefill: validate tensors, fill absparse::SparsePrefillParams, run. The Python
// wrapper (absparse/prefill.py) owns defaults (scale, q_block, k_block), output allocation and the
// docstring.
//
// Checks run in a fixed order (ndim, sizes, device, kernel, dtype, layout), then
// sparse_prefill_cpu validates the values (cu_seqlens, block lists and counts, key positions)
// before it writes. CUDA tensors (builds with ABSPARSE_WITH_CUDA) run sparse_prefill_cuda on the
// given stream after its host-side checks (absparse/prefill_cuda.h: device values are not
// validated there), with the kernel named by `kernel` ("auto", "fa2", "sm90": PrefillKernel).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "absparse/error.h"
#include "absparse/prefill.h"
#include "tensor_view.h"
#ifdef ABSPARSE_WITH_CUDA
#include "absparse/decode_cuda.h"  // CudaDeviceGuard
#include "absparse/prefill_cuda.h"
#endif

namespace absparse::py_binding {

namespace {

constexpr const char* kFn = "sparse_prefill";

// True for CUDA tensors in a build with the kernels (they run sparse_prefill_cuda); a CUDA tensor
// in a CPU-only build raises.
bool on_cuda(const TensorView& q) {
#ifdef ABSPARSE_WITH_CUDA
  return q.is_cuda;
#else
  expect_supported_device(q, kFn, "q");
  return false;
#endif
}

int32_t int32_size(int64_t value, const char* name, const char* what) {
  ABSPARSE_CHECK_ARG(value <= INT32_MAX, kFn, name, ": expected ", what, " <= 2^31-1, got ", value);
  return static_cast<int32_t>(value);
}

// The `kernel` argument, for CUDA tensors only (CPU tensors take "auto": the reference).
// Returns its index in {"auto", "fa2", "sm90"}: the order of absparse::PrefillKernel.
int kernel_index(const std::string& kernel, bool cuda) {
  const char* names[] = {"auto", "fa2", "sm90"};
  int index = -1;
  for (int i = 0; i < 3; ++i) {
    if (kernel == names[i]) index = i;
  }
  ABSPARSE_CHECK_ARG(index >= 0, kFn, "kernel: expected 'auto', 'fa2' or 'sm90', got '", kernel,
                     "'");
  ABSPARSE_CHECK_ARG(cuda || index == 0, kFn, "kernel: '", kernel, "' names a CUDA kernel, but q ",
                     "is on the CPU (CPU tensors run the float64 reference: kernel 'auto')");
  return index;
}

void sparse_prefill(py::handle q_obj, py::handle k_obj, py::handle v_obj, py::handle cu_obj,
                    py::handle indices_obj, py::handle counts_obj, int64_t q_block,
                    int64_t k_block, py::handle key_positions_obj, double scale,
                    py::handle out_obj, py::handle lse_obj, uintptr_t stream,
                    const std::string& kernel) {
  TensorView q = tensor_arg(q_obj, kFn, "q");
  TensorView k = tensor_arg(k_obj, kFn, "k");
  TensorView v = tensor_arg(v_obj, kFn, "v");
  TensorView cu = tensor_arg(cu_obj, kFn, "cu_seqlens");
  TensorView indices = tensor_arg(indices_obj, kFn, "block_indices");
  TensorView counts = tensor_arg(counts_obj, kFn, "block_counts");
  TensorView out = tensor_arg(out_obj, kFn, "out");
  TensorView key_positions, lse;
  const bool permuted = optional_tensor_arg(key_positions_obj, kFn, "key_positions", &key_positions);
  const bool with_lse = optional_tensor_arg(lse_obj, kFn, "lse", &lse);

  // ndim
  expect_ndim(q, 3, kFn, "q", "[T, Hq, D]");
  expect_ndim(k, 3, kFn, "k", "[T, Hk, D]");
  expect_ndim(v, 3, kFn, "v", "[T, Hk, D]");
  expect_ndim(cu, 1, kFn, "cu_seqlens", "[B + 1]");
  expect_ndim(indices, 4, kFn, "block_indices", "[B, H, Nq, M]");
  expect_ndim(counts, 3, kFn, "block_counts", "[B, H, Nq]");
  expect_ndim(out, 3, kFn, "out", "[T, Hq, D]");
  if (permuted) expect_ndim(key_positions, 2, kFn, "key_positions", "[T, Hk]");
  if (with_lse) expect_ndim(lse, 2, kFn, "lse", "[T, Hq]");

  // sizes
  const int64_t tokens = q.size(0), hq = q.size(1), dim = q.size(2), hk = k.size(1);
  expect_size(k, 0, tokens, kFn, "k", "T of q");
  expect_size(k, 2, dim, kFn, "k", "D of q");
  for (int d = 0; d < 3; ++d) {
    ABSPARSE_CHECK_ARG(v.size(d) == k.size(d), kFn, "v: expected the shape of k ",
                       k.shape_string(), ", got ", v.shape_string());
    expect_size(out, d, q.size(d), kFn, "out", "shape of q");
  }
  ABSPARSE_CHECK_ARG(cu.size(0) >= 1, kFn, "cu_seqlens: expected B + 1 >= 1 entries, got shape ",
                     cu.shape_string());
  const int64_t batch = cu.size(0) - 1;
  expect_size(indices, 0, batch, kFn, "block_indices", "B = cu_seqlens.shape[0] - 1");
  expect_size(counts, 0, batch, kFn, "block_counts", "B = cu_seqlens.shape[0] - 1");
  expect_size(counts, 1, indices.size(1), kFn, "block_counts", "H of block_indices");
  expect_size(counts, 2, indices.size(2), kFn, "block_counts", "Nq of block_indices");
  if (permuted) {
    expect_size(key_positions, 0, tokens, kFn, "key_positions", "T of q");
    expect_size(key_positions, 1, hk, kFn, "key_positions", "Hk of k");
  }
  if (with_lse) {
    expect_size(lse, 0, tokens, kFn, "lse", "T of q");
    expect_size(lse, 1, hq, kFn, "lse", "Hq of q");
  }

  // device
  const bool cuda = on_cuda(q);
  expect_same_device(k, q, kFn, "k", "q");
  expect_same_device(v, q, kFn, "v", "q");
  expect_same_device(cu, q, kFn, "cu_seqlens", "q");
  expect_same_device(indices, q, kFn, "block_indices", "q");
  expect_same_device(counts, q, kFn, "block_counts", "q");
  expect_same_device(out, q, kFn, "out", "q");
  if (permuted) expect_same_device(key_positions, q, kFn, "key_positions", "q");
  if (with_lse) expect_same_device(lse, q, kFn, "lse", "q");
  const int kernel_choice = kernel_index(kernel, cuda);

  // dtype
  expect_float_dtype(q, kFn, "q");
  expect_dtype(k, q.dtype, kFn, "k");
  expect_dtype(v, q.dtype, kFn, "v");
  expect_dtype(out, q.dtype, kFn, "out");
  expect_dtype(cu, DType::kInt32, kFn, "cu_seqlens");
  expect_dtype(indices, DType::kInt32, kFn, "block_indices");
  expect_dtype(counts, DType::kInt32, kFn, "block_counts");
  if (permuted) expect_dtype(key_positions, DType::kInt32, kFn, "key_positions");
  if (with_lse) expect_dtype(lse, DType::kFloat32, kFn, "lse");

  // layout: float rows need a contiguous channel dimension; integer tensors take any strides.
  expect_last_dim_contiguous(q, kFn, "q");
  expect_last_dim_contiguous(k, kFn, "k");
  expect_last_dim_contiguous(v, kFn, "v");
  expect_last_dim_contiguous(out, kFn, "out");

  ABSPARSE_CHECK_ARG(q_block > 0 && q_block <= INT32_MAX, kFn, "q_block: expected in [1, 2^31), ",
                     "got ", q_block);
  ABSPARSE_CHECK_ARG(k_block > 0 && k_block <= INT32_MAX, kFn, "k_block: expected in [1, 2^31), ",
                     "got ", k_block);

  SparsePrefillParams p;
  p.batch = int32_size(batch, "cu_seqlens.shape[0]", "B + 1");
  p.total_tokens = tokens;
  p.num_q_heads = int32_size(hq, "q.shape[1]", "Hq");
  p.num_kv_heads = int32_size(hk, "k.shape[1]", "Hk");
  p.head_dim = int32_size(dim, "q.shape[2]", "D");
  p.q_block = static_cast<int32_t>(q_block);
  p.k_block = static_cast<int32_t>(k_block);
  p.dtype = q.dtype;
  p.cu_seqlens = static_cast<const int32_t*>(cu.data);
  p.cu_seqlens_stride = cu.stride(0);
  p.q = q.data;
  p.q_stride_token = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.k = k.data;
  p.k_stride_token = k.stride(0);
  p.k_stride_head = k.stride(1);
  p.v = v.data;
  p.v_stride_token = v.stride(0);
  p.v_stride_head = v.stride(1);
  p.num_list_heads = int32_size(indices.size(1), "block_indices.shape[1]", "H");
  p.num_q_blocks = int32_size(indices.size(2), "block_indices.shape[2]", "Nq");
  p.max_blocks = int32_size(indices.size(3), "block_indices.shape[3]", "M");
  p.block_indices = static_cast<const int32_t*>(indices.data);
  p.block_indices_stride_batch = indices.stride(0);
  p.block_indices_stride_head = indices.stride(1);
  p.block_indices_stride_row = indices.stride(2);
  p.block_indices_stride_slot = indices.stride(3);
  p.block_counts = static_cast<const int32_t*>(counts.data);
  p.block_counts_stride_batch = counts.stride(0);
  p.block_counts_stride_head = counts.stride(1);
  p.block_counts_stride_row = counts.stride(2);
  if (permuted) {
    p.key_positions = static_cast<const int32_t*>(key_positions.data);
    p.key_positions_stride_token = key_positions.stride(0);
    p.key_positions_stride_head = key_positions.stride(1);
  }
  p.scale = scale;
  p.out = out.data;
  p.out_stride_token = out.stride(0);
  p.out_stride_head = out.stride(1);
  if (with_lse) {
    p.lse = static_cast<float*>(lse.data);
    p.lse_stride_token = lse.stride(0);
    p.lse_stride_head = lse.stride(1);
  }
  if (cuda) {
#ifdef ABSPARSE_WITH_CUDA
    static_assert(static_cast<int>(PrefillKernel::kFa2) == 1 &&
                  static_cast<int>(PrefillKernel::kSm90) == 2, "kernel_index's order");
    const PrefillKernel choice = static_cast<PrefillKernel>(kernel_choice);
    check_sparse_prefill_cuda(p, choice);
    CudaDeviceGuard guard(q.device_index);
    p.stream = reinterpret_cast<void*>(stream);
    sparse_prefill_cuda(p, choice);
#endif
    return;
  }
  (void)stream;
  (void)kernel_choice;
  sparse_prefill_cpu(p);
}

}  // namespace

void register_prefill(py::module_& m) {
  m.def("sparse_prefill", &sparse_prefill, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("cu_seqlens"), py::arg("block_indices"), py::arg("block_counts"),
        py::arg("q_block"), py::arg("k_block"), py::arg("key_positions"), py::arg("scale"),
        py::arg("out"), py::arg("lse"), py::arg("stream") = 0, py::arg("kernel") = "auto");
}

}  // namespace absparse::py_binding

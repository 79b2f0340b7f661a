// absparse._C.rms_norm / silu_mul / rope_append: validate tensors, fill the params structs of
// absparse/model_ops.h, run. The Python wrappers (absparse/model_ops.py) own output allocation
// and the docstrings.
//
// Checks run in a fixed order (ndim, sizes, device, dtype, layout), then the C++ entry points
// check the fields (and, on the CPU, the values: positions, page-table entries) before they
// write. CUDA tensors (builds with ABSPARSE_WITH_CUDA) run the *_cuda entry points on the given
// stream (absparse/model_ops_cuda.h: device values are made harmless, not validated).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <utility>

#include "absparse/error.h"
#include "absparse/model_ops.h"
#include "tensor_view.h"
#ifdef ABSPARSE_WITH_CUDA
#include "absparse/decode_cuda.h"  // CudaDeviceGuard
#include "absparse/model_ops_cuda.h"
#endif

namespace absparse::py_binding {

namespace {

// True for CUDA tensors in a build with the kernels; a CUDA tensor in a CPU-only build raises.
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

int32_t int32_size(int64_t value, const char* fn, const char* name, const char* what) {
  ABSPARSE_CHECK_ARG(value <= INT32_MAX, fn, name, ": expected ", what, " <= 2^31-1, got ", value);
  return static_cast<int32_t>(value);
}

void rms_norm(py::handle x_obj, py::handle weight_obj, double eps, py::handle residual_obj,
              py::handle out_obj, uintptr_t stream) {
  const char* fn = "rms_norm";
  TensorView x = tensor_arg(x_obj, fn, "x");
  TensorView weight = tensor_arg(weight_obj, fn, "weight");
  TensorView out = tensor_arg(out_obj, fn, "out");
  TensorView residual;
  const bool with_residual = optional_tensor_arg(residual_obj, fn, "residual", &residual);

  expect_ndim(x, 2, fn, "x", "[N, H]");
  expect_ndim(weight, 1, fn, "weight", "[H]");
  expect_ndim(out, 2, fn, "out", "[N, H]");
  if (with_residual) expect_ndim(residual, 2, fn, "residual", "[N, H]");

  expect_size(weight, 0, x.size(1), fn, "weight", "H of x");
  for (int d = 0; d < 2; ++d) {
    expect_size(out, d, x.size(d), fn, "out", "shape of x");
    if (with_residual) expect_size(residual, d, x.size(d), fn, "residual", "shape of x");
  }

  const bool cuda = on_cuda(x, fn, "x");
  expect_same_device(weight, x, fn, "weight", "x");
  expect_same_device(out, x, fn, "out", "x");
  if (with_residual) expect_same_device(residual, x, fn, "residual", "x");

  expect_float_dtype(x, fn, "x");
  expect_dtype(weight, x.dtype, fn, "weight");
  expect_dtype(out, x.dtype, fn, "out");
  if (with_residual) expect_dtype(residual, x.dtype, fn, "residual");

  expect_last_dim_contiguous(x, fn, "x");
  expect_last_dim_contiguous(weight, fn, "weight");
  expect_last_dim_contiguous(out, fn, "out");
  if (with_residual) expect_last_dim_contiguous(residual, fn, "residual");

  RmsNormParams p;
  p.rows = x.size(0);
  p.hidden = x.size(1);
  p.dtype = x.dtype;
  p.eps = static_cast<float>(eps);
  p.x = x.data;
  p.x_stride_row = x.stride(0);
  if (with_residual) {
    p.residual = residual.data;
    p.residual_stride_row = residual.stride(0);
  }
  p.weight = weight.data;
  p.out = out.data;
  p.out_stride_row = out.stride(0);
  if (cuda) {
#ifdef ABSPARSE_WITH_CUDA
    CudaDeviceGuard guard(x.device_index);
    p.stream = reinterpret_cast<void*>(stream);
    rms_norm_cuda(p);
#endif
    return;
  }
  (void)stream;
  rms_norm_cpu(p);
}

void silu_mul(py::handle gate_up_obj, py::handle out_obj, uintptr_t stream) {
  const char* fn = "silu_mul";
  TensorView gate_up = tensor_arg(gate_up_obj, fn, "gate_up");
  TensorView out = tensor_arg(out_obj, fn, "out");
  expect_ndim(gate_up, 2, fn, "gate_up", "[N, 2 I]");
  expect_ndim(out, 2, fn, "out", "[N, I]");
  ABSPARSE_CHECK_ARG(gate_up.size(1) % 2 == 0, fn, "gate_up: expected [N, 2 I] (an even number ",
                     "of columns), got ", gate_up.shape_string());
  expect_size(out, 0, gate_up.size(0), fn, "out", "N of gate_up");
  expect_size(out, 1, gate_up.size(1) / 2, fn, "out", "I = gate_up.shape[1] / 2");
  const bool cuda = on_cuda(gate_up, fn, "gate_up");
  expect_same_device(out, gate_up, fn, "out", "gate_up");
  expect_float_dtype(gate_up, fn, "gate_up");
  expect_dtype(out, gate_up.dtype, fn, "out");
  expect_last_dim_contiguous(gate_up, fn, "gate_up");
  expect_last_dim_contiguous(out, fn, "out");

  SiluMulParams p;
  p.rows = gate_up.size(0);
  p.inner = gate_up.size(1) / 2;
  p.dtype = gate_up.dtype;
  p.gate_up = gate_up.data;
  p.gate_up_stride_row = gate_up.stride(0);
  p.out = out.data;
  p.out_stride_row = out.stride(0);
  if (cuda) {
#ifdef ABSPARSE_WITH_CUDA
    CudaDeviceGuard guard(gate_up.device_index);
    p.stream = reinterpret_cast<void*>(stream);
    silu_mul_cuda(p);
#endif
    return;
  }
  (void)stream;
  silu_mul_cpu(p);
}

void rope_append(py::handle qkv_obj, py::handle cos_obj, py::handle sin_obj, py::handle k_obj,
                 py::handle v_obj, py::handle page_table_obj, py::handle positions_obj,
                 int64_t num_q_heads, py::handle q_out_obj, uintptr_t stream) {
  const char* fn = "rope_append";
  TensorView qkv = tensor_arg(qkv_obj, fn, "qkv");
  TensorView cos = tensor_arg(cos_obj, fn, "cos");
  TensorView sin = tensor_arg(sin_obj, fn, "sin");
  TensorView k = tensor_arg(k_obj, fn, "k_cache");
  TensorView v = tensor_arg(v_obj, fn, "v_cache");
  TensorView table = tensor_arg(page_table_obj, fn, "page_table");
  TensorView positions = tensor_arg(positions_obj, fn, "positions");
  TensorView q_out = tensor_arg(q_out_obj, fn, "q_out");

  expect_ndim(qkv, 2, fn, "qkv", "[B, (Hq + 2 Hk) D]");
  expect_ndim(cos, 2, fn, "cos", "[num_positions, D]");
  expect_ndim(sin, 2, fn, "sin", "[num_positions, D]");
  expect_ndim(k, 4, fn, "k_cache", "[num_pages, P, Hk, D]");
  expect_ndim(v, 4, fn, "v_cache", "[num_pages, P, Hk, D]");
  expect_ndim(table, 2, fn, "page_table", "[B, max_pages]");
  expect_ndim(positions, 1, fn, "positions", "[B]");
  expect_ndim(q_out, 3, fn, "q_out", "[B, Hq, D]");

  ABSPARSE_CHECK_ARG(num_q_heads > 0 && num_q_heads <= INT32_MAX, fn,
                     "num_q_heads: expected in [1, 2^31), got ", num_q_heads);
  const int64_t batch = qkv.size(0), hk = k.size(2), dim = k.size(3);
  for (int d = 0; d < 4; ++d) {
    ABSPARSE_CHECK_ARG(v.size(d) == k.size(d), fn, "v_cache: expected the shape of k_cache ",
                       k.shape_string(), ", got ", v.shape_string());
  }
  expect_size(qkv, 1, (num_q_heads + 2 * hk) * dim, fn, "qkv", "(Hq + 2 Hk) D columns");
  expect_size(cos, 1, dim, fn, "cos", "D of k_cache");
  expect_size(sin, 0, cos.size(0), fn, "sin", "num_positions of cos");
  expect_size(sin, 1, dim, fn, "sin", "D of k_cache");
  expect_size(table, 0, batch, fn, "page_table", "B of qkv");
  expect_size(positions, 0, batch, fn, "positions", "B of qkv");
  expect_size(q_out, 0, batch, fn, "q_out", "B of qkv");
  expect_size(q_out, 1, num_q_heads, fn, "q_out", "num_q_heads");
  expect_size(q_out, 2, dim, fn, "q_out", "D of k_cache");

  const bool cuda = on_cuda(qkv, fn, "qkv");
  for (const auto& [t, name] : {std::pair<const TensorView*, const char*>{&cos, "cos"},
                                {&sin, "sin"}, {&k, "k_cache"}, {&v, "v_cache"},
                                {&table, "page_table"}, {&positions, "positions"},
                                {&q_out, "q_out"}}) {
    expect_same_device(*t, qkv, fn, name, "qkv");
  }

  expect_float_dtype(qkv, fn, "qkv");
  expect_dtype(cos, qkv.dtype, fn, "cos");
  expect_dtype(sin, qkv.dtype, fn, "sin");
  expect_dtype(k, qkv.dtype, fn, "k_cache");
  expect_dtype(v, qkv.dtype, fn, "v_cache");
  expect_dtype(q_out, qkv.dtype, fn, "q_out");
  expect_dtype(table, DType::kInt32, fn, "page_table");
  expect_dtype(positions, DType::kInt32, fn, "positions");

  expect_last_dim_contiguous(qkv, fn, "qkv");
  expect_last_dim_contiguous(cos, fn, "cos");
  expect_last_dim_contiguous(sin, fn, "sin");
  expect_last_dim_contiguous(k, fn, "k_cache");
  expect_last_dim_contiguous(v, fn, "v_cache");
  expect_last_dim_contiguous(q_out, fn, "q_out");

  RopeAppendParams p;
  p.batch = int32_size(batch, fn, "qkv.shape[0]", "B");
  p.num_q_heads = static_cast<int32_t>(num_q_heads);
  p.num_kv_heads = int32_size(hk, fn, "k_cache.shape[2]", "Hk");
  p.head_dim = int32_size(dim, fn, "k_cache.shape[3]", "D");
  p.dtype = qkv.dtype;
  p.qkv = qkv.data;
  p.qkv_stride_batch = qkv.stride(0);
  p.cos = cos.data;
  p.sin = sin.data;
  p.cos_stride_position = cos.stride(0);
  p.sin_stride_position = sin.stride(0);
  p.num_positions = cos.size(0);
  p.positions = static_cast<const int32_t*>(positions.data);
  p.positions_stride = positions.stride(0);
  p.q_out = q_out.data;
  p.q_out_stride_batch = q_out.stride(0);
  p.q_out_stride_head = q_out.stride(1);
  p.k_cache = k.data;
  p.k_stride_page = k.stride(0);
  p.k_stride_token = k.stride(1);
  p.k_stride_head = k.stride(2);
  p.v_cache = v.data;
  p.v_stride_page = v.stride(0);
  p.v_stride_token = v.stride(1);
  p.v_stride_head = v.stride(2);
  p.page_size = int32_size(k.size(1), fn, "k_cache.shape[1]", "P");
  p.num_pages = k.size(0);
  p.page_table = static_cast<const int32_t*>(table.data);
  p.page_table_stride_batch = table.stride(0);
  p.page_table_stride_page = table.stride(1);
  p.max_pages = int32_size(table.size(1), fn, "page_table.shape[1]", "max_pages");
  if (cuda) {
#ifdef ABSPARSE_WITH_CUDA
    CudaDeviceGuard guard(qkv.device_index);
    p.stream = reinterpret_cast<void*>(stream);
    rope_append_cuda(p);
#endif
    return;
  }
  (void)stream;
  rope_append_cpu(p);
}

}  // namespace

void register_model_ops(py::module_& m) {
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("residual"), py::arg("out"), py::arg("stream") = 0);
  m.def("silu_mul", &silu_mul, py::arg("gate_up"), py::arg("out"), py::arg("stream") = 0);
  m.def("rope_append", &rope_append, py::arg("qkv"), py::arg("cos"), py::arg("sin"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("page_table"), py::arg("positions"),
        py::arg("num_q_heads"), py::arg("q_out"), py::arg("stream") = 0);
}

}  // namespace absparse::py_binding

// Reading torch tensors in the binding without torch headers.
//
// A TensorView is what the C++ API needs of a tensor: data pointer, dtype, shape, strides (in
// elements) and device, read through the tensor's Python attributes. The checks below validate in
// the fixed order ndim -> sizes -> device -> dtype -> layout and raise absparse::InvalidArgument
// (Python ValueError) naming the function, the argument, the expected and the actual value.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "absparse/numeric.h"

namespace absparse::py_binding {

namespace py = pybind11;

constexpr int kMaxDims = 6;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  bool is_cuda = false;
  int device_index = -1;  // -1 on the CPU

  int64_t size(int dim) const { return shape[dim]; }
  int64_t stride(int dim) const { return strides[dim]; }
  int64_t numel() const;
  std::string shape_string() const;  // "[2, 8, 64]"
  std::string device_string() const;  // "cpu" / "cuda:0"
};

// Reads `obj` (must be a torch.Tensor of at most kMaxDims dims and a supported dtype).
TensorView tensor_arg(py::handle obj, const char* function, const char* name);
// Like tensor_arg, but None gives std::nullopt-like has_value=false.
bool optional_tensor_arg(py::handle obj, const char* function, const char* name, TensorView* out);

// Checks, each naming `function` and `name` in its message.
void expect_ndim(const TensorView& t, int ndim, const char* function, const char* name,
                 const char* shape_doc);
void expect_size(const TensorView& t, int dim, int64_t size, const char* function,
                 const char* name, const char* what);
void expect_dtype(const TensorView& t, DType dtype, const char* function, const char* name);
void expect_float_dtype(const TensorView& t, const char* function, const char* name);
void expect_same_device(const TensorView& t, const TensorView& ref, const char* function,
                        const char* name, const char* ref_name);
void expect_last_dim_contiguous(const TensorView& t, const char* function, const char* name);
// The current build runs CPU tensors only; CUDA tensors raise a clear error until kernels exist.
void expect_supported_device(const TensorView& t, const char* function, const char* name);

}  // namespace absparse::py_binding

#include "tensor_view.h"

#include <string>

#include "absparse/error.h"

namespace absparse::py_binding {
namespace {

// torch objects looked up once: the Tensor type and the dtypes absparse understands.
struct TorchHandles {
  py::object tensor_type;
  py::object dtypes[6];  // indexed by DType
};

const TorchHandles& torch_handles() {
  static TorchHandles* handles = [] {
    auto* h = new TorchHandles();  // intentionally leaked: lives as long as the interpreter
    py::module_ torch = py::module_::import("torch");
    h->tensor_type = torch.attr("Tensor");
    h->dtypes[static_cast<int>(DType::kFloat32)] = torch.attr("float32");
    h->dtypes[static_cast<int>(DType::kFloat16)] = torch.attr("float16");
    h->dtypes[static_cast<int>(DType::kBFloat16)] = torch.attr("bfloat16");
    h->dtypes[static_cast<int>(DType::kInt32)] = torch.attr("int32");
    h->dtypes[static_cast<int>(DType::kInt8)] = torch.attr("int8");
    h->dtypes[static_cast<int>(DType::kUInt8)] = torch.attr("uint8");
    return h;
  }();
  return *handles;
}

}  // namespace

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

std::string TensorView::shape_string() const {
  std::string out = "[";  // no iostreams: see detail::append in absparse/error.h
  for (int i = 0; i < ndim; ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

std::string TensorView::device_string() const {
  return is_cuda ? "cuda:" + std::to_string(device_index) : "cpu";
}

// Reads one tensor through the CPython API with interned attribute names: this runs for every
// tensor of every call, so it avoids pybind11's per-access string creation and casts (the host
// overhead of a call is measured in bench/host_overhead.py).
TensorView tensor_arg(py::handle obj, const char* function, const char* name) {
  static PyObject* const kDtype = PyUnicode_InternFromString("dtype");
  static PyObject* const kShape = PyUnicode_InternFromString("shape");
  static PyObject* const kStride = PyUnicode_InternFromString("stride");
  static PyObject* const kDataPtr = PyUnicode_InternFromString("data_ptr");
  static PyObject* const kIsCuda = PyUnicode_InternFromString("is_cuda");
  const TorchHandles& torch = torch_handles();
  ABSPARSE_CHECK_ARG(py::isinstance(obj, torch.tensor_type), function, name,
                     ": expected a torch.Tensor, got ",
                     std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  TensorView t;
  py::object dtype = py::reinterpret_steal<py::object>(PyObject_GetAttr(obj.ptr(), kDtype));
  if (!dtype) throw py::error_already_set();
  bool known = false;
  for (int i = 0; i < 6; ++i) {
    if (dtype.is(torch.dtypes[i])) {
      t.dtype = static_cast<DType>(i);
      known = true;
      break;
    }
  }
  ABSPARSE_CHECK_ARG(known, function, name, ": unsupported dtype ", std::string(py::str(dtype)),
                     " (absparse uses float32, float16, bfloat16, int32, int8, uint8)");
  py::object shape = py::reinterpret_steal<py::object>(PyObject_GetAttr(obj.ptr(), kShape));
  py::object strides =
      py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(obj.ptr(), kStride));
  if (!shape || !strides || !PyTuple_Check(shape.ptr()) || !PyTuple_Check(strides.ptr())) {
    throw py::error_already_set();
  }
  t.ndim = static_cast<int>(PyTuple_GET_SIZE(shape.ptr()));
  ABSPARSE_CHECK_ARG(t.ndim <= kMaxDims, function, name, ": expected at most ", kMaxDims,
                     " dimensions, got ", t.ndim);
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), i));
    t.strides[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides.ptr(), i));
  }
  py::object ptr = py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(obj.ptr(), kDataPtr));
  py::object is_cuda = py::reinterpret_steal<py::object>(PyObject_GetAttr(obj.ptr(), kIsCuda));
  if (!ptr || !is_cuda) throw py::error_already_set();
  t.data = PyLong_AsVoidPtr(ptr.ptr());
  t.is_cuda = is_cuda.ptr() == Py_True;
  t.device_index = t.is_cuda ? obj.attr("get_device")().cast<int>() : -1;
  if (PyErr_Occurred()) throw py::error_already_set();
  return t;
}

bool optional_tensor_arg(py::handle obj, const char* function, const char* name, TensorView* out) {
  if (obj.is_none()) return false;
  *out = tensor_arg(obj, function, name);
  return true;
}

void expect_ndim(const TensorView& t, int ndim, const char* function, const char* name,
                 const char* shape_doc) {
  ABSPARSE_CHECK_ARG(t.ndim == ndim, function, name, ": expected ", ndim, " dimensions ",
                     shape_doc, ", got ", t.ndim, " with shape ", t.shape_string());
}

void expect_size(const TensorView& t, int dim, int64_t size, const char* function,
                 const char* name, const char* what) {
  ABSPARSE_CHECK_ARG(t.shape[dim] == size, function, name, ".shape[", dim, "]: expected ", size,
                     " (", what, "), got ", t.shape[dim], " (shape ", t.shape_string(), ")");
}

void expect_dtype(const TensorView& t, DType dtype, const char* function, const char* name) {
  ABSPARSE_CHECK_ARG(t.dtype == dtype, function, name, ": expected dtype ", dtype_name(dtype),
                     ", got ", dtype_name(t.dtype));
}

void expect_float_dtype(const TensorView& t, const char* function, const char* name) {
  ABSPARSE_CHECK_ARG(t.dtype == DType::kFloat32 || t.dtype == DType::kFloat16 ||
                         t.dtype == DType::kBFloat16,
                     function, name, ": expected dtype float16, bfloat16 or float32, got ",
                     dtype_name(t.dtype));
}

void expect_same_device(const TensorView& t, const TensorView& ref, const char* function,
                        const char* name, const char* ref_name) {
  ABSPARSE_CHECK_ARG(t.is_cuda == ref.is_cuda && t.device_index == ref.device_index, function,
                     name, ": expected the device of ", ref_name, " (", ref.device_string(),
                     "), got ", t.device_string());
}

void expect_last_dim_contiguous(const TensorView& t, const char* function, const char* name) {
  ABSPARSE_CHECK_ARG(t.ndim == 0 || t.shape[t.ndim - 1] <= 1 || t.strides[t.ndim - 1] == 1,
                     function, name, ": expected a contiguous last dimension (stride 1), got ",
                     "stride ", t.strides[t.ndim - 1]);
}

void expect_supported_device(const TensorView& t, const char* function, const char* name) {
  ABSPARSE_CHECK_ARG(!t.is_cuda, function, name, ": expected a CPU tensor (this build of absparse ",
                     "has no CUDA kernels yet), got ", t.device_string());
}

}  // namespace absparse::py_binding

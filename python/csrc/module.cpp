// absparse._C: the module only lists registrations; each op family binds itself in its own file.
#include <pybind11/pybind11.h>

#ifdef ABSPARSE_WITH_CUDA
#include "absparse/prefill_cuda.h"
#endif

namespace absparse::py_binding {
void register_layout(pybind11::module_& m);
void register_quantize(pybind11::module_& m);
void register_decode(pybind11::module_& m);
void register_calibration(pybind11::module_& m);
void register_prefill(pybind11::module_& m);
void register_prefill_masks(pybind11::module_& m);
void register_model_ops(pybind11::module_& m);
}  // namespace absparse::py_binding

PYBIND11_MODULE(_C, m) {
  m.doc() = "absparse native extension (torch-free; tensors cross as pointers, shapes and strides)";
  m.attr("__version__") = ABSPARSE_VERSION_STRING;
#ifdef ABSPARSE_WITH_CUDA
  m.attr("has_cuda") = true;  // the decode ops also run on CUDA tensors
  // sparse_prefill's Hopper kernel (kernel="sm90") is in this build (CUTLASS headers found).
  m.attr("has_sm90_prefill") = absparse::sparse_prefill_sm90_built();
#else
  m.attr("has_cuda") = false;
  m.attr("has_sm90_prefill") = false;
#endif
  absparse::py_binding::register_layout(m);
  absparse::py_binding::register_quantize(m);
  absparse::py_binding::register_decode(m);
  absparse::py_binding::register_calibration(m);
  absparse::py_binding::register_prefill(m);
  absparse::py_binding::register_prefill_masks(m);
  absparse::py_binding::register_model_ops(m);
}

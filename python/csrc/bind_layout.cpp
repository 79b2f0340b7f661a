// absparse._C.LayerLayout: the validated C++ layout behind the Python LayerLayout.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "absparse/layout.h"

namespace absparse::py_binding {

namespace py = pybind11;

void register_layout(py::module_& m) {
  py::class_<LayerLayout>(m, "LayerLayout")
      .def(py::init([](std::vector<int32_t> block_sizes, int32_t page_size,
                       const std::string& summary, const std::string& format) {
             return LayerLayout(std::move(block_sizes), page_size, parse_summary_kind(summary),
                                parse_summary_format(format));
           }),
           py::arg("block_sizes"), py::arg("page_size"), py::arg("summary"), py::arg("format"))
      .def_property_readonly("block_sizes", &LayerLayout::block_sizes)
      .def_property_readonly("page_size", &LayerLayout::page_size)
      .def_property_readonly("num_kv_heads", &LayerLayout::num_kv_heads)
      .def_property_readonly("slots_per_page", &LayerLayout::slots_per_page)
      .def_property_readonly("slot_offsets", &LayerLayout::slot_offsets)
      .def_property_readonly("summary_vectors", &LayerLayout::summary_vectors)
      .def_property_readonly("summary",
                             [](const LayerLayout& l) { return summary_kind_name(l.kind()); })
      .def_property_readonly("format",
                             [](const LayerLayout& l) { return summary_format_name(l.format()); })
      .def("summary_width",
           [](const LayerLayout& l, int32_t head_dim) {
             l.check_head_dim("LayerLayout.summary_width", head_dim);
             return summary_width(l.format(), head_dim);
           },
           py::arg("head_dim"))
      .def_property_readonly("summary_dtype", [](const LayerLayout& l) {
        return dtype_name(summary_dtype(l.format()));
      });
}

}  // namespace absparse::py_binding

// absparse._C.head_recall / allocate_block_sizes: validate arguments, fill the params structs of
// absparse/calibration.h, run. The Python wrappers (absparse/calibration.py) own defaults,
// conversions and docstrings. Both results are small, so they come back as Python lists.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "absparse/calibration.h"
#include "absparse/error.h"
#include "tensor_view.h"

namespace absparse::py_binding {

namespace {

// Block sizes arrive as Python ints; the range is checked before they become int32.
std::vector<int32_t> candidate_list(const char* fn, const std::vector<int64_t>& candidates) {
  std::vector<int32_t> out;
  out.reserve(candidates.size());
  for (size_t c = 0; c < candidates.size(); ++c) {
    const int64_t v = candidates[c];
    ABSPARSE_CHECK_ARG(v >= 1 && v <= (int64_t{1} << 30) && (v & (v - 1)) == 0, fn,
                       "candidates[", c, "]: expected a power of two in [1, 2^30], got ", v);
    out.push_back(static_cast<int32_t>(v));
  }
  return out;
}

// Returns recall [Hk, C] row-major as a flat list of Hk * C floats.
std::vector<double> head_recall(py::handle q_obj, py::handle k_obj, py::handle positions_obj,
                                const std::vector<int64_t>& candidates, int64_t budget_tokens,
                                double budget_fraction, int64_t sink_tokens, int64_t local_tokens,
                                const std::string& summary, const std::string& group_reduce,
                                double scale) {
  const char* fn = "head_recall";
  TensorView q = tensor_arg(q_obj, fn, "q");
  TensorView k = tensor_arg(k_obj, fn, "k");
  TensorView positions = tensor_arg(positions_obj, fn, "positions");
  expect_ndim(q, 3, fn, "q", "[N, Hq, D]");
  expect_ndim(k, 3, fn, "k", "[T, Hk, D]");
  expect_ndim(positions, 1, fn, "positions", "[N]");
  expect_size(k, 2, q.size(2), fn, "k", "D of q");
  expect_size(positions, 0, q.size(0), fn, "positions", "N of q");
  expect_supported_device(q, fn, "q");
  expect_same_device(k, q, fn, "k", "q");
  expect_same_device(positions, q, fn, "positions", "q");
  expect_float_dtype(q, fn, "q");
  expect_dtype(k, q.dtype, fn, "k");
  expect_dtype(positions, DType::kInt32, fn, "positions");
  expect_last_dim_contiguous(q, fn, "q");
  expect_last_dim_contiguous(k, fn, "k");
  ABSPARSE_CHECK_ARG(summary == "mean" || summary == "minmax" || summary == "cuboid", fn,
                     "summary: expected 'mean', 'minmax' or 'cuboid', got '", summary, "'");
  ABSPARSE_CHECK_ARG(group_reduce == "max" || group_reduce == "softmax_sum", fn,
                     "group_reduce: expected 'max' or 'softmax_sum', got '", group_reduce, "'");
  ABSPARSE_CHECK_ARG(q.size(0) <= INT32_MAX && q.size(1) <= INT32_MAX && q.size(2) <= INT32_MAX &&
                         k.size(1) <= INT32_MAX,
                     fn, "q, k: expected dimensions < 2^31, got q ", q.shape_string(), ", k ",
                     k.shape_string());
  const std::vector<int32_t> sizes = candidate_list(fn, candidates);

  HeadRecallParams p;
  p.num_probes = static_cast<int32_t>(q.size(0));
  p.num_q_heads = static_cast<int32_t>(q.size(1));
  p.num_kv_heads = static_cast<int32_t>(k.size(1));
  p.head_dim = static_cast<int32_t>(q.size(2));
  p.num_tokens = k.size(0);
  p.dtype = q.dtype;
  p.q = q.data;
  p.q_stride_probe = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.k = k.data;
  p.k_stride_token = k.stride(0);
  p.k_stride_head = k.stride(1);
  p.positions = static_cast<const int32_t*>(positions.data);
  p.positions_stride = positions.stride(0);
  p.candidates = sizes.data();
  p.num_candidates = static_cast<int32_t>(sizes.size());
  p.budget_tokens = budget_tokens;
  p.budget_fraction = budget_fraction;
  p.sink_tokens = sink_tokens;
  p.local_tokens = local_tokens;
  p.kind = parse_summary_kind(summary);
  p.group_reduce = group_reduce == "max" ? GroupReduce::kMax : GroupReduce::kSoftmaxSum;
  p.scale = scale;
  std::vector<double> recall(static_cast<size_t>(std::max<int64_t>(k.size(1), 0)) * sizes.size());
  p.recall = recall.data();
  p.recall_stride_head = static_cast<int64_t>(sizes.size());
  p.recall_stride_candidate = 1;
  {
    // The tensors stay referenced by the caller's frame; the GIL is not needed to read them.
    py::gil_scoped_release release;
    head_recall_cpu(p);
  }
  return recall;
}

// recall: a float64 buffer [N, C] (the wrapper passes a NumPy array). Returns N block sizes.
std::vector<int32_t> allocate(py::buffer recall_obj, const std::vector<int64_t>& candidates,
                              int64_t avg_block_size, const std::string& constraint) {
  const char* fn = "allocate_block_sizes";
  py::buffer_info recall = recall_obj.request();
  ABSPARSE_CHECK_ARG(recall.ndim == 2, fn, "recall: expected 2 dimensions [N, C], got ",
                     recall.ndim);
  ABSPARSE_CHECK_ARG(recall.format == py::format_descriptor<double>::format() &&
                         recall.itemsize == sizeof(double),
                     fn, "recall: expected float64 values, got buffer format '", recall.format,
                     "'");
  ABSPARSE_CHECK_ARG(recall.shape[1] == static_cast<py::ssize_t>(candidates.size()), fn,
                     "recall.shape[1]: expected ", candidates.size(), " (C = len(candidates)), ",
                     "got ", recall.shape[1]);
  ABSPARSE_CHECK_ARG(recall.strides[0] % sizeof(double) == 0 &&
                         recall.strides[1] % sizeof(double) == 0,
                     fn, "recall: expected element-aligned strides, got ", recall.strides[0],
                     " and ", recall.strides[1], " bytes");
  ABSPARSE_CHECK_ARG(constraint == "count" || constraint == "mean", fn,
                     "constraint: expected 'count' or 'mean', got '", constraint, "'");
  const std::vector<int32_t> sizes = candidate_list(fn, candidates);

  AllocateBlockSizesParams p;
  p.num_heads = recall.shape[0];
  p.num_candidates = static_cast<int32_t>(sizes.size());
  p.recall = static_cast<const double*>(recall.ptr);
  p.recall_stride_head = recall.strides[0] / static_cast<int64_t>(sizeof(double));
  p.recall_stride_candidate = recall.strides[1] / static_cast<int64_t>(sizeof(double));
  p.candidates = sizes.data();
  p.avg_block_size = avg_block_size;
  p.constraint = parse_allocation_constraint(constraint);
  std::vector<int32_t> out(static_cast<size_t>(p.num_heads));
  p.block_sizes = out.data();
  p.block_sizes_stride = 1;
  allocate_block_sizes(p);
  return out;
}

}  // namespace

void register_calibration(py::module_& m) {
  m.def("head_recall", &head_recall, py::arg("q"), py::arg("k"), py::arg("positions"),
        py::arg("candidates"), py::arg("budget_tokens"), py::arg("budget_fraction"),
        py::arg("sink_tokens"), py::arg("local_tokens"), py::arg("summary"),
        py::arg("group_reduce"), py::arg("scale"));
  m.def("allocate_block_sizes", &allocate, py::arg("recall"), py::arg("candidates"),
        py::arg("avg_block_size"), py::arg("constraint"));
}

}  // namespace absparse::py_binding

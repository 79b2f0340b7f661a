// absparse._C.quantize / dequantize: row-wise storage-format conversion of [rows, D] matrices.
// The Python wrapper flattens leading dimensions, broadcasts the channel parameters to [rows, D]
// and allocates the outputs; this layer validates and fills QuantizeParams / DequantizeParams.
#include <pybind11/pybind11.h>

#include "absparse/error.h"
#include "absparse/quantize.h"
#include "tensor_view.h"

namespace absparse::py_binding {

namespace {

struct ChannelArgs {
  TensorView scale, zero;
  bool present = false;
};

ChannelArgs channel_args(const char* fn, SummaryFormat format, py::handle scale, py::handle zero,
                         int64_t rows, int64_t dim) {
  ChannelArgs c;
  if (!format_is_per_channel(format)) return c;
  ABSPARSE_CHECK_ARG(!scale.is_none(), fn, "channel_scale: format '", summary_format_name(format),
                     "' needs per-channel scales, got None");
  ABSPARSE_CHECK_ARG(!zero.is_none(), fn, "channel_zero: format '", summary_format_name(format),
                     "' needs per-channel zero points, got None");
  c.scale = tensor_arg(scale, fn, "channel_scale");
  c.zero = tensor_arg(zero, fn, "channel_zero");
  for (TensorView* t : {&c.scale, &c.zero}) {
    const char* name = t == &c.scale ? "channel_scale" : "channel_zero";
    expect_ndim(*t, 2, fn, name, "[rows, D]");
    expect_size(*t, 0, rows, fn, name, "rows");
    expect_size(*t, 1, dim, fn, name, "D");
    expect_supported_device(*t, fn, name);
    expect_dtype(*t, DType::kFloat32, fn, name);
    expect_last_dim_contiguous(*t, fn, name);
  }
  c.present = true;
  return c;
}

void quantize(py::handle x_obj, const std::string& format_name, py::handle scale_obj,
              py::handle zero_obj, py::handle codes_obj, py::handle scales_obj) {
  const char* fn = "quantize";
  const SummaryFormat format = parse_summary_format(format_name);
  TensorView x = tensor_arg(x_obj, fn, "x");
  expect_ndim(x, 2, fn, "x", "[rows, D]");
  const int64_t rows = x.size(0), dim = x.size(1);
  ABSPARSE_CHECK_ARG(dim > 0 && dim <= (1 << 20), fn, "x.shape[-1]: expected in [1, 2^20], got ",
                     dim);
  ABSPARSE_CHECK_ARG(!format_is_4bit(format) || dim % 2 == 0, fn,
                     "x.shape[-1]: the 4-bit formats pack two values per byte, expected an even ",
                     "size, got ", dim);
  expect_supported_device(x, fn, "x");
  expect_dtype(x, DType::kFloat32, fn, "x");
  expect_last_dim_contiguous(x, fn, "x");
  TensorView codes = tensor_arg(codes_obj, fn, "codes");
  expect_ndim(codes, 2, fn, "codes", "[rows, W]");
  expect_size(codes, 0, rows, fn, "codes", "rows");
  expect_size(codes, 1, summary_width(format, static_cast<int>(dim)), fn, "codes", "W");
  expect_dtype(codes, summary_dtype(format), fn, "codes");
  expect_last_dim_contiguous(codes, fn, "codes");
  QuantizeParams p;
  p.format = format;
  p.rows = rows;
  p.dim = static_cast<int32_t>(dim);
  p.x = static_cast<const float*>(x.data);
  p.x_stride_row = x.stride(0);
  p.codes = codes.data;
  p.codes_stride_row = codes.stride(0);
  if (format_has_vector_scales(format)) {
    TensorView scales = tensor_arg(scales_obj, fn, "scales");
    expect_ndim(scales, 1, fn, "scales", "[rows]");
    expect_size(scales, 0, rows, fn, "scales", "rows");
    expect_dtype(scales, DType::kFloat32, fn, "scales");
    p.scales = static_cast<float*>(scales.data);
    p.scales_stride = scales.stride(0);
  }
  ChannelArgs c = channel_args(fn, format, scale_obj, zero_obj, rows, dim);
  if (c.present) {
    p.channel_scale = static_cast<const float*>(c.scale.data);
    p.channel_scale_stride_row = c.scale.stride(0);
    p.channel_zero = static_cast<const float*>(c.zero.data);
    p.channel_zero_stride_row = c.zero.stride(0);
  }
  quantize_rows(p);
}

void dequantize(py::handle codes_obj, const std::string& format_name, py::handle scales_obj,
                py::handle scale_obj, py::handle zero_obj, py::handle out_obj) {
  const char* fn = "dequantize";
  const SummaryFormat format = parse_summary_format(format_name);
  TensorView out = tensor_arg(out_obj, fn, "out");
  expect_ndim(out, 2, fn, "out", "[rows, D]");
  const int64_t rows = out.size(0), dim = out.size(1);
  expect_dtype(out, DType::kFloat32, fn, "out");
  expect_last_dim_contiguous(out, fn, "out");
  TensorView codes = tensor_arg(codes_obj, fn, "codes");
  expect_ndim(codes, 2, fn, "codes", "[rows, W]");
  expect_size(codes, 0, rows, fn, "codes", "rows");
  expect_size(codes, 1, summary_width(format, static_cast<int>(dim)), fn, "codes", "W");
  expect_supported_device(codes, fn, "codes");
  expect_dtype(codes, summary_dtype(format), fn, "codes");
  expect_last_dim_contiguous(codes, fn, "codes");
  DequantizeParams p;
  p.format = format;
  p.rows = rows;
  p.dim = static_cast<int32_t>(dim);
  p.codes = codes.data;
  p.codes_stride_row = codes.stride(0);
  p.x = static_cast<float*>(out.data);
  p.x_stride_row = out.stride(0);
  if (format_has_vector_scales(format)) {
    ABSPARSE_CHECK_ARG(!scales_obj.is_none(), fn, "scales: format '", format_name,
                       "' stores one scale per vector, got None");
    TensorView scales = tensor_arg(scales_obj, fn, "scales");
    expect_ndim(scales, 1, fn, "scales", "[rows]");
    expect_size(scales, 0, rows, fn, "scales", "rows");
    expect_dtype(scales, DType::kFloat32, fn, "scales");
    p.scales = static_cast<const float*>(scales.data);
    p.scales_stride = scales.stride(0);
  }
  ChannelArgs c = channel_args(fn, format, scale_obj, zero_obj, rows, dim);
  if (c.present) {
    p.channel_scale = static_cast<const float*>(c.scale.data);
    p.channel_scale_stride_row = c.scale.stride(0);
    p.channel_zero = static_cast<const float*>(c.zero.data);
    p.channel_zero_stride_row = c.zero.stride(0);
  }
  dequantize_rows(p);
}

}  // namespace

void register_quantize(py::module_& m) {
  m.def("quantize", &quantize, py::arg("x"), py::arg("format"), py::arg("channel_scale"),
        py::arg("channel_zero"), py::arg("codes"), py::arg("scales"));
  m.def("dequantize", &dequantize, py::arg("codes"), py::arg("format"), py::arg("scales"),
        py::arg("channel_scale"), py::arg("channel_zero"), py::arg("out"));
}

}  // namespace absparse::py_binding

#include "absparse/layout.h"

#include "absparse/error.h"

namespace absparse {
namespace {

bool is_power_of_two(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

}  // namespace

SummaryKind parse_summary_kind(const std::string& name) {
  if (name == "mean") return SummaryKind::kMean;
  if (name == "minmax") return SummaryKind::kMinMax;
  if (name == "cuboid") return SummaryKind::kCuboid;
  ABSPARSE_CHECK_ARG(false, "LayerLayout",
                     "summary: expected one of 'mean', 'minmax', 'cuboid', got '", name, "'");
  return SummaryKind::kMean;
}

SummaryFormat parse_summary_format(const std::string& name) {
  static const char* const names[] = {"fp32", "fp16", "bf16", "int8", "int4", "int8c", "int4c"};
  for (int i = 0; i < 7; ++i) {
    if (name == names[i]) return static_cast<SummaryFormat>(i);
  }
  ABSPARSE_CHECK_ARG(false, "LayerLayout",
                     "format: expected one of 'fp32', 'fp16', 'bf16', 'int8', 'int4', 'int8c', "
                     "'int4c', got '", name, "'");
  return SummaryFormat::kFp32;
}

const char* summary_kind_name(SummaryKind kind) {
  switch (kind) {
    case SummaryKind::kMean: return "mean";
    case SummaryKind::kMinMax: return "minmax";
    case SummaryKind::kCuboid: return "cuboid";
  }
  return "unknown";
}

const char* summary_format_name(SummaryFormat format) {
  switch (format) {
    case SummaryFormat::kFp32: return "fp32";
    case SummaryFormat::kFp16: return "fp16";
    case SummaryFormat::kBf16: return "bf16";
    case SummaryFormat::kInt8: return "int8";
    case SummaryFormat::kInt4: return "int4";
    case SummaryFormat::kInt8c: return "int8c";
    case SummaryFormat::kInt4c: return "int4c";
  }
  return "unknown";
}

DType summary_dtype(SummaryFormat f) {
  switch (f) {
    case SummaryFormat::kFp32: return DType::kFloat32;
    case SummaryFormat::kFp16: return DType::kFloat16;
    case SummaryFormat::kBf16: return DType::kBFloat16;
    case SummaryFormat::kInt8: return DType::kInt8;
    default: return DType::kUInt8;
  }
}

int format_qmax(SummaryFormat f) {
  switch (f) {
    case SummaryFormat::kInt8: return 127;
    case SummaryFormat::kInt4: return 7;
    case SummaryFormat::kInt8c: return 255;
    case SummaryFormat::kInt4c: return 15;
    default: return 0;
  }
}

LayerLayout::LayerLayout(std::vector<int32_t> block_sizes, int32_t page_size, SummaryKind kind,
                         SummaryFormat format)
    : block_sizes_(std::move(block_sizes)), page_size_(page_size), kind_(kind), format_(format) {
  const char* fn = "LayerLayout";
  ABSPARSE_CHECK_ARG(is_power_of_two(page_size), fn,
                     "page_size: expected a power of two, got ", page_size);
  ABSPARSE_CHECK_ARG(!block_sizes_.empty(), fn, "block_sizes: expected at least one KV head, got 0");
  slot_offsets_.resize(block_sizes_.size());
  int64_t offset = 0;
  for (size_t h = 0; h < block_sizes_.size(); ++h) {
    const int32_t bs = block_sizes_[h];
    ABSPARSE_CHECK_ARG(is_power_of_two(bs), fn, "block_sizes[", h,
                       "]: expected a power of two, got ", bs);
    ABSPARSE_CHECK_ARG(page_size % bs == 0, fn, "block_sizes[", h, "]: expected a divisor of ",
                       "page_size ", page_size, " (a block never spans pages), got ", bs);
    slot_offsets_[h] = static_cast<int32_t>(offset);
    offset += page_size / bs;
  }
  slots_per_page_ = static_cast<int32_t>(offset);
}

int32_t LayerLayout::min_block_size() const {
  int32_t m = block_sizes_[0];
  for (int32_t bs : block_sizes_) m = bs < m ? bs : m;
  return m;
}

void LayerLayout::check_head_dim(const char* function, int64_t head_dim) const {
  ABSPARSE_CHECK_ARG(head_dim > 0 && head_dim % 8 == 0, function,
                     "head_dim: expected a positive multiple of 8, got ", head_dim);
}

}  // namespace absparse

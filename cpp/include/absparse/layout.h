// Head layout of one attention layer: per-KV-head block sizes, the page size, and how block
// summaries are stored (see docs/decode.md, "Head layout" and "Block summaries").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absparse/numeric.h"

namespace absparse {

// What a block summary holds (R vectors of length D per complete block).
enum class SummaryKind : int32_t {
  kMean = 0,    // R = 1: mean of the block's keys
  kMinMax = 1,  // R = 2: per-channel max (hi) and min (lo), Quest
  kCuboid = 2,  // R = 2: centre m = (max+min)/2, radius r = mean|k-m|; hi = m+r, lo = m-r, ArkVale
};

// How each summary vector is stored. W = stored elements per vector.
enum class SummaryFormat : int32_t {
  kFp32 = 0,  // float32, W = D
  kFp16,      // float16, W = D
  kBf16,      // bfloat16, W = D
  kInt8,      // int8 codes, W = D, symmetric per-vector scale (scales tensor)
  kInt4,      // uint8, W = D/2, two's-complement nibbles, symmetric per-vector scale
  kInt8c,     // uint8 codes, W = D, asymmetric per-channel (layout's channel_scale/zero)
  kInt4c,     // uint8, W = D/2, unsigned nibbles, asymmetric per-channel
};

SummaryKind parse_summary_kind(const std::string& name);      // "mean" | "minmax" | "cuboid"
SummaryFormat parse_summary_format(const std::string& name);  // "fp32" ... "int4c"
const char* summary_kind_name(SummaryKind kind);
const char* summary_format_name(SummaryFormat format);

inline int summary_vectors(SummaryKind kind) { return kind == SummaryKind::kMean ? 1 : 2; }
inline bool format_is_4bit(SummaryFormat f) {
  return f == SummaryFormat::kInt4 || f == SummaryFormat::kInt4c;
}
// True for int8/int4: one float32 scale per stored vector in a separate `scales` tensor.
inline bool format_has_vector_scales(SummaryFormat f) {
  return f == SummaryFormat::kInt8 || f == SummaryFormat::kInt4;
}
// True for int8c/int4c: per-channel scale and zero point [Hk, D] held by the layout.
inline bool format_is_per_channel(SummaryFormat f) {
  return f == SummaryFormat::kInt8c || f == SummaryFormat::kInt4c;
}
inline int summary_width(SummaryFormat f, int head_dim) {
  return format_is_4bit(f) ? head_dim / 2 : head_dim;
}
DType summary_dtype(SummaryFormat f);
// Largest code magnitude: 127 / 7 for the symmetric formats, 255 / 15 for the per-channel ones.
int format_qmax(SummaryFormat f);

// One layer's layout. Construction validates everything that does not depend on the head dim:
// every block size is a power of two that divides page_size, and page_size is a power of two.
class LayerLayout {
 public:
  LayerLayout(std::vector<int32_t> block_sizes, int32_t page_size, SummaryKind kind,
              SummaryFormat format);

  int32_t num_kv_heads() const { return static_cast<int32_t>(block_sizes_.size()); }
  int32_t page_size() const { return page_size_; }
  SummaryKind kind() const { return kind_; }
  SummaryFormat format() const { return format_; }
  int32_t block_size(int32_t head) const { return block_sizes_[head]; }
  const std::vector<int32_t>& block_sizes() const { return block_sizes_; }
  int32_t min_block_size() const;
  // slots_per_page = sum_h P / bs_h; head h owns slots [slot_offset(h), slot_offset(h) + P/bs_h).
  int32_t slots_per_page() const { return slots_per_page_; }
  int32_t slot_offset(int32_t head) const { return slot_offsets_[head]; }
  const std::vector<int32_t>& slot_offsets() const { return slot_offsets_; }
  int32_t summary_vectors() const { return absparse::summary_vectors(kind_); }

  // Throws unless head_dim is usable with this layout (a positive multiple of 8).
  void check_head_dim(const char* function, int64_t head_dim) const;

 private:
  std::vector<int32_t> block_sizes_;
  std::vector<int32_t> slot_offsets_;
  int32_t page_size_;
  int32_t slots_per_page_;
  SummaryKind kind_;
  SummaryFormat format_;
};

}  // namespace absparse

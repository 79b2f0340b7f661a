// Host-side validation of the CUDA entry points (absparse/decode_cuda.h): the checks of the CPU
// path that read no tensor values (cpp/src/validate.cpp, same messages), then one "can the GPU run
// this?" check of the configurations the kernels instantiate. Plain C++: it runs before any CUDA
// call, so a rejected input raises InvalidArgument (Python ValueError) with no device work done.
#include <cstdint>

#include "absparse/decode.h"
#include "absparse/decode_cuda.h"
#include "absparse/error.h"

namespace absparse {
namespace {

const char* kSupported =
    "the CUDA kernels support dtype float16 or bfloat16, head_dim 64, 128 or 256, 1 to 16 query "
    "heads per KV head, 1 to 256 KV heads and up to 65535 sequences";

// The supported set, checked in the order dtype, head_dim, KV heads, group, batch. `tensor` names
// the argument that carries the dtype and the head dim.
void check_gpu_support(const char* fn, const char* tensor, DType dtype, int head_dim,
                       int num_kv_heads, int group, int64_t batch) {
  ABSPARSE_CHECK_ARG(dtype == DType::kFloat16 || dtype == DType::kBFloat16, fn, tensor,
                     ": dtype ", dtype_name(dtype), " is not supported on the GPU (float32 runs on ",
                     "the CPU only); ", kSupported);
  ABSPARSE_CHECK_ARG(head_dim == 64 || head_dim == 128 || head_dim == 256, fn, tensor,
                     ": head_dim ", head_dim, " is not supported on the GPU; ", kSupported);
  ABSPARSE_CHECK_ARG(num_kv_heads >= 1 && num_kv_heads <= kCudaMaxKvHeads, fn, tensor, ": ",
                     num_kv_heads, " KV heads are not supported on the GPU; ", kSupported);
  ABSPARSE_CHECK_ARG(group >= 1 && group <= kCudaMaxGroup, fn, "q: ", group,
                     " query heads per KV head are not supported on the GPU; ", kSupported);
  ABSPARSE_CHECK_ARG(batch >= 0 && batch <= 65535, fn, "batch: ", batch,
                     " sequences are not supported on the GPU; ", kSupported);
}

// Paged K/V caches are read as 16-byte rows.
void check_rows_16_bytes(const char* fn, const char* name, const PagedCacheView& c) {
  const bool aligned = reinterpret_cast<uintptr_t>(c.data) % 16 == 0 && c.stride_page % 8 == 0 &&
                       c.stride_token % 8 == 0 && c.stride_head % 8 == 0 && c.stride_page >= 0 &&
                       c.stride_token >= 0 && c.stride_head >= 0;
  ABSPARSE_CHECK_ARG(aligned, fn, name, ": the CUDA kernels read 16-byte rows: expected a 16-byte ",
                     "aligned data pointer and page/token/head strides that are non-negative ",
                     "multiples of 8 elements, got strides (", c.stride_page, ", ", c.stride_token,
                     ", ", c.stride_head, ")");
}

}  // namespace

void check_update_centroids_cuda(const UpdateCentroidsParams& p) {
  const char* fn = "update_centroids";
  check_update_centroids_args(p);
  check_gpu_support(fn, "k_cache", p.dtype, p.geometry.head_dim, p.geometry.num_kv_heads, 1,
                    p.geometry.batch);
  check_rows_16_bytes(fn, "k_cache", p.k_cache);
}

void check_select_blocks_cuda(const SelectBlocksParams& p) {
  const char* fn = "select_blocks";
  check_select_blocks_args(p);
  const BatchGeometry& g = p.geometry;
  check_gpu_support(fn, "q", p.dtype, g.head_dim, g.num_kv_heads, p.num_q_heads / g.num_kv_heads,
                    g.batch);
  const int64_t bound =
      max_blocks_bound(*p.layout, g.max_pages, p.budget_tokens, p.budget_fraction, p.sink_tokens,
                       p.local_tokens);
  ABSPARSE_CHECK_ARG(p.max_blocks >= bound, fn, "max_blocks: on CUDA tensors the capacity must ",
                     "hold the most blocks any length the page table allows can need with this ",
                     "budget (seq_lens are not read on the host), expected >= ", bound, ", got ",
                     p.max_blocks);
}

void check_decode_attention_cuda(const DecodeAttentionParams& p) {
  const char* fn = p.block_sizes ? "sparse_decode" : "dense_decode";
  check_decode_attention_args(p);
  const BatchGeometry& g = p.geometry;
  check_gpu_support(fn, "q", p.dtype, g.head_dim, g.num_kv_heads, p.num_q_heads / g.num_kv_heads,
                    g.batch);
  check_rows_16_bytes(fn, "k_cache", p.k_cache);
  check_rows_16_bytes(fn, "v_cache", p.v_cache);
}

}  // namespace absparse

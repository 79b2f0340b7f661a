// Host-side validation of sparse_prefill_cuda (absparse/prefill_cuda.h): the checks of the CPU
// path that read no tensor values (check_sparse_prefill_args, same messages), then the
// configurations the kernel instantiates. Plain C++: runs before any CUDA call.
#include <cstdint>

#include "absparse/error.h"
#include "absparse/prefill_cuda.h"

namespace absparse {
namespace {

const char* kSupported =
    "the CUDA kernel supports dtype float16 or bfloat16, head_dim 64 or 128, q_block 64 or 128, "
    "k_block 64, 128, 192 or 256, and up to 65535 sequences and query heads";

// q, k, v and out are read / written as 16-byte rows.
void check_rows_16_bytes(const char* name, const void* data, int64_t stride_token,
                         int64_t stride_head) {
  const bool aligned = reinterpret_cast<uintptr_t>(data) % 16 == 0 && stride_token % 8 == 0 &&
                       stride_head % 8 == 0;
  ABSPARSE_CHECK_ARG(aligned, "sparse_prefill", name, ": the CUDA kernel reads 16-byte rows: ",
                     "expected a 16-byte aligned data pointer and token/head strides that are ",
                     "multiples of 8 elements, got strides (", stride_token, ", ", stride_head, ")");
}

}  // namespace

void check_sparse_prefill_cuda(const SparsePrefillParams& p) {
  const char* fn = "sparse_prefill";
  check_sparse_prefill_args(p);
  ABSPARSE_CHECK_ARG(p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16, fn, "q: dtype ",
                     dtype_name(p.dtype), " is not supported on the GPU (float32 runs on the CPU ",
                     "only); ", kSupported);
  ABSPARSE_CHECK_ARG(p.head_dim == 64 || p.head_dim == 128, fn, "q: head_dim ", p.head_dim,
                     " is not supported on the GPU; ", kSupported);
  ABSPARSE_CHECK_ARG(p.q_block == 64 || p.q_block == 128, fn, "q_block: ", p.q_block,
                     " is not supported on the GPU; ", kSupported);
  ABSPARSE_CHECK_ARG(p.k_block % 64 == 0 && p.k_block <= 256, fn, "k_block: ", p.k_block,
                     " is not supported on the GPU; ", kSupported);
  ABSPARSE_CHECK_ARG(p.batch <= 65535, fn, "cu_seqlens: ", p.batch,
                     " sequences are not supported on the GPU; ", kSupported);
  ABSPARSE_CHECK_ARG(p.num_q_heads <= 65535, fn, "q: ", p.num_q_heads,
                     " query heads are not supported on the GPU; ", kSupported);
  check_rows_16_bytes("q", p.q, p.q_stride_token, p.q_stride_head);
  check_rows_16_bytes("k", p.k, p.k_stride_token, p.k_stride_head);
  check_rows_16_bytes("v", p.v, p.v_stride_token, p.v_stride_head);
  check_rows_16_bytes("out", p.out, p.out_stride_token, p.out_stride_head);
}

}  // namespace absparse

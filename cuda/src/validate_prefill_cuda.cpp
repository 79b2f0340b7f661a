// Host-side validation of sparse_prefill_cuda (absparse/prefill_cuda.h): the checks of the CPU
// path that read no tensor values (check_sparse_prefill_args, same messages), then the
// configurations the kernels instantiate, and the choice between them. Plain C++: runs before any
// CUDA call. ABSPARSE_WITH_SM90_PREFILL is defined when the kSm90 kernel is built.
#include <cstdint>
#include <string>

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

const char* kSm90Supported =
    "the sm90 kernel supports q_block 128, k_block 128 or 256, and q, k, v token and head strides "
    "in [8, 2^39) elements";

// The TMA descriptors of the sm90 kernel: strides non-zero and below 2^40 bytes.
bool tma_stride_ok(int64_t stride) { return stride >= 8 && stride < (int64_t{1} << 39); }

// Why kSm90 cannot run p (which passed the kFa2 checks): the argument to name and its value with
// its verb ("64 is", "strides (0, 8) are"), or arg null when it can.
struct Sm90Rejection {
  const char* arg = nullptr;
  std::string value;
};

Sm90Rejection sm90_rejects(const SparsePrefillParams& p) {
  using detail::concat;
  if (p.q_block != 128) return {"q_block", concat(p.q_block, " is")};
  if (p.k_block != 128 && p.k_block != 256) return {"k_block", concat(p.k_block, " is")};
  const struct {
    const char* name;
    int64_t token, head;
  } rows[] = {{"q", p.q_stride_token, p.q_stride_head},
              {"k", p.k_stride_token, p.k_stride_head},
              {"v", p.v_stride_token, p.v_stride_head}};
  for (const auto& r : rows) {
    if (!tma_stride_ok(r.token) || !tma_stride_ok(r.head)) {
      return {r.name, concat("strides (", r.token, ", ", r.head, ") are")};
    }
  }
  return {};
}

}  // namespace

bool sparse_prefill_sm90_built() {
#ifdef ABSPARSE_WITH_SM90_PREFILL
  return true;
#else
  return false;
#endif
}

PrefillKernel select_sparse_prefill_kernel(const SparsePrefillParams& p) {
  return sparse_prefill_sm90_built() && sm90_rejects(p).arg == nullptr ? PrefillKernel::kSm90
                                                                       : PrefillKernel::kFa2;
}

void check_sparse_prefill_cuda(const SparsePrefillParams& p, PrefillKernel kernel) {
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
  if (kernel != PrefillKernel::kSm90) return;
  ABSPARSE_CHECK_ARG(sparse_prefill_sm90_built(), fn, "kernel: the sm90 kernel is not in this ",
                     "build (configured without the CUTLASS headers: ABSPARSE_CUTLASS, ",
                     "docs/prefill.md)");
  const Sm90Rejection why = sm90_rejects(p);
  ABSPARSE_CHECK_ARG(why.arg == nullptr, fn, why.arg, ": ", why.value,
                     " not supported by the sm90 kernel; ", kSm90Supported);
}

}  // namespace absparse

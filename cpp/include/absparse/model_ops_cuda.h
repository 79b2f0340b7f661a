// CUDA implementations of the model ops (absparse/model_ops.h), for Hopper (sm_90a, the target of
// absparse_cuda). Plain C++17: no CUDA headers. Link absparse::absparse_cuda.
//
// Same params structs as the CPU entry points; every tensor pointer is a device pointer; each
// call is one kernel launch on p.stream (a cudaStream_t) on the current device, with no host
// synchronization and no allocation (capturable in a CUDA graph).
//
// Host-side checks only (the CPU entry points' checks that read no tensor value; InvalidArgument
// naming the argument), plus: dtype float16 or bfloat16 (float32 runs on the CPU only); at most
// 65535 rows (silu_mul) / sequences (rope_append).
// Values in device memory are not validated (that would synchronize) but made harmless:
// rope_append writes no K / V for a sequence whose position is outside [0, max_pages * P) or
// whose page-table entry is outside [0, num_pages), and reads the rope tables at the position
// clamped to [0, num_positions) (q_out is written either way).
//
// Arithmetic: as the CPU entry points (absparse/model_ops.h), with two differences: rms_norm sums
// the squares in float32 (a fixed order per row) and silu_mul's exp is CUDA's expf (within 2 units
// in the last place of float32, where the CPU's std::exp is within 1): their outputs may differ
// from the CPU's by one unit in the last place of the dtype. rope_append rounds exactly as the
// CPU does (no contraction of products into fused multiply-adds): bit-identical outputs.
#pragma once

#include "absparse/model_ops.h"

namespace absparse {

void rms_norm_cuda(const RmsNormParams& p);
void silu_mul_cuda(const SiluMulParams& p);
void rope_append_cuda(const RopeAppendParams& p);

}  // namespace absparse

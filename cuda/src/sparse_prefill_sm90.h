// Launcher of the Hopper warp-specialized sparse_prefill kernel (sparse_prefill_sm90.cu). The file
// is compiled only when the CUTLASS / CuTe headers were found at configure time, which defines
// ABSPARSE_WITH_SM90_PREFILL for absparse_cuda; sparse_prefill.cu dispatches to it.
#pragma once

#include "absparse/prefill.h"

namespace absparse::cuda {

// One launch on p.stream, grid (Nq, Hq, B). The caller has run check_sparse_prefill_cuda(p,
// PrefillKernel::kSm90) (absparse/prefill_cuda.h) and returned early for empty problems
// (B, T or Nq zero).
void launch_sparse_prefill_sm90(const SparsePrefillParams& p);

}  // namespace absparse::cuda

// Host-side check of the register layouts cuda/src/sparse_prefill_sm90.cu relies on, for both head
// dims (run by tests/test_sm90_layouts.py; no GPU needed: CuTe layouts are host-computable). Per
// consumer thread (0 .. 255) of the two warpgroups:
//   - acc_rowcol: mode 0 indexes the thread's rows (64 wg + 16 warp + lane / 4, and + 8), the same
//     rows for S (128 x 128) and O (128 x D); the row's columns of a thread are (lane % 4) * 2 + {0,
//     1} + 8 i, so a row is spread over one quad (the softmax reductions shuffle lanes ^1, ^2);
//     O's columns come in adjacent pairs (the epilogue's 2-element stores); column 0 is held by
//     lane % 4 == 0 (the lse writer).
//   - acc_as_a_operand: S's accumulator viewed as the A operand of the P V wgmma gives, element for
//     element, the (row, key) coordinates the MMA expects in its A registers.
// Prints the mismatches and returns their count.
#include <cstdio>

#include "sparse_prefill_sm90.cu"

namespace {

using namespace cute;
using absparse::cuda::acc_as_a_operand;
using absparse::cuda::acc_rowcol;
using absparse::cuda::Sm90Config;

int mismatches = 0;
void expect(bool ok, const char* what, int tid, int i) {
  if (!ok && mismatches++ < 10) std::printf("mismatch: %s (thread %d, element %d)\n", what, tid, i);
}

template <typename T, int D>
void check() {
  using Config = Sm90Config<T, D>;
  typename Config::MmaQK mma_qk;
  typename Config::MmaPV mma_pv;
  for (int tid = 0; tid < 256; ++tid) {
    auto thr_qk = mma_qk.get_thread_slice(tid);
    auto thr_pv = mma_pv.get_thread_slice(tid);
    auto cs = thr_qk.partition_C(make_identity_tensor(Shape<Int<128>, Int<128>>{}));  // S (row, key)
    auto co = thr_pv.partition_C(make_identity_tensor(Shape<Int<128>, Int<D>>{}));    // O (row, ch)
    auto ca = thr_pv.partition_A(make_identity_tensor(Shape<Int<128>, Int<128>>{}));  // P (row, key)
    auto s_rc = make_tensor(cs.data(), acc_rowcol(cs.layout()));
    auto o_rc = make_tensor(co.data(), acc_rowcol(co.layout()));
    auto p_as_a = make_tensor(cs.data(), acc_as_a_operand(cs.layout()));
    expect(size(p_as_a) == size(ca), "A operand size", tid, 0);
    for (int i = 0; i < size(ca); ++i) {
      expect(get<0>(p_as_a(i)) == get<0>(ca(i)) && get<1>(p_as_a(i)) == get<1>(ca(i)),
             "P as the A operand", tid, i);
    }
    expect(size<0>(s_rc) == 2 && size<0>(o_rc) == 2, "two rows", tid, 0);
    expect(size<1>(s_rc) == 32 && size<1>(o_rc) == D / 4, "columns per row", tid, 0);
    const int row0 = (tid / 128) * 64 + (tid % 128) / 32 * 16 + (tid % 32) / 4;
    for (int mi = 0; mi < size<0>(s_rc); ++mi) {
      const int row = get<0>(s_rc(mi, 0));
      expect(row == row0 + 8 * mi && get<0>(o_rc(mi, 0)) == row, "rows of S and O", tid, mi);
      for (int ni = 0; ni < size<1>(s_rc); ++ni) {
        expect(get<0>(s_rc(mi, ni)) == row, "one row per mode-0 index", tid, ni);
        expect(get<1>(s_rc(mi, ni)) % 8 / 2 == tid % 4, "columns within the quad", tid, ni);
      }
      for (int ni = 0; ni < size<1>(o_rc); ni += 2) {
        const int col = get<1>(o_rc(mi, ni));
        expect(col % 2 == 0 && get<1>(o_rc(mi, ni + 1)) == col + 1, "O column pairs", tid, ni);
      }
      expect((get<1>(o_rc(mi, 0)) == 0) == (tid % 4 == 0), "lse writer", tid, mi);
    }
  }
}

}  // namespace

int main() {
  check<cutlass::bfloat16_t, 128>();
  check<cutlass::half_t, 128>();
  check<cutlass::bfloat16_t, 64>();
  check<cutlass::half_t, 64>();
  std::printf("%d mismatches\n", mismatches);
  return mismatches == 0 ? 0 : 1;
}

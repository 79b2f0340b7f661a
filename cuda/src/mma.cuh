// Tensor-core and asynchronous-copy primitives of the absparse kernels (sm_90a; the m16n8k16 MMA
// and ldmatrix of PTX, cp.async with zero fill). Fragment layouts of mma.m16n8k16 (PTX ISA,
// "Matrix fragments for mma.m16n8k16"), with gid = lane / 4 and tq = lane % 4:
//   A (16 x 16, row-major) a0a1: row gid,   cols 2tq, 2tq+1     a2a3: row gid+8, cols 2tq, 2tq+1
//                          a4a5: row gid,   cols 2tq+8, 2tq+9   a6a7: row gid+8, cols 2tq+8, 2tq+9
//   B (16 x 8, "col")      b0b1: rows 2tq, 2tq+1, col gid       b2b3: rows 2tq+8, 2tq+9, col gid
//   C (16 x 8, float)      c0c1: row gid, cols 2tq, 2tq+1       c2c3: row gid+8, cols 2tq, 2tq+1
// Each 32-bit register holds two 16-bit elements, the one of lower index in the low half.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace absparse::cuda {

__device__ inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; zero-fills the destination when !valid (src is not read: the
// ignore-src predicate, so no source size is computed per copy).
__device__ inline void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile(
      "{\n .reg .pred ignore;\n setp.eq.u32 ignore, %2, 0;\n"
      " cp.async.cg.shared.global [%0], [%1], 16, ignore;\n}\n" ::"r"(smem_addr(dst)),
      "l"(src), "r"(static_cast<uint32_t>(valid))
      : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `pending` of this thread's committed groups are still in flight (0..3).
__device__ inline void cp_async_wait(int pending) {
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
  }
}

__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// D (16x8, f32) += A (16x16) * B (16x8) with float16 or bfloat16 operands.
__device__ inline void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// D += A B with A 16 x 32 unsigned bytes (row-major), B 32 x 8 signed bytes, int32 accumulators
// (exact). Fragments: a0 row gid, k 4 tq .. 4 tq + 3; a1 row gid + 8, same k; a2 / a3 the same
// rows at k + 16; b0 k 4 tq .. 4 tq + 3 of column gid, b1 k + 16; d as for m16n8k16.
__device__ inline void mma_u8s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <typename T>
__device__ inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ inline void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  mma_f16(d, a, b0, b1);
}
template <>
__device__ inline void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                uint32_t b1) {
  mma_bf16(d, a, b0, b1);
}

// Element offset of (row, col) in a swizzled tile of rows of D 16-bit elements; col is a multiple
// of 8 (one 16-byte chunk). Chunk c of row r lives at chunk (c ^ r) mod 8 of its group of 8, so the
// 8 rows an ldmatrix reads at one column hit 8 different bank groups.
template <int D>
__device__ inline int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8;
}

// Two 16-bit values as one register, `first` in the low half.
__device__ inline uint32_t pack_bits(uint16_t first, uint16_t second) {
  return static_cast<uint32_t>(first) | (static_cast<uint32_t>(second) << 16);
}
template <typename T> __device__ inline uint16_t bits16(T x);
template <> __device__ inline uint16_t bits16<__half>(__half x) { return __half_as_ushort(x); }
template <> __device__ inline uint16_t bits16<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat16_as_ushort(x);
}
template <typename T>
__device__ inline uint32_t pack2(T first, T second) {
  return pack_bits(bits16(first), bits16(second));
}

}  // namespace absparse::cuda

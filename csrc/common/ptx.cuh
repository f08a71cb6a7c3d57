// Every inline-PTX instruction the kernels use, one thin wrapper each, so that the CPU emulation
// (emulation/ptx_emulation.h, built with QUANTLAB_EMULATION) can give each its documented
// semantics while the kernels' code paths stay as they are. On the GPU each wrapper is exactly
// the asm statement the kernel used to inline.
//
// Pointers are generic addresses; the wrappers that take shared memory convert them to the
// 32-bit shared window themselves.
#pragma once

#include <cstdint>

#if defined(QUANTLAB_EMULATION)
#include "emulation/ptx_emulation.h"
#else

#include <cuda_runtime.h>

namespace quantlab::ptx {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// createpolicy.fractional.L2::evict_first: a policy for cache-hinted loads of data read once.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

// cp.async.cg (16 bytes, L2 only) with an L2 cache-eviction policy.
__device__ __forceinline__ void cp_async_cg16_hint(void* dst, const void* src, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(
                   shared_address(dst)),
               "l"(src), "l"(policy));
}

// cp.async.cg of 16 bytes of which the first src_bytes (0 or 16) come from src, the rest are zero.
__device__ __forceinline__ void cp_async_cg16_zfill(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst)),
               "l"(src), "r"(src_bytes));
}

// cp.async.ca of BYTES (4, 8 or 16) bytes.
template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async size");
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(shared_address(dst)), "l"(src),
               "n"(BYTES));
}

__device__ __forceinline__ void cp_async_commit_group() {
  asm volatile("cp.async.commit_group;");
}

// Wait until at most N of this thread's committed groups are pending. "memory": shared-memory
// reads of the landed data must not move above the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8x8 b16 matrices, lanes 8j..8j+7 giving the row
// addresses of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(shared_address(p)));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, accumulating into c.
__device__ __forceinline__ void mma_m16n8k16_f16(float* c, const uint32_t* a, uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float* c, const uint32_t* a, uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// lop3.b32 with the truth table LUT (bit i of LUT is F(a, b, c) for the bits a b c of i >> 2,
// i >> 1 & 1, i & 1: 0xF0, 0xCC and 0xAA are a, b and c themselves).
template <uint8_t LUT>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
}

}  // namespace quantlab::ptx

#endif

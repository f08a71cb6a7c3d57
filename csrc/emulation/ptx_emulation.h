// CPU implementations of csrc/common/ptx.cuh's wrappers, from the PTX ISA's definitions
// (sections "cp.async", "ldmatrix", "mma" with "Matrix Fragments for mma.m16n8k16 with floating
// point type", "lop3"), not from quantlab's own layout code. Included by ptx.cuh when
// QUANTLAB_EMULATION is defined; compiled into the kernels' (sanitized) translation units, so
// the memory the instructions touch is touched in the issuing thread's fiber.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace quantlab::ptx {

namespace detail {

inline void check_shared(const char* op, const void* p, size_t bytes, size_t align) {
  if (!quantlab_emu::is_shared(p, bytes)) {
    quantlab_emu::fail("address space", "%s: %zu bytes at %p are not inside shared memory", op,
                       bytes, p);
  }
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    quantlab_emu::fail("misaligned", "%s: shared address %p is not %zu-byte aligned", op, p,
                       align);
  }
}

inline void check_global(const char* op, const void* p, size_t align) {
  if (quantlab_emu::is_shared(p, 1)) {
    quantlab_emu::fail("address space", "%s: source %p is in shared memory, not global", op, p);
  }
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    quantlab_emu::fail("misaligned", "%s: global address %p is not %zu-byte aligned", op, p,
                       align);
  }
}

// The copy itself, in kernel code: reads of the source and writes of the destination are the
// issuing thread's accesses (the sanitizers see them as such).
inline void perform_copy(const quantlab_emu::PendingCopy& c) {
  auto* dst = static_cast<unsigned char*>(c.dst);
  const auto* src = static_cast<const unsigned char*>(c.src);
  for (uint32_t i = 0; i < c.src_bytes; ++i) dst[i] = src[i];
  for (uint32_t i = c.src_bytes; i < c.bytes; ++i) dst[i] = 0;
}

inline void issue(const char* op, void* dst, const void* src, uint32_t bytes, uint32_t src_bytes) {
  check_shared(op, dst, bytes, bytes);
  if (src_bytes > 0) check_global(op, src, bytes);
  quantlab_emu::cp_async_issue({dst, src, bytes, src_bytes});
}

}  // namespace detail

// The policy is an opaque 64-bit value on the GPU; the CPU has no L2 to steer.
inline uint64_t evict_first_policy() { return 0; }

inline void cp_async_cg16_hint(void* dst, const void* src, uint64_t /*policy*/) {
  detail::issue("cp.async.cg", dst, src, 16, 16);
}

// PTX: src-size (<= cp-size) bytes are read; the rest of the cp-size bytes are zero-filled, and
// with src-size 0 the source is not read at all.
inline void cp_async_cg16_zfill(void* dst, const void* src, int src_bytes) {
  if (src_bytes != 0 && src_bytes != 16) {
    quantlab_emu::fail("cp.async", "cp.async.cg src-size %d (the kernels use 0 or 16)", src_bytes);
  }
  detail::issue("cp.async.cg", dst, src, 16, static_cast<uint32_t>(src_bytes));
}

template <int BYTES>
inline void cp_async_ca(void* dst, const void* src) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async size");
  detail::issue("cp.async.ca", dst, src, BYTES, BYTES);
}

inline void cp_async_commit_group() { quantlab_emu::cp_async_commit(); }

template <int N>
inline void cp_async_wait_group() {
  quantlab_emu::cp_async_wait(N, detail::perform_copy);
}

namespace detail {

// ldmatrix .x4: lane l supplies the address of row l % 8 of matrix l / 8; each lane receives,
// for every matrix j, the 32-bit pair at row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1.
QUANTLAB_EMU_NO_TSAN inline void ldmatrix_combine(const unsigned char (*in)[quantlab_emu::kSlotBytes],
                                                 unsigned char (*out)[quantlab_emu::kSlotBytes],
                                                 unsigned, const void*) {
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t regs[4];
    for (int j = 0; j < 4; ++j) {
      const unsigned char* row = in[8 * j + lane / 4];
      quantlab_emu::copy_bytes(&regs[j], row + 4 * (lane % 4), 4);
    }
    quantlab_emu::copy_bytes(out[lane], regs, sizeof regs);
  }
}

}  // namespace detail

inline void ldmatrix_x4(uint32_t (&a)[4], const void* p) {
  // Each lane reads the 16-byte row it addresses (its own access, in its own fiber).
  detail::check_shared("ldmatrix", p, 16, 16);
  unsigned char row[16];
  const auto* src = static_cast<const unsigned char*>(p);
  for (int i = 0; i < 16; ++i) row[i] = src[i];
  quantlab_emu::warp_collective("ldmatrix.sync.aligned.m8n8.x4", 0xFFFFFFFFu, row, sizeof row, a,
                                sizeof a, detail::ldmatrix_combine, nullptr);
}

namespace detail {

struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

template <typename T>
float element(uint32_t pair, int half) {
  const uint16_t bits = static_cast<uint16_t>(pair >> (16 * half));  // lower index: low half
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(bits));
  } else {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
}

// The fragments of "Matrix Fragments for mma.m16n8k16 with floating point type": with
// group = lane >> 2 and t = lane % 4,
//   A (16x16, row): a_i (two per register) at row group (+8 for i in 2,3,6,7), col 2t + (i & 1)
//                   (+8 for i >= 4);
//   B (16x8, col):  b_i at row (k) 2t + (i & 1) (+8 for i >= 2), col group;
//   C, D (16x8):    c_i at row group (+8 for i >= 2), col 2t + (i & 1).
// D = A B + C with the products exact and the sum rounded once to fp32 (the hardware's internal
// accumulation order is not specified; tests bound errors, they do not compare bit patterns).
template <typename T>
QUANTLAB_EMU_NO_TSAN void mma_combine(const unsigned char (*in)[quantlab_emu::kSlotBytes],
                                     unsigned char (*out)[quantlab_emu::kSlotBytes], unsigned,
                                     const void*) {
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    MmaOperands op;
    quantlab_emu::copy_bytes(&op, in[lane], sizeof op);
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 8; ++i) {
      const int row = g + ((i & 2) ? 8 : 0);
      const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = element<T>(op.a[i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) {
      B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = element<T>(op.b[i / 2], i & 1);
      C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = op.c[i];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    float d[4];
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0);
      const int col = 2 * t + (i & 1);
      double sum = C[row][col];
      for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[row][k]) * B[k][col];
      d[i] = static_cast<float>(sum);
    }
    quantlab_emu::copy_bytes(out[lane], d, sizeof d);
  }
}

template <typename T>
void mma(const char* kind, float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  MmaOperands op;
  std::memcpy(op.a, a, sizeof op.a);
  op.b[0] = b0;
  op.b[1] = b1;
  std::memcpy(op.c, c, sizeof op.c);
  float d[4];
  quantlab_emu::warp_collective(kind, 0xFFFFFFFFu, &op, sizeof op, d, sizeof d, mma_combine<T>,
                                nullptr);
  std::memcpy(c, d, sizeof d);
}

}  // namespace detail

inline void mma_m16n8k16_f16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  detail::mma<__half>("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", c, a, b0, b1);
}

inline void mma_m16n8k16_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  detail::mma<__nv_bfloat16>("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", c, a, b0, b1);
}

// lop3: bit k of the result is bit ((a_k << 2) | (b_k << 1) | c_k) of LUT.
template <uint8_t LUT>
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d = 0;
  for (int k = 0; k < 32; ++k) {
    const unsigned index = ((a >> k & 1u) << 2) | ((b >> k & 1u) << 1) | (c >> k & 1u);
    d |= static_cast<uint32_t>(LUT >> index & 1u) << k;
  }
  return d;
}

}  // namespace quantlab::ptx

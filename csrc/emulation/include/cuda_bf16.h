// The CPU emulation's <cuda_bf16.h>: __nv_bfloat16 / __nv_bfloat162 and the bf16 functions the
// kernels use, with the semantics of the CUDA Math API ("Bfloat16 Precision Intrinsics"), bit
// for bit:
//  - float -> bf16 (__float2bfloat16_rn, __float2bfloat16, the float constructor): round to
//    nearest even, subnormals kept, overflow -> inf, NaN -> the canonical (quiet) NaN 0x7FFF (as
//    cvt.rn.bf16.f32 and CUDA's own host implementation);
//  - bf16 -> float: exact (the 16 bits become the high half of the float; NaN payloads kept);
//  - arithmetic (__hadd, __hsub, __hmul, __hfma and the x2 forms, per lane): the exact result
//    rounded once to bf16 (round to nearest even, subnormals kept), as the hardware's
//    fma.rn.bf16(x2) through which sm_80 implements all four; a NaN result is 0x7FFF.
// Includes cuda_fp16.h (as CUDA's does) for the shared rounding helpers and the CUDA keyword
// macros.
#pragma once

#include <bit>
#include <cstdint>

#include "cuda_fp16.h"
#include "quantlab_emu_vector_types.h"

#define __CUDA_BF16_TYPES_EXIST__ 1

namespace quantlab_emu::fp16_detail {

constexpr uint16_t float_to_bf16_bits(float f) noexcept { return round_double<8, 7>(f); }

constexpr float bf16_bits_to_float(uint16_t b) noexcept {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

inline uint16_t bf16_fma(uint16_t a, uint16_t b, uint16_t c) noexcept {
  return fma_round<8, 7>(bf16_bits_to_float(a), bf16_bits_to_float(b), bf16_bits_to_float(c));
}

}  // namespace quantlab_emu::fp16_detail

// CUDA: a 16-bit storage struct for the raw bits of a __nv_bfloat16 (aggregate, alignment 2).
struct __attribute__((aligned(2))) __nv_bfloat16_raw {
  unsigned short x;
};

// CUDA: two __nv_bfloat16_raw (x: low 16 bits), alignment 4.
struct __attribute__((aligned(4))) __nv_bfloat162_raw {
  unsigned short x;
  unsigned short y;
};

// CUDA: the bf16 type: 16-bit storage, trivially copyable, implicit conversions from and to
// float (as CUDA defines them without __CUDA_NO_BFLOAT16_CONVERSIONS__: round to nearest even /
// exact).
struct __attribute__((aligned(2), may_alias)) __nv_bfloat16 {
  unsigned short __x;

  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) noexcept : __x(r.x) {}
  constexpr __nv_bfloat16(float f) noexcept
      : __x(quantlab_emu::fp16_detail::float_to_bf16_bits(f)) {}
  constexpr __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) noexcept {
    __x = r.x;
    return *this;
  }
  constexpr __nv_bfloat16& operator=(float f) noexcept {
    __x = quantlab_emu::fp16_detail::float_to_bf16_bits(f);
    return *this;
  }
  constexpr operator __nv_bfloat16_raw() const noexcept { return __nv_bfloat16_raw{__x}; }
  constexpr operator float() const noexcept {
    return quantlab_emu::fp16_detail::bf16_bits_to_float(__x);
  }
};

// CUDA: a pair of __nv_bfloat16: .x in the low 16 bits, .y in the high 16 bits; alignment 4.
struct __attribute__((aligned(4), may_alias)) __nv_bfloat162 {
  __nv_bfloat16 x;
  __nv_bfloat16 y;

  __nv_bfloat162() = default;
  constexpr __nv_bfloat162(const __nv_bfloat16& a, const __nv_bfloat16& b) noexcept
      : x(a), y(b) {}
  constexpr __nv_bfloat162(const __nv_bfloat162_raw& r) noexcept
      : x(__nv_bfloat16_raw{r.x}), y(__nv_bfloat16_raw{r.y}) {}
  constexpr __nv_bfloat162& operator=(const __nv_bfloat162_raw& r) noexcept {
    x = __nv_bfloat16_raw{r.x};
    y = __nv_bfloat16_raw{r.y};
    return *this;
  }
  constexpr operator __nv_bfloat162_raw() const noexcept {
    return __nv_bfloat162_raw{x.__x, y.__x};
  }
};

typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

// ---- Conversions ---------------------------------------------------------------------------

// __float2bfloat16: convert a float to bfloat16 in round-to-nearest-even mode.
constexpr __nv_bfloat16 __float2bfloat16(float a) noexcept {
  return __nv_bfloat16_raw{quantlab_emu::fp16_detail::float_to_bf16_bits(a)};
}
// __float2bfloat16_rn: convert a float to bfloat16 in round-to-nearest-even mode.
constexpr __nv_bfloat16 __float2bfloat16_rn(float a) noexcept { return __float2bfloat16(a); }
// __bfloat162float: convert a bfloat16 to a float (exact).
constexpr float __bfloat162float(__nv_bfloat16 a) noexcept {
  return quantlab_emu::fp16_detail::bf16_bits_to_float(a.__x);
}
// __bfloat16_as_ushort: reinterpret the bits of a bfloat16 as an unsigned short.
constexpr unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) noexcept { return h.__x; }
// __ushort_as_bfloat16: reinterpret the bits of an unsigned short as a bfloat16.
constexpr __nv_bfloat16 __ushort_as_bfloat16(unsigned short i) noexcept {
  return __nv_bfloat16_raw{i};
}
// __bfloat16_as_short: reinterpret the bits of a bfloat16 as a signed short.
constexpr short __bfloat16_as_short(__nv_bfloat16 h) noexcept {
  return std::bit_cast<short>(h.__x);
}
// __short_as_bfloat16: reinterpret the bits of a signed short as a bfloat16.
constexpr __nv_bfloat16 __short_as_bfloat16(short i) noexcept {
  return __nv_bfloat16_raw{std::bit_cast<unsigned short>(i)};
}

// make_bfloat162: a __nv_bfloat162 from two bfloat16 (x low, y high).
constexpr __nv_bfloat162 make_bfloat162(__nv_bfloat16 x, __nv_bfloat16 y) noexcept {
  return __nv_bfloat162(x, y);
}
// __halves2bfloat162: combine two bfloat16 into one bfloat162 (a -> low 16 bits, b -> high).
constexpr __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) noexcept {
  return __nv_bfloat162(a, b);
}
// __low2bfloat16: the low 16-bit half of a bfloat162.
constexpr __nv_bfloat16 __low2bfloat16(__nv_bfloat162 a) noexcept { return a.x; }
// __high2bfloat16: the high 16-bit half of a bfloat162.
constexpr __nv_bfloat16 __high2bfloat16(__nv_bfloat162 a) noexcept { return a.y; }
// __floats2bfloat162_rn: convert two floats to bfloat16 in round-to-nearest-even mode
// (a -> low 16 bits, b -> high 16 bits).
constexpr __nv_bfloat162 __floats2bfloat162_rn(float a, float b) noexcept {
  return __nv_bfloat162(__float2bfloat16_rn(a), __float2bfloat16_rn(b));
}
// __float2bfloat162_rn: convert a float to bfloat16 (round to nearest even) into both halves.
constexpr __nv_bfloat162 __float2bfloat162_rn(float a) noexcept {
  return __nv_bfloat162(__float2bfloat16_rn(a), __float2bfloat16_rn(a));
}
// __float22bfloat162_rn: convert a float2 to a bfloat162 in round-to-nearest-even mode.
constexpr __nv_bfloat162 __float22bfloat162_rn(float2 a) noexcept {
  return __floats2bfloat162_rn(a.x, a.y);
}
// __bfloat1622float2: convert both halves of a bfloat162 to a float2 (exact; low -> .x).
constexpr float2 __bfloat1622float2(__nv_bfloat162 a) noexcept {
  return make_float2(__bfloat162float(a.x), __bfloat162float(a.y));
}
// __low2float: convert the low 16 bits of a bfloat162 to float (exact).
constexpr float __low2float(__nv_bfloat162 a) noexcept { return __bfloat162float(a.x); }
// __high2float: convert the high 16 bits of a bfloat162 to float (exact).
constexpr float __high2float(__nv_bfloat162 a) noexcept { return __bfloat162float(a.y); }

// ---- Arithmetic: exact result, one rounding to bf16 (round to nearest even) ----------------

// __hadd: bfloat16 addition in round-to-nearest-even mode.
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) noexcept {
  return __nv_bfloat16_raw{quantlab_emu::fp16_detail::bf16_fma(a.__x, 0x3F80u, b.__x)};
}
// __hsub: bfloat16 subtraction in round-to-nearest-even mode.
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) noexcept {
  return __nv_bfloat16_raw{quantlab_emu::fp16_detail::bf16_fma(b.__x, 0xBF80u, a.__x)};
}
// __hmul: bfloat16 multiplication in round-to-nearest-even mode.
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) noexcept {
  const double x = __bfloat162float(a), y = __bfloat162float(b);
  return __nv_bfloat16_raw{quantlab_emu::fp16_detail::round_double<8, 7>(x * y)};  // exact x * y
}
// __hfma: a * b + c in bfloat16 as a single operation (one rounding, to nearest even).
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) noexcept {
  return __nv_bfloat16_raw{quantlab_emu::fp16_detail::bf16_fma(a.__x, b.__x, c.__x)};
}
// __hneg: negate a bfloat16 (flips the sign bit).
constexpr __nv_bfloat16 __hneg(__nv_bfloat16 a) noexcept {
  return __nv_bfloat16_raw{static_cast<unsigned short>(a.__x ^ 0x8000u)};
}

// __hadd2: bfloat162 vector addition in round-to-nearest-even mode (per lane).
inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) noexcept {
  return __nv_bfloat162(__hadd(a.x, b.x), __hadd(a.y, b.y));
}
// __hsub2: bfloat162 vector subtraction in round-to-nearest-even mode (per lane).
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) noexcept {
  return __nv_bfloat162(__hsub(a.x, b.x), __hsub(a.y, b.y));
}
// __hmul2: bfloat162 vector multiplication in round-to-nearest-even mode (per lane).
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) noexcept {
  return __nv_bfloat162(__hmul(a.x, b.x), __hmul(a.y, b.y));
}
// __hfma2: bfloat162 vector fused multiply-add a * b + c, one rounding per lane.
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) noexcept {
  return __nv_bfloat162(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
// __hneg2: negate both halves of a bfloat162.
constexpr __nv_bfloat162 __hneg2(__nv_bfloat162 a) noexcept {
  return __nv_bfloat162(__hneg(a.x), __hneg(a.y));
}

// ---- Operators (cuda_bf16.hpp: defined through __hadd, __hsub, __hmul, __hneg) -------------
// As in CUDA, mixing a __nv_bfloat16 and a float in one operator is ambiguous: convert first.

inline __nv_bfloat16 operator+(const __nv_bfloat16& a, const __nv_bfloat16& b) noexcept {
  return __hadd(a, b);
}
inline __nv_bfloat16 operator-(const __nv_bfloat16& a, const __nv_bfloat16& b) noexcept {
  return __hsub(a, b);
}
inline __nv_bfloat16 operator*(const __nv_bfloat16& a, const __nv_bfloat16& b) noexcept {
  return __hmul(a, b);
}
inline __nv_bfloat16& operator+=(__nv_bfloat16& a, const __nv_bfloat16& b) noexcept {
  return a = __hadd(a, b);
}
inline __nv_bfloat16& operator-=(__nv_bfloat16& a, const __nv_bfloat16& b) noexcept {
  return a = __hsub(a, b);
}
inline __nv_bfloat16& operator*=(__nv_bfloat16& a, const __nv_bfloat16& b) noexcept {
  return a = __hmul(a, b);
}
constexpr __nv_bfloat16 operator+(const __nv_bfloat16& a) noexcept { return a; }
constexpr __nv_bfloat16 operator-(const __nv_bfloat16& a) noexcept { return __hneg(a); }

inline __nv_bfloat162 operator+(const __nv_bfloat162& a, const __nv_bfloat162& b) noexcept {
  return __hadd2(a, b);
}
inline __nv_bfloat162 operator-(const __nv_bfloat162& a, const __nv_bfloat162& b) noexcept {
  return __hsub2(a, b);
}
inline __nv_bfloat162 operator*(const __nv_bfloat162& a, const __nv_bfloat162& b) noexcept {
  return __hmul2(a, b);
}
inline __nv_bfloat162& operator+=(__nv_bfloat162& a, const __nv_bfloat162& b) noexcept {
  return a = __hadd2(a, b);
}
inline __nv_bfloat162& operator-=(__nv_bfloat162& a, const __nv_bfloat162& b) noexcept {
  return a = __hsub2(a, b);
}
inline __nv_bfloat162& operator*=(__nv_bfloat162& a, const __nv_bfloat162& b) noexcept {
  return a = __hmul2(a, b);
}
constexpr __nv_bfloat162 operator+(const __nv_bfloat162& a) noexcept { return a; }
constexpr __nv_bfloat162 operator-(const __nv_bfloat162& a) noexcept { return __hneg2(a); }

static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "__nv_bfloat16 layout");
static_assert(sizeof(__nv_bfloat162) == 4 && alignof(__nv_bfloat162) == 4, "__nv_bfloat162 layout");

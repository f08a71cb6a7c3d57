// The CPU emulation's <cuda_fp16.h>: __half / __half2 and the fp16 functions the kernels use,
// with the semantics of the CUDA Math API ("Half Precision Intrinsics"), bit for bit:
//  - float -> fp16 (__float2half_rn, __float2half, the float constructor): round to nearest even,
//    subnormal results kept, |x| >= 65520 -> inf, NaN -> the canonical NaN 0x7FFF (what CUDA's
//    own host implementation returns);
//  - fp16 -> float: exact; a NaN becomes the canonical float NaN 0x7FFFFFFF (as CUDA's host
//    implementation);
//  - arithmetic (__hadd, __hsub, __hmul, __hfma and the x2 forms, per lane): the exact result
//    rounded once to fp16 (round to nearest even, subnormals kept, overflow to inf), as the
//    hardware's add/sub/mul/fma.rn.f16(x2); a NaN result is 0x7FFF.
// The rounding helpers are shared with cuda_bf16.h (which includes this header, as CUDA's does).
// Self-contained: no real CUDA header; the CUDA keyword macros are defined if still undefined,
// exactly as the emulation's cuda_runtime.h defines them.
#pragma once

#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif

#include <bit>
#include <cmath>
#include <cstdint>

#include "quantlab_emu_math.h"
#include "quantlab_emu_vector_types.h"

#define __CUDA_FP16_TYPES_EXIST__ 1

namespace quantlab_emu::fp16_detail {

// x rounded to nearest even in the binary format with kExpBits exponent bits and kManBits
// fraction bits (fp16: 5/10, bf16: 8/7), as its 16-bit pattern: subnormal results kept, results
// past the largest finite value -> inf, NaN -> 0x7FFF. Every float is a double, so this is also
// the float conversion.
template <int kExpBits, int kManBits>
constexpr uint16_t round_double(double x) noexcept {
  constexpr uint32_t kInf = ((1u << kExpBits) - 1u) << kManBits;
  constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  const uint64_t u = std::bit_cast<uint64_t>(x);
  const uint32_t sign = static_cast<uint32_t>(u >> 63) << 15;
  const int e = static_cast<int>((u >> 52) & 0x7FF);
  const uint64_t frac = u & ((uint64_t{1} << 52) - 1);
  if (e == 0x7FF) return static_cast<uint16_t>(frac != 0 ? 0x7FFFu : (sign | kInf));
  // |x| < 2^-1022: far below half the smallest subnormal of either format.
  if (e == 0) return static_cast<uint16_t>(sign);
  const int te = e - 1023 + kBias;  // the biased target exponent, if x is normal there
  if (te >= static_cast<int>((1u << kExpBits) - 1u)) return static_cast<uint16_t>(sign | kInf);
  const uint64_t sig = frac | (uint64_t{1} << 52);  // x = sig * 2^(e - 1075)
  // Bits of sig below the target's last place (more below the normal range).
  const int shift = (52 - kManBits) + (te >= 1 ? 0 : 1 - te);
  if (shift > 53) return static_cast<uint16_t>(sign);  // |x| < half the smallest subnormal
  uint64_t q = sig >> shift;
  const uint64_t rem = sig & ((uint64_t{1} << shift) - 1);
  const uint64_t half = uint64_t{1} << (shift - 1);
  if (rem > half || (rem == half && (q & 1u) != 0)) ++q;
  // Normal: q = 2^kManBits + fraction, so (te - 1) << kManBits + q carries into the exponent
  // when rounding reaches the next binade; subnormal: q is the pattern (2^kManBits: min normal).
  const uint64_t r = (te >= 1 ? static_cast<uint64_t>(te - 1) << kManBits : 0) + q;
  if (r >= kInf) return static_cast<uint16_t>(sign | kInf);
  return static_cast<uint16_t>(sign | r);
}

// s + err (the exact sum, err the rounding error of s = fl(p + c) as TwoSum gives it) rounded to
// odd in double: s itself if exact, else the neighbour of the truncation with an odd last bit.
// A later rounding to a format of <= 51 bits of precision is then the correct rounding of the
// exact sum (the round-to-odd property).
inline double to_odd(double s, double err) noexcept {
  if (err == 0.0) return s;  // s != 0 here: a sum that rounds to zero is exact
  uint64_t u = std::bit_cast<uint64_t>(s);
  if ((err < 0.0) != (s < 0.0)) --u;  // |exact| < |s|: truncate to the next double towards 0
  return std::bit_cast<double>(u | 1u);
}

// a * b + c, each a value of the 16-bit format (so a * b is exact in double: <= 22 significant
// bits, exponent >= -266), rounded once to that format.
template <int kExpBits, int kManBits>
inline uint16_t fma_round(double a, double b, double c) noexcept {
  const double p = a * b;  // exact
  const double s = p + c;
  if (!std::isfinite(s)) return round_double<kExpBits, kManBits>(s);  // inf or NaN, exactly
  const double bv = s - p;  // TwoSum (Knuth): err = (p + c) - s exactly
  const double err = (p - (s - bv)) + (c - bv);
  return round_double<kExpBits, kManBits>(to_odd(s, err));
}

constexpr uint16_t float_to_half_bits(float f) noexcept { return round_double<5, 10>(f); }

// fp16 bits -> float: exact (subnormals scaled exactly), NaN -> 0x7FFFFFFF.
constexpr float half_bits_to_float(uint16_t h) noexcept {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  if (e == 0x1F) return std::bit_cast<float>(m != 0 ? 0x7FFFFFFFu : (sign | 0x7F800000u));
  if (e == 0) {
    const float mag = static_cast<float>(m) * 0x1p-24f;  // exact: m < 2^10
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(mag));
  }
  return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t half_fma(uint16_t a, uint16_t b, uint16_t c) noexcept {
  return fma_round<5, 10>(half_bits_to_float(a), half_bits_to_float(b), half_bits_to_float(c));
}

}  // namespace quantlab_emu::fp16_detail

// CUDA: a 16-bit storage struct for the raw bits of a __half (aggregate, alignment 2).
struct __attribute__((aligned(2))) __half_raw {
  unsigned short x;
};

// CUDA: two __half_raw (x: low 16 bits), alignment 4.
struct __attribute__((aligned(4))) __half2_raw {
  unsigned short x;
  unsigned short y;
};

// CUDA: the fp16 type: 16-bit storage, trivially copyable, implicit conversions from and to float
// (as CUDA defines them without __CUDA_NO_HALF_CONVERSIONS__: round to nearest even / exact).
struct __attribute__((aligned(2), may_alias)) __half {
  unsigned short __x;

  __half() = default;
  constexpr __half(const __half_raw& r) noexcept : __x(r.x) {}
  constexpr __half(float f) noexcept : __x(quantlab_emu::fp16_detail::float_to_half_bits(f)) {}
  constexpr __half& operator=(const __half_raw& r) noexcept {
    __x = r.x;
    return *this;
  }
  constexpr __half& operator=(float f) noexcept {
    __x = quantlab_emu::fp16_detail::float_to_half_bits(f);
    return *this;
  }
  constexpr operator __half_raw() const noexcept { return __half_raw{__x}; }
  constexpr operator float() const noexcept {
    return quantlab_emu::fp16_detail::half_bits_to_float(__x);
  }
};

// CUDA: a pair of __half: .x in the low 16 bits, .y in the high 16 bits; alignment 4.
struct __attribute__((aligned(4), may_alias)) __half2 {
  __half x;
  __half y;

  __half2() = default;
  constexpr __half2(const __half& a, const __half& b) noexcept : x(a), y(b) {}
  constexpr __half2(const __half2_raw& r) noexcept : x(__half_raw{r.x}), y(__half_raw{r.y}) {}
  constexpr __half2& operator=(const __half2_raw& r) noexcept {
    x = __half_raw{r.x};
    y = __half_raw{r.y};
    return *this;
  }
  constexpr operator __half2_raw() const noexcept { return __half2_raw{x.__x, y.__x}; }
};

typedef __half half;
typedef __half2 half2;

// ---- Conversions ---------------------------------------------------------------------------

// __float2half: convert a float to half precision in round-to-nearest-even mode.
constexpr __half __float2half(float a) noexcept {
  return __half_raw{quantlab_emu::fp16_detail::float_to_half_bits(a)};
}
// __float2half_rn: convert a float to half precision in round-to-nearest-even mode.
constexpr __half __float2half_rn(float a) noexcept { return __float2half(a); }
// __half2float: convert a half to a float (exact).
constexpr float __half2float(__half a) noexcept {
  return quantlab_emu::fp16_detail::half_bits_to_float(a.__x);
}
// __half_as_ushort: reinterpret the bits of a half as an unsigned short.
constexpr unsigned short __half_as_ushort(__half h) noexcept { return h.__x; }
// __ushort_as_half: reinterpret the bits of an unsigned short as a half.
constexpr __half __ushort_as_half(unsigned short i) noexcept { return __half_raw{i}; }
// __half_as_short: reinterpret the bits of a half as a signed short.
constexpr short __half_as_short(__half h) noexcept { return std::bit_cast<short>(h.__x); }
// __short_as_half: reinterpret the bits of a signed short as a half.
constexpr __half __short_as_half(short i) noexcept {
  return __half_raw{std::bit_cast<unsigned short>(i)};
}

// make_half2: a __half2 from two halves (x low, y high).
constexpr __half2 make_half2(__half x, __half y) noexcept { return __half2(x, y); }
// __halves2half2: combine two halves into one half2 (a -> low 16 bits, b -> high 16 bits).
constexpr __half2 __halves2half2(__half a, __half b) noexcept { return __half2(a, b); }
// __low2half: the low 16-bit half of a half2.
constexpr __half __low2half(__half2 a) noexcept { return a.x; }
// __high2half: the high 16-bit half of a half2.
constexpr __half __high2half(__half2 a) noexcept { return a.y; }
// __floats2half2_rn: convert two floats to half precision in round-to-nearest-even mode
// (a -> low 16 bits, b -> high 16 bits).
constexpr __half2 __floats2half2_rn(float a, float b) noexcept {
  return __half2(__float2half_rn(a), __float2half_rn(b));
}
// __float2half2_rn: convert a float to half precision (round to nearest even) into both halves.
constexpr __half2 __float2half2_rn(float a) noexcept {
  return __half2(__float2half_rn(a), __float2half_rn(a));
}
// __float22half2_rn: convert a float2 to a half2 in round-to-nearest-even mode (.x low, .y high).
constexpr __half2 __float22half2_rn(float2 a) noexcept { return __floats2half2_rn(a.x, a.y); }
// __half22float2: convert both halves of a half2 to a float2 (exact; low -> .x, high -> .y).
constexpr float2 __half22float2(__half2 a) noexcept {
  return make_float2(__half2float(a.x), __half2float(a.y));
}
// __low2float: convert the low 16 bits of a half2 to float (exact).
constexpr float __low2float(__half2 a) noexcept { return __half2float(a.x); }
// __high2float: convert the high 16 bits of a half2 to float (exact).
constexpr float __high2float(__half2 a) noexcept { return __half2float(a.y); }

// ---- Arithmetic: exact result, one rounding to fp16 (round to nearest even) ----------------

// __hadd: half addition in round-to-nearest-even mode.
inline __half __hadd(__half a, __half b) noexcept {
  return __half_raw{quantlab_emu::fp16_detail::half_fma(a.__x, 0x3C00u, b.__x)};  // a * 1 + b
}
// __hsub: half subtraction in round-to-nearest-even mode.
inline __half __hsub(__half a, __half b) noexcept {
  return __half_raw{quantlab_emu::fp16_detail::half_fma(b.__x, 0xBC00u, a.__x)};  // b * -1 + a
}
// __hmul: half multiplication in round-to-nearest-even mode.
inline __half __hmul(__half a, __half b) noexcept {
  const double x = __half2float(a), y = __half2float(b);
  return __half_raw{quantlab_emu::fp16_detail::round_double<5, 10>(x * y)};  // x * y: exact
}
// __hfma: a * b + c in half precision as a single operation (one rounding, to nearest even).
inline __half __hfma(__half a, __half b, __half c) noexcept {
  return __half_raw{quantlab_emu::fp16_detail::half_fma(a.__x, b.__x, c.__x)};
}
// __hneg: negate a half (flips the sign bit).
constexpr __half __hneg(__half a) noexcept {
  return __half_raw{static_cast<unsigned short>(a.__x ^ 0x8000u)};
}

// __hadd2: half2 vector addition in round-to-nearest-even mode (per lane).
inline __half2 __hadd2(__half2 a, __half2 b) noexcept {
  return __half2(__hadd(a.x, b.x), __hadd(a.y, b.y));
}
// __hsub2: half2 vector subtraction in round-to-nearest-even mode (per lane).
inline __half2 __hsub2(__half2 a, __half2 b) noexcept {
  return __half2(__hsub(a.x, b.x), __hsub(a.y, b.y));
}
// __hmul2: half2 vector multiplication in round-to-nearest-even mode (per lane).
inline __half2 __hmul2(__half2 a, __half2 b) noexcept {
  return __half2(__hmul(a.x, b.x), __hmul(a.y, b.y));
}
// __hfma2: half2 vector fused multiply-add a * b + c, one rounding per lane (to nearest even).
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) noexcept {
  return __half2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
// __hneg2: negate both halves of a half2.
constexpr __half2 __hneg2(__half2 a) noexcept { return __half2(__hneg(a.x), __hneg(a.y)); }

// ---- Operators (cuda_fp16.hpp: defined through __hadd, __hsub, __hmul, __hneg) -------------
// As in CUDA, mixing a __half and a float in one operator is ambiguous (the built-in float
// operator through operator float() vs these through the float constructor): convert first.

inline __half operator+(const __half& a, const __half& b) noexcept { return __hadd(a, b); }
inline __half operator-(const __half& a, const __half& b) noexcept { return __hsub(a, b); }
inline __half operator*(const __half& a, const __half& b) noexcept { return __hmul(a, b); }
inline __half& operator+=(__half& a, const __half& b) noexcept { return a = __hadd(a, b); }
inline __half& operator-=(__half& a, const __half& b) noexcept { return a = __hsub(a, b); }
inline __half& operator*=(__half& a, const __half& b) noexcept { return a = __hmul(a, b); }
constexpr __half operator+(const __half& a) noexcept { return a; }
constexpr __half operator-(const __half& a) noexcept { return __hneg(a); }

inline __half2 operator+(const __half2& a, const __half2& b) noexcept { return __hadd2(a, b); }
inline __half2 operator-(const __half2& a, const __half2& b) noexcept { return __hsub2(a, b); }
inline __half2 operator*(const __half2& a, const __half2& b) noexcept { return __hmul2(a, b); }
inline __half2& operator+=(__half2& a, const __half2& b) noexcept { return a = __hadd2(a, b); }
inline __half2& operator-=(__half2& a, const __half2& b) noexcept { return a = __hsub2(a, b); }
inline __half2& operator*=(__half2& a, const __half2& b) noexcept { return a = __hmul2(a, b); }
constexpr __half2 operator+(const __half2& a) noexcept { return a; }
constexpr __half2 operator-(const __half2& a) noexcept { return __hneg2(a); }

static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half layout");
static_assert(sizeof(__half2) == 4 && alignof(__half2) == 4, "__half2 layout");

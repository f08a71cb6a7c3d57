// The CPU emulation's CUDA device math: the single-precision intrinsics with an explicit rounding
// mode, the integer intrinsics, min/max and the few <math.h> functions the kernels call
// unqualified. Each function implements the semantics the CUDA Math API documents (cited in the
// one-line comment above it); where CUDA leaves a result implementation-defined, the comment
// says what the PTX instruction the intrinsic compiles to does.
//
// Floating point: every float operation here is one IEEE binary32 operation rounded to nearest
// even, as on the GPU (no flush-to-zero: the kernels are built without -ftz / --use_fast_math,
// so subnormals are kept, as the CPU's SSE arithmetic keeps them). That needs
//  - no x87: excess precision would round twice (checked below: FLT_EVAL_METHOD must be 0,
//    which it is on x86-64 (SSE) and aarch64);
//  - no contraction: CUDA never fuses __fmul_rn / __fadd_rn / __fsub_rn into an FMA, while a
//    compiler allowed to contract (-ffp-contract=fast with FMA hardware) would fuse
//    `__fmul_rn(a, b) + c`. The emulation build passes -ffp-contract=off; on top of that the
//    operands and results of those intrinsics pass through an empty asm (QUANTLAB_EMU_FP_OPAQUE),
//    which no optimisation can see through, so they stay separately rounded under any flags.
//  - the default rounding mode (round to nearest even): nothing in the emulation changes it.
// Self-contained: needs no CUDA header and none of the CUDA keyword macros.
#pragma once

#include <math.h>  // libstdc++'s: ::fminf, ::fmaxf, ::fabsf, ::sqrtf and `using std::isfinite`

#include <bit>
#include <climits>
#include <cmath>
#include <cstdint>

#include "quantlab_emu_vector_types.h"

#if defined(__FLT_EVAL_METHOD__) && __FLT_EVAL_METHOD__ != 0
#error "quantlab emulation: float arithmetic must be IEEE binary32 (FLT_EVAL_METHOD 0, no x87)"
#endif

#if defined(__x86_64__) || (defined(__i386__) && defined(__SSE_MATH__))
#define QUANTLAB_EMU_FP_OPAQUE(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__)
#define QUANTLAB_EMU_FP_OPAQUE(v) __asm__("" : "+w"(v))
#else
#define QUANTLAB_EMU_FP_OPAQUE(v) __asm__("" : "+m"(v))
#endif

// ---- Single-precision intrinsics (CUDA Math API, "Single Precision Intrinsics") ------------

// __fadd_rn: add two floating-point values in round-to-nearest-even mode (never fused to FMA).
inline float __fadd_rn(float x, float y) {
  QUANTLAB_EMU_FP_OPAQUE(x);
  QUANTLAB_EMU_FP_OPAQUE(y);
  float r = x + y;
  QUANTLAB_EMU_FP_OPAQUE(r);
  return r;
}

// __fsub_rn: subtract two floating-point values in round-to-nearest-even mode (never fused).
inline float __fsub_rn(float x, float y) {
  QUANTLAB_EMU_FP_OPAQUE(x);
  QUANTLAB_EMU_FP_OPAQUE(y);
  float r = x - y;
  QUANTLAB_EMU_FP_OPAQUE(r);
  return r;
}

// __fmul_rn: multiply two floating-point values in round-to-nearest-even mode (never fused).
inline float __fmul_rn(float x, float y) {
  QUANTLAB_EMU_FP_OPAQUE(x);
  QUANTLAB_EMU_FP_OPAQUE(y);
  float r = x * y;
  QUANTLAB_EMU_FP_OPAQUE(r);
  return r;
}

// __fdiv_rn: divide two floating-point values in round-to-nearest-even mode (IEEE-correct x / y).
inline float __fdiv_rn(float x, float y) {
  QUANTLAB_EMU_FP_OPAQUE(x);
  QUANTLAB_EMU_FP_OPAQUE(y);
  float r = x / y;
  QUANTLAB_EMU_FP_OPAQUE(r);
  return r;
}

// __frcp_rn: compute 1/x in round-to-nearest-even mode (IEEE-correct).
inline float __frcp_rn(float x) { return __fdiv_rn(1.0f, x); }

// __fsqrt_rn: compute sqrt(x) in round-to-nearest-even mode (IEEE-correct; sqrt(-x) is NaN).
inline float __fsqrt_rn(float x) {
  QUANTLAB_EMU_FP_OPAQUE(x);
  float r = std::sqrt(x);
  QUANTLAB_EMU_FP_OPAQUE(r);
  return r;
}

// __fmaf_rn: compute x * y + z as a single operation, in round-to-nearest-even mode.
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }

// __float2int_rn: convert a float to a signed integer in round-to-nearest-even mode
// (PTX cvt.rni.s32.f32: out-of-range values saturate to INT_MIN / INT_MAX, NaN converts to 0).
inline int __float2int_rn(float x) {
  if (std::isnan(x)) return 0;
  if (x >= 2147483648.0f) return INT_MAX;
  if (x <= -2147483648.0f) return INT_MIN;
  // |x| < 2^31: the truncation and the fraction are exact; ties go to the even neighbour.
  const float t = std::trunc(x);
  const float frac = x - t;
  long long r = static_cast<long long>(t);
  if (frac > 0.5f || (frac == 0.5f && (r & 1))) ++r;
  if (frac < -0.5f || (frac == -0.5f && (r & 1))) --r;
  return static_cast<int>(r);
}

// __int_as_float: reinterpret bits in an integer as a float.
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
// __float_as_int: reinterpret bits in a float as a signed integer.
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
// __uint_as_float: reinterpret bits in an unsigned integer as a float.
inline float __uint_as_float(unsigned int x) { return std::bit_cast<float>(x); }
// __float_as_uint: reinterpret bits in a float as an unsigned integer.
inline unsigned int __float_as_uint(float x) { return std::bit_cast<unsigned int>(x); }
// __longlong_as_double: reinterpret bits in a 64-bit signed integer as a double.
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
// __double_as_longlong: reinterpret bits in a double as a 64-bit signed integer.
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }

// ---- Integer intrinsics (CUDA Math API, "Integer Intrinsics") -------------------------------

// __dp4a(int, int, int): four-way signed int8 dot product with int32 accumulate: the four bytes
// of srcA and of srcB as signed 8-bit integers, sum_i a_i * b_i + c (wrapping modulo 2^32).
inline int __dp4a(int srcA, int srcB, int c) {
  uint32_t acc = static_cast<uint32_t>(c);
  for (int i = 0; i < 4; ++i) {
    const int a = static_cast<int8_t>(static_cast<uint32_t>(srcA) >> (8 * i));
    const int b = static_cast<int8_t>(static_cast<uint32_t>(srcB) >> (8 * i));
    acc += static_cast<uint32_t>(a * b);
  }
  return static_cast<int>(acc);
}

// __dp4a(unsigned, unsigned, unsigned): four-way unsigned int8 dot product with unsigned int32
// accumulate: the four bytes as unsigned 8-bit integers, sum_i a_i * b_i + c (modulo 2^32).
inline unsigned int __dp4a(unsigned int srcA, unsigned int srcB, unsigned int c) {
  uint32_t acc = c;
  for (int i = 0; i < 4; ++i) acc += ((srcA >> (8 * i)) & 0xFFu) * ((srcB >> (8 * i)) & 0xFFu);
  return acc;
}

// __dp4a(char4, char4, int): as __dp4a(int, int, int) with the components as the bytes (x lowest).
inline int __dp4a(char4 srcA, char4 srcB, int c) {
  return __dp4a(std::bit_cast<int>(srcA), std::bit_cast<int>(srcB), c);
}

// __dp4a(uchar4, uchar4, unsigned): as __dp4a(unsigned, unsigned, unsigned) on the components.
inline unsigned int __dp4a(uchar4 srcA, uchar4 srcB, unsigned int c) {
  return __dp4a(std::bit_cast<unsigned int>(srcA), std::bit_cast<unsigned int>(srcB), c);
}

// __funnelshift_l: shift the 64-bit value hi:lo left by (shift & 31) bits; return the most
// significant 32 bits (the "wrap" mode: only the low 5 bits of shift are used).
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned int>((v << (shift & 31u)) >> 32);
}

// __funnelshift_lc: shift hi:lo left by min(shift, 32) bits; return the most significant 32 bits.
inline unsigned int __funnelshift_lc(unsigned int lo, unsigned int hi, unsigned int shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned int>((v << (shift < 32u ? shift : 32u)) >> 32);
}

// __funnelshift_r: shift the 64-bit value hi:lo right by (shift & 31) bits; return the least
// significant 32 bits (the "wrap" mode: only the low 5 bits of shift are used).
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned int>(v >> (shift & 31u));
}

// __funnelshift_rc: shift hi:lo right by min(shift, 32) bits; return the least significant 32 bits.
inline unsigned int __funnelshift_rc(unsigned int lo, unsigned int hi, unsigned int shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned int>(v >> (shift < 32u ? shift : 32u));
}

// __byte_perm(x, y, s): byte n of the result is input[s<4n+2:4n>], where input[0..3] are the
// bytes of x and input[4..7] those of y (least significant first); the upper 16 bits of s and
// bit 3 of each selector nibble are not used.
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const uint64_t input = (static_cast<uint64_t>(y) << 32) | x;
  unsigned int r = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned int sel = (s >> (4 * n)) & 7u;
    r |= static_cast<unsigned int>((input >> (8 * sel)) & 0xFFu) << (8 * n);
  }
  return r;
}

// __popc: count the number of bits that are set to 1 in a 32-bit integer.
inline int __popc(unsigned int x) { return std::popcount(x); }
// __popcll: count the number of bits that are set to 1 in a 64-bit integer.
inline int __popcll(unsigned long long x) { return std::popcount(x); }
// __clz: the number of consecutive high-order zero bits in a 32-bit integer (32 for 0).
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned int>(x)); }
// __clzll: the number of consecutive high-order zero bits in a 64-bit integer (64 for 0).
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
// __ffs: the position (1 = least significant) of the least significant bit set in x; 0 for 0.
inline int __ffs(int x) { return __builtin_ffs(x); }
// __ffsll: the position of the least significant bit set in a 64-bit integer; 0 for 0.
inline int __ffsll(long long x) { return __builtin_ffsll(x); }

// ---- min / max (CUDA Math API: the overloads of crt/math_functions.hpp) ---------------------
// CUDA's set: (int, int), (unsigned, unsigned), (int, unsigned) and (unsigned, int) -> unsigned,
// the same for long / unsigned long and long long / unsigned long long, (float, float),
// (double, double), (float, double) and (double, float) -> double. The integer mixes of an int
// with a wider type (which would be ambiguous in that set) are added as widening overloads, so
// that `min(int, int64_t)` compiles and means what it says. Floating-point min/max are fminf /
// fmin (a NaN operand yields the other operand).
#define QUANTLAB_EMU_MINMAX(R, A, B)                     \
  inline R min(A a, B b) {                               \
    const R x = static_cast<R>(a), y = static_cast<R>(b); \
    return y < x ? y : x;                                \
  }                                                      \
  inline R max(A a, B b) {                               \
    const R x = static_cast<R>(a), y = static_cast<R>(b); \
    return y > x ? y : x;                                \
  }
QUANTLAB_EMU_MINMAX(int, int, int)
QUANTLAB_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
QUANTLAB_EMU_MINMAX(unsigned int, int, unsigned int)
QUANTLAB_EMU_MINMAX(unsigned int, unsigned int, int)
QUANTLAB_EMU_MINMAX(long, long, long)
QUANTLAB_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
QUANTLAB_EMU_MINMAX(unsigned long, long, unsigned long)
QUANTLAB_EMU_MINMAX(unsigned long, unsigned long, long)
QUANTLAB_EMU_MINMAX(long long, long long, long long)
QUANTLAB_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
QUANTLAB_EMU_MINMAX(unsigned long long, long long, unsigned long long)
QUANTLAB_EMU_MINMAX(unsigned long long, unsigned long long, long long)
// Widening mixes (not in CUDA's set): an int or unsigned with a 64-bit type of the same signedness.
QUANTLAB_EMU_MINMAX(long, int, long)
QUANTLAB_EMU_MINMAX(long, long, int)
QUANTLAB_EMU_MINMAX(long long, int, long long)
QUANTLAB_EMU_MINMAX(long long, long long, int)
QUANTLAB_EMU_MINMAX(unsigned long, unsigned int, unsigned long)
QUANTLAB_EMU_MINMAX(unsigned long, unsigned long, unsigned int)
QUANTLAB_EMU_MINMAX(unsigned long long, unsigned int, unsigned long long)
QUANTLAB_EMU_MINMAX(unsigned long long, unsigned long long, unsigned int)
#undef QUANTLAB_EMU_MINMAX
inline float min(float a, float b) { return ::fminf(a, b); }
inline float max(float a, float b) { return ::fmaxf(a, b); }
inline double min(double a, double b) { return ::fmin(a, b); }
inline double max(double a, double b) { return ::fmax(a, b); }
inline double min(float a, double b) { return ::fmin(a, b); }
inline double max(float a, double b) { return ::fmax(a, b); }
inline double min(double a, float b) { return ::fmin(a, b); }
inline double max(double a, float b) { return ::fmax(a, b); }

// ---- <math.h> functions the kernels call unqualified ----------------------------------------
// fminf / fmaxf (the other operand if one is NaN), fabsf, sqrtf (IEEE-correct, as CUDA's
// default -prec-sqrt=true) and isfinite come from <math.h> into the global namespace.

// rsqrtf: 1 / sqrt(x) (CUDA documents a maximum error of 2 ulp; here 1.0f / sqrtf(x), within it
// but not the hardware's MUFU.RSQ bit pattern).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

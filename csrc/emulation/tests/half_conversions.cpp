// Checks of the CPU emulation's cuda_fp16.h, cuda_bf16.h, quantlab_emu_math.h and
// quantlab_emu_vector_types.h against references written independently of them (plain double
// arithmetic, std::nearbyint under FE_TONEAREST, exact integer arithmetic).
//
//   half_conversions                      run every check; print "ok" and exit 0, or print the
//                                         first mismatch and exit 1
//   half_conversions --dump-half2float F  write __half2float of all 65536 fp16 patterns to F
//   half_conversions --dump-bf162float F  the same for __bfloat162float
//   half_conversions --float2half IN OUT  read float32s from IN, write __float2half_rn's bits
//   half_conversions --float2bf16 IN OUT  the same for __float2bfloat16_rn
// (binary files in the machine's byte order; tests/emulation/test_half_types.py compares them
// with numpy and torch.)
//
// Build: g++ -std=c++20 -O1 -ffp-contract=off -I csrc/emulation/include half_conversions.cpp
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <bit>
#include <cfenv>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "quantlab_emu_math.h"
#include "quantlab_emu_vector_types.h"

namespace {

[[noreturn]] __attribute__((format(printf, 1, 2))) void mismatch(const char* fmt, ...) {
  std::printf("MISMATCH: ");
  va_list args;
  va_start(args, fmt);
  std::vprintf(fmt, args);
  va_end(args);
  std::printf("\n");
  std::fflush(stdout);
  std::exit(1);
}

// splitmix64: a fixed, portable pseudo-random sequence.
struct Rng {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint32_t u32() { return static_cast<uint32_t>(next() >> 32); }
  uint16_t u16() { return static_cast<uint16_t>(next() >> 48); }
  int below(int n) { return static_cast<int>(next() % static_cast<uint64_t>(n)); }
};

uint32_t bits_of(float f) { return std::bit_cast<uint32_t>(f); }
float float_of(uint32_t u) { return std::bit_cast<float>(u); }

// ---- Reference 16-bit formats (independent of the headers) ---------------------------------

struct Fmt {
  const char* name;
  int man;    // fraction bits
  int emin;   // exponent of the smallest normal
  int emax;   // exponent of the largest finite
  int bias;
  uint16_t inf;
};
constexpr Fmt kF16{"fp16", 10, -14, 15, 15, 0x7C00};
constexpr Fmt kBF16{"bf16", 7, -126, 127, 127, 0x7F80};

bool is_nan16(uint16_t bits, const Fmt& f) { return (bits & 0x7FFF) > f.inf; }

// The value of a 16-bit pattern.
double ref_value(uint16_t bits, const Fmt& f) {
  const int exp_field = (bits & 0x7FFF) >> f.man;
  const int frac = bits & ((1 << f.man) - 1);
  const double sign = (bits & 0x8000) ? -1.0 : 1.0;
  if ((bits & 0x7FFF) >= f.inf) return frac != 0 ? std::nan("") : sign * INFINITY;
  if (exp_field == 0) return sign * std::ldexp(frac, f.emin - f.man);
  return sign * std::ldexp((1 << f.man) + frac, exp_field - f.bias - f.man);
}

// x rounded to nearest even in format f: scale by the last place, std::nearbyint (FE_TONEAREST),
// and encode the result. NaN -> 0x7FFF (CUDA's canonical NaN).
uint16_t ref_round(double x, const Fmt& f) {
  if (std::isnan(x)) return 0x7FFF;
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(x);
  if (std::isinf(a)) return sign | f.inf;
  if (a == 0.0) return sign;
  int ex = 0;
  std::frexp(a, &ex);
  const int e = std::max(ex - 1, f.emin);  // a in [2^(ex-1), 2^ex)
  const double ulp = std::ldexp(1.0, e - f.man);
  const double q = std::nearbyint(a / ulp);  // a / ulp is exact (a power-of-two scaling)
  const double r = q * ulp;
  if (r >= std::ldexp(1.0, f.emax + 1)) return sign | f.inf;
  if (r < std::ldexp(1.0, f.emin)) return sign | static_cast<uint16_t>(q);  // subnormal or 0
  int rex = 0;
  std::frexp(r, &rex);
  const int re = rex - 1;
  const double frac = r / std::ldexp(1.0, re - f.man) - std::ldexp(1.0, f.man);
  return sign | static_cast<uint16_t>((re + f.bias) << f.man) | static_cast<uint16_t>(frac);
}

// ---- Exact reference for a * b + c (integer arithmetic) ------------------------------------

struct Term {
  bool neg;
  uint64_t mant;  // value = (neg ? -1 : 1) * mant * 2^exp; mant == 0: a zero
  int exp;
};

Term decompose(uint16_t bits, const Fmt& f) {
  const int exp_field = (bits & 0x7FFF) >> f.man;
  const uint64_t frac = bits & ((1u << f.man) - 1);
  Term t{(bits & 0x8000) != 0, frac, f.emin - f.man};
  if (exp_field != 0) t = {t.neg, frac | (uint64_t{1} << f.man), exp_field - f.bias - f.man};
  return t;
}

int bit_length(unsigned __int128 v) {
  const auto hi = static_cast<uint64_t>(v >> 64), lo = static_cast<uint64_t>(v);
  return hi != 0 ? 128 - __builtin_clzll(hi) : lo != 0 ? 64 - __builtin_clzll(lo) : 0;
}

// N * 2^L (N != 0) rounded to nearest even in f.
uint16_t round_scaled(__int128 n, int lsb, const Fmt& f) {
  const bool neg = n < 0;
  const unsigned __int128 a = neg ? -static_cast<unsigned __int128>(n) : n;
  const int top = lsb + bit_length(a) - 1;
  const int e = std::max(top, f.emin);
  const int k = (e - f.man) - lsb;  // low bits below the last place
  unsigned __int128 q = 0;
  if (k <= 0) {
    q = a << -k;
  } else if (k < 128) {
    q = a >> k;
    const unsigned __int128 rem = a & ((static_cast<unsigned __int128>(1) << k) - 1);
    const unsigned __int128 half = static_cast<unsigned __int128>(1) << (k - 1);
    if (rem > half || (rem == half && (q & 1) != 0)) ++q;
  }
  const double r = std::ldexp(static_cast<double>(q), e - f.man);  // q <= 2^(man+1): exact
  return static_cast<uint16_t>(ref_round(r, f) | (neg ? 0x8000 : 0));
}

// The exact a * b + c rounded once to f.
uint16_t ref_fma(uint16_t a, uint16_t b, uint16_t c, const Fmt& f) {
  const double da = ref_value(a, f), db = ref_value(b, f), dc = ref_value(c, f);
  if (!std::isfinite(da) || !std::isfinite(db) || !std::isfinite(dc)) {
    return ref_round(std::fma(da, db, dc), f);  // inf or NaN: no rounding involved
  }
  const Term ta = decompose(a, f), tb = decompose(b, f);
  const Term p{ta.neg != tb.neg, ta.mant * tb.mant, ta.exp + tb.exp};
  const Term t = decompose(c, f);
  if (p.mant == 0 && t.mant == 0) return (p.neg && t.neg) ? 0x8000 : 0;  // IEEE zero sums
  if (p.mant == 0) return c;
  if (t.mant == 0) return round_scaled(p.neg ? -static_cast<__int128>(p.mant) : p.mant, p.exp, f);
  auto top = [](const Term& x) { return x.exp + bit_length(x.mant) - 1; };
  const Term& big = top(p) >= top(t) ? p : t;
  const Term& small = top(p) >= top(t) ? t : p;
  // A frame 100 bits below the larger term's top: the larger term is exact there (and even);
  // the smaller one is exact or truncated with a sticky last bit (round to odd), which keeps
  // every rounding decision at the >= 2 bits coarser last place of the result.
  const int lsb = top(big) - 100;
  const __int128 nb = static_cast<__int128>(big.mant) << (big.exp - lsb);
  __int128 ns = 0;
  if (small.exp >= lsb) {
    ns = static_cast<__int128>(small.mant) << (small.exp - lsb);
  } else {
    const int d = lsb - small.exp;
    const uint64_t trunc = d >= 64 ? 0 : small.mant >> d;
    const bool sticky = d >= 64 ? small.mant != 0 : (small.mant & ((uint64_t{1} << d) - 1)) != 0;
    ns = static_cast<__int128>(trunc | (sticky ? 1u : 0u));
  }
  const __int128 n = (big.neg ? -nb : nb) + (small.neg ? -ns : ns);
  if (n == 0) return 0;  // exact cancellation: +0 in round-to-nearest
  return round_scaled(n, lsb, f);
}

// ---- Checks ----------------------------------------------------------------------------------

void check_layout() {
  static_assert(sizeof(__half) == 2 && alignof(__half) == 2);
  static_assert(sizeof(__half2) == 4 && alignof(__half2) == 4);
  static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2);
  static_assert(sizeof(__nv_bfloat162) == 4 && alignof(__nv_bfloat162) == 4);
  static_assert(std::is_same_v<half, __half> && std::is_same_v<half2, __half2>);
  static_assert(std::is_trivially_copyable_v<__half> && std::is_trivially_copyable_v<__half2>);
  static_assert(std::is_trivially_copyable_v<__nv_bfloat16>);
  static_assert(std::is_trivially_copyable_v<__nv_bfloat162>);
  static_assert(std::is_trivially_default_constructible_v<__half>);
  static_assert(std::is_trivially_default_constructible_v<__nv_bfloat162>);
  static_assert(std::is_standard_layout_v<__half2> && std::is_standard_layout_v<__nv_bfloat162>);
  // CUDA's vector type sizes and alignments (vector_types.h).
  static_assert(sizeof(char2) == 2 && alignof(char2) == 2 && alignof(uchar4) == 4);
  static_assert(alignof(short2) == 4 && alignof(ushort4) == 8 && alignof(short3) == 2);
  static_assert(sizeof(int2) == 8 && alignof(int2) == 8 && alignof(uint2) == 8);
  static_assert(sizeof(int3) == 12 && alignof(int3) == 4 && sizeof(uint3) == 12);
  static_assert(sizeof(int4) == 16 && alignof(int4) == 16 && alignof(uint4) == 16);
  static_assert(sizeof(float2) == 8 && alignof(float2) == 8 && alignof(float3) == 4);
  static_assert(sizeof(float4) == 16 && alignof(float4) == 16);
  static_assert(sizeof(double2) == 16 && alignof(double2) == 16 && alignof(double4) == 16);
  static_assert(alignof(long2) == 16 && alignof(longlong2) == 16 && alignof(ulonglong4) == 16);
  static_assert(std::is_trivially_copyable_v<uint4> && std::is_aggregate_v<uint4>);
  constexpr uint4 u4 = make_uint4(1, 2, 3, 4);
  static_assert(u4.x == 1 && u4.y == 2 && u4.z == 3 && u4.w == 4);
  constexpr int4 i4 = make_int4(-1, 2, -3, 4);
  static_assert(i4.x == -1 && i4.w == 4);
  constexpr float2 f2 = make_float2(1.5f, -2.0f);
  static_assert(f2.x == 1.5f && f2.y == -2.0f);
  static_assert(make_uint2(7, 8).y == 8 && make_float4(1, 2, 3, 4).w == 4.0f);
  // constexpr conversions
  constexpr __half one = 1.0f;
  static_assert(__half_as_ushort(one) == 0x3C00);
  static_assert(__half2float(__ushort_as_half(0x0001)) == 0x1p-24f);
  static_assert(__bfloat16_as_ushort(__float2bfloat16_rn(1.0f)) == 0x3F80);

  // __half2: .x is the low 16 bits.
  const __half2 h2 = __halves2half2(__ushort_as_half(0x1111), __ushort_as_half(0x2222));
  uint32_t w = 0;
  std::memcpy(&w, &h2, 4);
  if (w != 0x22221111u) mismatch("__half2 layout: 0x%08x", w);
  const __nv_bfloat162 b2 = __floats2bfloat162_rn(1.0f, -2.0f);
  std::memcpy(&w, &b2, 4);
  if (w != 0xC0003F80u) mismatch("__nv_bfloat162 layout: 0x%08x", w);
  const __half2 p = __floats2half2_rn(1.0f, 2.0f);
  std::memcpy(&w, &p, 4);
  if (w != 0x40003C00u) mismatch("__floats2half2_rn(1, 2): 0x%08x", w);
  if (__half_as_ushort(__low2half(p)) != 0x3C00 || __half_as_ushort(__high2half(p)) != 0x4000) {
    mismatch("__low2half / __high2half");
  }
  // The kernels' reinterpret pattern (bitstack Traits::mul_pair): u32 -> __half2 -> u32.
  const uint32_t a = 0x40003C00u, b = 0xC2003800u;  // (1, 2) * (0.5, -3) = (0.5, -6)
  __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  if (*reinterpret_cast<uint32_t*>(&r) != 0xC6003800u) {
    mismatch("__hmul2 through reinterpret_cast: 0x%08x", *reinterpret_cast<uint32_t*>(&r));
  }
  // Implicit conversions as CUDA declares them.
  __half h = 1.0f;
  h = 2.5f;
  const float back = h;
  __nv_bfloat16 bf = 3.0f;
  bf = -0.5f;
  if (back != 2.5f || static_cast<float>(bf) != -0.5f) mismatch("float <-> 16-bit conversions");
  __half hs = __float2half(1.5f) + __float2half(2.0f);
  hs -= __float2half(0.25f);
  hs *= __float2half(2.0f);
  if (__half2float(hs) != 6.5f || __half2float(-hs) != -6.5f) mismatch("__half operators");
  __nv_bfloat16 bs = __float2bfloat16(1.5f) * __float2bfloat16(2.0f) - __float2bfloat16(1.0f);
  bs += __float2bfloat16(0.5f);
  if (__bfloat162float(bs) != 2.5f) mismatch("__nv_bfloat16 operators");
}

void check_16_to_float_exhaustive() {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t bits = static_cast<uint16_t>(i);
    // fp16
    const float f = __half2float(__ushort_as_half(bits));
    const double ref = ref_value(bits, kF16);
    if (is_nan16(bits, kF16)) {
      if (bits_of(f) != 0x7FFFFFFFu) mismatch("__half2float(0x%04x) = 0x%08x", i, bits_of(f));
    } else if (bits_of(f) != bits_of(static_cast<float>(ref))) {
      mismatch("__half2float(0x%04x) = %a, expected %a", i, f, ref);
    }
    const __half h = __ushort_as_half(bits);
    const float via_operator = h;
    if (bits_of(via_operator) != bits_of(f)) mismatch("__half::operator float 0x%04x", i);
    const __half2 pair = __halves2half2(h, __ushort_as_half(bits ^ 0x8000));
    const float2 f2 = __half22float2(pair);
    if (bits_of(f2.x) != bits_of(f) || bits_of(__low2float(pair)) != bits_of(f)) {
      mismatch("__half22float2 / __low2float 0x%04x", i);
    }
    if (bits_of(f2.y) != bits_of(__half2float(__ushort_as_half(bits ^ 0x8000))) ||
        bits_of(__high2float(pair)) != bits_of(f2.y)) {
      mismatch("__half22float2 / __high2float 0x%04x", i);
    }
    // Round trip: every non-NaN pattern comes back; a NaN comes back as the canonical NaN.
    const uint16_t back = __half_as_ushort(__float2half_rn(f));
    if (back != (is_nan16(bits, kF16) ? 0x7FFF : bits)) {
      mismatch("fp16 round trip 0x%04x -> %a -> 0x%04x", i, f, back);
    }
    const __half ctor = f;
    if (__half_as_ushort(ctor) != back || __half_as_ushort(__float2half(f)) != back) {
      mismatch("__half(float) / __float2half 0x%04x", i);
    }

    // bf16
    const float g = __bfloat162float(__ushort_as_bfloat16(bits));
    if (bits_of(g) != (i << 16)) mismatch("__bfloat162float(0x%04x) = 0x%08x", i, bits_of(g));
    const double gref = ref_value(bits, kBF16);
    if (!is_nan16(bits, kBF16) && bits_of(static_cast<float>(gref)) != bits_of(g)) {
      mismatch("__bfloat162float(0x%04x) = %a, expected %a", i, g, gref);
    }
    if (is_nan16(bits, kBF16) != std::isnan(g)) mismatch("bf16 NaN 0x%04x", i);
    const __nv_bfloat16 b = __ushort_as_bfloat16(bits);
    const float b_operator = b;
    if (bits_of(b_operator) != bits_of(g)) mismatch("__nv_bfloat16::operator float 0x%04x", i);
    const __nv_bfloat162 bpair = __halves2bfloat162(b, __ushort_as_bfloat16(bits ^ 0x8000));
    const float2 g2 = __bfloat1622float2(bpair);
    if (bits_of(g2.x) != bits_of(g) || bits_of(__low2float(bpair)) != bits_of(g) ||
        bits_of(g2.y) != ((i ^ 0x8000u) << 16) || bits_of(__high2float(bpair)) != bits_of(g2.y)) {
      mismatch("__bfloat1622float2 / __low2float / __high2float 0x%04x", i);
    }
    const uint16_t gback = __bfloat16_as_ushort(__float2bfloat16_rn(g));
    if (gback != (is_nan16(bits, kBF16) ? 0x7FFF : bits)) {
      mismatch("bf16 round trip 0x%04x -> 0x%04x", i, gback);
    }
    const __nv_bfloat16 gctor = g;
    if (__bfloat16_as_ushort(gctor) != gback ||
        __bfloat16_as_ushort(__float2bfloat16(g)) != gback) {
      mismatch("__nv_bfloat16(float) / __float2bfloat16 0x%04x", i);
    }
  }
}

void check_float_to_16(float x) {
  const uint16_t h = __half_as_ushort(__float2half_rn(x));
  const uint16_t hr = ref_round(x, kF16);
  if (h != hr) {
    mismatch("__float2half_rn(%a = 0x%08x) = 0x%04x, expected 0x%04x", x, bits_of(x), h, hr);
  }
  if (__half_as_ushort(__float2half(x)) != h) mismatch("__float2half(%a)", x);
  const __half2 h2 = __floats2half2_rn(x, -x);
  if (__half_as_ushort(h2.x) != h || __half_as_ushort(h2.y) != ref_round(-x, kF16)) {
    mismatch("__floats2half2_rn(%a, -x)", x);
  }
  const uint16_t b = __bfloat16_as_ushort(__float2bfloat16_rn(x));
  const uint16_t br = ref_round(x, kBF16);
  if (b != br) {
    mismatch("__float2bfloat16_rn(%a = 0x%08x) = 0x%04x, expected 0x%04x", x, bits_of(x), b, br);
  }
  if (__bfloat16_as_ushort(__float2bfloat16(x)) != b) mismatch("__float2bfloat16(%a)", x);
  const __nv_bfloat162 b2 = __floats2bfloat162_rn(-x, x);
  if (__bfloat16_as_ushort(b2.y) != b || __bfloat16_as_ushort(b2.x) != ref_round(-x, kBF16)) {
    mismatch("__floats2bfloat162_rn(-x, %a)", x);
  }
}

void check_float_to_16_edges(const Fmt& f) {
  // Around every finite value of the format: the value, its float neighbours, the midpoint to
  // the next value (the ties) and the midpoint's float neighbours, with both signs.
  for (uint32_t i = 0; i < f.inf; ++i) {
    const double v = ref_value(static_cast<uint16_t>(i), f);
    const double next = i + 1 == f.inf ? std::ldexp(1.0, f.emax + 1) : ref_value(i + 1, f);
    const float mid = static_cast<float>((v + next) / 2);  // exact: <= man + 2 bits
    if (static_cast<double>(mid) != (v + next) / 2) mismatch("%s midpoint not a float", f.name);
    const float fv = static_cast<float>(v);
    const float cases[] = {fv,
                           std::nextafter(fv, 0.0f),
                           std::nextafter(fv, INFINITY),
                           mid,
                           std::nextafter(mid, 0.0f),
                           std::nextafter(mid, INFINITY)};
    for (float c : cases) {
      check_float_to_16(c);
      check_float_to_16(-c);
    }
  }
}

void check_float_to_16_specials_and_random() {
  const uint32_t specials[] = {
      0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
      0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF, 0x00000001, 0x80000001, 0x007FFFFF, 0x00800000,
      0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0x477FE000,  // 65504: fp16 max
      0x477FEFFF,  // just below 65520: rounds to 65504
      0x477FF000,  // 65520: the tie above the max: rounds (to even) to inf
      0x47800000,  // 65536
      0x33000000,  // 2^-25: half the smallest fp16 subnormal: tie -> 0
      0x33000001,  // just above: the smallest subnormal
      0x33400000,  // 1.5 * 2^-25: rounds up to the smallest subnormal
      0x33C00000,  // 3 * 2^-25 = 1.5 subnormal units: tie -> 2 units
      0x38800000,  // 2^-14: smallest fp16 normal
      0x387FE000,  // largest fp16 subnormal
      0x387FF000,  // tie between the largest subnormal and the smallest normal -> normal (even)
      0x3F808000,  // 1 + 2^-8: bf16 tie -> 1 (even)
      0x3F818000,  // 1 + 3 * 2^-8: bf16 tie -> up (even)
      0x3F800001, 0x3F807FFF, 0x3F808001, 0x7F7F8000,  // bf16: tie above max finite -> inf
      0x7F7F7FFF, 0x00008000,  // bf16: tie at the bottom of the subnormals -> 0
      0x00018000,             // bf16: 1.5 units -> 2 units
      0x3A800800,             // fp16: 2^-10 * (1 + 2^-11): tie in the fp16 normal range -> down
      0x3A801800,             // tie -> up
  };
  for (uint32_t s : specials) check_float_to_16(float_of(s));
  Rng rng{0x5EEDull};
  for (int i = 0; i < 2000000; ++i) check_float_to_16(float_of(rng.u32()));
  // Concentrated on fp16's exponent range (float exponents 100..150).
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t e = 100 + static_cast<uint32_t>(rng.below(51));
    const uint32_t u = (rng.u32() & 0x807FFFFFu) | (e << 23);
    check_float_to_16(float_of(u));
  }
}

// ---- Arithmetic ------------------------------------------------------------------------------

template <typename T>
uint16_t raw(T v) {
  uint16_t u;
  std::memcpy(&u, &v, 2);
  return u;
}

template <typename T>
T from_raw(uint16_t u) {
  T v;
  std::memcpy(&v, &u, 2);
  return v;
}

template <typename T>
struct Traits;
template <>
struct Traits<__half> {
  using V = __half2;
  static constexpr const Fmt& fmt = kF16;
  static constexpr uint16_t kOne = 0x3C00;
};
template <>
struct Traits<__nv_bfloat16> {
  using V = __nv_bfloat162;
  static constexpr const Fmt& fmt = kBF16;
  static constexpr uint16_t kOne = 0x3F80;
};

template <typename T>
void check_arith(uint16_t a, uint16_t b, uint16_t c, uint16_t a2, uint16_t b2, uint16_t c2) {
  using V = typename Traits<T>::V;
  const Fmt& f = Traits<T>::fmt;
  const V va(from_raw<T>(a), from_raw<T>(a2));
  const V vb(from_raw<T>(b), from_raw<T>(b2));
  const V vc(from_raw<T>(c), from_raw<T>(c2));
  const V mul = __hmul2(va, vb), sub = __hsub2(va, vb), add = __hadd2(va, vb);
  const V fma = __hfma2(va, vb, vc);
  const uint16_t lanes[2][3] = {{a, b, c}, {a2, b2, c2}};
  const V* results[4] = {&mul, &sub, &add, &fma};
  const char* names[4] = {"__hmul2", "__hsub2", "__hadd2", "__hfma2"};
  for (int lane = 0; lane < 2; ++lane) {
    const uint16_t x = lanes[lane][0], y = lanes[lane][1], z = lanes[lane][2];
    const double dx = ref_value(x, f), dy = ref_value(y, f);
    const uint16_t neg_y = y ^ 0x8000;
    // Products are exact in double; the sums via the exact integer reference.
    const uint16_t expected[4] = {ref_round(dx * dy, f), ref_fma(x, Traits<T>::kOne, neg_y, f),
                                  ref_fma(x, Traits<T>::kOne, y, f), ref_fma(x, y, z, f)};
    for (int op = 0; op < 4; ++op) {
      const V& r = *results[op];
      const uint16_t got = raw(lane == 0 ? r.x : r.y);
      if (got != expected[op]) {
        mismatch("%s %s lane %d (0x%04x, 0x%04x, 0x%04x) = 0x%04x, expected 0x%04x", f.name,
                 names[op], lane, x, y, z, got, expected[op]);
      }
    }
    // The scalar forms and the operators.
    const T tx = from_raw<T>(x), ty = from_raw<T>(y), tz = from_raw<T>(z);
    if (raw(__hmul(tx, ty)) != expected[0] || raw(tx * ty) != expected[0] ||
        raw(__hsub(tx, ty)) != expected[1] || raw(tx - ty) != expected[1] ||
        raw(__hadd(tx, ty)) != expected[2] || raw(tx + ty) != expected[2] ||
        raw(__hfma(tx, ty, tz)) != expected[3]) {
      mismatch("%s scalar ops (0x%04x, 0x%04x, 0x%04x)", f.name, x, y, z);
    }
    // The float computation rounded once: exact for products, and for sums the double
    // rounding through float is innocuous (24 >= 2p + 1 bits; exact where the sum is tiny).
    const float fx = static_cast<float>(dx), fy = static_cast<float>(dy);
    const bool product_exact_in_float =
        static_cast<double>(fx * fy) == dx * dy || std::isnan(dx * dy);
    if (product_exact_in_float && ref_round(fx * fy, f) != expected[0]) {
      mismatch("%s: float product rounded once differs (0x%04x, 0x%04x)", f.name, x, y);
    }
    if (ref_round(fx - fy, f) != expected[1] || ref_round(fx + fy, f) != expected[2]) {
      mismatch("%s: float sum rounded once differs (0x%04x, 0x%04x)", f.name, x, y);
    }
  }
}

// A random 16-bit value with its exponent near the format's 1.0 (+- spread binades).
uint16_t near_one(Rng& rng, const Fmt& f, int spread) {
  const int e = f.bias + rng.below(2 * spread + 1) - spread;
  return static_cast<uint16_t>((rng.u16() & (0x8000 | ((1 << f.man) - 1))) | (e << f.man));
}

template <typename T>
void check_arith_all() {
  const Fmt& f = Traits<T>::fmt;
  Rng rng{f.man == 10 ? 0xF16ull : 0xBF16ull};
  auto triple = [&](int kind, uint16_t& a, uint16_t& b, uint16_t& c) {
    switch (kind) {
      case 0:  // anything, NaN and inf included
        a = rng.u16(), b = rng.u16(), c = rng.u16();
        break;
      case 1:  // comparable magnitudes
        a = near_one(rng, f, 4), b = near_one(rng, f, 4), c = near_one(rng, f, 6);
        break;
      case 2:  // c close to -a*b: cancellation, ties, tiny and subnormal results
        a = near_one(rng, f, 3), b = near_one(rng, f, 3);
        c = static_cast<uint16_t>((ref_round(ref_value(a, f) * ref_value(b, f), f) ^ 0x8000) +
                                  rng.below(9) - 4);
        if (is_nan16(c, f) || (c & 0x7FFF) == f.inf) c = 0;
        break;
      default:  // small: subnormal operands and results
        a = static_cast<uint16_t>(rng.u16() & (0x8000 | ((1 << (f.man + 3)) - 1)));
        b = near_one(rng, f, 8), c = static_cast<uint16_t>(rng.u16() & (0x8000 | 0x3FF));
        break;
    }
  };
  for (int i = 0; i < 160000; ++i) {
    uint16_t a, b, c, a2, b2, c2;
    triple(i % 4, a, b, c);
    triple((i / 4) % 4, a2, b2, c2);
    check_arith<T>(a, b, c, a2, b2, c2);
  }
  // Every value of the format against a set of partners.
  uint16_t partners[24] = {0x0000, 0x8000, f.inf, static_cast<uint16_t>(f.inf | 0x8000), 0x7FFF,
                           Traits<T>::kOne, static_cast<uint16_t>(Traits<T>::kOne | 0x8000), 0x0001,
                           static_cast<uint16_t>(f.inf - 1)};
  for (int k = 9; k < 24; ++k) partners[k] = k % 2 ? near_one(rng, f, 5) : rng.u16();
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t a = static_cast<uint16_t>(i);
    for (int k = 0; k < 24; k += 4) {  // a against 12 partners (6 in each lane)
      const int j = k + static_cast<int>(i % 2) * 2;
      check_arith<T>(a, partners[j], partners[(j + 5) % 24], partners[j + 1], a,
                     partners[(j + 7) % 24]);
    }
  }
}

// The kernels' dequantization (cuda_mma_kernel.cuh, kHalfMath): codes under a magic exponent,
// HSUB2 of (magic + z), HMUL2 by the scale == rounding the fp32 (q - z) * s once.
template <typename T>
void check_magic_dequant(uint32_t magic, int codes) {
  const Fmt& f = Traits<T>::fmt;
  using V = typename Traits<T>::V;
  Rng rng{magic};
  for (int si = 0; si < 16; ++si) {
    const uint16_t s = si == 0 ? Traits<T>::kOne : near_one(rng, f, 6);
    const uint32_t s2 = static_cast<uint32_t>(s) * 0x00010001u;
    for (int z = 0; z < codes; ++z) {
      const uint32_t zm2 = (magic + z) * 0x00010001u;
      for (int q = 0; q < codes; ++q) {
        const uint32_t q2 = (magic + q) | ((magic + (codes - 1 - q)) << 16);
        V vq, vz, vs;
        std::memcpy(&vq, &q2, 4);
        std::memcpy(&vz, &zm2, 4);
        std::memcpy(&vs, &s2, 4);
        const V r = __hmul2(__hsub2(vq, vz), vs);
        const float sf = static_cast<float>(ref_value(s, f));
        const uint16_t lo = ref_round(static_cast<float>(q - z) * sf, f);
        const uint16_t hi = ref_round(static_cast<float>(codes - 1 - q - z) * sf, f);
        if (raw(r.x) != lo || raw(r.y) != hi) {
          mismatch("%s magic dequant q=%d z=%d s=0x%04x: 0x%04x 0x%04x, expected 0x%04x 0x%04x",
                   f.name, q, z, s, raw(r.x), raw(r.y), lo, hi);
        }
      }
    }
  }
}

// ---- quantlab_emu_math.h -------------------------------------------------------------------

namespace kernel_like {  // the kernels call these unqualified from inside their namespaces
int quantize(float v, float inv) { return max(-128, min(127, __float2int_rn(__fmul_rn(v, inv)))); }
bool finite_abs_max(float v, float& amax) {
  amax = fmaxf(amax, fabsf(v));
  return isfinite(v);
}
float norm(float g, float yy) { return __fdiv_rn(g, __fsqrt_rn(yy)) + sqrtf(yy) * rsqrtf(yy); }
__attribute__((noinline)) float mul_sub(float a, float c) { return __fmul_rn(a, a) - c; }
__attribute__((noinline)) float sub_mul(float a, float c) { return c - __fmul_rn(a, a); }
__attribute__((noinline)) float add_rn_of_product(float a, float c) { return __fadd_rn(a * a, -c); }
__attribute__((noinline)) float sub_rn_of_product(float a, float c) { return __fsub_rn(a * a, c); }
}  // namespace kernel_like

int ref_float2int_rn(float x) {
  if (std::isnan(x)) return 0;
  const double r = std::nearbyint(static_cast<double>(x));
  if (r >= 2147483647.0) return INT32_MAX;
  if (r <= -2147483648.0) return INT32_MIN;
  return static_cast<int>(r);
}

void check_math() {
  // min / max: CUDA's overloads plus the widening integer mixes.
  static_assert(std::is_same_v<decltype(min(1, 2)), int>);
  static_assert(std::is_same_v<decltype(max(1u, 2u)), unsigned int>);
  static_assert(std::is_same_v<decltype(min(1, 2u)), unsigned int>);
  static_assert(std::is_same_v<decltype(min(int64_t{1}, 2)), int64_t>);
  static_assert(std::is_same_v<decltype(max(3, int64_t{1})), int64_t>);
  static_assert(std::is_same_v<decltype(min(1LL, 2)), long long>);
  static_assert(std::is_same_v<decltype(max(uint64_t{1}, 2u)), uint64_t>);
  static_assert(std::is_same_v<decltype(min(1ull, 2ull)), unsigned long long>);
  static_assert(std::is_same_v<decltype(min(1.0f, 2.0f)), float>);
  static_assert(std::is_same_v<decltype(max(1.0, 2.0)), double>);
  static_assert(std::is_same_v<decltype(max(1.0f, 2.0)), double>);
  if (min(-3, 2) != -3 || max(-3, 2) != 2 || min(int64_t{-5}, 4) != -5 ||
      max(7, int64_t{1} << 40) != (int64_t{1} << 40) || min(5u, 3u) != 3u ||
      max(2.0f, NAN) != 2.0f || min(NAN, 1.0) != 1.0 || min(-1, 1u) != 1u) {
    mismatch("min / max");
  }
  using kernel_like::quantize;
  if (quantize(1000.0f, 1.0f) != 127 || quantize(-1000.0f, 1.0f) != -128 ||
      quantize(2.5f, 1.0f) != 2 || quantize(-3.5f, 1.0f) != -4) {
    mismatch("quantize pattern");
  }
  float amax = 0.0f;
  if (!kernel_like::finite_abs_max(-3.0f, amax) || amax != 3.0f ||
      kernel_like::finite_abs_max(INFINITY, amax) || kernel_like::finite_abs_max(NAN, amax)) {
    mismatch("isfinite / fmaxf / fabsf");
  }
  if (kernel_like::norm(6.0f, 4.0f) != 4.0f) mismatch("__fdiv_rn / __fsqrt_rn / sqrtf / rsqrtf");

  // Fused vs not fused: a = 1 + 2^-12, a * a = 1 + 2^-11 + 2^-24.
  volatile float va = 1.0f + 0x1p-12f, vc = 1.0f + 0x1p-11f;
  const float a = va, c = vc;
  if (__fmaf_rn(a, a, -c) != 0x1p-24f) mismatch("__fmaf_rn is not fused");
  // Each in its own function: a product with one use is what a contracting compiler fuses.
  if (kernel_like::mul_sub(a, c) != 0.0f) mismatch("__fmul_rn(a, a) - c was fused into an FMA");
  if (kernel_like::sub_mul(a, c) != 0.0f) mismatch("c - __fmul_rn(a, a) was fused into an FMA");
  if (kernel_like::add_rn_of_product(a, c) != 0.0f) mismatch("__fadd_rn(a * a, -c) was fused");
  if (kernel_like::sub_rn_of_product(a, c) != 0.0f) mismatch("__fsub_rn(a * a, c) was fused");
  if (__frcp_rn(3.0f) != 1.0f / 3.0f || __frcp_rn(0.0f) != INFINITY) mismatch("__frcp_rn");
  if (!std::isnan(__fsqrt_rn(-1.0f))) mismatch("__fsqrt_rn(-1)");

  Rng rng{0xA11CE};
  for (int i = 0; i < 500000; ++i) {
    const float x = float_of(rng.u32()), y = float_of(rng.u32());
    const double dx = x, dy = y;
    // Double then float: innocuous double rounding (53 >= 2 * 24 + 2) for normal results.
    const float refs[4] = {static_cast<float>(dx + dy), static_cast<float>(dx - dy),
                           static_cast<float>(dx * dy), static_cast<float>(dx / dy)};
    const float got[4] = {__fadd_rn(x, y), __fsub_rn(x, y), __fmul_rn(x, y), __fdiv_rn(x, y)};
    for (int k = 0; k < 4; ++k) {
      const bool normal_or_exact = std::fabs(refs[k]) >= 0x1p-126f || k < 3;
      if (normal_or_exact && bits_of(got[k]) != bits_of(refs[k]) &&
          !(std::isnan(got[k]) && std::isnan(refs[k]))) {
        mismatch("float intrinsic %d (%a, %a) = %a, expected %a", k, x, y, got[k], refs[k]);
      }
    }
    const float s = std::fabs(x);
    const float sq = static_cast<float>(std::sqrt(static_cast<double>(s)));
    if (bits_of(__fsqrt_rn(s)) != bits_of(sq) && !std::isnan(sq)) mismatch("__fsqrt_rn(%a)", s);
    // __float2int_rn over the whole float range and near small integers / ties.
    const float t = i % 2 ? x : static_cast<float>(static_cast<int>(rng.u32() % 2001) - 1000) / 4;
    if (__float2int_rn(t) != ref_float2int_rn(t)) {
      mismatch("__float2int_rn(%a) = %d, expected %d", t, __float2int_rn(t), ref_float2int_rn(t));
    }
  }
  const float f2i[] = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 2147483520.0f, 2147483648.0f,
                       -2147483648.0f, -2147483904.0f, INFINITY, -INFINITY, NAN, 0x1.fffffep22f};
  for (float t : f2i) {
    if (__float2int_rn(t) != ref_float2int_rn(t)) mismatch("__float2int_rn(%a)", t);
  }

  if (__float_as_int(1.0f) != 0x3F800000 || __uint_as_float(0x40000000u) != 2.0f ||
      __float_as_uint(-0.0f) != 0x80000000u ||
      __float_as_uint(__int_as_float(0x7fc00000)) != 0x7fc00000u ||
      __int_as_float(static_cast<int>(0xBF800000u)) != -1.0f) {
    mismatch("bit reinterpretations");
  }

  // __byte_perm: the kernels' selectors, then random operands.
  if (__byte_perm(0xDDCCBBAAu, 0x64646464u, 0x5140u) != 0x64BB64AAu ||
      __byte_perm(0xDDCCBBAAu, 0x64646464u, 0x5342u) != 0x64DD64CCu ||
      __byte_perm(0xDDCCBBAAu, 0x4B000000u, 0x7441u) != 0x4B0000BBu) {
    mismatch("__byte_perm kernel selectors");
  }
  for (int i = 0; i < 300000; ++i) {
    const uint32_t x = rng.u32(), y = rng.u32(), s = rng.u32();
    unsigned char in[8], out[4];
    for (int k = 0; k < 4; ++k) {
      in[k] = static_cast<unsigned char>(x >> (8 * k));
      in[4 + k] = static_cast<unsigned char>(y >> (8 * k));
    }
    for (int n = 0; n < 4; ++n) out[n] = in[(s >> (4 * n)) & 7];
    const uint32_t ref =
        out[0] | (out[1] << 8) | (out[2] << 16) | (static_cast<uint32_t>(out[3]) << 24);
    if (__byte_perm(x, y, s) != ref) mismatch("__byte_perm(0x%08x, 0x%08x, 0x%08x)", x, y, s);

    // Funnel shifts: wrap (shift & 31) and clamp (min(shift, 32)).
    const uint32_t lo = rng.u32(), hi = rng.u32(), sh = rng.u32() % 80;
    const uint32_t w = sh & 31, cl = sh < 32 ? sh : 32;
    const uint32_t r_wrap = w == 0 ? lo : (lo >> w) | (hi << (32 - w));
    const uint32_t l_wrap = w == 0 ? hi : (hi << w) | (lo >> (32 - w));
    const uint32_t r_clamp = cl == 32 ? hi : cl == 0 ? lo : (lo >> cl) | (hi << (32 - cl));
    const uint32_t l_clamp = cl == 32 ? lo : cl == 0 ? hi : (hi << cl) | (lo >> (32 - cl));
    if (__funnelshift_r(lo, hi, sh) != r_wrap || __funnelshift_l(lo, hi, sh) != l_wrap ||
        __funnelshift_rc(lo, hi, sh) != r_clamp || __funnelshift_lc(lo, hi, sh) != l_clamp) {
      mismatch("funnel shift (0x%08x, 0x%08x, %u)", lo, hi, sh);
    }

    // __dp4a: signed and unsigned bytes, wrapping int32 accumulate.
    const uint32_t da = rng.u32(), db = rng.u32(), dc = rng.u32();
    int64_t ssum = static_cast<int32_t>(dc);
    uint64_t usum = dc;
    for (int k = 0; k < 4; ++k) {
      const int64_t ab = static_cast<int64_t>((da >> (8 * k)) & 0xFF);
      const int64_t bb = static_cast<int64_t>((db >> (8 * k)) & 0xFF);
      ssum += ((ab ^ 0x80) - 0x80) * ((bb ^ 0x80) - 0x80);
      usum += static_cast<uint64_t>(ab * bb);
    }
    const int sgot = __dp4a(static_cast<int>(da), static_cast<int>(db), static_cast<int>(dc));
    if (static_cast<uint32_t>(sgot) != static_cast<uint32_t>(static_cast<uint64_t>(ssum))) {
      mismatch("__dp4a(int) (0x%08x, 0x%08x, 0x%08x) = %d", da, db, dc, sgot);
    }
    if (__dp4a(da, db, dc) != static_cast<uint32_t>(usum)) mismatch("__dp4a(unsigned)");
    char4 ca, cb;
    uchar4 ua, ub;
    std::memcpy(&ca, &da, 4);
    std::memcpy(&cb, &db, 4);
    std::memcpy(&ua, &da, 4);
    std::memcpy(&ub, &db, 4);
    if (__dp4a(ca, cb, static_cast<int>(dc)) != sgot || __dp4a(ua, ub, dc) != __dp4a(da, db, dc)) {
      mismatch("__dp4a(char4 / uchar4)");
    }

    // Bit counts.
    int pop = 0, clz = 32, ffs = 0;
    for (int k = 0; k < 32; ++k) {
      if ((x >> k) & 1u) {
        ++pop;
        clz = 31 - k;
        if (ffs == 0) ffs = k + 1;
      }
    }
    const uint32_t v = i % 7 == 0 ? 0u : x;
    if (v == 0) pop = 0, clz = 32, ffs = 0;
    const int iv = static_cast<int>(v);
    if (__popc(v) != pop || __clz(iv) != clz || __ffs(iv) != ffs) {
      mismatch("__popc / __clz / __ffs (0x%08x)", v);
    }
    const uint64_t v64 = (static_cast<uint64_t>(v) << 32) | y;
    if (__popcll(v64) != pop + __popc(y) ||
        __clzll(static_cast<long long>(v64)) != (v != 0 ? clz : 32 + __clz(static_cast<int>(y))) ||
        __ffsll(static_cast<long long>(v64)) !=
            (y != 0 ? __ffs(static_cast<int>(y)) : ffs != 0 ? ffs + 32 : 0)) {
      mismatch("__popcll / __clzll / __ffsll");
    }
  }
  // dp4a on the kernel's operands: codes 0..2 in each byte times int8 activations.
  // bytes (low first): a = {2, 0, 1, 2}, b = {1, 127, -1, -128}.
  if (__dp4a(0x02010002, static_cast<int>(0x80FF7F01u), 5) != 2 + 0 - 1 - 256 + 5) {
    mismatch("__dp4a kernel operands");
  }
}

// ---- File I/O modes --------------------------------------------------------------------------

std::vector<float> read_floats(const char* path) {
  std::FILE* in = std::fopen(path, "rb");
  if (in == nullptr) mismatch("cannot open %s", path);
  std::vector<float> v;
  float buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, sizeof(float), 4096, in)) > 0) v.insert(v.end(), buf, buf + n);
  std::fclose(in);
  return v;
}

void write_bytes(const char* path, const void* data, size_t bytes) {
  std::FILE* out = std::fopen(path, "wb");
  if (out == nullptr || std::fwrite(data, 1, bytes, out) != bytes || std::fclose(out) != 0) {
    mismatch("cannot write %s", path);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (std::fegetround() != FE_TONEAREST) std::fesetround(FE_TONEAREST);
  const std::string mode = argc > 1 ? argv[1] : "";
  if ((mode == "--dump-half2float" || mode == "--dump-bf162float") && argc == 3) {
    std::vector<float> out(65536);
    for (uint32_t i = 0; i < 65536; ++i) {
      const auto bits = static_cast<unsigned short>(i);
      out[i] = mode == "--dump-half2float" ? __half2float(__ushort_as_half(bits))
                                           : __bfloat162float(__ushort_as_bfloat16(bits));
    }
    write_bytes(argv[2], out.data(), out.size() * sizeof(float));
    return 0;
  }
  if ((mode == "--float2half" || mode == "--float2bf16") && argc == 4) {
    const std::vector<float> in = read_floats(argv[2]);
    std::vector<uint16_t> out(in.size());
    for (size_t i = 0; i < in.size(); ++i) {
      out[i] = mode == "--float2half" ? __half_as_ushort(__float2half_rn(in[i]))
                                      : __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
    }
    write_bytes(argv[3], out.data(), out.size() * sizeof(uint16_t));
    return 0;
  }
  if (argc != 1) {
    std::fprintf(stderr, "usage: %s [--dump-half2float F | --dump-bf162float F | "
                         "--float2half IN OUT | --float2bf16 IN OUT]\n", argv[0]);
    return 2;
  }
  check_layout();
  check_16_to_float_exhaustive();
  check_float_to_16_edges(kF16);
  check_float_to_16_edges(kBF16);
  check_float_to_16_specials_and_random();
  check_arith_all<__half>();
  check_arith_all<__nv_bfloat16>();
  check_magic_dequant<__half>(0x6400u, 256);  // fp16: codes < 1024 under 1024.0
  check_magic_dequant<__nv_bfloat16>(0x4300u, 128);  // bf16: codes < 128 under 128.0
  check_math();
  std::printf("ok\n");
  return 0;
}

// CPU kernels for the groupwise integer format: dequantization and small-batch matmul.
//
// gemv_cpu computes, per output row n and group g,
//   y[i, n] += s[n, g] * (sum_k q[n, k] * x[i, k]  -  z[n, g] * sum_k x[i, k])
// so the zero point costs one multiply per group (using precomputed group sums of x) and the inner
// loop is a plain integer-valued dot product. The AVX2 path unpacks 8 weights into one fp32 vector
// and reuses it for up to 8 rows of x, so the packed weight is read from memory once per call.
#include "groupwise_int/cpu_kernels.h"

#include <algorithm>
#include <cstring>

#include "common/bitstream.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QUANTLAB_X86 1
#endif

namespace quantlab::groupwise_int {
namespace {

constexpr int kMaxRows = 8;  // rows of x sharing one unpacked weight vector

inline int64_t n_groups(const CpuParams& p) { return p.k / p.group_size; }

inline float zero_point(const CpuParams& p, int64_t row, int64_t g) {
  if (p.qzeros == nullptr) return static_cast<float>(1u << (p.bits - 1));
  const uint32_t* zrow = p.qzeros + row * packed_words(n_groups(p), p.bits);
  return static_cast<float>(extract_value(zrow, g, p.bits));
}

void gemv_scalar(const CpuParams& p, const float* x, const float* xsum, int64_t m, float* y,
                 int64_t row_begin, int64_t row_end) {
  const int64_t groups = n_groups(p);
  const int64_t words = packed_words(p.k, p.bits);
  float acc[kMaxRows];
  float dot[kMaxRows];
  for (int64_t i0 = 0; i0 < m; i0 += kMaxRows) {
    const int64_t rows = std::min<int64_t>(kMaxRows, m - i0);
    for (int64_t n = row_begin; n < row_end; ++n) {
      const uint32_t* row = p.qweight + n * words;
      std::fill(acc, acc + rows, 0.0f);
      for (int64_t g = 0; g < groups; ++g) {
        std::fill(dot, dot + rows, 0.0f);
        const int64_t k0 = g * p.group_size;
        for (int64_t kk = k0; kk < k0 + p.group_size; ++kk) {
          const float q = static_cast<float>(extract_value(row, kk, p.bits));
          for (int64_t i = 0; i < rows; ++i) dot[i] += q * x[(i0 + i) * p.k + kk];
        }
        const float s = p.scales[n * groups + g];
        const float z = zero_point(p, n, g);
        for (int64_t i = 0; i < rows; ++i) acc[i] += s * (dot[i] - z * xsum[(i0 + i) * groups + g]);
      }
      for (int64_t i = 0; i < rows; ++i) y[(i0 + i) * p.n + n] = acc[i];
    }
  }
}

#if defined(QUANTLAB_X86)

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// 8 consecutive weights starting at column kk (a multiple of 8) as fp32.
template <int BITS>
__attribute__((target("avx2,fma"))) inline __m256 unpack8(const uint32_t* row, int64_t kk) {
  if constexpr (BITS == 4) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(row[kk >> 3])), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
  } else if constexpr (BITS == 2) {
    // 8 two-bit values are 16 bits: the low or high half of a word.
    const uint32_t half = row[kk >> 4] >> ((kk & 8) << 1);
    const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(half)), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x3)));
  } else {
    // 8-bit values are the stream's bytes in order (x86 is little-endian).
    const auto* bytes = reinterpret_cast<const uint8_t*>(row) + kk;
    int64_t eight;
    std::memcpy(&eight, bytes, sizeof(eight));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(eight)));
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 sh = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(sh, _mm_shuffle_ps(sh, sh, 0x55)));
}

template <int ROWS>
constexpr int kUnroll = ROWS == 1 ? 4 : (ROWS == 2 ? 2 : 1);

template <int BITS, int ROWS>
__attribute__((target("avx2,fma"))) void gemv_avx2_rows(const CpuParams& p, const float* x,
                                                         const float* xsum, float* y,
                                                         int64_t row_begin, int64_t row_end) {
  const int64_t groups = n_groups(p);
  const int64_t words = packed_words(p.k, BITS);
  const int64_t gs = p.group_size;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const uint32_t* row = p.qweight + n * words;
    __m256 total[ROWS];
    float correction[ROWS];
    for (int i = 0; i < ROWS; ++i) {
      total[i] = _mm256_setzero_ps();
      correction[i] = 0.0f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      // With few rows a single FMA chain per row is latency-bound (4-cycle FMA latency), so
      // small batches keep UNROLL independent chains and add them at the end of the group.
      __m256 acc[kUnroll<ROWS>][ROWS];
      for (int u = 0; u < kUnroll<ROWS>; ++u)
        for (int i = 0; i < ROWS; ++i) acc[u][i] = _mm256_setzero_ps();
      const int64_t k0 = g * gs;
      const int64_t k_end = k0 + gs;
      int64_t kk = k0;
      for (; kk + 8 * kUnroll<ROWS> <= k_end; kk += 8 * kUnroll<ROWS>) {
        for (int u = 0; u < kUnroll<ROWS>; ++u) {
          const __m256 w = unpack8<BITS>(row, kk + 8 * u);
          for (int i = 0; i < ROWS; ++i)
            acc[u][i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i * p.k + kk + 8 * u), acc[u][i]);
        }
      }
      for (; kk < k_end; kk += 8) {
        const __m256 w = unpack8<BITS>(row, kk);
        for (int i = 0; i < ROWS; ++i)
          acc[0][i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i * p.k + kk), acc[0][i]);
      }
      for (int u = 1; u < kUnroll<ROWS>; ++u)
        for (int i = 0; i < ROWS; ++i) acc[0][i] = _mm256_add_ps(acc[0][i], acc[u][i]);
      const float s = p.scales[n * groups + g];
      const float sz = s * zero_point(p, n, g);
      const __m256 sv = _mm256_set1_ps(s);
      for (int i = 0; i < ROWS; ++i) {
        total[i] = _mm256_fmadd_ps(sv, acc[0][i], total[i]);
        correction[i] += sz * xsum[i * groups + g];
      }
    }
    for (int i = 0; i < ROWS; ++i) y[i * p.n + n] = hsum(total[i]) - correction[i];
  }
}

template <int BITS>
void gemv_avx2(const CpuParams& p, const float* x, const float* xsum, int64_t m, float* y,
               int64_t row_begin, int64_t row_end) {
  const int64_t groups = n_groups(p);
  for (int64_t i0 = 0; i0 < m; i0 += kMaxRows) {
    const int64_t rows = std::min<int64_t>(kMaxRows, m - i0);
    const float* xc = x + i0 * p.k;
    const float* sc = xsum + i0 * groups;
    float* yc = y + i0 * p.n;
    switch (rows) {
      case 1: gemv_avx2_rows<BITS, 1>(p, xc, sc, yc, row_begin, row_end); break;
      case 2: gemv_avx2_rows<BITS, 2>(p, xc, sc, yc, row_begin, row_end); break;
      case 3: gemv_avx2_rows<BITS, 3>(p, xc, sc, yc, row_begin, row_end); break;
      case 4: gemv_avx2_rows<BITS, 4>(p, xc, sc, yc, row_begin, row_end); break;
      case 5: gemv_avx2_rows<BITS, 5>(p, xc, sc, yc, row_begin, row_end); break;
      case 6: gemv_avx2_rows<BITS, 6>(p, xc, sc, yc, row_begin, row_end); break;
      case 7: gemv_avx2_rows<BITS, 7>(p, xc, sc, yc, row_begin, row_end); break;
      default: gemv_avx2_rows<BITS, 8>(p, xc, sc, yc, row_begin, row_end); break;
    }
  }
}

template <int BITS>
__attribute__((target("avx2,fma"))) void dequant_avx2(const CpuParams& p, float* out,
                                                       int64_t row_begin, int64_t row_end) {
  const int64_t groups = n_groups(p);
  const int64_t words = packed_words(p.k, BITS);
  for (int64_t n = row_begin; n < row_end; ++n) {
    const uint32_t* row = p.qweight + n * words;
    float* dst = out + n * p.k;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 s = _mm256_set1_ps(p.scales[n * groups + g]);
      const __m256 z = _mm256_set1_ps(zero_point(p, n, g));
      const int64_t k0 = g * p.group_size;
      for (int64_t kk = k0; kk < k0 + p.group_size; kk += 8)
        _mm256_storeu_ps(dst + kk, _mm256_mul_ps(_mm256_sub_ps(unpack8<BITS>(row, kk), z), s));
    }
  }
}

bool avx2_applies(const CpuParams& p) {
  // Vector loads of 8 weights must start on a value boundary that the unpackers handle.
  return cpu_has_avx2() && (p.bits == 2 || p.bits == 4 || p.bits == 8) && p.group_size % 8 == 0;
}

#endif  // QUANTLAB_X86

}  // namespace

void dequant_cpu(const CpuParams& p, float* out, int64_t row_begin, int64_t row_end) {
#if defined(QUANTLAB_X86)
  if (avx2_applies(p)) {
    switch (p.bits) {
      case 2: dequant_avx2<2>(p, out, row_begin, row_end); return;
      case 4: dequant_avx2<4>(p, out, row_begin, row_end); return;
      default: dequant_avx2<8>(p, out, row_begin, row_end); return;
    }
  }
#endif
  const int64_t groups = n_groups(p);
  const int64_t words = packed_words(p.k, p.bits);
  for (int64_t n = row_begin; n < row_end; ++n) {
    const uint32_t* row = p.qweight + n * words;
    float* dst = out + n * p.k;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = p.scales[n * groups + g];
      const float z = zero_point(p, n, g);
      const int64_t k0 = g * p.group_size;
      for (int64_t kk = k0; kk < k0 + p.group_size; ++kk)
        dst[kk] = (static_cast<float>(extract_value(row, kk, p.bits)) - z) * s;
    }
  }
}

void group_sums_cpu(const CpuParams& p, const float* x, int64_t m, float* xsum) {
  const int64_t groups = n_groups(p);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      // Accumulate in double: the zero-point correction subtracts z * xsum from a dot product of
      // similar magnitude, so an inaccurate sum would show up directly in the output.
      double s = 0.0;
      const float* xg = x + i * p.k + g * p.group_size;
      for (int64_t kk = 0; kk < p.group_size; ++kk) s += xg[kk];
      xsum[i * groups + g] = static_cast<float>(s);
    }
  }
}

void gemv_cpu(const CpuParams& p, const float* x, const float* xsum, int64_t m, float* y,
              int64_t row_begin, int64_t row_end) {
#if defined(QUANTLAB_X86)
  if (avx2_applies(p)) {
    switch (p.bits) {
      case 2: gemv_avx2<2>(p, x, xsum, m, y, row_begin, row_end); return;
      case 4: gemv_avx2<4>(p, x, xsum, m, y, row_begin, row_end); return;
      default: gemv_avx2<8>(p, x, xsum, m, y, row_begin, row_end); return;
    }
  }
#endif
  gemv_scalar(p, x, xsum, m, y, row_begin, row_end);
}

const char* gemv_cpu_path(const CpuParams& p) {
#if defined(QUANTLAB_X86)
  if (avx2_applies(p)) return "avx2";
#endif
  (void)p;
  return "scalar";
}

}  // namespace quantlab::groupwise_int

// CPU kernels for the groupwise integer format: dequantization and small-batch matmul.
//
// Unpacking. With group_size % 8 == 0 (so K % 8 == 0), the vector paths read weights in chunks of 8
// consecutive codes. Such a chunk is exactly `bits` bytes of the stream, starting at byte
// (k / 8) * bits, because on a little-endian CPU byte b of the int32 words holds stream bits
// [8b, 8b + 8). So every bit width, 3-bit included, unpacks the same way: load `bits` bytes,
// broadcast them to 8 lanes, shift lane j right by j * bits (vpsrlvd), mask, convert to fp32. A
// 3-bit value that straddles two int32 words never straddles its 3-byte chunk.
//
// Matmul. Two AVX2 tile kernels, both reading each packed weight from memory once per call and
// reusing each unpacked 8-weight vector for all M rows of x:
//  * M <= 2 ("group-sum" kernel): per group, dot = sum_k q_k x_k over the raw integer codes, then
//    y += s * dot, with the zero point applied once per row as - sum_g s_g z_g xsum_g (xsum: group
//    sums of x, computed once per call). This costs one vector op less per 8 weights than
//    dequantizing first, which matters because with one or two rows the unpack dominates.
//  * M >= 3 ("dequantizing" kernel): each 8-weight vector is dequantized with one FMA,
//    w = q * s + (-s z), and then feeds M FMAs. The unpack is amortised over M rows, and with no
//    per-group accumulators left to keep live, a tile of output rows fits the 16 ymm registers. K
//    is walked in blocks so the M x K-block slice of x stays near L1 across all output rows of a
//    thread; otherwise x (up to 8 x 14336 fp32 = 458 KB) would be re-read from L2 for every row.
// Both kernels process R output rows per tile so each load of x serves R weight vectors.
#include "groupwise_int/cpu_kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/bitstream.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QUANTLAB_X86 1
#define QUANTLAB_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace quantlab::groupwise_int {
namespace {

constexpr int64_t kMaxRows = 8;  // rows of x sharing one unpacked weight vector

// Everything one call needs, with the shape arithmetic done once (no division in the loops).
struct Ctx {
  const CpuParams* p;
  int64_t groups;
  int64_t words_k;
  int64_t words_g;
  const float* x;     // [m, K] chunk of the activations
  const float* xsum;  // [m, groups] group sums of that chunk
  // The chunk re-laid out as [K / 8][m][8] (AVX2 paths only): the m vectors one 8-column step
  // needs are adjacent, so the inner loop reads x sequentially. Rows of x at a power-of-two
  // stride (K = 4096 floats = 16 KB) would otherwise all map to the same L1 sets.
  const float* x8;
  int64_t m;          // rows in the chunk, 1..8
  float* y;           // [m, N] chunk of the output
};

Ctx make_ctx(const CpuParams& p) {
  Ctx c{};
  c.p = &p;
  c.groups = p.k / p.group_size;
  c.words_k = packed_words(p.k, p.bits);
  c.words_g = packed_words(c.groups, p.bits);
  return c;
}

inline float zero_point(const Ctx& c, int64_t row, int64_t g) {
  const CpuParams& p = *c.p;
  if (p.qzeros == nullptr) return static_cast<float>(1u << (p.bits - 1));
  return static_cast<float>(extract_value(p.qzeros + row * c.words_g, g, p.bits));
}

// Rows [r0, r1) of the output for the chunk in ctx.
using RowsFn = void (*)(const Ctx& c, int64_t r0, int64_t r1);

// Splits output rows into contiguous per-thread ranges whose starts are multiples of `unit` (the
// tile height, so only the last range has a partial tile). Small problems run on the calling
// thread: below ~32K weights the fork/join costs more than the work.
void parallel_rows(const Ctx& c, int64_t unit, RowsFn fn) {
  const int64_t n = c.p->n;
  const int64_t tiles = (n + unit - 1) / unit;
  const bool parallel = n * c.p->k >= (int64_t{1} << 15) && tiles > 1;
#if defined(_OPENMP)
#pragma omp parallel if (parallel)
  {
    const int64_t nth = omp_get_num_threads();
    const int64_t tid = omp_get_thread_num();
    const int64_t per = tiles / nth;
    const int64_t extra = tiles % nth;
    const int64_t t0 = tid * per + std::min(tid, extra);
    const int64_t t1 = t0 + per + (tid < extra ? 1 : 0);
    if (t0 < t1) fn(c, t0 * unit, std::min(t1 * unit, n));
  }
#else
  (void)parallel;
  fn(c, 0, n);
#endif
}

// Group sums of x in double: the zero-point term subtracts z * xsum from a dot product of similar
// magnitude, so an inexact sum would show up directly in the output.
void group_sums(const Ctx& c, const float* x, int64_t m, float* xsum) {
  const int64_t gs = c.p->group_size;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t g = 0; g < c.groups; ++g) {
      double s = 0.0;
      const float* xg = x + i * c.p->k + g * gs;
      for (int64_t kk = 0; kk < gs; ++kk) s += xg[kk];
      xsum[i * c.groups + g] = static_cast<float>(s);
    }
  }
}

// x [m, K] (K % 8 == 0) -> out [K / 8][m][8].
void interleave8(const float* x, int64_t m, int64_t k, float* out) {
  for (int64_t kk = 0; kk < k; kk += 8)
    for (int64_t i = 0; i < m; ++i) std::memcpy(out + (kk * m) + 8 * i, x + i * k + kk, 8 * sizeof(float));
}

// ---------------------------------------------------------------------------------------------
// Portable path: any bit width, any group size, any byte order.

void dequant_rows_scalar(const Ctx& c, int64_t r0, int64_t r1) {
  const CpuParams& p = *c.p;
  for (int64_t n = r0; n < r1; ++n) {
    const uint32_t* row = p.qweight + n * c.words_k;
    float* dst = c.y + n * p.k;
    for (int64_t g = 0; g < c.groups; ++g) {
      const float s = p.scales[n * c.groups + g];
      const float z = zero_point(c, n, g);
      const int64_t k0 = g * p.group_size;
      for (int64_t kk = k0; kk < k0 + p.group_size; ++kk)
        dst[kk] = (static_cast<float>(extract_value(row, kk, p.bits)) - z) * s;
    }
  }
}

void gemv_rows_scalar(const Ctx& c, int64_t r0, int64_t r1) {
  const CpuParams& p = *c.p;
  const int64_t m = c.m;
  for (int64_t n = r0; n < r1; ++n) {
    const uint32_t* row = p.qweight + n * c.words_k;
    float acc[kMaxRows] = {};
    for (int64_t g = 0; g < c.groups; ++g) {
      float dot[kMaxRows] = {};
      const int64_t k0 = g * p.group_size;
      for (int64_t kk = k0; kk < k0 + p.group_size; ++kk) {
        const float q = static_cast<float>(extract_value(row, kk, p.bits));
        for (int64_t i = 0; i < m; ++i) dot[i] += q * c.x[i * p.k + kk];
      }
      const float s = p.scales[n * c.groups + g];
      const float z = zero_point(c, n, g);
      for (int64_t i = 0; i < m; ++i) acc[i] += s * (dot[i] - z * c.xsum[i * c.groups + g]);
    }
    for (int64_t i = 0; i < m; ++i) c.y[i * p.n + n] = acc[i];
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA paths (x86-64 only; chosen at run time).

#if defined(QUANTLAB_X86)

bool use_avx2(const CpuParams& p) {
  static const bool supported = [] {
    const char* isa = std::getenv("QUANTLAB_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "scalar") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported && p.group_size % 8 == 0;
}

// The 8 codes of columns [kk, kk + 8) (kk a multiple of 8) as int32 lanes.
template <int BITS>
QUANTLAB_AVX2 inline __m256i codes8(const uint8_t* row, int64_t kk) {
  const uint8_t* src = row + (kk >> 3) * BITS;
  if constexpr (BITS == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  } else {
    // Exactly BITS bytes: a wider load could run past the end of the last row.
    uint32_t chunk = 0;
    std::memcpy(&chunk, src, BITS);
    const __m256i shifts =
        _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(chunk)), shifts);
    return _mm256_and_si256(v, _mm256_set1_epi32((1 << BITS) - 1));
  }
}

template <int BITS>
QUANTLAB_AVX2 inline __m256 codes8_f32(const uint8_t* row, int64_t kk) {
  return _mm256_cvtepi32_ps(codes8<BITS>(row, kk));
}

QUANTLAB_AVX2 inline float hsum(__m256 v) {
  const __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 sh = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(sh, _mm_shuffle_ps(sh, sh, 0x55)));
}

template <int BITS>
QUANTLAB_AVX2 void dequant_rows_avx2(const Ctx& c, int64_t r0, int64_t r1) {
  const CpuParams& p = *c.p;
  for (int64_t n = r0; n < r1; ++n) {
    const auto* row = reinterpret_cast<const uint8_t*>(p.qweight + n * c.words_k);
    float* dst = c.y + n * p.k;
    for (int64_t g = 0; g < c.groups; ++g) {
      // Subtract, then multiply (not one FMA): bit-exact with the reference's (q - z) * s.
      const __m256 s = _mm256_set1_ps(p.scales[n * c.groups + g]);
      const __m256 z = _mm256_set1_ps(zero_point(c, n, g));
      const int64_t k0 = g * p.group_size;
      for (int64_t kk = k0; kk < k0 + p.group_size; kk += 8)
        _mm256_storeu_ps(dst + kk, _mm256_mul_ps(_mm256_sub_ps(codes8_f32<BITS>(row, kk), z), s));
    }
  }
}

// Zero-point term of one output row for the group-sum kernel: sum_g s_g z_g xsum[i, g], per x row.
// Kept out of the vector loop so that loop's per-group epilogue is a single FMA per row.
template <int M>
inline void zero_terms(const Ctx& c, int64_t n, float* out) {
  const CpuParams& p = *c.p;
  const float* srow = p.scales + n * c.groups;
  for (int i = 0; i < M; ++i) {
    const float* xs = c.xsum + i * c.groups;
    float t = 0.0f;
    if (p.qzeros == nullptr) {
      for (int64_t g = 0; g < c.groups; ++g) t += srow[g] * xs[g];
      t *= static_cast<float>(1u << (p.bits - 1));
    } else {
      const uint32_t* zrow = p.qzeros + n * c.words_g;
      for (int64_t g = 0; g < c.groups; ++g)
        t += srow[g] * static_cast<float>(extract_value(zrow, g, p.bits)) * xs[g];
    }
    out[i] = t;
  }
}

// Group-sum kernel, R output rows starting at n0, M rows of x (M <= 2).
template <int BITS, int M, int R>
QUANTLAB_AVX2 inline void tile_groupsum(const Ctx& c, int64_t n0) {
  const CpuParams& p = *c.p;
  const int64_t gs = p.group_size;
  const uint8_t* rows[R];
  const float* srows[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = reinterpret_cast<const uint8_t*>(p.qweight + (n0 + r) * c.words_k);
    srows[r] = p.scales + (n0 + r) * c.groups;
  }
  __m256 total[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) total[r][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < c.groups; ++g) {
    __m256 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < M; ++i) acc[r][i] = _mm256_setzero_ps();
    const int64_t k_end = (g + 1) * gs;
    for (int64_t kk = g * gs; kk < k_end; kk += 8) {
      __m256 w[R];
      for (int r = 0; r < R; ++r) w[r] = codes8_f32<BITS>(rows[r], kk);
      for (int i = 0; i < M; ++i) {
        const __m256 xv = _mm256_loadu_ps(c.x8 + (kk >> 3) * (8 * M) + 8 * i);
        for (int r = 0; r < R; ++r) acc[r][i] = _mm256_fmadd_ps(w[r], xv, acc[r][i]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_broadcast_ss(srows[r] + g);
      for (int i = 0; i < M; ++i) total[r][i] = _mm256_fmadd_ps(sv, acc[r][i], total[r][i]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float zt[M];
    zero_terms<M>(c, n0 + r, zt);
    for (int i = 0; i < M; ++i) c.y[i * p.n + n0 + r] = hsum(total[r][i]) - zt[i];
  }
}

// Dequantizing kernel, R output rows starting at n0, columns [k_begin, k_end) (multiples of 8).
// Writes (first block) or adds its partial dot products into y.
template <int BITS, int M, int R>
QUANTLAB_AVX2 inline void tile_dequant(const Ctx& c, int64_t n0, int64_t k_begin, int64_t k_end,
                                       bool accumulate) {
  const CpuParams& p = *c.p;
  const int64_t gs = p.group_size;
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r)
    rows[r] = reinterpret_cast<const uint8_t*>(p.qweight + (n0 + r) * c.words_k);
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm256_setzero_ps();
  int64_t g = k_begin / gs;
  for (int64_t kk = k_begin; kk < k_end; ++g) {
    const int64_t seg_end = std::min((g + 1) * gs, k_end);
    __m256 sv[R];
    __m256 bv[R];
    for (int r = 0; r < R; ++r) {
      const float s = p.scales[(n0 + r) * c.groups + g];
      sv[r] = _mm256_set1_ps(s);
      bv[r] = _mm256_set1_ps(-s * zero_point(c, n0 + r, g));
    }
    for (; kk < seg_end; kk += 8) {
      __m256 w[R];
      for (int r = 0; r < R; ++r) w[r] = _mm256_fmadd_ps(codes8_f32<BITS>(rows[r], kk), sv[r], bv[r]);
      for (int i = 0; i < M; ++i) {
        const __m256 xv = _mm256_loadu_ps(c.x8 + (kk >> 3) * (8 * M) + 8 * i);
        for (int r = 0; r < R; ++r) acc[r][i] = _mm256_fmadd_ps(w[r], xv, acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) {
      float& dst = c.y[i * p.n + n0 + r];
      const float v = hsum(acc[r][i]);
      dst = accumulate ? dst + v : v;
    }
}

// Output rows per tile, chosen so accumulators + weight vectors + one x vector fit 16 registers
// (group-sum kernel: 2*R*M + R + 1; dequantizing kernel: R*M + 3*R + 1).
template <int M>
constexpr int kTileRows = M == 1 ? 4 : (M <= 4 ? 2 : 1);

template <int M>
constexpr bool kGroupSum = M <= 2;

template <int BITS, int M>
QUANTLAB_AVX2 void gemv_rows_avx2(const Ctx& c, int64_t r0, int64_t r1) {
  constexpr int R = kTileRows<M>;
  const int64_t full_end = r0 + (r1 - r0) / R * R;
  if constexpr (kGroupSum<M>) {
    for (int64_t n = r0; n < full_end; n += R) tile_groupsum<BITS, M, R>(c, n);
    for (int64_t n = full_end; n < r1; ++n) tile_groupsum<BITS, M, 1>(c, n);
  } else {
    // About 32 KB of x per block (one L1): x8 is read sequentially, so what does not stay in L1
    // is prefetched from L2. 16 KB and 64 KB blocks measured the same within noise here.
    const int64_t block = std::max<int64_t>(256, (8192 / M) / 8 * 8);
    for (int64_t kb = 0; kb < c.p->k; kb += block) {
      const int64_t ke = std::min(kb + block, c.p->k);
      for (int64_t n = r0; n < full_end; n += R) tile_dequant<BITS, M, R>(c, n, kb, ke, kb > 0);
      for (int64_t n = full_end; n < r1; ++n) tile_dequant<BITS, M, 1>(c, n, kb, ke, kb > 0);
    }
  }
}

template <int BITS>
RowsFn gemv_avx2_fn(int64_t m, int64_t* tile_rows) {
  switch (m) {
    case 1: *tile_rows = kTileRows<1>; return &gemv_rows_avx2<BITS, 1>;
    case 2: *tile_rows = kTileRows<2>; return &gemv_rows_avx2<BITS, 2>;
    case 3: *tile_rows = kTileRows<3>; return &gemv_rows_avx2<BITS, 3>;
    case 4: *tile_rows = kTileRows<4>; return &gemv_rows_avx2<BITS, 4>;
    case 5: *tile_rows = kTileRows<5>; return &gemv_rows_avx2<BITS, 5>;
    case 6: *tile_rows = kTileRows<6>; return &gemv_rows_avx2<BITS, 6>;
    case 7: *tile_rows = kTileRows<7>; return &gemv_rows_avx2<BITS, 7>;
    default: *tile_rows = kTileRows<8>; return &gemv_rows_avx2<BITS, 8>;
  }
}

RowsFn select_gemv_avx2(int bits, int64_t m, int64_t* tile_rows) {
  switch (bits) {
    case 2: return gemv_avx2_fn<2>(m, tile_rows);
    case 3: return gemv_avx2_fn<3>(m, tile_rows);
    case 4: return gemv_avx2_fn<4>(m, tile_rows);
    default: return gemv_avx2_fn<8>(m, tile_rows);
  }
}

RowsFn select_dequant_avx2(int bits) {
  switch (bits) {
    case 2: return &dequant_rows_avx2<2>;
    case 3: return &dequant_rows_avx2<3>;
    case 4: return &dequant_rows_avx2<4>;
    default: return &dequant_rows_avx2<8>;
  }
}

#endif  // QUANTLAB_X86

}  // namespace

void dequant_cpu(const CpuParams& p, float* out) {
  Ctx c = make_ctx(p);
  c.y = out;
  RowsFn fn = &dequant_rows_scalar;
#if defined(QUANTLAB_X86)
  if (use_avx2(p)) fn = select_dequant_avx2(p.bits);
#endif
  parallel_rows(c, 1, fn);
}

void gemv_cpu(const CpuParams& p, const float* x, int64_t m, float* y) {
  if (m <= 0 || p.n <= 0) return;
  Ctx base = make_ctx(p);
  std::vector<float> xsum(static_cast<size_t>(m * base.groups));
  group_sums(base, x, m, xsum.data());
  std::vector<float> x8;
#if defined(QUANTLAB_X86)
  if (use_avx2(p)) x8.resize(static_cast<size_t>(std::min(m, kMaxRows) * p.k));
#endif
  for (int64_t i0 = 0; i0 < m; i0 += kMaxRows) {
    Ctx c = base;
    c.m = std::min(kMaxRows, m - i0);
    c.x = x + i0 * p.k;
    c.xsum = xsum.data() + i0 * base.groups;
    c.y = y + i0 * p.n;
    RowsFn fn = &gemv_rows_scalar;
    int64_t tile_rows = 1;
#if defined(QUANTLAB_X86)
    if (use_avx2(p)) {
      fn = select_gemv_avx2(p.bits, c.m, &tile_rows);
      interleave8(c.x, c.m, p.k, x8.data());
      c.x8 = x8.data();
    }
#endif
    parallel_rows(c, tile_rows, fn);
  }
}

const char* gemv_cpu_path(const CpuParams& p) {
#if defined(QUANTLAB_X86)
  if (use_avx2(p)) return "avx2";
#endif
  (void)p;
  return "scalar";
}

}  // namespace quantlab::groupwise_int

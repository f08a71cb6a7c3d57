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
//
// Byte planes (4- and 2-bit codes, group_size a multiple of 16 / 32). Unpacking 8 consecutive
// codes costs a broadcast, a variable shift and a mask before the int -> float conversion, and
// with one or two rows of x that unpack is most of the work. But a dot product does not care about
// column order, so instead 8 consecutive *bytes* are widened to 8 int32 lanes with one vpmovzxbd
// from memory, and plane j (bits [j*BITS, (j+1)*BITS) of every byte) is one shift and one mask
// away: 16 (4-bit) or 32 (2-bit) codes per load, lane b of plane j holding column P*b + j of the
// step. x is re-laid out once per call in the same order ([K / step][m][P][8]), so the kernels
// multiply matching lanes. 8- and 3-bit codes (and groups the planes do not tile) keep P = 1,
// i.e. the column order.
//
// AVX-512 (4- and 2-bit codes, groups a whole number of 16-byte steps). The same two tile
// kernels with 16-lane vectors: one vpmovzxbd widens 16 bytes (32 or 64 codes), x is laid out
// [K / step][m][P][16], and 32 registers let the dequantizing kernel keep 2-4 output rows per
// tile (1 with AVX2 at M >= 5), so each x vector feeds more weights. The zero-point terms and
// per-group offsets are the AVX2 helpers (8 groups at a time), called from the AVX-512 code.
// Where the CPU has AVX-512 but the weight does not qualify (3/8-bit, other groups), AVX2 runs.
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
// A superset of QUANTLAB_AVX2, so AVX-512 functions may call (and inline) the AVX2 helpers.
#define QUANTLAB_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
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
  // The chunk re-laid out as [K / step][m][P][L] (vector paths only; L = 8 lanes for AVX2, 16
  // for AVX-512; step = L * P columns, P the byte planes of the kernel): the m * P vectors one
  // step needs are adjacent, so the inner loop reads x sequentially. Rows of x at a power-of-two stride (K = 4096 floats = 16 KB) would
  // otherwise all map to the same L1 sets.
  const float* xp;
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

// x [m, K] (K % (lanes * planes) == 0) -> out [K / step][m][planes][lanes], step = lanes *
// planes, where lane b of plane j is column planes * b + j of the step (the order the byte planes
// unpack in).
void interleave(const float* x, int64_t m, int64_t k, int planes, int lanes, float* out) {
  const int64_t step = lanes * planes;
  for (int64_t kk = 0; kk < k; kk += step)
    for (int64_t i = 0; i < m; ++i) {
      const float* src = x + i * k + kk;
      float* dst = out + kk * m + i * step;
      for (int j = 0; j < planes; ++j)
        for (int b = 0; b < lanes; ++b) dst[lanes * j + b] = src[planes * b + j];
    }
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

enum class Isa { kScalar, kAvx2, kAvx512 };

// The widest vector ISA of this CPU; QUANTLAB_CPU_ISA=scalar forces the portable path and
// QUANTLAB_CPU_ISA=avx2 caps it at AVX2 (read once, on first use).
Isa cpu_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("QUANTLAB_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "scalar") == 0) return Isa::kScalar;
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return Isa::kScalar;
    const bool cap_avx2 = env != nullptr && std::strcmp(env, "avx2") == 0;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 && !cap_avx2 ? Isa::kAvx512 : Isa::kAvx2;
  }();
  return isa;
}

bool use_avx2(const CpuParams& p) { return cpu_isa() != Isa::kScalar && p.group_size % 8 == 0; }

// Byte planes a bit width can unpack in: as many as it has codes per byte when that is a whole
// number, else 1 (column order).
constexpr int most_planes(int bits) { return (bits == 2 || bits == 4) ? 8 / bits : 1; }

template <int BITS>
constexpr int kMostPlanes = most_planes(BITS);

// The AVX-512 kernels take 4- and 2-bit codes whose groups are whole 16-byte steps (16 * P codes:
// 32 columns at 4 bits, 64 at 2 bits); everything else stays on AVX2.
bool use_avx512(const CpuParams& p) {
  if (cpu_isa() != Isa::kAvx512 || (p.bits != 2 && p.bits != 4)) return false;
  return p.group_size % (16 * most_planes(p.bits)) == 0;
}

// The 8 codes of columns [kk, kk + 8) (kk a multiple of 8) as int32 lanes.
template <int BITS>
QUANTLAB_AVX2 inline __m256i codes8(const uint8_t* row, int64_t kk) {
  const uint8_t* src = row + (kk >> 3) * BITS;
  if constexpr (BITS == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  } else {
    // Exactly BITS bytes: a wider load could run past the end of the last row. Three bytes are
    // assembled in a register: a 3-byte memcpy into the word goes through the stack as a 2- and a
    // 1-byte store read back by a 4-byte load, which cannot be store-forwarded (measured 6x
    // slower at 3 bits than this).
    uint32_t chunk = 0;
    if constexpr (BITS == 3) {
      uint16_t lo = 0;
      std::memcpy(&lo, src, 2);
      chunk = lo | (static_cast<uint32_t>(src[2]) << 16);
    } else {
      std::memcpy(&chunk, src, BITS);
    }
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

// The step at column kk (a multiple of 8 * P): with P > 1, its 8 bytes widened to int32 lanes;
// with P = 1, its 8 codes in column order.
template <int BITS, int P>
QUANTLAB_AVX2 inline __m256i load_step(const uint8_t* row, int64_t kk) {
  if constexpr (P == 1) {
    return codes8<BITS>(row, kk);
  } else {
    // 8 bytes = exactly the step's 8 * P codes: never past the end of the row.
    const auto* src = reinterpret_cast<const __m128i*>(row + kk * BITS / 8);
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(src));
  }
}

// Plane j of a step as fp32. Callers loop j over 0 .. P-1 with unrolling, so j is a constant in
// the generated code (one vpsrld imm, one vpand, no mask for the top plane).
template <int BITS, int P>
QUANTLAB_AVX2 inline __m256 plane_f32(__m256i step, int j) {
  if constexpr (P == 1) {
    (void)j;
    return _mm256_cvtepi32_ps(step);
  } else {
    const __m256i v = j == 0 ? step : _mm256_srli_epi32(step, j * BITS);
    // The top plane needs no mask: the lanes are zero-extended bytes.
    if (j == P - 1) return _mm256_cvtepi32_ps(v);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32((1 << BITS) - 1)));
  }
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

// Zero points of groups [g, g + 8) of a row (g a multiple of 8, g + 8 <= groups) as fp32: the
// zero row is a bitstream like the weight rows, so 8 codes are one codes8 chunk. Decoding them one
// by one costs about as much as a group's dot product when the group is short.
template <int BITS>
QUANTLAB_AVX2 inline __m256 zero_points8(const Ctx& c, int64_t row, int64_t g) {
  const CpuParams& p = *c.p;
  if (p.qzeros == nullptr) return _mm256_set1_ps(static_cast<float>(1u << (BITS - 1)));
  return codes8_f32<BITS>(reinterpret_cast<const uint8_t*>(p.qzeros + row * c.words_g), g);
}

// Zero-point term of one output row for the group-sum kernel: sum_g s_g z_g xsum[i, g], per x row.
// Kept out of the vector loop so that loop's per-group epilogue is a single FMA per row.
template <int BITS, int M>
QUANTLAB_AVX2 inline void zero_terms(const Ctx& c, int64_t n, float* out) {
  const float* srow = c.p->scales + n * c.groups;
  const int64_t full = c.groups / 8 * 8;
  __m256 t[M];
  for (int i = 0; i < M; ++i) t[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < full; g += 8) {
    const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(srow + g), zero_points8<BITS>(c, n, g));
    for (int i = 0; i < M; ++i)
      t[i] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(c.xsum + i * c.groups + g), t[i]);
  }
  for (int i = 0; i < M; ++i) {
    float v = hsum(t[i]);
    for (int64_t g = full; g < c.groups; ++g)
      v += srow[g] * zero_point(c, n, g) * c.xsum[i * c.groups + g];
    out[i] = v;
  }
}

// Group-sum kernel, R output rows starting at n0, M rows of x (M <= 2), P byte planes. With
// P > 1, planes alternate between two accumulators so consecutive FMAs of a row do not wait on
// each other (at R = 4, M = 1 one chain per row would leave the FMA latency exposed).
template <int BITS, int P, int M, int R>
QUANTLAB_AVX2 inline void tile_groupsum(const Ctx& c, int64_t n0) {
  constexpr int kStep = 8 * P;
  constexpr int A = P > 1 ? 2 : 1;
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
    __m256 acc[R][M][A];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < M; ++i)
        for (int a = 0; a < A; ++a) acc[r][i][a] = _mm256_setzero_ps();
    const int64_t k_end = (g + 1) * gs;
    for (int64_t kk = g * gs; kk < k_end; kk += kStep) {
      const float* xs = c.xp + kk * M;
      for (int r = 0; r < R; ++r) {
        const __m256i step = load_step<BITS, P>(rows[r], kk);
#pragma GCC unroll 4
        for (int j = 0; j < P; ++j) {
          const __m256 w = plane_f32<BITS, P>(step, j);
          for (int i = 0; i < M; ++i)
            acc[r][i][j % A] =
                _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + (i * P + j) * 8), acc[r][i][j % A]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_broadcast_ss(srows[r] + g);
      for (int i = 0; i < M; ++i) {
        __m256 dot = acc[r][i][0];
        if constexpr (A == 2) dot = _mm256_add_ps(dot, acc[r][i][1]);
        total[r][i] = _mm256_fmadd_ps(sv, dot, total[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float zt[M];
    zero_terms<BITS, M>(c, n0 + r, zt);
    for (int i = 0; i < M; ++i) c.y[i * p.n + n0 + r] = hsum(total[r][i]) - zt[i];
  }
}

// -s_g * z_g of a row's groups [g8, g8 + 8) (g8 a multiple of 8; fewer past the last group):
// the dequantizing kernel's per-group offsets, decoded 8 at a time (see zero_points8).
template <int BITS>
QUANTLAB_AVX2 inline void group_offsets8(const Ctx& c, int64_t row, int64_t g8, float* out) {
  const float* srow = c.p->scales + row * c.groups;
  if (g8 + 8 <= c.groups) {
    const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(srow + g8), zero_points8<BITS>(c, row, g8));
    _mm256_storeu_ps(out, _mm256_sub_ps(_mm256_setzero_ps(), sz));
    return;
  }
  for (int64_t g = g8; g < c.groups; ++g) out[g - g8] = -srow[g] * zero_point(c, row, g);
}

// Dequantizing kernel, R output rows starting at n0, columns [k_begin, k_end) (multiples of
// 8 * P), P byte planes. Writes (first block) or adds its partial dot products into y.
template <int BITS, int P, int M, int R>
QUANTLAB_AVX2 inline void tile_dequant(const Ctx& c, int64_t n0, int64_t k_begin, int64_t k_end,
                                       bool accumulate) {
  constexpr int kStep = 8 * P;
  const CpuParams& p = *c.p;
  const int64_t gs = p.group_size;
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r)
    rows[r] = reinterpret_cast<const uint8_t*>(p.qweight + (n0 + r) * c.words_k);
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm256_setzero_ps();
  float offsets[R][8];  // group_offsets8 of each row's groups [zg, zg + 8)
  int64_t zg = -1;
  int64_t g = k_begin / gs;
  for (int64_t kk = k_begin; kk < k_end; ++g) {
    const int64_t seg_end = std::min((g + 1) * gs, k_end);
    if (g / 8 * 8 != zg) {
      zg = g / 8 * 8;
      for (int r = 0; r < R; ++r) group_offsets8<BITS>(c, n0 + r, zg, offsets[r]);
    }
    __m256 sv[R];
    __m256 bv[R];
    for (int r = 0; r < R; ++r) {
      sv[r] = _mm256_set1_ps(p.scales[(n0 + r) * c.groups + g]);
      bv[r] = _mm256_set1_ps(offsets[r][g - zg]);
    }
    for (; kk < seg_end; kk += kStep) {
      const float* xs = c.xp + kk * M;
      for (int r = 0; r < R; ++r) {
        const __m256i step = load_step<BITS, P>(rows[r], kk);
#pragma GCC unroll 4
        for (int j = 0; j < P; ++j) {
          const __m256 w = _mm256_fmadd_ps(plane_f32<BITS, P>(step, j), sv[r], bv[r]);
          for (int i = 0; i < M; ++i)
            acc[r][i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + (i * P + j) * 8), acc[r][i]);
        }
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

// Output rows per tile, chosen so the live registers fit the 16 ymm ones (group-sum kernel:
// R * M * A accumulators + R * M totals + a step, a plane and a mask; dequantizing kernel: R * M
// accumulators + 2R scale/offset vectors + the same three).
template <int M>
constexpr int kTileRows = M == 1 ? 4 : (M <= 4 ? 2 : 1);

template <int M>
constexpr bool kGroupSum = M <= 2;

template <int BITS, int P, int M>
QUANTLAB_AVX2 void gemv_rows_avx2(const Ctx& c, int64_t r0, int64_t r1) {
  constexpr int R = kTileRows<M>;
  const int64_t full_end = r0 + (r1 - r0) / R * R;
  if constexpr (kGroupSum<M>) {
    for (int64_t n = r0; n < full_end; n += R) tile_groupsum<BITS, P, M, R>(c, n);
    for (int64_t n = full_end; n < r1; ++n) tile_groupsum<BITS, P, M, 1>(c, n);
  } else {
    // About 32 KB of x per block (one L1): x is read sequentially, so what does not stay in L1
    // is prefetched from L2. 16 KB and 64 KB blocks measured the same within noise here. Blocks
    // are whole steps of every plane count (multiples of 32 columns).
    const int64_t block = std::max<int64_t>(256, (8192 / M) / 32 * 32);
    for (int64_t kb = 0; kb < c.p->k; kb += block) {
      const int64_t ke = std::min(kb + block, c.p->k);
      for (int64_t n = r0; n < full_end; n += R) tile_dequant<BITS, P, M, R>(c, n, kb, ke, kb > 0);
      for (int64_t n = full_end; n < r1; ++n) tile_dequant<BITS, P, M, 1>(c, n, kb, ke, kb > 0);
    }
  }
}

template <int BITS, int P>
RowsFn gemv_avx2_fn(int64_t m, int64_t* tile_rows) {
  switch (m) {
    case 1: *tile_rows = kTileRows<1>; return &gemv_rows_avx2<BITS, P, 1>;
    case 2: *tile_rows = kTileRows<2>; return &gemv_rows_avx2<BITS, P, 2>;
    case 3: *tile_rows = kTileRows<3>; return &gemv_rows_avx2<BITS, P, 3>;
    case 4: *tile_rows = kTileRows<4>; return &gemv_rows_avx2<BITS, P, 4>;
    case 5: *tile_rows = kTileRows<5>; return &gemv_rows_avx2<BITS, P, 5>;
    case 6: *tile_rows = kTileRows<6>; return &gemv_rows_avx2<BITS, P, 6>;
    case 7: *tile_rows = kTileRows<7>; return &gemv_rows_avx2<BITS, P, 7>;
    default: *tile_rows = kTileRows<8>; return &gemv_rows_avx2<BITS, P, 8>;
  }
}

// The kernel for BITS-bit codes and m rows, with the byte planes it uses in *planes: all the bit
// width allows when a group is a whole number of steps (then K is too), else 1.
template <int BITS>
RowsFn gemv_avx2_for(int64_t group_size, int64_t m, int64_t* tile_rows, int* planes) {
  constexpr int kP = kMostPlanes<BITS>;
  if constexpr (kP > 1) {
    if (group_size % (8 * kP) == 0) {
      *planes = kP;
      return gemv_avx2_fn<BITS, kP>(m, tile_rows);
    }
  }
  *planes = 1;
  return gemv_avx2_fn<BITS, 1>(m, tile_rows);
}

RowsFn select_gemv_avx2(const CpuParams& p, int64_t m, int64_t* tile_rows, int* planes) {
  switch (p.bits) {
    case 2: return gemv_avx2_for<2>(p.group_size, m, tile_rows, planes);
    case 3: return gemv_avx2_for<3>(p.group_size, m, tile_rows, planes);
    case 4: return gemv_avx2_for<4>(p.group_size, m, tile_rows, planes);
    default: return gemv_avx2_for<8>(p.group_size, m, tile_rows, planes);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 tile kernels (4- and 2-bit codes in byte planes; see the top of the file).

// GCC 12's AVX-512 headers build unmasked conversions on a self-initialised `_mm512_undefined_*`
// value, which -Wall reports as uninitialised once inlined here (a false positive: every lane is
// written).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The 16-byte step at column kk (a multiple of 16 * P) widened to int32 lanes: exactly the step's
// 16 * P codes, so never past the end of the row.
template <int BITS>
QUANTLAB_AVX512 inline __m512i load_step16(const uint8_t* row, int64_t kk) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + kk * BITS / 8)));
}

// Plane j of a 16-lane step as fp32 (j a compile-time constant after unrolling).
template <int BITS, int P>
QUANTLAB_AVX512 inline __m512 plane16_f32(__m512i step, int j) {
  const __m512i v = j == 0 ? step : _mm512_srli_epi32(step, j * BITS);
  if (j == P - 1) return _mm512_cvtepi32_ps(v);  // zero-extended bytes: no mask needed
  return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32((1 << BITS) - 1)));
}

// Group-sum kernel with 16-lane vectors (M <= 2); as tile_groupsum.
template <int BITS, int P, int M, int R>
QUANTLAB_AVX512 inline void tile_groupsum16(const Ctx& c, int64_t n0) {
  constexpr int kStep = 16 * P;
  const CpuParams& p = *c.p;
  const int64_t gs = p.group_size;
  const uint8_t* rows[R];
  const float* srows[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = reinterpret_cast<const uint8_t*>(p.qweight + (n0 + r) * c.words_k);
    srows[r] = p.scales + (n0 + r) * c.groups;
  }
  __m512 total[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) total[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < c.groups; ++g) {
    __m512 acc[R][M][2];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < M; ++i) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
    const int64_t k_end = (g + 1) * gs;
    for (int64_t kk = g * gs; kk < k_end; kk += kStep) {
      const float* xs = c.xp + kk * M;
      for (int r = 0; r < R; ++r) {
        const __m512i step = load_step16<BITS>(rows[r], kk);
#pragma GCC unroll 4
        for (int j = 0; j < P; ++j) {
          const __m512 w = plane16_f32<BITS, P>(step, j);
          for (int i = 0; i < M; ++i)
            acc[r][i][j % 2] =
                _mm512_fmadd_ps(w, _mm512_loadu_ps(xs + (i * P + j) * 16), acc[r][i][j % 2]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 sv = _mm512_set1_ps(srows[r][g]);
      for (int i = 0; i < M; ++i)
        total[r][i] = _mm512_fmadd_ps(sv, _mm512_add_ps(acc[r][i][0], acc[r][i][1]), total[r][i]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float zt[M];
    zero_terms<BITS, M>(c, n0 + r, zt);
    for (int i = 0; i < M; ++i) c.y[i * p.n + n0 + r] = _mm512_reduce_add_ps(total[r][i]) - zt[i];
  }
}

// Dequantizing kernel with 16-lane vectors (M >= 3); as tile_dequant.
template <int BITS, int P, int M, int R>
QUANTLAB_AVX512 inline void tile_dequant16(const Ctx& c, int64_t n0, int64_t k_begin,
                                           int64_t k_end, bool accumulate) {
  constexpr int kStep = 16 * P;
  const CpuParams& p = *c.p;
  const int64_t gs = p.group_size;
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r)
    rows[r] = reinterpret_cast<const uint8_t*>(p.qweight + (n0 + r) * c.words_k);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  float offsets[R][8];  // group_offsets8 of each row's groups [zg, zg + 8)
  int64_t zg = -1;
  int64_t g = k_begin / gs;
  for (int64_t kk = k_begin; kk < k_end; ++g) {
    const int64_t seg_end = std::min((g + 1) * gs, k_end);
    if (g / 8 * 8 != zg) {
      zg = g / 8 * 8;
      for (int r = 0; r < R; ++r) group_offsets8<BITS>(c, n0 + r, zg, offsets[r]);
    }
    __m512 sv[R];
    __m512 bv[R];
    for (int r = 0; r < R; ++r) {
      sv[r] = _mm512_set1_ps(p.scales[(n0 + r) * c.groups + g]);
      bv[r] = _mm512_set1_ps(offsets[r][g - zg]);
    }
    for (; kk < seg_end; kk += kStep) {
      const float* xs = c.xp + kk * M;
      __m512i steps[R];
      for (int r = 0; r < R; ++r) steps[r] = load_step16<BITS>(rows[r], kk);
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) {
        // Each x vector is loaded once and feeds all R rows' weights.
        __m512 w[R];
        for (int r = 0; r < R; ++r)
          w[r] = _mm512_fmadd_ps(plane16_f32<BITS, P>(steps[r], j), sv[r], bv[r]);
        for (int i = 0; i < M; ++i) {
          const __m512 xv = _mm512_loadu_ps(xs + (i * P + j) * 16);
          for (int r = 0; r < R; ++r) acc[r][i] = _mm512_fmadd_ps(w[r], xv, acc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) {
      float& dst = c.y[i * p.n + n0 + r];
      const float v = _mm512_reduce_add_ps(acc[r][i]);
      dst = accumulate ? dst + v : v;
    }
}

// Output rows per AVX-512 tile, about what the 32 zmm registers hold: dequantizing kernel R * M
// accumulators + 2R scale/offset vectors + R steps + R weights + an x vector; group-sum kernel
// R * M * 2 accumulators + R * M totals + a step, a weight and an x vector. At M = 4, R = 4 is
// one register over and still measured faster than R = 3 (4096 x 14336 g128: 4.6 vs 6.4 ms).
template <int M>
constexpr int kTileRows16 = M <= 4 ? 4 : 2;

template <int BITS, int P, int M>
QUANTLAB_AVX512 void gemv_rows_avx512(const Ctx& c, int64_t r0, int64_t r1) {
  constexpr int R = kTileRows16<M>;
  const int64_t full_end = r0 + (r1 - r0) / R * R;
  if constexpr (kGroupSum<M>) {
    for (int64_t n = r0; n < full_end; n += R) tile_groupsum16<BITS, P, M, R>(c, n);
    for (int64_t n = full_end; n < r1; ++n) tile_groupsum16<BITS, P, M, 1>(c, n);
  } else {
    // K blocks of about 32 KB of x, as in gemv_rows_avx2 (multiples of 64 columns: whole steps).
    const int64_t block = std::max<int64_t>(256, (8192 / M) / 64 * 64);
    for (int64_t kb = 0; kb < c.p->k; kb += block) {
      const int64_t ke = std::min(kb + block, c.p->k);
      for (int64_t n = r0; n < full_end; n += R)
        tile_dequant16<BITS, P, M, R>(c, n, kb, ke, kb > 0);
      for (int64_t n = full_end; n < r1; ++n) tile_dequant16<BITS, P, M, 1>(c, n, kb, ke, kb > 0);
    }
  }
}

template <int BITS>
RowsFn gemv_avx512_for(int64_t m, int64_t* tile_rows) {
  constexpr int kP = kMostPlanes<BITS>;
  switch (m) {
    case 1: *tile_rows = kTileRows16<1>; return &gemv_rows_avx512<BITS, kP, 1>;
    case 2: *tile_rows = kTileRows16<2>; return &gemv_rows_avx512<BITS, kP, 2>;
    case 3: *tile_rows = kTileRows16<3>; return &gemv_rows_avx512<BITS, kP, 3>;
    case 4: *tile_rows = kTileRows16<4>; return &gemv_rows_avx512<BITS, kP, 4>;
    case 5: *tile_rows = kTileRows16<5>; return &gemv_rows_avx512<BITS, kP, 5>;
    case 6: *tile_rows = kTileRows16<6>; return &gemv_rows_avx512<BITS, kP, 6>;
    case 7: *tile_rows = kTileRows16<7>; return &gemv_rows_avx512<BITS, kP, 7>;
    default: *tile_rows = kTileRows16<8>; return &gemv_rows_avx512<BITS, kP, 8>;
  }
}

// The AVX-512 kernel for p (use_avx512(p) holds) and m rows; its byte planes in *planes.
RowsFn select_gemv_avx512(const CpuParams& p, int64_t m, int64_t* tile_rows, int* planes) {
  if (p.bits == 2) {
    *planes = kMostPlanes<2>;
    return gemv_avx512_for<2>(m, tile_rows);
  }
  *planes = kMostPlanes<4>;
  return gemv_avx512_for<4>(m, tile_rows);
}

#pragma GCC diagnostic pop

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
  std::vector<float> xp;
#if defined(QUANTLAB_X86)
  const bool avx512 = use_avx512(p);
  const bool vector = avx512 || use_avx2(p);
  if (vector) xp.resize(static_cast<size_t>(std::min(m, kMaxRows) * p.k));
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
    if (vector) {
      int planes = 1;
      fn = avx512 ? select_gemv_avx512(p, c.m, &tile_rows, &planes)
                  : select_gemv_avx2(p, c.m, &tile_rows, &planes);
      interleave(c.x, c.m, p.k, planes, avx512 ? 16 : 8, xp.data());
      c.xp = xp.data();
    }
#endif
    parallel_rows(c, tile_rows, fn);
  }
}

const char* gemv_cpu_path(const CpuParams& p) {
#if defined(QUANTLAB_X86)
  if (use_avx512(p)) return "avx512";
  if (use_avx2(p)) return "avx2";
#endif
  (void)p;
  return "scalar";
}

}  // namespace quantlab::groupwise_int

// CPU kernels for ternary weights: T-MAC-style table-lookup matmul on int8 activations.
//
// Tables. For every quad of 4 activations a_0..a_3 (int8, after BitNet's per-token
// quantization) one 16-entry table T[p] = sum_i (bit_i(p) ? +a_i : -a_i) serves both sign planes
// of every output row: t . a = (T[p1] + T[p0]) / 2 (see cpu_kernels.h for the planes). Only the
// 8 entries with bit 3 clear are computed; the other 8 are their negations, T[15 - p] = -T[p].
// |T| <= 4 * 127 needs 10 bits, so each table is kept as two 16-byte tables: its low bytes
// (unsigned) and its high bytes (signed, in [-2, 1]); T = lo + 256 * hi exactly.
//
// Lookups (AVX2). One 32-byte load of the weight layout holds, for 16 output rows, both planes'
// indices of two quads (low and high nibbles). After masking, vpshufb looks 32 indices up in a
// table broadcast to both 128-bit lanes, so one shuffle yields the partial sums of 16 rows x 2
// planes for one quad. The low-byte lookups go through vpmaddubsw against ones, which adds the
// two planes of a row into one int16; the high-byte lookups are summed as int8 (at most 32 quads
// of values in [-2, 1]: no overflow) and pair-summed the same way only when a segment ends.
// At most 32 quads (128 columns) form a segment: |sum| <= 32 * 2 * 508 < 2^15, so the int16
// arithmetic is exact (adds wrap modulo 2^16, and the true total fits). A segment never spans
// two scale groups; at its end the int16 sums go to fp32 (exact) and are added, times the
// group's scale for per-group scales, into the output rows' fp32 partial sums.
//
// Cost per 128 weights (16 rows x 8 columns) and x row: 4 shuffles, 2 multiply-adds, 4 adds,
// plus 3 ops of nibble extraction shared by all x rows of a pass (up to 4 rows share each
// weight load). K is processed in blocks so the tables of a block (16 KB per pass) stay in L1
// while every output row of the thread streams through them.
#include "ternary/cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QUANTLAB_X86 1
#define QUANTLAB_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace quantlab::ternary {
namespace {

constexpr int64_t kRowsPerPass = 4;    // x rows sharing one weight load
constexpr int64_t kSegmentQuads = 32;  // longest int16-exact accumulation (see the header)
constexpr int64_t kTableBytes = 32;    // per quad: 16 low bytes, then 16 high bytes
constexpr int64_t kBlockTableBytes = 16 * 1024;  // tables of one K block, all rows of a pass
constexpr float kActClampMin = 1e-5f;  // BitNet's clamp of max|x|

// BitNet's 127 / max(amax, 1e-5), rounded as torch evaluates it (reciprocal, then times 127), so
// the int8 activations equal transformers' BitLinear ones bit for bit.
inline float act_scale(float amax) {
  return (1.0f / std::max(amax, kActClampMin)) * 127.0f;
}

struct Ctx {
  const LutParams* p;
  int64_t tiles;
  int64_t pairs;
  int64_t quads;      // 2 * pairs (K padded to a multiple of 8)
  int64_t seg_quads;  // quads per segment: even, <= kSegmentQuads, never across a group
  int64_t groups;     // scale columns (1 per tensor / per row)
  bool grouped;
  int64_t n_pad;              // tiles * 16
  const uint8_t* tables;      // [M][quads][32]
  float* part;                // [M][n_pad] fp32 partial sums (twice the dot products)
  int64_t m0;                 // first x row of the pass
};

// ---------------------------------------------------------------------------------------------
// Portable path: the same tables, segments and fp32 epilogue, one lookup at a time.

void quantize_row_scalar(const float* x, int64_t k, int64_t kp, int8_t* out, float* inv_out) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < k; ++i) {
    const float a = std::fabs(x[i]);
    if (!(a <= std::numeric_limits<float>::max())) finite = false;
    amax = std::max(amax, a);
  }
  if (!finite) {
    // NaN/Inf activations: make the whole output row NaN instead of garbage.
    std::memset(out, 0, static_cast<size_t>(kp));
    *inv_out = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float inv = act_scale(amax);
  for (int64_t i = 0; i < k; ++i) {
    const float r = std::nearbyint(x[i] * inv);  // default rounding mode: half to even
    out[i] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, r)));
  }
  std::memset(out + k, 0, static_cast<size_t>(kp - k));
  *inv_out = inv;
}

void build_tables_scalar(const int8_t* xq, int64_t quads, uint8_t* out) {
  for (int64_t j = 0; j < quads; ++j) {
    const int8_t* a = xq + 4 * j;
    int16_t t[16];
    t[0] = static_cast<int16_t>(-a[0] - a[1] - a[2] - a[3]);
    // Flipping the sign of a_i (the lowest set bit of p) adds 2 a_i.
    for (int p = 1; p < 8; ++p) t[p] = static_cast<int16_t>(t[p & (p - 1)] + 2 * a[__builtin_ctz(p)]);
    for (int p = 0; p < 8; ++p) t[15 - p] = static_cast<int16_t>(-t[p]);
    uint8_t* dst = out + j * kTableBytes;
    for (int p = 0; p < 16; ++p) {
      dst[p] = static_cast<uint8_t>(t[p] & 0xFF);
      dst[16 + p] = static_cast<uint8_t>((t[p] >> 8) & 0xFF);
    }
  }
}

inline int32_t table_entry(const uint8_t* table, int idx) {
  return static_cast<int16_t>(static_cast<uint16_t>(table[idx]) |
                              static_cast<uint16_t>(table[16 + idx] << 8));
}

// One tile (16 output rows), x rows [m0, m0 + mb), quads [q0, q1) (one K block). The fp32
// arithmetic is the AVX2 kernel's, in the same order: per block, segment sums folded into a
// block sum (times the group's scale for per-group scales), then added to the row's total.
void lut_tile_scalar(const Ctx& c, int64_t mb, int64_t tile, int64_t q0, int64_t q1) {
  const uint8_t* w = c.p->lut + tile * c.pairs * 32;
  for (int64_t i = 0; i < kTileRows; ++i) {
    const int64_t row = tile * kTileRows + i;
    for (int64_t mm = 0; mm < mb; ++mm) {
      const uint8_t* tab = c.tables + (c.m0 + mm) * c.quads * kTableBytes;
      float block = 0.0f;
      for (int64_t s0 = q0; s0 < q1; s0 += c.seg_quads) {
        const int64_t s1 = std::min(s0 + c.seg_quads, q1);
        int32_t acc = 0;
        for (int64_t j = s0; j < s1; ++j) {
          const uint8_t* b = w + (j >> 1) * 32 + 2 * i;
          const int shift = (j & 1) ? 4 : 0;
          const uint8_t* table = tab + j * kTableBytes;
          acc += table_entry(table, (b[0] >> shift) & 0xF) + table_entry(table, (b[1] >> shift) & 0xF);
        }
        const float f = static_cast<float>(acc);
        if (c.grouped) {
          const int64_t g = (s0 * 4) / c.p->group_size;
          block = std::fmaf(f, c.p->scales[(tile * c.groups + g) * kTileRows + i], block);
        } else {
          block = f + block;
        }
      }
      float& dst = c.part[(c.m0 + mm) * c.n_pad + row];
      dst = dst + block;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 path (x86-64 only; chosen at run time).

#if defined(QUANTLAB_X86)

bool use_avx2() {
  static const bool supported = [] {
    const char* isa = std::getenv("QUANTLAB_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "scalar") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
}

QUANTLAB_AVX2 inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0x55));
  return _mm_cvtss_f32(m);
}

QUANTLAB_AVX2 void quantize_row_avx2(const float* x, int64_t k, int64_t kp, int8_t* out,
                                     float* inv_out) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  float amax = hmax8(vmax);
  bool finite = amax <= std::numeric_limits<float>::max();
  for (; i < k; ++i) {
    const float a = std::fabs(x[i]);
    if (!(a <= std::numeric_limits<float>::max())) finite = false;
    amax = std::max(amax, a);
  }
  // max_ps drops a NaN in its second operand, so NaN needs its own scan.
  for (int64_t j = 0; finite && j < k; ++j) finite = !std::isnan(x[j]);
  if (!finite) {
    std::memset(out, 0, static_cast<size_t>(kp));
    *inv_out = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float inv = act_scale(amax);
  const __m256 vinv = _mm256_set1_ps(inv);
  // packs interleaves 128-bit lanes; this puts the 4-byte groups back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  i = 0;
  for (; i + 32 <= k; i += 32) {
    // cvtps_epi32 rounds with the MXCSR mode: half to even, as torch.round.
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vinv));
    const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), vinv));
    const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), vinv));
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_permutevar8x32_epi32(packed, order));
  }
  for (; i < k; ++i) {
    const float r = std::nearbyint(x[i] * inv);
    out[i] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, r)));
  }
  std::memset(out + k, 0, static_cast<size_t>(kp - k));
  *inv_out = inv;
}

// Tables of two quads at a time: the 8 computed entries of quad A in lane 0 and of quad B in
// lane 1 (int16), their mirrored negations, then low/high bytes split and stored per quad.
QUANTLAB_AVX2 void build_tables_avx2(const int8_t* xq, int64_t quads, uint8_t* out) {
  // pshufb controls broadcasting int16 element i of a lane (a_i of quad A; lane 1 holds the
  // same 8 activations, so element 4 + i is a_i of quad B).
  __m256i select[4];
  __m256i sign[3];
  for (int i = 0; i < 4; ++i) {
    const char lo0 = static_cast<char>(2 * i), lo1 = static_cast<char>(2 * i + 1);
    const char hi0 = static_cast<char>(8 + 2 * i), hi1 = static_cast<char>(9 + 2 * i);
    select[i] = _mm256_setr_epi8(lo0, lo1, lo0, lo1, lo0, lo1, lo0, lo1, lo0, lo1, lo0, lo1, lo0,
                                 lo1, lo0, lo1, hi0, hi1, hi0, hi1, hi0, hi1, hi0, hi1, hi0, hi1,
                                 hi0, hi1, hi0, hi1, hi0, hi1);
  }
  for (int i = 0; i < 3; ++i) {
    alignas(32) int16_t s[16];
    for (int p = 0; p < 16; ++p) s[p] = ((p & 7) >> i) & 1 ? 1 : -1;
    sign[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
  }
  // Reverses the 8 int16 of each lane: entry q of the upper half is -T[7 - q].
  const __m256i reverse = _mm256_setr_epi8(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1,
                                           14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
  const __m256i low_byte = _mm256_set1_epi16(0xFF);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t j = 0; j < quads; j += 2) {
    int64_t eight = 0;
    std::memcpy(&eight, xq + 4 * j, 8);
    const __m128i a16 = _mm_cvtepi8_epi16(_mm_cvtsi64_si128(eight));
    const __m256i v = _mm256_broadcastsi128_si256(a16);
    // T[p] for p < 8: +-a_0 +-a_1 +-a_2 - a_3.
    __m256i t = _mm256_sign_epi16(_mm256_shuffle_epi8(v, select[0]), sign[0]);
    t = _mm256_add_epi16(t, _mm256_sign_epi16(_mm256_shuffle_epi8(v, select[1]), sign[1]));
    t = _mm256_add_epi16(t, _mm256_sign_epi16(_mm256_shuffle_epi8(v, select[2]), sign[2]));
    t = _mm256_sub_epi16(t, _mm256_shuffle_epi8(v, select[3]));
    const __m256i mirrored = _mm256_sub_epi16(zero, _mm256_shuffle_epi8(t, reverse));
    const __m256i lo = _mm256_packus_epi16(_mm256_and_si256(t, low_byte),
                                           _mm256_and_si256(mirrored, low_byte));
    const __m256i hi =
        _mm256_packus_epi16(_mm256_srli_epi16(t, 8), _mm256_srli_epi16(mirrored, 8));
    uint8_t* dst = out + j * kTableBytes;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute2x128_si256(lo, hi, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + kTableBytes),
                        _mm256_permute2x128_si256(lo, hi, 0x31));
  }
}

QUANTLAB_AVX2 inline __m256i table_half(const uint8_t* p) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// R tiles (16 output rows each) from `tile`, MB x rows from c.m0, quads [q0, q1) (one K block).
// The fp32 partial sums of the block stay in registers and meet memory once per block.
template <int MB, int R, bool GROUPED>
QUANTLAB_AVX2 void lut_tiles_avx2(const Ctx& c, int64_t tile, int64_t q0, int64_t q1) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi8(1);
  const uint8_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = c.p->lut + (tile + r) * c.pairs * 32;
  const uint8_t* tab[MB];
  for (int mm = 0; mm < MB; ++mm) tab[mm] = c.tables + (c.m0 + mm) * c.quads * kTableBytes;
  __m256 f[MB][R][2];
  for (int mm = 0; mm < MB; ++mm)
    for (int r = 0; r < R; ++r) f[mm][r][0] = f[mm][r][1] = _mm256_setzero_ps();
  for (int64_t s0 = q0; s0 < q1; s0 += c.seg_quads) {
    const int64_t s1 = std::min(s0 + c.seg_quads, q1);
    __m256i lo[MB][R];
    __m256i hi[MB][R];
    for (int mm = 0; mm < MB; ++mm)
      for (int r = 0; r < R; ++r) lo[mm][r] = hi[mm][r] = _mm256_setzero_si256();
    for (int64_t j = s0; j < s1; j += 2) {
      __m256i ia[R];
      __m256i ib[R];
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + (j >> 1) * 32));
        ia[r] = _mm256_and_si256(v, nibble);
        ib[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      }
      for (int mm = 0; mm < MB; ++mm) {
        const uint8_t* t = tab[mm] + j * kTableBytes;
        const __m256i tla = table_half(t), tha = table_half(t + 16);
        const __m256i tlb = table_half(t + 32), thb = table_half(t + 48);
        for (int r = 0; r < R; ++r) {
          const __m256i la = _mm256_maddubs_epi16(_mm256_shuffle_epi8(tla, ia[r]), ones);
          const __m256i lb = _mm256_maddubs_epi16(_mm256_shuffle_epi8(tlb, ib[r]), ones);
          lo[mm][r] = _mm256_add_epi16(lo[mm][r], _mm256_add_epi16(la, lb));
          hi[mm][r] = _mm256_add_epi8(
              hi[mm][r], _mm256_add_epi8(_mm256_shuffle_epi8(tha, ia[r]), _mm256_shuffle_epi8(thb, ib[r])));
        }
      }
    }
    const int64_t g = GROUPED ? (s0 * 4) / c.p->group_size : 0;
    for (int r = 0; r < R; ++r) {
      __m256 s0v = _mm256_setzero_ps(), s1v = _mm256_setzero_ps();
      if constexpr (GROUPED) {
        const float* s = c.p->scales + ((tile + r) * c.groups + g) * kTileRows;
        s0v = _mm256_loadu_ps(s);
        s1v = _mm256_loadu_ps(s + 8);
      }
      for (int mm = 0; mm < MB; ++mm) {
        const __m256i hi16 = _mm256_maddubs_epi16(ones, hi[mm][r]);
        const __m256i total = _mm256_add_epi16(lo[mm][r], _mm256_slli_epi16(hi16, 8));
        const __m256 t0 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(total)));
        const __m256 t1 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(total, 1)));
        if constexpr (GROUPED) {
          f[mm][r][0] = _mm256_fmadd_ps(t0, s0v, f[mm][r][0]);
          f[mm][r][1] = _mm256_fmadd_ps(t1, s1v, f[mm][r][1]);
        } else {
          f[mm][r][0] = _mm256_add_ps(t0, f[mm][r][0]);
          f[mm][r][1] = _mm256_add_ps(t1, f[mm][r][1]);
        }
      }
    }
  }
  for (int mm = 0; mm < MB; ++mm) {
    for (int r = 0; r < R; ++r) {
      float* dst = c.part + (c.m0 + mm) * c.n_pad + (tile + r) * kTileRows;
      // Adding the block's sum to the earlier blocks' keeps the scalar path's order of additions
      // only within a block; across blocks both paths add block sums the same way.
      _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), f[mm][r][0]));
      _mm256_storeu_ps(dst + 8, _mm256_add_ps(_mm256_loadu_ps(dst + 8), f[mm][r][1]));
    }
  }
}

template <int MB, bool GROUPED>
QUANTLAB_AVX2 void lut_rows_avx2(const Ctx& c, int64_t t0, int64_t t1, int64_t q0, int64_t q1) {
  // Two tiles per step at one x row; one tile when several x rows share it.
  constexpr int R = MB == 1 ? 2 : 1;
  int64_t t = t0;
  for (; t + R <= t1; t += R) lut_tiles_avx2<MB, R, GROUPED>(c, t, q0, q1);
  for (; t < t1; ++t) lut_tiles_avx2<MB, 1, GROUPED>(c, t, q0, q1);
}

template <bool GROUPED>
QUANTLAB_AVX2 void lut_rows_avx2_mb(const Ctx& c, int64_t mb, int64_t t0, int64_t t1, int64_t q0,
                                    int64_t q1) {
  switch (mb) {
    case 1: return lut_rows_avx2<1, GROUPED>(c, t0, t1, q0, q1);
    case 2: return lut_rows_avx2<2, GROUPED>(c, t0, t1, q0, q1);
    case 3: return lut_rows_avx2<3, GROUPED>(c, t0, t1, q0, q1);
    default: return lut_rows_avx2<4, GROUPED>(c, t0, t1, q0, q1);
  }
}

#else

bool use_avx2() { return false; }

#endif  // QUANTLAB_X86

void lut_rows(const Ctx& c, int64_t mb, int64_t t0, int64_t t1, int64_t q0, int64_t q1) {
#if defined(QUANTLAB_X86)
  if (use_avx2()) {
    if (c.grouped) return lut_rows_avx2_mb<true>(c, mb, t0, t1, q0, q1);
    return lut_rows_avx2_mb<false>(c, mb, t0, t1, q0, q1);
  }
#endif
  for (int64_t t = t0; t < t1; ++t) lut_tile_scalar(c, mb, t, q0, q1);
}

void quantize_row(const float* x, int64_t k, int64_t kp, int8_t* out, float* inv) {
#if defined(QUANTLAB_X86)
  if (use_avx2()) return quantize_row_avx2(x, k, kp, out, inv);
#endif
  quantize_row_scalar(x, k, kp, out, inv);
}

void build_tables(const int8_t* xq, int64_t quads, uint8_t* out) {
#if defined(QUANTLAB_X86)
  if (use_avx2()) return build_tables_avx2(xq, quads, out);
#endif
  build_tables_scalar(xq, quads, out);
}

int64_t segment_quads(const LutParams& p) {
  if (p.group_size <= 0) return kSegmentQuads;
  const int64_t gq = p.group_size / 4;
  return gq <= kSegmentQuads ? gq : kSegmentQuads;
}

// Splits `tiles` into contiguous per-thread ranges. Small problems run on the calling thread:
// below ~32K weights the fork/join costs more than the work.
template <typename Fn>
void parallel_tiles(int64_t tiles, int64_t weights, Fn&& fn) {
#if defined(_OPENMP)
  const bool parallel = weights >= (int64_t{1} << 15) && tiles > 1;
#pragma omp parallel if (parallel)
  {
    const int64_t nth = omp_get_num_threads();
    const int64_t tid = omp_get_thread_num();
    const int64_t per = tiles / nth;
    const int64_t extra = tiles % nth;
    const int64_t t0 = tid * per + std::min(tid, extra);
    const int64_t t1 = t0 + per + (tid < extra ? 1 : 0);
    if (t0 < t1) fn(t0, t1);
  }
#else
  (void)weights;
  fn(int64_t{0}, tiles);
#endif
}

}  // namespace

const char* lut_mm_cpu_path() { return use_avx2() ? "avx2" : "scalar"; }

void quantize_activations(const float* x, int64_t m, int64_t k, int64_t k_padded, int8_t* xq,
                          float* inv) {
  for (int64_t i = 0; i < m; ++i) quantize_row(x + i * k, k, k_padded, xq + i * k_padded, inv + i);
}

void lut_mm_cpu(const LutParams& p, const float* x, int64_t m, float* y) {
  if (m <= 0 || p.n <= 0) return;
  Ctx c{};
  c.p = &p;
  c.tiles = lut_tiles(p.n);
  c.pairs = lut_pairs(p.k);
  c.quads = 2 * c.pairs;
  c.seg_quads = segment_quads(p);
  c.grouped = p.group_size > 0;
  c.groups = c.grouped ? p.k / p.group_size : 1;
  c.n_pad = c.tiles * kTileRows;
  const int64_t kp = 4 * c.quads;

  std::vector<int8_t> xq(static_cast<size_t>(m * kp));
  std::vector<float> inv(static_cast<size_t>(m));
  quantize_activations(x, m, p.k, kp, xq.data(), inv.data());
  std::vector<uint8_t> tables(static_cast<size_t>(m * c.quads * kTableBytes));
  for (int64_t i = 0; i < m; ++i)
    build_tables(xq.data() + i * kp, c.quads, tables.data() + i * c.quads * kTableBytes);
  c.tables = tables.data();

  std::vector<float> part(static_cast<size_t>(m * c.n_pad), 0.0f);
  c.part = part.data();

  parallel_tiles(c.tiles, p.n * p.k, [&](int64_t t0, int64_t t1) {
    Ctx local = c;
    for (int64_t m0 = 0; m0 < m; m0 += kRowsPerPass) {
      const int64_t mb = std::min(kRowsPerPass, m - m0);
      local.m0 = m0;
      // Blocks of K whose tables (mb rows) fill about 16 KB of L1; a multiple of a segment.
      const int64_t want = std::max<int64_t>(c.seg_quads, kBlockTableBytes / (kTableBytes * mb));
      const int64_t block = want / c.seg_quads * c.seg_quads;
      for (int64_t q0 = 0; q0 < c.quads; q0 += block)
        lut_rows(local, mb, t0, t1, q0, std::min(q0 + block, c.quads));
    }
    // Epilogue for this thread's rows: the segments summed twice the dot products.
    const int64_t r0 = t0 * kTileRows;
    const int64_t r1 = std::min(t1 * kTileRows, p.n);
    for (int64_t i = 0; i < m; ++i) {
      const float* src = c.part + i * c.n_pad;
      float* dst = y + i * p.n;
      for (int64_t n = r0; n < r1; ++n) {
        // Per-row scales in the tile layout with G = 1 are simply [n_pad].
        const float s = c.grouped ? 0.5f : 0.5f * p.scales[p.group_size == kPerRow ? n : 0];
        dst[n] = (src[n] * s) / inv[static_cast<size_t>(i)];
      }
    }
  });
}

void lut_dequant_cpu(const LutParams& p, float* out) {
  const int64_t pairs = lut_pairs(p.k);
  const int64_t groups = p.group_size > 0 ? p.k / p.group_size : 1;
#if defined(_OPENMP)
#pragma omp parallel for if (p.n * p.k >= (int64_t{1} << 15))
#endif
  for (int64_t n = 0; n < p.n; ++n) {
    const uint8_t* w = p.lut + (n / kTileRows) * pairs * 32 + 2 * (n % kTileRows);
    float* dst = out + n * p.k;
    for (int64_t k = 0; k < p.k; ++k) {
      const int64_t quad = k / 4;
      const int shift = static_cast<int>((quad & 1) * 4 + (k & 3));
      const uint8_t* b = w + (quad >> 1) * 32;
      const int t = ((b[0] >> shift) & 1) + ((b[1] >> shift) & 1) - 1;
      float s = p.scales[0];
      if (p.group_size == kPerRow) s = p.scales[n];
      if (p.group_size > 0)
        s = p.scales[((n / kTileRows) * groups + k / p.group_size) * kTileRows + n % kTileRows];
      dst[k] = static_cast<float>(t) * s;
    }
  }
}

int64_t lut_pack_cpu(const uint8_t* packed, int64_t row_bytes, int packing, int64_t n, int64_t k,
                     uint8_t* lut) {
  const int64_t tiles = lut_tiles(n);
  const int64_t pairs = lut_pairs(k);
  // t = 0 everywhere first (plane b1 = +1, b0 = -1): rows past N and columns past K stay so.
  for (int64_t i = 0; i < tiles * pairs * 32; i += 2) {
    lut[i] = 0xFF;
    lut[i + 1] = 0x00;
  }
  int64_t invalid = 0;
#if defined(_OPENMP)
#pragma omp parallel for reduction(+ : invalid) if (n * k >= (int64_t{1} << 15))
#endif
  for (int64_t row = 0; row < n; ++row) {
    std::vector<int8_t> t(static_cast<size_t>(pairs * 8), 0);
    const uint8_t* src = packed + row * row_bytes;
    for (int64_t col = 0; col < k; ++col) {
      int code = 1;
      if (packing == 0) {
        code = (src[col >> 2] >> (2 * (col & 3))) & 3;
        if (code == 3) {
          ++invalid;
          code = 1;
        }
      } else {
        static constexpr int kPow[5] = {1, 3, 9, 27, 81};
        const int q = src[col / 5];
        code = (((q * kPow[col % 5]) & 0xFF) * 3) >> 8;
      }
      t[static_cast<size_t>(col)] = static_cast<int8_t>(code - 1);
    }
    if (packing == 1) {
      // Every byte must be the canonical encoding of its digits (else the file is corrupt).
      for (int64_t byte = 0; byte < (k + 4) / 5; ++byte) {
        const int q = src[byte];
        int v = 0;
        for (int d = 0; d < 5; ++d) {
          static constexpr int kPow[5] = {1, 3, 9, 27, 81};
          v = v * 3 + ((((q * kPow[d]) & 0xFF) * 3) >> 8);
        }
        if ((v * 256 + 242) / 243 != q) ++invalid;
      }
    }
    uint8_t* w = lut + (row / kTileRows) * pairs * 32 + 2 * (row % kTileRows);
    for (int64_t quad = 0; quad < 2 * pairs; ++quad) {
      int p1 = 0, p0 = 0;
      for (int i = 0; i < 4; ++i) {
        const int8_t v = t[static_cast<size_t>(4 * quad + i)];
        p1 |= (v >= 0) << i;
        p0 |= (v > 0) << i;
      }
      uint8_t* b = w + (quad >> 1) * 32;
      if (quad & 1) {
        b[0] = static_cast<uint8_t>((b[0] & 0x0F) | (p1 << 4));
        b[1] = static_cast<uint8_t>((b[1] & 0x0F) | (p0 << 4));
      } else {
        b[0] = static_cast<uint8_t>((b[0] & 0xF0) | p1);
        b[1] = static_cast<uint8_t>((b[1] & 0xF0) | p0);
      }
    }
  }
  return invalid;
}

}  // namespace quantlab::ternary

// CPU kernels for the BitStack format: sign-LUT GEMV for small batches, and row-tile rebuild.
//
// Why a lookup table. Per block, y[n] = sum_r u[n, r] * sum_j S[n, j] * x[j] * v[r, j]: done
// directly that is r multiply-adds per weight and block, r times a dense GEMV's work, while the
// weight is only ~1 bit -- at batch 1 the CPU is ALU-bound, not bandwidth-bound. Grouping columns
// by 4, the r-vector sum_{i<4} S[n, j+i] * x[j+i] * v[:, j+i] can take only 16 values per group
// (one per sign pattern), shared by every row n. Those 16 r-vectors are tabulated once per group
// and block (cost 16 r adds per 4 columns, amortised over all N rows), and each row then costs one
// r-wide vector load-and-add per sign nibble: r / 4 adds per weight in vector lanes, i.e. one
// 8-lane add per 4 weights at r = 8 (AVX2) or r = 16 (AVX-512), instead of 4 r scalar multiply-adds.
// Padded lanes (r rounded up to the vector width) hold zeros and cost lanes, not correctness.
//
// Layout reminders: a row's nibble q covers columns 4q .. 4q+3; it is the high nibble of byte q / 2
// when q is even; within a nibble, bit 3 is column 4q (MSB first). Table entry p has +x v for
// column 4q + i when bit (3 - i) of p is set, -x v otherwise.
#include "bitstack/cpu_kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QUANTLAB_X86 1
#endif

namespace quantlab::bitstack {
namespace {

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa detect_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("QUANTLAB_CPU_ISA");
    const bool scalar = env != nullptr && std::strcmp(env, "scalar") == 0;
    const bool cap_avx2 = env != nullptr && std::strcmp(env, "avx2") == 0;
#if defined(QUANTLAB_X86)
    if (scalar) return Isa::kScalar;
    if (!cap_avx2 && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#else
    (void)scalar;
    (void)cap_avx2;
#endif
    return Isa::kScalar;
  }();
  return isa;
}

// Vector width (fp32 lanes) the LUT kernel uses for `rank` on `isa`; the rank is padded to it.
int64_t lanes_for(Isa isa, int64_t rank) {
  if (isa == Isa::kAvx512 && rank > 8) return 16;
  if (isa == Isa::kAvx512 || isa == Isa::kAvx2) return 8;
  return 1;
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Everything one gemv call needs, with the shape arithmetic done once.
struct Work {
  const CpuParams* p;
  int64_t m;        // rows of x (1 .. kLutMaxRows)
  int64_t rp;       // rank padded to the vector width
  int64_t kb;       // sign bytes per row
  int64_t nibbles;  // 2 * kb: 4-column groups per row
  int64_t chunk;    // nibbles per table chunk
  const float* zt;  // [B][m][nibbles * 4][rp]: x[j] * v[r, j], zero where j >= K or r >= rank
  float* y;         // [m, N]
};

// 16 table entries [16][rp] of one 4-column group from its 4 scaled columns zz [4][rp].
inline void build_group_table(const float* zz, int64_t rp, float* e) {
  for (int64_t r = 0; r < rp; ++r) e[r] = -(zz[r] + zz[rp + r] + zz[2 * rp + r] + zz[3 * rp + r]);
  for (int p = 1; p < 16; ++p) {
    const int low = __builtin_ctz(static_cast<unsigned>(p));  // bit `low` <-> column 3 - low
    const float* prev = e + (p & (p - 1)) * rp;
    const float* z = zz + (3 - low) * rp;
    float* dst = e + p * rp;
    for (int64_t r = 0; r < rp; ++r) dst[r] = prev[r] + 2.0f * z[r];
  }
}

inline int nibble_of(const uint8_t* row, int64_t q) {
  const int byte = row[q >> 1];
  return (q & 1) ? (byte & 15) : (byte >> 4);
}

// Portable accumulation of rows [r0, r1) over nibbles [c0, c0 + cn) of block b.
void accumulate_scalar(const Work& w, int64_t b, int64_t c0, int64_t cn, const float* table,
                       float* acc, int64_t r0, int64_t r1) {
  const CpuParams& p = *w.p;
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* row = p.signs + (b * p.n + n) * w.kb;
    float* a = acc + (n - r0) * w.m * w.rp;
    for (int64_t g = 0; g < cn; ++g) {
      const int nib = nibble_of(row, c0 + g);
      for (int64_t i = 0; i < w.m; ++i) {
        const float* e = table + ((i * w.chunk + g) * 16 + nib) * w.rp;
        float* ai = a + i * w.rp;
        for (int64_t r = 0; r < w.rp; ++r) ai[r] += e[r];
      }
    }
  }
}

#if defined(QUANTLAB_X86)

// The vector accumulation, instantiated per ISA. RV vectors per table entry, M rows of x, T output
// rows interleaved so T * M * RV independent add chains hide the add latency.
#define QUANTLAB_BITSTACK_LUT(SUFFIX, TARGET, VEC, LANES, LOAD, STORE, ADD)                        \
  template <int RV, int M>                                                                         \
  __attribute__((target(TARGET))) void accumulate_##SUFFIX(const Work& w, int64_t b, int64_t c0,   \
                                                           int64_t cn, const float* table,        \
                                                           float* acc, int64_t r0, int64_t r1) {  \
    constexpr int T = (M * RV >= 4) ? 1 : 4 / (M * RV);                                            \
    const CpuParams& p = *w.p;                                                                     \
    const int64_t rp = RV * LANES;                                                                 \
    const int64_t entry_stride = 16 * rp;                                                          \
    int64_t n = r0;                                                                                \
    for (; n + T <= r1; n += T) {                                                                  \
      VEC a[T][M][RV];                                                                             \
      const uint8_t* rows[T];                                                                      \
      for (int t = 0; t < T; ++t) {                                                                \
        rows[t] = p.signs + (b * p.n + n + t) * w.kb;                                              \
        for (int i = 0; i < M; ++i)                                                                \
          for (int v = 0; v < RV; ++v)                                                             \
            a[t][i][v] = LOAD(acc + ((n + t - r0) * M + i) * rp + v * LANES);                      \
      }                                                                                            \
      for (int64_t g = 0; g < cn; ++g) {                                                           \
        for (int t = 0; t < T; ++t) {                                                              \
          const int nib = nibble_of(rows[t], c0 + g);                                              \
          for (int i = 0; i < M; ++i) {                                                            \
            const float* e = table + (i * w.chunk + g) * entry_stride + nib * rp;                  \
            for (int v = 0; v < RV; ++v) a[t][i][v] = ADD(a[t][i][v], LOAD(e + v * LANES));        \
          }                                                                                        \
        }                                                                                          \
      }                                                                                            \
      for (int t = 0; t < T; ++t)                                                                  \
        for (int i = 0; i < M; ++i)                                                                \
          for (int v = 0; v < RV; ++v)                                                             \
            STORE(acc + ((n + t - r0) * M + i) * rp + v * LANES, a[t][i][v]);                      \
    }                                                                                              \
    if (n < r1) accumulate_scalar(w, b, c0, cn, table, acc + (n - r0) * M * rp, n, r1);           \
  }

QUANTLAB_BITSTACK_LUT(avx2, "avx2,fma", __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps,
                      _mm256_add_ps)
QUANTLAB_BITSTACK_LUT(avx512, "avx512f", __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps,
                      _mm512_add_ps)
#undef QUANTLAB_BITSTACK_LUT

using AccumulateFn = void (*)(const Work&, int64_t, int64_t, int64_t, const float*, float*,
                              int64_t, int64_t);

template <int RV>
AccumulateFn pick_m_avx2(int64_t m) {
  switch (m) {
    case 1: return &accumulate_avx2<RV, 1>;
    case 2: return &accumulate_avx2<RV, 2>;
    case 3: return &accumulate_avx2<RV, 3>;
    default: return &accumulate_avx2<RV, 4>;
  }
}

template <int RV>
AccumulateFn pick_m_avx512(int64_t m) {
  switch (m) {
    case 1: return &accumulate_avx512<RV, 1>;
    case 2: return &accumulate_avx512<RV, 2>;
    case 3: return &accumulate_avx512<RV, 3>;
    default: return &accumulate_avx512<RV, 4>;
  }
}

// nullptr: no vector instantiation for this rank (the scalar path takes it).
AccumulateFn pick_accumulate(Isa isa, int64_t rp, int64_t m) {
  if (isa == Isa::kAvx512 && rp % 16 == 0) {
    switch (rp / 16) {
      case 1: return pick_m_avx512<1>(m);
      case 2: return pick_m_avx512<2>(m);
      default: break;
    }
  }
  if ((isa == Isa::kAvx2 || isa == Isa::kAvx512) && rp % 8 == 0) {
    switch (rp / 8) {
      case 1: return pick_m_avx2<1>(m);
      case 2: return pick_m_avx2<2>(m);
      case 3: return pick_m_avx2<3>(m);
      case 4: return pick_m_avx2<4>(m);
      default: break;
    }
  }
  return nullptr;
}

#endif  // QUANTLAB_X86

// Output rows of one thread: tables per chunk, accumulators per row, the u-weighted epilogue.
void gemv_rows(const Work& w, int64_t r0, int64_t r1, Isa isa) {
  const CpuParams& p = *w.p;
  if (r0 >= r1) return;
  AccumulateFn fn = nullptr;
#if defined(QUANTLAB_X86)
  fn = pick_accumulate(isa, w.rp, w.m);
#else
  (void)isa;
#endif
  std::vector<float> table(static_cast<size_t>(w.m * w.chunk * 16 * w.rp));
  std::vector<float> acc(static_cast<size_t>((r1 - r0) * w.m * w.rp));
  for (int64_t n = r0; n < r1; ++n)
    for (int64_t i = 0; i < w.m; ++i) w.y[i * p.n + n] = 0.0f;
  for (int64_t b = 0; b < p.blocks; ++b) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t c0 = 0; c0 < w.nibbles; c0 += w.chunk) {
      const int64_t cn = std::min(w.chunk, w.nibbles - c0);
      for (int64_t i = 0; i < w.m; ++i) {
        const float* zrow = w.zt + (b * w.m + i) * (w.nibbles * 4) * w.rp;
        for (int64_t g = 0; g < cn; ++g)
          build_group_table(zrow + (c0 + g) * 4 * w.rp, w.rp,
                            table.data() + (i * w.chunk + g) * 16 * w.rp);
      }
      if (fn != nullptr) {
        fn(w, b, c0, cn, table.data(), acc.data(), r0, r1);
      } else {
        accumulate_scalar(w, b, c0, cn, table.data(), acc.data(), r0, r1);
      }
    }
    for (int64_t n = r0; n < r1; ++n) {
      const float* un = p.u + (b * p.n + n) * p.rank;
      for (int64_t i = 0; i < w.m; ++i) {
        const float* a = acc.data() + ((n - r0) * w.m + i) * w.rp;
        float dot = 0.0f;
        for (int64_t r = 0; r < p.rank; ++r) dot += un[r] * a[r];
        w.y[i * p.n + n] += dot;
      }
    }
  }
}

// Contiguous row ranges per thread; small problems stay on the calling thread (fork/join costs
// more than ~32K weights of work).
template <typename Fn>
void parallel_rows(int64_t n, int64_t k, Fn fn) {
  const bool parallel = n * k >= (int64_t{1} << 15) && n > 1;
#if defined(_OPENMP)
#pragma omp parallel if (parallel)
  {
    const int64_t nth = omp_get_num_threads();
    const int64_t tid = omp_get_thread_num();
    const int64_t per = n / nth;
    const int64_t extra = n % nth;
    const int64_t r0 = tid * per + std::min(tid, extra);
    const int64_t r1 = r0 + per + (tid < extra ? 1 : 0);
    fn(r0, r1);
  }
#else
  (void)parallel;
  (void)k;
  fn(0, n);
#endif
}

// ---------------------------------------------------------------------------------------------
// Row rebuild: out[n, j] = sum_b sign_b[n, j] * sum_r u_b[n, r] v_b[r, j].

void dequant_row_scalar(const CpuParams& p, int64_t n, float* out, float* tmp) {
  const int64_t kb = (p.k + 7) / 8;
  std::fill(out, out + p.k, 0.0f);
  for (int64_t b = 0; b < p.blocks; ++b) {
    std::fill(tmp, tmp + p.k, 0.0f);
    const float* un = p.u + (b * p.n + n) * p.rank;
    for (int64_t r = 0; r < p.rank; ++r) {
      const float* vr = p.v + (b * p.rank + r) * p.k;
      for (int64_t j = 0; j < p.k; ++j) tmp[j] += un[r] * vr[j];
    }
    const uint8_t* row = p.signs + (b * p.n + n) * kb;
    for (int64_t j = 0; j < p.k; ++j) {
      const bool positive = (row[j >> 3] >> (7 - (j & 7))) & 1;
      out[j] += positive ? tmp[j] : -tmp[j];
    }
  }
}

#if defined(QUANTLAB_X86)
__attribute__((target("avx2,fma"))) void dequant_row_avx2(const CpuParams& p, int64_t n,
                                                          float* out, float* tmp) {
  const int64_t kb = (p.k + 7) / 8;
  const int64_t k8 = p.k / 8 * 8;
  // Lane i of a column octet reads bit 7 - i (MSB first).
  const __m256i lane_bits = _mm256_setr_epi32(128, 64, 32, 16, 8, 4, 2, 1);
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  std::fill(out, out + p.k, 0.0f);
  for (int64_t b = 0; b < p.blocks; ++b) {
    const float* un = p.u + (b * p.n + n) * p.rank;
    const float* vb = p.v + b * p.rank * p.k;
    const uint8_t* row = p.signs + (b * p.n + n) * kb;
    for (int64_t j = 0; j < k8; j += 8) {
      // Same r order as the scalar path: each product rounded then added (FMA rounds once more
      // accurately; both stay within the tested fp32 bound).
      __m256 acc = _mm256_setzero_ps();
      for (int64_t r = 0; r < p.rank; ++r)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(un[r]), _mm256_loadu_ps(vb + r * p.k + j), acc);
      const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(row[j >> 3]), lane_bits);
      const __m256 negative = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, _mm256_setzero_si256()));
      acc = _mm256_xor_ps(acc, _mm256_and_ps(negative, sign_bit));
      _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_loadu_ps(out + j), acc));
    }
    for (int64_t j = k8; j < p.k; ++j) {
      float t = 0.0f;
      for (int64_t r = 0; r < p.rank; ++r) t += un[r] * vb[r * p.k + j];
      const bool positive = (row[j >> 3] >> (7 - (j & 7))) & 1;
      out[j] += positive ? t : -t;
    }
  }
  (void)tmp;
}
#endif

}  // namespace

void gemv_cpu(const CpuParams& p, const float* x, int64_t m, float* y) {
  if (m <= 0 || p.n <= 0) return;
  const Isa isa = detect_isa();
  Work w{};
  w.p = &p;
  w.m = std::min(m, kLutMaxRows);
  w.rp = round_up(p.rank, lanes_for(isa, p.rank));
  w.kb = (p.k + 7) / 8;
  w.nibbles = 2 * w.kb;
  // Tables of one chunk stay within ~128 KB (L2) whatever M and r.
  w.chunk = std::max<int64_t>(8, 32768 / (w.m * 16 * w.rp));
  const int64_t kpad = w.nibbles * 4;
  for (int64_t i0 = 0; i0 < m; i0 += kLutMaxRows) {
    w.m = std::min(kLutMaxRows, m - i0);
    std::vector<float> zt(static_cast<size_t>(p.blocks * w.m * kpad * w.rp), 0.0f);
    for (int64_t b = 0; b < p.blocks; ++b)
      for (int64_t i = 0; i < w.m; ++i) {
        const float* xi = x + (i0 + i) * p.k;
        float* z = zt.data() + (b * w.m + i) * kpad * w.rp;
        for (int64_t r = 0; r < p.rank; ++r) {
          const float* vr = p.v + (b * p.rank + r) * p.k;
          for (int64_t j = 0; j < p.k; ++j) z[j * w.rp + r] = xi[j] * vr[j];
        }
      }
    w.zt = zt.data();
    w.y = y + i0 * p.n;
    parallel_rows(p.n, p.k, [&](int64_t r0, int64_t r1) { gemv_rows(w, r0, r1, isa); });
  }
}

void dequant_rows_cpu(const CpuParams& p, int64_t row0, int64_t row1, float* out) {
  if (row1 <= row0) return;
  const Isa isa = detect_isa();
  parallel_rows(row1 - row0, p.k, [&](int64_t r0, int64_t r1) {
    std::vector<float> tmp(static_cast<size_t>(p.k));
    for (int64_t i = r0; i < r1; ++i) {
      float* dst = out + i * p.k;
#if defined(QUANTLAB_X86)
      if (isa != Isa::kScalar) {
        dequant_row_avx2(p, row0 + i, dst, tmp.data());
        continue;
      }
#endif
      dequant_row_scalar(p, row0 + i, dst, tmp.data());
    }
  });
  (void)isa;
}

const char* gemv_cpu_path(int64_t rank) {
  const Isa isa = detect_isa();
#if defined(QUANTLAB_X86)
  const int64_t rp = round_up(rank, lanes_for(isa, rank));
  if (pick_accumulate(isa, rp, 1) != nullptr)
    return lanes_for(isa, rank) == 16 ? "lut-avx512" : "lut-avx2";
#else
  (void)rank;
  (void)isa;
#endif
  return "lut-scalar";
}

}  // namespace quantlab::bitstack

// CPU kernels for the PVQ format: decode to a dense weight, and decode-then-GEMV.
//
// Decode is inherently scalar: each vector's code is split into (level, index) with one 64-bit
// division, then the index is walked coordinate by coordinate. Each coordinate's magnitude is
// found branch-free by counting how many of its first 8 cumulative thresholds lie at or below the
// index (unrank_thresholds; a magnitude of 8 or more falls back to a scan). The tables, 9 uint64
// per (n, k) (~36 KB for D = 16, P = 28), stay in L1/L2. The GEMV decodes
// one output row at a time into a per-thread buffer and then runs the M dot products over it, so
// every code is decoded once per call whatever M is; the dot products use AVX2+FMA when the CPU
// has them (run-time check) and a scalar loop otherwise.
#include "pvq/cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "pvq/pvq_decode.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QUANTLAB_PVQ_X86 1
#define QUANTLAB_PVQ_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace quantlab::pvq {
namespace {

struct Decoder {
  const CpuParams* p;
  std::vector<uint64_t> counts;
  std::vector<uint64_t> thresholds;
  uint64_t size;  // N(D, P)
  int bits;       // code width F
  int64_t per_row;

  explicit Decoder(const CpuParams& params) : p(&params) {
    counts.resize(count_entries(params.dim, params.pulses));
    fill_counts(params.dim, params.pulses, counts.data());
    thresholds.resize(threshold_entries(params.dim, params.pulses));
    fill_thresholds(params.dim, params.pulses, counts.data(), thresholds.data());
    size = counts[params.dim * (params.pulses + 1) + params.pulses];
    code_width(params, &bits);
    per_row = params.k / params.dim;
  }

  // Row n of W' into dst[0..K). Returns the number of corrupt codes in the row.
  int64_t row(int64_t n, float* dst) const {
    const int d = p->dim;
    const float scale = p->row_scales[n];
    int y[kMaxDim];
    int64_t bad = 0;
    int64_t bit = n * per_row * bits;
    for (int64_t v = 0; v < per_row; ++v, bit += bits, dst += d) {
      const uint64_t code = read_field(p->codes, p->n_words, bit, bits);
      uint64_t level = code / size;
      if (level >= static_cast<uint64_t>(p->n_levels)) {
        ++bad;
        std::fill(dst, dst + d, 0.0f);
        continue;
      }
      const int yy =
          unrank_thresholds(code - level * size, counts.data(), thresholds.data(), d, p->pulses, y);
      const float g = scale * p->levels[level];
      const float r = g / std::sqrt(static_cast<float>(yy));
      for (int i = 0; i < d; ++i) dst[i] = static_cast<float>(y[i]) * r;
    }
    return bad;
  }
};

// Splits rows [0, n) over the OpenMP team; small problems stay on the calling thread (below
// ~16K weights the fork/join costs more than the decode).
template <typename Fn>
int64_t parallel_rows(const CpuParams& p, Fn fn) {
  int64_t bad = 0;
  const bool parallel = p.n * p.k >= (int64_t{1} << 14) && p.n > 1;
#if defined(_OPENMP)
#pragma omp parallel if (parallel) reduction(+ : bad)
  {
    const int64_t nth = omp_get_num_threads();
    const int64_t tid = omp_get_thread_num();
    const int64_t per = p.n / nth;
    const int64_t extra = p.n % nth;
    const int64_t r0 = tid * per + std::min(tid, extra);
    const int64_t r1 = r0 + per + (tid < extra ? 1 : 0);
    if (r0 < r1) bad += fn(r0, r1);
  }
#else
  (void)parallel;
  bad = fn(0, p.n);
#endif
  return bad;
}

float dot_scalar(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

#if defined(QUANTLAB_PVQ_X86)
bool use_avx2() {
  static const bool supported = [] {
    const char* isa = std::getenv("QUANTLAB_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "scalar") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
}

QUANTLAB_PVQ_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  // Four independent accumulators hide the FMA latency.
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  const __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  float out = _mm_cvtss_f32(s);
  for (; i < n; ++i) out += a[i] * b[i];
  return out;
}
#endif

using DotFn = float (*)(const float*, const float*, int64_t);

DotFn pick_dot() {
#if defined(QUANTLAB_PVQ_X86)
  if (use_avx2()) return dot_avx2;
#endif
  return dot_scalar;
}

}  // namespace

bool code_width(const CpuParams& p, int* code_bits) {
  if (p.dim < 1 || p.dim > kMaxDim || p.pulses < 1 || p.pulses > kMaxPulses || p.n_levels < 1)
    return false;
  std::vector<uint64_t> counts(count_entries(p.dim, p.pulses));
  if (!fill_counts(p.dim, p.pulses, counts.data())) return false;
  const uint64_t size = counts[p.dim * (p.pulses + 1) + p.pulses];
  // bits = ceil(log2(size * L)), computed without forming the (possibly > 2^64) product.
  unsigned __int128 total = static_cast<unsigned __int128>(size) * static_cast<uint64_t>(p.n_levels);
  int bits = 0;
  for (unsigned __int128 v = total - 1; v != 0; v >>= 1) ++bits;
  if (bits > kMaxCodeBits || bits < 1) return false;
  *code_bits = bits;
  return true;
}

int64_t decode_cpu(const CpuParams& p, float* out) {
  const Decoder dec(p);
  return parallel_rows(p, [&](int64_t r0, int64_t r1) {
    int64_t bad = 0;
    for (int64_t n = r0; n < r1; ++n) bad += dec.row(n, out + n * p.k);
    return bad;
  });
}

int64_t gemv_cpu(const CpuParams& p, const float* x, int64_t m, float* y) {
  const Decoder dec(p);
  const DotFn dot = pick_dot();
  return parallel_rows(p, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(static_cast<size_t>(p.k));
    int64_t bad = 0;
    for (int64_t n = r0; n < r1; ++n) {
      bad += dec.row(n, row.data());
      for (int64_t i = 0; i < m; ++i) y[i * p.n + n] = dot(row.data(), x + i * p.k, p.k);
    }
    return bad;
  });
}

const char* gemv_cpu_path() {
#if defined(QUANTLAB_PVQ_X86)
  if (use_avx2()) return "avx2";
#endif
  return "scalar";
}

}  // namespace quantlab::pvq

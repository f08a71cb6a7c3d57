// Standalone, torch-free timing of the CPU groupwise-int kernels (groupwise_int/cpu_kernels.h): the
// figures of the 2026-12-02 CPU sections of docs/benchmarks.md. scripts/bench_cpu_gemv.sh builds
// it against the working tree's kernel or a revision's (--before / --after REV).
//
//   gemv_cpu_timing N K GROUP BITS M[,M...] [--copies C] [--reps R] [--seed S]
//   gemv_cpu_timing N K GROUP BITS --dequant [--copies C] [--reps R] [--seed S]
//
// Random codes and zero points, packed as the bitstream of csrc/common/bitstream.h (one
// little-endian int32 stream per row), fp32 scales in [0.005, 0.015), x uniform in [-1, 1). The
// weight is held in C copies (default 4) and call i reads copy i % C, so that with enough copies
// each call reads its weight from memory rather than from the last-level cache. Before timing,
// every case is checked against a scalar reference computed here from the unpacked codes
// (dequantize, then a double-precision dot product; --dequant: bit-exact fp32 (q - z) * s); a
// mismatch names the first entry out of bounds and exits 1. Then one untimed call per copy, then R
// timed calls (default 30). One line per case (wrapped here), e.g. `64 128 64 4 1 --copies 1
// --reps 2` on an AVX-512 machine:
//
//   n=64 k=128 group=64 bits=4 m=1 op=gemv copies=1 rotation_mb=0.0 threads=1 reps=2
//     best_us=2.8 median_us=2.9 check=1e-08 path=avx512
//
// rotation_mb: the bytes of all copies (codes, fp32 scales, zero points), decimal MB (38.3 for 4
// copies of 4096 x 4096 at 4 bits, g64, of which 33.6 codes).
// check: the largest |y - reference| / sum_k |s| (|q| + |z|) |x_k| over the checked outputs.
// path: gemv_cpu_path, "avx512", "avx2" or "scalar" (QUANTLAB_CPU_ISA=scalar / avx2, read by the
// kernel, caps it); "-" for --dequant (whose path the API does not name), which prints m=0.
// Threads: OpenMP's default, or OMP_NUM_THREADS.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "groupwise_int/cpu_kernels.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

namespace gi = quantlab::groupwise_int;

// Largest accepted check value: fp32 accumulation measured up to 1.5e-7 (every path, K = 8 to
// 14336); one code off by one moves it by ~1e-3 at K = 128 and ~1e-5 |x_k| at K = 14336.
constexpr double kTolerance = 1e-6;
constexpr int64_t kCheckedRows = 256;

[[noreturn]] void usage(const char* msg) {
  std::fprintf(stderr,
               "gemv_cpu_timing: %s\nusage: gemv_cpu_timing N K GROUP BITS M[,M...] "
               "[--copies C] [--reps R] [--seed S]\n"
               "       gemv_cpu_timing N K GROUP BITS --dequant [--copies C] [--reps R] "
               "[--seed S]\n",
               msg);
  std::exit(2);
}

int64_t parse_int(const char* s, const char* what) {
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (end == s || *end != '\0') usage((std::string("bad ") + what + ": " + s).c_str());
  return v;
}

int64_t words(int64_t n, int bits) { return (n * bits + 31) / 32; }

// One row of n values as the little-endian int32 bitstream: value j at stream bits
// [j * bits, (j + 1) * bits), stream bit t being bit t % 32 of word t / 32.
void pack_row(const uint8_t* v, int64_t n, int bits, uint32_t* out) {
  std::fill(out, out + words(n, bits), 0u);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t bit = j * bits;
    const int shift = static_cast<int>(bit & 31);
    out[bit >> 5] |= uint32_t{v[j]} << shift;
    if (shift + bits > 32) out[(bit >> 5) + 1] |= uint32_t{v[j]} >> (32 - shift);
  }
}

struct Weight {
  std::vector<uint32_t> qweight, qzeros;
  std::vector<float> scales;
};

struct Args {
  int64_t n = 0, k = 0, group = 0;
  int bits = 0;
  std::vector<int64_t> ms;
  bool dequant = false;
  int64_t copies = 4, reps = 30, seed = 0;
};

Args parse(int argc, char** argv) {
  Args a;
  std::vector<const char*> pos;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--dequant") {
      a.dequant = true;
    } else if (s == "--copies" || s == "--reps" || s == "--seed") {
      if (i + 1 >= argc) usage(("missing value of " + s).c_str());
      (s == "--copies" ? a.copies : s == "--reps" ? a.reps : a.seed) =
          parse_int(argv[++i], s.c_str());
    } else {
      pos.push_back(argv[i]);
    }
  }
  if (pos.size() != (a.dequant ? 4u : 5u)) usage("wrong number of arguments");
  a.n = parse_int(pos[0], "N");
  a.k = parse_int(pos[1], "K");
  a.group = parse_int(pos[2], "GROUP");
  a.bits = static_cast<int>(parse_int(pos[3], "BITS"));
  if (!a.dequant) {
    std::string list = pos[4];
    for (size_t at = 0; at <= list.size();) {
      const size_t comma = std::min(list.find(',', at), list.size());
      a.ms.push_back(parse_int(list.substr(at, comma - at).c_str(), "M"));
      at = comma + 1;
    }
  }
  if (a.n <= 0 || a.k <= 0 || a.group <= 0 || a.k % a.group != 0) {
    usage("N, K and GROUP must be > 0, GROUP dividing K");
  }
  if (a.bits != 2 && a.bits != 3 && a.bits != 4 && a.bits != 8) usage("BITS is 2, 3, 4 or 8");
  if (a.copies < 1 || a.reps < 1) usage("--copies and --reps must be >= 1");
  for (int64_t m : a.ms) {
    if (m < 1) usage("M must be >= 1");
  }
  return a;
}

// Output rows the reference checks: all up to kCheckedRows, else that many evenly spaced and the
// last.
std::vector<int64_t> checked_rows(int64_t n) {
  std::vector<int64_t> rows;
  for (int64_t r = 0; r < n; r += std::max<int64_t>(1, n / kCheckedRows)) rows.push_back(r);
  if (rows.back() != n - 1) rows.push_back(n - 1);
  return rows;
}

[[noreturn]] void mismatch(const Args& a, const char* what, int64_t i, int64_t j, double got,
                           double want, double err) {
  std::fprintf(stderr,
               "gemv_cpu_timing: MISMATCH %s[%lld, %lld] = %.9g, reference %.9g (check %.3g > "
               "%.1g; n=%lld k=%lld group=%lld bits=%d)\n",
               what, static_cast<long long>(i), static_cast<long long>(j), got, want, err,
               kTolerance, static_cast<long long>(a.n), static_cast<long long>(a.k),
               static_cast<long long>(a.group), a.bits);
  std::exit(1);
}

// The unpacked weight: codes q [n, k], zero points z [n, groups], scales s [n, groups].
struct Codes {
  std::vector<uint8_t> q, z;
  std::vector<float> s;
};

// y [m, n] against the reference on the checked rows; returns the check value (file comment).
double check_gemv(const Args& a, const Codes& w, const std::vector<float>& x, int64_t m,
                  const std::vector<float>& y) {
  const int64_t groups = a.k / a.group;
  std::vector<double> wd(a.k), mag(a.k);
  double worst = 0.0;
  for (int64_t r : checked_rows(a.n)) {
    for (int64_t c = 0; c < a.k; ++c) {
      const int64_t g = r * groups + c / a.group;
      const int q = w.q[r * a.k + c], z = w.z[g];
      wd[c] = static_cast<double>(q - z) * w.s[g];
      mag[c] = std::fabs(static_cast<double>(w.s[g])) * (q + z);
    }
    for (int64_t i = 0; i < m; ++i) {
      double ref = 0.0, bound = 0.0;
      for (int64_t c = 0; c < a.k; ++c) {
        ref += wd[c] * x[i * a.k + c];
        bound += mag[c] * std::fabs(x[i * a.k + c]);
      }
      const double got = y[i * a.n + r];
      const double err = std::fabs(got - ref) / std::max(bound, 1e-30);
      if (!(err <= kTolerance)) mismatch(a, "y", i, r, got, ref, err);
      worst = std::max(worst, err);
    }
  }
  return worst;
}

// The dense weight [n, k] against (q - z) * s in fp32 on the checked rows: bit-exact.
double check_dequant(const Args& a, const Codes& w, const std::vector<float>& out) {
  const int64_t groups = a.k / a.group;
  for (int64_t r : checked_rows(a.n)) {
    for (int64_t c = 0; c < a.k; ++c) {
      const int64_t g = r * groups + c / a.group;
      const float ref = static_cast<float>(w.q[r * a.k + c] - w.z[g]) * w.s[g];
      const float got = out[r * a.k + c];
      if (got != ref) mismatch(a, "w", r, c, got, ref, std::fabs(got - ref) / std::fabs(ref));
    }
  }
  return 0.0;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  const int64_t groups = a.k / a.group;
  const int64_t wk = words(a.k, a.bits), wg = words(groups, a.bits);
  std::mt19937_64 rng(static_cast<uint64_t>(a.seed));
  std::uniform_int_distribution<int> code(0, (1 << a.bits) - 1);
  std::uniform_real_distribution<float> scale(0.005f, 0.015f), unit(-1.0f, 1.0f);

  // The codes and zero points unpacked (for the reference), then packed once and copied.
  Codes w{std::vector<uint8_t>(a.n * a.k), std::vector<uint8_t>(a.n * groups),
          std::vector<float>(a.n * groups)};
  for (auto& v : w.q) v = static_cast<uint8_t>(code(rng));
  for (auto& v : w.z) v = static_cast<uint8_t>(code(rng));
  for (auto& v : w.s) v = scale(rng);
  Weight packed{std::vector<uint32_t>(a.n * wk), std::vector<uint32_t>(a.n * wg), w.s};
  for (int64_t r = 0; r < a.n; ++r) {
    pack_row(&w.q[r * a.k], a.k, a.bits, &packed.qweight[r * wk]);
    pack_row(&w.z[r * groups], groups, a.bits, &packed.qzeros[r * wg]);
  }
  const std::vector<Weight> copies(a.copies, packed);
  std::vector<gi::CpuParams> params;
  for (const Weight& c : copies) {
    params.push_back(
        {c.qweight.data(), c.scales.data(), c.qzeros.data(), a.n, a.k, a.group, a.bits});
  }
  // Bytes one rotation reads: codes, fp32 scales and zero points of every copy.
  const double rotation_mb =
      4e-6 * a.copies * (packed.qweight.size() + packed.scales.size() + packed.qzeros.size());
#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif

  for (int64_t m : a.dequant ? std::vector<int64_t>{0} : a.ms) {
    std::vector<float> x(m * a.k);
    for (auto& v : x) v = unit(rng);
    std::vector<float> y(a.dequant ? a.n * a.k : m * a.n);
    auto call = [&](int64_t i) {
      const gi::CpuParams& p = params[i % a.copies];
      if (a.dequant) {
        gi::dequant_cpu(p, y.data());
      } else {
        gi::gemv_cpu(p, x.data(), m, y.data());
      }
    };
    call(0);
    const double err = a.dequant ? check_dequant(a, w, y) : check_gemv(a, w, x, m, y);
    for (int64_t i = 0; i < a.copies; ++i) call(i);  // warm-up: every copy once
    std::vector<double> us(a.reps);
    for (int64_t i = 0; i < a.reps; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      call(i);
      us[i] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
                  .count();
    }
    std::sort(us.begin(), us.end());
    const double median = 0.5 * (us[(a.reps - 1) / 2] + us[a.reps / 2]);
    std::printf(
        "n=%lld k=%lld group=%lld bits=%d m=%lld op=%s copies=%lld rotation_mb=%.1f threads=%d "
        "reps=%lld best_us=%.1f median_us=%.1f check=%.2g path=%s\n",
        static_cast<long long>(a.n), static_cast<long long>(a.k), static_cast<long long>(a.group),
        a.bits, static_cast<long long>(m), a.dequant ? "dequant" : "gemv",
        static_cast<long long>(a.copies), rotation_mb, threads, static_cast<long long>(a.reps),
        us[0], median, err, a.dequant ? "-" : gi::gemv_cpu_path(params[0]));
    std::fflush(stdout);
  }
  return 0;
}

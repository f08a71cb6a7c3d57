// CPU kernels for the groupwise integer format (torch-free; see docs/formats.md).
//
// Layout read: qweight uint32 [N, packed_words(K, bits)] (one bitstream per output row), scales
// fp32 [N, G], qzeros uint32 [N, packed_words(G, bits)] or null (symmetric, zero 2^(bits-1)).
// w[n, k] = (q[n, k] - z[n, k / g]) * s[n, k / g].
//
// Threading: every entry point splits output rows over an OpenMP parallel region. Built against
// torch this is the same libgomp runtime torch uses (same soname, loaded once), so
// torch.set_num_threads() also governs these kernels and no second thread pool appears.
#pragma once

#include <cstdint>

namespace quantlab::groupwise_int {

struct CpuParams {
  const uint32_t* qweight;  // [N, words_k], rows contiguous
  const float* scales;      // [N, G]
  const uint32_t* qzeros;   // [N, words_g] or nullptr
  int64_t n;                // output features
  int64_t k;                // input features
  int64_t group_size;       // columns per group (K for per-channel); must divide k
  int bits;                 // 2, 3, 4 or 8
};

// out [N, K] fp32 = dequantized weight. Bit-exact with the reference ((q - z) then * s, in fp32).
void dequant_cpu(const CpuParams& p, float* out);

// y [M, N] = x [M, K] @ W^T, fp32 in and out, fp32 accumulation; x and y contiguous.
// Built for M <= 8 (each unpacked weight is reused across all rows of x); larger M is processed in
// chunks of 8 rows, which is correct but slower than dequantize + BLAS GEMM.
// Uses AVX-512 (F/BW/VL/DQ) for 4- and 2-bit codes whose groups are whole 16-byte steps (32 / 64
// columns), else AVX2+FMA when group_size % 8 == 0 (both checked at run time; the binary itself
// only assumes x86-64), else a portable scalar path.
void gemv_cpu(const CpuParams& p, const float* x, int64_t m, float* y);

// Which path gemv_cpu takes on this CPU for these parameters: "avx512", "avx2" or "scalar".
// Setting the environment variable QUANTLAB_CPU_ISA=scalar before the first call forces the scalar
// path, QUANTLAB_CPU_ISA=avx2 caps it at AVX2 (to test those paths on wider machines).
const char* gemv_cpu_path(const CpuParams& p);

}  // namespace quantlab::groupwise_int

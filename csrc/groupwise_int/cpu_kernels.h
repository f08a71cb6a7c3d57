// CPU kernels for the groupwise integer format (torch-free; see docs/formats.md).
//
// Layout read: qweight uint32 [N, packed_words(K, bits)] (one bitstream per output row), scales
// fp32 [N, G], qzeros uint32 [N, packed_words(G, bits)] or null (symmetric, zero 2^(bits-1)).
// w[n, k] = (q[n, k] - z[n, k / g]) * s[n, k / g].
#pragma once

#include <cstdint>

namespace quantlab::groupwise_int {

struct CpuParams {
  const uint32_t* qweight;  // [N, words_k]
  const float* scales;      // [N, G]
  const uint32_t* qzeros;   // [N, words_g] or nullptr
  int64_t n;                // output features
  int64_t k;                // input features
  int64_t group_size;       // columns per group (K for per-channel)
  int bits;                 // 2, 3, 4 or 8
};

// Kernels work on a range of output rows [row_begin, row_end) so the caller can split rows across
// threads with its own pool (the torch binding uses at::parallel_for, i.e. torch's OpenMP pool,
// which keeps one OpenMP runtime in the process and honours torch.set_num_threads).

// out [N, K] fp32 = dequantized weight, rows [row_begin, row_end).
void dequant_cpu(const CpuParams& p, float* out, int64_t row_begin, int64_t row_end);

// x group sums: xsum [M, G], xsum[i, g] = sum of x[i, g*gs : (g+1)*gs]. gemv_cpu needs them; they
// are computed once per call, not per row.
void group_sums_cpu(const CpuParams& p, const float* x, int64_t m, float* xsum);

// y [M, N] = x [M, K] @ W^T for rows [row_begin, row_end), fp32 in and out, fp32 accumulation.
// Fast for M <= 8 (the weight is unpacked once per group and reused across the M rows); correct
// for any M (rows of x are processed in chunks of 8). Uses AVX2+FMA when the running CPU has them
// (checked at run time), a portable scalar path otherwise.
void gemv_cpu(const CpuParams& p, const float* x, const float* xsum, int64_t m, float* y,
              int64_t row_begin, int64_t row_end);

// Which path gemv_cpu takes on this CPU for these parameters: "avx2" or "scalar".
const char* gemv_cpu_path(const CpuParams& p);

}  // namespace quantlab::groupwise_int

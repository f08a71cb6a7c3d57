// CPU kernels for the PVQ format (torch-free; layout in csrc/pvq/pvq_decode.h and
// docs/formats.md).
//
// Threading: every entry point splits output rows over an OpenMP parallel region (the libgomp
// runtime torch uses, so torch.set_num_threads governs it).
#pragma once

#include <cstdint>

namespace quantlab::pvq {

struct CpuParams {
  const uint32_t* codes;    // the layer's code bitstream
  int64_t n_words;          // its length in 32-bit words
  const float* row_scales;  // [N]
  const float* levels;      // [L]
  int64_t n_levels;         // L
  int64_t n;                // output features
  int64_t k;                // input features (a multiple of dim)
  int dim;                  // D
  int pulses;               // P
};

// Checks dim/pulses/levels give codes of at most 63 bits and fills `code_bits`; false otherwise.
bool code_width(const CpuParams& p, int* code_bits);

// out [N, K] fp32 = the rotated weight W'. Returns the number of corrupt codes (amplitude level
// >= L); such vectors decode to zero.
int64_t decode_cpu(const CpuParams& p, float* out);

// y [M, N] = x [M, K] @ W'^T, fp32 in and out, fp32 accumulation, for any M (each thread decodes
// one row at a time into a buffer and reuses it for all M rows of x; callers send large M through
// decode + GEMM instead). Returns the number of corrupt codes, as decode_cpu.
int64_t gemv_cpu(const CpuParams& p, const float* x, int64_t m, float* y);

// Which dot-product path gemv_cpu takes on this CPU: "avx2" or "scalar" (QUANTLAB_CPU_ISA=scalar
// in the environment before the first call forces "scalar").
const char* gemv_cpu_path();

}  // namespace quantlab::pvq

// CUDA kernels for the PVQ format (torch-free: raw pointers, a POD params struct and a
// caller-supplied stream; the torch adapter is csrc/bindings/pvq_cuda.cpp).
//
// Layout read (docs/formats.md "PVQ", csrc/pvq/pvq_decode.h): one bitstream of F-bit codes, row-major
// over (row, vector of D columns); code = level * N(D, P) + pyramid index. The count table
// N(n, k) (fill_counts, (D+1)(P+1) uint64) is built on the host and passed in device memory; each
// block copies it to shared memory. Targets sm_80+ (nothing arch-specific is used).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace quantlab::pvq {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct CudaWeight {
  const uint32_t* codes;    // the code bitstream
  int64_t n_words;          // its length in words
  const float* row_scales;  // [N]
  const float* levels;      // [L]
  int64_t n_levels;
  const uint64_t* counts;   // device copy of fill_counts(dim, pulses)
  uint64_t size;            // N(dim, pulses)
  int64_t n;
  int64_t k;                // a multiple of dim
  int dim;
  int pulses;
  int code_bits;
};

// Largest batch the GEMV kernel takes; larger batches go through decode + cuBLAS.
constexpr int kGemvMaxRows = 8;

// out [N, K] = W' in out_dtype (the fp32 decode, then rounded). A corrupt code (level >= L)
// decodes to zeros (codes are validated when a layer is loaded).
cudaError_t launch_decode(const CudaWeight& w, void* out, DType out_dtype, cudaStream_t stream);

// y [M, N] = x [M, K] @ W'^T for 1 <= M <= kGemvMaxRows; x and y share `dtype`, contiguous;
// fp32 accumulation.
cudaError_t launch_gemv(const CudaWeight& w, const void* x, void* y, int64_t m, DType dtype,
                        cudaStream_t stream);

}  // namespace quantlab::pvq

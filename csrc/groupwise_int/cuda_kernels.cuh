// CUDA kernels for the groupwise integer format (torch-free: raw pointers, a POD params struct and
// a caller-supplied stream; the torch adapter lives in csrc/bindings/groupwise_int_cuda.cpp).
//
// Layout read (docs/formats.md): qweight uint32 [N, packed_words(K, bits)] one bitstream per output
// row; scales [N, G] in fp32; qzeros uint32 [N, packed_words(G, bits)] or null (symmetric, zero
// 2^(bits-1)). w[n, k] = (q[n, k] - z[n, k / g]) * s[n, k / g]. Targets sm_80+.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace quantlab::groupwise_int {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct CudaWeight {
  const uint32_t* qweight;  // [N, words_k]
  const float* scales;      // [N, G] (the adapter converts fp16/bf16 scales to fp32)
  const uint32_t* qzeros;   // [N, words_g] or nullptr
  int64_t n;
  int64_t k;
  int64_t group_size;  // effective (K for per-channel)
  int bits;
};

// out [N, K] in out_dtype.
cudaError_t launch_dequant(const CudaWeight& w, void* out, DType out_dtype, cudaStream_t stream);

// Largest batch the GEMV kernel takes; larger batches go through dequantize + cuBLAS.
constexpr int kGemvMaxRows = 8;

// y [M, N] = x [M, K] @ W^T for 1 <= M <= kGemvMaxRows; x and y share `dtype`; fp32 accumulation.
cudaError_t launch_gemv(const CudaWeight& w, const void* x, void* y, int64_t m, DType dtype,
                        cudaStream_t stream);

}  // namespace quantlab::groupwise_int

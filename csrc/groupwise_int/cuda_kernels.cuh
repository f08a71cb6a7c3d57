// CUDA kernels for the groupwise integer format (torch-free: raw pointers, a POD params struct and
// a caller-supplied stream; the torch adapter lives in csrc/bindings/groupwise_int_cuda.cpp).
//
// Layout read (docs/formats.md): qweight uint32 [N, packed_words(K, bits)] one bitstream per output
// row; scales [N, G] in fp32; qzeros uint32 [N, packed_words(G, bits)] or null (symmetric, zero
// 2^(bits-1)). w[n, k] = (q[n, k] - z[n, k / g]) * s[n, k / g]. Targets sm_80+.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
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

// ---- Tensor-core GEMM for mid-size batches (cuda_gemm.cu) ----
// y [M, N] = x [M, K] @ W^T for fp16 / bf16 x and y (fp32 accumulation), any M >= 1, bits 2, 3, 4
// and 8, group sizes that are a multiple of 8 or per-channel; needs sm_80+ (nvcuda::wmma). The
// torch adapter sends kGemvMaxRows < M <= kGemmMaxRows here; larger batches are compute-bound and
// go through dequantize + cuBLAS.
constexpr int kGemmMaxRows = 255;
// Most K splits launch_gemm uses (more are clamped).
constexpr int kGemmMaxSplits = 16;

// Whether launch_gemm takes this weight (bits, group size, grid limits).
bool gemm_supported(const CudaWeight& w);

// Split-K count for an M x N x K problem on a GPU with `sm_count` SMs: 1 when the output tiles
// already fill the GPU, more when they are few and K is long.
int gemm_pick_splits(int64_t m, int64_t n, int64_t k, int sm_count);

// Bytes of fp32 workspace launch_gemm needs for `splits` (0 when no split is made).
size_t gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, int splits);

// `splits` >= 1 (clamped to the K tiles and kGemmMaxSplits); `workspace` must hold
// gemm_workspace_bytes(m, n, k, splits) bytes, and may be null when that is 0. x and y are
// row-major and contiguous, in `dtype` (kFloat16 or kBFloat16); x may have any 2-byte alignment.
cudaError_t launch_gemm(const CudaWeight& w, const void* x, void* y, int64_t m, DType dtype,
                        int splits, float* workspace, cudaStream_t stream);

}  // namespace quantlab::groupwise_int

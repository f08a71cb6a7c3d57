// CUDA kernels for the BitStack format (torch-free: raw pointers, a POD params struct and a
// caller-supplied stream; the torch adapter is csrc/bindings/bitstack_cuda.cpp).
//
// Layout read (docs/formats.md, section BitStack): signs uint8 [B, N, KB] (KB = ceil(K / 8), MSB
// first, bit 1 = +1, rows start on a byte), u fp16 [B, N, r], v fp16 [B, r, K]. Targets sm_80+.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace quantlab::bitstack {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct CudaWeight {
  const uint8_t* signs;  // [B, N, KB], 4-byte aligned
  const uint16_t* u;     // fp16 bits [B, N, r]
  const uint16_t* v;     // fp16 bits [B, r, K]
  int64_t blocks;
  int64_t n;
  int64_t k;
  int64_t rank;
};

// Largest batch the tensor-core sign GEMV takes (and rank * M must be <= kGemvMaxColumns).
constexpr int kGemvMaxRows = 8;
constexpr int kGemvMaxColumns = 32;

// Whether launch_gemv takes this weight at m rows: 1 <= m <= kGemvMaxRows,
// rank * m <= kGemvMaxColumns, K % 32 == 0 (whole 32-bit sign words per row).
bool gemv_supported(const CudaWeight& w, int64_t m);

// y [M, N] = x [M, K] @ W^T, x and y fp16 or bf16 (`dtype`), fp32 accumulation, without forming W:
// per block, the ±1 sign matrix times the r * M right-hand sides x ⊙ v[r] runs on tensor cores
// (mma.sync m16n8k16), then each output row takes the u-weighted sum. Needs sm_80+.
cudaError_t launch_gemv(const CudaWeight& w, const void* x, void* y, int64_t m, DType dtype,
                        cudaStream_t stream);

// out [row1 - row0, K] = rows [row0, row1) of W in `out_dtype` (fp32 sums, rounded once).
cudaError_t launch_dequant_rows(const CudaWeight& w, int64_t row0, int64_t row1, void* out,
                                DType out_dtype, cudaStream_t stream);

}  // namespace quantlab::bitstack

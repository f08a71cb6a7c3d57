// CUDA kernels for ternary weights (torch-free: raw pointers, a POD struct and a caller-supplied
// stream; the torch adapter is csrc/bindings/ternary_cuda.cpp). Targets sm_80+.
//
// Layout read: i2 rows, uint8 [N, row_bytes] with row_bytes a multiple of 16 and 4 * row_bytes
// >= K. Code c = t + 1 in {0, 1, 2}; column k sits in byte k / 4 at bits 2 (k % 4). Columns past
// K are ignored (their activations are zero). Scales fp32 [1, 1] (per tensor), [N, 1] (per row)
// or [N, K / group_size].
//
// Arithmetic (the same as the CPU kernels and quantlab/ops/ternary_reference.py): BitNet's
// per-token int8 activations, inv = fp32(1 / max(max|x|, 1e-5)) * 127, xq = round_half_even(x *
// inv); exact integer group sums acc_g = sum t * xq; y = (sum_g acc_g * s_g) / inv in fp32.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace quantlab::ternary {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int64_t kCudaPerTensor = 0;
constexpr int64_t kCudaPerRow = -1;
// Bytes per row of the layout must be a multiple of this (one 128-bit load = 64 trits).
constexpr int64_t kCudaRowAlign = 16;
// Largest batch the fused GEMV takes; larger batches go through dequantize + cuBLAS.
constexpr int kCudaGemvMaxRows = 8;

struct CudaWeight {
  const uint8_t* qweight;  // i2 [N, row_bytes]
  const float* scales;     // fp32, see above
  int64_t n;
  int64_t k;
  int64_t row_bytes;   // multiple of kCudaRowAlign, >= ceil(K / 4)
  int64_t group_size;  // kCudaPerTensor, kCudaPerRow, or 32 / 64 / 128 dividing K
};

// Whether launch_gemv takes this weight (group size, alignment).
bool gemv_supported(const CudaWeight& w);

// Dynamic shared memory the fused GEMV needs for `m` rows of x.
size_t gemv_shared_bytes(const CudaWeight& w, int64_t m);

// y [M, N] = A8(x [M, K]) @ W^T for 1 <= M <= kCudaGemvMaxRows, x and y contiguous in `dtype`.
// One launch: every block quantizes x into shared memory (int8, permuted for dp4a), then each
// warp computes whole output rows. `sm_count` sizes the grid; `max_shared` is the device's
// opt-in shared memory per block (batches that do not fit are split into several launches).
cudaError_t launch_gemv(const CudaWeight& w, const void* x, void* y, int64_t m, DType dtype,
                        int sm_count, int max_shared, cudaStream_t stream);

// BitNet's int8 activations of x [M, K] as their float values xq / inv, in `dtype` (for the
// dequantize + GEMM path of large batches).
cudaError_t launch_fake_quantize_activations(const void* x, void* out, int64_t m, int64_t k,
                                             DType dtype, cudaStream_t stream);

// out [N, K] in out_dtype = s * t. `packing` 0: i2 rows of `row_bytes` bytes (any row_bytes >=
// ceil(K / 4)); 1: tq1 rows of ceil(K / 5) bytes.
cudaError_t launch_dequant(const uint8_t* qweight, int packing, int64_t row_bytes,
                           const float* scales, int64_t n, int64_t k, int64_t group_size,
                           void* out, DType out_dtype, cudaStream_t stream);

// i2 rows of `row_bytes_out` bytes (a multiple of kCudaRowAlign; padding code 1) from i2 rows of
// any width (packing 0) or tq1 rows (packing 1).
cudaError_t launch_to_aligned_i2(const uint8_t* qweight, int packing, int64_t row_bytes_in,
                                 int64_t n, int64_t k, uint8_t* out, int64_t row_bytes_out,
                                 cudaStream_t stream);

}  // namespace quantlab::ternary

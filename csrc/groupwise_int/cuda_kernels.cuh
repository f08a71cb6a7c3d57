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

// ---- Grouped GEMV over a mixture's experts (cuda_grouped.cu) ----
// E weights of one shape stacked: qweight uint32 [E, N, words_k], scales [E, N, G] in
// scale_dtype (read as stored: fp32, fp16 or bf16), qzeros uint32 [E, N, words_g] or null.
struct GroupedWeight {
  const uint32_t* qweight;
  const void* scales;
  const uint32_t* qzeros;
  DType scale_dtype;
  int64_t experts;
  int64_t n;
  int64_t k;
  int64_t group_size;  // effective (K for per-channel)
  int bits;
};

// Rows of one expert a CTA of the grouped GEMV takes at once (its rows are split into tiles of
// this many).
constexpr int kGroupedTileRows = 8;

// Most CTA rows (grid.y) one grouped launch may use; grouped_gemv_grid_rows gives the need.
constexpr int64_t kGroupedMaxGridRows = 65535;

// grid.y of a grouped launch over `rows` rows of x and `experts` experts: an upper bound on
// sum_e ceil(rows_e / kGroupedTileRows) that needs no look at the offsets.
inline int64_t grouped_gemv_grid_rows(int64_t rows, int64_t experts) {
  return (rows + kGroupedTileRows - 1) / kGroupedTileRows + (rows < experts ? rows : experts);
}

// y [R, N]: rows offsets[e] .. offsets[e + 1] of x [R, K] times expert e's W^T, one launch for
// every expert (a CTA finds its expert and row tile from the offsets; experts without rows cost
// no CTA that reads weights). offsets: int64 [E + 1] in device memory, offsets[0] = 0,
// nondecreasing, offsets[E] = R (the caller checks; the torch binding does so on the host). x and
// y share `dtype`; fp32 accumulation; the per-row arithmetic of launch_gemv. cudaErrorInvalidValue
// when grouped_gemv_grid_rows(R, E) exceeds kGroupedMaxGridRows.
cudaError_t launch_grouped_gemv(const GroupedWeight& w, const int64_t* offsets, const void* x,
                                void* y, int64_t rows, DType dtype, cudaStream_t stream);

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

// Tensor-core (mma.sync m16n8k16) kernel for groupwise-int weights in the repacked "mma" layout,
// for fp16/bf16 activations and batches of 1-255 rows (torch-free; the adapter is
// csrc/bindings/groupwise_int_cuda.cpp).
//
// The layout's index math is mma_layout.h (the kernel, the repack of mma_repack.h and the tests all
// call it); its derivation and the PyTorch reference repack are in
// quantlab/formats/groupwise_int_mma_layout.py. The bracketed section names ([B-tiles],
// [B-frag 4-bit], [B-frag 8-bit], [scales], [zeros], [smem], [split-K]) are mma_layout.h's. Summary: qweight int32 [Kp/16][Np/64][32 lanes][bits words] (each
// lane's B fragments of a 16x64 tile, one 16-byte load at 4 bits), scales [Gp][Np/64][8][8] in the
// layer's scale dtype, zeros int32 [Gp][Np/64][8][bits/4] (asymmetric only). Np = N rounded up to
// 64, Kp = K rounded up to 64; padded codes/scales/zeros are 0.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "groupwise_int/cuda_kernels.cuh"
#include "groupwise_int/mma_repack.h"

namespace quantlab::groupwise_int {

struct MmaWeight {
  const uint32_t* qweight;  // [Kp/16, Np/64, 32, bits]
  const void* scales;       // [Gp, Np/64, 8, 8] in scale_dtype (kFloat16 or kBFloat16)
  const uint32_t* zeros;    // [Gp, Np/64, 8, bits/4] or nullptr (symmetric: 2^(bits-1))
  DType scale_dtype;
  int64_t n;           // out_features (real)
  int64_t k;           // in_features (real), a multiple of 8
  int64_t group_size;  // the kernel's group size: the layer's (a multiple of 16), or Kp
  int bits;            // 4 or 8
};

constexpr int kMmaTileN = 64;    // columns per warp slab / per B tile
constexpr int kMmaStageK = 64;   // k per pipeline stage
constexpr int kMmaCtaN = 256;    // columns per CTA (4 warps)
constexpr int kMmaMaxRows = 255; // batches the adapter sends here; from 256 rows cuBLAS wins
constexpr int kMmaMaxSplits = 16;

inline int64_t mma_n_pad(int64_t n) { return mma_layout::n_pad(n); }
inline int64_t mma_k_pad(int64_t k) { return mma_layout::k_pad(k); }
inline int64_t mma_groups(int64_t k, int64_t group_size) {
  return mma_layout::kernel_groups(k, group_size);
}

// Whether the kernel takes a weight of this encoding (mirrors fast_path_reason in
// groupwise_int_mma_layout.py; `group_size` is the kernel's).
bool mma_supported(int bits, int64_t k, int64_t group_size, DType scale_dtype);

// Split count launch_mma runs for `requested` (0: the heuristic, which needs the SM count;
// >= 1: clamped to [1, min(k tiles, kMmaMaxSplits)], then to the ranges split_plan makes).
int mma_resolve_splits(const MmaWeight& w, int64_t m, DType act_dtype, int requested,
                       int sm_count);

// fp32 workspace bytes and int32 counters (zero-initialised by the caller, left zero by the
// kernel) launch_mma needs for `splits` (both 0 when splits == 1).
size_t mma_workspace_bytes(const MmaWeight& w, int64_t m, int splits);
int64_t mma_counter_count(const MmaWeight& w, int64_t m, int splits);

// y [M, N] = x [M, K] @ W^T. x row-major contiguous and 16-byte aligned, x and y in act_dtype
// (kFloat16 / kBFloat16), `splits` from mma_resolve_splits.
cudaError_t launch_mma(const MmaWeight& w, const void* x, void* y, int64_t m, DType act_dtype,
                       int splits, float* workspace, int* counters, cudaStream_t stream);

// The repack from the exported layout into this kernel's (cuda_mma_repack.cu): qweight
// [Kp/16, Np/64, 32, bits] words, scales [Gp, Np/64, 8, 8] 16-bit patterns, zeros
// [Gp, Np/64, 8, bits/4] words (nullptr exactly when s.qzeros is); every element written.
cudaError_t launch_mma_repack(const mma_repack::Source& s, const mma_repack::Extents& e,
                              uint32_t* qweight, uint16_t* scales, uint32_t* zeros,
                              cudaStream_t stream);

}  // namespace quantlab::groupwise_int

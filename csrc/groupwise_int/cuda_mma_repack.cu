// The mma-layout repack on the GPU: one thread per repacked qweight word, then one per (group,
// tile column block, lane group) for the scales and zeros; every index from mma_repack.h /
// mma_layout.h, as on the CPU (mma_repack_cpu.cpp).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_check.h"
#include "common/cuda_launch.cuh"
#include "groupwise_int/cuda_mma.cuh"
#include "groupwise_int/mma_repack.h"

namespace quantlab::groupwise_int {
namespace {

constexpr int kRepackThreads = 256;
constexpr int64_t kRepackMaxBlocks = 4096;  // grid-stride beyond: a one-time, memory-bound pass

__global__ void __launch_bounds__(kRepackThreads)
    repack_b_kernel(const mma_repack::Source s, const mma_repack::Extents e, uint32_t* qweight) {
  const int64_t total = e.k16 * e.n_tiles * 32 * s.bits;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // i enumerates (kk, nn, lane, word) row-major: consecutive threads write consecutive words.
    const int word = static_cast<int>(i % s.bits);
    const int lane = static_cast<int>((i / s.bits) % 32);
    const int64_t nn = (i / (s.bits * 32)) % e.n_tiles;
    const int64_t kk = i / (s.bits * 32 * e.n_tiles);
    qweight[mma_layout::b_word(kk, nn, e.n_tiles, lane, word, s.bits)] =
        mma_repack::b_word_value(s, kk, nn, lane, word);
  }
}

__global__ void __launch_bounds__(kRepackThreads)
    repack_groups_kernel(const mma_repack::Source s, const mma_repack::Extents e,
                         uint16_t* scales, uint32_t* zeros) {
  const int64_t total = e.groups * e.n_tiles * 8;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int g = static_cast<int>(i % 8);
    const int64_t nn = (i / 8) % e.n_tiles;
    const int64_t grp = i / (8 * e.n_tiles);
    mma_repack::group_entries(s, e, grp, nn, g, scales, zeros);
  }
}

unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min(kRepackMaxBlocks, (items + kRepackThreads - 1) / kRepackThreads)));
}

}  // namespace

cudaError_t launch_mma_repack(const mma_repack::Source& s, const mma_repack::Extents& e,
                              uint32_t* qweight, uint16_t* scales, uint32_t* zeros,
                              cudaStream_t stream) {
  if ((s.bits != 4 && s.bits != 8) || s.n < 1 || s.k < 1 || s.groups < 1 || e.k16 < 1 ||
      e.n_tiles < 1 || e.groups < 1 || (s.qzeros != nullptr) != (zeros != nullptr)) {
    return cudaErrorInvalidValue;
  }
  QUANTLAB_LAUNCH(blocks_for(e.k16 * e.n_tiles * 32 * s.bits), kRepackThreads, 0, stream,
                  repack_b_kernel)(s, e, qweight);
  QUANTLAB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  QUANTLAB_LAUNCH(blocks_for(e.groups * e.n_tiles * 8), kRepackThreads, 0, stream,
                  repack_groups_kernel)(s, e, scales, zeros);
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

}  // namespace quantlab::groupwise_int

// The grouped GEMV over a mixture's experts: one launch computes every expert's rows.
//
// x holds the routed tokens sorted by expert (rows offsets[e] .. offsets[e + 1] go to expert e).
// grid.x tiles the output features (one warp per feature, as the dense GEMV), grid.y enumerates
// (expert, tile of up to kGroupedTileRows rows) pairs: CTA row t belongs to the first expert
// whose cumulative tile count passes t, found by a scan of the offsets (E + 1 broadcast loads per
// CTA, negligible next to a weight row). grid.y is an upper bound on the tiles, computed from the
// row and expert counts alone, so the host never reads the offsets and the CTAs past the last
// tile return at once. Each warp then runs the dense GEMV's row body on its expert's weight row
// with the tile's rows of x, reading the scales in their stored dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/bitstream.h"
#include "common/cuda_check.h"
#include "common/cuda_convert.cuh"
#include "common/cuda_launch.cuh"
#include "groupwise_int/cuda_gemv_row.cuh"
#include "groupwise_int/cuda_kernels.cuh"

namespace quantlab::groupwise_int {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T, typename S>
__global__ void __launch_bounds__(kGemvWarp* kWarpsPerBlock)
    grouped_gemv_kernel(GroupedWeight w, const int64_t* __restrict__ offsets,
                        const T* __restrict__ x, T* __restrict__ y) {
  // Which expert and which of its row tiles this CTA row is.
  int64_t tile = blockIdx.y;
  int64_t expert = -1;
  int64_t first = 0;
  int64_t count = 0;
  for (int64_t e = 0; e < w.experts; ++e) {
    first = offsets[e];
    count = offsets[e + 1] - first;
    const int64_t tiles = count > 0 ? (count + kGroupedTileRows - 1) / kGroupedTileRows : 0;
    if (tile < tiles) {
      expert = e;
      break;
    }
    tile -= tiles;
  }
  if (expert < 0) return;  // past the last tile (grid.y is an upper bound)
  const int lane = threadIdx.x % kGemvWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kGemvWarp;
  if (row >= w.n) return;
  const int64_t groups = w.k / w.group_size;
  const int64_t weight_row = expert * w.n + row;
  const GemvRow<S> r{
      w.qweight + weight_row * packed_words(w.k, w.bits),
      static_cast<const S*>(w.scales) + weight_row * groups,
      w.qzeros == nullptr ? nullptr : w.qzeros + weight_row * packed_words(groups, w.bits),
      w.k, w.group_size, w.bits};
  const int64_t x_row = first + tile * kGroupedTileRows;
  const int64_t m = count - tile * kGroupedTileRows;
  const T* xt = x + x_row * w.k;
  T* yt = y + x_row * w.n + row;
  switch (m < kGroupedTileRows ? m : kGroupedTileRows) {
    case 1: gemv_row<T, S, 1>(r, xt, yt, w.n, lane); break;
    case 2: gemv_row<T, S, 2>(r, xt, yt, w.n, lane); break;
    case 3: gemv_row<T, S, 3>(r, xt, yt, w.n, lane); break;
    case 4: gemv_row<T, S, 4>(r, xt, yt, w.n, lane); break;
    case 5: gemv_row<T, S, 5>(r, xt, yt, w.n, lane); break;
    case 6: gemv_row<T, S, 6>(r, xt, yt, w.n, lane); break;
    case 7: gemv_row<T, S, 7>(r, xt, yt, w.n, lane); break;
    default: gemv_row<T, S, 8>(r, xt, yt, w.n, lane); break;
  }
}
static_assert(kGroupedTileRows == 8, "grouped_gemv_kernel's switch covers tiles of 1..8 rows");

template <typename T, typename S>
cudaError_t grouped_typed(const GroupedWeight& w, const int64_t* offsets, const void* x, void* y,
                          int64_t grid_rows, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((w.n + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>(grid_rows));
  QUANTLAB_LAUNCH(grid, kGemvWarp * kWarpsPerBlock, 0, stream, grouped_gemv_kernel<T, S>)(
      w, offsets, static_cast<const T*>(x), static_cast<T*>(y));
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

template <typename T>
cudaError_t grouped_scales(const GroupedWeight& w, const int64_t* offsets, const void* x, void* y,
                           int64_t grid_rows, cudaStream_t stream) {
  switch (w.scale_dtype) {
    case DType::kFloat32: return grouped_typed<T, float>(w, offsets, x, y, grid_rows, stream);
    case DType::kFloat16: return grouped_typed<T, __half>(w, offsets, x, y, grid_rows, stream);
    case DType::kBFloat16:
      return grouped_typed<T, __nv_bfloat16>(w, offsets, x, y, grid_rows, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_grouped_gemv(const GroupedWeight& w, const int64_t* offsets, const void* x,
                                void* y, int64_t rows, DType dtype, cudaStream_t stream) {
  if (rows < 0 || w.experts < 1 || w.n < 0 || w.k < 1 || w.group_size < 1 ||
      w.k % w.group_size != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || w.n == 0) return cudaSuccess;
  const int64_t grid_rows = grouped_gemv_grid_rows(rows, w.experts);
  if (grid_rows > kGroupedMaxGridRows) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return grouped_scales<float>(w, offsets, x, y, grid_rows, stream);
    case DType::kFloat16: return grouped_scales<__half>(w, offsets, x, y, grid_rows, stream);
    case DType::kBFloat16:
      return grouped_scales<__nv_bfloat16>(w, offsets, x, y, grid_rows, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace quantlab::groupwise_int

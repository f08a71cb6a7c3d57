// Host side of the mma kernel: support check, split-K plan and heuristic, launch (the kernel
// template is cuda_mma_kernel.cuh, instantiated in cuda_mma_f16.cu / cuda_mma_bf16.cu).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "groupwise_int/cuda_mma.cuh"
#include "groupwise_int/cuda_mma_kernel.cuh"
#include "groupwise_int/mma_layout.h"

namespace quantlab::groupwise_int {
namespace {

// The heuristic's cost model (in k tiles of work per CTA): a CTA pays about this many tiles of
// pipeline fill and drain on top of its range, and a split-K reduction about one more.
constexpr int64_t kFillTiles = 2;
constexpr int64_t kReduceTiles = 1;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int tile_mb(int64_t m) { return m <= 16 ? 1 : (m <= 32 ? 2 : 4); }

// [split-K]: mma_layout.h's plan, capped at kMmaMaxSplits.
void split_plan(int64_t k_tiles, int64_t requested, int* splits, int* per) {
  mma_layout::split_plan(k_tiles, requested, kMmaMaxSplits, splits, per);
}

int act_index(DType t) { return t == DType::kBFloat16 ? 1 : 0; }

// CTAs of one instance resident per SM (cached: the same for every call of that instance on a
// given GPU model; a process that mixes GPU models gets the first one's figure, which only moves
// the split heuristic).
int occupancy(DType act, DType scale, int bits, int mb) {
  static int cache[2][2][2][3] = {};
  int& slot = cache[act_index(act)][act_index(scale)][bits == 8 ? 1 : 0][mb == 1 ? 0 : (mb == 2 ? 1 : 2)];
  if (slot == 0) {
    slot = act == DType::kFloat16 ? mma::occupancy_for_act<__half>(scale, bits, mb)
                                  : mma::occupancy_for_act<__nv_bfloat16>(scale, bits, mb);
  }
  return slot;
}

}  // namespace

bool mma_supported(int bits, int64_t k, int64_t group_size, DType scale_dtype) {
  const bool scale_ok = scale_dtype == DType::kFloat16 || scale_dtype == DType::kBFloat16;
  return (bits == 4 || bits == 8) && scale_ok && k > 0 && k % 8 == 0 && group_size >= 16 &&
         group_size % 16 == 0 && mma_k_pad(k) / kMmaStageK <= INT_MAX;
}

int mma_resolve_splits(const MmaWeight& w, int64_t m, DType act_dtype, int requested,
                       int sm_count) {
  const int64_t k_tiles = mma_k_pad(w.k) / kMmaStageK;
  int splits = 1, per = 1;
  if (requested >= 1) {
    split_plan(k_tiles, requested, &splits, &per);
    return splits;
  }
  // Heuristic: the split count whose waves of CTAs over sm_count * occupancy slots finish first.
  const int mb = tile_mb(m);
  const int64_t ctas = ceil_div(mma_n_pad(w.n), kMmaCtaN) * ceil_div(m, 16 * mb);
  const int64_t slots =
      std::max<int64_t>(1, static_cast<int64_t>(std::max(sm_count, 1)) *
                               occupancy(act_dtype, w.scale_dtype, w.bits, mb));
  int best = 1;
  int64_t best_cost = INT64_MAX;
  for (int64_t s = 1; s <= std::min<int64_t>(k_tiles, kMmaMaxSplits); ++s) {
    split_plan(k_tiles, s, &splits, &per);
    if (splits != s) continue;  // the same plan as a smaller request
    const int64_t waves = ceil_div(ctas * splits, slots);
    const int64_t cost = waves * (per + kFillTiles) + (splits > 1 ? kReduceTiles : 0);
    if (cost < best_cost) {
      best_cost = cost;
      best = splits;
    }
  }
  return best;
}

size_t mma_workspace_bytes(const MmaWeight& w, int64_t m, int splits) {
  if (splits <= 1 || m < 1) return 0;
  return static_cast<size_t>(splits) * static_cast<size_t>(m) *
         static_cast<size_t>(mma_n_pad(w.n)) * sizeof(float);
}

int64_t mma_counter_count(const MmaWeight& w, int64_t m, int splits) {
  if (splits <= 1 || m < 1) return 0;
  return ceil_div(mma_n_pad(w.n), kMmaCtaN) * ceil_div(m, 16 * tile_mb(m));
}

cudaError_t launch_mma(const MmaWeight& w, const void* x, void* y, int64_t m, DType act_dtype,
                       int splits, float* workspace, int* counters, cudaStream_t stream) {
  if (m < 1 || splits < 1 || !mma_supported(w.bits, w.k, w.group_size, w.scale_dtype)) {
    return cudaErrorInvalidValue;
  }
  if (act_dtype != DType::kFloat16 && act_dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return cudaErrorMisalignedAddress;
  const int mb = tile_mb(m);
  const int64_t n_ctas = ceil_div(mma_n_pad(w.n), kMmaCtaN);
  const int64_t m_ctas = ceil_div(m, 16 * mb);
  if (n_ctas > INT_MAX || m_ctas > 65535 || m > INT_MAX) return cudaErrorInvalidValue;
  mma::Args a{};
  a.w = w;
  a.x = x;
  a.y = y;
  a.m = static_cast<int>(m);
  a.n_pad = static_cast<int>(mma_n_pad(w.n));
  a.k_tiles = static_cast<int>(mma_k_pad(w.k) / kMmaStageK);
  split_plan(a.k_tiles, splits, &a.splits, &a.k_tiles_per_split);
  if (a.splits != splits) return cudaErrorInvalidValue;  // resolve with mma_resolve_splits first
  if (a.splits > 1 && (workspace == nullptr || counters == nullptr)) return cudaErrorInvalidValue;
  a.workspace = workspace;
  a.counters = counters;
  const dim3 grid(static_cast<unsigned>(n_ctas), static_cast<unsigned>(m_ctas),
                  static_cast<unsigned>(a.splits));
  return act_dtype == DType::kFloat16 ? mma::launch_for_act<__half>(a, grid, mb, stream)
                                      : mma::launch_for_act<__nv_bfloat16>(a, grid, mb, stream);
}

}  // namespace quantlab::groupwise_int

// Argument checks shared by the PVQ CPU and CUDA bindings; every message names the argument.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "pvq/cpu_kernels.h"
#include "pvq/pvq_decode.h"

namespace quantlab {

// Batches above this go through decode + GEMM: each decoded row then serves enough rows of x that
// the BLAS GEMM beats the per-row dot products.
constexpr int64_t kPvqGemvMaxRows = 8;

struct PvqArgs {
  int64_t n;  // out_features
  int64_t k;  // in_features
  int64_t levels;
  int dim;
  int pulses;
  int code_bits;
  int64_t n_words;
};

inline PvqArgs check_pvq(const at::Tensor& codes, const at::Tensor& row_scales,
                         const at::Tensor& levels, int64_t dim, int64_t pulses,
                         int64_t in_features, const char* device) {
  TORCH_CHECK(dim >= 1 && dim <= pvq::kMaxDim, "pvq: dim must be in [1, ", pvq::kMaxDim,
              "], got ", dim);
  TORCH_CHECK(pulses >= 1 && pulses <= pvq::kMaxPulses, "pvq: pulses must be in [1, ",
              pvq::kMaxPulses, "], got ", pulses);
  TORCH_CHECK(in_features > 0 && in_features % dim == 0, "pvq: dim ", dim,
              " must divide in_features ", in_features);
  TORCH_CHECK(row_scales.dim() == 1 && at::isFloatingType(row_scales.scalar_type()),
              "pvq: row_scales must be a floating-point [N] tensor, got ", row_scales.scalar_type(),
              " ", row_scales.sizes());
  TORCH_CHECK(levels.dim() == 1 && levels.size(0) >= 1 && at::isFloatingType(levels.scalar_type()),
              "pvq: levels must be a non-empty floating-point [L] tensor, got ",
              levels.scalar_type(), " ", levels.sizes());
  pvq::CpuParams shape{};
  shape.dim = static_cast<int>(dim);
  shape.pulses = static_cast<int>(pulses);
  shape.n_levels = levels.size(0);
  int bits = 0;
  TORCH_CHECK(pvq::code_width(shape, &bits), "pvq: codes for dim ", dim, ", pulses ", pulses,
              " and ", levels.size(0), " levels need more than ", pvq::kMaxCodeBits, " bits");
  const int64_t n = row_scales.size(0);
  const int64_t n_words = (n * (in_features / dim) * bits + 31) / 32;
  TORCH_CHECK(codes.scalar_type() == at::kInt && codes.dim() == 1 && codes.size(0) == n_words,
              "pvq: codes must be int32 [", n_words, "] for ", n, " rows of ", in_features / dim,
              " ", bits, "-bit codes, got ", codes.scalar_type(), " ", codes.sizes());
  const bool want_cuda = std::string(device) == "cuda";
  auto on_device = [&](const at::Tensor& t) {
    return want_cuda ? (t.is_cuda() && t.device() == codes.device()) : t.is_cpu();
  };
  TORCH_CHECK(on_device(codes) && on_device(row_scales) && on_device(levels),
              "pvq: codes, row_scales and levels must all be on the same ", device, " device");
  return {n, in_features, levels.size(0), static_cast<int>(dim), static_cast<int>(pulses), bits,
          n_words};
}

}  // namespace quantlab

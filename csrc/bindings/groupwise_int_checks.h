// Argument checks shared by the CPU and CUDA bindings; every message names the argument.
#pragma once

#include <ATen/ATen.h>

#include "common/bitstream.h"

namespace quantlab {

// Rows of x the GEMV kernels take at once (the CPU binding chunks larger batches of large weights,
// see groupwise_int.cpp; the rest go through dequantize + GEMM).
constexpr int64_t kGemvMaxRows = 8;

struct GroupwiseIntArgs {
  int64_t n;           // out_features
  int64_t k;           // in_features
  int64_t group_size;  // effective (K for per-channel)
  int64_t groups;
  int64_t bits;
};

inline GroupwiseIntArgs check_groupwise_int(const at::Tensor& qweight, const at::Tensor& scales,
                                            const c10::optional<at::Tensor>& qzeros, int64_t bits,
                                            int64_t group_size, int64_t in_features,
                                            const char* device) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8,
              "groupwise_int: bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(in_features > 0, "groupwise_int: in_features must be positive, got ", in_features);
  TORCH_CHECK(group_size == -1 || group_size > 0,
              "groupwise_int: group_size must be -1 (per-channel) or positive, got ", group_size);
  const int64_t gs = group_size == -1 ? in_features : group_size;
  TORCH_CHECK(in_features % gs == 0, "groupwise_int: group_size ", group_size,
              " does not divide in_features ", in_features);
  const int64_t groups = in_features / gs;
  TORCH_CHECK(qweight.scalar_type() == at::kInt, "groupwise_int: qweight must be int32, got ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2, "groupwise_int: qweight must be 2-D [N, words], got ",
              qweight.sizes());
  const int64_t n = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == packed_words(in_features, static_cast<int>(bits)),
              "groupwise_int: qweight must be [N, ", packed_words(in_features, static_cast<int>(bits)),
              "] for in_features ", in_features, " at ", bits, " bits, got ", qweight.sizes());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == groups,
              "groupwise_int: scales must be [", n, ", ", groups, "], got ", scales.sizes());
  TORCH_CHECK(at::isFloatingType(scales.scalar_type()),
              "groupwise_int: scales must be floating point, got ", scales.scalar_type());
  if (qzeros.has_value()) {
    const at::Tensor& z = *qzeros;
    TORCH_CHECK(z.scalar_type() == at::kInt, "groupwise_int: qzeros must be int32, got ",
                z.scalar_type());
    TORCH_CHECK(z.dim() == 2 && z.size(0) == n &&
                    z.size(1) == packed_words(groups, static_cast<int>(bits)),
                "groupwise_int: qzeros must be [", n, ", ",
                packed_words(groups, static_cast<int>(bits)), "], got ", z.sizes());
  }
  const bool want_cuda = std::string(device) == "cuda";
  auto on_device = [&](const at::Tensor& t) { return want_cuda ? t.is_cuda() : t.is_cpu(); };
  TORCH_CHECK(on_device(qweight) && on_device(scales) && (!qzeros || on_device(*qzeros)),
              "groupwise_int: qweight, scales and qzeros must all be on the ", device);
  return {n, in_features, gs, groups, bits};
}

}  // namespace quantlab

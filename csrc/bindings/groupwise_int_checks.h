// Argument checks shared by the CPU and CUDA bindings; every message names the argument.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/bitstream.h"
#include "groupwise_int/mma_repack.h"

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

// The repack into the mma layout: the exported tensors checked as every groupwise_int op checks
// them, plus what the layout needs (4/8 bits, fp16/bf16 scales, K % 8 == 0, a group size that is
// a multiple of 16). Returns the source view and the repacked extents; the tensors must be
// contiguous (the binding passes .contiguous() copies).
struct MmaRepackPlan {
  groupwise_int::mma_repack::Source source;
  groupwise_int::mma_repack::Extents extents;
};

inline MmaRepackPlan check_mma_repack(const at::Tensor& qweight, const at::Tensor& scales,
                                      const c10::optional<at::Tensor>& qzeros, int64_t bits,
                                      int64_t group_size, int64_t in_features,
                                      const char* device) {
  const GroupwiseIntArgs a =
      check_groupwise_int(qweight, scales, qzeros, bits, group_size, in_features, device);
  TORCH_CHECK(bits == 4 || bits == 8, "groupwise_int_mma_repack: the mma layout takes 4- or "
              "8-bit codes, got ", bits);
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16,
              "groupwise_int_mma_repack: the mma layout takes fp16 or bf16 scales, got ",
              scales.scalar_type());
  TORCH_CHECK(in_features % 8 == 0, "groupwise_int_mma_repack: in_features must be a multiple "
              "of 8, got ", in_features);
  TORCH_CHECK(group_size == -1 || group_size % 16 == 0, "groupwise_int_mma_repack: group_size "
              "must be -1 or a multiple of 16, got ", group_size);
  namespace ml = groupwise_int::mma_layout;
  const int64_t kernel_group = group_size == -1 ? ml::k_pad(in_features) : group_size;
  MmaRepackPlan plan{};
  plan.source.n = a.n;
  plan.source.k = a.k;
  plan.source.groups = a.groups;
  plan.source.q_row_words = qweight.size(1);
  plan.source.z_row_words = qzeros.has_value() ? qzeros->size(1) : 0;
  plan.source.bits = static_cast<int>(bits);
  plan.extents.k16 = ml::k_pad(a.k) / ml::kTileK;
  plan.extents.n_tiles = ml::n_pad(a.n) / ml::kTileN;
  plan.extents.groups = ml::kernel_groups(a.k, kernel_group);
  return plan;
}

// The repacked tensors of a plan, allocated like `like` (zeros: an empty int32 tensor when
// symmetric, since an op cannot return None).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> mma_repack_outputs(
    const MmaRepackPlan& plan, const at::Tensor& like, at::ScalarType scale_dtype, bool sym) {
  const auto& e = plan.extents;
  const int64_t bits = plan.source.bits;
  const auto ints = like.options().dtype(at::kInt);
  at::Tensor q = at::empty({e.k16, e.n_tiles, 32, bits}, ints);
  at::Tensor s = at::empty({e.groups, e.n_tiles, 8, 8}, like.options().dtype(scale_dtype));
  at::Tensor z = sym ? at::empty({0}, ints) : at::empty({e.groups, e.n_tiles, 8, bits / 4}, ints);
  return {q, s, z};
}

}  // namespace quantlab
